"""3x3 convolutions by Winograd's minimal filtering on MLX's CPU backend, compiled from C++ at first use.

A stride-1 3x3 convolution with ``C`` input and ``O`` output channels costs ``9 C O`` multiply-adds per output
pixel. Winograd's F(m x m, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016)
computes each ``m x m`` output tile from its ``(m+2) x (m+2)`` input tile with ``(m+2)^2 C O``: F(2x2, 3x3) 16
instead of 36 (2.25x fewer), F(4x4, 3x3) 36 instead of 144 (4x fewer), as ``(m+2)^2`` independent matrix products
between transformed input tiles and transformed kernels, plus additions before and after.
``csrc/cpu_winograd.cpp`` does the transforms on all cores and the products with the optimised BLAS that
:mod:`sd_mlx.cpu.blas` loads for MLX (``cblas_sgemm``, looked up in the process's global scope). :func:`tile_size`
picks F(4x4) from 32x32 outputs and F(2x2) below, where F(4x4)'s matrix products get too short. With a pthreads
build of OpenBLAS (whose thread count is process-wide; not an OpenMP or serial build; the default scipy-openblas32
is one, its ``scipy_``-prefixed thread functions found under their standard names, see :mod:`sd_mlx.cpu.blas`)
the products are split over the kernel's own threads, whole products each, with OpenBLAS set to one thread
meanwhile and restored after (concurrent calls share one saved count): OpenBLAS splitting each short product over the cores ran them at 110-160
GFLOP/s on the 2-core CPU below, whole products per thread at 165-177; per convolution 3-20% faster, a whole U-Net
call at batch 2 7.71 -> 7.52 s (median of 4, alternating in one process). With any other BLAS the products run one
after another on all its threads. The transformed kernels are written with streaming stores (AVX): 2-3x faster
kernel transforms for the wide layers, a U-Net call 7.23 -> 7.00 s. Measured before those two changes on a 2-core
x86 CPU with OpenBLAS, batch 2 (ms; GFLOP/s of direct-convolution work in brackets):

=========================  ==========  ==========  =======================================
convolution                F(4x4)      F(2x2)      MLX path (taps or ``mx.conv2d``)
=========================  ==========  ==========  =======================================
64x64, 320 -> 320          55 (272)    79 (192)    127-133 (taps, 113-119)
64x64, 960 -> 320          140 (324)   200 (226)   379-390 (taps / conv2d, 116-119)
32x32, 640 -> 640          46 (329)    52 (291)    116-134 (112-131)
16x16, 1280 -> 1280        94 (160)    82 (185)    106 (conv2d, 142)
=========================  ==========  ==========  =======================================

Whole SD1.5 U-Net call (batch 2, 64x64 latents) in one process, alternating: 14.3 s with MLX's convolutions,
12.2 s with F(2x2) only, 11.5 s with F(4x4) from 32x32.

Numerics: F(2x2) uses only 0, +-1 and +-1/2 and agrees with a direct convolution to float32 rounding (about 6e-7
of the output's largest value at 320 channels on random data); F(4x4) (interpolation points 0, +-1, +-2) about
1.2e-5. The full-size SD1.5 U-Net against diffusers: max abs error 1.05e-5 with F(4x4), 5.5e-6 with F(2x2), 6.6e-6
with MLX's convolutions (outputs of std 0.32). Inputs of other dtypes are computed in float32 and the result cast
to the promoted dtype of input, kernel and bias. Non-finite and huge values: an Inf input gives NaN over the output
tiles it reaches (2x2 or 4x4 pixels; a direct convolution gives Inf there), and F(4x4)'s transforms scale values
by up to about 25, so inputs within that factor of float32's range (3e38) can overflow where a direct convolution
does not. Either way the result is non-finite, which the pipeline reports.

The library is built by :mod:`sd_mlx.cpu.native` and loaded with ``ctypes``. Where no compiler is found, the build
fails, no optimised BLAS is loaded (the reference BLAS MLX bundles on Linux is not in the global scope), or
``SD_MLX_WINOGRAD=0`` is set, :func:`winograd_conv3x3` returns ``None`` and the caller uses its MLX path;
:func:`winograd_status` says which and why. As with :mod:`sd_mlx.cpu.attention`, the kernel evaluates its inputs
(``mx.eval``), its derivatives are those of the caller's MLX reference (``mx.custom_function``), and inside
``mx.compile`` or ``mx.vmap``, where inputs cannot be evaluated, the reference gives the value. Its working
buffers (about 2 x 64 MB at most, a little more for very narrow layers: transformed inputs; transformed kernels
and products, in chunks) are outside MLX's allocator and not in ``mx.get_peak_memory``; the float32 output is an
MLX array it fills in place (:class:`sd_mlx.cpu.native.KernelOutput`).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Callable

import mlx.core as mx

from . import native

SOURCE = native.CSRC / "cpu_winograd.cpp"
_ENV = "SD_MLX_WINOGRAD"
WORK_BUDGET_BYTES = 64 * 2**20
"""Bytes for each of the kernel's two working areas (transformed inputs; transformed kernels and products)."""
F4_MIN_PIXELS = 1024
"""Output pixels per image from which F(4x4, 3x3) is used instead of F(2x2, 3x3) (see :func:`tile_size`)."""


