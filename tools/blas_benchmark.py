"""Speed of MLX's Linux CPU backend with each BLAS sd_mlx can load: a float32 matrix product and one U-Net call.

Each measurement runs in a fresh subprocess (``python tools/blas_benchmark.py --worker ...``, one JSON line) with
``SD_MLX_BLAS`` set to the engine's choice (see :mod:`sd_mlx.cpu.blas`), since the BLAS is fixed when ``mlx`` is
first imported. Engines alternate round by round, so a machine that slows down over the run (other processes on a
shared host) spreads over all of them; every figure is reported with its spread over the rounds.

Engines: ``off`` (MLX's reference BLAS), ``scipy-openblas32``, ``system`` (a system OpenBLAS), ``mkl``, or a
library path; ``NAME@CORE`` also sets ``OPENBLAS_CORETYPE=CORE`` (OpenBLAS's kernels for another CPU family, e.g.
``scipy-openblas32@Haswell``: the AVX2 kernels a CPU without AVX-512 gets from a ``DYNAMIC_ARCH`` build).

Figures:

* ``matmul``: ``(n, n) @ (n, n)`` float32 through ``mx.matmul``, GFLOP/s (``2 n^3`` per product) of the median of
  ``--repeats`` products after two warm-up products.
* ``unet``: one call of a U-Net (``unet/`` of a diffusers folder, float32) on ``(2, 64, 64, 4)`` latents with a
  ``(2, 77, cross_attention_dim)`` context (SD1.5 at 512x512 with classifier-free guidance: one denoising step), in
  seconds, after ``--unet-warmup`` untimed calls.

Usage::

    python tools/blas_benchmark.py --engines off,scipy-openblas32,system --rounds 3 --json blas.json
    python tools/blas_benchmark.py --engines scipy-openblas32,system --unet .cache/benchmark-checkpoints/X/unet
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def engine_env(engine: str) -> dict[str, str]:
    """The environment of a worker for ``engine`` (``NAME`` or ``NAME@CORE``, see the module's notes)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SD_MLX_BLAS", "OPENBLAS_CORETYPE")}
    name, _, core = engine.partition("@")
    env["SD_MLX_BLAS"] = name
    if core:
        env["OPENBLAS_CORETYPE"] = core
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def _worker(a: argparse.Namespace) -> dict[str, Any]:
    import sd_mlx  # first: loads the BLAS before mlx is imported

    import mlx.core as mx

    out: dict[str, Any] = {"blas_status": {"fast": sd_mlx.BLAS_STATUS.fast, "library": sd_mlx.BLAS_STATUS.library,
                                           "reason": sd_mlx.BLAS_STATUS.reason}}
    mx.set_default_device(mx.cpu)
    if a.worker == "matmul":
        n = a.size
        x, y = mx.random.normal((n, n), key=mx.random.key(0)), mx.random.normal((n, n), key=mx.random.key(1))
        mx.eval(x, y)
        times = []
        for i in range(2 + a.repeats):
            t = time.perf_counter()
            mx.eval(x @ y)
            if i >= 2:
                times.append(time.perf_counter() - t)
        out["seconds"] = statistics.median(times)
        out["gflops"] = 2 * n**3 / out["seconds"] / 1e9
    else:
        from sd_mlx.models.unet import load_unet

        unet = load_unet(a.unet, "float32")
        c = unet.config
        latents = mx.random.normal((2, 64, 64, c.in_channels), key=mx.random.key(0))
        context = mx.random.normal((2, 77, c.cross_attention_dim), key=mx.random.key(1))
        mx.eval(latents, context)
        for _ in range(a.unet_warmup):
            mx.eval(unet(latents, 500, context))
        t = time.perf_counter()
        mx.eval(unet(latents, 500, context))
        out["seconds"] = time.perf_counter() - t
    return out


def run_one(engine: str, what: str, a: argparse.Namespace) -> dict[str, Any]:
    """One worker run of ``what`` (``"matmul"`` or ``"unet"``) with ``engine``; its JSON, or ``{"error": ...}``."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", what, "--size", str(a.size), "--repeats",
            str(a.repeats), "--unet-warmup", str(a.unet_warmup)]
    if a.unet:
        argv += ["--unet", str(a.unet)]
    try:
        proc = subprocess.run(argv, env=engine_env(engine), capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "what": what, "error": f"timed out after {a.timeout} s"}
    if proc.returncode != 0:
        return {"engine": engine, "what": what, "error": proc.stderr.strip()[-1000:]}
    return {"engine": engine, "what": what, **json.loads(proc.stdout.strip().splitlines()[-1])}


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per engine and measurement: median, min and max over the rounds (GFLOP/s for matmul, s for unet)."""
    rows = []
    for key in dict.fromkeys((r["engine"], r["what"]) for r in results):
        runs = [r for r in results if (r["engine"], r["what"]) == key and "error" not in r]
        values = [r["gflops"] if key[1] == "matmul" else r["seconds"] for r in runs]
        rows.append({"engine": key[0], "what": key[1], "runs": len(values),
                     "median": statistics.median(values) if values else None,
                     "min": min(values) if values else None, "max": max(values) if values else None,
                     "reason": runs[0]["blas_status"]["reason"] if runs else None})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table."""
    lines = ["| engine | measurement | median | min - max | runs | BLAS |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        unit = "GFLOP/s" if r["what"] == "matmul" else "s"
        fmt = (lambda v: "-" if v is None else f"{v:.1f}") if unit == "GFLOP/s" else \
            (lambda v: "-" if v is None else f"{v:.2f}")
        lines.append(f"| {r['engine']} | {r['what']} ({unit}) | {fmt(r['median'])} | {fmt(r['min'])} - "
                     f"{fmt(r['max'])} | {r['runs']} | {r['reason']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--engines", default="off,scipy-openblas32,system", help="comma-separated SD_MLX_BLAS choices")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all engines (alternating)")
    p.add_argument("--size", type=int, default=2048, help="matrix size n of the matmul")
    p.add_argument("--repeats", type=int, default=5, help="timed products per matmul worker")
    p.add_argument("--no-matmul", action="store_true", help="skip the matmul")
    p.add_argument("--unet", type=Path, help="a diffusers unet/ folder: also time one U-Net call")
    p.add_argument("--unet-warmup", type=int, default=1, help="untimed U-Net calls before the timed one")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed to one worker")
    p.add_argument("--json", type=Path, help="write every run and the summary as JSON")
    p.add_argument("--worker", choices=("matmul", "unet"), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(a)))
        return 0
    engines = [e for e in a.engines.split(",") if e]
    what = ([] if a.no_matmul else ["matmul"]) + (["unet"] if a.unet else [])
    results = []
    for k in range(a.rounds):
        order = engines if k % 2 == 0 else engines[::-1]
        for engine in order:
            for w in what:
                r = run_one(engine, w, a)
                results.append(r)
                shown = r.get("error") or (f"{r['gflops']:.1f} GFLOP/s" if w == "matmul" else f"{r['seconds']:.2f} s")
                print(f"round {k + 1} {engine} {w}: {shown}", file=sys.stderr)
    rows = summarise(results)
    print(markdown(rows))
    if a.json:
        a.json.write_text(json.dumps({"results": results, "summary": rows}, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
