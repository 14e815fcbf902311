"""Key map from a diffusers ``AutoencoderKL`` state dict to :class:`sd_mlx.models.vae.AutoencoderKL`.

Keys are diffusers' current names, with two layout changes (see :func:`sd_mlx.loading.keymaps.unet.conv_weight`):
3x3 kernels ``(O, I, 3, 3)`` -> ``(O, 3, 3, I)``, and 1x1 kernels (``conv_shortcut``, ``quant_conv``,
``post_quant_conv``) ``(O, I, 1, 1)`` -> ``(O, I)`` since sd_mlx implements them as Linear layers.

Checkpoints saved before diffusers 0.14 name the mid-block attention ``query``/``key``/``value``/``proj_attn``;
they are renamed to ``to_q``/``to_k``/``to_v``/``to_out.0`` (as diffusers does when loading). Their weights may be
stored as Linear ``(O, I)`` or as 1x1 conv ``(O, I, 1, 1)`` kernels; both become ``(O, I)``.
"""

from __future__ import annotations

import mlx.core as mx

from .unet import conv_weight

_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_keymap(key: str, value: mx.array) -> list[tuple[str, mx.array]]:
    """Map one diffusers VAE checkpoint entry to ``[(mlx_key, array)]``."""
    parts = key.split(".")
    if len(parts) >= 3 and ".attentions." in key and parts[-2] in _OLD_ATTENTION_NAMES:
        key = ".".join(parts[:-2] + [_OLD_ATTENTION_NAMES[parts[-2]], parts[-1]])
    return [(key, conv_weight(value))]
