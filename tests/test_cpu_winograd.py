"""The Winograd F(2x2, 3x3) and F(4x4, 3x3) CPU convolutions (sd_mlx/csrc/cpu_winograd.cpp): values against a float64 direct
convolution, every edge case of its tiling, chunking and slicing, its derivatives, the layer paths that use it, and
each way it falls back to MLX's operations."""

from __future__ import annotations


import mlx.core as mx
import numpy as np
import pytest

from sd_mlx.cpu import winograd as cpu_winograd, native
from conftest import run_probe
from sd_mlx import ops
from sd_mlx.cpu import conv as cpu_conv
from sd_mlx.models import layers

pytestmark = pytest.mark.cpu_kernels  # the Linux CPU machinery itself: skipped on the portable path

STATUS = cpu_winograd.winograd_status()
REF = cpu_conv.conv3x3_taps  # MLX's operations: the kernel's reference
needs_kernel = pytest.mark.skipif(not STATUS.available, reason=f"Winograd CPU convolution off: {STATUS.reason}")


def _conv64(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, pad_rows: bool = True) -> np.ndarray:
    """Direct 3x3 convolution in float64, NHWC, one zero column each side (and one zero row with pad_rows)."""
    top = 1 if pad_rows else 0
    xp = np.pad(x.astype(np.float64), [(0, 0), (top, top), (1, 1), (0, 0)])
    h, wd = xp.shape[1] - 2, xp.shape[2] - 2
    out = np.zeros((x.shape[0], h, wd, w.shape[0]))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("bhwc,oc->bhwo", xp[:, dy:dy + h, dx:dx + wd], w[:, dy, dx, :].astype(np.float64))
    return out + (b.astype(np.float64) if b is not None else 0.0)


def _inputs(b: int, h: int, w: int, c: int, o: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, w, c), dtype=np.float32)
    k = (rng.standard_normal((o, 3, 3, c)) / np.sqrt(9 * c)).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    return x, k, bias


# (B, H, W, C, O): SD1.5 U-Net and VAE widths, odd sizes (a half tile at the bottom and right), one-pixel images,
# channel counts that leave tails in the 64-channel inner loops.
SHAPES = [
    (2, 16, 16, 64, 48),
    (1, 7, 9, 16, 24),
    (3, 5, 1, 8, 3),
    (1, 1, 1, 4, 4),
    (2, 6, 11, 130, 70),
    (1, 12, 10, 320, 96),
]


# F(2x2) only uses 0, +-1 and +-1/2 (measured error about 6e-7 of the largest output at 320 channels); F(4x4)'s
# interpolation points 0, +-1, +-2 give about 1.2e-5 there.
TOLERANCE = {2: 2e-6, 4: 3e-5}


@pytest.fixture(params=[2, 4], ids=["F2x2", "F4x4"])
def tile(request, monkeypatch) -> int:
    """Force one Winograd variant for every output size."""
    monkeypatch.setattr(cpu_winograd, "F4_MIN_PIXELS", 1 if request.param == 4 else 1 << 40)
    return request.param


def test_tile_size_policy():
    assert cpu_winograd.tile_size(32, 32) == 4 and cpu_winograd.tile_size(64, 64) == 4
    assert cpu_winograd.tile_size(16, 16) == 2 and cpu_winograd.tile_size(31, 33) == 2


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pad_rows", [True, False])
def test_matches_float64_direct_convolution(shape, pad_rows, tile):
    """Tolerance :data:`TOLERANCE` times the largest output."""
    x, k, bias = _inputs(*shape)
    if not pad_rows and shape[1] < 3:
        assert cpu_winograd.winograd_conv3x3(mx.array(x), mx.array(k), mx.array(bias), REF, pad_rows=False) is None
        return
    ref = _conv64(x, k, bias, pad_rows)
    for b in (bias, None):
        got = cpu_winograd.winograd_conv3x3(mx.array(x), mx.array(k), None if b is None else mx.array(b), REF,
                                            pad_rows=pad_rows)
        assert got is not None and got.dtype == mx.float32 and got.shape == ref.shape
        expect = ref if b is not None else ref - bias
        np.testing.assert_allclose(np.array(got), expect, rtol=0, atol=TOLERANCE[tile] * np.abs(expect).max())


