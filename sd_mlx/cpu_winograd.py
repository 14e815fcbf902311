"""3x3 convolutions by Winograd's F(2x2, 3x3) on MLX's CPU backend, compiled from C++ at first use.

A stride-1 3x3 convolution with ``C`` input and ``O`` output channels costs ``9 C O`` multiply-adds per output
pixel; F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016) computes each
2x2 output tile from its 4x4 input tile with ``16 C O`` (2.25x fewer), as 16 independent matrix products between
transformed input tiles and transformed kernels, plus cheap additions before and after.
``csrc/cpu_winograd.cpp`` does the transforms on all cores and the products with the optimised BLAS that
:mod:`sd_mlx.blas` loads for MLX (``cblas_sgemm``, looked up in the process's global scope). Measured on a 2-core
x86 CPU with OpenBLAS, batch 2, 64x64x320 -> 320 channels: 57 ms against 127 ms for :func:`conv3x3_taps
<sd_mlx.models.layers.conv3x3_taps>` (262 against 119 GFLOP/s of direct-convolution work); 32x32x640 -> 640:
68 against 116-134 ms; 16x16x1280 -> 1280: 65 against 106 ms.

Numerics: the transforms use only 0, +-1 and +-1/2, so the results agree with a direct convolution to float32
rounding (about 5e-7 of the output's largest value on random data). Inputs of other dtypes are computed in float32
and the result cast to the promoted dtype of input and kernel.

The library is built by :mod:`sd_mlx.native` and loaded with ``ctypes``. Where no compiler is found, the build
fails, no optimised BLAS is loaded (the reference BLAS MLX bundles on Linux is not in the global scope), or
``SD_MLX_WINOGRAD=0`` is set, :func:`winograd_conv3x3` returns ``None`` and the caller uses its MLX path;
:func:`winograd_status` says which and why. As with :mod:`sd_mlx.cpu_attention`, the kernel evaluates its inputs
(``mx.eval``), its derivatives are those of the caller's MLX reference (``mx.custom_function``), and inside
``mx.compile`` or ``mx.vmap``, where inputs cannot be evaluated, the reference gives the value. Its working
buffers (at most about 2 x 64 MB: transformed inputs; transformed kernels and products, in chunks) are outside
MLX's allocator and not in ``mx.get_peak_memory``.
"""

from __future__ import annotations

import ctypes
import functools
import subprocess
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from . import native

SOURCE = native.CSRC / "cpu_winograd.cpp"
_ENV = "SD_MLX_WINOGRAD"
WORK_BUDGET_BYTES = 64 * 2**20
F4_MIN_PIXELS = 1024
"""Output pixels per image from which F(4x4, 3x3) is used instead of F(2x2, 3x3) (see :func:`tile_size`)."""
"""Bytes for each of the kernel's two working areas (transformed inputs; transformed kernels and products)."""


@dataclass(frozen=True)
class WinogradStatus:
    """Whether the Winograd CPU convolution is in use in this process.

    Attributes:
        available: True when the library is built and loaded and an optimised ``cblas_sgemm`` is found.
        library: path of the loaded shared library, or ``None``.
        reason: one line saying why (for ``--verbose`` output and the tools' reports).
        turned_off: True when the user turned it off (``SD_MLX_WINOGRAD=0``).
    """

    available: bool
    library: str | None
    reason: str
    turned_off: bool = False


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Callable | None, WinogradStatus]:
    if native.turned_off(_ENV):
        return None, WinogradStatus(False, None, f"{_ENV}=0: MLX's convolutions", turned_off=True)
    cxx = native.compiler()
    if cxx is None:
        return None, WinogradStatus(False, None, native.NO_COMPILER)
    try:
        path = native.build_library(SOURCE, cxx, ("-ldl",))
        lib = ctypes.CDLL(str(path))
        fn, ready = lib.sd_mlx_winograd_f32, lib.sd_mlx_winograd_ready
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        return None, WinogradStatus(False, None, f"could not build the Winograd CPU convolution: {e}")
    if not ready():
        return None, WinogradStatus(False, str(path), "no optimised BLAS (cblas_sgemm) loaded: MLX's convolutions")
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 7 + [ctypes.c_long, ctypes.c_int]
    return fn, WinogradStatus(True, str(path), f"Winograd F(2x2, 3x3) CPU convolutions: {path}")


def winograd_status() -> WinogradStatus:
    """Build and load the kernel if not done yet in this process, and say whether it is in use. Never raises."""
    return _load()[1]


def winograd_status_on_cpu() -> WinogradStatus | None:
    """:func:`winograd_status` when MLX computes on the CPU (the only place the kernel is used), else ``None``.
    Never raises."""
    if mx.default_device() != mx.cpu:
        return None
    return winograd_status()


