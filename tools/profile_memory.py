"""Peak memory of one sd_mlx generation, phase by phase (load, text encoding, denoising, decoding).

One pipeline call in a fresh process; the figures come from the pipeline's own profile
(:class:`sd_mlx.profiling.Profile`): for each phase, MLX's peak (``mx.get_peak_memory``, reset at the start of the
phase, so it includes everything still held then, e.g. the weights) and the process's peak RSS up to the end of
the phase (``ru_maxrss``, which on Linux carries the peak of a parent across ``exec``: start the tool from a
shell, not from a large process; ``peak_rss_hwm`` is the process's own high-water mark). ``load`` adds up the
loads of the text encoder, U-Net and VAE, each done lazily just before its phase.

Configuration: ``--dtype``, ``--quantize 4|8`` (``--group-size``), ``--release-models`` / ``--keep-models``
(drop the text encoder after encoding and the U-Net before decoding, or keep them), ``--tiled-decode`` (when the
pipeline offers tiled VAE decoding; otherwise the option is reported as unsupported and ignored),
``--memory-limit`` / ``--cache-limit`` (GB; ``mx.set_memory_limit`` / ``mx.set_cache_limit``), ``--vae`` (a TAESD
folder instead of the checkpoint's VAE). With ``--quantize`` and ``--psnr-against-full``, the unquantized image for
the same seed is generated afterwards in the same process (after the measured call, so it does not touch the
figures) and the PSNR of the quantized image against it is reported.

Usage::

    python tools/profile_memory.py --make-full ../shared/assets/configs/stable-diffusion-v1-5 --dtype float16 \\
        --quantize 8 --release-models --psnr-against-full --json mem.json
    python tools/profile_memory.py path/to/diffusers-folder --vae ../shared/assets/taesd --steps 2
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import sd_mlx  # noqa: E402  (first: loads the optimised BLAS for MLX's CPU backend before mlx)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from tools.benchmark import DEFAULT_CACHE, DEFAULT_PROMPT, DTYPES, ensure_full_checkpoint, peak_rss_bytes  # noqa: E402

PHASES = ("load", "text_encoding", "denoising", "decoding")
#: keyword names a pipeline may use for tiled VAE decoding, first found is used
TILED_DECODE_KWARGS = ("tiled_decode", "vae_tiling", "tile_decode")
GB = 1e9


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of ``image`` against ``reference`` (same shape, values in ``[0, 1]``); ``inf`` when identical.

    Raises:
        ValueError: the shapes differ.
    """
    a, b = np.asarray(image, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs images of the same shape, got {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def tiled_decode_kwarg(pipe: Any) -> str | None:
    """The keyword of ``pipe.__call__`` that turns on tiled VAE decoding, or ``None`` when it has none."""
    params = inspect.signature(pipe.__call__).parameters
    return next((n for n in TILED_DECODE_KWARGS if n in params), None)


def model_stats(model: nn.Module) -> dict[str, int]:
    """``{"bytes": parameter bytes, "quantized_linear": n, "linear": n, "quantized_conv": n}`` of an MLX module
    (quantized layers' packed weights, scales and biases counted)."""
    from sd_mlx.quantization import QuantizedConv2d

    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    mods = [m for _, m in model.named_modules()]
    return {"bytes": int(nbytes), "quantized_linear": sum(isinstance(m, nn.QuantizedLinear) for m in mods),
            "linear": sum(type(m) is nn.Linear for m in mods),
            "quantized_conv": sum(isinstance(m, QuantizedConv2d) for m in mods)}


def _device_name() -> str:
    dev = mx.default_device()
    if dev.type == mx.DeviceType.cpu:
        return "cpu"
    for name in ("metal", "cuda"):
        try:
            if getattr(mx, name).is_available():
                return f"gpu ({name})"
        except AttributeError:
            continue
    return "gpu"


def _gb(v: float | None) -> int | None:
    return None if v is None else int(v * GB)


def _call(pipe: Any, a: argparse.Namespace, *, tiled: str | None, release: bool) -> tuple[Any, float]:
    kwargs: dict[str, Any] = {}
    if tiled and a.tiled_decode:
        kwargs[tiled] = True
    t0 = time.perf_counter()
    out = pipe(a.prompt, negative_prompt=a.negative_prompt or None, num_inference_steps=a.steps,
               guidance_scale=a.guidance_scale, height=a.height, width=a.width,
               num_images_per_prompt=a.batch_size, seed=a.seed, scheduler=a.scheduler, output_type="np",
               release_models=release, **kwargs)
    return out, time.perf_counter() - t0


def profile_memory(a: argparse.Namespace) -> dict[str, Any]:
    """Run the measured call (and the PSNR reference when asked) and return the JSON-ready report."""
    from sd_mlx.cpu.blas import blas_status_for_backend
    from sd_mlx.cpu.attention import fused_attention_status_on_cpu
    from sd_mlx.cpu.rowwise import rowwise_status_on_cpu
    from sd_mlx.cpu.winograd import winograd_status_on_cpu

    blas = blas_status_for_backend(sd_mlx.BLAS_STATUS)
    attention = fused_attention_status_on_cpu()
    winograd = winograd_status_on_cpu()
    rowwise = rowwise_status_on_cpu()
    pipe = sd_mlx.load_pipeline(a.checkpoint, dtype=a.dtype, vae=a.vae, quantize=a.quantize,
                                quantize_group_size=a.group_size,
                                quantize_convolutions=not a.quantize_linear_only)
    tiled = tiled_decode_kwarg(pipe)
    tiled_state: bool | str = bool(a.tiled_decode) if (tiled or not a.tiled_decode) else "unsupported"
    if a.tiled_decode and not tiled:
        print("note: this sd_mlx pipeline has no tiled VAE decoding; --tiled-decode ignored", file=sys.stderr)
    mx.reset_peak_memory()
    out, wall = _call(pipe, a, tiled=tiled, release=a.release_models)
    prof = out.profile
    phases = {name: vars(prof.phases[name]).copy() for name in PHASES if name in prof.phases}
    report: dict[str, Any] = {
        "settings": {k: getattr(a, k) for k in ("dtype", "quantize", "group_size", "release_models", "steps",
                                                "height", "width", "batch_size", "guidance_scale", "scheduler",
                                                "seed", "prompt", "negative_prompt", "memory_limit", "quantize_linear_only",
                                                "cache_limit")},
        "checkpoint": str(Path(a.checkpoint).resolve()),
        "vae": str(a.vae) if a.vae else None,
        "tiled_decode": tiled_state,
        "device": _device_name(),
        "blas_status": {"fast": blas.fast, "library": blas.library, "reason": blas.reason},
        "cpu_attention": dataclasses.asdict(attention) if attention else None,
        "cpu_winograd": dataclasses.asdict(winograd) if winograd else None,
        "cpu_rowwise": dataclasses.asdict(rowwise) if rowwise else None,
        "mlx_version": mx.__version__,
        "phases": phases,
        "peak_memory": prof.peak_memory,
        "peak_rss": max((p["peak_rss"] for p in phases.values()), default=0),
        "peak_rss_hwm": peak_rss_bytes(),
        "total_seconds": prof.total_seconds,
        "call_seconds": wall,
        "seconds_per_step": prof.seconds_per_step,
        "active_memory_end": int(mx.get_active_memory()),
        "cache_memory_end": int(mx.get_cache_memory()),
    }
    # After the measurement: model sizes (released models are loaded again here, outside the figures).
    report["models"] = {name: model_stats(getattr(pipe, name)) for name in ("text_encoder", "unet", "vae")}
    if a.psnr_against_full and a.quantize:
        image = np.asarray(out.images)
        pipe.release()
        del pipe, out
        mx.clear_cache()
        full = sd_mlx.load_pipeline(a.checkpoint, dtype=a.dtype, vae=a.vae)
        ref, _ = _call(full, a, tiled=tiled, release=False)
        ref_img = np.asarray(ref.images)
        value = psnr(image, ref_img)
        report["psnr"] = {"psnr_db": None if math.isinf(value) else value, "identical": math.isinf(value),
                          "max_abs_diff": float(np.abs(image - ref_img).max()),
                          "reference": "same call without quantization, same seed"}
    return report


def format_report(r: dict[str, Any]) -> str:
    """The human-readable table of a :func:`profile_memory` report."""
    s = r["settings"]
    quant = (f"{s['quantize']}-bit (group {s['group_size']}, "
             f"{'linear layers only' if s.get('quantize_linear_only') else 'linear + conv'})") if s["quantize"] else "none"
    tiled = {True: "on", False: "off", "unsupported": "not available in this pipeline"}[r["tiled_decode"]]
    limits = ", ".join(f"{k.split('_')[0]} {s[k]:g} GB" for k in ("memory_limit", "cache_limit")
                       if s[k] is not None) or "none"
    b = r["blas_status"]
    lines = [
        f"sd_mlx memory profile: {Path(r['checkpoint']).name}, {s['width']}x{s['height']}, batch {s['batch_size']}, "
        f"{s['steps']} steps ({s['scheduler']}), CFG {s['guidance_scale']:g}, {s['dtype']}",
        f"quantization: {quant}; models: {'released after use' if s['release_models'] else 'kept'}; "
        f"VAE: {r['vae'] or 'checkpoint AutoencoderKL'}; tiled decode: {tiled}; limits: {limits}",
        f"MLX {r['mlx_version']} on {r['device']}; BLAS: {'fast' if b['fast'] else 'SLOW'} ({b['reason']})"
        + (f"; attention: {r['cpu_attention']['reason']}" if r.get("cpu_attention") else "")
        + (f"; convolutions: {r['cpu_winograd']['reason']}" if r.get("cpu_winograd") else "")
        + (f"; layer norms: {r['cpu_rowwise']['reason']}" if r.get("cpu_rowwise") else ""),
        "",
        f"{'phase':<15}{'seconds':>9}{'MLX peak GB':>13}{'RSS peak GB':>13}",
    ]
    for name in PHASES:
        p = r["phases"].get(name)
        if p is None:
            lines.append(f"{name:<15}{'-':>9}{'-':>13}{'-':>13}")
            continue
        extra = f"  ({p['seconds'] / p['steps']:.3f} s/step)" if p["steps"] else ""
        lines.append(f"{name:<15}{p['seconds']:>9.2f}{p['peak_memory'] / GB:>13.3f}{p['peak_rss'] / GB:>13.3f}{extra}")
    lines.append(f"{'whole call':<15}{r['call_seconds']:>9.2f}{r['peak_memory'] / GB:>13.3f}"
                 f"{r['peak_rss'] / GB:>13.3f}")
    lines.append(f"process peak RSS at the end (VmHWM where available): {r['peak_rss_hwm'] / GB:.3f} GB")
    lines.append("")
    parts = []
    for name, m in r["models"].items():
        q = f", {m['quantized_linear']} quantized linear" if m["quantized_linear"] else ""
        q += f", {m['quantized_conv']} quantized conv" if m.get("quantized_conv") else ""
        parts.append(f"{name} {m['bytes'] / GB:.3f} GB{q}")
    lines.append("weights: " + "; ".join(parts))
    if "psnr" in r:
        p = r["psnr"]
        val = "identical (inf dB)" if p["identical"] else f"{p['psnr_db']:.2f} dB"
        lines.append(f"PSNR of the quantized image against the unquantized one (same seed): {val}, "
                     f"max abs diff {p['max_abs_diff']:.4f}")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(description="Peak memory of one sd_mlx generation, phase by phase.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="diffusers model folder or Hub id (or use --make-full)")
    p.add_argument("--make-full", metavar="CONFIG_DIR", type=Path,
                   help="use (building once) the full-size random-weight checkpoint of this config folder")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where --make-full keeps checkpoints")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--quantize", type=int, choices=(4, 8),
                   help="bits for the U-Net and text encoder linear layers and convolutions")
    p.add_argument("--quantize-linear-only", action="store_true", help="with --quantize, keep convolutions as loaded")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64, help="quantization group size")
    rel = p.add_mutually_exclusive_group()
    rel.add_argument("--release-models", dest="release_models", action="store_true",
                     help="drop the text encoder after encoding and the U-Net before decoding")
    rel.add_argument("--keep-models", dest="release_models", action="store_false", help="keep every model loaded")
    p.set_defaults(release_models=False)
    p.add_argument("--tiled-decode", action="store_true", help="tiled VAE decoding (if the pipeline has it)")
    p.add_argument("--memory-limit", type=float, metavar="GB", help="mx.set_memory_limit")
    p.add_argument("--cache-limit", type=float, metavar="GB", help="mx.set_cache_limit")
    p.add_argument("--vae", type=Path, help="TAESD folder to decode with instead of the checkpoint's VAE")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--scheduler", default="euler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--psnr-against-full", action="store_true",
                   help="with --quantize: PSNR of the image against the unquantized one (same seed)")
    p.add_argument("--json", type=Path, help="write the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0 (2 on bad arguments). MLX's memory and cache limits are restored on
    return, so it can be called in-process."""
    parser = build_parser()
    a = parser.parse_args(argv)
    if bool(a.checkpoint) == bool(a.make_full):
        parser.error("give either a checkpoint or --make-full CONFIG_DIR")
    for name in ("steps", "height", "width", "batch_size"):
        if getattr(a, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("memory_limit", "cache_limit"):
        v = getattr(a, name)
        if v is not None and not (v >= 0 and math.isfinite(v)):
            parser.error(f"--{name.replace('_', '-')} must be a number of GB >= 0")
    if a.psnr_against_full and not a.quantize:
        print("note: --psnr-against-full compares against the unquantized image; without --quantize there is "
              "nothing to compare", file=sys.stderr)
    if a.make_full:
        try:
            a.checkpoint = str(ensure_full_checkpoint(a.make_full, a.cache_dir))
        except (FileNotFoundError, RuntimeError) as e:
            parser.error(str(e))
    restore: list[tuple[Any, int]] = []
    try:
        if a.memory_limit is not None:
            restore.append((mx.set_memory_limit, mx.set_memory_limit(_gb(a.memory_limit))))
        if a.cache_limit is not None:
            restore.append((mx.set_cache_limit, mx.set_cache_limit(_gb(a.cache_limit))))
        report = profile_memory(a)
    except sd_mlx.SDMLXError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for setter, previous in restore:
            setter(previous)
    print(format_report(report))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
