"""A single-file checkpoint through the pipeline and the CLI: images against diffusers' ``from_single_file`` on
the same file (same initial latents, within 1/255 per pixel) and bit-identical to the images of the diffusers
folder the file was written from (the weights are the same bits); ``--vae FILE``; the family in ``--verbose``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import sd_mlx
import mlx.core as mx

from sd_mlx.errors import ConfigError, ModelNotFoundError
from sd_mlx import txt2img

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_extra  # noqa: E402
from conftest import CHECKPOINT_CACHE, assets_dir, require_reference_libs  # noqa: E402

from tools.convert import diffusers_to_single  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1.0 / 255
H = W = 64
PROMPT = "a photo of a cat wearing a tiny hat"


@pytest.fixture(scope="module")
def sd1_file(tiny_sd1, tmp_path_factory) -> Path:
    return diffusers_to_single(tiny_sd1, tmp_path_factory.mktemp("sf") / "tiny-sd1.safetensors")


@pytest.fixture(scope="module")
def sd2_file(tiny_sd2, tmp_path_factory) -> Path:
    return diffusers_to_single(tiny_sd2, tmp_path_factory.mktemp("sf") / "tiny-sd2.safetensors")


def _latents(batch: int = 1) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((batch, H // 8, W // 8, 4)).astype(np.float32)


def _ours(model, scheduler, **kw) -> np.ndarray:
    pipe = sd_mlx.load_pipeline(model, **kw)
    return pipe(PROMPT, negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5, height=H, width=W,
                seed=5, scheduler=scheduler, latents=_latents(), output_type="np").images


def _reference(file, folder, scheduler_cls) -> np.ndarray:
    pipe = diffusers.StableDiffusionPipeline.from_single_file(str(file), config=str(folder), local_files_only=True,
                                                              safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if scheduler_cls:
        pipe.scheduler = getattr(diffusers, scheduler_cls).from_config(pipe.scheduler.config)
    return pipe(PROMPT, negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5, height=H, width=W,
                latents=torch.from_numpy(_latents().transpose(0, 3, 1, 2).copy()), output_type="np").images


@pytest.mark.parametrize("kind,scheduler,cls", [("sd1", None, None), ("sd1", "euler", "EulerDiscreteScheduler"),
                                                ("sd2", "euler", "EulerDiscreteScheduler")])
def test_single_file_images_match_diffusers_from_single_file(kind, scheduler, cls, request):
    folder = request.getfixturevalue(f"tiny_{kind}")
    file = request.getfixturevalue(f"{kind}_file")
    ours = _ours(file, scheduler, config=folder)
    ref = _reference(file, folder, cls)
    err = np.abs(ours - ref).max()
    print(f"{kind} {scheduler}: max pixel error {err * 255:.4f}/255, image std {ref.std():.3f}")
    assert ref.std() > 0.01
    assert err <= TOL, f"max pixel error {err * 255:.3f}/255"
    from_folder = _ours(folder, scheduler)
    assert np.array_equal(ours, from_folder)  # same weights, same bits


def test_vae_file_replaces_the_model_vae(tiny_sd1, sd1_file, tmp_path):
    """--vae with a single VAE file (LDM layout, no config) gives the images of the model's own VAE."""
    arrays = {k[len("first_stage_model."):]: v for k, v in mx.load(str(sd1_file)).items()
              if k.startswith("first_stage_model.")}
    vae_file = tmp_path / "vae-ft.safetensors"
    mx.save_safetensors(str(vae_file), arrays)
    no_vae = tmp_path / "no-vae.safetensors"
    mx.save_safetensors(str(no_vae), {k: v for k, v in mx.load(str(sd1_file)).items()
                                      if not k.startswith("first_stage_model.")})
    base = _ours(tiny_sd1, None)
    assert np.array_equal(_ours(tiny_sd1, None, vae=vae_file), base)               # folder model + VAE file
    assert np.array_equal(_ours(no_vae, None, config=tiny_sd1, vae=vae_file), base)  # VAE-less file + VAE file
    assert np.array_equal(_ours(no_vae, None, config=tiny_sd1, vae=tiny_sd1 / "vae"), base)  # + KL folder
    with pytest.raises(ModelNotFoundError, match="no vae weights.*--vae"):
        sd_mlx.load_pipeline(no_vae, config=tiny_sd1)


def test_pipeline_refuses_what_it_does_not_run(tiny_sd1, tmp_path):
    require_reference_libs()
    folder = tiny_extra.build_cached("sdxl", CHECKPOINT_CACHE, assets_dir())
    xl = diffusers_to_single(folder, tmp_path / "xl.safetensors")
    with pytest.raises(ConfigError, match="Stable Diffusion XL base single file.*SD 1.x/2.x only"):
        sd_mlx.load_pipeline(xl, config=folder)
    with pytest.raises(sd_mlx.InvalidArgumentError, match="single-file"):
        sd_mlx.load_pipeline(tiny_sd1, config=tiny_sd1)


def test_prediction_type_override_on_a_folder(tiny_sd2):
    assert sd_mlx.load_pipeline(tiny_sd2).scheduler_config["prediction_type"] == "v_prediction"
    pipe = sd_mlx.load_pipeline(tiny_sd2, prediction_type="epsilon")
    assert pipe.scheduler_config["prediction_type"] == "epsilon"


def test_cli_single_file_states_the_family(tiny_sd1, sd1_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cat.png"
    code = txt2img.main(["a cat", "--model", str(sd1_file), "--config", str(tiny_sd1), "--steps", "2",
                         "--width", "64", "--height", "64", "--seed", "3", "--output", str(out), "--verbose",
                         "--prediction-type", "epsilon", "--tokenizer", str(tiny_sd1 / "tokenizer")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert out.is_file()
    assert "Stable Diffusion 1.x [sd1]" in captured.err
    assert "prediction_type epsilon (asked for" in captured.err
    code = txt2img.main(["a cat", "--model", str(tmp_path / "missing.safetensors"), "--steps", "1"])
    assert code == 2 and "no such checkpoint file" in capsys.readouterr().err


def test_quantized_and_half_precision_loads_from_a_single_file(tiny_sd1, sd1_file):
    """The quantized (lazy, layer by layer) and float16 load paths read the single file's weights too: the images
    equal the ones made from the diffusers folder with the same settings."""
    for kw in ({"quantize": 8}, {"dtype": "float16"}):
        assert np.array_equal(_ours(sd1_file, None, config=tiny_sd1, **kw), _ours(tiny_sd1, None, **kw)), kw
