"""Building blocks shared by the U-Net and the VAE, in NHWC layout.

Each class follows one diffusers module and keeps its attribute names, so a diffusers state-dict key such as
``down_blocks.0.resnets.1.conv1.weight`` names the same parameter here (only the array layout differs: convolution
kernels are ``(O, kh, kw, I)`` instead of ``(O, I, kh, kw)``, and every 1x1 convolution is an :class:`mlx.nn.Linear`
acting on the channel axis, whose weight is ``(O, I)``).

Layout conventions: feature maps are ``(B, H, W, C)``, token sequences ``(B, L, C)``; parameters are in the dtype
chosen at load time. Where diffusers computes something in float32 on purpose (the sinusoidal timestep embedding,
softmax in attention) we do too; group and layer norms accumulate their statistics in float32
(``mx.fast.layer_norm``, or on the CPU the multi-threaded kernel of :mod:`sd_mlx.cpu_rowwise`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cpu_attention import fused_attention
from ..cpu_rowwise import fused_geglu, fused_layer_norm
from ..cpu_winograd import winograd_conv3x3


@partial(mx.compile, shapeless=True)
def _squared_deviation(x: mx.array, mean: mx.array) -> mx.array:
    return mx.square(x.astype(mx.float32) - mean)


@partial(mx.compile, shapeless=True)
def _normalize_affine(x: mx.array, mean: mx.array, scale: mx.array, bias: mx.array) -> mx.array:
    return ((x.astype(mx.float32) - mean) * scale + bias).astype(x.dtype)


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm(num_groups, channels, eps, affine=True)`` on channels-last input, lean on memory.

    Same parameters (``weight``, ``bias``) and grouping as ``nn.GroupNorm(pytorch_compatible=True)`` (contiguous
    blocks of ``channels // num_groups`` channels). Statistics are computed in float32 in two passes (mean, then
    the mean squared deviation, as PyTorch), and the normalisation and affine map are one fused kernel, so the
    layer holds about three input-sized buffers at its peak instead of five (the SD VAE decoder's 512x512 maps are
    268 MB each).

    Both passes reduce the ``(B, H*W, C)`` view over its token axis into per-channel float32 sums and only then
    add the ``C / G`` channels of each group: a reduction MLX's CPU backend runs along contiguous channels, about
    4x faster than reducing a ``(B, H*W, G, C/G)`` view over two axes (SD1.5 U-Net, batch 2, 64x64x320: 12.4 ->
    3.0 ms; its 61 norms per step 0.37 -> about 0.1 s). The per-channel sums add in another order than a single
    float32 sum over the group: a difference of float32 rounding (about 1e-6 relative).

    Call: ``(B, ..., C) -> (B, ..., C)``, same dtype.
    """

    def statistics(self, x: mx.array, rows: int | None = None) -> tuple[mx.array, mx.array]:
        """Per-image, per-group ``(mean, rstd)`` of ``x`` ``(B, H, W, C)`` (or ``(B, L, C)``), each ``(B, 1, G, 1)``
        float32, ``rstd = 1 / sqrt(var + eps)`` with the biased variance, two passes as PyTorch.

        With ``rows`` (a ``(B, H, W, C)`` input), both passes run over strips of ``rows`` rows, each evaluated
        before the next, so no input-sized temporary exists (the partial sums are added in float32).
        """
        b, c, g = x.shape[0], x.shape[-1], self.num_groups
        bounds = [(0, x.shape[1])] if rows is None else [(s, s + rows) for s in range(0, x.shape[1], rows)]
        n = x.size // (b * g)

        def total(part_fn: Callable[[mx.array], mx.array]) -> mx.array:
            acc = None
            for lo, hi in bounds:
                part = mx.sum(part_fn(x[:, lo:hi].reshape(b, -1, c)), axis=1)  # (B, C) per-channel sums
                acc = part if acc is None else acc + part
                if rows is not None:
                    mx.eval(acc)
            return mx.sum(acc.reshape(b, 1, g, c // g), axis=-1, keepdims=True)  # (B, 1, G, 1)

        mean = total(lambda xc: xc.astype(mx.float32)) / n
        mean_c = self._per_channel(mean, c)
        var = total(lambda xc: _squared_deviation(xc, mean_c)) / n
        return mean, mx.rsqrt(var + self.eps)

    @staticmethod
    def _per_channel(stat: mx.array, channels: int) -> mx.array:
        """``(B, 1, G, 1)`` per-group values -> ``(B, 1, C)``, each group's value repeated over its channels."""
        b, _, g, _ = stat.shape
        return mx.broadcast_to(stat, (b, 1, g, channels // g)).reshape(b, 1, channels)

    def normalize(self, x: mx.array, mean: mx.array, rstd: mx.array) -> mx.array:
        """``x`` (any rows of the input the statistics came from) normalised with ``(mean, rstd)`` from
        :meth:`statistics`, then the affine map; same shape and dtype as ``x``."""
        b, c = x.shape[0], x.shape[-1]
        scale = self._per_channel(rstd, c) * self.weight.astype(mx.float32)
        out = _normalize_affine(x.reshape(b, -1, c), self._per_channel(mean, c), scale, self.bias.astype(mx.float32))
        return out.reshape(x.shape)

    def __call__(self, x: mx.array) -> mx.array:
        return self.normalize(x, *self.statistics(x))


def group_norm(num_groups: int, channels: int, eps: float) -> GroupNorm:
    """``torch.nn.GroupNorm(num_groups, channels, eps, affine=True)`` for ``(B, H, W, C)`` or ``(B, L, C)`` input
    (see :class:`GroupNorm`)."""
    return GroupNorm(num_groups, channels, eps=eps, affine=True, pytorch_compatible=True)


# Above this many bytes of unfolded input (MLX builds a (H*W, 9*C) matrix for a 3x3 convolution on the CPU and
# for large inputs on the GPU), a 3x3 convolution is computed in row strips, each evaluated before the next.
CONV_UNFOLD_BUDGET_BYTES = 128 * 2**20

# On the CPU, a stride-1 3x3 convolution with at least this many output pixels per image runs as nine shifted
# matrix products (conv3x3_taps) instead of MLX's unfold-then-GEMM. Measured on a 2-core x86 CPU with OpenBLAS,
# batch 2: 64x64x320 -> 320 channels 93 -> 135 GFLOP/s, 64x64x640 -> 320 93 -> 149, 32x32x640 -> 640 101 -> 107
# (and no 9x unfolded buffer); at 16x16 and below the unfolded GEMM is faster (the taps re-read the weights nine
# times), hence the threshold.
CPU_TAPS_MIN_PIXELS = 1024

# On the CPU, a stride-1 3x3 convolution with at least this many output pixels per image and at least
# CPU_WINOGRAD_MIN_CHANNELS input and output channels runs through Winograd's minimal filtering (sd_mlx.cpu_winograd:
# F(4x4, 3x3) from 32x32 outputs, F(2x2, 3x3) below) when that kernel is available, upsampling first for an x2
# upsampling convolution. Measured on a 2-core x86 CPU with OpenBLAS, batch 2: 64x64x320 -> 320 55 ms (F4) against
# 79 (F2) and 127-133 (taps); 16x16x1280 -> 1280 82 (F2) against 106 (MLX's conv2d); at 8x8x1280 the kernel
# transform costs more than it saves (31 against 29 ms). Whole U-Net step (SD1.5, CFG): 14.3 -> 11.5 s.
CPU_WINOGRAD_MIN_PIXELS = 256
CPU_WINOGRAD_MIN_CHANNELS = 16


def conv3x3_taps(x: mx.array, weight: mx.array, bias: mx.array | None = None, *, pad_rows: bool = True) -> mx.array:
    """Stride-1, padding-1 3x3 convolution as nine shifted matrix products, without an unfolded input.

    The input is zero-padded to ``(H + 3, W + 2)`` and flattened per image; the tap ``(dy, dx)`` then reads the
    contiguous run of ``H * (W + 2)`` rows starting at ``dy * (W + 2) + dx``, so each tap is one ``(H*(W+2), C) @
    (C, O)`` product on a view (no copy), accumulated with ``mx.addmm``. The outputs computed for the two padding
    columns are dropped at the end (3% extra work at 64 wide). Working memory is about two outputs and one padded
    input instead of MLX's ``(B*H*W, 9*C)`` unfolded matrix (283 MB for SD1.5's 64x64x960 up-block convolution at
    batch 2). Same sums as ``mx.conv2d`` up to float rounding (each pixel's 9*C products are summed per tap first).

    Args:
        x: ``(B, H, W, C)``.
        weight: ``(O, 3, 3, C)`` (MLX's convolution layout).
        bias: ``(O,)`` or ``None``.
        pad_rows: ``False`` when ``x`` already carries its one-row halo above and below (a row strip of a larger
            input): no zero rows are added and the output has ``H - 2`` rows.

    Returns:
        ``(B, H, W, O)`` (``(B, H - 2, W, O)`` without ``pad_rows``) in the promoted dtype of ``x`` and ``weight``.
    """
    b, _, w, _ = x.shape
    xf, h, wp = _flat_padded(x, pad_rows)
    out = _shifted_products(xf, h * wp, [(dy * wp + dx, weight[:, dy, dx, :].T) for dy in range(3) for dx in range(3)])
    out = out.reshape(b, h, wp, weight.shape[0])[:, :, :w]
    return out + bias if bias is not None else out


def _flat_padded(x: mx.array, pad_rows: bool) -> tuple[mx.array, int, int]:
    # x (B, H, W, C) zero-padded by one column each side, one row above and below (unless it already carries its
    # halo rows: pad_rows=False) and one spare row at the bottom (the last tap's run ends two values past the last
    # halo row), flattened per image to (B, rows * (W + 2), C). Returns it, the output rows and W + 2.
    b, h, w, c = x.shape
    top = 1 if pad_rows else 0
    h = h if pad_rows else h - 2
    return mx.pad(x, [(0, 0), (top, top + 1), (1, 1), (0, 0)]).reshape(b, (h + 3) * (w + 2), c), h, w + 2


def _shifted_products(xf: mx.array, n: int, taps: list[tuple[int, mx.array]]) -> mx.array:
    # sum over (start, kernel (C, O)) of xf[:, start:start + n] @ kernel: views of the flattened input, no copies,
    # accumulated with addmm
    out = None
    for start, kernel in taps:
        part = xf[:, start:start + n]
        out = part @ kernel if out is None else mx.addmm(out, part, kernel)
    return out


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
            of :func:`conv3x3_taps`) instead of ``mx.conv2d``.
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
        xf, _, wp = _flat_padded(x, pad_rows)

        def parity(a: int, p: int) -> mx.array:
            out = _shifted_products(xf, h * wp, [((a + ty) * wp + p + tx, kernels[a, p][:, ty, tx, :].T)
                                                  for ty in range(2) for tx in range(2)])
            return out.reshape(b, h, wp, o)[:, :, :w]
    else:
        xp = mx.pad(x, [(0, 0), (top, top), (1, 1), (0, 0)])

        def parity(a: int, p: int) -> mx.array:
            return mx.conv2d(xp[:, a:a + h + 1, p:p + w + 1], kernels[a, p])

    y = mx.stack([mx.stack([parity(a, 0), parity(a, 1)], axis=3) for a in range(2)], axis=2)
    y = y.reshape(b, 2 * h, 2 * w, o)
    return y + bias if bias is not None else y


def apply_conv2d(x: mx.array, weight: mx.array, bias: mx.array | None, *, stride: tuple[int, int],
                 padding: tuple[int, int], dilation: int | tuple[int, int] = 1, groups: int = 1, taps: bool = False,
                 strips: bool = False, upsample2x: bool = False) -> mx.array:
    """``mx.conv2d(x, weight, ...) + bias`` with the two CPU/memory-aware paths of :class:`Conv2d` for stride-1,
    padding-1 3x3 convolutions (``taps``, ``strips``; see there). With either flag, on the CPU, a convolution above
    :data:`CPU_WINOGRAD_MIN_PIXELS` and :data:`CPU_WINOGRAD_MIN_CHANNELS` that needs no strips runs through
    :func:`sd_mlx.cpu_winograd.winograd_conv3x3` when that kernel is available. Shared by :class:`Conv2d` and
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
    on_cpu = mx.default_device() == mx.cpu
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
    return (mx.default_device() == mx.cpu and out_pixels >= CPU_WINOGRAD_MIN_PIXELS
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
    On the CPU each strip is computed by :func:`sd_mlx.cpu_winograd.winograd_conv3x3` (above the Winograd
    thresholds, when available; an x2 strip is upsampled first), else by :func:`conv3x3_taps` (or
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
    on_cpu = mx.default_device() == mx.cpu
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


def norm_silu_conv(norm: "GroupNorm", conv: nn.Module, x: mx.array) -> mx.array:
    """``conv(silu(norm(x)))``; when ``conv`` is a :class:`Conv2d` with ``strips`` and ``x`` exceeds the strip
    budget (:func:`strip_rows`), computed over row strips with the norm's statistics gathered first and the norm
    and SiLU applied per strip (:func:`conv3x3_strips`), so ``silu(norm(x))`` never exists whole.

    Args: ``x`` ``(B, H, W, C)``. Returns: ``(B, H, W, O)``.
    """
    rows = strip_rows(x.shape, x.itemsize) if isinstance(conv, Conv2d) and conv.use_strips else None
    if rows is None or tuple(conv.weight.shape[1:3]) != (3, 3) or tuple(conv.stride) != (1, 1):
        return conv(silu(norm(x)))
    return _norm_silu_conv_strips(norm, conv, x, rows)


def _norm_silu_conv_strips(norm: "GroupNorm", conv: "Conv2d", x: mx.array, rows: int,
                           epilogue: Callable[[mx.array, int, int], mx.array] | None = None) -> mx.array:
    # conv(silu(norm(x))) over strips of ``rows`` rows: statistics first, then norm + SiLU per strip
    mean, rstd = norm.statistics(x, rows)
    return conv3x3_strips(x, conv.weight, conv.bias if "bias" in conv else None, rows=rows,
                          prologue=lambda s: silu(norm.normalize(s, mean, rstd)), epilogue=epilogue)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and results up to float rounding) with two CPU/memory-aware paths for
    stride-1, padding-1 3x3 convolutions.

    - ``taps=True`` (the U-Net): on the CPU, inputs of at least :data:`CPU_TAPS_MIN_PIXELS` pixels per image use
      :func:`conv3x3_taps` (faster there and without the unfolded buffer); everything else, and every GPU call, is
      ``nn.Conv2d``. The step graph stays one lazily evaluated graph.
    - ``strips=True`` (the VAE): when the unfolded input (``B * H * W * 9 * C`` values) would exceed
      :data:`CONV_UNFOLD_BUDGET_BYTES`, the output is computed over horizontal strips of rows (each strip reads
      its rows plus the halo; on the CPU each strip by :func:`conv3x3_taps`), each evaluated and written into the
      preallocated output before the next (:func:`conv3x3_strips`), so only the output and one strip's working
      buffers exist at a time.

    Args: as ``nn.Conv2d``, plus the keyword flags ``taps`` and ``strips`` (both off: plain ``nn.Conv2d``).

    Call: ``x (B, H, W, C_in)`` -> ``(B, H', W', C_out)`` as ``nn.Conv2d``; with ``upsample2x=True`` the layer is
    applied to the nearest-x2 upsampling of ``x`` (see :func:`apply_conv2d`), ``(B, 2H, 2W, C_out)``.
    """

    def __init__(self, *args, taps: bool = False, strips: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.use_taps = taps
        self.use_strips = strips

    def __call__(self, x: mx.array, *, upsample2x: bool = False) -> mx.array:
        return apply_conv2d(x, self.weight, self.bias if "bias" in self else None, stride=self.stride,
                            padding=self.padding, dilation=self.dilation, groups=getattr(self, "groups", 1),
                            taps=self.use_taps, strips=self.use_strips, upsample2x=upsample2x)


def timestep_embedding(timesteps: mx.array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> mx.array:
    """Sinusoidal embedding of (possibly fractional) timesteps, like diffusers' ``get_timestep_embedding``.

    ``freqs[i] = exp(-ln(max_period) * i / (dim // 2 - freq_shift))`` for ``i < dim // 2``; the embedding is
    ``[sin(t * freqs), cos(t * freqs)]`` (``[cos, sin]`` with ``flip_sin_to_cos``), zero-padded by one column when
    ``dim`` is odd. Everything is computed in float32.

    Args:
        timesteps: ``(B,)`` array of any numeric dtype (diffusion timesteps, not normalised).
        dim: embedding width.

    Returns:
        ``(B, dim)`` float32.
    """
    half = dim // 2
    exponent = (-math.log(max_period)) * mx.arange(half, dtype=mx.float32)
    freqs = mx.exp(exponent / (half - freq_shift))
    args = timesteps.astype(mx.float32)[:, None] * freqs[None, :]
    sin, cos = mx.sin(args), mx.cos(args)
    emb = mx.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2 == 1:
        emb = mx.pad(emb, [(0, 0), (0, 1)])
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` on the sinusoidal embedding (diffusers ``TimestepEmbedding``).

    Call: ``(B, in_channels) -> (B, time_embed_dim)``, in the parameter dtype (the input is cast to it).
    """

    def __init__(self, in_channels: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def __call__(self, x: mx.array) -> mx.array:
        x = x.astype(self.linear_1.weight.dtype)
        return self.linear_2(silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block with an optional time-embedding bias (diffusers ``ResnetBlock2D``,
    ``time_embedding_norm="default"``, SiLU, no up/down sampling inside).

    ``out = (shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + time_emb_proj(silu(temb)))))) / scale``;
    ``shortcut`` is a 1x1 convolution (a :class:`mlx.nn.Linear` named ``conv_shortcut``) when the channel count
    changes, else the identity.

    Args:
        in_channels, out_channels: channel counts.
        temb_channels: width of the time embedding, or ``None`` (VAE) for no ``time_emb_proj``.
        groups, groups_out: GroupNorm groups of ``norm1`` / ``norm2`` (``groups_out`` defaults to ``groups``).
        eps: GroupNorm epsilon.
        strip_convs: for the VAE, whose full-resolution maps are large: when an input exceeds the strip budget
            (:func:`strip_rows`) and there is no ``temb``, the whole block runs over row strips
            (:meth:`_call_streamed`, evaluated strip by strip: at 512x512x128 float32, 566 -> about 420 MB working
            memory); smaller inputs use :class:`Conv2d`'s strips option. Otherwise (the U-Net, whose step is one
            lazily evaluated graph) the convolutions use its CPU taps path.
        output_scale_factor: the divisor ``scale`` above.

    Call:
        ``x (B, H, W, in_channels)``, ``temb (B, temb_channels)`` or ``None`` -> ``(B, H, W, out_channels)``.
        ``temb`` may also have ``B / n`` rows, each serving the rows ``i, i + B / n, ...`` of ``x``
        (:func:`repeat_rows`).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, *, groups: int,
                 groups_out: int | None = None, eps: float, output_scale_factor: float = 1.0,
                 strip_convs: bool = False) -> None:
        super().__init__()
        def conv(cin: int, cout: int, **kw) -> Conv2d:
            return Conv2d(cin, cout, taps=not strip_convs, strips=strip_convs, **kw)

        self.norm1 = group_norm(groups, in_channels, eps)
        self.conv1 = conv(in_channels, out_channels, kernel_size=3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(groups_out or groups, out_channels, eps)
        self.conv2 = conv(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Linear(in_channels, out_channels)
        self.output_scale_factor = output_scale_factor

    def __call__(self, x: mx.array, temb: mx.array | None = None) -> mx.array:
        if (temb is None and isinstance(self.conv1, Conv2d) and self.conv1.use_strips
                and isinstance(self.conv2, Conv2d)):
            rows = strip_rows(x.shape, x.itemsize)
            if rows is not None:
                return self._call_streamed(x, rows)
        h = self.conv1(silu(self.norm1(x)))
        if temb is not None and "time_emb_proj" in self:
            h = h + repeat_rows(self.time_emb_proj(silu(temb)), h.shape[0])[:, None, None, :]
        h = self.conv2(silu(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out

    def _call_streamed(self, x: mx.array, rows: int) -> mx.array:
        """The same block over row strips (:func:`conv3x3_strips`): the norms' statistics are gathered strip by
        strip, each norm + SiLU is applied per strip inside its convolution, and the shortcut and residual sum per
        output strip, so only ``x``, the first convolution's output and the result exist whole."""
        scale = self.output_scale_factor
        h = _norm_silu_conv_strips(self.norm1, self.conv1, x, rows)

        def residual(y: mx.array, start: int, stop: int) -> mx.array:
            s = x[:, start:stop]
            out = (self.conv_shortcut(s) if "conv_shortcut" in self else s) + y
            return out / scale if scale != 1.0 else out

        return _norm_silu_conv_strips(self.norm2, self.conv2, h, strip_rows(h.shape, h.itemsize) or h.shape[1],
                                      epilogue=residual)


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution (diffusers ``Downsample2D(use_conv=True)``).

    ``padding > 0`` pads symmetrically; ``padding == 0`` (the VAE encoder) pads one zero row and column at the
    bottom and right first, as diffusers does.

    Call: ``(B, H, W, C) -> (B, ceil(H / 2), ceil(W / 2), C)`` for ``padding=1``,
    ``(B, floor(H / 2), floor(W / 2), C)`` for ``padding=0``.
    """

    def __init__(self, channels: int, *, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)
        self.pad_bottom_right = padding == 0

    def __call__(self, x: mx.array) -> mx.array:
        if self.pad_bottom_right:
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


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


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (x2 or to a given size) then a 3x3 convolution (diffusers
    ``Upsample2D(use_conv=True)``).

    Call: ``x (B, H, W, C)``, ``size (H_out, W_out) | None`` -> ``(B, H_out, W_out, C)`` (``None``: ``2H, 2W``).
    """

    def __init__(self, channels: int, *, strip_convs: bool = False) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, padding=1, taps=not strip_convs, strips=strip_convs)

    def __call__(self, x: mx.array, size: tuple[int, int] | None = None) -> mx.array:
        if size is None or tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):
            return self.conv(x, upsample2x=True)  # computed at the input resolution, no upsampled copy
        return self.conv(upsample_nearest(x, size))


@partial(mx.compile, shapeless=True)
def silu(x: mx.array) -> mx.array:
    """SiLU ``x * sigmoid(x)``, written ``x / (1 + exp(-x))`` as one compiled kernel (on MLX's CPU backend this is
    about 2x faster than ``nn.silu``; same values to float rounding). Any shape, any float dtype."""
    return x / (1 + mx.exp(-x))


@partial(mx.compile, shapeless=True)
def _gated_gelu(a: mx.array, g: mx.array) -> mx.array:
    # a * gelu(g) with the exact (erf) GELU, fused into one kernel: reading the strided halves of the projection
    # once instead of materialising gelu(g) first is about 3x faster on MLX's CPU backend.
    return a * (0.5 * g * (1 + mx.erf(g * (1 / math.sqrt(2)))))


@partial(mx.compile, shapeless=True)
def _exp_shifted(scores: mx.array, row_max: mx.array) -> mx.array:
    return mx.exp(scores - row_max)


# Score-chunk budget of the CPU attention path: small enough that the chunk's buffers are recycled by the allocator
# instead of being mapped (and page-faulted) afresh, and that the ~10 operations MLX's CPU scheduler keeps in flight
# hold little memory; large enough to keep the matrix products efficient. Measured on SD1.5's 4096-token call
# (batch 2): 4 Mi elements 1.13 s / 312 MB working memory, 2 Mi 1.23 s / 177 MB, 1 Mi 1.34 s / 112 MB.
_CPU_CHUNK_ELEMENTS = 2 * 2**20


def _attention_cpu(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    # softmax(q k^T * scale) v for (B, heads, L, d) inputs, in float32, over query chunks. Choices measured on a
    # 2-core x86 CPU for SD1.5's 4096-token self-attention (one call, batch 2, 8 heads of 40):
    # - q, k^T and v are made contiguous once: a strided operand is otherwise copied by every chunk's product;
    # - exp(s - max) is one fused compiled kernel (vectorised by the native JIT flags, see ``sd_mlx.cpu_jit``);
    # - v gets a column of ones, so e @ [v, 1] yields the softmax denominators with the numerators and no
    #   separate row-sum pass is made; the normalisation then divides L x d values instead of L x S.
    b, h, lq, _ = q.shape
    s = k.shape[2]
    q = mx.contiguous(q.astype(mx.float32) * scale)
    kt = mx.contiguous(k.astype(mx.float32).swapaxes(-1, -2))
    v = v.astype(mx.float32)
    v1 = mx.concatenate([v, mx.ones((*v.shape[:-1], 1), mx.float32)], axis=-1)
    rows = max(1, min(lq, _CPU_CHUNK_ELEMENTS // (b * h * s)))
    outs = []
    for start in range(0, lq, rows):
        qc = q[:, :, start:start + rows]
        if outs:
            # Chain the chunks: without this MLX's breadth-first evaluation keeps up to ~20 chunks' score buffers
            # alive at once (measured: 414 MB of working memory for SD1.5's 4096-token call instead of ~70).
            qc = mx.depends(qc, outs[-1])
        scores = qc @ kt
        o = _exp_shifted(scores, mx.max(scores, axis=-1, keepdims=True)) @ v1
        outs.append(o[..., :-1] / o[..., -1:])
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def attention(q: mx.array, k: mx.array, v: mx.array, heads: int) -> mx.array:
    """Multi-head scaled dot-product attention on token-major projections.

    Args:
        q: ``(B, L, heads * d)``; k, v: ``(B, S, heads * d)``.
        heads: number of heads.

    Returns:
        ``(B, L, heads * d)`` in ``q``'s dtype: ``softmax(q k^T / sqrt(d)) v`` per head, the softmax in float32
        whatever the input dtype (which covers diffusers' ``upcast_attention`` and ``upcast_softmax``). On a GPU
        this is ``mx.fast.scaled_dot_product_attention``. On the CPU it is the fused multi-threaded kernel of
        :mod:`sd_mlx.cpu_attention` (which evaluates its inputs; its derivatives, and its value inside
        ``mx.compile`` / ``mx.vmap``, come from the MLX path), or where that is unavailable a chunked float32 path
        that bounds the score buffers to a few MB (see ``_attention_cpu``). With ``L = 0`` or ``S = 0`` the
        result is zeros.
    """
    b, lq, inner = q.shape
    s = k.shape[1]
    d = inner // heads
    if lq == 0 or s == 0:  # no queries, or nothing to attend to: an all-zero (possibly empty) result
        return mx.zeros((b, lq, inner), q.dtype)
    if mx.default_device() == mx.cpu:
        o = fused_attention(q, k, v, heads, _attention_cpu_tokens)
        if o is None:
            o = _attention_cpu_tokens(q, k, v, heads)
        return o.astype(q.dtype)
    q, k, v = (t.reshape(b, -1, heads, d).transpose(0, 2, 1, 3) for t in (q, k, v))
    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)
    return o.transpose(0, 2, 1, 3).reshape(b, lq, inner)


def _attention_cpu_tokens(q: mx.array, k: mx.array, v: mx.array, heads: int) -> mx.array:
    # _attention_cpu on token-major (B, L, heads * d) projections; float32 out. The fused CPU kernel's reference
    # (its derivatives, and its value inside mx.compile / mx.vmap) and its fallback.
    b, lq, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(0, 2, 1, 3) for t in (q, k, v))
    return _attention_cpu(q, k, v, d ** -0.5).transpose(0, 2, 1, 3).reshape(b, lq, inner)


class Attention(nn.Module):
    """Self- or cross-attention of the transformer blocks (diffusers ``Attention`` with the default processor:
    ``to_q``/``to_k``/``to_v`` without bias, ``to_out.0`` with bias, no norms, no residual).

    Args:
        query_dim: channel count of the queries (and of the output).
        heads, head_dim: number and width of the heads (inner width ``heads * head_dim``).
        cross_attention_dim: channel count of the context; ``None`` for self-attention (context = queries).
        upcast_attention: diffusers' flag; the softmax always runs in float32 here, so it is recorded only.

    Call: ``x (B, L, query_dim)``, ``context (B, S, cross_attention_dim) | None``, optional keyword ``residual``
    ``(B, L, query_dim)`` added to the output (see :func:`linear`) -> ``(B, L, query_dim)``. With a context of
    ``n B`` rows, ``x`` may have ``B``: each query row then attends to its ``n`` contexts (:func:`repeat_rows`:
    the projection runs once per row of ``x``) and the output (and ``residual``) has ``n B`` rows.
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, cross_attention_dim: int | None = None,
                 *, upcast_attention: bool = False) -> None:
        super().__init__()
        inner = heads * head_dim
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads = heads
        self.upcast_attention = upcast_attention
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(kv_dim, inner, bias=False)
        self.to_v = nn.Linear(kv_dim, inner, bias=False)
        self.to_out = [nn.Linear(inner, query_dim)]

    def __call__(self, x: mx.array, context: mx.array | None = None, *,
                 residual: mx.array | None = None) -> mx.array:
        ctx = x if context is None else context
        q = repeat_rows(self.to_q(x), ctx.shape[0])
        o = attention(q, self.to_k(ctx), self.to_v(ctx), self.heads)
        return linear(self.to_out[0], o, residual)


def repeat_rows(a: mx.array, rows: int) -> mx.array:
    """``a`` ``(B, ...)`` with ``rows`` rows: ``a`` itself when ``rows == B``, else ``rows / B`` copies of the whole
    batch one after another (row ``k * B + i`` is row ``i``), the order of classifier-free guidance's
    ``[uncond, cond]`` batch whose halves share their latents (see :meth:`UNet2DConditionModel.__call__
    <sd_mlx.models.unet.UNet2DConditionModel.__call__>`).

    Raises:
        ValueError: ``rows`` is not a multiple of ``B``.
    """
    b = a.shape[0]
    if rows == b:
        return a
    if b == 0 or rows % b:
        raise ValueError(f"cannot repeat {b} rows into {rows}: {rows} is not a multiple of {b}")
    return mx.concatenate([a] * (rows // b), axis=0)


def linear(layer: nn.Module, x: mx.array, residual: mx.array | None = None) -> mx.array:
    """``layer(x)``, plus ``residual`` when given, for a linear layer (any :class:`mlx.nn.Linear` or
    ``QuantizedLinear``).

    For a plain :class:`mlx.nn.Linear` with a bias and a residual this is ``addmm(residual + bias, x, W^T)``: the
    product accumulates onto the residual in the BLAS call instead of a separate pass writing the broadcast bias
    and another adding the residual (SD1.5 U-Net, ``(8192, 320) x (320, 320)``: 11.7 -> 10.1 ms on a 2-core CPU).
    The sum is the same up to float rounding (another order of additions).

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


def _geglu_of_projection(h: mx.array, bias: mx.array | None = None) -> mx.array:
    # GEGLU of a projection computed without its bias: the MLX reference of sd_mlx.cpu_rowwise.fused_geglu.
    a, g = mx.split(h if bias is None else h + bias, 2, axis=-1)
    return _gated_gelu(a, g)


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm(dims, eps)`` with an affine map (same parameters as :class:`mlx.nn.LayerNorm`), on
    the CPU by the multi-threaded kernel of :mod:`sd_mlx.cpu_rowwise` (about 10x faster there than MLX's
    single-threaded passes; same values to float32 rounding), elsewhere ``mx.fast.layer_norm``.

    Call: ``(..., dims) -> (..., dims)``, in the promoted dtype of the input and the parameters.
    """

    def __call__(self, x: mx.array) -> mx.array:
        if "weight" in self and "bias" in self:
            out = fused_layer_norm(x, self.weight, self.bias, self.eps)
            if out is not None:
                return out
        return super().__call__(x)


class GEGLU(nn.Module):
    """``a * gelu(g)`` where ``[a, g] = proj(x)`` split in halves; exact (erf) GELU (diffusers ``GEGLU``).

    On the CPU (an unquantized ``proj``) the projection runs without its bias and the kernel of
    :mod:`sd_mlx.cpu_rowwise` adds it while applying the activation on all cores.

    Call: ``(..., dim_in) -> (..., dim_out)``.
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def __call__(self, x: mx.array) -> mx.array:
        if type(self.proj) is nn.Linear and mx.default_device() == mx.cpu:
            bias = self.proj.bias if "bias" in self.proj else None
            out = fused_geglu(x @ self.proj.weight.T, bias, _geglu_of_projection)
            if out is not None:
                return out
        a, g = mx.split(self.proj(x), 2, axis=-1)
        return _gated_gelu(a, g)


class FeedForward(nn.Module):
    """GEGLU feed-forward ``net.0`` (GEGLU to ``4 * dim``) -> ``net.2`` (Linear back to ``dim``), as diffusers
    ``FeedForward(activation_fn="geglu")``; ``net.1`` is diffusers' dropout (an identity here, no parameters).

    Call: ``(B, L, dim)``, optional keyword ``residual`` ``(B, L, dim)`` added to the output (see :func:`linear`)
    -> ``(B, L, dim)``.
    """

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = [GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim)]

    def __call__(self, x: mx.array, *, residual: mx.array | None = None) -> mx.array:
        return linear(self.net[2], self.net[0](x), residual)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and GEGLU feed-forward, each pre-LayerNorm with a residual (diffusers
    ``BasicTransformerBlock``, ``norm_type="layer_norm"``, eps 1e-5, ``only_cross_attention=False``).

    Call: ``x (B, L, dim)``, ``context (B, S, cross_attention_dim)`` -> ``(B, L, dim)``. ``x`` may have ``B / n``
    rows, shared by ``n`` contexts (:func:`repeat_rows`): the self-attention then runs once per row of ``x``, and
    the rows are repeated at the cross-attention; the output has ``B`` rows.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, cross_attention_dim: int, *,
                 upcast_attention: bool = False) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, head_dim, upcast_attention=upcast_attention)
        self.norm2 = LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, head_dim, cross_attention_dim, upcast_attention=upcast_attention)
        self.norm3 = LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        x = self.attn1(self.norm1(x), residual=x)
        x = self.attn2(self.norm2(x), context, residual=repeat_rows(x, context.shape[0]))
        return self.ff(self.norm3(x), residual=x)


class Transformer2DModel(nn.Module):
    """Spatial transformer on a feature map (diffusers ``Transformer2DModel`` with continuous input).

    ``out = x + proj_out(blocks(proj_in(GroupNorm(x))))`` over the ``H * W`` tokens; GroupNorm eps 1e-6.
    diffusers' ``proj_in``/``proj_out`` are 1x1 convolutions (``use_linear_projection=False``, SD 1.x) or Linear
    layers (``True``, SD 2.x); on NHWC data both are the same matrix product, so both are :class:`mlx.nn.Linear`
    here (the key map reshapes ``(O, I, 1, 1)`` kernels to ``(O, I)``).

    Args:
        heads, head_dim: attention heads and their width; ``inner = heads * head_dim``.
        in_channels: channels of the feature map.
        num_layers: number of :class:`BasicTransformerBlock`.
        cross_attention_dim: width of the context tokens.
        norm_num_groups: GroupNorm groups.
        use_linear_projection: diffusers' flag (recorded; no effect on the maths here).
        upcast_attention: see :class:`Attention`.

    Call: ``x (B, H, W, in_channels)``, ``context (B, S, cross_attention_dim)`` -> ``(B, H, W, in_channels)``;
    ``x`` may have ``B / n`` rows shared by ``n`` contexts (see :class:`BasicTransformerBlock`).
    """

    def __init__(self, heads: int, head_dim: int, in_channels: int, *, num_layers: int, cross_attention_dim: int,
                 norm_num_groups: int, use_linear_projection: bool = False, upcast_attention: bool = False) -> None:
        super().__init__()
        inner = heads * head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = group_norm(norm_num_groups, in_channels, 1e-6)
        self.proj_in = nn.Linear(in_channels, inner)
        self.transformer_blocks = [
            BasicTransformerBlock(inner, heads, head_dim, cross_attention_dim, upcast_attention=upcast_attention)
            for _ in range(num_layers)
        ]
        self.proj_out = nn.Linear(inner, in_channels)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        b, h, w, c = x.shape
        t = self.proj_in(self.norm(x)).reshape(b, h * w, -1)
        for block in self.transformer_blocks:
            t = block(t, context)
        rows = t.shape[0]
        return linear(self.proj_out, t, repeat_rows(x.reshape(b, h * w, c), rows)).reshape(rows, h, w, c)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with GroupNorm and a residual (diffusers
    ``Attention`` as built by ``UNetMidBlock2D`` for the VAE: ``group_norm``, biased ``to_q``/``to_k``/``to_v``/
    ``to_out.0``, ``residual_connection=True``, ``upcast_softmax=True``).

    ``out = (x + to_out(attn(to_q(n), to_k(n), to_v(n)))) / rescale_output_factor`` with ``n = group_norm(x)``.

    Call: ``(B, H, W, C) -> (B, H, W, C)``.
    """

    def __init__(self, channels: int, *, heads: int = 1, norm_num_groups: int, eps: float,
                 rescale_output_factor: float = 1.0) -> None:
        super().__init__()
        self.heads = heads
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = group_norm(norm_num_groups, channels, eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        n = self.group_norm(x).reshape(b, h * w, c)
        o = attention(self.to_q(n), self.to_k(n), self.to_v(n), self.heads)
        out = x + self.to_out[0](o).reshape(b, h, w, c)
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out
