"""Fast BLAS for MLX's CPU backend on Linux.

The Linux ``mlx[cpu]`` wheel links the reference (netlib) BLAS, which runs matrix products and convolutions
50-70x slower than an optimised BLAS (2048x2048 float32 matmul and an SD1.5 U-Net call, see the README's "Fast
path on Linux CPU" for the figures). MLX looks its ``cblas_*`` and LAPACK symbols up in the process's global scope
first, so an optimised library whose functions are in that scope *before* ``mlx`` is imported is the one MLX
uses, with the same results.
:func:`enable_fast_blas` does that; ``import sd_mlx`` calls it once, before sd_mlx imports mlx.

Where the library is looked for (``SD_MLX_BLAS`` unset), first found wins:

1. ``scipy-openblas32`` from PyPI, a dependency of sd_mlx on Linux x86_64 and aarch64, so a plain ``pip install``
   brings it: OpenBLAS built for every CPU family of the architecture with the kernels picked at run time
   (``DYNAMIC_ARCH``), with pthreads. Its functions carry a ``scipy_`` prefix (``scipy_cblas_sgemm``); sd_mlx
   gives the ones MLX calls, and OpenBLAS's thread functions, their standard names with
   :func:`sd_mlx.cpu.elf_aliases.load_aliases` (no compiler needed).
2. A system OpenBLAS (``libopenblas.so.0``: Debian/Ubuntu ``libopenblas0-pthread``, Fedora ``openblas``...).
3. Intel MKL from PyPI (``pip install mkl``): ``libmkl_rt.so.*`` under ``sys.prefix``.

``SD_MLX_BLAS`` chooses instead: ``off`` keeps MLX's reference BLAS; ``scipy-openblas32``, ``system`` or ``mkl``
takes only that candidate; anything else is a path to a shared library exporting the CBLAS interface, with
standard names or with the ``scipy_`` prefix. Nothing happens on macOS (MLX uses Accelerate) or when MLX runs on a
GPU. The PyPI ``cmeel-openblas`` wheel is not used: it is built for one CPU family (AVX-512) and crashes with
"Illegal instruction" on others.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Iterator

PACKAGE = "scipy-openblas32"
"""The PyPI package sd_mlx depends on for its BLAS on Linux (see the module's notes)."""

_SYSTEM_OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
)

_PREFIXES = ("", "scipy_")
"""Symbol prefixes tried, in order: standard names, then the scipy-openblas wheels' ``scipy_``."""

MLX_SYMBOLS = (
    "cblas_sgemm", "cblas_dgemm", "cblas_cgemm",
    "sgetrf_", "dgetrf_", "sgetri_", "dgetri_", "spotrf_", "dpotrf_", "strtri_", "dtrtri_",
    "sgeqrf_", "dgeqrf_", "sorgqr_", "dorgqr_", "sgesdd_", "dgesdd_", "cgesdd_",
    "ssyevd_", "dsyevd_", "cheevd_", "sgeev_", "dgeev_", "cgeev_",
)
"""The BLAS and LAPACK functions MLX's CPU backend imports (``nm -D --undefined-only libmlx.so``, MLX 0.32):
given their standard names when the library has them only with a prefix. tests/test_blas.py checks the list
against the installed MLX."""

OPENBLAS_SYMBOLS = ("openblas_set_num_threads", "openblas_get_num_threads", "openblas_get_parallel",
                    "openblas_get_num_procs", "openblas_get_config", "openblas_get_corename")
"""OpenBLAS's own functions given their standard names too: the Winograd kernel (``csrc/cpu_winograd.cpp``) sets
the thread count through them, and the status reports the build and the kernels picked for the CPU."""


@dataclass(frozen=True)
class BlasStatus:
    """Which BLAS MLX's CPU backend uses in this process.

    Attributes:
        fast: True when an optimised BLAS was loaded before MLX (or MLX does not use the reference BLAS at all,
            as on macOS).
        library: path of the loaded library, ``"accelerate"`` on macOS, or ``None`` on the slow path.
        reason: one line saying which and why (for ``--verbose`` output and warnings), with OpenBLAS's build and
            CPU kernels (``openblas_get_config``, ``openblas_get_corename``) where it tells them.
        fix: on the slow path, the one thing that brings the fast path (a command to run, usually
            :func:`fix_command`); ``None`` otherwise.
    """

    fast: bool
    library: str | None
    reason: str
    fix: str | None = None


