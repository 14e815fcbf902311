"""Speed and memory of sd_mlx against diffusers on one checkpoint, with the same settings, in one run.

For every batch size, each engine runs in a fresh subprocess (``python tools/benchmark.py --worker mlx|torch ...``,
which prints one JSON line), so the process peak RSS is that engine's alone. The engines alternate (batch 1:
sd_mlx then diffusers, batch 2: diffusers then sd_mlx, ...) so that a machine that slows down over the run does not
favour one. In a worker the models are loaded (timed as ``load``), one warm-up call runs at the same batch size
(``--warmup-steps`` steps), then ``--repeats`` timed calls; each figure is the median over the timed calls.

Figures, per engine and batch size:

* ``text_encoding_s``: prompt + negative prompt through the CLIP text encoder (CFG: both).
* ``seconds_per_step``: denoising seconds per U-Net step; with CFG a step is one U-Net batch of ``2B`` (diffusers:
  from the first U-Net call to the end of the last scheduler step; also ``unet_seconds_per_step``, U-Net forward
  alone).
* ``decoding_s``: VAE decode of the final latents (``--vae-batch-size`` images at a time; diffusers uses VAE slicing,
  one image at a time, when that is smaller than the batch).
* ``end_to_end_s``: wall time of one pipeline call (models already loaded; loading is ``load_s``).
* ``images_per_s`` = B / end_to_end_s, ``image_steps_per_s`` = B / seconds_per_step.
* ``peak_rss_bytes``: the worker process's peak resident set size; ``peak_accel_bytes``: MLX's peak
  (``mx.get_peak_memory``, any backend) for sd_mlx, ``torch.cuda.max_memory_allocated`` for diffusers on CUDA
  (``None`` on CPU).

sd_mlx runs through :class:`sd_mlx.pipeline.StableDiffusionPipeline` (its ``PipelineOutput.profile`` gives the
phases); diffusers through ``StableDiffusionPipeline.from_pretrained(path, safety_checker=None, dtype=...)`` with
its text encoding / U-Net / VAE decode wrapped by time stamps (``torch.cuda.synchronize`` around them on CUDA),
``torch.set_num_threads(os.cpu_count())`` and ``torch.inference_mode``. Both use the same prompt, negative prompt,
size, steps, guidance scale, dtype, seed and scheduler (a short sd_mlx name such as ``euler``, mapped to the
matching diffusers class with the checkpoint's scheduler config).

Outputs: JSON (``--json``), a Markdown table (printed; ``--markdown`` writes it too) whose header carries
``sd_mlx.BLAS_STATUS``, and a PNG of throughput against batch size (``--plot``; default: next to ``--json``).
Works unchanged on a Mac (MLX on the GPU, diffusers on ``mps`` with ``--device mps``) and on Linux with
``mlx[cuda12]`` against PyTorch CUDA (``--device`` auto picks CUDA when torch sees it).

Usage::

    python tools/benchmark.py --make-full ../shared/assets/configs/stable-diffusion-v1-5 \\
        --batch-sizes 1,2,4 --steps 3 --json bench.json --markdown bench.md
    python tools/benchmark.py path/to/diffusers-folder --batch-sizes 1 --steps 1 --dtype float16 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

ENGINES = ("mlx", "torch")
ENGINE_LABELS = {"mlx": "sd_mlx", "torch": "diffusers"}
RESULT_MARKER = "SD_MLX_BENCHMARK_RESULT "
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
DEFAULT_CACHE = REPO_ROOT / ".cache" / "benchmark-checkpoints"
DTYPES = ("float32", "float16", "bfloat16")

#: per-run timing keys (medians over the timed calls end up in the result)
RUN_KEYS = ("text_encoding_s", "denoising_s", "seconds_per_step", "decoding_s", "end_to_end_s")

#: every field a successful worker result holds (``None`` where a figure does not apply)
RESULT_KEYS = ("engine", "label", "batch_size", "device", "load_s", "text_encoding_s", "denoising_s", "steps",
               "seconds_per_step", "decoding_s", "end_to_end_s", "images_per_s", "image_steps_per_s",
               "peak_rss_bytes", "peak_rss_after_import_bytes", "peak_accel_bytes", "peak_accel_kind",
               "versions", "runs")

#: figures compared as sd_mlx / diffusers
RATIO_KEYS = ("load_s", "text_encoding_s", "seconds_per_step", "decoding_s", "end_to_end_s", "images_per_s",
              "image_steps_per_s", "peak_rss_bytes", "peak_accel_bytes")

#: sd_mlx scheduler name -> (diffusers class, config overrides), the same sampler on both sides
DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler",
                 {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "pndm": ("PNDMScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lcm": ("LCMScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False}),
    "lms": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
}


# ------------------------------------------------------------------------------------------------ checkpoints

def ensure_full_checkpoint(config_dir: str | Path, cache_dir: str | Path = DEFAULT_CACHE, *, seed: int = 0,
                           verbose: bool = True) -> Path:
    """The full-size random-weight checkpoint of ``config_dir``, built once into ``cache_dir`` and reused.

    Built with :func:`tools.make_checkpoint.make_full_checkpoint` (float32 weights, ~80 s and ~4 GB of disk for
    SD 1.5), in a subprocess, into a temporary sibling folder, then renamed into place, so an interrupted build
    leaves nothing half-written under the final name.

    Args:
        config_dir: a diffusers config folder, e.g. ``../shared/assets/configs/stable-diffusion-v1-5``.
        cache_dir: where checkpoints are kept (default ``<repo>/.cache/benchmark-checkpoints``).
        seed: torch seed of the random weights (part of the folder name).
        verbose: print progress to stderr.

    Returns:
        ``cache_dir / f"{config_dir.name}-random-seed{seed}"``.

    Raises:
        FileNotFoundError: ``config_dir/model_index.json`` is missing.
        RuntimeError: the build failed.
    """
    config_dir = Path(config_dir)
    if not (config_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"{config_dir}: no model_index.json; pass a diffusers config folder")
    target = Path(cache_dir) / f"{config_dir.resolve().name}-random-seed{seed}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        if verbose:
            print(f"building full-size random checkpoint {target} from {config_dir} ...", file=sys.stderr)
        # In a subprocess: building holds GBs of torch tensors, and this (parent) process must stay small so
        # that it neither competes with the workers for memory nor shows up in their figures.
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_checkpoint.py"), "full",
                               str(config_dir), str(tmp / "ckpt"), "--seed", str(seed)],
                              stdout=subprocess.DEVNULL, stderr=None if verbose else subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the checkpoint failed (status {proc.returncode}): "
                               f"{(proc.stderr or '').strip()[-2000:]}")
        if not (target / "model_index.json").is_file():
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp / "ckpt", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------- helpers

def peak_rss_bytes() -> int:
    """Peak resident set size of this process, bytes.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` is not used there because the kernel
    carries it across ``exec``, so a worker started by a large parent would report the parent's peak. Elsewhere
    (macOS) ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(statistics.median(vals)) if vals else None


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    r = a / b
    return r if math.isfinite(r) else None


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``. Raises ``argparse.ArgumentTypeError`` for anything but positive integers."""
    try:
        sizes = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        if sys.platform == "darwin":
            try:
                cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                     timeout=5).stdout.strip() or cpu
            except (OSError, subprocess.SubprocessError):
                pass
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------------- workers

def _worker_mlx(a: argparse.Namespace) -> dict[str, Any]:
    import sd_mlx  # first: loads the optimised BLAS for MLX's CPU backend before mlx is imported

    import mlx.core as mx
    import numpy as np
    from sd_mlx.cpu.blas import blas_status_for_backend
    from sd_mlx.cpu.attention import fused_attention_status_on_cpu
    from sd_mlx.cpu.rowwise import rowwise_status_on_cpu
    from sd_mlx.cpu.winograd import winograd_status_on_cpu

    rss_import = peak_rss_bytes()
    if a.mlx_device == "cpu":
        mx.set_default_device(mx.cpu)
    elif a.mlx_device == "gpu":
        mx.set_default_device(mx.gpu)
    device = mx.default_device()
    backend = "cpu"
    if device.type != mx.DeviceType.cpu:
        backend = "gpu"
        for name in ("metal", "cuda"):
            try:
                if getattr(mx, name).is_available():
                    backend = name
                    break
            except AttributeError:
                continue
    blas = blas_status_for_backend(sd_mlx.BLAS_STATUS)
    attention = fused_attention_status_on_cpu()
    winograd = winograd_status_on_cpu()
    rowwise = rowwise_status_on_cpu()
    batch = a.batch_size

    pipe = sd_mlx.load_pipeline(a.checkpoint, dtype=a.dtype)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for name in ("text_encoder", "unet", "vae"):
        getattr(pipe, name)
    load_s = time.perf_counter() - t0
    peak = int(mx.get_peak_memory())

    def call(steps: int):
        t = time.perf_counter()
        out = pipe(a.prompt, negative_prompt=a.negative_prompt or None, num_inference_steps=steps,
                   guidance_scale=a.guidance_scale, height=a.height, width=a.width, num_images_per_prompt=batch,
                   seed=a.seed, scheduler=a.scheduler, output_type="np", vae_batch_size=a.vae_batch_size or batch)
        return out, time.perf_counter() - t

    if a.warmup_steps > 0:
        out, _ = call(a.warmup_steps)
        peak = max(peak, out.profile.peak_memory)
    runs = []
    for _ in range(a.repeats):
        out, e2e = call(a.steps)
        prof = out.profile
        ph = prof.phases
        runs.append({
            "text_encoding_s": ph["text_encoding"].seconds, "denoising_s": ph["denoising"].seconds,
            "steps": ph["denoising"].steps, "seconds_per_step": prof.seconds_per_step,
            "decoding_s": ph["decoding"].seconds, "end_to_end_s": e2e,
            "load_in_call_s": ph["load"].seconds if "load" in ph else 0.0,
            "image_std": float(np.asarray(out.images).std()),
            "phases": prof.to_dict()["phases"],
        })
        peak = max(peak, prof.peak_memory)
    return {
        "device": backend if backend == "cpu" else f"gpu ({backend})", "backend": backend, "load_s": load_s,
        "runs": runs,
        "peak_accel_bytes": peak, "peak_accel_kind": "mlx", "peak_rss_after_import_bytes": rss_import,
        "blas_status": {"fast": blas.fast, "library": blas.library, "reason": blas.reason},
        "blas_status_at_import": {"fast": sd_mlx.BLAS_STATUS.fast, "library": sd_mlx.BLAS_STATUS.library,
                                  "reason": sd_mlx.BLAS_STATUS.reason},
        "cpu_attention": dataclasses.asdict(attention) if attention else None,
        "cpu_winograd": dataclasses.asdict(winograd) if winograd else None,
        "cpu_rowwise": dataclasses.asdict(rowwise) if rowwise else None,
        "versions": {"sd_mlx": sd_mlx.__version__, "mlx": mx.__version__, "numpy": np.__version__},
    }


def _diffusers_scheduler(name: str | None) -> tuple[str | None, dict[str, Any]]:
    if name is None:
        return None, {}
    key = name.strip().lower().replace("++", "pp").replace("-", "_").replace(" ", "_")
    if key in DIFFUSERS_SCHEDULERS:
        return DIFFUSERS_SCHEDULERS[key]
    return name, {}  # a diffusers class name, used with the checkpoint's config as is


def _worker_torch(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    import diffusers
    import numpy as np
    import transformers

    rss_import = peak_rss_bytes()
    if a.device == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        dev = a.device
    device = torch.device(dev)
    cuda = device.type == "cuda"
    mps = device.type == "mps"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)
        elif mps:
            torch.mps.synchronize()

    dtype = getattr(torch, a.dtype)
    batch = a.batch_size
    # diffusers >= 0.36 renamed torch_dtype to dtype (the old name warns); older versions only know torch_dtype.
    from diffusers.utils import deprecation_utils

    dtype_kw = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    t0 = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(a.checkpoint, safety_checker=None,
                                                            requires_safety_checker=False, **{dtype_kw: dtype})
    pipe.to(device)
    sync()
    load_s = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    cls_name, overrides = _diffusers_scheduler(a.scheduler)
    if cls_name is not None:
        pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)
    vae_bs = a.vae_batch_size or batch
    if vae_bs < batch:
        pipe.vae.enable_slicing()  # diffusers slices one image at a time

    rec: dict[str, Any] = {}

    def reset() -> None:
        rec.update(encode=0.0, unet=0.0, unet_calls=0, unet_first=None, step_end=None, decode=0.0)

    def timed(fn: Callable, key: str) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync()
            t = time.perf_counter()
            if key == "unet" and rec["unet_first"] is None:
                rec["unet_first"] = t
            out = fn(*args, **kwargs)
            sync()
            rec[key] += time.perf_counter() - t
            if key == "unet":
                rec["unet_calls"] += 1
            return out
        return wrapper

    pipe.encode_prompt = timed(pipe.encode_prompt, "encode")
    pipe.unet.forward = timed(pipe.unet.forward, "unet")
    pipe.vae.decode = timed(pipe.vae.decode, "decode")

    def on_step_end(_pipe: Any, _i: int, _t: Any, _kwargs: dict) -> dict:
        sync()
        rec["step_end"] = time.perf_counter()
        return {}

    def call(steps: int):
        reset()
        gen = torch.Generator(device="cpu" if mps else device).manual_seed(a.seed)
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = pipe(a.prompt, negative_prompt=a.negative_prompt or None, num_inference_steps=steps,
                       guidance_scale=a.guidance_scale, height=a.height, width=a.width,
                       num_images_per_prompt=batch, generator=gen, output_type="np",
                       callback_on_step_end=on_step_end)
        sync()
        return out, time.perf_counter() - t

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    if a.warmup_steps > 0:
        call(a.warmup_steps)
    runs = []
    for _ in range(a.repeats):
        out, e2e = call(a.steps)
        n = rec["unet_calls"]
        denoise = (rec["step_end"] - rec["unet_first"]) if rec["unet_first"] is not None and rec["step_end"] else 0.0
        runs.append({
            "text_encoding_s": rec["encode"], "denoising_s": denoise, "steps": n,
            "seconds_per_step": denoise / n if n else None, "unet_seconds_per_step": rec["unet"] / n if n else None,
            "decoding_s": rec["decode"], "end_to_end_s": e2e,
            "image_std": float(np.asarray(out.images).std()),
        })
    dev_name = str(device)
    if cuda:
        dev_name += f" ({torch.cuda.get_device_name(device)})"
    return {
        "device": dev_name, "backend": device.type, "load_s": load_s, "runs": runs,
        "peak_accel_bytes": int(torch.cuda.max_memory_allocated(device)) if cuda else None,
        "peak_accel_kind": "cuda" if cuda else None, "peak_rss_after_import_bytes": rss_import,
        "torch_threads": torch.get_num_threads(),
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__},
    }


def run_worker(a: argparse.Namespace) -> dict[str, Any]:
    """Run one measurement in this process (``--worker``) and return its result dict (see :data:`RESULT_KEYS`)."""
    res = _worker_mlx(a) if a.worker == "mlx" else _worker_torch(a)
    runs = res["runs"]
    out: dict[str, Any] = {"engine": a.worker, "label": ENGINE_LABELS[a.worker], "batch_size": a.batch_size}
    out.update({k: res[k] for k in ("device", "backend", "load_s")})
    for k in RUN_KEYS:
        out[k] = _median([r[k] for r in runs])
    out["steps"] = runs[0]["steps"] if runs else 0
    if a.worker == "torch":
        out["unet_seconds_per_step"] = _median([r["unet_seconds_per_step"] for r in runs])
    out["images_per_s"] = _div(a.batch_size, out["end_to_end_s"])
    out["image_steps_per_s"] = _div(a.batch_size, out["seconds_per_step"])
    out["peak_rss_bytes"] = peak_rss_bytes()
    for k in ("peak_rss_after_import_bytes", "peak_accel_bytes", "peak_accel_kind", "versions", "runs"):
        out[k] = res[k]
    for k in ("blas_status", "blas_status_at_import", "cpu_attention", "cpu_winograd", "cpu_rowwise", "torch_threads"):
        if k in res:
            out[k] = res[k]
    return out


# ----------------------------------------------------------------------------------------------------- parent

def _worker_argv(a: argparse.Namespace, engine: str, batch: int) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, str(a.checkpoint),
            "--batch-size", str(batch), "--steps", str(a.steps), "--warmup-steps", str(a.warmup_steps),
            "--height", str(a.height), "--width", str(a.width), "--guidance-scale", repr(a.guidance_scale),
            "--dtype", a.dtype, "--scheduler", a.scheduler, "--repeats", str(a.repeats), "--device", a.device,
            "--mlx-device", a.mlx_device, f"--prompt={a.prompt}", f"--negative-prompt={a.negative_prompt}",
            "--seed", str(a.seed), "--vae-batch-size", str(a.vae_batch_size)]
    return argv


def run_measurement(a: argparse.Namespace, engine: str, batch: int) -> dict[str, Any]:
    """Run one worker subprocess and return its result, or ``{"engine", "batch_size", "error"}`` on failure."""
    argv = _worker_argv(a, engine, batch)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=a.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "label": ENGINE_LABELS[engine], "batch_size": batch,
                "error": f"timed out after {a.timeout} s"}
    if a.verbose and proc.stderr:
        sys.stderr.write(proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return {"engine": engine, "label": ENGINE_LABELS[engine], "batch_size": batch,
                "error": f"worker exited with status {proc.returncode}: {tail}"}
    return json.loads(lines[-1][len(RESULT_MARKER):])


def compute_ratios(results: list[dict[str, Any]], batch_sizes: Sequence[int]) -> list[dict[str, Any]]:
    """sd_mlx / diffusers for each figure of :data:`RATIO_KEYS`, one dict per batch size where both ran."""
    ratios = []
    for b in batch_sizes:
        by = {r["engine"]: r for r in results if r["batch_size"] == b and "error" not in r}
        if "mlx" not in by or "torch" not in by:
            continue
        row: dict[str, Any] = {"batch_size": b}
        for k in RATIO_KEYS:
            row[k] = _div(by["mlx"].get(k), by["torch"].get(k))
        ratios.append(row)
    return ratios


def _s(v: float | None) -> str:
    if v is None:
        return "–"
    if v < 0.01:
        return f"{v:.4f}"
    if v < 100:
        return f"{v:.3f}"
    return f"{v:.1f}"


def _gb(v: int | float | None) -> str:
    return "–" if v is None else f"{v / 1e9:.2f}"


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}x"


def _engine_info(results: list[dict[str, Any]], engine: str) -> dict[str, Any] | None:
    return next((r for r in results if r["engine"] == engine and "error" not in r), None)


def markdown_report(report: dict[str, Any]) -> str:
    """The Markdown table (with a header naming versions, devices and the BLAS) of a :func:`run_benchmark`
    report."""
    st, results, ratios = report["settings"], report["results"], report["ratios"]
    m = report["machine"]
    lines = [f"### sd_mlx vs diffusers: {Path(st['checkpoint']).name}, {st['width']}x{st['height']}, "
             f"{st['steps']} steps ({st['scheduler']}), CFG {st['guidance_scale']:g}, {st['dtype']}", ""]
    mi = _engine_info(results, "mlx")
    if mi:
        b = mi["blas_status"]
        lines.append(f"- sd_mlx {mi['versions']['sd_mlx']}, MLX {mi['versions']['mlx']} on {mi['device']}; "
                     f"BLAS: {'fast' if b['fast'] else 'SLOW (reference BLAS)'} ({b['reason']})"
                     + (f"; attention: {mi['cpu_attention']['reason']}" if mi.get("cpu_attention") else "")
                     + (f"; convolutions: {mi['cpu_winograd']['reason']}" if mi.get("cpu_winograd") else "")
                     + (f"; layer norms: {mi['cpu_rowwise']['reason']}" if mi.get("cpu_rowwise") else ""))
    ti = _engine_info(results, "torch")
    if ti:
        lines.append(f"- diffusers {ti['versions']['diffusers']}, torch {ti['versions']['torch']} on {ti['device']}, "
                     f"{ti.get('torch_threads')} threads")
    lines.append(f"- machine: {m['platform']}, {m['cpu']}, {m['cpu_count']} CPUs")
    lines.append(f"- each figure: median of {st['repeats']} timed call(s) after a warm-up of {st['warmup_steps']} "
                 f"step(s), a fresh process per engine and batch size; VAE batch {st['vae_batch_size'] or 'all'}; "
                 f"ratio = sd_mlx / diffusers (times and memory: below 1 favours sd_mlx; images/s: above 1)")
    lines.append("")
    head = ["batch", "engine", "load s", "text enc. s", "U-Net s/step (CFG)", "VAE decode s", "end to end s",
            "images/s", "MLX / CUDA peak GB", "peak RSS GB"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---:", ":---"] + ["---:"] * (len(head) - 2)) + "|")
    ratio_by = {r["batch_size"]: r for r in ratios}
    for b in st["batch_sizes"]:
        for e in ENGINES:
            r = next((x for x in results if x["engine"] == e and x["batch_size"] == b), None)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {b} | {ENGINE_LABELS[e]} | failed: {r['error'].splitlines()[-1][:80]} |"
                             + " |" * (len(head) - 3))
                continue
            lines.append(f"| {b} | {ENGINE_LABELS[e]} | {_s(r['load_s'])} | {_s(r['text_encoding_s'])} | "
                         f"{_s(r['seconds_per_step'])} | {_s(r['decoding_s'])} | {_s(r['end_to_end_s'])} | "
                         f"{_s(r['images_per_s'])} | {_gb(r['peak_accel_bytes'])} | {_gb(r['peak_rss_bytes'])} |")
        q = ratio_by.get(b)
        if q:
            lines.append(f"| {b} | **sd_mlx / diffusers** | {_x(q['load_s'])} | {_x(q['text_encoding_s'])} | "
                         f"{_x(q['seconds_per_step'])} | {_x(q['decoding_s'])} | {_x(q['end_to_end_s'])} | "
                         f"{_x(q['images_per_s'])} | {_x(q['peak_accel_bytes'])} | {_x(q['peak_rss_bytes'])} |")
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """PNG of U-Net throughput (image-steps/s) and end-to-end throughput (images/s) against batch size."""
    from tools.plot import Panel, line_chart

    st = report["settings"]
    ok = [r for r in report["results"] if "error" not in r]
    series_steps = {ENGINE_LABELS[e]: [(r["batch_size"], r["image_steps_per_s"]) for r in ok if r["engine"] == e]
                    for e in ENGINES if any(r["engine"] == e for r in ok)}
    series_imgs = {ENGINE_LABELS[e]: [(r["batch_size"], r["images_per_s"]) for r in ok if r["engine"] == e]
                   for e in ENGINES if any(r["engine"] == e for r in ok)}
    title = (f"sd_mlx vs diffusers, {Path(st['checkpoint']).name}: {st['width']}x{st['height']}, {st['dtype']}, "
             f"CFG {st['guidance_scale']:g}, {st['steps']} steps")
    return line_chart([Panel("U-Net throughput (denoising)", "batch size", "image-steps / s", series_steps),
                       Panel("End to end (text + denoise + decode)", "batch size", "images / s", series_imgs)],
                      path, title=title)


def run_benchmark(a: argparse.Namespace) -> dict[str, Any]:
    """Run every (batch size, engine) measurement, alternating the engines, and return the report dict:
    ``settings``, ``machine``, ``results`` (one per measurement; see :data:`RESULT_KEYS`), ``ratios``."""
    results = []
    total = len(a.batch_sizes) * len(a.engines)
    n = 0
    for i, b in enumerate(a.batch_sizes):
        order = list(a.engines) if i % 2 == 0 else list(reversed(a.engines))
        for e in order:
            n += 1
            print(f"[{n}/{total}] {ENGINE_LABELS[e]}, batch {b} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            r = run_measurement(a, e, b)
            msg = f"failed: {r['error']}" if "error" in r else (f"{r['seconds_per_step']:.3f} s/step, "
                                                                  f"{r['end_to_end_s']:.2f} s end to end")
            print(f"      {msg} ({time.perf_counter() - t0:.1f} s with load)", file=sys.stderr, flush=True)
            results.append(r)
    settings = {k: getattr(a, k) for k in ("steps", "warmup_steps", "height", "width", "guidance_scale", "dtype",
                                           "scheduler", "repeats", "device", "mlx_device", "prompt",
                                           "negative_prompt", "seed", "vae_batch_size", "batch_sizes")}
    settings["checkpoint"] = str(Path(a.checkpoint).resolve())
    settings["engines"] = list(a.engines)
    mi = _engine_info(results, "mlx")
    report = {"settings": settings, "machine": _machine(), "results": results,
              "ratios": compute_ratios(results, a.batch_sizes),
              "blas_status": mi["blas_status"] if mi else None}
    return report


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (parent and ``--worker`` modes share it)."""
    p = argparse.ArgumentParser(description="Benchmark sd_mlx against diffusers (speed and peak memory).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="diffusers model folder (or use --make-full)")
    p.add_argument("--make-full", metavar="CONFIG_DIR", type=Path,
                   help="build (once, cached) a full-size random-weight checkpoint from this config folder")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where --make-full keeps checkpoints")
    p.add_argument("--batch-sizes", type=parse_batch_sizes, default=[1, 2, 4], help="comma-separated")
    p.add_argument("--steps", type=int, default=3, help="denoising steps of a timed call")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps of the warm-up call (0: no warm-up)")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per worker (figures are medians)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--scheduler", default="euler", help="sd_mlx name (euler, ddim, dpmpp_2m_karras, ...)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="PyTorch device (auto: cuda when available)")
    p.add_argument("--mlx-device", default="auto", choices=("auto", "cpu", "gpu"), help="MLX default device")
    p.add_argument("--engines", default="mlx,torch", help="comma-separated subset of mlx,torch")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-batch-size", type=int, default=1, help="images decoded at once (0: the whole batch)")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed to one worker")
    p.add_argument("--json", type=Path, help="write the full report as JSON")
    p.add_argument("--markdown", type=Path, help="write the Markdown table")
    p.add_argument("--plot", type=Path, help="PNG of throughput against batch size (default: next to --json)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--verbose", action="store_true", help="pass the workers' stderr through")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=1, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0, or 1 when a measurement failed, 2 on bad arguments."""
    parser = build_parser()
    a = parser.parse_args(argv)
    for name in ("steps", "repeats", "height", "width"):
        if getattr(a, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.warmup_steps < 0 or a.vae_batch_size < 0:
        parser.error("--warmup-steps and --vae-batch-size must be >= 0")
    if a.worker:
        if not a.checkpoint:
            parser.error("--worker needs the checkpoint folder")
        result = run_worker(a)
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return 0

    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    if not engines or any(e not in ENGINES for e in engines):
        parser.error(f"--engines must be a comma-separated subset of {','.join(ENGINES)}")
    a.engines = engines
    if bool(a.checkpoint) == bool(a.make_full):
        parser.error("give either a checkpoint folder or --make-full CONFIG_DIR")
    if a.make_full:
        try:
            a.checkpoint = str(ensure_full_checkpoint(a.make_full, a.cache_dir))
        except (FileNotFoundError, RuntimeError) as e:
            parser.error(str(e))
    elif not (Path(a.checkpoint) / "model_index.json").is_file():
        parser.error(f"{a.checkpoint}: not a diffusers model folder (no model_index.json)")
    if 1 < a.vae_batch_size < max(a.batch_sizes):
        print("note: diffusers' VAE slicing decodes one image at a time; --vae-batch-size between 1 and the batch "
              "size is not matched exactly", file=sys.stderr)

    report = run_benchmark(a)
    md = markdown_report(report)
    print(md)
    plot_path = a.plot or (a.json.with_suffix(".png") if a.json else None)
    if a.no_plot:
        plot_path = None
    if plot_path:
        plot_report(report, plot_path)
        report["plot"] = str(plot_path)
        print(f"plot: {plot_path}", file=sys.stderr)
    if a.markdown:
        a.markdown.parent.mkdir(parents=True, exist_ok=True)
        a.markdown.write_text(md, encoding="utf-8")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
