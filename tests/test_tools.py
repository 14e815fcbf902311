"""Smoke tests of the measurement tools on the tiny checkpoint: tools/benchmark.py (sd_mlx against diffusers, one
subprocess per engine and batch size; JSON, Markdown table, PNG plot) and tools/profile_memory.py (per-phase peak
memory, quantization PSNR), plus the pure helpers (ratios, table, plot, PSNR, batch-size parsing)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlx.core as mx
from tools import benchmark, profile_memory
from tools.plot import Panel, line_chart, nice_ticks

PHASES = ("load", "text_encoding", "denoising", "decoding")


def _assert_png(path: Path) -> None:
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.width > 200 and im.height > 200
        arr = np.asarray(im.convert("RGB"))
    assert (arr < 250).any(), "the plot is blank"


# ------------------------------------------------------------------------------------------------- benchmark

def test_benchmark_end_to_end_on_tiny(tiny_sd1: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("diffusers")
    out_json, out_md, out_png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    rc = benchmark.main([str(tiny_sd1), "--batch-sizes", "1,2", "--steps", "2", "--height", "64", "--width", "64",
                         "--json", str(out_json), "--markdown", str(out_md), "--plot", str(out_png),
                         "--timeout", "300"])
    printed = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    errors = [r.get("error") for r in report["results"] if "error" in r]
    assert rc == 0, errors
    assert not errors
    results = report["results"]
    assert sorted((r["engine"], r["batch_size"]) for r in results) == [("mlx", 1), ("mlx", 2), ("torch", 1),
                                                                       ("torch", 2)]
    # engines alternate: batch 1 sd_mlx first, batch 2 diffusers first
    assert [r["engine"] for r in results] == ["mlx", "torch", "torch", "mlx"]
    for r in results:
        missing = [k for k in benchmark.RESULT_KEYS if k not in r]
        assert not missing, (r["engine"], missing)
        for k in ("load_s", "text_encoding_s", "denoising_s", "seconds_per_step", "decoding_s", "end_to_end_s",
                  "images_per_s", "image_steps_per_s", "peak_rss_bytes"):
            assert isinstance(r[k], float | int) and r[k] > 0, (r["engine"], k, r[k])
        assert r["steps"] == 2
        assert r["end_to_end_s"] >= r["denoising_s"]
        assert r["images_per_s"] == pytest.approx(r["batch_size"] / r["end_to_end_s"])
        assert r["runs"][0]["image_std"] > 0.01  # real images came out
    mlx_r = next(r for r in results if r["engine"] == "mlx")
    assert mlx_r["peak_accel_kind"] == "mlx" and mlx_r["peak_accel_bytes"] > 0
    assert set(mlx_r["blas_status"]) == {"fast", "library", "reason"}
    assert report["blas_status"] == mlx_r["blas_status"]
    for kernel in ("cpu_attention", "cpu_winograd", "cpu_rowwise"):  # which C++ kernels ran (on the CPU)
        assert set(mlx_r[kernel]) >= {"available", "library", "reason"}, kernel
    torch_r = next(r for r in results if r["engine"] == "torch")
    assert torch_r["device"] == "cpu" and torch_r["peak_accel_bytes"] is None
    assert torch_r["unet_seconds_per_step"] > 0
    assert [q["batch_size"] for q in report["ratios"]] == [1, 2]
    for q in report["ratios"]:
        for k in ("text_encoding_s", "seconds_per_step", "decoding_s", "end_to_end_s", "peak_rss_bytes"):
            assert q[k] > 0
    md = out_md.read_text()
    assert md in printed
    assert "| batch | engine |" in md and "sd_mlx / diffusers" in md and "BLAS:" in md
    for part in ("; attention:", "; convolutions:", "; layer norms:"):
        assert part in md, part
    assert md.count("| 1 | sd_mlx |") == 1 and md.count("| 2 | diffusers |") == 1
    _assert_png(out_png)
    assert report["plot"] == str(out_png)


def test_parse_batch_sizes() -> None:
    assert benchmark.parse_batch_sizes("1,2, 4") == [1, 2, 4]
    for bad in ("", "0", "1,x", "-1"):
        with pytest.raises(Exception):
            benchmark.parse_batch_sizes(bad)


def test_scheduler_names_map_to_diffusers_classes() -> None:
    diffusers = pytest.importorskip("diffusers")
    for name, (cls, _) in benchmark.DIFFUSERS_SCHEDULERS.items():
        assert hasattr(diffusers, cls), name
    assert benchmark._diffusers_scheduler("DPM++ 2M Karras")[1]["use_karras_sigmas"] is True
    assert benchmark._diffusers_scheduler("DDIMScheduler") == ("DDIMScheduler", {})


def _fake_result(engine: str, b: int, spf: float) -> dict:
    r = {k: None for k in benchmark.RESULT_KEYS}
    r.update(engine=engine, label=benchmark.ENGINE_LABELS[engine], batch_size=b, device="cpu", load_s=1.0,
             text_encoding_s=0.1, denoising_s=3 * spf, steps=3, seconds_per_step=spf, decoding_s=0.5,
             end_to_end_s=3 * spf + 0.6, peak_rss_bytes=2e9, peak_accel_bytes=1e9 if engine == "mlx" else None,
             versions={"sd_mlx": "0", "mlx": "0", "diffusers": "0", "torch": "0"}, runs=[], torch_threads=2,
             blas_status={"fast": True, "library": "x", "reason": "test"})
    r["images_per_s"] = b / r["end_to_end_s"]
    r["image_steps_per_s"] = b / spf
    return r


def test_ratios_table_and_plot_from_synthetic_results(tmp_path: Path) -> None:
    results = [_fake_result("mlx", 1, 1.0), _fake_result("torch", 1, 2.0), _fake_result("mlx", 2, 1.5),
               {"engine": "torch", "label": "diffusers", "batch_size": 2, "error": "worker exited with status 1: "
                                                                                 "MemoryError"}]
    ratios = benchmark.compute_ratios(results, [1, 2])
    assert len(ratios) == 1  # batch 2 has no diffusers result
    assert ratios[0]["seconds_per_step"] == pytest.approx(0.5)
    assert ratios[0]["image_steps_per_s"] == pytest.approx(2.0)
    assert ratios[0]["peak_accel_bytes"] is None
    settings = {"checkpoint": "/x/sd15", "width": 512, "height": 512, "steps": 3, "scheduler": "euler",
                "guidance_scale": 7.5, "dtype": "float32", "repeats": 1, "warmup_steps": 1, "vae_batch_size": 1,
                "batch_sizes": [1, 2]}
    report = {"settings": settings, "results": results, "ratios": ratios,
              "machine": {"platform": "p", "cpu": "c", "cpu_count": 2}}
    md = benchmark.markdown_report(report)
    assert "| 1 | **sd_mlx / diffusers** |" in md and "0.50x" in md
    assert "| 2 | diffusers | failed: " in md and "MemoryError" in md
    header = [ln for ln in md.splitlines() if ln.startswith("| batch")][0]
    n_cols = header.count("|")
    assert all(ln.count("|") == n_cols for ln in md.splitlines() if ln.startswith("| "))
    _assert_png(benchmark.plot_report(report, tmp_path / "p.png"))


def test_ensure_full_checkpoint_reuses_cache(tmp_path: Path) -> None:
    config = tmp_path / "configs" / "sd-x"
    config.mkdir(parents=True)
    (config / "model_index.json").write_text("{}")
    cached = tmp_path / "cache" / "sd-x-random-seed0"
    cached.mkdir(parents=True)
    (cached / "model_index.json").write_text("{}")
    assert benchmark.ensure_full_checkpoint(config, tmp_path / "cache", verbose=False) == cached
    with pytest.raises(FileNotFoundError):
        benchmark.ensure_full_checkpoint(tmp_path / "nope", tmp_path / "cache", verbose=False)


def test_ensure_full_checkpoint_builds_in_a_subprocess(tiny_sd1: Path, tmp_path: Path) -> None:
    """The tiny checkpoint's folder doubles as a config folder: a random-weight copy is built and then reused."""
    pytest.importorskip("diffusers")
    path = benchmark.ensure_full_checkpoint(tiny_sd1, tmp_path / "cache", seed=3, verbose=False)
    assert path == tmp_path / "cache" / f"{tiny_sd1.name}-random-seed3"
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no temporary folder left
    mtime = (path / "model_index.json").stat().st_mtime_ns
    assert benchmark.ensure_full_checkpoint(tiny_sd1, tmp_path / "cache", seed=3, verbose=False) == path
    assert (path / "model_index.json").stat().st_mtime_ns == mtime
    assert benchmark.peak_rss_bytes() > 0