def tile_size(height: int, width: int) -> int:
    """Output tile size of the Winograd variant used for a ``height x width`` output: 4 (F(4x4, 3x3)) from
    :data:`F4_MIN_PIXELS` pixels per image, else 2 (F(2x2, 3x3)): F(4x4) does 36 products per 16 outputs instead
    of 16 per 4 (1.8x fewer) but has a quarter as many tiles, and below 32x32 its matrix products are too short
    to run at the BLAS's full speed."""
    return 4 if height * width >= F4_MIN_PIXELS else 2


ConvFn = Callable[..., mx.array]
"""``(x, weight, bias, *, pad_rows) -> y``: the caller's MLX 3x3 convolution, as
:func:`sd_mlx.models.layers.conv3x3_taps`."""


def winograd_conv3x3(x: mx.array, weight: mx.array, bias: mx.array | None, reference: ConvFn, *,
                     pad_rows: bool = True) -> mx.array | None:
    """Stride-1 3x3 convolution with one zero column each side (and one zero row above and below with
    ``pad_rows``) by Winograd F(2x2, 3x3) on the CPU, or ``None`` when the kernel cannot run.

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
        ``(B, H, W, O)`` (``(B, H - 2, W, O)`` without ``pad_rows``) in the promoted dtype of ``x`` and
        ``weight``; ``None`` when the kernel is unavailable (see :func:`winograd_status`) or an input is empty.
        Matches ``torch.nn.functional.conv2d(..., padding=1)`` to float32 rounding.

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
    dtype = mx.result_type(x, weight)
    if bias is None:
        return _differentiable(reference, pad_rows, False, dtype)(x, weight)
    return _differentiable(reference, pad_rows, True, dtype)(x, weight, bias)


@functools.lru_cache(maxsize=64)
def _differentiable(reference: ConvFn, pad_rows: bool, has_bias: bool, dtype: mx.Dtype) -> Callable:
    """The (loaded) kernel as an ``mx.custom_function`` whose derivatives are those of ``reference``."""
    fn = _load()[0]

    def ref(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
        return reference(x, weight, bias, pad_rows=pad_rows)

    if has_bias:
        @mx.custom_function
        def conv(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
            out = _run_kernel(fn, x, weight, bias, pad_rows=pad_rows)
            return ref(x, weight, bias) if out is None else out.astype(dtype)
    else:
        @mx.custom_function
        def conv(x: mx.array, weight: mx.array) -> mx.array:
            out = _run_kernel(fn, x, weight, None, pad_rows=pad_rows)
            return ref(x, weight) if out is None else out.astype(dtype)

    @conv.vjp
    def conv_vjp(primals: tuple[mx.array, ...], cotangent: mx.array, output: mx.array) -> list[mx.array]:
        return mx.vjp(ref, list(primals), [cotangent])[1]

    @conv.jvp
    def conv_jvp(primals: tuple[mx.array, ...], tangents: tuple[mx.array, ...]) -> list[mx.array]:
        return mx.jvp(ref, list(primals), list(tangents))[1]

    return conv


def _run_kernel(fn: Callable, x: mx.array, weight: mx.array, bias: mx.array | None, *,
                pad_rows: bool) -> mx.array | None:
    """Evaluate the inputs and run the kernel (float32 out); ``None`` when they cannot be evaluated (a tracer of
    ``mx.compile`` or ``mx.vmap``)."""
    arrays = [mx.contiguous(t.astype(mx.float32)) for t in (x, weight) + ((bias,) if bias is not None else ())]
    try:
        mx.eval(*arrays)
    except (ValueError, RuntimeError):
        return None
    xn, wn, *bn = (np.ascontiguousarray(t) for t in arrays)  # zero-copy views of MLX's buffers
    b, h, w, c = xn.shape
    o = wn.shape[0]
    hout = h if pad_rows else h - 2
    out = np.empty((b, hout, w, o), np.float32)
    rc = fn(xn.ctypes.data, wn.ctypes.data, bn[0].ctypes.data if bn else None, out.ctypes.data, b, h, w, c, o,
            int(pad_rows), tile_size(hout, w), WORK_BUDGET_BYTES, native.cpu_threads())
    if rc == 2:
        raise MemoryError(f"Winograd CPU convolution: could not allocate working buffers for x {x.shape}, "
                          f"weight {weight.shape}")
    if rc != 0:
        raise ValueError(f"Winograd CPU convolution failed ({rc}) for x {x.shape}, weight {weight.shape}")
    return mx.array(out)