WinogradStatus = native.KernelStatus
"""Whether the Winograd CPU convolution is in use (``available`` also needs an optimised ``cblas_sgemm``;
``turned_off``: ``SD_MLX_WINOGRAD=0``)."""


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Callable | None, WinogradStatus]:
    bound, status = native.bind_kernel(SOURCE, _ENV, "the Winograd CPU convolution", off_reason="MLX's convolutions",
                                       in_use="Winograd F(4x4) and F(2x2) 3x3 CPU convolutions", bind=_bind,
                                       libs=("-ldl",))
    if bound is None:
        return None, status
    fn, ready = bound
    if not ready():
        return None, WinogradStatus(False, status.library, "no optimised BLAS (cblas_sgemm) loaded: MLX's convolutions")
    return fn, status


def _bind(library: ctypes.CDLL) -> tuple[Callable, Callable]:
    fn, ready = library.sd_mlx_winograd_f32, library.sd_mlx_winograd_ready
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 7 + [ctypes.c_long, ctypes.c_int]
    return fn, ready


def winograd_status() -> WinogradStatus:
    """Build and load the kernel if not done yet in this process, and say whether it is in use. Never raises."""
    return _load()[1]


def winograd_status_on_cpu() -> WinogradStatus | None:
    """:func:`winograd_status` when MLX computes on the CPU (the only place the kernel is used), else ``None``.
    Never raises."""
    return native.status_on_cpu(winograd_status)


def tile_size(height: int, width: int) -> int:
    """Output tile size of the Winograd variant used for a ``height x width`` output: 4 (F(4x4, 3x3)) from
    :data:`F4_MIN_PIXELS` pixels per image, else 2 (F(2x2, 3x3)): F(4x4) does 36 products per 16 outputs instead
    of 16 per 4 (1.8x fewer) but has a quarter as many tiles, and below 32x32 its matrix products are too short
    to run at the BLAS's full speed."""
    return 4 if height * width >= F4_MIN_PIXELS else 2


ConvFn = Callable[..., mx.array]
"""``(x, weight, bias, *, pad_rows) -> y``: the caller's MLX 3x3 convolution, as
:func:`sd_mlx.cpu.conv.conv3x3_taps`."""