def test_plot_helpers(tmp_path: Path) -> None:
    t = nice_ticks(0.0, 0.37)
    assert t[0] <= 0 and t[-1] >= 0.37 and len(t) >= 3
    assert nice_ticks(5.0, 5.0)[-1] > 5.0
    path = line_chart([Panel("a", "x", "y", {"one": [(1, 2.0), (4, None), (2, float("nan"))]}),
                       Panel("empty", "x", "y", {})], tmp_path / "sub" / "c.png", title="t")
    _assert_png(path)
    with pytest.raises(ValueError):
        line_chart([], tmp_path / "d.png")


# ---------------------------------------------------------------------------------------------- profile_memory

def test_profile_memory_quantized_with_psnr(tiny_sd1: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    out_json = tmp_path / "m.json"
    rc = profile_memory.main([str(tiny_sd1), "--height", "64", "--width", "64", "--steps", "2", "--quantize", "8",
                              "--group-size", "32", "--psnr-against-full", "--json", str(out_json)])
    assert rc == 0
    table = capsys.readouterr().out
    r = json.loads(out_json.read_text())
    assert tuple(r["phases"]) == PHASES
    for name in PHASES:
        p = r["phases"][name]
        assert p["seconds"] > 0 and p["peak_memory"] > 0 and p["peak_rss"] > 0, name
        assert name in table
    assert r["phases"]["denoising"]["steps"] == 2
    assert r["peak_memory"] == max(p["peak_memory"] for p in r["phases"].values())
    # the tiny model's linear layers are multiples of 32 wide: they are quantized, so the image changes a little
    assert r["models"]["unet"]["quantized_linear"] > 0 and r["models"]["text_encoder"]["quantized_linear"] > 0
    assert r["models"]["unet"]["quantized_conv"] > 0
    assert r["models"]["vae"]["quantized_linear"] == 0 and r["models"]["vae"]["quantized_conv"] == 0
    assert set(r["cpu_rowwise"]) >= {"available", "library", "reason"} and "; layer norms:" in table
    p = r["psnr"]
    assert not p["identical"] and math.isfinite(p["psnr_db"]) and p["psnr_db"] > 15, p
    print(f"tiny sd1, 8-bit group 32: PSNR {p['psnr_db']:.2f} dB, max abs diff {p['max_abs_diff']:.4f}")
    assert "PSNR" in table and "8-bit (group 32, linear + conv)" in table


def test_profile_memory_limits_release_and_tiled_option(tiny_sd1: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    before = mx.set_cache_limit(123_000_000)
    mx.set_cache_limit(before)
    out_json = tmp_path / "m.json"
    rc = profile_memory.main([str(tiny_sd1), "--height", "64", "--width", "64", "--steps", "1", "--release-models",
                              "--memory-limit", "8", "--cache-limit", "0.5", "--tiled-decode",
                              "--json", str(out_json)])
    assert rc == 0
    r = json.loads(out_json.read_text())
    assert tuple(r["phases"]) == PHASES and "psnr" not in r
    assert r["settings"]["release_models"] is True and r["settings"]["cache_limit"] == 0.5
    assert r["tiled_decode"] in (True, "unsupported")
    assert mx.set_cache_limit(before) == before  # the limit was restored
    assert "cache 0.5 GB" in capsys.readouterr().out


def test_psnr() -> None:
    a = np.zeros((1, 4, 4, 3), np.float32)
    assert profile_memory.psnr(a, a) == math.inf
    assert profile_memory.psnr(a, a + 0.1) == pytest.approx(20.0)
    with pytest.raises(ValueError):
        profile_memory.psnr(a, a[:, :2])


# ------------------------------------------------------------------------------------------------ blas_benchmark

def test_blas_benchmark_alternates_engines_and_summarises(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Each engine runs in a fresh process with its SD_MLX_BLAS (the status proves which BLAS it got), the order
    alternates round by round, and the table has one row per engine."""
    import sys

    from tools import blas_benchmark

    if not sys.platform.startswith("linux"):
        pytest.skip("the BLAS choice is for MLX's Linux CPU backend")
    out = tmp_path / "blas.json"
    rc = blas_benchmark.main(["--engines", "off,/nonexistent/libblas.so", "--rounds", "2", "--size", "64",
                              "--repeats", "1", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [r["engine"] for r in report["results"]] == ["off", "/nonexistent/libblas.so", "/nonexistent/libblas.so",
                                                        "off"]
    for r in report["results"]:
        assert r["gflops"] > 0 and r["blas_status"]["fast"] is False
    reasons = {r["engine"]: r["reason"] for r in report["summary"]}
    assert "SD_MLX_BLAS=off" in reasons["off"] and "could not load /nonexistent" in reasons["/nonexistent/libblas.so"]
    assert all(r["runs"] == 2 and r["min"] <= r["median"] <= r["max"] for r in report["summary"])
    assert "| off | matmul (GFLOP/s) |" in capsys.readouterr().out
    env = blas_benchmark.engine_env("scipy-openblas32@Haswell")
    assert env["SD_MLX_BLAS"] == "scipy-openblas32" and env["OPENBLAS_CORETYPE"] == "Haswell"
