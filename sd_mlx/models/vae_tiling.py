"""Tiled decoding and encoding for the KL VAE, following diffusers' ``AutoencoderKL`` tiling (``enable_tiling``,
``tiled_decode``, ``_tiled_encode``, ``blend_v``, ``blend_h``).

Why: the VAE decoder's activations at full image resolution dominate the memory of a generation (see
:func:`estimate_decode_peak_bytes`). Cutting the latents into overlapping tiles, decoding each tile on its own and
cross-fading the overlaps bounds the peak by one tile's activations plus the output image. Measured on MLX's CPU
backend, SD 1.5 VAE, float32, 1024x1024 output: untiled peak 38.8 GiB, tiled (512-pixel tiles) 9.6 GiB.

The geometry and blending are diffusers' (same tiles, same crops, same weights), so the result equals diffusers'
``vae.enable_tiling(); vae.decode(z)`` / ``vae.encode(x)`` on the same weights (tested to 1e-4 in float32). With
``S`` the tile size in image pixels, ``T`` the tile size in latents and ``p`` the overlap factor:

* decode: tiles ``z[i:i+T, j:j+T]`` for ``i, j`` on a grid of step ``int(T * (1 - p))`` latents; each decoded
  tile is blended into the (already blended) tile above and to its left over ``int(S * p)`` pixels, then cropped
  to its first ``S - int(S * p)`` rows and columns;
* encode: tiles ``x[i:i+S, j:j+S]`` on a grid of step ``int(S * (1 - p))`` pixels; blends over ``int(T * p)``
  latents, crops to ``T - int(T * p)``.

The blend over an extent ``e = min(e_max, height of the tile above, height of this tile)`` is, for row ``y < e``::

    tile[y] = above[y - e] * (1 - y / e) + tile[y] * (y / e)

(and the same along columns with the tile on the left). Defaults as diffusers: ``S = config.sample_size`` (the
first entry when it is a list), ``T = int(S / vae_scale_factor)``, ``p = 0.25``. Tiling is not the same maths
as a plain decode (each tile sees only its own context); it trades small seams for memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from ..errors import InvalidArgumentError
from .vae import AutoencoderKL, DiagonalGaussianDistribution, VAEConfig

DEFAULT_OVERLAP = 0.25  # diffusers' AutoencoderKL.tile_overlap_factor


@dataclass(frozen=True)
class TileGeometry:
    """Tile sizes of diffusers' VAE tiling.

    Attributes:
        sample_size: ``S``, tile side in image pixels (diffusers ``tile_sample_min_size``).
        latent_size: ``T``, tile side in latents (diffusers ``tile_latent_min_size``).
        overlap: ``p``, fraction of a tile shared with its neighbour (diffusers ``tile_overlap_factor``).
    """

    sample_size: int
    latent_size: int
    overlap: float

    @property
    def decode_stride(self) -> int:
        """Step between decode tiles, in latents: ``int(T * (1 - p))``."""
        return int(self.latent_size * (1 - self.overlap))

    @property
    def decode_blend(self) -> int:
        """Largest cross-fade of decoded tiles, in pixels: ``int(S * p)``."""
        return int(self.sample_size * self.overlap)

    @property
    def decode_keep(self) -> int:
        """Rows/columns of each blended decoded tile that go to the output: ``S - int(S * p)``."""
        return self.sample_size - self.decode_blend

    @property
    def encode_stride(self) -> int:
        """Step between encode tiles, in pixels: ``int(S * (1 - p))``."""
        return int(self.sample_size * (1 - self.overlap))

    @property
    def encode_blend(self) -> int:
        """Largest cross-fade of encoded tiles, in latents: ``int(T * p)``."""
        return int(self.latent_size * self.overlap)

    @property
    def encode_keep(self) -> int:
        """Rows/columns of each blended encoded tile that go to the output: ``T - int(T * p)``."""
        return self.latent_size - self.encode_blend


def tile_geometry(config: VAEConfig, tile_latent_size: int | None = None,
                  overlap: float = DEFAULT_OVERLAP) -> TileGeometry:
    """The tile geometry for a VAE config.

    Args:
        config: the VAE config (``sample_size``, ``block_out_channels``).
        tile_latent_size: tile side in latents; ``None`` gives diffusers' default ``int(S / f)`` with
            ``S = config.sample_size`` (first entry of a list) and ``f = 2 ** (len(block_out_channels) - 1)``.
            When given, ``S = tile_latent_size * f``.
        overlap: overlap factor ``p`` in ``[0, 1)`` (diffusers' default 0.25).

    Returns:
        The :class:`TileGeometry`.

    Raises:
        InvalidArgumentError: ``tile_latent_size < 1``, ``overlap`` outside ``[0, 1)``, a tile so small that a
            stride or a kept crop would be empty, or an overlap that is not a whole number of latents (``T * p``
            not an integer: diffusers then stitches an output of the wrong size).
    """
    f = 2 ** (len(config.block_out_channels) - 1)
    if not isinstance(overlap, (int, float)) or isinstance(overlap, bool) or not 0.0 <= overlap < 1.0:
        raise InvalidArgumentError(f"VAE tiling overlap={overlap!r} must be a number in [0, 1)")
    if tile_latent_size is None:
        ss = config.sample_size
        sample = int(ss[0] if isinstance(ss, (list, tuple)) else ss)
        latent = int(sample / f)
    else:
        if not isinstance(tile_latent_size, int) or isinstance(tile_latent_size, bool) or tile_latent_size < 1:
            raise InvalidArgumentError(f"tile_latent_size={tile_latent_size!r} must be a positive int")
        latent, sample = tile_latent_size, tile_latent_size * f
    geo = TileGeometry(sample_size=sample, latent_size=latent, overlap=float(overlap))
    if min(geo.decode_stride, geo.encode_stride, geo.decode_keep, geo.encode_keep, latent) < 1:
        raise InvalidArgumentError(
            f"VAE tiles of {latent} latents ({sample} pixels) with overlap {overlap} are too small: use a larger "
            f"tile_latent_size or a smaller overlap")
    if geo.decode_stride * f != geo.decode_keep or geo.encode_stride != geo.encode_keep * f:
        # diffusers accepts these and returns images/latents of the wrong size; refuse them instead
        raise InvalidArgumentError(
            f"VAE tiles of {latent} latents with overlap {overlap} do not stitch to the input size (the overlap "
            f"must be a whole number of latents): use e.g. overlap={int(latent * overlap) / latent}")
    return geo


def _ramp(n: int, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    """``(1 - y / n, y / n)`` for ``y = 0..n-1`` (computed in float64 then cast, as PyTorch does with Python
    scalars), shaped ``(n,)``."""
    w = np.arange(n, dtype=np.float64) / n
    return mx.array((1.0 - w).astype(np.float32)).astype(dtype), mx.array(w.astype(np.float32)).astype(dtype)


def _blend_rows(above_tail: mx.array, tile: mx.array, extent: int) -> mx.array:
    """Cross-fade the first rows of ``tile`` (B, H, W, C) with the last rows of ``above_tail`` (diffusers
    ``blend_v``); ``above_tail`` holds at least the last ``min(extent, its height)`` rows of the tile above."""
    e = min(above_tail.shape[1], tile.shape[1], extent)
    if e <= 0:
        return tile
    w_old, w_new = _ramp(e, tile.dtype)
    head = above_tail[:, -e:] * w_old[:, None, None] + tile[:, :e] * w_new[:, None, None]
    return mx.concatenate([head, tile[:, e:]], axis=1)


def _blend_cols(left_tail: mx.array, tile: mx.array, extent: int) -> mx.array:
    """Cross-fade the first columns of ``tile`` (B, H, W, C) with the last columns of ``left_tail`` (diffusers
    ``blend_h``)."""
    e = min(left_tail.shape[2], tile.shape[2], extent)
    if e <= 0:
        return tile
    w_old, w_new = _ramp(e, tile.dtype)
    head = left_tail[:, :, -e:] * w_old[:, None] + tile[:, :, :e] * w_new[:, None]
    return mx.concatenate([head, tile[:, :, e:]], axis=2)


def _tiled_map(x: mx.array, fn: Callable[[mx.array], mx.array], *, tile: int, stride: int, blend: int,
               keep: int) -> mx.array:
    """Apply ``fn`` to overlapping ``tile x tile`` windows of ``x`` (B, H, W, C) on a grid of step ``stride``,
    blend each result with its (blended) upper and left neighbours over ``blend`` rows/columns, crop to
    ``keep x keep`` and stitch. Each tile is evaluated before the next one is computed; only the strips needed for
    blending (``blend`` rows of the previous tile row, ``blend`` columns of the previous tile) are kept."""
    height, width = x.shape[1], x.shape[2]
    strips: list[mx.array] = []
    above_tails: list[mx.array] = []  # per column: last `blend` rows of the blended tile above
    for i in range(0, height, stride):
        pieces: list[mx.array] = []
        row_tails: list[mx.array] = []
        left_tail: mx.array | None = None
        for col, j in enumerate(range(0, width, stride)):
            out = fn(x[:, i:i + tile, j:j + tile])
            if above_tails:
                out = _blend_rows(above_tails[col], out, blend)
            if left_tail is not None:
                out = _blend_cols(left_tail, out, blend)
            bottom, left_tail, piece = out[:, -blend:], out[:, :, -blend:], out[:, :keep, :keep]
            if blend <= 0:
                bottom, left_tail = out[:, :0], out[:, :, :0]
            mx.eval(bottom, left_tail, piece)
            row_tails.append(bottom)
            pieces.append(piece)
            del out
        strip = mx.concatenate(pieces, axis=2)
        mx.eval(strip)
        strips.append(strip)
        above_tails = row_tails
    result = mx.concatenate(strips, axis=1)
    mx.eval(result)
    return result


def tiled_decode(vae: AutoencoderKL, z: mx.array, *, tile_latent_size: int | None = None,
                 overlap: float = DEFAULT_OVERLAP, force: bool = False) -> mx.array:
    """Decode latents tile by tile, as diffusers' ``vae.enable_tiling(); vae.decode(z)`` does.

    Like diffusers, latents that fit in one tile (``h <= T`` and ``w <= T``) are decoded in one go with
    :meth:`AutoencoderKL.decode` unless ``force`` is set (diffusers' ``tiled_decode`` method called directly).
    Each tile goes through ``post_quant_conv`` and the decoder and is evaluated (``mx.eval``) before the next, so
    the peak memory is about one tile's activations plus the output.

    Args:
        vae: the model.
        z: ``(B, h, w, latent_channels)`` unscaled latents (divided by ``scaling_factor`` by the caller), cast to
            ``vae.dtype``.
        tile_latent_size: tile side ``T`` in latents; ``None``: diffusers' default ``sample_size / f`` (64 for SD).
        overlap: overlap factor in ``[0, 1)`` (default 0.25, diffusers').
        force: tile even when the latents fit in one tile.

    Returns:
        ``(B, H, W, out_channels)`` images in ``vae.dtype``, nominally in ``[-1, 1]``; ``H = f h`` and
        ``W = f w`` for the default geometry (in general the sum of the kept crops, as in diffusers).

    Raises:
        InvalidArgumentError: ``z`` is not 4-D, or the tile geometry is invalid (see :func:`tile_geometry`).
    """
    if z.ndim != 4:
        raise InvalidArgumentError(f"tiled_decode expects latents (B, h, w, C), got shape {tuple(z.shape)}")
    geo = tile_geometry(vae.config, tile_latent_size, overlap)
    if not force and z.shape[1] <= geo.latent_size and z.shape[2] <= geo.latent_size:
        out = vae.decode(z)
        mx.eval(out)
        return out
    return _tiled_map(z, vae.decode, tile=geo.latent_size, stride=geo.decode_stride, blend=geo.decode_blend,
                      keep=geo.decode_keep)


def tiled_encode_moments(vae: AutoencoderKL, x: mx.array, *, tile_latent_size: int | None = None,
                         overlap: float = DEFAULT_OVERLAP, force: bool = False) -> mx.array:
    """Encoder moments computed tile by tile, as diffusers' ``vae.enable_tiling(); vae.encode(x)`` does
    (``_tiled_encode``): blended mean and log-variance before the clamp of the posterior.

    Like diffusers, images that fit in one tile (``H <= S`` and ``W <= S``) are encoded in one go unless
    ``force`` is set. Each tile is evaluated before the next.

    Args:
        vae: the model.
        x: ``(B, H, W, in_channels)`` images in ``[-1, 1]``, cast to ``vae.dtype``.
        tile_latent_size: tile side ``T`` in latents (tile side in pixels ``S = T f``); ``None``: diffusers'
            default (``S = sample_size``).
        overlap: overlap factor in ``[0, 1)`` (default 0.25).
        force: tile even when the image fits in one tile.

    Returns:
        ``(B, h, w, 2 * latent_channels)`` moments (mean channels, then log-variance channels), in ``vae.dtype``;
        ``h = H / f`` when ``H`` is a multiple of ``f`` (otherwise each tile's size is floored, as in diffusers).

    Raises:
        InvalidArgumentError: ``x`` is not 4-D, or the tile geometry is invalid.
    """
    if x.ndim != 4:
        raise InvalidArgumentError(f"tiled_encode expects images (B, H, W, C), got shape {tuple(x.shape)}")
    geo = tile_geometry(vae.config, tile_latent_size, overlap)
    if not force and x.shape[1] <= geo.sample_size and x.shape[2] <= geo.sample_size:
        out = vae.encode_moments(x)
        mx.eval(out)
        return out
    return _tiled_map(x, vae.encode_moments, tile=geo.sample_size, stride=geo.encode_stride,
                      blend=geo.encode_blend, keep=geo.encode_keep)


def tiled_encode(vae: AutoencoderKL, x: mx.array, *, tile_latent_size: int | None = None,
                 overlap: float = DEFAULT_OVERLAP, force: bool = False) -> DiagonalGaussianDistribution:
    """Encode images tile by tile to the latent posterior (diffusers' tiled ``AutoencoderKL.encode``).

    Same arguments and errors as :func:`tiled_encode_moments`; returns the
    :class:`~sd_mlx.models.vae.DiagonalGaussianDistribution` of the blended moments (``mean``/``logvar``
    ``(B, h, w, latent_channels)``, unscaled).
    """
    return DiagonalGaussianDistribution(tiled_encode_moments(vae, x, tile_latent_size=tile_latent_size,
                                                             overlap=overlap, force=force))


# ---------------------------------------------------------------------------------------------------------------
# Memory estimate

ACTIVATION_FACTOR = 40.0
"""Bytes per output pixel of an untiled decode, in units of ``channels * dtype_bytes`` (see
:func:`estimate_decode_peak_bytes`); calibrated on MLX's CPU backend, whose 3x3 convolutions unfold their input
(``9 * C_in`` values a pixel)."""

ATTENTION_FACTOR = 3.0
"""Copies of the ``(h w) x (h w)`` attention score matrix alive at once in the mid-block (scores, softmax)."""


def estimate_decode_peak_bytes(height: int, width: int, batch: int = 1, *, config: VAEConfig | None = None,
                               dtype_bytes: int = 4) -> int:
    """Estimated extra memory (beyond the weights) of an untiled VAE decode, in bytes.

    Formula, with ``H x W`` the output image, ``f`` the VAE factor, ``c = block_out_channels[1]`` (the channel
    count of the tensors at full resolution: the last upsampler's output and the last up block's input; 256 for
    SD, ``block_out_channels[0]`` for a one-level VAE), and ``b`` = ``dtype_bytes``::

        peak = batch * b * (ACTIVATION_FACTOR * H * W * c  +  ATTENTION_FACTOR * (H W / f^2)^2)

    The first term is the full-resolution level (a 3x3 convolution there unfolds ``9 c`` values a pixel, and a
    few ``c``-channel tensors are alive around it); ``ACTIVATION_FACTOR = 40`` was fitted to ``mx.get_peak_memory``
    of untiled decodes on MLX's CPU backend (SD 1.5 VAE at 128x128, 256x256 and 1024x1024: 36 to 39 with the
    attention term included; a (16, 32, 32, 32) VAE at 512x512: 36), so the estimate was ~10% above the measured
    peak there (1024x1024 SD: 43.0 GiB estimated, 38.8 GiB measured), and conservative for backends whose
    convolutions do not unfold their input. Since GroupNorm reduces per channel (no transposed temporary), the
    measured factors on a 2-core CPU are lower: SD 1.5 VAE at 128x128 and 256x256 21.5 and 21.2 (27-28 before),
    the small VAE at 512x512 15.3 (21.3 before); the factor is kept, on the safe side, until it is re-fitted at
    1024x1024 (which needs a ~40 GiB machine). The second term is the
    mid-block's single-head attention over the ``h w`` latent pixels (score matrix and its softmax, float32).

    Args:
        height, width: output image size in pixels.
        batch: images decoded together.
        config: the VAE config; ``None`` means SD's (``block_out_channels`` (128, 256, 512, 512)).
        dtype_bytes: bytes per value of the VAE's dtype (4 for float32, 2 for float16/bfloat16).

    Returns:
        The estimate in bytes (an int).
    """
    boc = tuple(config.block_out_channels) if config is not None else (128, 256, 512, 512)
    f = 2 ** (len(boc) - 1)
    c = boc[1] if len(boc) > 1 else boc[0]
    tokens = (height / f) * (width / f)
    attention = ATTENTION_FACTOR * tokens * tokens * 4  # softmax runs in float32
    if config is not None and not config.mid_block_add_attention:
        attention = 0.0
    return int(batch * (ACTIVATION_FACTOR * height * width * c * dtype_bytes + attention))


def should_tile(height: int, width: int, batch: int, memory_limit_bytes: int | None, *,
                config: VAEConfig | None = None, dtype_bytes: int = 4) -> bool:
    """Whether an untiled decode of ``batch`` images of ``height x width`` pixels would exceed
    ``memory_limit_bytes`` according to :func:`estimate_decode_peak_bytes` (so the caller should use
    :func:`tiled_decode`). ``None`` (no limit) gives ``False``.

    Raises:
        InvalidArgumentError: a non-positive size, batch or limit.
    """
    if min(height, width, batch) < 1:
        raise InvalidArgumentError(f"should_tile: height={height}, width={width}, batch={batch} must be >= 1")
    if memory_limit_bytes is None:
        return False
    if memory_limit_bytes <= 0:
        raise InvalidArgumentError(f"memory_limit_bytes={memory_limit_bytes} must be positive")
    return estimate_decode_peak_bytes(height, width, batch, config=config, dtype_bytes=dtype_bytes) \
        > memory_limit_bytes
