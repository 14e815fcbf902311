"""The operations the models call, and the one place that chooses how each is computed.

The models (:mod:`sd_mlx.models`) say the mathematics once and call these functions for attention, 3x3
convolutions, layer norms, GEGLU, SiLU, linear layers with a residual, and quantized products. Each function picks
between MLX's own operations, which is what runs on an Apple GPU (Metal) or with MLX's CUDA backend, and the Linux
CPU machinery of :mod:`sd_mlx.cpu` (C++ kernels, convolutions as shifted products, chunked attention, float32
products for quantized or half-precision weights).

The CPU machinery is used only when :func:`cpu_kernels_enabled` is true: MLX's default device is the CPU and
the switch is on. The switch is ``SD_MLX_CPU_KERNELS`` (``0``/``off`` turns it off for the process; at import,
``sd_mlx`` then also leaves MLX's CPU JIT flags and glibc's allocator alone) or, for one block of code,
``with sd_mlx.ops.cpu_kernels(False):`` (what ``load_pipeline(..., cpu_kernels=False)`` uses for its calls).
Turned off, the CPU device runs exactly the code a Mac or CUDA user runs: ``mx.fast.scaled_dot_product_attention``,
``mx.conv2d``, ``mx.fast.layer_norm``, ``nn.silu``/``nn.gelu``, ``mx.quantized_matmul``, half-precision compute.

The memory-saving algorithms that are not device choices (the fused nearest-x2 upsampling convolution, row strips
for convolutions whose unfolded input would be large) run on every device and are here because the convolution
calls them.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from functools import partial
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cpu.attention import chunked_attention, fused_attention
from .cpu.conv import CPU_TAPS_MIN_PIXELS, conv3x3_taps, upsample2x_conv3x3_taps
from .cpu.native import turned_off
from .cpu.rowwise import fused_geglu, fused_layer_norm
from .cpu.winograd import winograd_conv3x3

CPU_KERNELS_ENV = "SD_MLX_CPU_KERNELS"
"""Environment variable: ``0``, ``off``, ``false`` or ``no`` runs the portable (Mac/CUDA) code on the CPU."""

_CPU_KERNELS: ContextVar[bool | None] = ContextVar("sd_mlx_cpu_kernels", default=None)


def cpu_kernels_enabled() -> bool:
    """True when the Linux CPU machinery may be used now: MLX's default device is the CPU, and neither
    ``SD_MLX_CPU_KERNELS=0`` nor an enclosing :func:`cpu_kernels` ``(False)`` turned it off. Never raises."""
    choice = _CPU_KERNELS.get()
    if choice is None:
        choice = not turned_off(CPU_KERNELS_ENV)
    return choice and mx.default_device() == mx.cpu


@contextlib.contextmanager
def cpu_kernels(enabled: bool | None) -> Iterator[None]:
    """Within the block, use the CPU machinery (``True``, where the device is the CPU), the portable code
    (``False``), or follow ``SD_MLX_CPU_KERNELS`` (``None``). Scoped to the current thread / async context
    (a :class:`contextvars.ContextVar`), so two pipelines in one process do not interfere."""
    token = _CPU_KERNELS.set(enabled)
    try:
        yield
    finally:
        _CPU_KERNELS.reset(token)


def compute_dtype(dtype: mx.Dtype, *, quantized: bool = False) -> mx.Dtype:
    """The dtype activations are computed in for weights stored in ``dtype``: float32 for half-precision or
    quantized weights when the CPU machinery is in use (MLX's CPU half-precision and quantized products are
    50-75x slower than its float32 BLAS products, measured at 8192x1280x1280), else ``dtype``."""
    if cpu_kernels_enabled() and (dtype != mx.float32 or quantized):
        return mx.float32
    return dtype


def attention_is_chunked() -> bool:
    """True when :func:`attention` bounds its score buffers (the CPU paths) rather than forming whole score matrices
    (``mx.fast.scaled_dot_product_attention``); the pipeline's memory estimate uses it."""
    return cpu_kernels_enabled()


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------

