"""Key maps for TAESD (tiny autoencoder) weights -> :class:`sd_mlx.models.taesd.AutoencoderTiny`.

The MLX module tree uses diffusers' ``AutoencoderTiny`` names (``encoder.layers.{i}...``,
``decoder.layers.{i}...``, blocks with ``conv.{0,2,4}`` and ``skip``). Two checkpoint layouts are read:

- **diffusers** (``diffusion_pytorch_model.safetensors``): keys are already ``encoder.layers.*`` /
  ``decoder.layers.*``; see :func:`taesd_keymap`.
- **original** (madebyollin's ``taesd_encoder.safetensors`` / ``taesd_decoder.safetensors``, also the ``taesdxl_``
  ones): each file is one ``nn.Sequential``; keys are ``"{i}.weight"``, ``"{i}.conv.{j}.weight"``. The encoder's
  indices equal diffusers' ``encoder.layers`` indices; the decoder's Sequential starts with a parameterless clamp
  module, so original index ``i`` is diffusers' ``decoder.layers.{i - 1}``; see :func:`taesd_encoder_keymap` and
  :func:`taesd_decoder_keymap`.

Array layouts: PyTorch convolution kernels ``(O, I, kh, kw)`` become MLX ``(O, kh, kw, I)`` (also the 1x1 ``skip``
kernels, which stay convolutions here); biases pass through. Missing or unknown keys are caught by
:func:`sd_mlx.loading.weights.assign_weights`.
"""

from __future__ import annotations

import mlx.core as mx

from .unet import kernel_to_mlx


def conv_kernel(value: mx.array) -> mx.array:
    """A PyTorch conv kernel ``(O, I, kh, kw)`` as an MLX one ``(O, kh, kw, I)``, stored contiguously (see
    :func:`sd_mlx.loading.keymaps.unet.kernel_to_mlx`); other arrays unchanged."""
    return kernel_to_mlx(value) if value.ndim == 4 else value


def taesd_keymap(key: str, value: mx.array) -> list[tuple[str, mx.array]]:
    """Map one diffusers ``AutoencoderTiny`` entry to ``[(mlx_key, array)]`` (same key, MLX kernel layout)."""
    return [(key, conv_kernel(value))]


def _split_index(key: str) -> tuple[int, str] | None:
    head, sep, rest = key.partition(".")
    if not sep or not head.isdigit():
        return None
    return int(head), rest


def taesd_encoder_keymap(key: str, value: mx.array) -> list[tuple[str, mx.array]]:
    """Map one entry of an original ``taesd_encoder.safetensors`` (``"{i}.rest"``) to ``encoder.layers.{i}.rest``.

    A key that is not ``"{int}.{rest}"`` is passed through unchanged, so the strict assignment reports it as
    unknown.
    """
    parsed = _split_index(key)
    if parsed is None:
        return [(key, value)]
    i, rest = parsed
    return [(f"encoder.layers.{i}.{rest}", conv_kernel(value))]


def taesd_decoder_keymap(key: str, value: mx.array) -> list[tuple[str, mx.array]]:
    """Map one entry of an original ``taesd_decoder.safetensors`` (``"{i}.rest"``) to ``decoder.layers.{i-1}.rest``.

    The original decoder's index 0 is the parameterless ``tanh`` clamp, so indices shift down by one. A key that is
    not ``"{int}.{rest}"`` with ``int >= 1`` is passed through unchanged (reported as unknown by the assignment).
    """
    parsed = _split_index(key)
    if parsed is None or parsed[0] < 1:
        return [(key, value)]
    i, rest = parsed
    return [(f"decoder.layers.{i - 1}.{rest}", conv_kernel(value))]
