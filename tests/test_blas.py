"""The Linux CPU fast path: an optimised BLAS is loaded before mlx (by default the scipy-openblas32 dependency,
whose prefixed functions get their standard names from a generated ELF object), MLX's results stay the same, and
the slow path is reported with the one command that fixes it."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sd_mlx.cpu import blas, elf_aliases
from sd_mlx.cpu.blas import BlasStatus, enable_fast_blas

LINUX = sys.platform.startswith("linux")
# where sd_mlx depends on scipy-openblas32 (pyproject.toml)
PIP_BLAS_PLATFORM = LINUX and platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64")
linux_only = pytest.mark.skipif(not LINUX, reason="the BLAS swap is for MLX's Linux CPU backend")

PROBE = r"""
import json, sys
for name in sys.argv[1:]:  # packages to hide: find_spec gives None for a None entry in sys.modules
    sys.modules[name] = None
import sd_mlx
import mlx.core as mx
import numpy as np
s = sd_mlx.BLAS_STATUS
rng = np.random.default_rng(0)
a = rng.standard_normal((256, 192)).astype(np.float32); b = rng.standard_normal((192, 160)).astype(np.float32)
x = rng.standard_normal((1, 12, 10, 8)).astype(np.float32); w = rng.standard_normal((16, 3, 3, 8)).astype(np.float32)
m = rng.standard_normal((6, 6)).astype(np.float32); spd = m @ m.T + 6 * np.eye(6, dtype=np.float32)
mm = np.array(mx.array(a) @ mx.array(b))
conv = np.array(mx.conv2d(mx.array(x), mx.array(w), padding=1))
ref_mm = a.astype(np.float64) @ b.astype(np.float64)
# LAPACK, through the functions MLX imports (getrf/getri, potrf, geqrf/orgqr, gesdd, syevd), on the CPU stream
cpu = mx.cpu
inv = np.array(mx.linalg.inv(mx.array(m), stream=cpu))
chol = np.array(mx.linalg.cholesky(mx.array(spd), stream=cpu))
q, r = (np.array(t) for t in mx.linalg.qr(mx.array(m), stream=cpu))
sv = np.array(mx.linalg.svd(mx.array(m), compute_uv=False, stream=cpu))
ev = np.array(mx.linalg.eigvalsh(mx.array(spd), stream=cpu))
m64, spd64 = m.astype(np.float64), spd.astype(np.float64)
lapack_err = max(float(np.abs(inv @ m64 - np.eye(6)).max()), float(np.abs(chol @ chol.T - spd64).max()),
                 float(np.abs(q @ r - m64).max()),
                 float(np.abs(sv - np.linalg.svd(m64, compute_uv=False)).max()),
                 float(np.abs(ev - np.linalg.eigvalsh(spd64)).max()))
print(json.dumps({"fast": s.fast, "library": s.library, "reason": s.reason, "fix": s.fix,
                  "mm_err": float(np.abs(mm - ref_mm).max()), "lapack_err": lapack_err,
                  "conv": conv.ravel()[:64].tolist()}))
