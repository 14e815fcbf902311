"""The native-ISA wrapper for MLX's CPU JIT: it is installed on Linux when g++ exists, can be turned off, and the
kernels it builds give the same values as MLX's uncompiled ops."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import sd_mlx
from sd_mlx.cpu.jit import enable_native_cpu_jit

pytestmark = pytest.mark.cpu_kernels  # the Linux CPU machinery itself: skipped on the portable path

linux_gxx = pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("g++") is None,
                               reason="the wrapper is for MLX's Linux CPU JIT, which needs g++")


@linux_gxx
def test_wrapper_is_installed_first_in_path():
    folder = sd_mlx.NATIVE_CPU_JIT
    assert folder is not None and os.environ["PATH"].split(os.pathsep)[0] == folder
    script = open(os.path.join(folder, "g++")).read()
    assert "-march=native" in script and "-ffast-math" not in script
    assert "-fno-trapping-math" in script and "-finline-limit" in script  # what lets GCC vectorise exp
    assert enable_native_cpu_jit() == folder  # idempotent
    assert os.environ["PATH"].split(os.pathsep).count(folder) == 1


@linux_gxx
def test_stale_kernels_are_dropped_once(tmp_path):
    """Kernels MLX cached under other flags are removed on the first import with new flags, then left alone."""
    from importlib.metadata import version

    cache = tmp_path / "tmp" / "mlx" / version("mlx") / "cpu"
    cache.mkdir(parents=True)
    for name in ("libK_contiguous.so", "K_contiguous.cpp", "notes.txt"):
        (cache / name).write_text("x")
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"), XDG_CACHE_HOME=str(tmp_path / "xdg"),
               PATH=os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if "sd_mlx" not in p))
    run = [sys.executable, "-c", "import sd_mlx; print(sd_mlx.NATIVE_CPU_JIT)"]
    out = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(f.name for f in cache.iterdir()) == ["notes.txt"]
    assert (tmp_path / "xdg" / "sd_mlx" / "cpu-jit" / "flags").read_text().startswith("-march=native")
    (cache / "libK2_contiguous.so").write_text("x")  # built under the current flags: kept
    assert subprocess.run(run, env=env, capture_output=True, text=True, timeout=120).returncode == 0
    assert sorted(f.name for f in cache.iterdir()) == ["libK2_contiguous.so", "notes.txt"]


@linux_gxx
def test_can_be_turned_off():
    env = dict(os.environ, SD_MLX_NATIVE_JIT="0", PATH=os.environ["PATH"].split(os.pathsep, 1)[1])
    out = subprocess.run([sys.executable, "-c", "import sd_mlx; print(sd_mlx.NATIVE_CPU_JIT)"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "None"


def test_compiled_kernels_match_plain_ops():
    from sd_mlx.cpu.attention import _exp_shifted
    from sd_mlx.ops import _gated_gelu, _silu_cpu as silu

    x = mx.random.normal((3, 17, 33), key=mx.random.key(0)) * 4
    m = mx.max(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.array(_exp_shifted(x, m)), np.exp(np.array(x) - np.array(m)), rtol=2e-6)
    ref = np.array(x) / (1 + np.exp(-np.array(x, dtype=np.float64)))
    np.testing.assert_allclose(np.array(silu(x)), ref, rtol=1e-5, atol=1e-6)
    a, g = x[..., :16], x[..., 16:32]
    np.testing.assert_allclose(np.array(_gated_gelu(a, g)), np.array(a * nn.gelu(g)), rtol=1e-5, atol=1e-6)
