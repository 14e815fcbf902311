"""Fast BLAS for MLX's CPU backend on Linux.

The Linux ``mlx[cpu]`` wheel links the reference (netlib) BLAS, which runs matrix products and convolutions about
30x slower than an optimised BLAS (measured here: 2048x2048 float32 matmul 3.5 GFLOP/s, against 169 GFLOP/s with
Debian's OpenBLAS and 68 GFLOP/s with pip's MKL). MLX looks its ``cblas_*`` symbols up in the process's global
scope first, so loading an optimised BLAS with ``RTLD_GLOBAL`` *before* ``mlx`` is imported makes MLX use it, with
the same results. :func:`enable_fast_blas` does that; ``import sd_mlx`` calls it once, before sd_mlx imports mlx.

Where the library is looked for, first found wins:

1. ``SD_MLX_BLAS``: a path to a shared library exporting the CBLAS interface, or ``off`` to keep MLX's own.
2. A system OpenBLAS (``libopenblas.so.0``: Debian/Ubuntu ``libopenblas0-pthread``, Fedora ``openblas``...).
3. Intel MKL from PyPI (``pip install mkl``, the ``sd_mlx[mkl]`` extra): ``libmkl_rt.so.*`` under ``sys.prefix``.

Nothing happens on macOS (MLX uses Accelerate) or when MLX runs on a GPU. The PyPI ``cmeel-openblas`` wheel is
not used: it is built for one CPU family (AVX-512) and crashes with "Illegal instruction" on others.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import sys
from dataclasses import dataclass
from typing import Iterator

_SYSTEM_OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
)

SLOW_PATH_HINT = ("MLX is using the reference BLAS on this Linux CPU (about 30x slower); install an optimised one: "
                  "`sudo apt-get install libopenblas0-pthread` (Debian/Ubuntu) or `pip install mkl`, or set "
                  "SD_MLX_BLAS=/path/to/libopenblas.so.0")


@dataclass(frozen=True)
class BlasStatus:
    """Which BLAS MLX's CPU backend uses in this process.

    Attributes:
        fast: True when an optimised BLAS was loaded before MLX (or MLX does not use the reference BLAS at all,
            as on macOS).
        library: path of the loaded library, ``"accelerate"`` on macOS, or ``None`` on the slow path.
        reason: one line saying why (for ``--verbose`` output and warnings).
    """

    fast: bool
    library: str | None
    reason: str


def _candidates() -> list[str]:
    found = [p for p in _SYSTEM_OPENBLAS if os.path.exists(p)]
    for root in {sys.prefix, sys.base_prefix}:
        found += sorted(glob.glob(os.path.join(root, "lib", "libmkl_rt.so*")))
    return found


def _already_loaded() -> str | None:
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            for line in fh:
                if "libopenblas" in line or "libmkl_rt" in line or "libblis" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return None


OPENBLAS_THREAD_TIMEOUT = "4"
"""OpenBLAS's ``OPENBLAS_THREAD_TIMEOUT`` while it is loaded (unless the user set one): its worker threads go to sleep
after about 2^4 cycles without work instead of busy-waiting for 2^28 (about 0.1 s). sd_mlx's own CPU kernels (fused
attention, Winograd transforms) run on their own threads right after a BLAS call, and on a 2-core CPU a spinning
OpenBLAS thread took one of the two cores from them: SD1.5 U-Net call (batch 2) 7.97 -> 7.65 s, its attention 2.0
-> 1.7 s, its matrix products unchanged (2.95-3.02 s), in alternating runs on a 2-core AMD EPYC."""


@contextlib.contextmanager
def _short_thread_timeout() -> Iterator[None]:
    """Set ``OPENBLAS_THREAD_TIMEOUT`` (read by OpenBLAS when it is loaded) for the duration, unless already set."""
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        yield
        return
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = OPENBLAS_THREAD_TIMEOUT
    try:
        yield
    finally:
        os.environ.pop("OPENBLAS_THREAD_TIMEOUT", None)


def enable_fast_blas() -> BlasStatus:
    """Load an optimised CBLAS with ``RTLD_GLOBAL`` so that MLX's CPU backend uses it (Linux only).

    Must run before the first ``import mlx``; ``import sd_mlx`` calls it. Idempotent. Never raises: a library that
    fails to load is skipped and the next candidate tried.

    Returns:
        A :class:`BlasStatus`.
    """
    if not sys.platform.startswith("linux"):
        return BlasStatus(True, "accelerate" if sys.platform == "darwin" else None, "not Linux: MLX's own BLAS")
    loaded = _already_loaded()
    if loaded:
        return BlasStatus(True, loaded, f"optimised BLAS already loaded: {loaded}")
    choice = os.environ.get("SD_MLX_BLAS", "").strip()
    if choice.lower() in ("off", "0", "none", "reference"):
        return BlasStatus(False, None, "SD_MLX_BLAS=off: MLX's reference BLAS")
    if "mlx.core" in sys.modules:
        return BlasStatus(False, None, "mlx was imported before sd_mlx, too late to load a fast BLAS; "
                                       "import sd_mlx first")
    paths = [choice] if choice else _candidates()
    errors = []
    for path in paths:
        try:
            with _short_thread_timeout():
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return BlasStatus(True, path, f"optimised BLAS loaded: {path}")
        except OSError as e:
            errors.append(f"{path}: {e}")
    reason = "no optimised BLAS found" if not errors else "could not load " + "; ".join(errors)
    return BlasStatus(False, None, reason)


def blas_status_for_backend(status: BlasStatus) -> BlasStatus:
    """Refine ``status`` with the backend MLX actually runs on: on a GPU the CPU BLAS does not matter."""
    import mlx.core as mx

    try:
        on_gpu = mx.default_device().type == mx.DeviceType.gpu
    except Exception:
        on_gpu = False
    if on_gpu and not status.fast:
        return BlasStatus(True, status.library, "MLX runs on the GPU")
    return status
