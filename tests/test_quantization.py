"""Quantized layers, the CPU convolution path, and half/quantized weights computing in float32 on the CPU.

References: ``mx.conv2d`` for :func:`conv3x3_taps`; ``mlx.nn.QuantizedLinear`` (``mx.quantized_matmul``) for the
CPU dequantize-then-multiply path; the same convolution on the dequantized kernel for :class:`QuantizedConv2d`;
the float32 pipeline for the float16 one computing in float32.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from sd_mlx import load_pipeline
from sd_mlx import ops
from sd_mlx.cpu import conv as cpu_conv
from sd_mlx.errors import InvalidArgumentError
from sd_mlx.models import layers
from sd_mlx.quantization import QuantizedConv2d, QuantizedLinear, quantize_model


@pytest.mark.parametrize("shape", [(2, 64, 64, 8), (1, 7, 5, 3), (3, 33, 45, 16), (1, 1, 1, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv3x3_taps_equals_conv2d(shape: tuple[int, int, int, int], bias: bool) -> None:
    """Tolerance 1e-5 absolute on outputs of magnitude ~1 (float32 rounding of 9*C-term sums)."""
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal(shape).astype(np.float32))
    o = 6
    w = mx.array(rng.standard_normal((o, 3, 3, shape[-1])).astype(np.float32) / np.sqrt(9 * shape[-1]))
    b = mx.array(rng.standard_normal(o).astype(np.float32)) if bias else None
    ref = mx.conv2d(x, w, padding=1) + (b if bias else 0)
    got = cpu_conv.conv3x3_taps(x, w, b)
    assert got.shape == ref.shape
    np.testing.assert_allclose(np.array(got), np.array(ref), atol=1e-5, rtol=0)


@pytest.mark.cpu_kernels
def test_conv2d_taps_path_taken_on_large_inputs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = ops.conv3x3_taps
    monkeypatch.setattr(ops, "conv3x3_taps", lambda *a: calls.append(a[0].shape) or real(*a))
    conv = layers.Conv2d(4, 4, kernel_size=3, padding=1, taps=True)
    small = mx.zeros((1, 8, 8, 4))
    big = mx.zeros((1, 64, 32, 4))
    conv(small), conv(big)
    expect = [(1, 64, 32, 4)] if mx.default_device() == mx.cpu else []
    assert calls == expect


def test_quantized_linear_cpu_path_matches_quantized_matmul() -> None:
    """The CPU path (dequantize, float32 product) against mx.quantized_matmul: same quantized weights, so
    equal to float32 rounding (1e-4 absolute on outputs of magnitude ~1)."""
    rng = np.random.default_rng(1)
    lin = nn.Linear(128, 48)
    lin.weight = mx.array(rng.standard_normal((48, 128)).astype(np.float32) * 0.1)
    x = mx.array(rng.standard_normal((5, 128)).astype(np.float32))
    for bits in (4, 8):
        q = QuantizedLinear.from_linear(lin, 64, bits)
        ref = mx.quantized_matmul(x, q.weight, q.scales, q.biases, transpose=True, group_size=64, bits=bits) + q.bias
        with mx.stream(mx.cpu):
            got = q(x)
        np.testing.assert_allclose(np.array(got), np.array(ref), atol=1e-4, rtol=0)
        # and the quantization is close to the float weights (4-bit: ~1/16 of the range per group)
        full = lin(x)
        err = float(mx.abs(got - full).max() / mx.abs(full).max())
        assert err < (0.15 if bits == 4 else 0.02), (bits, err)


@pytest.mark.parametrize("stride,padding,size", [((1, 1), (1, 1), (40, 60)), ((2, 2), (1, 1), (9, 9)),
                                                 ((1, 1), (1, 1), (5, 6))])
def test_quantized_conv_matches_conv_of_dequantized_kernel(stride, padding, size) -> None:
    """Tolerance 1e-4 absolute: same dequantized kernel, taps path or mx.conv2d."""
    rng = np.random.default_rng(2)
    conv = layers.Conv2d(64, 16, kernel_size=3, stride=stride, padding=padding, taps=True)
    conv.weight = mx.array(rng.standard_normal(conv.weight.shape).astype(np.float32) * 0.05)
    x = mx.array(rng.standard_normal((2, *size, 64)).astype(np.float32))
    q = QuantizedConv2d.from_conv(conv, 64, 4)
    w = mx.dequantize(q.weight, q.scales, q.biases, group_size=64, bits=4).reshape(conv.weight.shape)
    ref = mx.conv2d(x, w, stride=stride, padding=padding) + conv.bias
    np.testing.assert_allclose(np.array(q(x)), np.array(ref), atol=1e-4, rtol=0)
    rel = float(mx.abs(q(x) - conv(x)).max() / mx.abs(conv(x)).max())
    assert rel < 0.15


def test_quantize_model_convolutions_option() -> None:
    def model() -> nn.Module:
        m = nn.Module()
        m.conv = layers.Conv2d(64, 32, kernel_size=3, padding=1, taps=True)
        m.odd = nn.Conv2d(4, 32, kernel_size=3, padding=1)  # 3*3*4 = 36 weights per output: not a group multiple
        m.lin = nn.Linear(64, 8)
        return m

    a = quantize_model(model(), bits=4, group_size=64)
    assert isinstance(a.conv, QuantizedConv2d) and isinstance(a.lin, QuantizedLinear)
    assert type(a.odd) is nn.Conv2d
    b = quantize_model(model(), bits=8, group_size=64, convolutions=False)
    assert isinstance(b.conv, layers.Conv2d) and isinstance(b.lin, QuantizedLinear)
    with pytest.raises(InvalidArgumentError, match="bits"):
        quantize_model(model(), bits=3)
    with pytest.raises(InvalidArgumentError, match="cannot quantize"):
        QuantizedConv2d.from_conv(nn.Conv2d(4, 8, kernel_size=3), 64, 4)


def _image(pipe, **kw) -> np.ndarray:
    return pipe("a red cube", num_inference_steps=3, height=64, width=64, seed=5, output_type="np",
                show_progress=False, **kw).images


@pytest.mark.cpu_kernels
@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="compute_dtype float32 is the CPU behaviour")
def test_half_and_quantized_weights_compute_in_float32_on_cpu(tiny_sd1: Path) -> None:
    """float16 weights on the CPU compute in float32: the image is within 2/255 of the float32 one (only the
    weights' rounding differs), and the U-Net keeps float16 parameters (half the bytes)."""
    full = load_pipeline(tiny_sd1)
    half = load_pipeline(tiny_sd1, dtype="float16")
    assert half.compute_dtype == mx.float32 and half.dtype == mx.float16
    ref, img = _image(full), _image(half)
    assert half.unet.conv_in.weight.dtype == mx.float16 and half.unet.dtype == mx.float32
    assert np.abs(img.astype(np.float64) - ref).max() <= 2 / 255
    q = load_pipeline(tiny_sd1, quantize=8, quantize_group_size=32)
    assert q.compute_dtype == mx.float32
    assert np.abs(_image(q).astype(np.float64) - ref).max() < 0.25


def test_quantized_load_still_rejects_non_finite_weights(tiny_sd1: Path, tmp_path: Path) -> None:
    """The lazy quantize-while-loading path keeps the strict NaN/Inf check (a NaN poisons the group's scales)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from sd_mlx.errors import WeightLoadError

    folder = tmp_path / "model"
    shutil.copytree(tiny_sd1, folder)
    f = next((folder / "unet").glob("*.safetensors"))
    weights = load_file(str(f))
    key = next(k for k in weights if k.endswith("to_q.weight"))
    weights[key] = weights[key].copy()
    weights[key].flat[3] = np.nan
    save_file(weights, str(f))
    pipe = load_pipeline(folder, quantize=8, quantize_group_size=32)
    with pytest.raises(WeightLoadError, match=r"contains NaN or Inf"):
        pipe.unet


def test_strip_convolution_uses_taps_per_strip_and_matches_conv2d(monkeypatch: pytest.MonkeyPatch) -> None:
    """The VAE's row strips (forced by a tiny unfold budget) equal one mx.conv2d within 1e-5."""
    monkeypatch.setattr(ops, "CONV_UNFOLD_BUDGET_BYTES", 200_000)
    rng = np.random.default_rng(3)
    conv = layers.Conv2d(16, 8, kernel_size=3, padding=1, strips=True)
    x = mx.array(rng.standard_normal((2, 37, 29, 16)).astype(np.float32))
    ref = mx.conv2d(x, conv.weight, padding=1) + conv.bias
    np.testing.assert_allclose(np.array(conv(x)), np.array(ref), atol=1e-5, rtol=0)
