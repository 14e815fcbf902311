"""Memory-lean convolution paths of the VAE and U-Net against their plain definitions.

References (all computed here with plain MLX ops, the same definitions the diffusers modules use):
``mx.conv2d(upsample_nearest(x)) + bias`` for :func:`upsample2x_conv3x3` and the strip paths of ``Upsample2D``;
the unstreamed ``ResnetBlock2D`` for its streamed form; ``silu(group_norm(x))`` then the convolution for
:func:`norm_silu_conv`; one-pass statistics for ``GroupNorm.statistics`` over strips. Loaded kernels must be stored
contiguously (a transposed view is copied by every convolution).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from sd_mlx.loading.keymaps.taesd import conv_kernel
from sd_mlx import ops
from sd_mlx.loading.keymaps.unet import conv_weight
from sd_mlx.models import layers


def _arr(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> mx.array:
    return mx.array((rng.standard_normal(shape) * scale).astype(np.float32))


def _budget_rows(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], rows: int, f: int = 1) -> None:
    """Shrink the strip budget so an input of ``shape`` is cut into strips of ``rows`` input rows."""
    b, _, w, c = shape
    monkeypatch.setattr(ops, "CONV_UNFOLD_BUDGET_BYTES", b * f * f * w * 9 * c * 4 * rows)


@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (1, 16, 16, 8), (2, 9, 4, 3), (1, 1, 1, 2)])
@pytest.mark.parametrize("taps", [True, False])
def test_upsample2x_conv3x3_equals_upsample_then_conv(shape: tuple[int, int, int, int], taps: bool) -> None:
    """Tolerance 2e-5 absolute on outputs of std ~1 (kernel taps summed before the products)."""
    rng = np.random.default_rng(0)
    x = _arr(rng, *shape)
    w = _arr(rng, 5, 3, 3, shape[-1], scale=1 / np.sqrt(9 * shape[-1]))
    b = _arr(rng, 5)
    ref = mx.conv2d(layers.upsample_nearest(x), w, padding=1) + b
    got = ops.upsample2x_conv3x3(x, w, b, taps=taps)
    assert got.shape == (shape[0], 2 * shape[1], 2 * shape[2], 5)
    np.testing.assert_allclose(np.array(got), np.array(ref), atol=2e-5, rtol=0)


@pytest.mark.parametrize("strips", [False, True])
def test_upsample2d_fused_and_strip_paths(monkeypatch: pytest.MonkeyPatch, strips: bool) -> None:
    """``Upsample2D`` (x2, and an explicit odd size that must upsample first) against upsample-then-conv; with
    strips of 3 input rows. Tolerance 2e-5 absolute."""
    rng = np.random.default_rng(1)
    up = layers.Upsample2D(4, strip_convs=strips)
    up.conv.weight = _arr(rng, 4, 3, 3, 4, scale=0.2)
    x = _arr(rng, 1, 13, 6, 4)
    if strips:
        _budget_rows(monkeypatch, x.shape, 3, f=2)
        assert layers.strip_rows(x.shape, 4, upsample2x=True) == 3
    for size in (None, (27, 11)):
        ref = mx.conv2d(layers.upsample_nearest(x, size), up.conv.weight, padding=1) + up.conv.bias
        got = up(x, size)
        assert got.shape == ref.shape
        np.testing.assert_allclose(np.array(got), np.array(ref), atol=2e-5, rtol=0)


def test_upsample_fusion_skipped_when_kernel_is_larger_than_the_upsampled_input(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = ops.upsample2x_conv3x3
    monkeypatch.setattr(ops, "upsample2x_conv3x3", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    conv = layers.Conv2d(64, 64, kernel_size=3, padding=1)
    conv(mx.zeros((1, 4, 4, 64)), upsample2x=True)  # upsampled input 4096 values < kernel 36864
    conv(mx.zeros((1, 32, 32, 64)), upsample2x=True)
    assert calls == [(1, 32, 32, 64)]


@pytest.mark.parametrize("cin, cout", [(8, 8), (8, 16)])
def test_streamed_resnet_equals_plain(monkeypatch: pytest.MonkeyPatch, cin: int, cout: int) -> None:
    """The VAE's streamed ResnetBlock2D (statistics over strips, norm + SiLU per strip, residual per output strip)
    against the same block evaluated whole, strips of 3 rows. Tolerance 1e-5 absolute on outputs of std ~3."""
    rng = np.random.default_rng(2)
    streamed = layers.ResnetBlock2D(cin, cout, None, groups=4, eps=1e-6, strip_convs=True, output_scale_factor=2.0)
    plain = layers.ResnetBlock2D(cin, cout, None, groups=4, eps=1e-6, strip_convs=False, output_scale_factor=2.0)
    plain.update(streamed.parameters())
    x = _arr(rng, 2, 13, 11, cin, scale=3.0) + 1.0
    ref = plain(x)
    _budget_rows(monkeypatch, x.shape, 3)
    calls = []
    real = layers.conv3x3_strips
    monkeypatch.setattr(layers, "conv3x3_strips", lambda *a, **k: calls.append(k["rows"]) or real(*a, **k))
    got = streamed(x)
    assert calls and all(r < x.shape[1] for r in calls), "the streamed path was not taken"
    np.testing.assert_allclose(np.array(got), np.array(ref), atol=1e-5, rtol=0)


def test_norm_silu_conv_streamed_equals_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    norm = layers.group_norm(2, 6, 1e-6)
    norm.weight, norm.bias = _arr(rng, 6), _arr(rng, 6)
    conv = layers.Conv2d(6, 3, kernel_size=3, padding=1, strips=True)
    x = _arr(rng, 1, 10, 9, 6, scale=2.0)
    ref = mx.conv2d(ops.silu(norm(x)), conv.weight, padding=1) + conv.bias
    _budget_rows(monkeypatch, x.shape, 4)
    got = layers.norm_silu_conv(norm, conv, x)
    np.testing.assert_allclose(np.array(got), np.array(ref), atol=1e-5, rtol=0)


def test_group_norm_statistics_over_strips() -> None:
    """Strip-wise two-pass statistics against numpy's over the whole group (float64), rtol 1e-5."""
    rng = np.random.default_rng(4)
    x = _arr(rng, 2, 9, 5, 8, scale=4.0) + 3.0
    norm = layers.group_norm(4, 8, 1e-6)
    mean, rstd = norm.statistics(x, rows=2)
    xg = np.array(x, np.float64).reshape(2, -1, 4, 2)
    np.testing.assert_allclose(np.array(mean).reshape(2, 4), xg.mean(axis=(1, 3)), rtol=1e-5)
    np.testing.assert_allclose(np.array(rstd).reshape(2, 4), 1 / np.sqrt(xg.var(axis=(1, 3)) + 1e-6), rtol=1e-5)


@pytest.mark.parametrize("fn", [conv_weight, conv_kernel])
def test_loaded_conv_kernels_are_contiguous(fn) -> None:
    """A kernel stored as a transposed view is copied by every convolution (about +118 MB working memory for
    SD1.5's 2560 -> 1280 kernel): the keymaps must return a contiguous (row-major) array, as the buffer protocol
    reports it (a plain ``transpose`` view reports ``c_contiguous`` False)."""
    k = mx.arange(2 * 3 * 3 * 3, dtype=mx.float32).reshape(2, 3, 3, 3)
    got = fn(k)
    mx.eval(got)
    expect = np.ascontiguousarray(np.array(k).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.array(got), expect)
    assert memoryview(got).c_contiguous
    assert not memoryview(k.transpose(0, 2, 3, 1)).c_contiguous  # the check itself can fail