@needs_kernel
@pytest.mark.parametrize("budget", [4096, 60_000, 1 << 30])
def test_chunks_and_slices_give_the_same_values(monkeypatch, budget, tile):
    """Tiny working budgets force tile chunks, output-channel slices and kernels transformed once per chunk and
    slice; every plan gives the same values as the direct convolution (:data:`TOLERANCE` relative)."""
    monkeypatch.setattr(cpu_winograd, "WORK_BUDGET_BYTES", budget)
    x, k, bias = _inputs(2, 21, 19, 40, 72, seed=3)
    got = cpu_winograd.winograd_conv3x3(mx.array(x), mx.array(k), mx.array(bias), REF)
    ref = _conv64(x, k, bias)
    np.testing.assert_allclose(np.array(got), ref, rtol=0, atol=TOLERANCE[tile] * np.abs(ref).max())


def _openblas_threads():
    """OpenBLAS's ``openblas_get_num_threads`` when it is in the process's global scope, else ``None``."""
    import ctypes
    try:
        return ctypes.CDLL(None).openblas_get_num_threads
    except AttributeError:
        return None


@needs_kernel
def test_products_per_thread_only_with_a_pthreads_openblas(tmp_path, monkeypatch):
    """The products run whole per thread only where OpenBLAS is a pthreads build (openblas_get_parallel() == 1):
    an OpenMP build sets its thread count per calling thread, a serial one may not take concurrent calls."""
    import ctypes
    lib = ctypes.CDLL(STATUS.library)
    try:
        kind = ctypes.CDLL(None).openblas_get_parallel()
    except AttributeError:
        kind = None
    assert lib.sd_mlx_winograd_products_per_thread() == (1 if kind == 1 else 0)
    # a library exporting OpenBLAS's thread functions with another threading model is not used that way
    src = tmp_path / "fake.cpp"
    src.write_text('extern "C" { int openblas_get_parallel() { return 2; } void openblas_set_num_threads(int) {} '
                   'int openblas_get_num_threads() { return 1; } void cblas_sgemm() {} }\n')
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fake = native.build_library(src, native.compiler())
    probe = ("import ctypes, sys; ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL); "
             "print(ctypes.CDLL(sys.argv[2]).sd_mlx_winograd_products_per_thread())")
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", probe, str(fake), STATUS.library], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "0", out.stderr


@needs_kernel
def test_concurrent_calls_share_the_blas_and_restore_its_thread_count():
    """With OpenBLAS the kernel runs its matrix products on its own threads with the BLAS set to one thread: the
    BLAS's count is back to its value after each call, also when calls from two Python threads overlap, and
    every call gives the direct convolution's values (:data:`TOLERANCE` relative)."""
    import threading
    get = _openblas_threads()
    before = get() if get else None
    x, k, bias = _inputs(2, 36, 36, 48, 40, seed=5)  # F(4x4): 36 products per chunk
    ref = _conv64(x, k, bias)
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                got = cpu_winograd.winograd_conv3x3(mx.array(x), mx.array(k), mx.array(bias), REF)
                results.append(np.array(got))
        except Exception as e:  # reported below: a failure inside a thread would otherwise pass unseen
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 6
    for got in results:
        np.testing.assert_allclose(got, ref, rtol=0, atol=TOLERANCE[4] * np.abs(ref).max())
    if get:
        assert get() == before


@needs_kernel
def test_float16_in_float16_out(tile):
    x, k, bias = _inputs(1, 8, 8, 32, 16, seed=4)
    got = cpu_winograd.winograd_conv3x3(mx.array(x).astype(mx.float16), mx.array(k).astype(mx.float16),
                                        mx.array(bias).astype(mx.float16), REF)
    assert got.dtype == mx.float16
    ref = _conv64(x.astype(np.float16), k.astype(np.float16), bias.astype(np.float16))
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), ref, rtol=0, atol=2e-3 * np.abs(ref).max())