"""


def _probe(env_extra: dict[str, str], hide: tuple[str, ...] = (), pythonpath: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SD_MLX_BLAS", "OPENBLAS_CORETYPE")}
    env.update(env_extra)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", PROBE, *hide], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_exact(res: dict) -> None:
    """float32 round-off only, as with the reference BLAS."""
    assert res["mm_err"] < 1e-3 and res["lapack_err"] < 1e-3, res


@pytest.fixture(scope="module")
def reference() -> dict:
    ref = _probe({"SD_MLX_BLAS": "off"})
    assert ref["fast"] is False and "SD_MLX_BLAS=off" in ref["reason"] and ref["fix"] == "unset SD_MLX_BLAS"
    _assert_exact(ref)
    return ref


@linux_only
@pytest.mark.parametrize("choice", ["", "scipy-openblas32", "system"])
def test_fast_and_reference_blas_agree(reference, choice):
    fast = _probe({"SD_MLX_BLAS": choice} if choice else {})
    if not fast["fast"]:
        if choice == "system" or not PIP_BLAS_PLATFORM:
            pytest.skip(f"not on this machine: {fast['reason']}")
        pytest.fail(f"the scipy-openblas32 dependency did not load: {fast['reason']}")
    assert fast["library"] and fast["fix"] is None
    _assert_exact(fast)
    np.testing.assert_allclose(fast["conv"], reference["conv"], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not PIP_BLAS_PLATFORM, reason="sd_mlx depends on scipy-openblas32 on Linux x86_64/aarch64 only")
def test_default_is_the_pip_package_with_runtime_cpu_dispatch():
    """A plain install lands on scipy-openblas32 (before any system OpenBLAS), an OpenBLAS that picks its kernels
    for the CPU at run time (DYNAMIC_ARCH), and the Winograd kernel's thread control reaches it."""
    res = _probe({})
    assert res["fast"] is True, res["reason"]
    assert f"{os.sep}scipy_openblas32{os.sep}" in res["library"]
    assert "DYNAMIC_ARCH" in res["reason"] and "kernels for " in res["reason"]
    assert "scipy_* functions under their standard names" in res["reason"]
    # OpenBLAS's kernels for another CPU family (what a CPU without AVX-512 gets) give the same results
    other = _probe({"OPENBLAS_CORETYPE": "Haswell" if platform.machine() == "x86_64" else "ARMV8"})
    assert other["fast"] is True and ("kernels for Haswell" in other["reason"] or "kernels for ARMV8" in
                                      other["reason"] or "kernels for armv8" in other["reason"]), other["reason"]
    _assert_exact(other)


