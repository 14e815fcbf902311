"""The Linux CPU fast path: an optimised BLAS is loaded before mlx, MLX's results stay the same, and the slow path
is reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sd_mlx.cpu.blas import BlasStatus, enable_fast_blas

PROBE = r"""
import json, sys
import sd_mlx
import mlx.core as mx
import numpy as np
rng = np.random.default_rng(0)
a = rng.standard_normal((256, 192)).astype(np.float32); b = rng.standard_normal((192, 160)).astype(np.float32)
x = rng.standard_normal((1, 12, 10, 8)).astype(np.float32); w = rng.standard_normal((16, 3, 3, 8)).astype(np.float32)
mm = np.array(mx.array(a) @ mx.array(b))
conv = np.array(mx.conv2d(mx.array(x), mx.array(w), padding=1))
ref_mm = a.astype(np.float64) @ b.astype(np.float64)
print(json.dumps({"fast": sd_mlx.BLAS_STATUS.fast, "library": sd_mlx.BLAS_STATUS.library,
                  "reason": sd_mlx.BLAS_STATUS.reason, "mm_err": float(np.abs(mm - ref_mm).max()),
                  "conv": conv.ravel()[:64].tolist()}))
"""


def _probe(env_extra: dict[str, str]) -> dict:
    env = dict(os.environ, **env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS swap is for MLX's Linux CPU backend")
def test_fast_and_reference_blas_agree():
    ref = _probe({"SD_MLX_BLAS": "off"})
    assert ref["fast"] is False and "SD_MLX_BLAS=off" in ref["reason"]
    fast = _probe({})
    if not fast["fast"]:
        pytest.skip(f"no optimised BLAS on this machine: {fast['reason']}")
    assert fast["library"]
    # Same results on both paths (float32 round-off only).
    assert fast["mm_err"] < 1e-3 and ref["mm_err"] < 1e-3
    import numpy as np

    np.testing.assert_allclose(fast["conv"], ref["conv"], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_bad_explicit_library_is_reported_not_fatal():
    res = _probe({"SD_MLX_BLAS": "/nonexistent/libblas.so"})
    assert res["fast"] is False and "could not load /nonexistent/libblas.so" in res["reason"]
    assert res["mm_err"] < 1e-3


def test_enable_is_idempotent_and_never_raises():
    status = enable_fast_blas()
    assert isinstance(status, BlasStatus) and status.reason


_TIMEOUT_PROBE = """
import ctypes, os
real = ctypes.CDLL
seen = []
def spy(*a, **k):
    seen.append(os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
    return real(*a, **k)
ctypes.CDLL = spy
import sd_mlx
print(sd_mlx.BLAS_STATUS.fast, seen[0], os.environ.get("OPENBLAS_THREAD_TIMEOUT"))  # seen[0]: the BLAS
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS swap is for MLX's Linux CPU backend")
@pytest.mark.parametrize("user_value", [None, "12"])
def test_openblas_thread_timeout_while_loading(user_value):
    """OpenBLAS reads OPENBLAS_THREAD_TIMEOUT when it is loaded: sd_mlx sets its short value for that moment only,
    and leaves a value the user set alone."""
    from sd_mlx.cpu.blas import OPENBLAS_THREAD_TIMEOUT

    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "SD_MLX_BLAS")}
    if user_value is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = user_value
    out = subprocess.run([sys.executable, "-c", _TIMEOUT_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    fast, rest = out.stdout.strip().split(" ", 1)
    if fast != "True":
        pytest.skip("no optimised BLAS on this machine")
    expected = user_value or OPENBLAS_THREAD_TIMEOUT
    assert rest == f"{expected} {user_value}"  # set during the load, as before it afterwards
