"""The multi-threaded CPU LayerNorm and GEGLU (sd_mlx/csrc/cpu_rowwise.cpp): values against float64 and PyTorch
references, vector tails and thread splits, dtypes, derivatives, the layers that use them, and the fallbacks."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from sd_mlx.cpu import rowwise as cpu_rowwise, native
from conftest import run_probe
from sd_mlx import ops
from sd_mlx.models import layers

pytestmark = pytest.mark.cpu_kernels  # the Linux CPU machinery itself: skipped on the portable path

STATUS = cpu_rowwise.rowwise_status()
needs_kernel = pytest.mark.skipif(not STATUS.available, reason=f"CPU LayerNorm/GEGLU not built: {STATUS.reason}")


def _layer_norm64(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    xd = x.astype(np.float64)
    mean = xd.mean(-1, keepdims=True)
    return (xd - mean) / np.sqrt(((xd - mean) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _gelu64(g: np.ndarray) -> np.ndarray:
    import torch

    return torch.nn.functional.gelu(torch.from_numpy(g.astype(np.float64))).numpy()


def _geglu64(h: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    hd = h.astype(np.float64) + (0.0 if bias is None else bias)
    a, g = np.split(hd, 2, axis=-1)
    return a * _gelu64(g)


# (rows..., C): the SD1.5/SD2 U-Net widths, CLIP's 768, widths with vector tails (8 and 16 lanes), one row, a row
# count below the 16-row-per-thread split.
LN_SHAPES = [(2, 64, 320), (3, 640), (5, 1280), (2, 7, 768), (1, 13), (40, 33), (1, 1)]


@needs_kernel
@pytest.mark.parametrize("shape", LN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_matches_float64(shape):
    """Rows of mean 1 and std 3: within 1e-5 absolute of a float64 LayerNorm (outputs of order 10; PyTorch's
    float32 LayerNorm is as far)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    w, b = (rng.standard_normal(shape[-1]).astype(np.float32) for _ in range(2))
    got = cpu_rowwise.fused_layer_norm(mx.array(x), mx.array(w), mx.array(b), 1e-5)
    assert got is not None and got.dtype == mx.float32 and got.shape == x.shape
    np.testing.assert_allclose(np.array(got), _layer_norm64(x, w, b, 1e-5), rtol=0, atol=1e-5)


@needs_kernel
def test_layer_norm_constant_rows_and_eps():
    """A constant row normalises to the bias (variance 0: eps keeps it finite); a large eps is honoured."""
    x = np.full((3, 48), 7.0, np.float32)
    x[1] = np.arange(48)
    w, b = np.full(48, 2.0, np.float32), np.linspace(-1, 1, 48).astype(np.float32)
    for eps in (1e-5, 10.0):
        got = np.array(cpu_rowwise.fused_layer_norm(mx.array(x), mx.array(w), mx.array(b), eps))
        np.testing.assert_allclose(got, _layer_norm64(x, w, b, eps), rtol=0, atol=2e-5)
    np.testing.assert_allclose(got[0], b, atol=1e-6)


GEGLU_SHAPES = [(2, 64, 2 * 1280), (3, 2 * 2560), (1, 2 * 5120), (1, 2), (40, 2 * 37), (7, 2 * 24)]


