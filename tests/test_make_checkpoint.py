"""Tests of tools/make_checkpoint.py: the tiny checkpoints load in diffusers and behave; key layouts; tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import assets_dir, require_reference_libs


def _load_pipe(path: Path):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _te_keys(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "text_encoder" / "model.safetensors"))


@pytest.mark.parametrize("name", ["tiny_sd1", "tiny_sd2", "tiny_sd1_noprefix"])
def test_tiny_pipeline_runs_in_diffusers(name: str, request: pytest.FixtureRequest) -> None:
    import torch

    path = request.getfixturevalue(name)
    pipe = _load_pipe(path)
    # The text encoder diffusers loaded holds the file's weights (not a silent re-initialisation).
    state = _te_keys(path)
    loaded = pipe.text_encoder.state_dict()
    for key, value in state.items():
        base = key.removeprefix("text_model.")
        if base == "embeddings.position_ids":
            continue
        ref = loaded.get(base, loaded.get("text_model." + base))
        assert ref is not None, key
        assert torch.equal(ref, value), key
    out = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=7.5, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all()
    # Model outputs are O(1) (not exploding, not trivially zero).
    with torch.no_grad():
        ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        emb = pipe.text_encoder(ids)[0]
        eps = pipe.unet(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), 500, emb).sample
        img = pipe.vae.decode(torch.randn(1, 4, 8, 8) / 0.18215).sample
    for t in (emb, eps, img):
        assert torch.isfinite(t).all()
        assert 0.05 < float(t.std()) < 20.0


def test_every_parameter_is_perturbed(tiny_sd1: Path) -> None:
    from safetensors.torch import load_file

    for comp in ("unet", "vae"):
        state = load_file(str(tiny_sd1 / comp / "diffusion_pytorch_model.safetensors"))
        for key, value in state.items():
            assert float(value.abs().max()) > 0, f"{comp}: {key} is all zeros"
        # zero-initialised in diffusers, perturbed here
        w = state["conv_out.weight"] if comp == "unet" else state["decoder.conv_out.weight"]
        assert float(w.std()) > 0.01


def test_text_encoder_key_layouts(tiny_sd1: Path, tiny_sd1_noprefix: Path) -> None:
    import torch

    with_prefix = _te_keys(tiny_sd1)
    assert all(k.startswith("text_model.") for k in with_prefix)
    pos = with_prefix["text_model.embeddings.position_ids"]
    assert pos.dtype == torch.int64 and torch.equal(pos, torch.arange(77)[None])
    without = _te_keys(tiny_sd1_noprefix)
    assert not any(k.startswith("text_model.") for k in without)
    assert "embeddings.position_ids" not in without
    assert {k.removeprefix("text_model.") for k in with_prefix} == set(without) | {"embeddings.position_ids"}


def test_configs_and_tokenizers(tiny_sd1: Path, tiny_sd2: Path) -> None:
    from transformers import CLIPTokenizer

    u1 = json.loads((tiny_sd1 / "unet" / "config.json").read_text())
    u2 = json.loads((tiny_sd2 / "unet" / "config.json").read_text())
    assert u1["use_linear_projection"] is False and isinstance(u1["attention_head_dim"], int)
    assert u2["use_linear_projection"] is True and u2["upcast_attention"] is True
    assert isinstance(u2["attention_head_dim"], list) and len(u2["attention_head_dim"]) == 3
    assert u1["cross_attention_dim"] == 32 and u1["sample_size"] == 8
    vae = json.loads((tiny_sd1 / "vae" / "config.json").read_text())
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8
    s1 = json.loads((tiny_sd1 / "scheduler" / "scheduler_config.json").read_text())
    s2 = json.loads((tiny_sd2 / "scheduler" / "scheduler_config.json").read_text())
    assert s1["_class_name"] == "PNDMScheduler" and s1.get("prediction_type", "epsilon") == "epsilon"
    assert s2["prediction_type"] == "v_prediction"
    t1 = json.loads((tiny_sd1 / "text_encoder" / "config.json").read_text())
    t2 = json.loads((tiny_sd2 / "text_encoder" / "config.json").read_text())
    assert (t1["hidden_act"], t2["hidden_act"]) == ("quick_gelu", "gelu")
    assert (t1["bos_token_id"], t1["eos_token_id"], t1["pad_token_id"]) == (0, 2, 1)

    tok1 = CLIPTokenizer.from_pretrained(str(tiny_sd1 / "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(str(tiny_sd2 / "tokenizer"))
    assert (tok1.pad_token, tok1.pad_token_id) == ("<|endoftext|>", 49407)
    assert (tok2.pad_token, tok2.pad_token_id) == ("!", 0)
    ids2 = tok2("a cat", padding="max_length", max_length=8).input_ids
    assert ids2 == [49406, 320, 2368, 49407, 0, 0, 0, 0]
    # tokenizer files are the real ones, verbatim
    src = assets_dir() / "configs" / "stable-diffusion-2-1" / "tokenizer"
    for f in src.iterdir():
        assert (tiny_sd2 / "tokenizer" / f.name).read_bytes() == f.read_bytes()


def test_full_checkpoint_from_config_folder(tiny_sd1: Path, tmp_path: Path) -> None:
    """make_full_checkpoint on a (tiny) config folder: components, fp16 variants, diffusers can load it."""
    require_reference_libs()
    import torch
    from tools.make_checkpoint import make_full_checkpoint

    out = make_full_checkpoint(tiny_sd1, tmp_path / "full", fp16_variant=True)
    for comp, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        assert (out / comp / f"{stem}.safetensors").is_file()
        assert (out / comp / f"{stem}.fp16.safetensors").is_file()
    assert (out / "tokenizer" / "vocab.json").is_file()
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]
    pipe = _load_pipe(out)
    assert pipe.unet.dtype == torch.float32
    with pytest.raises(FileExistsError):
        make_full_checkpoint(tiny_sd1, out)


def test_cli_refuses_to_overwrite(tmp_path: Path) -> None:
    from tools.make_checkpoint import main

    (tmp_path / "x").write_text("keep")
    assert main(["tiny-sd1", str(tmp_path)]) == 2
    assert (tmp_path / "x").read_text() == "keep"


@pytest.mark.slow
def test_full_sd15_checkpoint(tmp_path: Path) -> None:
    """Full-size SD1.5 random checkpoint (about 1 B parameters): builds and has the real key layout."""
    require_reference_libs()
    from safetensors import safe_open
    from tools.make_checkpoint import make_full_checkpoint

    out = make_full_checkpoint(assets_dir() / "configs" / "stable-diffusion-v1-5", tmp_path / "sd15",
                               dtype="float16")
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert len(keys) == 686
        assert "conv_in.weight" in keys
    with safe_open(str(out / "text_encoder" / "model.safetensors"), "pt") as f:
        assert "text_model.embeddings.position_ids" in f.keys()
