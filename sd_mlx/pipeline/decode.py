"""Latents to images: the VAE (or TAESD) decode, batched, tiled when the image would not fit in memory."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from ..errors import InvalidArgumentError, NonFiniteError
from .checks import non_finite_message
from .memory import available_memory_bytes


def want_tiling(vae: Any, tiled_decode: bool | None, latent_shape: tuple[int, ...], batch: int,
                vae_scale_factor: int) -> bool:
    """Whether to decode latents of ``latent_shape`` ``(B, h, w, C)`` in tiles: always (``True``), never
    (``False``), or (``None``) when the untiled decode of ``batch`` images at a time would not fit in the memory
    available (:func:`sd_mlx.models.vae_tiling.should_tile`). Only an ``AutoencoderKL`` decodes tiled.

    Raises:
        InvalidArgumentError: ``tiled_decode`` is not ``True``, ``False`` or ``None``.
    """
    from ..models.vae import AutoencoderKL
    from ..models.vae_tiling import should_tile

    if tiled_decode is not None and not isinstance(tiled_decode, bool):
        raise InvalidArgumentError(f"tiled_decode must be True, False or None, got {tiled_decode!r}")
    if not isinstance(vae, AutoencoderKL) or tiled_decode is False:
        return False
    if tiled_decode:
        return True
    f = vae_scale_factor
    return should_tile(latent_shape[1] * f, latent_shape[2] * f, min(batch, latent_shape[0]),
                       available_memory_bytes(), config=vae.config)


def decode_latents(vae: Any, latents: mx.array, *, batch_size: int = 1, dtype: mx.Dtype = mx.float32,
                   check: bool = False, tiled: bool = False) -> mx.array:
    """Diffusion latents ``(B, h, w, C)`` -> images ``(B, H, W, 3)`` in ``[0, 1]`` float32, ``H = h *
    vae_scale_factor``.

    Decodes ``batch_size`` images at a time: ``vae.decode(latents / scaling_factor + shift_factor)``, then
    ``(x / 2 + 0.5).clip(0, 1)`` as diffusers' image processor does. ``vae`` is any decoder with a ``config`` holding
    ``scaling_factor`` (an ``AutoencoderKL``, or a TAESD for previews); it decodes in its own ``dtype`` attribute
    when it has one, else in ``dtype``. With ``tiled``, an ``AutoencoderKL`` decodes through
    :func:`sd_mlx.models.vae_tiling.tiled_decode`.

    Raises:
        NonFiniteError: with ``check``, when the decoder's output (before clipping) holds NaN or Inf.
    """
    if tiled:
        from ..models.vae_tiling import tiled_decode

        def decode(z: mx.array) -> mx.array:
            return tiled_decode(vae, z)
    else:
        decode = vae.decode
    cfg = vae.config
    scale = float(getattr(cfg, "scaling_factor", 0.18215) or 1.0)
    shift = float(getattr(cfg, "shift_factor", 0.0) or 0.0)
    vae_dtype = getattr(vae, "dtype", None) or dtype
    outs = []
    for s in range(0, latents.shape[0], batch_size):
        z = latents[s:s + batch_size] / scale + shift
        raw = decode(z.astype(vae_dtype)).astype(mx.float32)
        img = mx.clip(raw / 2 + 0.5, 0.0, 1.0)
        if check:
            finite = mx.all(mx.isfinite(raw))
            mx.eval(img, finite)
            if not finite.item():
                raise NonFiniteError(non_finite_message("VAE decoding"))
        else:
            mx.eval(img)
        outs.append(img)
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