def _undefined_dynamic_symbols(path: Path) -> set[str]:
    """Names of the undefined symbols in an ELF-64 little-endian file's ``.dynsym`` (what it imports)."""
    data = path.read_bytes()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = set()
    for _name, kind, _fl, _addr, offset, size, link, _info, _align, entsize in sections:
        if kind != 11:  # SHT_DYNSYM
            continue
        strtab = sections[link][4]
        for k in range(1, size // entsize):
            st_name, _i, _o, shndx, _v, _s = struct.unpack_from("<IBBHQQ", data, offset + k * entsize)
            if shndx == 0:
                end = data.index(b"\0", strtab + st_name)
                names.add(data[strtab + st_name:end].decode())
    return names


@pytest.mark.skipif(not PIP_BLAS_PLATFORM or sys.byteorder != "little", reason="MLX's Linux wheels")
def test_every_blas_and_lapack_function_mlx_imports_gets_its_standard_name():
    """The aliases cover what the installed MLX imports (an MLX that starts using another BLAS or LAPACK function
    fails here instead of quietly calling the reference one), and scipy-openblas32 has each of them."""
    import importlib.util

    libmlx = Path(importlib.util.find_spec("mlx").submodule_search_locations[0]) / "lib" / "libmlx.so"
    if not libmlx.is_file():
        pytest.skip(f"{libmlx} not found (an MLX built differently)")
    imported = _undefined_dynamic_symbols(libmlx)
    blas_like = {n for n in imported if n.startswith("cblas_") or (n.endswith("_") and not n.startswith("_"))}
    assert "cblas_sgemm" in blas_like
    assert blas_like <= set(blas.MLX_SYMBOLS), sorted(blas_like - set(blas.MLX_SYMBOLS))
    lib_path = blas.candidate_libraries("scipy-openblas32")[0]
    assert lib_path, "scipy-openblas32 is not installed"
    lib = ctypes.CDLL(lib_path[0])
    missing = [n for n in blas.MLX_SYMBOLS + blas.OPENBLAS_SYMBOLS if not hasattr(lib, "scipy_" + n)]
    assert not missing


_ALIAS_PROBE = r"""
import ctypes, json, os, sys
if sys.argv[1:] == ["no-memfd"]:  # the temporary-file fallback
    del os.memfd_create
from sd_mlx.cpu import blas, elf_aliases
libc = ctypes.CDLL(None)
labs = ctypes.cast(libc.labs, ctypes.c_void_p).value
names = [f"sd_mlx_test_abs_{k}" for k in range(40)]  # several per hash bucket
elf_aliases.load_aliases({n: labs for n in names})
g = ctypes.CDLL(None)  # the global scope
values = []
for n in names:
    fn = getattr(g, n)
    fn.restype, fn.argtypes = ctypes.c_long, [ctypes.c_long]
    values.append(fn(-7 - len(values)))
print(json.dumps({"values": values, "owner": blas._library_of(ctypes.cast(g.sd_mlx_test_abs_3, ctypes.c_void_p).value),
                  "libc": blas._library_of(labs), "absent": hasattr(g, "sd_mlx_test_abs_40")}))
"""


@pytest.mark.skipif(not LINUX or elf_aliases.machine_code() is None, reason="ELF aliases: Linux x86_64/aarch64")
@pytest.mark.parametrize("where", ["memfd", "no-memfd"])
def test_aliases_are_global_names_of_the_original_functions(where):
    """Names from a generated ELF object resolve in the global scope to the original function (called through
    them with the right results), and dladdr of an alias names the original library; also where the object goes
    through a temporary file (no memfd_create)."""
    out = subprocess.run([sys.executable, "-c", _ALIAS_PROBE, where], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["values"] == [7 + k for k in range(40)]
    assert res["owner"] == res["libc"] and "libc" in os.path.basename(res["libc"])
    assert res["absent"] is False


def test_alias_object_layout_and_bad_input():
    image = elf_aliases.alias_object({"cblas_sgemm": 0x7F0000001000, "sgetrf_": 0x7F0000002000}, 62)
    assert image[:4] == b"\x7fELF" and image[4] == 2 and image[5] == 1  # ELF-64, little-endian
    assert struct.unpack_from("<HH", image, 16) == (3, 62)  # ET_DYN, x86_64
    assert b"\0cblas_sgemm\0sgetrf_\0" in image and struct.pack("<Q", 0x7F0000001000) in image
    for bad in ({}, {"": 1}, {"x": 0}, {"x\0y": 1}, {"x": 2**64}, {"é": 1}):
        with pytest.raises(ValueError):
            elf_aliases.alias_object(bad, 62)
    assert elf_aliases.elf_hash(b"") == 0 and elf_aliases.elf_hash(b"a") == ord("a")
    # the SysV hash of "printf" (as in the DT_HASH table of glibc's ld.so, which this function reproduces)
    assert elf_aliases.elf_hash(b"printf") == 0x077905A6


@linux_only
def test_missing_package_falls_back_and_names_the_command():
    """Without scipy-openblas32, the status says so and its fix is the pip command for this interpreter; MLX's
    results are still right (reference BLAS)."""
    res = _probe({"SD_MLX_BLAS": "scipy-openblas32"}, hide=("scipy_openblas32",))
    assert res["fast"] is False and res["library"] is None
    assert res["reason"] == "scipy-openblas32 is not installed"
    assert res["fix"] == f"`{sys.executable} -m pip install scipy-openblas32`"
    _assert_exact(res)
    hint = blas.slow_path_hint(BlasStatus(res["fast"], res["library"], res["reason"], res["fix"]))
    assert "reference BLAS" in hint and hint.endswith(f"Fix: `{sys.executable} -m pip install scipy-openblas32`")


@linux_only
def test_broken_package_is_reported_and_the_next_candidate_used(tmp_path):
    """A scipy-openblas32 whose library does not load is skipped with its error; the fix is a reinstall; by
    default the next candidate (a system OpenBLAS, where there is one) is used."""
    pkg = tmp_path / "scipy_openblas32"
    (pkg / "lib").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('never imported by sd_mlx')\n")
    (pkg / "lib" / "libscipy_openblas.so").write_bytes(b"not an ELF file")
    only = _probe({"SD_MLX_BLAS": "scipy-openblas32"}, pythonpath=str(tmp_path))
    assert only["fast"] is False
    assert only["reason"].startswith(f"could not load {pkg / 'lib' / 'libscipy_openblas.so'}: ")
    assert only["fix"].endswith("-m pip install scipy-openblas32 --force-reinstall`")
    _assert_exact(only)
    default = _probe({}, pythonpath=str(tmp_path))
    system = blas.candidate_libraries("system")[0]
    if system:
        assert default["fast"] is True and default["library"] == system[0]
    else:
        assert default["fast"] is False and "could not load" in default["reason"]


@linux_only
def test_bad_explicit_library_is_reported_not_fatal():
    res = _probe({"SD_MLX_BLAS": "/nonexistent/libblas.so"})
    assert res["fast"] is False and "could not load /nonexistent/libblas.so" in res["reason"]
    assert "unset SD_MLX_BLAS" in res["fix"]
    _assert_exact(res)


@linux_only
def test_library_without_cblas_is_refused(tmp_path):
    import ctypes.util

    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm found")
    with pytest.raises(OSError, match="exports no cblas_sgemm"):
        blas.load_blas(libm)


def test_candidate_order_and_choices(monkeypatch):
    monkeypatch.setattr(blas, "_CANDIDATES", {
        "scipy-openblas32": (lambda: ["/pip/libscipy_openblas.so"], "pip missing"),
        "system": (lambda: [], "no system OpenBLAS found"),
        "mkl": (lambda: ["/mkl/libmkl_rt.so.2"], "mkl missing"),
    })
    assert blas.candidate_libraries("") == (["/pip/libscipy_openblas.so", "/mkl/libmkl_rt.so.2"],
                                            ["no system OpenBLAS found"])
    assert blas.candidate_libraries("system") == ([], ["no system OpenBLAS found"])
    assert blas.candidate_libraries("mkl") == (["/mkl/libmkl_rt.so.2"], [])
    assert blas.candidate_libraries("/x/libblas.so") == (["/x/libblas.so"], [])
    assert list(blas._CANDIDATES) == ["scipy-openblas32", "system", "mkl"]


def test_fixes_name_one_command():
    py = sys.executable
    assert blas._fix_for("", []) == f"`{py} -m pip install scipy-openblas32`"
    assert blas._fix_for("", ["/v/site-packages/scipy_openblas32/lib/libscipy_openblas.so"]) == \
        f"`{py} -m pip install scipy-openblas32 --force-reinstall`"
    assert blas._fix_for("mkl", []) == f"`{py} -m pip install mkl`"
    assert "apt-get install libopenblas0-pthread" in blas._fix_for("system", [])
    assert blas.slow_path_hint(BlasStatus(False, None, "x")).endswith(f"Fix: {blas.fix_command()}")


def test_enable_is_idempotent_and_never_raises():
    status = enable_fast_blas()
    assert isinstance(status, BlasStatus) and status.reason
    if LINUX and status.fast:
        assert "already loaded" in status.reason  # the library conftest's `import sd_mlx` loaded


_TIMEOUT_PROBE = """
import ctypes, os, sys
real = ctypes.CDLL
seen = {}
def spy(name, *a, **k):
    seen.setdefault(name, os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
    return real(name, *a, **k)
ctypes.CDLL = spy
import sd_mlx
s = sd_mlx.BLAS_STATUS
print(s.fast, seen.get(s.library), os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
"""


@linux_only
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
    assert rest == f"{expected} {user_value}"  # set during the library's first load, as before it afterwards


def test_cli_warns_with_the_fix_before_loading_any_model(tmp_path, monkeypatch, capsys):
    """On the slow path the CLI prints the reason and the one command that fixes it before any model loads."""
    import sd_mlx
    import sd_mlx.pipeline
    from sd_mlx import txt2img

    slow = BlasStatus(False, None, "scipy-openblas32 is not installed", f"`{blas.fix_command()}`")
    monkeypatch.setattr(sd_mlx, "BLAS_STATUS", slow)

    class Stop(Exception):
        pass

    seen = {}

    def no_load(*args, **kwargs):
        seen["stderr"] = capsys.readouterr().err
        raise Stop

    monkeypatch.setattr(sd_mlx.pipeline, "load_pipeline", no_load)
    with pytest.raises(Stop):
        txt2img.main(["a cat", "--model", str(tmp_path), "--seed", "1", "--output", str(tmp_path / "c.png")])
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        assert f"warning: MLX is using the reference BLAS on this Linux CPU (50-70x slower): scipy-openblas32 is " \
               f"not installed. Fix: `{blas.fix_command()}`" in seen["stderr"]
    else:
        assert "reference BLAS" not in seen["stderr"]  # on a GPU the CPU BLAS does not matter
