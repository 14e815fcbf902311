"""Weight quantization of the U-Net and text encoder with ``mlx.nn.quantize``.

Linear layers (attention projections, feed-forwards, time embedding, ``proj_in``/``proj_out`` when linear) whose
input size is a multiple of the group size are replaced by ``nn.QuantizedLinear`` (affine, ``bits`` per weight,
one scale and bias per ``group_size`` weights). Convolutions, norms and embeddings stay as they are: they hold
little of the U-Net's weight and are the most sensitive to rounding.
"""

from __future__ import annotations

import mlx.nn as nn

from .errors import InvalidArgumentError


def quantize_model(model: nn.Module, *, bits: int, group_size: int = 64) -> nn.Module:
    """Quantize ``model``'s eligible ``nn.Linear`` layers in place and return it.

    Args:
        model: a loaded MLX module (weights assigned).
        bits: 4 or 8.
        group_size: 32, 64 or 128; layers whose input size is not a multiple of it are left in full precision.

    Raises:
        InvalidArgumentError: unsupported ``bits`` or ``group_size``.
    """
    if bits not in (4, 8):
        raise InvalidArgumentError(f"quantization bits must be 4 or 8, got {bits!r}")
    if group_size not in (32, 64, 128):
        raise InvalidArgumentError(f"quantization group size must be 32, 64 or 128, got {group_size!r}")

    def eligible(path: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=eligible)
    return model
