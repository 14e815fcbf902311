"""The Stable Diffusion VAE (``AutoencoderKL``) in MLX (NHWC), following diffusers' ``AutoencoderKL``,
``Encoder``, ``Decoder`` and ``DiagonalGaussianDistribution``.

Scaling convention (as diffusers pipelines): :meth:`AutoencoderKL.encode` returns the posterior of the *unscaled*
latents; the caller multiplies a sample by ``config.scaling_factor`` (after subtracting ``config.shift_factor``
when it is set) to get diffusion latents. :meth:`AutoencoderKL.decode` takes unscaled latents: the caller passes
``latents / scaling_factor (+ shift_factor)``.

Precision: :func:`load_vae` keeps the VAE in float32 when ``float16`` is asked for and the config has
``force_upcast`` (diffusers' pipelines upcast such VAEs, since SD VAEs overflow in float16); ``bfloat16`` is kept
as asked, as in diffusers. :attr:`AutoencoderKL.dtype` tells the caller which dtype was used; ``encode`` and
``decode`` cast their input to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..arrays import float_array
from ..loading.components import ComponentSpec, load_component, parse_dtype
from ..loading.configs import dataclass_from_dict, read_json
from ..loading.keymaps.vae import vae_keymap
from .layers import (Conv2d, Downsample2D, ResnetBlock2D, SpatialSelfAttention, Upsample2D, group_norm,
                     norm_silu_conv)

_EPS = 1e-6  # every norm of diffusers' VAE Encoder/Decoder uses this epsilon


@dataclass
class VAEConfig:
    """The fields of diffusers' ``vae/config.json`` (``AutoencoderKL``) that change the maths.

    ``scaling_factor`` and ``shift_factor`` are not used by the model itself; they are read here for the caller
    (see the module docstring). Rejected with :class:`~sd_mlx.errors.ConfigError` naming the field: block types
    other than ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``, ``act_fn`` other than silu, and non-null
    ``latents_mean`` / ``latents_std`` (per-channel latent normalisation, not implemented).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: Sequence[int] = (64,)
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
    up_block_types: Sequence[str] = ("UpDecoderBlock2D",)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int | list[int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: Any = None
    latents_std: Any = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        n = len(self.block_out_channels)
        if n == 0 or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0
                             for c in self.block_out_channels):
            raise ValueError(f"block_out_channels={list(self.block_out_channels)!r} must be a non-empty list of "
                             f"positive ints")
        for t in self.down_block_types:
            if t != "DownEncoderBlock2D":
                raise ValueError(f"down_block_types: {t!r} is not supported (only 'DownEncoderBlock2D')")
        for t in self.up_block_types:
            if t != "UpDecoderBlock2D":
                raise ValueError(f"up_block_types: {t!r} is not supported (only 'UpDecoderBlock2D')")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types/up_block_types need {n} entries (one per block_out_channels)")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn={self.act_fn!r} is not supported (only 'silu')")
        for name in ("latents_mean", "latents_std"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name} is not supported (only null)")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels {list(self.block_out_channels)} are not all divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> "VAEConfig":
        """Build from a parsed ``config.json``; raises ``ConfigError`` naming ``source`` and the field."""
        return dataclass_from_dict(cls, d, source=source)


