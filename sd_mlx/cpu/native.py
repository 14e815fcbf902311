"""Building and loading sd_mlx's C++ CPU kernels (``sd_mlx/csrc``) at first use.

Each kernel source is compiled once per source (with the headers beside it), flags, compiler and CPU with ``g++
-O3 -march=native -fno-math-errno`` (``$CXX`` when set, which may carry a launcher such as ``ccache g++``) into
``$XDG_CACHE_HOME/sd_mlx/native`` (default ``~/.cache``) and loaded with ``ctypes`` by the module that uses it
(:mod:`sd_mlx.cpu.attention`, :mod:`sd_mlx.cpu.winograd`, :mod:`sd_mlx.cpu.rowwise`). The install is atomic
(concurrent builders each install a complete file) and the library is world-readable (a cache shared by several
users). The cache key includes the CPU's flags: ``-march=native`` code must not be reused on another CPU sharing a
home folder.

It also holds what the kernel wrappers share: loading with their status record (:func:`bind_kernel`,
:class:`KernelStatus`), the evaluation of their inputs into buffers the C++ reads (:func:`evaluated_float32`), the
output arrays the C++ fills (:class:`KernelOutput`), and the ``mx.custom_function`` that takes
the derivatives (and the value under ``mx.compile``/``mx.vmap``) from an MLX reference
(:func:`with_reference_derivatives`). This module does not import MLX at import time: ``import sd_mlx`` reaches
it (through :mod:`sd_mlx.cpu.memory`) before the fast BLAS is loaded, which must come first.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # MLX is imported at call time only (see above)
    import mlx.core as mx
    import numpy as np

CSRC = Path(__file__).with_name("csrc")
FLAGS = ("-std=c++17", "-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-pthread")


def compiler() -> list[str] | None:
    """The compiler command: ``$CXX`` (split like a shell would, so it may carry a launcher or flags), else the
    first of g++, c++, clang++ on ``PATH``; ``None`` when there is none."""
    try:
        cxx = shlex.split(os.environ.get("CXX", ""))
    except ValueError:  # unbalanced quotes
        return None
    if cxx:
        found = shutil.which(cxx[0]) or (cxx[0] if os.path.isfile(cxx[0]) else None)
        return [found, *cxx[1:]] if found else None
    for name in ("g++", "c++", "clang++"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sd_mlx/native``, default ``~/.cache/sd_mlx/native``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sd_mlx" / "native"


def _cpu_signature() -> str:
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(("flags", "Features", "model name")):
                    sig += line
    except OSError:
        pass
    return sig


def build_library(source: Path, cxx: list[str], libs: tuple[str, ...] = ()) -> Path:
    """Compile ``source`` into the cache (once per source and the ``.h`` headers beside it, flags, compiler and
    CPU); return the library's path.

    Args:
        source: a ``.cpp`` file of ``sd_mlx/csrc``.
        cxx: the compiler command (:func:`compiler`).
        libs: extra link flags (e.g. ``("-ldl",)``).

    Raises:
        RuntimeError: the compiler failed (its last output lines are in the message).
        OSError: the cache folder cannot be written.
        subprocess.SubprocessError: the compiler timed out.
    """
    # the source and the headers next to it (which it may include)
    text = b"\0".join([source.read_bytes(), *(h.read_bytes() for h in sorted(source.parent.glob("*.h")))])
    flags = [*FLAGS, *libs]
    version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([text, " ".join(cxx + flags).encode(), version.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    folder = cache_dir()
    lib = folder / f"{source.stem}-{key}.so"
    if lib.is_file():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([*cxx, *FLAGS, str(source), "-o", tmp, *libs], capture_output=True, text=True,
                              timeout=600)
        if done.returncode != 0:
            tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise RuntimeError(f"{' '.join(cxx)} failed ({done.returncode}): {tail}")
        os.chmod(tmp, 0o755)  # mkstemp made it private; others sharing the cache may load it
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def cpu_threads() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


NO_COMPILER = "no C++ compiler (g++, c++, clang++ or $CXX) found; install one (Debian/Ubuntu: `apt-get install g++`)"


def turned_off(env: str) -> bool:
    """True when the environment variable ``env`` is set to 0, off, false or no."""
    return os.environ.get(env, "1").strip().lower() in ("0", "off", "false", "no")


@dataclass(frozen=True)
class KernelStatus:
    """Whether one of the C++ CPU kernels is in use in this process.

    Attributes:
        available: True when the library is built and loaded (and whatever else it needs is found).
        library: path of the loaded shared library, or ``None``.
        reason: one line saying why (for ``--verbose`` output, warnings and the tools' reports).
        turned_off: True when the user turned it off with its environment variable: nothing to warn about.
    """

    available: bool
    library: str | None
    reason: str
    turned_off: bool = False


@dataclass(frozen=True)
class LoadedKernel:
    """The outcome of :func:`load_kernel`.

    Attributes:
        library: the loaded library, or ``None``.
        path: its path, or ``None``.
        problem: one line saying why it is not loaded (``None`` when it is).
        turned_off: True when the user turned it off with its environment variable.
    """

    library: ctypes.CDLL | None
    path: str | None
    problem: str | None
    turned_off: bool = False


def bind_kernel(source: Path, env: str, what: str, *, off_reason: str, in_use: str,
                bind: Callable[[ctypes.CDLL], Any], libs: tuple[str, ...] = ()) -> tuple[Any, KernelStatus]:
    """Build and load a kernel (:func:`load_kernel`) and bind its entry points. Never raises.

    Args:
        source, env, what, libs: as :func:`load_kernel`.
        off_reason: what runs instead, for the status when ``env`` turns the kernel off (``"{env}=0: ..."``).
        in_use: the status's reason when it loaded (``"{in_use}: {path}"``).
        bind: ``library -> entry points`` (setting their ctypes signatures); may raise ``AttributeError``.

    Returns:
        ``(bind(library), status)``, or ``(None, status saying why not)``.
    """
    kernel = load_kernel(source, env, what, libs)
    if kernel.turned_off:
        return None, KernelStatus(False, None, f"{env}=0: {off_reason}", turned_off=True)
    if kernel.library is None:
        return None, KernelStatus(False, None, kernel.problem or f"could not load {what}")
    try:
        bound = bind(kernel.library)
    except AttributeError as e:
        return None, KernelStatus(False, None, f"could not load {what}: {e}")
    return bound, KernelStatus(True, kernel.path, f"{in_use}: {kernel.path}")


def status_on_cpu(status: Callable[[], KernelStatus]) -> KernelStatus | None:
    """``status()`` when MLX computes on the CPU (the only place the C++ kernels are used), else ``None``. Never
    raises."""
    import mlx.core as mx  # noqa: F811  (not at import time: see the module's notes)

    return status() if mx.default_device() == mx.cpu else None


def load_kernel(source: Path, env: str, what: str, libs: tuple[str, ...] = ()) -> LoadedKernel:
    """Build (once, cached) and load the kernel library of ``source`` unless ``env`` turns it off. Never raises.

    Args:
        source: a ``.cpp`` file of ``sd_mlx/csrc``.
        env: the environment variable that turns it off (see :func:`turned_off`).
        what: its name in messages, e.g. ``"the fused CPU attention"``.
        libs: extra link flags.
    """
    if turned_off(env):
        return LoadedKernel(None, None, f"{env}=0", turned_off=True)
    cxx = compiler()
    if cxx is None:
        return LoadedKernel(None, None, NO_COMPILER)
    try:
        path = build_library(source, cxx, libs)
        return LoadedKernel(ctypes.CDLL(str(path)), str(path), None)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return LoadedKernel(None, None, f"could not build {what}: {e}")


def evaluated_float32(*arrays: mx.array) -> tuple[list[np.ndarray], list[mx.array]] | None:
    """Evaluate ``arrays`` (``mx.array``) as float32 and row-contiguous (no copy when they already are) and return
    zero-copy numpy views of MLX's buffers, in order, with the float32 arrays that own them (keep those alive while
    the views are used); ``None`` when they cannot be evaluated (tracers inside ``mx.compile`` or ``mx.vmap``)."""
    import mlx.core as mx  # noqa: F811  (not at import time: see the module's notes)
    import numpy as np  # noqa: F811

    owned = [mx.contiguous(a.astype(mx.float32)) for a in arrays]
    try:
        mx.eval(*owned)
    except (ValueError, RuntimeError):
        return None
    return [np.ascontiguousarray(a) for a in owned], owned


class KernelOutput:
    """A float32 output buffer for a C++ kernel: ``view`` (a writable, C-contiguous numpy array) to fill, then
    :meth:`array` for the result as an ``mx.array``.

    The buffer is a new evaluated MLX array (``mx.zeros``) whose memory the numpy view shares, so the filled
    result needs no copy: an ``(8192, 320)`` float32 output costs 0.5 ms to allocate and zero against 1.1 ms to
    copy from a numpy array on a 2-core x86 CPU, comes from MLX's buffer cache, counts in
    ``mx.get_peak_memory`` and never exists twice. Nothing else holds the array while the kernel writes it. Should
    MLX ever hand out a read-only view, the buffer is a numpy array copied by :meth:`array` instead.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        import mlx.core as mx  # noqa: F811  (not at import time: see the module's notes)
        import numpy as np  # noqa: F811

        out = mx.zeros(shape, mx.float32)
        mx.eval(out)
        view = np.asarray(out)
        if view.flags.writeable and view.flags.c_contiguous and view.shape == tuple(shape):
            self._array: mx.array | None = out
            self.view = view
        else:
            self._array, self.view = None, np.empty(shape, np.float32)

    def array(self) -> mx.array:
        """The filled buffer as an ``mx.array`` (float32, the given shape)."""
        import mlx.core as mx  # noqa: F811

        return self._array if self._array is not None else mx.array(self.view)


