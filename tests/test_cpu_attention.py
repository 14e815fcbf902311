"""The fused CPU attention kernel (sd_mlx/csrc/cpu_attention.cpp): values against a float64 reference and against
MLX's own path, every padding/tail case of its blocking, and each way it falls back to MLX's operations."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest

from sd_mlx.cpu import attention as cpu_attention, native
from conftest import run_probe
from sd_mlx import ops

pytestmark = pytest.mark.cpu_kernels  # the Linux CPU machinery itself: skipped on the portable path

STATUS = cpu_attention.fused_attention_status()
REF = cpu_attention.chunked_attention  # MLX's operations: the kernel's reference
needs_kernel = pytest.mark.skipif(not STATUS.available, reason=f"fused CPU attention not built: {STATUS.reason}")


def _reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int) -> np.ndarray:
    """softmax(q k^T / sqrt(d)) v per head in float64; (B, L, h*d) in and out."""
    b, lq, inner = q.shape
    d = inner // heads
    q4, k4, v4 = (t.astype(np.float64).reshape(b, -1, heads, d) for t in (q, k, v))
    s = np.einsum("blhd,bshd->bhls", q4, k4) / np.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhls,bshd->blhd", p, v4).reshape(b, lq, inner)


def _inputs(b: int, lq: int, s: int, heads: int, d: int, seed: int = 0, spread: float = 3.0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, lq, heads * d), dtype=np.float32) * spread
    k = rng.standard_normal((b, s, heads * d), dtype=np.float32)
    v = rng.standard_normal((b, s, heads * d), dtype=np.float32)
    return q, k, v


# (B, L, S, heads, d): SD1.5's self- and cross-attention head sizes, SD2's 64, the VAE's single 512-wide head, and
# sizes that leave tails in every blocking (96 query rows, 6-row tiles, 16-key tiles, 256-key blocks, 8-wide d).
SHAPES = [
    (2, 200, 77, 8, 40),
    (2, 300, 300, 5, 64),
    (1, 97, 257, 2, 80),
    (1, 64, 64, 1, 512),
    (1, 7, 3, 3, 5),
    (3, 1, 1, 1, 1),
    (1, 130, 600, 2, 24),
]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(shape):
    b, lq, s, heads, d = shape
    q, k, v = _inputs(b, lq, s, heads, d)
    out = cpu_attention.fused_attention(mx.array(q), mx.array(k), mx.array(v), heads, REF)
    assert out is not None and out.dtype == mx.float32 and out.shape == (b, lq, heads * d)
    # float32 accumulation over up to 600 keys and 512 channels: 1e-5 relative to the output scale.
    np.testing.assert_allclose(np.array(out), _reference(q, k, v, heads), rtol=0, atol=1e-5 * max(1.0, np.abs(v).max()))


@needs_kernel
def test_large_scores_do_not_overflow():
    """Scores up to ~1e3 (sharp softmax) stay finite and exact: the running maximum is subtracted before exp."""
    q, k, v = _inputs(1, 50, 300, 2, 16, seed=1, spread=200.0)
    out = np.array(cpu_attention.fused_attention(mx.array(q), mx.array(k), mx.array(v), 2, REF))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, _reference(q, k, v, 2), rtol=0, atol=1e-4)


@needs_kernel
def test_same_values_as_mlx_path_and_dtypes():
    """attention() on the CPU (fused) agrees with the MLX fallback path; float16 inputs give float16 outputs."""
    q, k, v = (mx.array(t) for t in _inputs(2, 333, 333, 4, 40, seed=2))
    fused = ops.attention(q, k, v, 4)
    b, lq, inner = q.shape
    split = [t.reshape(b, -1, 4, 40).transpose(0, 2, 1, 3) for t in (q, k, v)]
    plain = cpu_attention._chunked_heads(*split, 40 ** -0.5).transpose(0, 2, 1, 3).reshape(b, lq, inner)
    np.testing.assert_allclose(np.array(fused), np.array(plain), rtol=0, atol=2e-5)
    half = ops.attention(*(t.astype(mx.float16) for t in (q, k, v)), 4)
    assert half.dtype == mx.float16
    np.testing.assert_allclose(np.array(half.astype(mx.float32)), np.array(plain), rtol=0, atol=2e-2)


@needs_kernel
def test_strided_inputs():
    """Non-contiguous inputs (a slice of a fused projection, a transposed batch) are made contiguous first."""
    q, k, v = _inputs(2, 40, 50, 2, 8, seed=3)
    qkv = mx.concatenate([mx.array(np.concatenate([q, q[:, :10]], axis=1)), mx.zeros((2, 50, 16))], axis=-1)
    qs = qkv[:, :40, :16]
    kk = mx.array(np.ascontiguousarray(k.transpose(1, 0, 2))).transpose(1, 0, 2)
    out = cpu_attention.fused_attention(qs, kk, mx.array(v), 2, REF)
    np.testing.assert_allclose(np.array(out), _reference(q, k, v, 2), rtol=0, atol=1e-5)


def test_bad_shapes_raise():
    q = mx.zeros((1, 4, 6))
    with pytest.raises(ValueError, match="h=4"):
        cpu_attention.fused_attention(q, q, q, 4, REF)  # 6 channels do not split into 4 heads
    for heads in (0, -2):
        with pytest.raises(ValueError, match=">= 1"):
            cpu_attention.fused_attention(q, q, q, heads, REF)
    with pytest.raises(ValueError):
        cpu_attention.fused_attention(q, mx.zeros((1, 4, 8)), mx.zeros((1, 4, 8)), 2, REF)


def test_empty_inputs_give_zeros():
    """No queries or no keys: attention() returns zeros of the right shape on every path (no crash)."""
    for lq, s in ((0, 3), (4, 0), (0, 0)):
        out = ops.attention(mx.ones((2, lq, 8)), mx.ones((2, s, 8)), mx.ones((2, s, 8)), 2)
        assert out.shape == (2, lq, 8) and not np.array(out).any()


@needs_kernel
def test_inside_compile_and_vmap_uses_the_reference():
    """Under mx.compile and mx.vmap the inputs cannot be evaluated: the kernel's reference gives the value, the
    same as the eager (fused) result."""
    q, k, v = (mx.array(t) for t in _inputs(1, 70, 90, 2, 16, seed=4))
    eager = np.array(ops.attention(q, k, v, 2))
    compiled = mx.compile(lambda q, k, v: ops.attention(q, k, v, 2))(q, k, v)
    np.testing.assert_allclose(np.array(compiled), eager, rtol=0, atol=2e-5)
    mapped = mx.vmap(lambda q, k, v: ops.attention(q, k, v, 2))(*(mx.stack([t, t]) for t in (q, k, v)))
    np.testing.assert_allclose(np.array(mapped), np.stack([eager, eager]), rtol=0, atol=2e-5)


@needs_kernel
def test_derivatives_are_those_of_the_mlx_path():
    """mx.grad / value_and_grad / jvp through the fused kernel give the MLX path's derivatives (the kernel's
    output alone is a constant to MLX: without its custom vjp/jvp they would be silently zero)."""
    q, k, v = (mx.array(t) for t in _inputs(2, 10, 12, 2, 8, seed=5, spread=1.0))
    w = mx.array(np.random.default_rng(6).standard_normal((2, 10, 16), dtype=np.float32))

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v, 2) * w).sum()

    fused = mx.grad(loss(ops.attention), argnums=(0, 1, 2))(q, k, v)
    plain = mx.grad(loss(REF), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(fused, plain):
        assert float(mx.abs(b).max()) > 0.1
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=1e-5)
    value, _ = mx.value_and_grad(loss(ops.attention))(q, k, v)
    np.testing.assert_allclose(float(value), float(loss(REF)(q, k, v)), rtol=1e-5)
    tangents = [mx.ones_like(q), mx.zeros_like(k), mx.zeros_like(v)]
    jf = mx.jvp(lambda q, k, v: ops.attention(q, k, v, 2), [q, k, v], tangents)[1][0]
    jp = mx.jvp(lambda q, k, v: REF(q, k, v, 2), [q, k, v], tangents)[1][0]
    assert float(mx.abs(jp).max()) > 0.1
    np.testing.assert_allclose(np.array(jf), np.array(jp), rtol=0, atol=1e-5)


@needs_kernel
def test_eight_lane_build_gives_the_same_values():
    """The softmax pass uses 16-lane vectors where the compiler targets AVX-512 and 8-lane ones elsewhere: a build
    without AVX-512 (or the default one, on a CPU without it) gives the same values to float32 rounding."""
    import ctypes
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("-mno-avx512f is an x86 flag")
    narrow = cpu_attention.kernel_function(
        ctypes.CDLL(str(native.build_library(cpu_attention.SOURCE, native.compiler(), ("-mno-avx512f",)))))
    for b, lq, s, heads, d in [(2, 200, 77, 8, 40), (1, 97, 300, 2, 80)]:
        q, k, v = _inputs(b, lq, s, heads, d)
        out = np.array(cpu_attention._run_kernel(narrow, mx.array(q), mx.array(k), mx.array(v), heads))
        wide = np.array(cpu_attention.fused_attention(mx.array(q), mx.array(k), mx.array(v), heads, REF))
        np.testing.assert_allclose(out, wide, rtol=0, atol=1e-6 * np.abs(v).max())
        np.testing.assert_allclose(out, _reference(q, k, v, heads), rtol=0, atol=1e-5 * np.abs(v).max())


@needs_kernel
def test_library_is_cached_by_content():
    """The library is built once: a second build returns the same file, untouched."""
    path = native.build_library(cpu_attention.SOURCE, native.compiler())
    assert str(path) == STATUS.library
    before = os.stat(path).st_mtime_ns
    assert native.build_library(cpu_attention.SOURCE, native.compiler()) == path and os.stat(path).st_mtime_ns == before
    assert os.stat(path).st_mode & 0o055 == 0o055  # readable by others sharing the cache


_PROBE = ("import sd_mlx, mlx.core as mx, numpy as np; from sd_mlx.cpu import attention as c; "
          "from sd_mlx.ops import attention; st = c.fused_attention_status(); "
          "x = mx.array(np.random.default_rng(0).standard_normal((1, 20, 8), dtype=np.float32)); "
          "print(st.available, '|', st.reason, '|', float(attention(x, x, x, 2).sum()))")


def _probe(tmp_path, **env) -> tuple[str, str, float]:
    return run_probe(_PROBE, tmp_path, **env)


def test_fallbacks_keep_working(tmp_path):
    """Turned off, or with a compiler that fails, the status says why and attention still gives the same values."""
    off = _probe(tmp_path / "off", SD_MLX_FUSED_ATTENTION="0")
    assert off[0] == "False" and "SD_MLX_FUSED_ATTENTION=0" in off[1]
    missing = _probe(tmp_path / "missing", CXX="/no/such/compiler -O2")
    assert missing[0] == "False" and "no C++ compiler" in missing[1]
    broken = _probe(tmp_path / "broken", CXX="false")
    assert broken[0] == "False" and "could not build" in broken[1] and "false" in broken[1]
    assert not (tmp_path / "broken" / "sd_mlx" / "native").exists() or not any(
        p.suffix == ".so" for p in (tmp_path / "broken" / "sd_mlx" / "native").iterdir())
    if STATUS.available:
        fresh = _probe(tmp_path / "fresh")  # builds into an empty cache
        assert fresh[0] == "True" and list((tmp_path / "fresh" / "sd_mlx" / "native").glob("cpu_attention-*.so"))
        assert abs(fresh[2] - off[2]) <= 1e-4 * max(1.0, abs(off[2]))
        launcher = _probe(tmp_path / "launcher", CXX="env g++")  # $CXX with a launcher word, like "ccache g++"
        assert launcher[0] == "True", launcher[1]
    assert abs(broken[2] - off[2]) <= 1e-6 * max(1.0, abs(off[2]))


@needs_kernel
def test_jvp_in_q_only():
    """A jvp in q alone (k and v constant, as for cross-attention's context): MLX passes no tangent for k and v."""
    q, k, v = (mx.array(t) for t in _inputs(1, 40, 30, 2, 8))
    tangent = mx.ones_like(q)
    jf = mx.jvp(lambda q: ops.attention(q, k, v, 2), [q], [tangent])[1][0]
    jp = mx.jvp(lambda q: REF(q, k, v, 2), [q], [tangent])[1][0]
    assert float(mx.abs(jp).max()) > 1e-3
    np.testing.assert_allclose(np.array(jf), np.array(jp), rtol=0, atol=1e-5)