@needs_kernel
def test_derivatives_are_the_references(tile):
    """mx.grad / jvp through the kernel equal those of MLX's path (the kernel's output is a constant to MLX; the
    custom function supplies the reference's derivatives). Tolerance 1e-4 absolute on values of order 1-10."""
    x, k, bias = (mx.array(t) for t in _inputs(1, 6, 5, 16, 16, seed=5))

    def loss(fn):
        return lambda x, k, b: (fn(x, k, b) ** 2).sum()

    fused = mx.grad(loss(lambda x, k, b: cpu_winograd.winograd_conv3x3(x, k, b, REF)), argnums=(0, 1, 2))(x, k, bias)
    plain = mx.grad(loss(REF), argnums=(0, 1, 2))(x, k, bias)
    for a, b in zip(fused, plain):
        assert float(mx.abs(b).max()) > 0.1
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=1e-4)
    tangents = [mx.ones_like(x), mx.zeros_like(k)]
    jf = mx.jvp(lambda x, k: cpu_winograd.winograd_conv3x3(x, k, None, REF), [x, k], tangents)[1][0]
    jp = mx.jvp(lambda x, k: REF(x, k), [x, k], tangents)[1][0]
    assert float(mx.abs(jp).max()) > 0.1
    np.testing.assert_allclose(np.array(jf), np.array(jp), rtol=0, atol=1e-5)


@needs_kernel
def test_compile_and_vmap_use_the_reference_value():
    x, k, bias = (mx.array(t) for t in _inputs(2, 6, 6, 16, 16, seed=6))
    expect = np.array(REF(x, k, bias))
    compiled = mx.compile(lambda x: cpu_winograd.winograd_conv3x3(x, k, bias, REF))(x)
    np.testing.assert_allclose(np.array(compiled), expect, rtol=0, atol=1e-5)
    mapped = mx.vmap(lambda x: cpu_winograd.winograd_conv3x3(x[None], k, bias, REF)[0])(x)
    np.testing.assert_allclose(np.array(mapped), expect, rtol=0, atol=1e-5)


def test_bad_shapes_raise():
    x = mx.zeros((1, 4, 4, 8))
    with pytest.raises(ValueError, match="weight \\(O, 3, 3, C\\)"):
        cpu_winograd.winograd_conv3x3(x, mx.zeros((4, 3, 3, 6)), None, REF)
    with pytest.raises(ValueError, match="bias"):
        cpu_winograd.winograd_conv3x3(x, mx.zeros((4, 3, 3, 8)), mx.zeros((5,)), REF)
    with pytest.raises(ValueError):
        cpu_winograd.winograd_conv3x3(mx.zeros((4, 4, 8)), mx.zeros((4, 3, 3, 8)), None, REF)


def _count_calls(monkeypatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    real = cpu_winograd.winograd_conv3x3
    monkeypatch.setattr(ops, "winograd_conv3x3", lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k))
    return calls


@needs_kernel
def test_layers_use_it_above_the_thresholds(monkeypatch):
    """The U-Net's Conv2d (taps) and its fused x2 upsampling take the kernel at 16x16 output pixels per image and
    16 channels; smaller images and narrower layers keep MLX's path. Values equal mx.conv2d (1e-5 absolute)."""
    calls = _count_calls(monkeypatch)
    rng = np.random.default_rng(7)
    conv = layers.Conv2d(16, 24, kernel_size=3, padding=1, taps=True)
    conv.weight = mx.array((rng.standard_normal((24, 3, 3, 16)) * 0.1).astype(np.float32))
    x = mx.array(rng.standard_normal((2, 16, 16, 16)).astype(np.float32))
    np.testing.assert_allclose(np.array(conv(x)), np.array(mx.conv2d(x, conv.weight, padding=1) + conv.bias),
                               rtol=0, atol=1e-5)
    up = conv(x[:, :8, :8], upsample2x=True)
    ref = mx.conv2d(layers.upsample_nearest(x[:, :8, :8]), conv.weight, padding=1) + conv.bias
    np.testing.assert_allclose(np.array(up), np.array(ref), rtol=0, atol=1e-5)
    assert calls == [(2, 16, 16, 16), (2, 16, 16, 16)]
    conv(x[:, :8, :8])  # 64 output pixels per image
    narrow = layers.Conv2d(8, 24, kernel_size=3, padding=1, taps=True)
    narrow(x[..., :8])
    plain = layers.Conv2d(16, 24, kernel_size=3, padding=1)  # neither taps nor strips: nn.Conv2d
    plain(x)
    assert len(calls) == 2


