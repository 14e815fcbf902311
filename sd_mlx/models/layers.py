"""Building blocks shared by the U-Net and the VAE, in NHWC layout.

Each class follows one diffusers module and keeps its attribute names, so a diffusers state-dict key such as
``down_blocks.0.resnets.1.conv1.weight`` names the same parameter here (only the array layout differs: convolution
kernels are ``(O, kh, kw, I)`` instead of ``(O, I, kh, kw)``, and every 1x1 convolution is an :class:`mlx.nn.Linear`
acting on the channel axis, whose weight is ``(O, I)``).

Layout conventions: feature maps are ``(B, H, W, C)``, token sequences ``(B, L, C)``; parameters are in the dtype
chosen at load time. Where diffusers computes something in float32 on purpose (the sinusoidal timestep embedding,
softmax in attention) we do too; group and layer norms accumulate their statistics in float32.

The maths is written once here; how attention, convolutions, norms and activations are computed on each device is
chosen by :mod:`sd_mlx.ops`, which these blocks call.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from .. import ops
from ..ops import conv2d, conv3x3_strips, linear, silu, strip_rows, upsample_nearest


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

    - ``taps=True`` (the U-Net): with the CPU machinery, large inputs use the Winograd kernel or shifted products
      (see :func:`sd_mlx.ops.conv2d`); on the portable path every call is ``mx.conv2d``. The step graph stays one
      lazily evaluated graph.
    - ``strips=True`` (the VAE): when the unfolded input (``B * H * W * 9 * C`` values) would exceed
      :data:`sd_mlx.ops.CONV_UNFOLD_BUDGET_BYTES`, the output is computed over horizontal strips of rows (each
      strip reads its rows plus the halo), each evaluated and written into the preallocated output before the next
      (:func:`sd_mlx.ops.conv3x3_strips`), so only the output and one strip's working buffers exist at a time.

    Args: as ``nn.Conv2d``, plus the keyword flags ``taps`` and ``strips`` (both off: plain ``nn.Conv2d``).

    Call: ``x (B, H, W, C_in)`` -> ``(B, H', W', C_out)`` as ``nn.Conv2d``; with ``upsample2x=True`` the layer is
    applied to the nearest-x2 upsampling of ``x`` (see :func:`sd_mlx.ops.conv2d`), ``(B, 2H, 2W, C_out)``.
    """

    def __init__(self, *args, taps: bool = False, strips: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.use_taps = taps
        self.use_strips = strips

    def __call__(self, x: mx.array, *, upsample2x: bool = False) -> mx.array:
        return conv2d(x, self.weight, self.bias if "bias" in self else None, stride=self.stride,
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
        o = ops.attention(q, self.to_k(ctx), self.to_v(ctx), self.heads)
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


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm(dims, eps)`` with an affine map (same parameters as :class:`mlx.nn.LayerNorm`),
    computed by :func:`sd_mlx.ops.layer_norm`.

    Call: ``(..., dims) -> (..., dims)``, in the promoted dtype of the input and the parameters.
    """

    def __call__(self, x: mx.array) -> mx.array:
        return ops.layer_norm(x, self.get("weight"), self.get("bias"), self.eps)


class GEGLU(nn.Module):
    """``a * gelu(g)`` where ``[a, g] = proj(x)`` split in halves; exact (erf) GELU (diffusers ``GEGLU``),
    computed by :func:`sd_mlx.ops.geglu`.

    Call: ``(..., dim_in) -> (..., dim_out)``.
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def __call__(self, x: mx.array) -> mx.array:
        return ops.geglu(self.proj, x)


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
        o = ops.attention(self.to_q(n), self.to_k(n), self.to_v(n), self.heads)
        out = x + self.to_out[0](o).reshape(b, h, w, c)
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out