def fix_command(package: str = PACKAGE) -> str:
    """The command that installs ``package`` into the Python environment running this process."""
    return f"{sys.executable or 'python3'} -m pip install {package}"


def slow_path_hint(status: BlasStatus) -> str:
    """The warning for the slow path: what happened (``status.reason``) and the one thing that fixes it."""
    fix = status.fix or fix_command()
    return f"MLX is using the reference BLAS on this Linux CPU (50-70x slower): {status.reason}. Fix: {fix}"


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p), ("dli_sname", ctypes.c_char_p),
                ("dli_saddr", ctypes.c_void_p)]


def _library_of(address: int) -> str | None:
    """Path of the loaded object holding ``address`` (``dladdr``), or ``None``."""
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):
        return None
    dladdr.argtypes, dladdr.restype = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)], ctypes.c_int
    info = _DlInfo()
    if not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


def _function(lib: ctypes.CDLL, name: str) -> int | None:
    """Address of ``name`` in ``lib``, or ``None``."""
    try:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    except AttributeError:
        return None


def _global_cblas() -> str | None:
    """Path of the library whose ``cblas_sgemm`` is in the process's global scope (what MLX would call), or
    ``None`` when there is none (MLX's own reference BLAS is not in that scope)."""
    try:
        address = _function(ctypes.CDLL(None), "cblas_sgemm")
    except OSError:
        return None
    if address is None:
        return None
    return _library_of(address) or "unknown library"


def _openblas_details(lib: ctypes.CDLL, prefix: str) -> str:
    """``" (OpenBLAS 0.3.x DYNAMIC_ARCH ..., kernels for Haswell)"`` for an OpenBLAS, else ``""``."""
    parts = []
    for name in ("openblas_get_config", "openblas_get_corename"):
        try:
            fn = getattr(lib, prefix + name)
        except AttributeError:
            continue
        fn.restype, fn.argtypes = ctypes.c_char_p, []
        value = fn()
        if value:
            parts.append(value.decode("utf-8", "replace").strip())
    if len(parts) == 2:
        parts[1] = f"kernels for {parts[1]}"
    return f" ({', '.join(parts)})" if parts else ""


def _scipy_openblas() -> list[str]:
    """The library of the installed ``scipy-openblas32`` package (found without importing it), or ``[]``."""
    try:
        spec = importlib.util.find_spec(PACKAGE.replace("-", "_"))
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for folder in spec.submodule_search_locations:
        found += sorted(glob.glob(os.path.join(folder, "lib", "libscipy_openblas*.so*")))
    return found[:1]


def _mkl() -> list[str]:
    found = []
    for root in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found += sorted(glob.glob(os.path.join(root, "lib", "libmkl_rt.so*")))
    return found


_CANDIDATES = {
    PACKAGE: (_scipy_openblas, f"{PACKAGE} is not installed"),
    "system": (lambda: [p for p in _SYSTEM_OPENBLAS if os.path.exists(p)], "no system OpenBLAS found"),
    "mkl": (_mkl, "MKL (pip install mkl) is not installed"),
}
"""``SD_MLX_BLAS`` name -> (its libraries, what to say when there are none), in the order tried by default."""


def _fix_for(choice: str, paths: list[str]) -> str:
    """The fix for a slow path after trying ``paths`` for the ``SD_MLX_BLAS`` value ``choice``."""
    if choice == "mkl":
        return f"`{fix_command('mkl')}`"
    if choice == "system":
        return "`sudo apt-get install libopenblas0-pthread` (Debian/Ubuntu), or unset SD_MLX_BLAS"
    if choice and choice != PACKAGE:
        return "unset SD_MLX_BLAS, or set it to a library exporting cblas_sgemm"
    if any(f"{os.sep}{PACKAGE.replace('-', '_')}{os.sep}" in p for p in paths):  # installed but broken
        return f"`{fix_command()} --force-reinstall`"
    return f"`{fix_command()}`"


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