def attention(q: mx.array, k: mx.array, v: mx.array, heads: int) -> mx.array:
    """Multi-head scaled dot-product attention on token-major projections.

    Args:
        q: ``(B, L, heads * d)``; k, v: ``(B, S, heads * d)``.
        heads: number of heads.

    Returns:
        ``(B, L, heads * d)`` in ``q``'s dtype: ``softmax(q k^T / sqrt(d)) v`` per head, the softmax in float32
        whatever the input dtype (which covers diffusers' ``upcast_attention`` and ``upcast_softmax``). Portable
        path: ``mx.fast.scaled_dot_product_attention``. CPU machinery: the fused multi-threaded kernel of
        :mod:`sd_mlx.cpu.attention` (which evaluates its inputs; its derivatives, and its value inside
        ``mx.compile`` / ``mx.vmap``, come from the MLX path), or where that is unavailable the chunked float32
        path :func:`sd_mlx.cpu.attention.chunked_attention`. With ``L = 0`` or ``S = 0`` the result is zeros.
    """
    b, lq, inner = q.shape
    d = inner // heads
    if lq == 0 or k.shape[1] == 0:  # no queries, or nothing to attend to: an all-zero (possibly empty) result
        return mx.zeros((b, lq, inner), q.dtype)
    if cpu_kernels_enabled():
        o = fused_attention(q, k, v, heads, chunked_attention)
        if o is None:
            o = chunked_attention(q, k, v, heads)
        return o.astype(q.dtype)
    q, k, v = (t.reshape(b, -1, heads, d).transpose(0, 2, 1, 3) for t in (q, k, v))
    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)
    return o.transpose(0, 2, 1, 3).reshape(b, lq, inner)


# ----------------------------------------------------------------------------------------------------------------
# Element-wise, norms, linear layers
# ----------------------------------------------------------------------------------------------------------------

@partial(mx.compile, shapeless=True)
def _silu_cpu(x: mx.array) -> mx.array:
    return x / (1 + mx.exp(-x))


def silu(x: mx.array) -> mx.array:
    """SiLU ``x * sigmoid(x)``. Portable path: ``mlx.nn.silu``. CPU machinery: ``x / (1 + exp(-x))`` as one
    compiled kernel (about 2x faster on MLX's CPU backend; same values to float rounding). Any shape, any float
    dtype."""
    return _silu_cpu(x) if cpu_kernels_enabled() else nn.silu(x)


@partial(mx.compile, shapeless=True)
def _gated_gelu(a: mx.array, g: mx.array) -> mx.array:
    # a * gelu(g) with the exact (erf) GELU, fused into one kernel: reading the strided halves of the projection
    # once instead of materialising gelu(g) first is about 3x faster on MLX's CPU backend.
    return a * (0.5 * g * (1 + mx.erf(g * (1 / math.sqrt(2)))))


def _geglu_of_projection(h: mx.array, bias: mx.array | None = None) -> mx.array:
    # GEGLU of a projection computed without its bias: the MLX reference of sd_mlx.cpu.rowwise.fused_geglu.
    a, g = mx.split(h if bias is None else h + bias, 2, axis=-1)
    return _gated_gelu(a, g)


def geglu(proj: nn.Module, x: mx.array) -> mx.array:
    """diffusers' ``GEGLU``: ``a * gelu(g)`` where ``[a, g] = proj(x)`` split in halves, exact (erf) GELU.

    Portable path: ``proj(x)`` then ``a * nn.gelu(g)``. CPU machinery (an unquantized ``proj``): the projection runs
    without its bias and the kernel of :mod:`sd_mlx.cpu.rowwise` adds it while applying the activation on all
    cores, else one compiled kernel for the activation.

    Args: ``proj`` a linear layer ``(2n, I)``; ``x`` ``(..., I)``. Returns: ``(..., n)``.
    """
    if not cpu_kernels_enabled():
        a, g = mx.split(proj(x), 2, axis=-1)
        return a * nn.gelu(g)
    if type(proj) is nn.Linear:
        bias = proj.bias if "bias" in proj else None
        out = fused_geglu(x @ proj.weight.T, bias, _geglu_of_projection)
        if out is not None:
            return out
    a, g = mx.split(proj(x), 2, axis=-1)
    return _gated_gelu(a, g)


