"""Weight quantization of the U-Net and text encoder (affine ``mx.quantize``: ``bits`` per weight, one scale and
one offset per ``group_size`` consecutive input weights, as ``mlx.nn.quantize`` does).

- Linear layers (attention projections, feed-forwards, time embedding, ``proj_in``/``proj_out``, 1x1
  convolutions) whose input size is a multiple of the group size become :class:`QuantizedLinear`.
- With ``convolutions=True`` (the default), convolutions whose ``kh * kw * C_in`` is a multiple of the group size
  become :class:`QuantizedConv2d`: the SD1.5 U-Net holds 541 M of its 860 M weights in 3x3 convolutions, so
  quantizing only the linear layers leaves it at 1.26 GB with float16 convolutions, against 0.48 GB with both.
- Norms, embeddings and the layers that do not divide evenly stay in full precision.

How a quantized layer computes is chosen by :func:`sd_mlx.ops.quantized_linear`: on a GPU (and on the portable
path), linear layers use ``mx.quantized_matmul``; with the Linux CPU machinery (where MLX's quantized and
half-precision products are 50-75x slower than float32 BLAS, measured at 8192x1280x1280), each layer's weights are
dequantized as they are used and multiplied in float32, so only one layer's full-precision weight exists at a
time. Convolutions always dequantize their weight first (MLX has no quantized convolution).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from .errors import InvalidArgumentError
from .ops import conv2d, quantized_linear


class QuantizedLinear(nn.QuantizedLinear):
    """``mlx.nn.QuantizedLinear`` (same parameters: packed ``weight``, ``scales``, ``biases``, optional ``bias``)
    whose product is chosen by :func:`sd_mlx.ops.quantized_linear` (dequantized float32 products on the CPU).

    Call: ``(..., input_dims) -> (..., output_dims)``; on the CPU path the result has the promoted dtype of the input
    and the scales (float32 activations stay float32).
    """

    def __call__(self, x: mx.array) -> mx.array:
        return quantized_linear(self, x)


class QuantizedConv2d(nn.Module):
    """A 2-D convolution with quantized weights, made from an ``mlx.nn.Conv2d`` by :meth:`from_conv`.

    Parameters: ``weight`` (packed, ``(O, kh * kw * C_in * bits / 32)`` uint32), ``scales`` and ``biases``
    (``(O, kh * kw * C_in / group_size)``) in the source weight's dtype, optional ``bias`` ``(O,)``. The kernel is
    dequantized to ``(O, kh, kw, C_in)`` at each call (freed after the layer) and applied by
    :func:`sd_mlx.ops.conv2d` with the source layer's ``taps``/``strips`` choice, as
    ``sd_mlx.models.layers.Conv2d`` does.

    Call: ``(B, H, W, C_in) -> (B, H', W', O)``.
    """

    def __init__(self, kernel_shape: tuple[int, int, int, int], *, stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int] | int, group_size: int, bits: int, taps: bool = False,
                 strips: bool = False) -> None:
        super().__init__()
        self.kernel_shape = tuple(kernel_shape)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.group_size, self.bits, self.use_taps, self.use_strips = group_size, bits, taps, strips

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, group_size: int, bits: int) -> "QuantizedConv2d":
        """Quantize ``conv`` (an ``nn.Conv2d`` or ``sd_mlx.models.layers.Conv2d`` with ``groups == 1``).

        Raises:
            InvalidArgumentError: ``kh * kw * C_in`` is not a multiple of ``group_size``, or grouped convolution.
        """
        o, kh, kw, cin = conv.weight.shape
        if (kh * kw * cin) % group_size or getattr(conv, "groups", 1) != 1:
            raise InvalidArgumentError(f"cannot quantize a {kh}x{kw} convolution of {cin} channels with group size "
                                       f"{group_size}")
        q = cls((o, kh, kw, cin), stride=tuple(conv.stride), padding=tuple(conv.padding), dilation=conv.dilation,
                group_size=group_size, bits=bits, taps=bool(getattr(conv, "use_taps", False)),
                strips=bool(getattr(conv, "use_strips", False)))
        q.weight, q.scales, q.biases = mx.quantize(conv.weight.reshape(o, -1), group_size, bits)
        if "bias" in conv:
            q.bias = conv.bias
        return q

    def __call__(self, x: mx.array, *, upsample2x: bool = False) -> mx.array:
        dt = x.dtype if mx.issubdtype(x.dtype, mx.floating) else self.scales.dtype
        w = mx.dequantize(self.weight, self.scales.astype(dt), self.biases.astype(dt), group_size=self.group_size,
                          bits=self.bits)
        return conv2d(x, w.reshape(self.kernel_shape), self["bias"] if "bias" in self else None,
                            stride=self.stride, padding=self.padding, dilation=self.dilation, taps=self.use_taps,
                            strips=self.use_strips, upsample2x=upsample2x)


def quantize_model(model: nn.Module, *, bits: int, group_size: int = 64, convolutions: bool = True,
                   finite_flags: dict[str, mx.array] | None = None) -> nn.Module:
    """Quantize ``model``'s eligible linear (and, with ``convolutions``, convolution) layers in place; return it.

    Args:
        model: a loaded MLX module (weights assigned).
        bits: 4 or 8.
        group_size: 32, 64 or 128; layers whose input size (``kh * kw * C_in`` for convolutions) is not a multiple
            of it are left in full precision.
        convolutions: also quantize convolutions (see the module docstring).
        finite_flags: if given, receives for each quantized layer's path (``"down_blocks.0...to_q"``) a lazy
            boolean scalar, "the float weight had no NaN/Inf" (``mx.quantize`` does not propagate NaN into the
            scales, so a lazily loaded model must be checked on its sources; see
            :func:`sd_mlx.loading.weights.evaluate_parameters`).

    Raises:
        InvalidArgumentError: unsupported ``bits`` or ``group_size``.
    """
    if bits not in (4, 8):
        raise InvalidArgumentError(f"quantization bits must be 4 or 8, got {bits!r}")
    if group_size not in (32, 64, 128):
        raise InvalidArgumentError(f"quantization group size must be 32, 64 or 128, got {group_size!r}")

    def swap(path: str, module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0:
            q: nn.Module = QuantizedLinear.from_linear(module, group_size, bits)
        elif (convolutions and isinstance(module, nn.Conv2d) and getattr(module, "groups", 1) == 1
                and module.weight[0].size % group_size == 0):
            q = QuantizedConv2d.from_conv(module, group_size, bits)
        else:
            return module
        if finite_flags is not None:
            finite_flags[path] = mx.all(mx.isfinite(module.weight))
        return q

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    return model