@needs_kernel
@pytest.mark.parametrize("shape", GEGLU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_geglu_matches_float64(shape):
    """Projections of std 3 (GELU's erf over its whole curve), with and without the bias: within 2e-6 of the
    largest output of a float64 GEGLU (the exact GELU from PyTorch in float64)."""
    rng = np.random.default_rng(1)
    h = (rng.standard_normal(shape) * 3).astype(np.float32)
    bias = rng.standard_normal(shape[-1]).astype(np.float32)
    for b in (bias, None):
        got = cpu_rowwise.fused_geglu(mx.array(h), None if b is None else mx.array(b), ops._geglu_of_projection)
        ref = _geglu64(h, b)
        assert got is not None and got.dtype == mx.float32 and got.shape == ref.shape
        np.testing.assert_allclose(np.array(got), ref, rtol=0, atol=2e-6 * max(1.0, np.abs(ref).max()))


@needs_kernel
def test_gelu_is_exact_over_its_range():
    """GELU of -12..12 and beyond (a = 1): within 4e-7 absolute and 3e-6 relative (where the value exceeds 1e-6)
    of float64, in the vector body and the scalar tail alike; the deep negative tail goes to 0, not NaN."""
    g = np.concatenate([np.linspace(-12, 12, 48_001), [-1e4, -100.0, -30.0, 30.0, 100.0, 1e4, 0.0, -0.0]])
    g = g[: g.size // 31 * 31].astype(np.float32).reshape(-1, 31)  # 31 wide: vector lanes and a scalar tail
    h = np.concatenate([np.ones_like(g), g], axis=-1)
    got = np.array(cpu_rowwise.fused_geglu(mx.array(h), None, ops._geglu_of_projection))
    ref = _gelu64(g)
    err = np.abs(got - ref)
    big = np.abs(ref) > 1e-6
    assert np.isfinite(got).all() and err.max() < 4e-7
    assert (err[big] / np.abs(ref[big])).max() < 3e-6


@needs_kernel
def test_dtypes_follow_the_inputs():
    """float16 and bfloat16 inputs are computed in float32 and returned in their own dtype; a float16 input with
    float32 parameters (LayerNorm) or bias (GEGLU) promotes to float32, as MLX's operations would."""
    rng = np.random.default_rng(2)
    x = mx.array(rng.standard_normal((4, 96), dtype=np.float32))
    w, b = mx.ones((96,)), mx.zeros((96,))
    for dt in (mx.float16, mx.bfloat16):
        out = cpu_rowwise.fused_layer_norm(x.astype(dt), w.astype(dt), b.astype(dt), 1e-5)
        ref = mx.fast.layer_norm(x.astype(dt), w.astype(dt), b.astype(dt), 1e-5)
        assert out.dtype == dt
        np.testing.assert_allclose(np.array(out.astype(mx.float32)), np.array(ref.astype(mx.float32)), atol=2e-2)
        g = cpu_rowwise.fused_geglu(x.astype(dt), None, ops._geglu_of_projection)
        assert g.dtype == dt and g.shape == (4, 48)
    promoted = cpu_rowwise.fused_geglu(x.astype(mx.float16), mx.zeros((96,)), ops._geglu_of_projection)
    assert promoted.dtype == mx.float32
    promoted = cpu_rowwise.fused_layer_norm(x.astype(mx.float16), w, b, 1e-5)
    assert promoted.dtype == mx.fast.layer_norm(x.astype(mx.float16), w, b, 1e-5).dtype == mx.float32


@needs_kernel
def test_derivatives_and_compile_use_the_mlx_reference():
    """Gradients are those of MLX's operations, and inside mx.compile (inputs cannot be evaluated) the reference
    gives the value."""
    rng = np.random.default_rng(3)
    x = mx.array(rng.standard_normal((3, 40), dtype=np.float32))
    w = mx.array(rng.standard_normal(40, dtype=np.float32))
    b = mx.array(rng.standard_normal(40, dtype=np.float32))

    def loss(fn):
        return lambda x, w, b: (fn(x, w, b) * mx.arange(40)).sum()

    got = mx.grad(loss(lambda x, w, b: cpu_rowwise.fused_layer_norm(x, w, b, 1e-5)), argnums=(0, 1, 2))(x, w, b)
    want = mx.grad(loss(lambda x, w, b: mx.fast.layer_norm(x, w, b, 1e-5)), argnums=(0, 1, 2))(x, w, b)
    for g1, g2 in zip(got, want):
        np.testing.assert_allclose(np.array(g1), np.array(g2), rtol=1e-5, atol=1e-5)
    h = mx.array(rng.standard_normal((3, 40), dtype=np.float32))
    dg = mx.grad(lambda h, b: cpu_rowwise.fused_geglu(h, b, ops._geglu_of_projection).sum(), argnums=(0, 1))(h, b)
    dr = mx.grad(lambda h, b: ops._geglu_of_projection(h, b).sum(), argnums=(0, 1))(h, b)
    for g1, g2 in zip(dg, dr):
        np.testing.assert_allclose(np.array(g1), np.array(g2), rtol=1e-5, atol=1e-6)
    compiled = mx.compile(lambda x, w, b: cpu_rowwise.fused_layer_norm(x, w, b, 1e-5))(x, w, b)
    np.testing.assert_allclose(np.array(compiled), np.array(mx.fast.layer_norm(x, w, b, 1e-5)), atol=1e-5)


def test_bad_shapes_raise():
    x = mx.zeros((2, 8))
    with pytest.raises(ValueError, match=r"weight and bias of shape \(8,\)"):
        cpu_rowwise.fused_layer_norm(x, mx.zeros((7,)), mx.zeros((8,)), 1e-5)
    with pytest.raises(ValueError, match="h \\(..., 2n\\)"):
        cpu_rowwise.fused_geglu(mx.zeros((2, 7)), None, ops._geglu_of_projection)
    with pytest.raises(ValueError, match="bias \\(2n,\\)"):
        cpu_rowwise.fused_geglu(x, mx.zeros((4,)), ops._geglu_of_projection)


@needs_kernel
def test_empty_inputs_fall_back():
    assert cpu_rowwise.fused_layer_norm(mx.zeros((0, 8)), mx.ones((8,)), mx.zeros((8,)), 1e-5) is None
    assert cpu_rowwise.fused_geglu(mx.zeros((0, 8)), None, ops._geglu_of_projection) is None


def _count(monkeypatch, name: str) -> list[int]:
    calls = []
    fn = getattr(cpu_rowwise, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    monkeypatch.setattr(ops, name, counted)
    return calls


@needs_kernel
def test_transformer_block_uses_them_and_matches_mlx(monkeypatch):
    """A transformer block calls the kernels (3 LayerNorms, 1 GEGLU) and gives MLX's values (1e-5 relative);
    a quantized projection keeps MLX's GEGLU."""
    mx.random.seed(0)
    block = layers.BasicTransformerBlock(64, 2, 32, 48)
    mx.eval(block.parameters())
    x, ctx = mx.random.normal((2, 30, 64)), mx.random.normal((2, 7, 48))
    norms, geglus = _count(monkeypatch, "fused_layer_norm"), _count(monkeypatch, "fused_geglu")
    got = block(x, ctx)
    assert len(norms) == 3 and len(geglus) == 1
    monkeypatch.setattr(cpu_rowwise, "_usable", lambda *a: False)
    ref = block(x, ctx)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=0, atol=1e-5 * float(mx.abs(ref).max()))
    nn.quantize(block.ff, group_size=32, bits=8)
    geglus.clear()
    monkeypatch.undo()
    geglus = _count(monkeypatch, "fused_geglu")
    block(x, ctx)
    assert not geglus  # QuantizedLinear: MLX's path


_PROBE = ("import sd_mlx, mlx.core as mx, numpy as np; from sd_mlx.cpu import rowwise as c; "
          "from sd_mlx.models import layers; st = c.rowwise_status(); mx.random.seed(0); "
          "blk = layers.BasicTransformerBlock(32, 2, 16, 24); x = mx.random.normal((1, 20, 32)); "
          "print(st.available, '|', st.reason, '|', float(blk(x, mx.random.normal((1, 5, 24))).sum()))")


def test_fallbacks_keep_working(tmp_path):
    """Turned off, or with a compiler that fails, the status says why and the layers give the same values."""
    off = run_probe(_PROBE, tmp_path / "off", SD_MLX_ROWWISE="0")
    assert off[0] == "False" and "SD_MLX_ROWWISE=0" in off[1]
    broken = run_probe(_PROBE, tmp_path / "broken", CXX="false")
    assert broken[0] == "False" and "could not build" in broken[1]
    assert abs(broken[2] - off[2]) <= 1e-6 * max(1.0, abs(off[2]))
    if STATUS.available:
        fresh = run_probe(_PROBE, tmp_path / "fresh")
        assert fresh[0] == "True" and list((tmp_path / "fresh" / "sd_mlx" / "native").glob("cpu_rowwise-*.so"))
        assert abs(fresh[2] - off[2]) <= 1e-4 * max(1.0, abs(off[2]))


def test_build_key_covers_the_headers(tmp_path, monkeypatch):
    """A kernel's cached library is keyed on the headers beside its source too: editing one rebuilds."""
    cxx = native.compiler()
    if cxx is None:
        pytest.skip(native.NO_COMPILER)
    src = tmp_path / "k.cpp"
    src.write_text('#include "k.h"\nextern "C" int value() { return VALUE; }\n')
    (tmp_path / "k.h").write_text("#define VALUE 1\n")
    import ctypes

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = native.build_library(src, cxx)
    (tmp_path / "k.h").write_text("#define VALUE 2\n")
    second = native.build_library(src, cxx)
    assert first != second
    assert ctypes.CDLL(str(first)).value() == 1 and ctypes.CDLL(str(second)).value() == 2


def test_kernel_output_is_filled_in_place(monkeypatch):
    """A kernel's output buffer is the MLX array's own memory: what is written through the view is the array's
    value (no copy); were MLX to hand out a read-only view, a numpy buffer is copied instead, with the same
    value."""
    out = native.KernelOutput((3, 5))
    assert out.view.flags.writeable and out.view.shape == (3, 5) and out.view.dtype == np.float32
    out.view[...] = np.arange(15, dtype=np.float32).reshape(3, 5)
    arr = out.array()
    assert arr.dtype == mx.float32 and np.array_equal(np.array(arr), np.arange(15).reshape(3, 5))
    assert out._array is arr  # MLX's buffer, filled in place

    real = np.asarray

    def read_only(a, *args, **kwargs):
        v = real(a, *args, **kwargs)
        if isinstance(a, mx.array):
            v = v.view()
            v.flags.writeable = False
        return v

    monkeypatch.setattr(np, "asarray", read_only)
    fallback = native.KernelOutput((2, 2))
    monkeypatch.undo()
    assert fallback._array is None and fallback.view.flags.writeable
    fallback.view[...] = 7.0
    assert np.array_equal(np.array(fallback.array()), np.full((2, 2), 7.0))