def layer_norm(x: mx.array, weight: mx.array | None, bias: mx.array | None, eps: float) -> mx.array:
    """``torch.nn.LayerNorm`` over the last axis (affine when ``weight``/``bias`` are given). Portable path:
    ``mx.fast.layer_norm``. CPU machinery, with both parameters: the multi-threaded kernel of
    :mod:`sd_mlx.cpu.rowwise` (about 10x faster there than MLX's single-threaded passes; same values to float32
    rounding).

    Args: ``x`` ``(..., C)``; ``weight``, ``bias`` ``(C,)`` or ``None``. Returns: ``(..., C)`` in the promoted
    dtype of the input and the parameters.
    """
    if cpu_kernels_enabled() and weight is not None and bias is not None:
        out = fused_layer_norm(x, weight, bias, eps)
        if out is not None:
            return out
    return mx.fast.layer_norm(x, weight, bias, eps)


def linear(layer: nn.Module, x: mx.array, residual: mx.array | None = None) -> mx.array:
    """``layer(x)``, plus ``residual`` when given, for a linear layer (any :class:`mlx.nn.Linear` or
    ``QuantizedLinear``).

    For a plain :class:`mlx.nn.Linear` with a bias and a residual this is ``addmm(residual + bias, x, W^T)``: the
    product accumulates onto the residual in the BLAS call instead of a separate pass writing the broadcast bias
    and another adding the residual (SD1.5 U-Net, ``(8192, 320) x (320, 320)``: 11.7 -> 10.1 ms on a 2-core CPU).
    The sum is the same up to float rounding (another order of additions); MLX's own operation on every device.

    Args:
        layer: the linear layer, weight ``(O, I)``.
        x: ``(..., I)``.
        residual: ``(..., O)`` or ``None``.

    Returns:
        ``(..., O)``.
    """
    if residual is None:
        return layer(x)
    if type(layer) is nn.Linear and "bias" in layer:
        return mx.addmm(residual + layer.bias, x, layer.weight.T)
    return residual + layer(x)


def quantized_linear(layer: nn.QuantizedLinear, x: mx.array) -> mx.array:
    """A quantized linear layer's product. Portable path: ``mx.quantized_matmul`` (``nn.QuantizedLinear``). CPU
    machinery: the weight is dequantized into the activation dtype (scales and offsets cast first: tiny) and
    multiplied by the BLAS, so the layer's only transient is one full-precision weight.

    Args: ``x`` ``(..., I)``. Returns: ``(..., O)``; on the CPU path in the promoted dtype of the input and the
    scales (float32 activations stay float32).
    """
    if not cpu_kernels_enabled():
        return nn.QuantizedLinear.__call__(layer, x)
    dt = x.dtype if mx.issubdtype(x.dtype, mx.floating) else layer["scales"].dtype
    biases = layer.get("biases")
    w = mx.dequantize(layer["weight"], layer["scales"].astype(dt), None if biases is None else biases.astype(dt),
                      group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    y = x @ w.T
    return y + layer["bias"] if "bias" in layer else y


# ----------------------------------------------------------------------------------------------------------------
# Convolutions
# ----------------------------------------------------------------------------------------------------------------

# Above this many bytes of unfolded input (MLX builds a (H*W, 9*C) matrix for a 3x3 convolution on the CPU and
# for large inputs on the GPU), a 3x3 convolution is computed in row strips, each evaluated before the next.
CONV_UNFOLD_BUDGET_BYTES = 128 * 2**20

# On the CPU, a stride-1 3x3 convolution with at least this many output pixels per image and at least
# CPU_WINOGRAD_MIN_CHANNELS input and output channels runs through Winograd's minimal filtering (sd_mlx.cpu.winograd:
# F(4x4, 3x3) from 32x32 outputs, F(2x2, 3x3) below) when that kernel is available, upsampling first for an x2
# upsampling convolution. Measured on a 2-core x86 CPU with OpenBLAS, batch 2: 64x64x320 -> 320 55 ms (F4) against
# 79 (F2) and 127-133 (taps); 16x16x1280 -> 1280 82 (F2) against 106 (MLX's conv2d); at 8x8x1280 the kernel
# transform costs more than it saves (31 against 29 ms). Whole U-Net step (SD1.5, CFG): 14.3 -> 11.5 s.
CPU_WINOGRAD_MIN_PIXELS = 256
CPU_WINOGRAD_MIN_CHANNELS = 16


def _nearest_indices(in_size: int, out_size: int) -> mx.array:
    """Source indices of PyTorch's ``interpolate(mode="nearest")`` along one axis: ``floor(i * in / out)`` in
    float32 arithmetic, clamped to ``in_size - 1``."""
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int32)
    return mx.array(np.minimum(idx, in_size - 1))


