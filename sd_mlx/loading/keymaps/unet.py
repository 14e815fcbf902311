"""Key map from a diffusers ``UNet2DConditionModel`` state dict to :class:`sd_mlx.models.unet.UNet2DConditionModel`.

The MLX module tree uses diffusers' names, so keys are unchanged; only array layouts change:

- 3x3 convolution kernels ``(O, I, kh, kw)`` become ``(O, kh, kw, I)`` (MLX NHWC convolutions);
- 1x1 convolution kernels ``(O, I, 1, 1)`` (``proj_in``/``proj_out`` of SD 1.x transformers, ``conv_shortcut``)
  become ``(O, I)``: sd_mlx implements every 1x1 convolution as a Linear layer on the channel axis.

Everything else (Linear weights, biases, norm parameters) passes through. Unknown or missing keys are caught
later by :func:`sd_mlx.loading.weights.assign_weights`.
"""

from __future__ import annotations

import mlx.core as mx


def kernel_to_mlx(value: mx.array) -> mx.array:
    """A PyTorch conv kernel ``(O, I, kh, kw)`` as MLX's ``(O, kh, kw, I)``, stored contiguously.

    Written as ``(O, I, kh*kw) -> (O, kh*kw, I)``: MLX's CPU copy runs that 3-D transpose about 5x faster than the
    4-D ``transpose(0, 2, 3, 1)`` (measured: 118 MB kernel 0.12 -> 0.025 s).
    """
    o, i, kh, kw = value.shape
    return mx.contiguous(value.reshape(o, i, kh * kw).swapaxes(1, 2)).reshape(o, kh, kw, i)


def conv_weight(value: mx.array) -> mx.array:
    """A PyTorch conv kernel ``(O, I, kh, kw)`` in MLX layout: ``(O, I)`` when 1x1, else ``(O, kh, kw, I)``
    stored contiguously (:func:`kernel_to_mlx`; a transposed view would be copied by every convolution that uses
    it: measured +30% time and +118 MB working memory for SD1.5's 2560 -> 1280 up-block convolution); arrays that
    are not 4-D are returned unchanged."""
    if value.ndim != 4:
        return value
    if value.shape[2] == 1 and value.shape[3] == 1:
        return value.reshape(value.shape[0], value.shape[1])
    return kernel_to_mlx(value)


def unet_keymap(key: str, value: mx.array) -> list[tuple[str, mx.array]]:
    """Map one diffusers U-Net checkpoint entry to ``[(mlx_key, array)]`` (same key, MLX layout)."""
    return [(key, conv_weight(value))]
