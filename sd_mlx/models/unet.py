"""The Stable Diffusion 1.x / 2.x U-Net in MLX (NHWC), following diffusers' ``UNet2DConditionModel``.

Supported block types: ``CrossAttnDownBlock2D``, ``DownBlock2D``, ``UNetMidBlock2DCrossAttn``, ``CrossAttnUpBlock2D``,
``UpBlock2D``. Parameter names equal diffusers' state-dict keys (see :mod:`sd_mlx.loading.keymaps.unet` for the
array layout changes), so a diffusers ``unet/`` folder loads with :func:`load_unet`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..arrays import float_array
from ..loading.components import ComponentSpec, load_component
from ..loading.configs import dataclass_from_dict
from ..loading.keymaps.unet import unet_keymap
from .layers import (Conv2d, Downsample2D, ResnetBlock2D, TimestepEmbedding, Transformer2DModel, Upsample2D,
                     group_norm, repeat_rows, timestep_embedding)

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)


def _per_block(value: Any, n: int, name: str, kind: type | tuple[type, ...] = int) -> tuple:
    """Expand an int-or-list config value to one entry per down block (diffusers' rule); ValueError names it."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but there are {n} down blocks")
        items = tuple(value)
    else:
        items = (value,) * n
    for v in items:
        if isinstance(v, bool) or not isinstance(v, kind):
            raise ValueError(f"{name}={value!r} must be {'an int' if kind is int else kind} or a list of those")
    return items


@dataclass
class UNetConfig:
    """The fields of diffusers' ``unet/config.json`` that change the U-Net's maths.

    Fields not listed here are either without effect on the supported block types (dropout, FreeU, fields that
    only configure other block types) or rejected. Values that diffusers accepts but sd_mlx does not implement
    raise :class:`~sd_mlx.errors.ConfigError` naming the field: a non-null ``class_embed_type``,
    ``num_class_embeds``, ``addition_embed_type``, ``time_cond_proj_dim``, ``encoder_hid_dim(_type)``,
    ``time_embedding_act_fn``, ``timestep_post_act``, ``reverse_transformer_layers_per_block``; a true
    ``only_cross_attention`` or ``dual_cross_attention``; ``resnet_time_scale_shift`` other than ``"default"``;
    ``act_fn`` other than silu/swish; other block types, ``time_embedding_type``, ``attention_type`` or kernel sizes.
    ``num_attention_heads`` must be null, as diffusers itself requires; then ``attention_head_dim`` is the NUMBER
    of heads per block (diffusers' historical naming), and each head is ``channels // heads`` wide.

    Per-block values (``attention_head_dim``, ``cross_attention_dim``, ``layers_per_block``,
    ``transformer_layers_per_block``) may be an int or a list with one entry per down block; the up blocks use the
    reversed lists and the mid block the last entry.
    """

    sample_size: int | list[int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: Sequence[str] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "DownBlock2D")
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | list[bool] = False
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: int | list[int] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | list[int] = 1280
    transformer_layers_per_block: int | list[int] = 1
    reverse_transformer_layers_per_block: Any = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | list[int] = 8
    num_attention_heads: int | list[int] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    attention_type: str = "default"

    def __post_init__(self) -> None:
        for name in ("class_embed_type", "num_class_embeds", "addition_embed_type", "time_cond_proj_dim",
                     "encoder_hid_dim", "encoder_hid_dim_type", "time_embedding_act_fn", "timestep_post_act",
                     "reverse_transformer_layers_per_block"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported (sd_mlx supports only null)")
        if self.num_attention_heads is not None:
            raise ValueError(f"num_attention_heads={self.num_attention_heads!r} is not supported (diffusers also "
                             f"refuses it for UNet2DConditionModel; attention_head_dim gives the head count)")
        for name in ("dual_cross_attention",):
            if getattr(self, name) is not False:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported (only false)")
        oca = self.only_cross_attention
        if not (oca is False or (isinstance(oca, (list, tuple)) and not any(oca))):
            raise ValueError(f"only_cross_attention={oca!r} is not supported (only false)")
        if self.resnet_time_scale_shift != "default":
            raise ValueError(f"resnet_time_scale_shift={self.resnet_time_scale_shift!r} is not supported "
                             f"(only 'default')")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn={self.act_fn!r} is not supported (only 'silu')")
        if self.time_embedding_type != "positional":
            raise ValueError(f"time_embedding_type={self.time_embedding_type!r} is not supported (only 'positional')")
        if self.attention_type != "default":
            raise ValueError(f"attention_type={self.attention_type!r} is not supported (only 'default')")
        for name in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, name) != 3:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported (only 3)")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"mid_block_type={self.mid_block_type!r} is not supported (only "
                             f"{', '.join(MID_BLOCK_TYPES)})")
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        self.block_out_channels = tuple(_per_block(list(self.block_out_channels), len(self.block_out_channels),
                                                   "block_out_channels"))
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise ValueError(f"down_block_types: {t!r} is not supported (only {', '.join(DOWN_BLOCK_TYPES)})")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise ValueError(f"up_block_types: {t!r} is not supported (only {', '.join(UP_BLOCK_TYPES)})")
        n = len(self.down_block_types)
        if len(self.up_block_types) != n:
            raise ValueError(f"up_block_types has {len(self.up_block_types)} entries, down_block_types {n}")
        if len(self.block_out_channels) != n:
            raise ValueError(f"block_out_channels has {len(self.block_out_channels)} entries, down_block_types {n}")
        # Validate the per-block values now so a bad config fails at load, naming the field.
        _per_block(self.attention_head_dim, n, "attention_head_dim")
        _per_block(self.cross_attention_dim, n, "cross_attention_dim")
        _per_block(self.layers_per_block, n, "layers_per_block")
        _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels {list(self.block_out_channels)} are not all divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")
        for c, h, name in zip(self.block_out_channels, self.heads, self.down_block_types):
            if c % h:
                raise ValueError(f"attention_head_dim: {h} heads do not divide {c} channels ({name})")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> "UNetConfig":
        """Build from a parsed ``config.json``; raises ``ConfigError`` naming ``source`` and the field."""
        return dataclass_from_dict(cls, d, source=source)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention head count per down block (diffusers: ``num_attention_heads or attention_head_dim``)."""
        return _per_block(self.attention_head_dim, len(self.down_block_types), "attention_head_dim")

    @property
    def cross_attention_dims(self) -> tuple[int, ...]:
        """Context width per down block."""
        return _per_block(self.cross_attention_dim, len(self.down_block_types), "cross_attention_dim")

    @property
    def layers(self) -> tuple[int, ...]:
        """Resnets per down block (up blocks have one more)."""
        return _per_block(self.layers_per_block, len(self.down_block_types), "layers_per_block")

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        """Transformer blocks per ``Transformer2DModel``, per down block."""
        return _per_block(self.transformer_layers_per_block, len(self.down_block_types),
                          "transformer_layers_per_block")

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding fed to the resnets (``time_embedding_dim`` or ``4 * block_out_channels[0]``)."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]


class CrossAttnDownBlock2D(nn.Module):
    """``num_layers`` x (ResnetBlock2D, Transformer2DModel), then an optional stride-2 conv (diffusers
    ``CrossAttnDownBlock2D``).

    Call: ``x (B, H, W, C_in)``, ``temb (B, T)``, ``context (B, S, D)`` -> ``(x_out, skips)`` where ``skips`` is the
    list of ``(B, H', W', C_out)`` states the up path consumes (one per resnet, plus the downsampled output).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, num_layers: int,
                 transformer_layers: int, heads: int, cross_attention_dim: int, groups: int, eps: float,
                 add_downsample: bool, downsample_padding: int, use_linear_projection: bool,
                 upcast_attention: bool) -> None:
        super().__init__()
        self.resnets = [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                                      groups=groups, eps=eps) for i in range(num_layers)]
        self.attentions = [Transformer2DModel(heads, out_channels // heads, out_channels,
                                              num_layers=transformer_layers, cross_attention_dim=cross_attention_dim,
                                              norm_num_groups=groups, use_linear_projection=use_linear_projection,
                                              upcast_attention=upcast_attention) for _ in range(num_layers)]
        if add_downsample:
            self.downsamplers = [Downsample2D(out_channels, padding=downsample_padding)]

    def __call__(self, x: mx.array, temb: mx.array, context: mx.array) -> tuple[mx.array, list[mx.array]]:
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(x, temb), context)
            skips.append(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class DownBlock2D(nn.Module):
    """``num_layers`` ResnetBlock2D, then an optional stride-2 conv (diffusers ``DownBlock2D``).

    Call: as :class:`CrossAttnDownBlock2D` (``context`` is ignored).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, num_layers: int, groups: int,
                 eps: float, add_downsample: bool, downsample_padding: int) -> None:
        super().__init__()
        self.resnets = [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                                      groups=groups, eps=eps) for i in range(num_layers)]
        if add_downsample:
            self.downsamplers = [Downsample2D(out_channels, padding=downsample_padding)]

    def __call__(self, x: mx.array, temb: mx.array, context: mx.array) -> tuple[mx.array, list[mx.array]]:
        skips = []
        for resnet in self.resnets:
            x = resnet(x, temb)
            skips.append(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nn.Module):
    """ResnetBlock2D, then (Transformer2DModel, ResnetBlock2D); resnets use ``output_scale_factor``
    (diffusers ``UNetMidBlock2DCrossAttn`` with ``num_layers=1``).

    Call: ``x (B, H, W, C)``, ``temb (B, T)``, ``context (B, S, D)`` -> ``(B, H, W, C)``.
    """

    def __init__(self, channels: int, temb_channels: int, *, transformer_layers: int, heads: int,
                 cross_attention_dim: int, groups: int, eps: float, output_scale_factor: float,
                 use_linear_projection: bool, upcast_attention: bool) -> None:
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, temb_channels, groups=groups, eps=eps,
                                      output_scale_factor=output_scale_factor) for _ in range(2)]
        self.attentions = [Transformer2DModel(heads, channels // heads, channels, num_layers=transformer_layers,
                                              cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
                                              use_linear_projection=use_linear_projection,
                                              upcast_attention=upcast_attention)]

    def __call__(self, x: mx.array, temb: mx.array, context: mx.array) -> mx.array:
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context), temb)
        return x


def _concat_skip(x: mx.array, skip: mx.array) -> mx.array:
    """``x`` and a skip connection joined along channels, the one with fewer rows repeated (rows shared before the
    first cross-attention: :func:`~sd_mlx.models.layers.repeat_rows`)."""
    rows = max(x.shape[0], skip.shape[0])
    return mx.concatenate([repeat_rows(x, rows), repeat_rows(skip, rows)], axis=-1)


class CrossAttnUpBlock2D(nn.Module):
    """``num_layers`` x (concat skip, ResnetBlock2D, Transformer2DModel), then an optional nearest-upsample + conv
    (diffusers ``CrossAttnUpBlock2D``).

    Call: ``x (B, H, W, C_prev)``, ``skips`` (consumed from the end), ``temb (B, T)``, ``context (B, S, D)``,
    ``upsample_size (H_out, W_out) | None`` -> ``(B, H_out, W_out, C_out)`` (``2H, 2W`` when ``None``).
    """

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int, *,
                 num_layers: int, transformer_layers: int, heads: int, cross_attention_dim: int, groups: int,
                 eps: float, add_upsample: bool, use_linear_projection: bool, upcast_attention: bool) -> None:
        super().__init__()
        self.resnets = []
        for i in range(num_layers):
            skip_ch = in_channels if i == num_layers - 1 else out_channels
            res_in = prev_output_channel if i == 0 else out_channels
            self.resnets.append(ResnetBlock2D(res_in + skip_ch, out_channels, temb_channels, groups=groups, eps=eps))
        self.attentions = [Transformer2DModel(heads, out_channels // heads, out_channels,
                                              num_layers=transformer_layers, cross_attention_dim=cross_attention_dim,
                                              norm_num_groups=groups, use_linear_projection=use_linear_projection,
                                              upcast_attention=upcast_attention) for _ in range(num_layers)]
        if add_upsample:
            self.upsamplers = [Upsample2D(out_channels)]

    def __call__(self, x: mx.array, skips: list[mx.array], temb: mx.array, context: mx.array,
                 upsample_size: tuple[int, int] | None = None) -> mx.array:
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(_concat_skip(x, skips.pop()), temb), context)
        if "upsamplers" in self:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UpBlock2D(nn.Module):
    """``num_layers`` x (concat skip, ResnetBlock2D), then an optional nearest-upsample + conv (diffusers
    ``UpBlock2D``).

    Call: as :class:`CrossAttnUpBlock2D` (``context`` is ignored).
    """

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int, *,
                 num_layers: int, groups: int, eps: float, add_upsample: bool) -> None:
        super().__init__()
        self.resnets = []
        for i in range(num_layers):
            skip_ch = in_channels if i == num_layers - 1 else out_channels
            res_in = prev_output_channel if i == 0 else out_channels
            self.resnets.append(ResnetBlock2D(res_in + skip_ch, out_channels, temb_channels, groups=groups, eps=eps))
        if add_upsample:
            self.upsamplers = [Upsample2D(out_channels)]

    def __call__(self, x: mx.array, skips: list[mx.array], temb: mx.array, context: mx.array,
                 upsample_size: tuple[int, int] | None = None) -> mx.array:
        for resnet in self.resnets:
            x = resnet(_concat_skip(x, skips.pop()), temb)
        if "upsamplers" in self:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNet2DConditionModel(nn.Module):
    """Conditional denoising U-Net of Stable Diffusion 1.x / 2.x (diffusers ``UNet2DConditionModel``), NHWC.

    Build with :func:`load_unet` (or ``UNet2DConditionModel(config)`` for fresh, untrained parameters).

    Attributes:
        config: the :class:`UNetConfig`.
        num_upsamplers: number of x2 upsampling stages (``len(block_out_channels) - 1``).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        boc = c.block_out_channels
        n = len(boc)
        heads, xdims, layers, tlayers = c.heads, c.cross_attention_dims, c.layers, c.transformer_layers
        temb_ch = c.time_embed_dim
        groups, eps = c.norm_num_groups, c.norm_eps
        lin, upcast = c.use_linear_projection, c.upcast_attention

        self.conv_in = Conv2d(c.in_channels, boc[0], kernel_size=3, padding=1, taps=True)
        self.time_embedding = TimestepEmbedding(boc[0], temb_ch)

        self.down_blocks = []
        out_ch = boc[0]
        for i, kind in enumerate(c.down_block_types):
            in_ch, out_ch = out_ch, boc[i]
            final = i == n - 1
            if kind == "CrossAttnDownBlock2D":
                block: nn.Module = CrossAttnDownBlock2D(
                    in_ch, out_ch, temb_ch, num_layers=layers[i], transformer_layers=tlayers[i], heads=heads[i],
                    cross_attention_dim=xdims[i], groups=groups, eps=eps, add_downsample=not final,
                    downsample_padding=c.downsample_padding, use_linear_projection=lin, upcast_attention=upcast)
            else:
                block = DownBlock2D(in_ch, out_ch, temb_ch, num_layers=layers[i], groups=groups, eps=eps,
                                    add_downsample=not final, downsample_padding=c.downsample_padding)
            self.down_blocks.append(block)

        self.mid_block = UNetMidBlock2DCrossAttn(
            boc[-1], temb_ch, transformer_layers=tlayers[-1], heads=heads[-1], cross_attention_dim=xdims[-1],
            groups=groups, eps=eps, output_scale_factor=c.mid_block_scale_factor, use_linear_projection=lin,
            upcast_attention=upcast)

        self.up_blocks = []
        rboc = list(reversed(boc))
        rheads, rxdims = list(reversed(heads)), list(reversed(xdims))
        rlayers, rtlayers = list(reversed(layers)), list(reversed(tlayers))
        self.num_upsamplers = 0
        out_ch = rboc[0]
        for i, kind in enumerate(c.up_block_types):
            final = i == n - 1
            prev_ch, out_ch = out_ch, rboc[i]
            in_ch = rboc[min(i + 1, n - 1)]
            if not final:
                self.num_upsamplers += 1
            if kind == "CrossAttnUpBlock2D":
                block = CrossAttnUpBlock2D(
                    in_ch, prev_ch, out_ch, temb_ch, num_layers=rlayers[i] + 1, transformer_layers=rtlayers[i],
                    heads=rheads[i], cross_attention_dim=rxdims[i], groups=groups, eps=eps, add_upsample=not final,
                    use_linear_projection=lin, upcast_attention=upcast)
            else:
                block = UpBlock2D(in_ch, prev_ch, out_ch, temb_ch, num_layers=rlayers[i] + 1, groups=groups, eps=eps,
                                  add_upsample=not final)
            self.up_blocks.append(block)

        self.conv_norm_out = group_norm(groups, boc[0], eps)
        self.conv_out = Conv2d(boc[0], c.out_channels, kernel_size=3, padding=1, taps=True)

    # Activation dtype; ``None`` means the parameter dtype. The pipeline sets float32 on the CPU for half or
    # quantized weights (MLX's CPU half-precision matrix products are ~50x slower than float32 ones; mixed
    # float32 x float16 products promote each weight to float32 as it is used, so memory keeps the half weights).
    compute_dtype: mx.Dtype | None = None

    @property
    def dtype(self) -> mx.Dtype:
        """Activation dtype: ``compute_dtype`` when set, else the dtype of the parameters (and of the output)."""
        return self.compute_dtype or self.conv_in.weight.dtype

    def __call__(self, sample: mx.array, timestep: mx.array | float | int, encoder_hidden_states: mx.array) -> mx.array:
        """Predict the model output (noise, or v for v-prediction checkpoints) for a batch of latents.

        Args:
            sample: ``(B, h, w, in_channels)`` noisy latents (any ``h, w``; sizes that are not a multiple of
                ``2 ** num_upsamplers`` are handled as diffusers does, by upsampling to the skip connection's size).
                Cast to :attr:`dtype` (the parameter dtype unless ``compute_dtype`` is set). May also have
                ``B / n`` rows, each shared by ``n`` rows of ``encoder_hidden_states``: the result is then that of
                ``mx.concatenate([sample] * n)`` (row ``k * B / n + i`` uses latents ``i``: classifier-free
                guidance's ``[uncond, cond]`` batch of the same latents), and everything before the first
                cross-attention (the input convolution, the first resnet, the first self-attention: about 3% of
                an SD1.5 step at 512x512) runs once per latent instead of ``n`` times. The values are the same up
                to float32 rounding: products over fewer rows may sum in another order (full-size SD1.5 at
                64x64: 9.7e-6 max abs difference, outputs of std 0.3).
            timestep: scalar (Python number or 0-d array) or an array with one value per row of ``sample``; may
                be fractional. The sinusoidal embedding is computed in float32, then cast to :attr:`dtype`.
            encoder_hidden_states: ``(B, T, cross_attention_dim)`` text embeddings (cast to :attr:`dtype`).

        Returns:
            ``(B, h, w, out_channels)`` in :attr:`dtype`.

        Raises:
            InvalidArgumentError: ``sample`` is not ``(B, h, w, in_channels)`` or ``encoder_hidden_states`` not
                ``(B, T, cross_attention_dim)`` real numbers (numpy or ``mx.array`` of any float or integer dtype
                are accepted).
            ValueError: ``sample`` has no rows, ``B`` is not a multiple of its rows, or ``timestep`` has neither one
                value nor one per row of ``sample``.
        """
        c = self.config
        dtype = self.dtype
        x = float_array(sample, "sample", ("B", "h", "w", c.in_channels), layout="NHWC latents", dtype=dtype)
        context = float_array(encoder_hidden_states, "encoder_hidden_states",
                              ("B", "T", c.cross_attention_dims[0]), dtype=dtype)
        b, rows = x.shape[0], context.shape[0]
        if b == 0:
            raise ValueError("sample has no rows: pass at least one latent")
        if rows % b:
            raise ValueError(f"encoder_hidden_states has {rows} rows for {b} rows of sample: it needs as many, or "
                             f"a multiple (each latent shared by that many contexts)")
        t = float_array(timestep, "timestep", dtype=mx.float32)
        if t.size not in (1, b):
            raise ValueError(f"timestep has {t.size} values; expected 1 or one per row of sample ({b})")
        t = mx.broadcast_to(t.reshape(-1), (b,)) if t.size == 1 else t.reshape(b)

        factor = 2 ** self.num_upsamplers
        forward_size = x.shape[1] % factor != 0 or x.shape[2] % factor != 0

        if c.center_input_sample:
            x = 2 * x - 1.0
        t_emb = timestep_embedding(t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos,
                                   freq_shift=c.freq_shift)
        temb = self.time_embedding(t_emb.astype(dtype))

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, res = block(x, temb, context)
            skips.extend(res)

        x = self.mid_block(x, temb, context)

        last = len(self.up_blocks) - 1
        for i, block in enumerate(self.up_blocks):
            n_res = len(block.resnets)
            res, skips = skips[-n_res:], skips[:-n_res]
            size = tuple(skips[-1].shape[1:3]) if (forward_size and i != last) else None
            x = block(x, res, temb, context, size)

        x = nn.silu(self.conv_norm_out(x))
        return repeat_rows(self.conv_out(x), rows)  # (a U-Net without cross-attention never repeats its rows)


UNET_SPEC = ComponentSpec(
    config_from_dict=UNetConfig.from_dict,
    build=UNet2DConditionModel,
    keymap=unet_keymap,
    weight_stem="diffusion_pytorch_model",
)
"""How to load a diffusers ``unet/`` folder (see :func:`sd_mlx.loading.components.load_component`)."""


def load_unet(folder: Path | str, dtype: str | mx.Dtype = "float32") -> UNet2DConditionModel:
    """Load a diffusers ``unet/`` folder (``config.json`` + ``diffusion_pytorch_model[.fp16].safetensors``).

    Args:
        folder: the component folder.
        dtype: ``"float32" | "float16" | "bfloat16"`` (or the ``mx.Dtype``); all parameters are cast to it.

    Returns:
        The model in eval mode, parameters lazily memory-mapped.

    Raises:
        ModelNotFoundError: the folder does not exist.
        ConfigError: the config is missing/invalid or uses an unsupported feature (message names the field).
        WeightLoadError: missing/unknown key, wrong shape, non-finite value (message names the key).
        InvalidArgumentError: unsupported ``dtype``.
    """
    model = load_component(folder, UNET_SPEC, dtype=dtype)
    assert isinstance(model, UNet2DConditionModel)
    return model