def upsample_nearest(x: mx.array, size: tuple[int, int] | None = None) -> mx.array:
    """Nearest-neighbour upsampling of ``(B, H, W, C)``, like ``torch.nn.functional.interpolate(mode="nearest")``.

    Args:
        x: ``(B, H, W, C)``.
        size: target ``(H_out, W_out)``; ``None`` doubles both sides.

    Returns:
        ``(B, H_out, W_out, C)``, same dtype.
    """
    b, h, w, c = x.shape
    if size is None or (size[0] == 2 * h and size[1] == 2 * w):
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return x.reshape(b, 2 * h, 2 * w, c)
    ho, wo = int(size[0]), int(size[1])
    if ho != h:
        x = mx.take(x, _nearest_indices(h, ho), axis=1)
    if wo != w:
        x = mx.take(x, _nearest_indices(w, wo), axis=2)
    return x


def _upsample2x_kernels(weight: mx.array) -> dict[tuple[int, int], mx.array]:
    """The four ``(O, 2, 2, C)`` kernels that apply a 3x3 ``weight`` ``(O, 3, 3, C)`` to a nearest-x2-upsampled
    input at the input's resolution, keyed by output parity ``(row % 2, column % 2)``.

    With nearest x2 upsampling, output row ``2i`` reads upsampled rows ``2i - 1, 2i, 2i + 1`` = input rows
    ``i - 1, i, i`` (kernel rows ``0 | 1 + 2``), and row ``2i + 1`` reads input rows ``i, i + 1, i + 1`` (kernel
    rows ``0 + 1 | 2``); the same holds along columns.
    """
    def halves(k: mx.array, axis: int) -> tuple[mx.array, mx.array]:
        k0, k1, k2 = (mx.take(k, i, axis=axis) for i in range(3))
        return mx.stack([k0, k1 + k2], axis=axis), mx.stack([k0 + k1, k2], axis=axis)

    return {(a, b): kernel for a, rows in enumerate(halves(weight, 1))
            for b, kernel in enumerate(halves(rows, 2))}


def upsample2x_conv3x3(x: mx.array, weight: mx.array, bias: mx.array | None = None, *, taps: bool = False,
                       pad_rows: bool = True) -> mx.array:
    """A padding-1 3x3 convolution of the nearest-x2-upsampled ``x``, computed at the input resolution.

    ``conv3x3(upsample_nearest(x))`` (diffusers ``Upsample2D``: ``interpolate(scale_factor=2.0, mode="nearest")``
    then the convolution) equals, for each of the four output parities, a 2x2 convolution of ``x`` with summed
    kernel taps (:func:`_upsample2x_kernels`): 16 instead of 36 products per input pixel and no upsampled
    ``(B, 2H, 2W, C)`` input. The four parity outputs are interleaved into the result (one copy). Same values as
    the upsample-then-convolve path up to float rounding (kernel taps are summed before the products, in the
    promoted dtype of ``x`` and ``weight``).

    Args:
        x: ``(B, H, W, C)``.
        weight: ``(O, 3, 3, C)``.
        bias: ``(O,)`` or ``None``.
        taps: compute each 2x2 kernel as four shifted matrix products over the flattened padded input (the CPU path
            of :func:`sd_mlx.cpu.conv.conv3x3_taps`) instead of ``mx.conv2d``; only when the CPU kernels are
            in use (:func:`cpu_kernels_enabled`).
        pad_rows: ``False`` when ``x`` already carries its one-row halo above and below (a row strip of a larger
            input): the output then has ``2 * (H - 2)`` rows.

    Returns:
        ``(B, 2H, 2W, O)`` (``(B, 2(H - 2), 2W, O)`` without ``pad_rows``) in the promoted dtype.
    """
    b, h, w, _ = x.shape
    o = weight.shape[0]
    kernels = _upsample2x_kernels(weight.astype(mx.result_type(weight, x)))
    top = 1 if pad_rows else 0
    h = h if pad_rows else h - 2
    if taps:
        y = upsample2x_conv3x3_taps(x, kernels, pad_rows=pad_rows)
        return y + bias if bias is not None else y
    xp = mx.pad(x, [(0, 0), (top, top), (1, 1), (0, 0)])

    def parity(a: int, p: int) -> mx.array:
        return mx.conv2d(xp[:, a:a + h + 1, p:p + w + 1], kernels[a, p])

    y = mx.stack([mx.stack([parity(a, 0), parity(a, 1)], axis=3) for a in range(2)], axis=2)
    y = y.reshape(b, 2 * h, 2 * w, o)
    return y + bias if bias is not None else y