def winograd_conv3x3(x: mx.array, weight: mx.array, bias: mx.array | None, reference: ConvFn, *,
                     pad_rows: bool = True) -> mx.array | None:
    """Stride-1 3x3 convolution with one zero column each side (and one zero row above and below with
    ``pad_rows``) by Winograd F(4x4, 3x3) or F(2x2, 3x3) (:func:`tile_size` of the output) on the CPU, or ``None``
    when the kernel cannot run.

    Args:
        x: ``(B, H, W, C)``, any float dtype (computed in float32).
        weight: ``(O, 3, 3, C)`` (MLX's convolution layout).
        bias: ``(O,)`` or ``None``.
        reference: the same convolution written with MLX operations; it supplies the derivatives (``mx.grad``,
            ``mx.vjp`` and ``mx.jvp`` differentiate it, not the kernel) and the value wherever the inputs cannot be
            evaluated (inside ``mx.compile`` or ``mx.vmap``).
        pad_rows: ``False`` when ``x`` already carries its one-row halo above and below (a row strip of a larger
            input): the output then has ``H - 2`` rows.

    Returns:
        ``(B, H, W, O)`` (``(B, H - 2, W, O)`` without ``pad_rows``) in the promoted dtype of ``x``, ``weight``
        and ``bias``; ``None`` when the kernel is unavailable (see :func:`winograd_status`) or an input is empty.
        Matches ``torch.nn.functional.conv2d(..., padding=1)`` to float32 rounding with F(2x2), to about 1e-5 of
        the largest output with F(4x4) (see the module's notes, also on non-finite and huge inputs).

    Raises:
        ValueError: ``x`` is not 4-D, ``weight`` is not ``(O, 3, 3, C)`` or ``bias`` not ``(O,)``.
        MemoryError: the kernel could not allocate its working buffers.
    """
    if x.ndim != 4 or weight.ndim != 4 or tuple(weight.shape[1:]) != (3, 3, x.shape[3]) \
            or (bias is not None and tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"winograd_conv3x3: expected x (B, H, W, C), weight (O, 3, 3, C) and bias (O,), got "
                         f"{x.shape}, {weight.shape}, {None if bias is None else bias.shape}")
    fn = _load()[0]
    if fn is None or 0 in x.shape or 0 in weight.shape or x.shape[1] - (0 if pad_rows else 2) < 1:
        return None
    arrays = (x, weight) if bias is None else (x, weight, bias)
    return _differentiable(reference, pad_rows, mx.result_type(*arrays))(*arrays)


@functools.lru_cache(maxsize=64)
def _differentiable(reference: ConvFn, pad_rows: bool, dtype: mx.Dtype) -> Callable:
    """The (loaded) kernel as an ``mx.custom_function`` of ``(x, weight[, bias])`` whose derivatives are those of
    ``reference``; its output in ``dtype``."""
    fn = _load()[0]

    def run(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array | None:
        out = _run_kernel(fn, x, weight, bias, pad_rows=pad_rows)
        return None if out is None else out.astype(dtype)

    def ref(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
        return reference(x, weight, bias, pad_rows=pad_rows)

    return native.with_reference_derivatives(run, ref)


def _run_kernel(fn: Callable, x: mx.array, weight: mx.array, bias: mx.array | None, *,
                pad_rows: bool) -> mx.array | None:
    """Evaluate the inputs and run the kernel (float32 out); ``None`` when they cannot be evaluated (a tracer of
    ``mx.compile`` or ``mx.vmap``)."""
    evaluated = native.evaluated_float32(x, weight, *(() if bias is None else (bias,)))
    if evaluated is None:
        return None
    (xn, wn, *bn), _owners = evaluated
    b, h, w, c = xn.shape
    o = wn.shape[0]
    hout = h if pad_rows else h - 2
    out = native.KernelOutput((b, hout, w, o))
    rc = fn(xn.ctypes.data, wn.ctypes.data, bn[0].ctypes.data if bn else None, out.view.ctypes.data, b, h, w, c, o,
            int(pad_rows), tile_size(hout, w), WORK_BUDGET_BYTES, native.cpu_threads())
    if rc == 2:
        raise MemoryError(f"Winograd CPU convolution: could not allocate working buffers for x {x.shape}, "
                          f"weight {weight.shape}")
    if rc != 0:
        raise ValueError(f"Winograd CPU convolution failed ({rc}) for x {x.shape}, weight {weight.shape}")
    return out.array()