class DownEncoderBlock2D(nn.Module):
    """``num_layers`` ResnetBlock2D (no time embedding), then an optional stride-2 conv with bottom/right padding
    (diffusers ``DownEncoderBlock2D`` as built by the VAE ``Encoder``).

    Call: ``(B, H, W, C_in) -> (B, H', W', C_out)`` (``H' = floor(H / 2)`` when downsampling).
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int,
                 add_downsample: bool) -> None:
        super().__init__()
        self.resnets = [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups=groups,
                                      eps=_EPS, strip_convs=True) for i in range(num_layers)]
        if add_downsample:
            self.downsamplers = [Downsample2D(out_channels, padding=0)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``num_layers`` ResnetBlock2D, then an optional nearest x2 upsample + conv (diffusers ``UpDecoderBlock2D``).

    Call: ``(B, H, W, C_in) -> (B, 2H, 2W, C_out)`` (or ``(B, H, W, C_out)`` without upsampling).
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int,
                 add_upsample: bool) -> None:
        super().__init__()
        self.resnets = [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups=groups,
                                      eps=_EPS, strip_convs=True) for i in range(num_layers)]
        if add_upsample:
            self.upsamplers = [Upsample2D(out_channels, strip_convs=True)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        if "upsamplers" in self:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Module):
    """ResnetBlock2D, [single-head SpatialSelfAttention], ResnetBlock2D (diffusers ``UNetMidBlock2D`` as used by the
    VAE: no time embedding, eps 1e-6, attention optional via ``mid_block_add_attention``).

    Call: ``(B, H, W, C) -> (B, H, W, C)``.
    """

    def __init__(self, channels: int, *, groups: int, add_attention: bool) -> None:
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, None, groups=groups, eps=_EPS, strip_convs=True)
                        for _ in range(2)]
        if add_attention:
            self.attentions = [SpatialSelfAttention(channels, heads=1, norm_num_groups=groups, eps=_EPS)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        if "attentions" in self:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """VAE encoder (diffusers ``Encoder`` with ``double_z=True``).

    Call: image ``(B, H, W, in_channels)`` -> moments ``(B, H / f, W / f, 2 * latent_channels)`` (mean then logvar
    along channels, before ``quant_conv``), ``f = 2 ** (len(block_out_channels) - 1)``.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        boc, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, boc[0], kernel_size=3, padding=1, strips=True)
        self.down_blocks = []
        out_ch = boc[0]
        for i in range(len(boc)):
            in_ch, out_ch = out_ch, boc[i]
            self.down_blocks.append(DownEncoderBlock2D(in_ch, out_ch, num_layers=config.layers_per_block,
                                                       groups=groups, add_downsample=i != len(boc) - 1))
        self.mid_block = UNetMidBlock2D(boc[-1], groups=groups, add_attention=config.mid_block_add_attention)
        self.conv_norm_out = group_norm(groups, boc[-1], _EPS)
        self.conv_out = Conv2d(boc[-1], 2 * config.latent_channels, kernel_size=3, padding=1, strips=True)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return norm_silu_conv(self.conv_norm_out, self.conv_out, x)


class Decoder(nn.Module):
    """VAE decoder (diffusers ``Decoder``, ``norm_type="group"``).

    Call: latents ``(B, h, w, latent_channels)`` (after ``post_quant_conv``) -> ``(B, f h, f w, out_channels)``.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        boc, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, boc[-1], kernel_size=3, padding=1, strips=True)
        self.mid_block = UNetMidBlock2D(boc[-1], groups=groups, add_attention=config.mid_block_add_attention)
        self.up_blocks = []
        rboc = list(reversed(boc))
        out_ch = rboc[0]
        for i in range(len(boc)):
            prev_ch, out_ch = out_ch, rboc[i]
            self.up_blocks.append(UpDecoderBlock2D(prev_ch, out_ch, num_layers=config.layers_per_block + 1,
                                                   groups=groups, add_upsample=i != len(boc) - 1))
        self.conv_norm_out = group_norm(groups, boc[0], _EPS)
        self.conv_out = Conv2d(boc[0], config.out_channels, kernel_size=3, padding=1, strips=True)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return norm_silu_conv(self.conv_norm_out, self.conv_out, x)


class DiagonalGaussianDistribution:
    """Posterior of the VAE encoder (diffusers ``DiagonalGaussianDistribution``).

    Attributes:
        mean: ``(B, h, w, C)``.
        logvar: ``(B, h, w, C)``, clamped to ``[-30, 20]`` as diffusers does.
        std: ``exp(0.5 * logvar)``; var: ``exp(logvar)``.
    """

    def __init__(self, moments: mx.array) -> None:
        """``moments``: ``(B, h, w, 2C)``, mean channels first, then log-variance channels."""
        self.mean, logvar = mx.split(moments, 2, axis=-1)
        self.logvar = mx.clip(logvar, -30.0, 20.0)
        self.std = mx.exp(0.5 * self.logvar)
        self.var = mx.exp(self.logvar)

    def sample(self, key: mx.array | None = None) -> mx.array:
        """``mean + std * eps`` with ``eps ~ N(0, 1)`` drawn from ``key`` (an ``mx.random.key``; ``None`` uses MLX's
        global generator). Returns ``(B, h, w, C)`` in the dtype of ``mean``. The noise does not reproduce
        diffusers' torch generator draws."""
        eps = mx.random.normal(self.mean.shape, dtype=self.mean.dtype, key=key)
        return self.mean + self.std * eps

    def mode(self) -> mx.array:
        """The mean, ``(B, h, w, C)``."""
        return self.mean