def conv2d(x: mx.array, weight: mx.array, bias: mx.array | None, *, stride: tuple[int, int],
                 padding: tuple[int, int], dilation: int | tuple[int, int] = 1, groups: int = 1, taps: bool = False,
                 strips: bool = False, upsample2x: bool = False) -> mx.array:
    """``mx.conv2d(x, weight, ...) + bias`` with the two CPU/memory-aware paths of :class:`sd_mlx.models.layers.Conv2d` for stride-1,
    padding-1 3x3 convolutions (``taps``, ``strips``; see there). With either flag, with the CPU kernels in use, a convolution above
    :data:`CPU_WINOGRAD_MIN_PIXELS` and :data:`CPU_WINOGRAD_MIN_CHANNELS` that needs no strips runs through
    :func:`sd_mlx.cpu.winograd.winograd_conv3x3` when that kernel is available. Shared by ``sd_mlx.models.layers.Conv2d`` and
    ``sd_mlx.quantization.QuantizedConv2d``.

    Args:
        x: ``(B, H, W, C_in)``; weight: ``(O, kh, kw, C_in / groups)``; bias: ``(O,)`` or ``None``.
        upsample2x: convolve the nearest-x2 upsampling of ``x`` (:func:`upsample_nearest`); a plain 3x3
            convolution whose upsampled input would be larger than its kernel runs at the input resolution
            (:func:`upsample2x_conv3x3`); others upsample first.

    Returns:
        ``(B, H', W', O)``.
    """
    plain_3x3 = (tuple(stride) == (1, 1) and dilation in (1, (1, 1)) and tuple(weight.shape[1:3]) == (3, 3)
                 and tuple(padding) == (1, 1) and groups == 1)
    b, h, w, c = x.shape
    # at low resolution the four summed kernels (16/9 of the kernel) cost more memory than the upsampled input
    if upsample2x and (not plain_3x3 or 4 * b * h * w * c < weight.size):
        x, upsample2x = upsample_nearest(x), False
    b, h, w, c = x.shape
    f = 2 if upsample2x else 1  # output rows (and columns) per input row
    on_cpu = cpu_kernels_enabled()
    rows = strip_rows(x.shape, x.itemsize, upsample2x=upsample2x) if plain_3x3 and strips else None
    if plain_3x3 and (taps or strips) and rows is None and _winograd_applies(weight, f * f * h * w):
        y = winograd_conv3x3(upsample_nearest(x) if upsample2x else x, weight, bias, conv3x3_taps)
        if y is not None:
            return y
    if plain_3x3 and taps and on_cpu and f * f * h * w >= CPU_TAPS_MIN_PIXELS:
        return upsample2x_conv3x3(x, weight, bias, taps=True) if upsample2x else conv3x3_taps(x, weight, bias)
    if rows is None:
        if upsample2x:
            return upsample2x_conv3x3(x, weight, bias, taps=False)
        y = mx.conv2d(x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups)
        return y + bias if bias is not None else y
    return conv3x3_strips(x, weight, bias, rows=rows, upsample2x=upsample2x)


def _winograd_applies(weight: mx.array, out_pixels: int) -> bool:
    # a (O, 3, 3, C) kernel on the CPU with enough output pixels per image and channels (see the thresholds above)
    return (cpu_kernels_enabled() and out_pixels >= CPU_WINOGRAD_MIN_PIXELS
            and min(weight.shape[0], weight.shape[3]) >= CPU_WINOGRAD_MIN_CHANNELS)


