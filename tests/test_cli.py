"""The txt2img CLI, the Python API around it, and the examples (issue 3), on the tiny random checkpoint.

The CLI runs in-process through ``sd_mlx.txt2img.main([...])`` (fast); exit codes are checked once more through a
real ``python -m sd_mlx.txt2img`` subprocess. Images are 64x64 with 2 steps; one pipeline is shared per module.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sd_mlx
import mlx.core as mx
from sd_mlx import txt2img
from sd_mlx.cpu.attention import fused_attention_status
from sd_mlx.cpu.rowwise import rowwise_status
from sd_mlx.cpu.winograd import winograd_status
from sd_mlx.images import read_parameters, to_uint8
from sd_mlx.pipeline import StableDiffusionPipeline, load_pipeline, loop

REPO = Path(__file__).resolve().parents[1]
SIZE = ["--width", "64", "--height", "64", "--steps", "2"]


@pytest.fixture(scope="module")
def pipe(tiny_sd1):
    """One tiny pipeline for the API tests of this module (weights loaded once)."""
    return load_pipeline(tiny_sd1)


def _run(args, capsys):
    code = txt2img.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------------------- help
OPTIONS = {  # option -> the default its help must state
    "--model": "stable-diffusion-v1-5/stable-diffusion-v1-5", "--negative-prompt": "none", "--steps": "20",
    "--guidance-scale": "7.5", "--width": "the model's native size", "--height": "the model's native size",
    "--seed": "random",
    "--num-images": "1", "--scheduler": "the model's own", "--dtype": "float32", "--output": "./sd_mlx-NNNNN.png",
    "--overwrite": "off", "--verbose": "off", "--quantize": "off", "--quantize-group-size": "64",
    "--vae": "the model's VAE", "--long-prompt": "truncate", "--clip-skip": "off", "--keep-models": "off",
    "--preview": "0, off", "--preview-vae": "the --vae TAESD",
}


def test_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        txt2img.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    # Split the help into one block per option (an option line starts with two spaces and "--").
    blocks = {m.group(1): m.group(2) for m in
              re.finditer(r"^  (--[\w-]+)(.*?)(?=^  -|\Z)", text, flags=re.S | re.M)}
    assert set(OPTIONS) <= set(blocks), f"missing options: {set(OPTIONS) - set(blocks)}"
    for opt, default in OPTIONS.items():
        help_text = " ".join(blocks[opt].split()).replace("- ", "-")
        assert f"default: {default}" in help_text, f"{opt}: {help_text!r}"
    for action in txt2img.build_parser()._actions:  # nothing undocumented slipped in
        if action.option_strings and action.option_strings[0] != "-h":
            assert "default" in " ".join(blocks[action.option_strings[0]].split()), action.option_strings


# ----------------------------------------------------------------------------------------------------------- runs
def test_run_writes_pngs_with_a1111_parameters_progress_and_verbose(tiny_sd1, tmp_path, capsys):
    out = tmp_path / "fox.png"
    code, stdout, stderr = _run(["a red fox", "--model", tiny_sd1, "--negative-prompt", "blurry", "--seed", 5,
                                 "--num-images", 2, "--scheduler", "euler", "--output", out, "--verbose", *SIZE],
                                capsys)
    assert code == 0, stderr
    assert _pngs(tmp_path) == ["fox-1.png", "fox-2.png"]
    for k, name in enumerate(["fox-1.png", "fox-2.png"]):
        expected = (f"a red fox\nNegative prompt: blurry\nSteps: 2, Sampler: Euler, CFG scale: 7.5, "
                    f"Seed: {5 + k}, Size: 64x64, Model: {tiny_sd1}")
        assert read_parameters(tmp_path / name) == expected
        with Image.open(tmp_path / name) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
        assert f"saved {tmp_path / name} (seed {5 + k})" in stdout
    # tqdm progress bar over the 2 steps, and --verbose's per-phase time and peak memory
    assert "denoising" in stderr and "2/2" in stderr
    attention = "attention: fused CPU attention" if fused_attention_status().available else "attention:"
    convolutions = "convolutions: Winograd" if winograd_status().available else "convolutions:"
    norms = "layer norms: multi-threaded" if rowwise_status().available else "layer norms:"
    for word in ("BLAS:", attention, convolutions, norms, "estimated peak memory", "text_encoding", "decoding",
                 "MLX peak GB", "RSS peak GB", "s/step", "end to end"):
        assert word in stderr, word


def test_warns_when_cpu_attention_is_unavailable(tiny_sd1, tmp_path, monkeypatch, capsys):
    """On the CPU without the fused kernel the CLI says so, and why, before any work (and still runs); not when
    the user turned it off."""
    from sd_mlx.cpu.attention import FusedAttentionStatus

    off = FusedAttentionStatus(False, None, "no C++ compiler (g++, c++, clang++ or $CXX) found")
    monkeypatch.setattr(txt2img, "fused_attention_status_on_cpu", lambda: off)
    code, _, stderr = _run(["a cat", "--model", tiny_sd1, "--seed", 1, "--output", tmp_path / "c.png", *SIZE], capsys)
    assert code == 0, stderr
    assert "warning: attention runs on MLX's single-threaded CPU path" in stderr and "no C++ compiler" in stderr
    assert stderr.index("warning: attention") < stderr.index("denoising")
    turned_off = FusedAttentionStatus(False, None, "SD_MLX_FUSED_ATTENTION=0: MLX's attention operations", True)
    monkeypatch.setattr(txt2img, "fused_attention_status_on_cpu", lambda: turned_off)
    code, _, stderr = _run(["a cat", "--model", tiny_sd1, "--seed", 1, "--output", tmp_path / "d.png", *SIZE], capsys)
    assert code == 0 and "warning: attention" not in stderr  # turned off on purpose: nothing to warn about


def test_default_names_never_collide(tiny_sd1, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["a cat", "--model", tiny_sd1, "--seed", 1, "--guidance-scale", 1, *SIZE]
    assert _run(args, capsys)[0] == 0
    assert _run(args, capsys)[0] == 0
    assert _pngs(tmp_path) == ["sd_mlx-00000.png", "sd_mlx-00001.png"]
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "sd_mlx-00041.png").write_bytes(b"not ours")  # numbering continues after the highest existing one
    assert _run([*args, "--output", sub], capsys)[0] == 0
    assert _pngs(sub) == ["sd_mlx-00041.png", "sd_mlx-00042.png"]


def test_existing_file_needs_overwrite(tiny_sd1, tmp_path, monkeypatch, capsys):
    target = tmp_path / "out.png"
    target.write_bytes(b"precious")
    monkeypatch.setattr(StableDiffusionPipeline, "_load", lambda self, name: pytest.fail("model loaded"))
    code, _, err = _run(["a cat", "--model", tiny_sd1, "--output", target, *SIZE], capsys)
    assert code == 2
    assert f"error: {target}: file exists; pass --overwrite" in err
    assert target.read_bytes() == b"precious" and _pngs(tmp_path) == ["out.png"]
    monkeypatch.undo()
    code, _, err = _run(["a cat", "--model", tiny_sd1, "--output", target, "--overwrite", "--seed", 2, *SIZE], capsys)
    assert code == 0, err
    assert read_parameters(target).startswith("a cat\nSteps: 2") and _pngs(tmp_path) == ["out.png"]


def test_bad_seed_and_size_exit_2_before_loading(tiny_sd1, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(StableDiffusionPipeline, "_load", lambda self, name: pytest.fail("model loaded"))
    base = ["a cat", "--model", tiny_sd1, "--output", tmp_path / "x.png"]
    for extra, msg in ((["--seed", -1], "seed must be between 0 and 2**64-1"),
                       (["--seed", 2**64], "seed must be between 0 and 2**64-1"),
                       (["--width", 427], "width=427 is not a multiple of 8; use 424 or 432"),
                       (["--steps", 0], "--steps must be >= 1"),
                       (["--steps", 1001], "num_inference_steps must be between 1 and 1000"),
                       (["--scheduler", "nope"], "unknown scheduler 'nope'"),
                       (["--preview", 2], "--preview needs a TAESD")):
        code, _, err = _run([*base, *extra], capsys)
        assert code == 2 and msg in err, (extra, err)
        assert "Traceback" not in err
    assert _pngs(tmp_path) == []


def test_preview_written_atomically_then_removed(tiny_sd1, assets, tmp_path, monkeypatch, capsys):
    seen = []
    original = txt2img.PreviewWriter.__call__

    def spy(self, i, t, latents):
        before = self.written
        original(self, i, t, latents)
        if self.written > before:
            with Image.open(self.path) as im:
                seen.append((i, im.size))
        assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"

    monkeypatch.setattr(txt2img.PreviewWriter, "__call__", spy)
    out = tmp_path / "p.png"
    code, _, err = _run(["a cat", "--model", tiny_sd1, "--seed", 0, "--num-images", 2, "--preview", 1,
                         "--preview-vae", assets / "taesd", "--output", out, "--verbose", *SIZE[:4], "--steps", 3,
                         "--scheduler", "euler"], capsys)
    assert code == 0, err
    assert seen == [(0, (128, 64)), (1, (128, 64)), (2, (128, 64))]  # both images side by side, every step
    assert "preview after step 3: " + str(tmp_path / "p-1.preview.png") in err
    assert _pngs(tmp_path) == ["p-1.png", "p-2.png"]  # preview deleted at the end
    # with --vae a TAESD, that decoder makes the previews too
    seen.clear()
    code, _, err = _run(["a cat", "--model", tiny_sd1, "--seed", 0, "--vae", assets / "taesd", "--preview", 2,
                         "--output", tmp_path / "v.png", *SIZE], capsys)
    assert code == 0, err
    assert seen == [(1, (64, 64))] and "v.png" in _pngs(tmp_path) and "v.preview.png" not in _pngs(tmp_path)


def test_ctrl_c_exits_130_and_leaves_nothing(tiny_sd1, assets, tmp_path, monkeypatch, capsys):
    calls = []
    original = loop.guided_output

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C during the second step, after a preview was written
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(loop, "guided_output", interrupted)
    code, _, err = _run(["a cat", "--model", tiny_sd1, "--output", tmp_path / "c.png", "--preview", 1,
                         "--preview-vae", assets / "taesd", *SIZE, "--steps", 3], capsys)
    assert code == 130 and "interrupted: no image was written" in err
    assert _pngs(tmp_path) == []  # no image, no preview, no temporary file


def test_nonfinite_exits_2_without_image(tiny_sd1, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "guided_output", lambda unet, x, *a: mx.full(x.shape, np.inf))
    code, _, err = _run(["a cat", "--model", tiny_sd1, "--output", tmp_path / "n.png", "--dtype", "float16",
                         *SIZE], capsys)
    assert code == 2
    assert "NaN or Inf appeared during denoising (step 1 of" in err and "--dtype float32" in err
    assert _pngs(tmp_path) == []


def test_exit_codes_in_a_subprocess(tiny_sd1, tmp_path):
    """A real process: existing file -> 2 with a one-line message; the default model offline with an empty Hub
    cache -> 2 with a message saying what to download or which --model PATH to pass."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "PYTHONPATH": str(REPO)}
    target = tmp_path / "exists.png"
    target.write_bytes(b"x")
    r = subprocess.run([sys.executable, "-m", "sd_mlx.txt2img", "a cat", "--model", str(tiny_sd1), "--output",
                        str(target)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "file exists; pass --overwrite" in r.stderr and "Traceback" not in r.stderr
    assert target.read_bytes() == b"x"
    r = subprocess.run([sys.executable, "-m", "sd_mlx.txt2img", "a cat", "--output", str(tmp_path / "o.png")],
                       capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5: not in the Hugging Face cache" in r.stderr
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in r.stderr and "--model PATH" in r.stderr
    assert not (tmp_path / "o.png").exists()


# ------------------------------------------------------------------------------------------------------ Python API
def test_load_once_call_many_and_release(tiny_sd1, monkeypatch):
    p = load_pipeline(tiny_sd1)
    assert p.loaded_models == ()  # load_pipeline reads configs and headers only
    loads = []
    original = p._load
    monkeypatch.setattr(p, "_load", lambda name: (loads.append(name), original(name))[1])
    kw = dict(num_inference_steps=1, height=64, width=64, seed=0, output_type="np")
    a = p("a cat", **kw).images
    b = p("a cat", **kw).images
    assert sorted(loads) == ["text_encoder", "unet", "vae"]  # the second call reloaded nothing
    assert np.array_equal(a, b)
    c = p("a cat", release_models=True, **kw).images  # drops the text encoder and the U-Net after their phases
    assert p.loaded_models == ("vae",) and np.array_equal(a, c)
    p("a cat", **kw)
    assert sorted(loads) == ["text_encoder", "text_encoder", "unet", "unet", "vae"]
    p.release("unet")
    assert set(p.loaded_models) == {"text_encoder", "vae"}
    p.release()
    assert p.loaded_models == ()
    with pytest.raises(sd_mlx.InvalidArgumentError, match="unknown component 'vea'"):
        p.release("vea")


def test_output_types(pipe):
    kw = dict(num_inference_steps=2, height=64, width=72, seed=3, scheduler="euler")
    as_np = pipe("a cat", output_type="np", **kw)
    assert isinstance(as_np.images, np.ndarray) and as_np.images.dtype == np.float32
    assert as_np.images.shape == (1, 64, 72, 3) and 0 <= as_np.images.min() and as_np.images.max() <= 1
    as_mx = pipe("a cat", output_type="mx", **kw).images
    assert isinstance(as_mx, mx.array) and np.array_equal(np.array(as_mx), as_np.images)
    as_pil = pipe("a cat", output_type="pil", **kw).images
    assert len(as_pil) == 1 and as_pil[0].size == (72, 64)
    assert np.array_equal(np.asarray(as_pil[0]), to_uint8(as_np.images)[0])
    lat = pipe("a cat", output_type="latent", **kw).images
    assert isinstance(lat, mx.array) and lat.shape == (1, 8, 9, 4)
    assert np.array_equal(np.array(pipe.decode_latents(lat)), as_np.images)
    assert as_np.seeds == [3] and as_np.parameters[0].sampler == "Euler"
    with pytest.raises(sd_mlx.InvalidArgumentError, match="output_type must be one of pil, np, latent, mx"):
        pipe("a cat", output_type="numpy", **kw)


def test_callback_once_per_step_and_cancel(pipe):
    from sd_mlx.schedulers import get_scheduler

    seen = []
    pipe("a cat", num_inference_steps=3, height=64, width=64, seed=0, scheduler="heun", output_type="latent",
         callback=lambda i, t, lat: seen.append((i, t, lat.shape, lat.dtype)))
    sched = get_scheduler("heun", pipe.scheduler_config)
    sched.set_timesteps(3)
    assert [s[0] for s in seen] == list(range(len(sched.timesteps))) == list(range(5))  # heun: 2N-1 evaluations
    assert [s[1] for s in seen] == [float(t) for t in sched.timesteps]
    assert all(s[2] == (1, 8, 8, 4) and s[3] == mx.float32 for s in seen)
    calls = []
    with pytest.raises(KeyboardInterrupt, match="cancelled by the callback"):
        pipe("a cat", num_inference_steps=4, height=64, width=64, seed=0, scheduler="euler",
             callback=lambda i, t, lat: calls.append(i) or i < 1)  # False after the second step
    assert calls == [0, 1]


# -------------------------------------------------------------------------------------------------------- examples
def test_examples_run(tiny_sd1, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "examples" / "generate.py"), "a lighthouse at dusk", "--model",
                        str(tiny_sd1), "--steps", "2", "--size", "64", "--seed", "7", "--output",
                        str(tmp_path / "gen.png")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert read_parameters(tmp_path / "gen.png").startswith("a lighthouse at dusk\n")
    r = subprocess.run([sys.executable, str(REPO / "examples" / "seed_scheduler_grid.py"), "a lighthouse",
                        "--model", str(tiny_sd1), "--steps", "2", "--size", "64", "--seeds", "0", "1", "2",
                        "--schedulers", "euler", "ddim", "--output", str(tmp_path / "grid.png")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == (3 * 64, 2 * 64)  # columns: seeds, rows: schedulers