@needs_kernel
@pytest.mark.parametrize("upsample2x", [False, True])
def test_vae_strips_use_it(monkeypatch, upsample2x):
    """The VAE's strip path (3-row strips carrying their halo rows, and the upsampled strips of Upsample2D) runs
    each strip through the kernel, with the same values as the whole convolution (3e-5 times the largest output:
    the upsampled strips are large enough for F(4x4))."""
    calls = _count_calls(monkeypatch)
    rng = np.random.default_rng(8)
    x = mx.array(rng.standard_normal((1, 17, 64, 16)).astype(np.float32))  # strips of >= 256 output pixels
    k = mx.array((rng.standard_normal((16, 3, 3, 16)) * 0.1).astype(np.float32))
    bias = mx.array(rng.standard_normal(16).astype(np.float32))
    ref = mx.conv2d(layers.upsample_nearest(x) if upsample2x else x, k, padding=1) + bias
    got = ops.conv3x3_strips(x, k, bias, rows=6, upsample2x=upsample2x)
    assert len(calls) == 3
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=0, atol=TOLERANCE[4] * float(mx.abs(ref).max()))


_PROBE = ("import sd_mlx, mlx.core as mx, numpy as np; from sd_mlx.cpu import winograd as c; "
          "from sd_mlx.models import layers; st = c.winograd_status(); "
          "rng = np.random.default_rng(0); x = mx.array(rng.standard_normal((1, 16, 16, 16), dtype=np.float32)); "
          "conv = layers.Conv2d(16, 16, kernel_size=3, padding=1, taps=True); "
          "conv.weight = mx.array(rng.standard_normal((16, 3, 3, 16), dtype=np.float32) * 0.1); "
          "print(st.available, '|', st.reason, '|', float((conv(x) * x).sum()))")


def _probe(tmp_path, **env) -> tuple[str, str, float]:
    return run_probe(_PROBE, tmp_path, **env)


def test_fallbacks_keep_working(tmp_path):
    """Turned off, with a failing compiler, or without an optimised BLAS, the status says why and the layer gives
    the same values through MLX's path."""
    off = _probe(tmp_path / "off", SD_MLX_WINOGRAD="0")
    assert off[0] == "False" and "SD_MLX_WINOGRAD=0" in off[1]
    broken = _probe(tmp_path / "broken", CXX="false")
    assert broken[0] == "False" and "could not build" in broken[1]
    no_blas = _probe(tmp_path / "noblas", SD_MLX_BLAS="off")
    assert no_blas[0] == "False"
    if native.compiler() is not None:  # without one, the reason is the missing compiler
        assert "no optimised BLAS" in no_blas[1]
    for other in (broken, no_blas):
        assert abs(other[2] - off[2]) <= 1e-4 * max(1.0, abs(off[2]))
    if STATUS.available:
        fresh = _probe(tmp_path / "fresh")  # builds into an empty cache
        assert fresh[0] == "True" and list((tmp_path / "fresh" / "sd_mlx" / "native").glob("cpu_winograd-*.so"))
        assert abs(fresh[2] - off[2]) <= 1e-4 * max(1.0, abs(off[2]))


@needs_kernel
def test_jvp_in_the_input_only_through_a_layer():
    """A jvp in x alone: MLX passes no tangent for the layer's weight and bias (a regression found by review)."""
    rng = np.random.default_rng(9)
    conv = layers.Conv2d(16, 16, kernel_size=3, padding=1, taps=True)
    conv.weight = mx.array((rng.standard_normal((16, 3, 3, 16)) * 0.1).astype(np.float32))
    x = mx.array(rng.standard_normal((1, 32, 32, 16)).astype(np.float32))
    tangent = mx.array(rng.standard_normal(x.shape).astype(np.float32))
    _, (jf,) = mx.jvp(conv, [x], [tangent])
    expect = mx.conv2d(tangent, conv.weight, padding=1)  # linear in x: the jvp is the convolution of the tangent
    np.testing.assert_allclose(np.array(jf), np.array(expect), rtol=0, atol=1e-5)


@needs_kernel
def test_output_dtype_promotes_with_the_bias():
    """float16 input and kernel with a float32 bias give float32, as mx.conv2d(...) + bias does."""
    x, k, bias = _inputs(1, 16, 16, 16, 16, seed=10)
    got = cpu_winograd.winograd_conv3x3(mx.array(x).astype(mx.float16), mx.array(k).astype(mx.float16),
                                        mx.array(bias), REF)
    assert got.dtype == mx.float32