class AutoencoderKL(nn.Module):
    """The KL autoencoder of Stable Diffusion (diffusers ``AutoencoderKL``, without tiling/slicing), NHWC.

    Submodules ``encoder``, ``decoder``, ``quant_conv`` and ``post_quant_conv`` (1x1 convolutions as Linear layers;
    absent when the config disables them) are public so that tiled decoding can be built on them.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        lc = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.use_quant_conv:
            self.quant_conv = nn.Linear(2 * lc, 2 * lc)
        if config.use_post_quant_conv:
            self.post_quant_conv = nn.Linear(lc, lc)

    # Activation dtype; ``None`` means the parameter dtype (see ``UNet2DConditionModel.compute_dtype``).
    compute_dtype: mx.Dtype | None = None

    @property
    def dtype(self) -> mx.Dtype:
        """``encode``/``decode`` compute and return in it: ``compute_dtype`` when set, else the parameters'."""
        return self.compute_dtype or self.decoder.conv_in.weight.dtype

    @property
    def vae_scale_factor(self) -> int:
        """Spatial factor between image and latents: ``2 ** (len(block_out_channels) - 1)`` (8 for SD)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode_moments(self, x: mx.array) -> mx.array:
        """Encoder then ``quant_conv``: ``(B, H, W, in_channels)`` -> ``(B, H/f, W/f, 2 * latent_channels)``.

        Raises:
            InvalidArgumentError: ``x`` is not ``(B, H, W, in_channels)`` real numbers (numpy or ``mx.array``).
        """
        x = float_array(x, "x", ("B", "H", "W", self.config.in_channels), layout="NHWC images", dtype=self.dtype)
        m = self.encoder(x)
        if "quant_conv" in self:
            m = self.quant_conv(m)
        return m

    def encode(self, x: mx.array) -> DiagonalGaussianDistribution:
        """Encode images to the latent posterior.

        Args:
            x: ``(B, H, W, in_channels)`` images in ``[-1, 1]`` (cast to :attr:`dtype`); ``H, W`` multiples of
                :attr:`vae_scale_factor` give exact ``H/f, W/f`` latents (others are floored per stage, as in
                diffusers).

        Returns:
            The posterior; ``mean``/``logvar`` ``(B, H/f, W/f, latent_channels)``, *unscaled* (multiply a sample
            by ``config.scaling_factor`` for diffusion latents).
        """
        return DiagonalGaussianDistribution(self.encode_moments(x))

    def decode(self, z: mx.array) -> mx.array:
        """Decode unscaled latents to images.

        Args:
            z: ``(B, h, w, latent_channels)`` latents already divided by ``config.scaling_factor`` (and with
                ``shift_factor`` added back by the caller when set), cast to :attr:`dtype`.

        Returns:
            ``(B, f h, f w, out_channels)`` images, nominally in ``[-1, 1]`` (not clipped), in :attr:`dtype`.

        Raises:
            InvalidArgumentError: ``z`` is not ``(B, h, w, latent_channels)`` real numbers (numpy or ``mx.array``).
        """
        z = float_array(z, "z", ("B", "h", "w", self.config.latent_channels), layout="NHWC latents",
                        dtype=self.dtype)
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)


VAE_SPEC = ComponentSpec(
    config_from_dict=VAEConfig.from_dict,
    build=AutoencoderKL,
    keymap=vae_keymap,
    weight_stem="diffusion_pytorch_model",
)
"""How to load a diffusers ``vae/`` folder (see :func:`sd_mlx.loading.components.load_component`)."""


def vae_load_dtype(config: VAEConfig, dtype: str | mx.Dtype) -> mx.Dtype:
    """The dtype :func:`load_vae` uses: float32 when ``dtype`` is float16 and ``config.force_upcast`` is set
    (diffusers pipelines' rule), else ``dtype``.

    Raises:
        InvalidArgumentError: unsupported ``dtype``.
    """
    d = parse_dtype(dtype)
    return mx.float32 if (d == mx.float16 and config.force_upcast) else d


def load_vae(folder: Path | str, dtype: str | mx.Dtype = "float32") -> AutoencoderKL:
    """Load a diffusers ``vae/`` folder (``config.json`` + ``diffusion_pytorch_model[.fp16].safetensors``).

    Args:
        folder: the component folder.
        dtype: requested parameter dtype; float16 becomes float32 when the config has ``force_upcast`` (see
            :func:`vae_load_dtype`; the result's :attr:`AutoencoderKL.dtype` says what was used).

    Returns:
        The model in eval mode, parameters lazily memory-mapped.

    Raises:
        ModelNotFoundError: the folder does not exist.
        ConfigError: the config is missing/invalid or uses an unsupported feature (message names the field).
        WeightLoadError: missing/unknown key, wrong shape, non-finite value (message names the key).
        InvalidArgumentError: unsupported ``dtype``.
    """
    folder = Path(folder)
    effective: mx.Dtype = parse_dtype(dtype)
    cfg_path = folder / "config.json"
    if folder.is_dir():
        effective = vae_load_dtype(VAEConfig.from_dict(read_json(cfg_path), str(cfg_path)), dtype)
    model = load_component(folder, VAE_SPEC, dtype=effective)
    assert isinstance(model, AutoencoderKL)
    return model
