"""TAESD, the tiny distilled autoencoder (diffusers ``AutoencoderTiny``), in MLX, NHWC.

Encoder (diffusers ``EncoderTiny``): image ``[-1, 1] -> [0, 1]``, a 3x3 convolution, then for each later stage a
bias-free stride-2 3x3 convolution, each stage followed by ``num_encoder_blocks[i]`` residual blocks; a final 3x3
convolution gives ``latent_channels`` raw (unscaled, unclamped) latents at 1/8 resolution (with 4 stages).

Decoder (diffusers ``DecoderTiny``): soft clamp ``tanh(z / 3) * 3`` (the constant 3 is fixed, independent of
``latent_magnitude``), 3x3 convolution + activation, then per stage ``num_decoder_blocks[i]`` residual blocks,
nearest-neighbour upsampling and a bias-free 3x3 convolution (the last stage: no upsampling, a 3x3 convolution
with bias to ``out_channels``), and finally ``[0, 1] -> [-1, 1]`` (``x * 2 - 1``, not clamped).

Residual block (diffusers ``AutoencoderTinyBlock``): ``relu(conv(act(conv(act(conv(x))))) + skip(x))``; the fusing
activation is always ReLU; ``skip`` is a bias-free 1x1 convolution when channel counts differ, else identity.

``scaling_factor`` is 1.0 for TAESD (latents are used as they are, ``latents / scaling_factor`` in pipelines).
``latent_magnitude`` / ``latent_shift`` only enter :meth:`AutoencoderTiny.scale_latents` /
:meth:`AutoencoderTiny.unscale_latents` (the 8-bit latent storage format of diffusers' ``forward``).

Everything runs in the parameter dtype chosen at load time (TAESD has no norms and is float16-safe).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..arrays import float_array
from ..errors import InvalidArgumentError, ModelNotFoundError
from ..loading.components import ComponentSpec, load_component, parse_dtype
from ..loading.configs import dataclass_from_dict, read_json, require
from ..loading.keymaps.taesd import taesd_decoder_keymap, taesd_encoder_keymap, taesd_keymap
from ..loading.weights import assign_weights, read_safetensors, remap_weights
from .layers import Conv2d

ACTIVATIONS = ("relu", "silu", "swish", "gelu", "mish")
UPSAMPLE_MODES = ("nearest",)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@dataclass(frozen=True)
class TAESDConfig:
    """Fields of a diffusers ``AutoencoderTiny`` ``config.json`` (defaults as diffusers, which are TAESD's).

    Attributes:
        in_channels, out_channels: image channels (3).
        encoder_block_out_channels, decoder_block_out_channels: channels per stage; diffusers chains stages without
            channel projections, so all entries of each tuple must be equal.
        num_encoder_blocks, num_decoder_blocks: residual blocks per stage (same length as the channel tuples).
        act_fn: activation inside the blocks and after the decoder's first convolution (``relu`` for TAESD;
            ``silu``/``swish``, ``gelu`` (exact), ``mish`` also accepted, as diffusers' ``get_activation``).
        upsample_fn: only ``"nearest"`` (any other interpolation -> ConfigError).
        upsampling_scaling_factor: integer upsampling factor of the decoder stages (2).
        latent_channels: 4.
        latent_magnitude, latent_shift: 8-bit latent storage format (see ``scale_latents``).
        scaling_factor, shift_factor: pipeline latent scaling (``1.0`` and ``0.0`` for TAESD; not used inside).
        force_upcast: read for completeness; diffusers always registers ``False`` for AutoencoderTiny.
    """

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_magnitude: float = 3
    latent_shift: float = 0.5
    force_upcast: bool = False
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    source: str = field(default="<config>", compare=False, repr=False)

    def __post_init__(self) -> None:
        src = self.source
        for name in ("in_channels", "out_channels", "latent_channels", "upsampling_scaling_factor"):
            v = getattr(self, name)
            require(_positive_int(v), src, f"{name} must be a positive integer, got {v!r}")
        for name in ("encoder_block_out_channels", "decoder_block_out_channels", "num_encoder_blocks",
                     "num_decoder_blocks"):
            v = getattr(self, name)
            require(isinstance(v, (list, tuple)) and len(v) > 0, src, f"{name} must be a non-empty list, got {v!r}")
            ok = all(_positive_int(x) for x in v) if "channels" in name else all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
            require(ok, src, f"{name} must hold {'positive' if 'channels' in name else 'non-negative'} integers, "
                             f"got {v!r}")
            object.__setattr__(self, name, tuple(v))
        require(len(self.encoder_block_out_channels) == len(self.num_encoder_blocks), src,
                "encoder_block_out_channels and num_encoder_blocks must have the same length")
        require(len(self.decoder_block_out_channels) == len(self.num_decoder_blocks), src,
                "decoder_block_out_channels and num_decoder_blocks must have the same length")
        for name in ("encoder_block_out_channels", "decoder_block_out_channels"):
            v = getattr(self, name)
            require(len(set(v)) == 1, src, f"{name} {list(v)} not supported: diffusers' AutoencoderTiny chains its "
                                            f"stages without channel projections, so all entries must be equal")
        require(self.act_fn in ACTIVATIONS, src,
                f"act_fn {self.act_fn!r} not supported; sd_mlx supports {', '.join(ACTIVATIONS)}")
        require(self.upsample_fn in UPSAMPLE_MODES, src,
                f"upsample_fn {self.upsample_fn!r} not supported; sd_mlx supports {', '.join(UPSAMPLE_MODES)}")
        for name in ("latent_magnitude", "latent_shift", "scaling_factor", "shift_factor"):
            v = getattr(self, name)
            require(isinstance(v, (int, float)) and not isinstance(v, bool), src,
                    f"{name} must be a number, got {v!r}")
        require(self.latent_magnitude > 0 and self.scaling_factor > 0, src,
                "latent_magnitude and scaling_factor must be positive")
        require(isinstance(self.force_upcast, bool), src, f"force_upcast must be true/false, got "
                                                          f"{self.force_upcast!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> "TAESDConfig":
        """Build from a diffusers ``AutoencoderTiny`` ``config.json`` mapping.

        Raises:
            ConfigError: ``_class_name`` names another class; a value of the wrong type; or one sd_mlx does not
                support (``upsample_fn`` other than nearest, unknown ``act_fn``, unequal stage channels); the
                message names ``source`` and the field.
        """
        cls_name = d.get("_class_name")
        require(cls_name in (None, "AutoencoderTiny"), source,
                f"_class_name is {cls_name!r}; a TAESD folder holds an AutoencoderTiny config")
        data = {k: v for k, v in d.items() if k != "source"}
        data["source"] = source
        return dataclass_from_dict(cls, data, source=source)

    @property
    def downscale_factor(self) -> int:
        """Pixel size of one latent: ``2 ** (len(encoder stages) - 1)`` (8 for TAESD)."""
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @property
    def upscale_factor(self) -> int:
        """Decoder upsampling: ``upsampling_scaling_factor ** (len(decoder stages) - 1)`` (8 for TAESD)."""
        return self.upsampling_scaling_factor ** (len(self.decoder_block_out_channels) - 1)


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name in ("silu", "swish"):
        return nn.SiLU()
    if name == "gelu":
        return nn.GELU()  # exact (erf) GELU, as torch.nn.GELU()
    if name == "mish":
        return nn.Mish()
    raise InvalidArgumentError(f"activation {name!r} not supported")


def _conv3x3(cin: int, cout: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    # Conv2d's CPU taps path: at 512x512 MLX's unfolded 3x3 input is 604 MB per 64-channel convolution.
    return Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=bias, taps=True)


class NearestUpsample(nn.Module):
    """Nearest-neighbour upsampling by an integer factor (``torch.nn.Upsample(scale_factor, mode="nearest")``).

    Call: ``(B, H, W, C) -> (B, H * factor, W * factor, C)``, same dtype.
    """

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        f = self.factor
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, f, w, f, c))
        return x.reshape(b, h * f, w * f, c)


class TinyBlock(nn.Module):
    """Residual block of TAESD (diffusers ``AutoencoderTinyBlock``).

    ``relu(conv.4(act(conv.2(act(conv.0(x))))) + skip(x))``; ``skip`` is a bias-free 1x1 convolution only when
    ``in_channels != out_channels``. Call: ``(B, H, W, in_channels) -> (B, H, W, out_channels)``.
    """

    def __init__(self, in_channels: int, out_channels: int, act_fn: str) -> None:
        super().__init__()
        self.conv = [_conv3x3(in_channels, out_channels), _activation(act_fn),
                     _conv3x3(out_channels, out_channels), _activation(act_fn),
                     _conv3x3(out_channels, out_channels)]
        self.has_skip = in_channels != out_channels
        if self.has_skip:
            self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        h = x
        for layer in self.conv:
            h = layer(h)
        return nn.relu(h + (self.skip(x) if self.has_skip else x))


class TinyEncoder(nn.Module):
    """diffusers ``EncoderTiny``: ``(B, H, W, in_channels)`` in ``[-1, 1]`` -> raw latents
    ``(B, ceil(H / f), ceil(W / f), latent_channels)``, ``f = config.downscale_factor``."""

    def __init__(self, config: TAESDConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        chans = config.encoder_block_out_channels
        for i, n in enumerate(config.num_encoder_blocks):
            c = chans[i]
            layers.append(_conv3x3(config.in_channels, c) if i == 0 else _conv3x3(c, c, stride=2, bias=False))
            layers.extend(TinyBlock(c, c, config.act_fn) for _ in range(n))
        layers.append(_conv3x3(chans[-1], config.latent_channels))
        self.layers = layers

    def __call__(self, x: mx.array) -> mx.array:
        x = (x + 1) / 2
        for layer in self.layers:
            x = layer(x)
        return x


class TinyDecoder(nn.Module):
    """diffusers ``DecoderTiny``: latents ``(B, h, w, latent_channels)`` -> image ``(B, h * f, w * f, out_channels)``
    roughly in ``[-1, 1]`` (not clamped), ``f = config.upscale_factor``."""

    def __init__(self, config: TAESDConfig) -> None:
        super().__init__()
        chans = config.decoder_block_out_channels
        layers: list[nn.Module] = [_conv3x3(config.latent_channels, chans[0]), _activation(config.act_fn)]
        last = len(chans) - 1
        for i, n in enumerate(config.num_decoder_blocks):
            c = chans[i]
            layers.extend(TinyBlock(c, c, config.act_fn) for _ in range(n))
            if i != last:
                layers.append(NearestUpsample(config.upsampling_scaling_factor))
            layers.append(_conv3x3(c, config.out_channels if i == last else c, bias=i == last))
        self.layers = layers

    def __call__(self, z: mx.array) -> mx.array:
        x = mx.tanh(z / 3) * 3
        for layer in self.layers:
            x = layer(x)
        return x * 2 - 1


class AutoencoderTiny(nn.Module):
    """TAESD autoencoder (diffusers ``AutoencoderTiny``), NHWC.

    Args:
        config: a :class:`TAESDConfig`.
        encoder, decoder: build that half (a decode-only TAESD has ``encoder=False``).

    Attributes:
        config, encoder (``TinyEncoder`` or absent), decoder (``TinyDecoder`` or absent).
    """

    def __init__(self, config: TAESDConfig, *, encoder: bool = True, decoder: bool = True) -> None:
        super().__init__()
        if not (encoder or decoder):
            raise InvalidArgumentError("AutoencoderTiny needs an encoder, a decoder or both")
        self.config = config
        self.has_encoder = encoder
        self.has_decoder = decoder
        if encoder:
            self.encoder = TinyEncoder(config)
        if decoder:
            self.decoder = TinyDecoder(config)

    # Activation dtype; ``None`` means the parameter dtype (see ``UNet2DConditionModel.compute_dtype``).
    compute_dtype: mx.Dtype | None = None

    @property
    def dtype(self) -> mx.Dtype:
        """Activation dtype: ``compute_dtype`` when set, else the parameter dtype."""
        part = self.encoder if self.has_encoder else self.decoder
        return self.compute_dtype or part.layers[0].weight.dtype

    def _check(self, x: Any, channels: int, what: str) -> mx.array:
        # numpy or mx.array of real numbers, (B, H, W, channels), as an mx.array in the activation dtype
        return float_array(x, f"TAESD {what} input", ("B", "H", "W", channels), layout="NHWC", dtype=self.dtype)

    def encode(self, x: mx.array) -> mx.array:
        """Encode images to raw TAESD latents (diffusers ``AutoencoderTiny.encode(x).latents``).

        Args:
            x: ``(B, H, W, in_channels)`` images in ``[-1, 1]`` (any float dtype; cast to the parameter dtype).

        Returns:
            ``(B, ceil(H / 8), ceil(W / 8), latent_channels)`` latents in the parameter dtype, unscaled
            (``scaling_factor`` is 1.0; not clamped).

        Raises:
            InvalidArgumentError: wrong shape, or the model was loaded without an encoder.
        """
        if not self.has_encoder:
            raise InvalidArgumentError("this TAESD was loaded decoder-only (no taesd_encoder.safetensors); load "
                                       "a folder with the encoder weights to encode images")
        return self.encoder(self._check(x, self.config.in_channels, "encode"))

    def decode(self, latents: mx.array) -> mx.array:
        """Decode TAESD latents to images (diffusers ``AutoencoderTiny.decode(z).sample``).

        Args:
            latents: ``(B, h, w, latent_channels)`` raw latents (``pipeline latents / scaling_factor``); they are
                soft-clamped with ``tanh(z / 3) * 3`` first.

        Returns:
            ``(B, 8h, 8w, out_channels)`` images, nominally in ``[-1, 1]`` (not clamped), parameter dtype.

        Raises:
            InvalidArgumentError: wrong shape, or the model was loaded without a decoder.
        """
        if not self.has_decoder:
            raise InvalidArgumentError("this TAESD was loaded encoder-only (no taesd_decoder.safetensors); load "
                                       "a folder with the decoder weights to decode latents")
        return self.decoder(self._check(latents, self.config.latent_channels, "decode"))

    def scale_latents(self, latents: mx.array) -> mx.array:
        """Raw latents -> ``[0, 1]``: ``clip(z / (2 * latent_magnitude) + latent_shift, 0, 1)`` (diffusers
        ``scale_latents``; the 8-bit storage format). Any shape, same dtype."""
        return mx.clip(latents / (2 * self.config.latent_magnitude) + self.config.latent_shift, 0.0, 1.0)

    def unscale_latents(self, x: mx.array) -> mx.array:
        """``[0, 1]`` -> raw latents: ``(x - latent_shift) * 2 * latent_magnitude`` (diffusers ``unscale_latents``)."""
        return (x - self.config.latent_shift) * (2 * self.config.latent_magnitude)

    def __call__(self, x: mx.array) -> mx.array:
        """Round trip as diffusers' ``AutoencoderTiny.forward``: encode, store latents as 8-bit
        (``round(scale_latents(z) * 255) / 255``), unscale, decode. ``(B, H, W, 3)`` in ``[-1, 1]`` -> same."""
        z = self.encode(x)
        q = mx.round(self.scale_latents(z) * 255).astype(mx.uint8)
        return self.decode(self.unscale_latents(q.astype(mx.float32) / 255.0))


TAESD_SPEC = ComponentSpec(
    config_from_dict=TAESDConfig.from_dict,
    build=AutoencoderTiny,
    keymap=taesd_keymap,
    weight_stem="diffusion_pytorch_model",
)
"""How to load a diffusers-format TAESD folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)."""


def _load_part(model: AutoencoderTiny, part: str, path: Path, keymap, dtype: mx.Dtype) -> None:
    weights = read_safetensors(path)
    mapped = remap_weights(weights, keymap, source=str(path))
    prefix = part + "."
    sub = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in mapped.items()}
    assign_weights(getattr(model, part), sub, source=str(path), dtype=dtype)


def load_taesd(path: Path | str, dtype: str | mx.Dtype = "float32", *, name: str = "taesd") -> AutoencoderTiny:
    """Load a TAESD (tiny autoencoder) from either weight layout.

    Args:
        path: one of
            - a diffusers folder with ``config.json`` (``AutoencoderTiny``) and
              ``diffusion_pytorch_model[.fp16].safetensors`` (e.g. ``madebyollin/taesd`` downloaded);
            - a folder with the original ``{name}_encoder.safetensors`` and/or ``{name}_decoder.safetensors``
              (default config; a ``config.json`` there is used if present); with only the decoder file the model is
              decode-only;
            - one original ``*_decoder.safetensors`` (decode-only) or ``*_encoder.safetensors`` (encode-only) file.
        dtype: ``"float32" | "float16" | "bfloat16"``; weights are cast to it (TAESD files are often bf16).
        name: file prefix of the original layout in a folder, e.g. ``"taesdxl"`` for SDXL's TAESD.

    Returns:
        :class:`AutoencoderTiny`, weights assigned (strictly: every parameter of the built halves, no extra keys),
        ``eval()`` mode.

    Raises:
        ModelNotFoundError: ``path`` does not exist or holds neither layout (the message lists what to put there).
        ConfigError: a bad ``config.json``. WeightLoadError: missing/unknown keys, wrong shapes, NaN, corrupt file.
        InvalidArgumentError: bad ``dtype``.
    """
    path = Path(path).expanduser()
    mx_dtype = parse_dtype(dtype)
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("diffusion_pytorch_model*.safetensors")):
        return load_component(path, TAESD_SPEC, dtype=mx_dtype)

    if path.is_file():
        folder = path.parent
        enc = path if path.name.endswith("_encoder.safetensors") else None
        dec = path if path.name.endswith("_decoder.safetensors") else None
        if enc is None and dec is None:
            raise ModelNotFoundError(f"{path}: not a TAESD weight file; pass a diffusers AutoencoderTiny folder, a "
                                     f"folder with taesd_encoder/decoder.safetensors, or a *_decoder.safetensors")
    elif path.is_dir():
        folder = path
        enc = path / f"{name}_encoder.safetensors"
        dec = path / f"{name}_decoder.safetensors"
        enc = enc if enc.is_file() else None
        dec = dec if dec.is_file() else None
        if enc is None and dec is None:
            found = sorted(p.name for p in path.glob("*_decoder.safetensors"))
            hint = f" (found {', '.join(found)}; pass name=... or the file)" if found else ""
            raise ModelNotFoundError(f"{path}: no TAESD weights: expected config.json + "
                                     f"diffusion_pytorch_model.safetensors, or {name}_encoder.safetensors / "
                                     f"{name}_decoder.safetensors{hint}")
    else:
        raise ModelNotFoundError(f"{path}: no such TAESD folder or file")

    cfg_path = folder / "config.json"
    config = TAESDConfig.from_dict(read_json(cfg_path), str(cfg_path)) if cfg_path.is_file() else TAESDConfig()
    model = AutoencoderTiny(config, encoder=enc is not None, decoder=dec is not None)
    if enc is not None:
        _load_part(model, "encoder", enc, taesd_encoder_keymap, mx_dtype)
    if dec is not None:
        _load_part(model, "decoder", dec, taesd_decoder_keymap, mx_dtype)
    model.eval()
    return model