def candidate_libraries(choice: str = "") -> tuple[list[str], list[str]]:
    """The libraries to try, in order, for an ``SD_MLX_BLAS`` value (``""``: the default order; a candidate's
    name: that one; anything else: a path), and what to say for each candidate that has none.

    Returns:
        ``(paths, missing)``: existing library paths (the path given, unchecked), and lines such as
        ``"scipy-openblas32 is not installed"``.
    """
    if choice and choice not in _CANDIDATES:
        return [choice], []
    paths, missing = [], []
    for name in [choice] if choice else list(_CANDIDATES):
        find, absent = _CANDIDATES[name]
        found = find()
        paths += found
        if not found:
            missing.append(absent)
    return paths, missing


def load_blas(path: str) -> BlasStatus:
    """Load the CBLAS library at ``path`` so that MLX uses it: with ``RTLD_GLOBAL`` when it exports the standard
    names, else (the ``scipy_`` prefix) privately, with the names of :data:`MLX_SYMBOLS` and
    :data:`OPENBLAS_SYMBOLS` it has given their standard names (:mod:`sd_mlx.cpu.elf_aliases`).

    Must run before ``mlx`` is imported.

    Raises:
        OSError: the library cannot be loaded, exports no ``cblas_sgemm`` under any known prefix, or its aliases
            cannot be made.
    """
    with _short_thread_timeout():
        lib = ctypes.CDLL(path)  # privately first: the global scope gets only what MLX should see
    prefix = next((p for p in _PREFIXES if _function(lib, p + "cblas_sgemm")), None)
    if prefix is None:
        raise OSError(f"exports no cblas_sgemm (nor {', '.join(p + 'cblas_sgemm' for p in _PREFIXES[1:])})")
    if prefix == "":
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # the same object, now in the global scope
    else:
        from .elf_aliases import load_aliases

        aliases = {name: _function(lib, prefix + name) for name in MLX_SYMBOLS + OPENBLAS_SYMBOLS}
        try:
            load_aliases({name: address for name, address in aliases.items() if address})
        except ValueError as e:
            raise OSError(str(e)) from e
    how = "" if prefix == "" else f", {prefix}* functions under their standard names"
    return BlasStatus(True, path, f"optimised BLAS loaded: {path}{_openblas_details(lib, prefix)}{how}")


def enable_fast_blas() -> BlasStatus:
    """Load an optimised CBLAS so that MLX's CPU backend uses it (Linux only); see the module's notes for where it
    is looked for.

    Must run before the first ``import mlx``; ``import sd_mlx`` calls it. Idempotent. Never raises: a library that
    fails to load is skipped (its error goes into the status's reason) and the next candidate tried.

    Returns:
        A :class:`BlasStatus`.
    """
    if not sys.platform.startswith("linux"):
        return BlasStatus(True, "accelerate" if sys.platform == "darwin" else None, "not Linux: MLX's own BLAS")
    loaded = _global_cblas()
    if loaded:
        return BlasStatus(True, loaded, f"optimised BLAS already loaded: {loaded}")
    choice = os.environ.get("SD_MLX_BLAS", "").strip()
    if choice.lower() in ("off", "0", "none", "reference"):
        return BlasStatus(False, None, "SD_MLX_BLAS=off: MLX's reference BLAS", "unset SD_MLX_BLAS")
    if "mlx.core" in sys.modules:
        return BlasStatus(False, None, "mlx was imported before sd_mlx, too late to load a fast BLAS; "
                                       "import sd_mlx first", "import sd_mlx before mlx")
    paths, missing = candidate_libraries(choice)
    errors = []
    for path in paths:
        try:
            return load_blas(path)
        except OSError as e:
            errors.append(f"could not load {path}: {e}")
    return BlasStatus(False, None, "; ".join(errors + missing) or "no optimised BLAS found", _fix_for(choice, paths))


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