def with_reference_derivatives(kernel: Callable, reference: Callable) -> Callable:
    """``kernel`` as an ``mx.custom_function`` whose derivatives are those of ``reference``.

    Args:
        kernel: ``(*arrays) -> mx.array | None``, a native kernel's wrapper; ``None`` when its inputs cannot be
            evaluated (inside ``mx.compile`` or ``mx.vmap``). Its output is a constant to MLX.
        reference: ``(*arrays) -> mx.array``, the same function written with MLX operations: it gives the value
            where ``kernel`` returns ``None``, and the vjp and jvp (``mx.grad``, ``mx.vjp``, ``mx.jvp``). Inputs
            not differentiated get zero tangents (MLX passes ``None`` for them).

    Returns:
        A function of the same positional arrays.
    """
    import mlx.core as mx  # noqa: F811  (not at import time: see the module's notes)

    @mx.custom_function
    def fused(*args: mx.array) -> mx.array:
        out = kernel(*args)
        return reference(*args) if out is None else out

    @fused.vjp
    def fused_vjp(primals: tuple, cotangent: mx.array, output: mx.array) -> list:
        return mx.vjp(reference, list(primals), [cotangent])[1]

    @fused.jvp
    def fused_jvp(primals: tuple, tangents: tuple) -> list:
        tangents = [mx.zeros_like(p) if t is None else t for p, t in zip(primals, tangents)]
        return mx.jvp(reference, list(primals), tangents)[1]

    return fused
