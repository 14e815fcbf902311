"""Shared pytest setup for sd_mlx.

* The repository root goes on ``sys.path`` (so ``tools.make_checkpoint`` imports).
* :func:`assets_dir` / the ``assets`` fixture: the read-only assets folder (``$SD_MLX_ASSETS`` or
  ``<repo>/../shared/assets``); tests needing it are skipped with a reason when it is absent.
* Session fixtures ``tiny_sd1``, ``tiny_sd2``, ``tiny_sd1_noprefix``: tiny random-weight diffusers checkpoints built
  once and cached in ``<repo>/.cache/test-checkpoints/<name>-<hash>`` (the hash covers the generator's source, the
  seed and the diffusers/transformers/torch versions, so a change to any of them rebuilds). Skipped with a reason
  when diffusers/transformers/torch or the assets are missing.
* ``sd_mlx`` is imported first, so its fast BLAS is loaded before anything imports ``mlx``.
* Tests marked ``slow`` run only with ``--runslow`` or ``SD_MLX_SLOW=1``; tests marked ``cpu_kernels`` (the Linux CPU
  machinery itself) are skipped when ``SD_MLX_CPU_KERNELS=0`` selects the portable path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Importing sd_mlx before any test module imports mlx loads the optimised BLAS for MLX's CPU backend (sd_mlx.cpu.blas);
# without it MLX convolutions and matmuls on Linux CPUs are several times slower.
import sd_mlx  # noqa: E402,F401

CHECKPOINT_CACHE = REPO_ROOT / ".cache" / "test-checkpoints"
TINY_SEED = 0


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread():
    """Run the torch reference single-threaded: its OpenMP threads and the OpenBLAS threads MLX uses
    (sd_mlx.cpu.blas) busy-wait against each other on small machines, making the reference 10-20x slower."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assets_dir() -> Path:
    """Return the assets folder (``$SD_MLX_ASSETS`` or ``<repo>/../shared/assets``); skip the test if absent."""
    env = os.environ.get("SD_MLX_ASSETS")
    path = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "assets"
    if not path.is_dir():
        pytest.skip(f"assets folder {path} not found (set SD_MLX_ASSETS to the shared assets folder)")
    return path


@pytest.fixture(scope="session")
def assets() -> Path:
    """The assets folder (see :func:`assets_dir`)."""
    return assets_dir()


def require_reference_libs() -> None:
    """Skip unless torch, diffusers and transformers (the ``test`` extra) can be imported."""
    missing = []
    for name in ("torch", "diffusers", "transformers"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        pytest.skip(f"reference libraries not installed: {', '.join(missing)} (pip install -e '.[test]')")


def _cache_key(name: str, seed: int) -> str:
    import diffusers
    import torch
    import transformers

    h = hashlib.sha256()
    h.update((REPO_ROOT / "tools" / "make_checkpoint.py").read_bytes())
    h.update(f"{name}|{seed}|{diffusers.__version__}|{transformers.__version__}|{torch.__version__}".encode())
    return h.hexdigest()[:16]


def build_cached_checkpoint(name: str, kind: str, *, text_encoder_prefix: bool, seed: int = TINY_SEED) -> Path:
    """Build (or reuse) a tiny checkpoint in the cache folder; safe against concurrent runs (atomic rename)."""
    assets_dir()
    require_reference_libs()
    from tools.make_checkpoint import make_tiny_checkpoint

    target = CHECKPOINT_CACHE / f"{name}-{_cache_key(name, seed)}"
    if (target / "model_index.json").is_file():
        return target
    CHECKPOINT_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=CHECKPOINT_CACHE))
    try:
        make_tiny_checkpoint(kind, tmp / "ckpt", text_encoder_prefix=text_encoder_prefix, seed=seed)
        try:
            os.replace(tmp / "ckpt", target)
        except OSError:
            if not (target / "model_index.json").is_file():  # lost a race to a broken build: retry once
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp / "ckpt", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def tiny_sd1() -> Path:
    """Tiny SD1-like diffusers checkpoint (epsilon, PNDM config, text encoder keys with ``text_model.``)."""
    return build_cached_checkpoint("tiny-sd1", "sd1", text_encoder_prefix=True)


@pytest.fixture(scope="session")
def tiny_sd2() -> Path:
    """Tiny SD2-like diffusers checkpoint (v_prediction DDIM config, linear projections, upcast attention,
    tokenizer padding with ``!``; text encoder keys with ``text_model.``)."""
    return build_cached_checkpoint("tiny-sd2", "sd2", text_encoder_prefix=True)


@pytest.fixture(scope="session")
def tiny_sd1_noprefix() -> Path:
    """Tiny SD1-like checkpoint whose text encoder keys have no ``text_model.`` prefix (transformers 5 layout)."""
    return build_cached_checkpoint("tiny-sd1-noprefix", "sd1", text_encoder_prefix=False)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False,
                     help="run tests marked slow (full-size checks; also SD_MLX_SLOW=1)")


def portable_path() -> bool:
    """True when this run tests the portable path (``SD_MLX_CPU_KERNELS=0``: the code a Mac or CUDA user runs)."""
    from sd_mlx.cpu.native import turned_off

    return turned_off("SD_MLX_CPU_KERNELS")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--runslow") or os.environ.get("SD_MLX_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow test: run with --runslow or SD_MLX_SLOW=1")
    skip_kernels = pytest.mark.skip(reason="tests the Linux CPU machinery, off on the portable path "
                                           "(SD_MLX_CPU_KERNELS=0)")
    portable = portable_path()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "cpu_kernels" in item.keywords and portable:
            item.add_marker(skip_kernels)


def run_probe(program: str, cache: Path, **env: str) -> tuple[str, str, float]:
    """Run ``python -c program`` with ``XDG_CACHE_HOME=cache`` and ``env``; the program prints
    ``available | reason | value``, returned as strings and a float (the native-kernel fallback tests)."""
    full = dict(os.environ, XDG_CACHE_HOME=str(cache), **env)
    out = subprocess.run([sys.executable, "-c", program], env=full, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    available, reason, total = (p.strip() for p in out.stdout.strip().split("|"))
    return available, reason, float(total)