def strip_rows(shape: tuple[int, ...], itemsize: int, *, upsample2x: bool = False) -> int | None:
    """Input rows per strip for :func:`conv3x3_strips` on an input of ``shape`` ``(B, H, W, C)``, or ``None`` when
    the whole input fits :data:`CONV_UNFOLD_BUDGET_BYTES` (its unfolded ``B * H' * W' * 9 * C`` values, ``H', W'``
    the output size) or has fewer than 4 rows."""
    b, h, w, c = shape
    f = 2 if upsample2x else 1
    per_row = b * f * f * w * 9 * c * itemsize
    if per_row * h <= CONV_UNFOLD_BUDGET_BYTES or h < 4:
        return None
    return max(1, CONV_UNFOLD_BUDGET_BYTES // per_row)


def conv3x3_strips(x: mx.array, weight: mx.array, bias: mx.array | None, *, rows: int, upsample2x: bool = False,
                   prologue: Callable[[mx.array], mx.array] | None = None,
                   epilogue: Callable[[mx.array, int, int], mx.array] | None = None) -> mx.array:
    """Stride-1, padding-1 3x3 convolution over horizontal strips of ``rows`` input rows, each strip evaluated
    and written into one preallocated output before the next is built.

    Each strip reads its rows plus a one-row halo; ``prologue`` (an elementwise map such as a normalisation with
    precomputed statistics and SiLU) is applied to that slice before the zero padding, so the convolution sees
    ``conv(prologue(x))`` exactly while ``prologue(x)`` never exists whole. ``epilogue(y, start, stop)`` maps the
    strip's output rows ``[start, stop)`` (e.g. adds the matching rows of a residual). Working memory: the output
    plus one strip's buffers (the output is updated in place: MLX donates its buffer to each slice update).
    On the CPU each strip is computed by :func:`sd_mlx.cpu.winograd.winograd_conv3x3` (above the Winograd
    thresholds, when available; an x2 strip is upsampled first), else by :func:`sd_mlx.cpu.conv.conv3x3_taps` (or
    :func:`upsample2x_conv3x3` with taps); elsewhere by ``mx.conv2d``.

    Args:
        x: ``(B, H, W, C)``.
        weight: ``(O, 3, 3, C)``; bias: ``(O,)`` or ``None``.
        rows: input rows per strip (see :func:`strip_rows`).
        upsample2x: convolve the nearest-x2 upsampling of ``x`` instead (output ``2H x 2W``).
        prologue: shape- and dtype-preserving map applied to each input slice, or ``None``.
        epilogue: map of each output strip ``(B, stop - start, W', O)`` and its output rows, or ``None``.

    Returns:
        ``(B, H', W', O)``, ``H' = 2H`` with ``upsample2x`` else ``H`` (likewise ``W'``).
    """
    b, h, w, c = x.shape
    f = 2 if upsample2x else 1
    on_cpu = cpu_kernels_enabled()
    out = None
    for start in range(0, h, rows):
        stop = min(h, start + rows)
        lo, hi = max(start - 1, 0), min(stop + 1, h)
        strip = x[:, lo:hi] if prologue is None else prologue(x[:, lo:hi])
        if start == 0 or stop == h:  # zero rows outside the image, after the prologue as the convolution pads
            strip = mx.pad(strip, [(0, 0), (int(start == 0), int(stop == h)), (0, 0), (0, 0)])
        y = _conv3x3_strip(strip, weight, bias, upsample2x=upsample2x, on_cpu=on_cpu)
        if epilogue is not None:
            y = epilogue(y, f * start, f * stop)
        if out is None:
            out = mx.zeros((b, f * h, *y.shape[2:]), y.dtype)
        out[:, f * start:f * stop] = y
        mx.eval(out)
    return out


def _conv3x3_strip(strip: mx.array, weight: mx.array, bias: mx.array | None, *, upsample2x: bool,
                   on_cpu: bool) -> mx.array:
    # one strip (carrying its halo rows) of conv3x3_strips
    _, h, w, _ = strip.shape
    if _winograd_applies(weight, (4 if upsample2x else 1) * (h - 2) * w):
        # the upsampled strip's outer rows repeat the halo: keep one each side
        y = winograd_conv3x3(upsample_nearest(strip)[:, 1:-1] if upsample2x else strip, weight, bias, conv3x3_taps,
                             pad_rows=False)
        if y is not None:
            return y
    if upsample2x:
        return upsample2x_conv3x3(strip, weight, bias, taps=on_cpu, pad_rows=False)
    if on_cpu:  # the taps path needs no unfolded buffer and is faster at these sizes
        return conv3x3_taps(strip, weight, bias, pad_rows=False)
    y = mx.conv2d(strip, weight, padding=(0, 1))
    return y + bias if bias is not None else y
