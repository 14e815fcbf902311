"""sd_mlx.cpu.memory: with glibc, a freed big MLX buffer is reused without page faults, and return_freed_memory
gives the pages back; turned off, nothing changes. Each case runs in a fresh process (malloc settings are global)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cpu_kernels  # the Linux CPU machinery itself: skipped on the portable path

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                           reason="the malloc thresholds are a glibc (Linux) setting")

_PROBE = r"""
import json, resource
import sd_mlx, mlx.core as mx
from sd_mlx.cpu.memory import return_freed_memory

def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmRSS"))

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

mx.set_default_device(mx.cpu)
n = 50 * 2**20  # 200 MB of float32
x = mx.full((n,), 1.0); mx.eval(x); del x
f0 = faults(); y = mx.full((n,), 2.0); mx.eval(y); second = faults() - f0
del y
before = rss(); return_freed_memory(); after = rss()
print(json.dumps({"status": sd_mlx.KEEP_FREED_MEMORY, "faults_second": second, "trimmed": before - after}))
"""


def _probe(**env) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE], env=dict(os.environ, **env), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_freed_buffers_are_reused_and_returned():
    on = _probe()
    assert on["status"] and "1024 MiB" in on["status"]
    # 200 MB is ~49k pages: reusing the freed block faults almost none of them
    assert on["faults_second"] < 5_000, on
    assert on["trimmed"] > 150e6, on  # malloc_trim gave the freed block back
    off = _probe(SD_MLX_KEEP_FREED_MEMORY="0")
    assert off["status"] is None
    assert off["faults_second"] > 40_000, off  # glibc's default: a fresh mmap, every page faulted again
