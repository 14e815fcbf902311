"""Parity of sd_mlx.models.clip.CLIPTextModel with transformers' CLIPTextModel / CLIPTextModelWithProjection.

Reference models are tiny (hidden 32, 4 heads, intermediate 37, vocabulary 49408), randomly initialised with
``torch.manual_seed`` and every parameter perturbed (so biases and LayerNorm weights are not trivial), saved with
``save_pretrained(safe_serialization=True)`` and loaded with our loader.

Tolerances: float32 max abs error <= 1e-4 on last_hidden_state, every hidden state (including hidden_states[-2]),
pooler_output and text_embeds. float16 weights: finite and max abs error <= 2e-2 * max(1, max |ref|) against the
float32 reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from sd_mlx.errors import ConfigError, InvalidArgumentError, WeightLoadError
from sd_mlx.loading.keymaps.clip import clip_text_benign, clip_text_keymap
from sd_mlx.models.clip import CLIP_TEXT_SPEC, CLIPTextConfig, CLIPTextModel, load_text_encoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

ATOL32 = 1e-4
REL16 = 2e-2
BOS, EOS = 49406, 49407


def _tiny_config(*, act: str, eos: int, layers: int):
    return transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=77, hidden_act=act, projection_dim=24, eos_token_id=eos, bos_token_id=BOS,
        pad_token_id=1, layer_norm_eps=1e-5)


def _make_reference(folder: Path, *, act: str = "quick_gelu", eos: int = 2, layers: int = 2,
                    projection: bool = False, seed: int = 0):
    """Build, perturb and save a tiny transformers text encoder; return it (float32, eval mode)."""
    torch.manual_seed(seed)
    cfg = _tiny_config(act=act, eos=eos, layers=layers)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(folder), safe_serialization=True)
    return model


def _input_ids(t: int = 77, seed: int = 1) -> np.ndarray:
    """Rows: SD1-style (pad with EOS), SD2-style (pad with "!" = 0), a full row, and a row without EOS."""
    rng = np.random.default_rng(seed)
    rows = []
    for n_content, pad in ((5, EOS), (11, 0), (t - 2, EOS)):
        content = rng.integers(1, 49400, size=min(n_content, t - 2)).tolist()
        row = [BOS] + content + [EOS]
        rows.append(row + [pad] * (t - len(row)))
    rows.append([BOS] + rng.integers(1, 49400, size=t - 1).tolist())  # no EOS: pooling fallbacks differ
    return np.array(rows, dtype=np.int64)


def _reference_outputs(model, ids: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        x = torch.from_numpy(ids)
        text_model = model.text_model if hasattr(model, "text_model") else model
        base = text_model(input_ids=x, output_hidden_states=True)
        out = {"last_hidden_state": base.last_hidden_state.numpy(), "pooler_output": base.pooler_output.numpy(),
               "hidden_states": [h.numpy() for h in base.hidden_states]}
        if hasattr(model, "text_projection"):
            full = model(input_ids=x, output_hidden_states=True)
            out["text_embeds"] = full.text_embeds.numpy()
            np.testing.assert_array_equal(full.last_hidden_state.numpy(), out["last_hidden_state"])
    return out


def _errors(ours, ref: dict[str, np.ndarray]) -> dict[str, float]:
    def err(a, b):
        return float(np.max(np.abs(np.array(a.astype(mx.float32)) - b)))

    assert len(ours.hidden_states) == len(ref["hidden_states"])
    errs = {
        "last_hidden_state": err(ours.last_hidden_state, ref["last_hidden_state"]),
        "hidden_states[-2]": err(ours.hidden_states[-2], ref["hidden_states"][-2]),
        "hidden_states(all)": max(err(a, b) for a, b in zip(ours.hidden_states, ref["hidden_states"])),
        "pooler_output": err(ours.pooler_output, ref["pooler_output"]),
    }
    if "text_embeds" in ref:
        assert ours.text_embeds is not None
        errs["text_embeds"] = err(ours.text_embeds, ref["text_embeds"])
    else:
        assert ours.text_embeds is None
    return errs


def _rewrite_keys(folder: Path, *, prefix: bool, position_ids: bool) -> None:
    """Rewrite ``model.safetensors`` with (or without) the ``text_model.`` prefix, optionally adding position_ids."""
    path = folder / "model.safetensors"
    state = load_file(str(path))
    new = {}
    for k, v in state.items():
        base = k[len("text_model."):] if k.startswith("text_model.") else k
        if prefix and not base.startswith("text_projection."):
            base = "text_model." + base
        new[base] = v
    if position_ids:
        new[("text_model." if prefix else "") + "embeddings.position_ids"] = torch.arange(77)[None]
    save_file(new, str(path), metadata={"format": "pt"})


CASES = [
    # (hidden_act, eos_token_id, layers, projection)
    ("quick_gelu", 2, 2, False),
    ("gelu", 2, 3, False),
    ("quick_gelu", EOS, 2, False),
    ("gelu", EOS, 4, True),
    ("gelu", 2, 2, True),
]


@pytest.mark.parametrize("act,eos,layers,projection", CASES)
@pytest.mark.parametrize("layout", ["as_saved", "prefixed", "unprefixed"])
def test_parity_float32(tmp_path, act, eos, layers, projection, layout):
    ref_model = _make_reference(tmp_path, act=act, eos=eos, layers=layers, projection=projection)
    if layout != "as_saved":
        _rewrite_keys(tmp_path, prefix=layout == "prefixed", position_ids=True)
    ids = _input_ids()
    ref = _reference_outputs(ref_model, ids)
    model = load_text_encoder(tmp_path)
    assert model.with_projection == projection
    out = model(mx.array(ids.astype(np.int32)))
    errs = _errors(out, ref)
    print(f"\n[clip f32 {act} eos={eos} layers={layers} proj={projection} {layout}] max abs err: {errs}")
    for name, e in errs.items():
        assert e <= ATOL32, f"{name}: max abs error {e:.3g} > {ATOL32}"


def test_parity_short_sequence_and_int64(tmp_path):
    ref_model = _make_reference(tmp_path, act="gelu", eos=EOS, projection=True)
    ids = _input_ids(t=10)
    ref = _reference_outputs(ref_model, ids)
    out = load_text_encoder(tmp_path)(mx.array(ids))  # int64 ids accepted as they are
    for name, e in _errors(out, ref).items():
        assert e <= ATOL32, name


def test_pooled_positions_rules(tmp_path):
    ids = mx.array(_input_ids().astype(np.int32))
    legacy = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                          intermediate_size=37, eos_token_id=2))
    new = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                       intermediate_size=37, eos_token_id=EOS))
    np_ids = np.array(ids)
    # legacy: first position of the largest id; new: first EOS, 0 when there is none
    assert legacy.pooled_positions(ids).tolist() == np.argmax(np_ids, axis=-1).tolist()
    assert new.pooled_positions(ids).tolist()[:3] == [6, 12, 76]
    assert new.pooled_positions(ids).tolist()[3] == 0


@pytest.mark.parametrize("act,eos,projection", [("quick_gelu", 2, False), ("gelu", EOS, True)])
def test_float16_finite_and_close(tmp_path, act, eos, projection):
    ref_model = _make_reference(tmp_path, act=act, eos=eos, layers=3, projection=projection)
    ids = _input_ids()
    ref = _reference_outputs(ref_model, ids)
    model = load_text_encoder(tmp_path, dtype="float16")
    assert model.embeddings.token_embedding.weight.dtype == mx.float16
    out = model(mx.array(ids.astype(np.int32)))
    assert out.last_hidden_state.dtype == mx.float16
    arrays = [out.last_hidden_state, out.pooler_output, *out.hidden_states]
    if projection:
        arrays.append(out.text_embeds)
    assert all(bool(mx.all(mx.isfinite(a)).item()) for a in arrays)
    errs = _errors(out, ref)
    print(f"\n[clip f16 {act} eos={eos} proj={projection}] max abs err vs f32 reference: {errs}")
    scale = max(1.0, float(np.max(np.abs(ref["hidden_states"][-1]))))
    for name, e in errs.items():
        assert e <= REL16 * scale, f"{name}: {e:.3g} > {REL16 * scale:.3g}"


# --------------------------------------------------------------------------------------------- loading errors
def _edit_state(folder: Path, fn) -> None:
    path = folder / "model.safetensors"
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path), metadata={"format": "pt"})


def test_missing_key(tmp_path):
    _make_reference(tmp_path)
    _edit_state(tmp_path, lambda s: s.pop("encoder.layers.1.mlp.fc1.bias"))
    with pytest.raises(WeightLoadError, match=r"encoder\.layers\.1\.mlp\.fc1\.bias"):
        load_text_encoder(tmp_path)


def test_wrong_shape(tmp_path):
    _make_reference(tmp_path)
    _rewrite_keys(tmp_path, prefix=True, position_ids=True)
    _edit_state(tmp_path, lambda s: s.__setitem__("text_model.final_layer_norm.weight", torch.ones(31)))
    with pytest.raises(WeightLoadError, match=r"text_model\.final_layer_norm\.weight.*\(31,\).*\(32,\)"):
        load_text_encoder(tmp_path)


def test_unknown_key(tmp_path):
    _make_reference(tmp_path)
    _edit_state(tmp_path, lambda s: s.__setitem__("text_model.encoder.layers.7.extra.weight", torch.ones(3)))
    with pytest.raises(WeightLoadError, match=r"text_model\.encoder\.layers\.7\.extra\.weight"):
        load_text_encoder(tmp_path)


def test_projection_weight_without_projection_config(tmp_path):
    _make_reference(tmp_path, projection=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["CLIPTextModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightLoadError, match="text_projection.weight"):
        load_text_encoder(tmp_path)


def test_both_layouts_in_one_file(tmp_path):
    _make_reference(tmp_path)
    _edit_state(tmp_path, lambda s: s.__setitem__("text_model.final_layer_norm.bias",
                                                           s["final_layer_norm.bias"].clone()))
    with pytest.raises(WeightLoadError, match="final_layer_norm.bias"):
        load_text_encoder(tmp_path)


# ------------------------------------------------------------------------------------------------- config
def test_config_from_real_files(assets):
    for name, act, layers, proj in (("stable-diffusion-v1-5/text_encoder", "quick_gelu", 12, False),
                                    ("stable-diffusion-2-1/text_encoder", "gelu", 23, False),
                                    ("stable-diffusion-xl-base-1.0/text_encoder_2", "gelu", 32, True)):
        path = assets / "configs" / name / "config.json"
        cfg = CLIPTextConfig.from_dict(json.loads(path.read_text()), str(path))
        assert (cfg.hidden_act, cfg.num_hidden_layers, cfg.with_projection, cfg.eos_token_id) == (act, layers, proj, 2)


@pytest.mark.parametrize("field,value,match", [
    ("hidden_act", "relu", "hidden_act"),
    ("architectures", ["CLIPModel"], "architectures"),
    ("eos_token_id", [2, 3], "eos_token_id"),
    ("num_attention_heads", 5, "num_attention_heads"),
    ("hidden_size", "big", "hidden_size"),
])
def test_config_errors(field, value, match):
    d = {"hidden_size": 32, "num_attention_heads": 4, field: value}
    with pytest.raises(ConfigError, match=match) as info:
        CLIPTextConfig.from_dict(d, "te/config.json")
    assert "te/config.json" in str(info.value)


def test_config_defaults_follow_transformers():
    ours = CLIPTextConfig.from_dict({}, "x")
    ref = transformers.CLIPTextConfig()
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim", "bos_token_id",
              "eos_token_id", "pad_token_id"):
        assert getattr(ours, f) == getattr(ref, f), f
    assert not ours.with_projection


def test_input_errors():
    model = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                         intermediate_size=37, max_position_embeddings=77))
    with pytest.raises(InvalidArgumentError):
        model(mx.zeros((78,), dtype=mx.int32))
    with pytest.raises(InvalidArgumentError, match="78"):
        model(mx.zeros((1, 78), dtype=mx.int32))


# ------------------------------------------------------------------------------------------------- keymap
def test_keymap_pure():
    v = mx.zeros((2, 3))
    for key, want in (("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"),
                      ("embeddings.token_embedding.weight", "embeddings.token_embedding.weight"),
                      ("text_model.encoder.layers.3.self_attn.q_proj.bias", "encoder.layers.3.self_attn.q_proj.bias"),
                      ("text_model.final_layer_norm.weight", "final_layer_norm.weight"),
                      ("text_projection.weight", "text_projection.weight"),
                      ("vision_model.post_layernorm.weight", "vision_model.post_layernorm.weight")):
        out = clip_text_keymap(key, v)
        assert len(out) == 1 and out[0][0] == want and out[0][1] is v
    assert clip_text_benign("text_model.embeddings.position_ids")
    assert clip_text_benign("embeddings.position_ids")
    assert not clip_text_benign("text_model.embeddings.position_embedding.weight")
    assert not clip_text_benign("other.embeddings.position_ids")
    assert CLIP_TEXT_SPEC.weight_stem == "model"


# ----------------------------------------------------------------------------- tiny pipeline checkpoints
@pytest.mark.parametrize("fixture", ["tiny_sd2", "tiny_sd1_noprefix"])
def test_tiny_checkpoint_text_encoder(request, fixture):
    """Tokenizer + text encoder of a tools/make_checkpoint checkpoint against transformers, prompt to embeddings."""
    from sd_mlx.tokenizer import CLIPTokenizer

    root = request.getfixturevalue(fixture)
    ref_tok = transformers.CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    ref_model = transformers.CLIPTextModel.from_pretrained(str(root / "text_encoder")).eval()
    prompts = ["a photo of an astronaut riding a horse on mars!", ""]
    ref_ids = ref_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids = CLIPTokenizer.from_folder(root / "tokenizer")(prompts)
    assert ids.tolist() == ref_ids.tolist()
    with torch.no_grad():
        ref = ref_model(ref_ids, output_hidden_states=True)
    out = load_text_encoder(root / "text_encoder")(ids)
    assert np.max(np.abs(np.array(out.last_hidden_state) - ref.last_hidden_state.numpy())) <= ATOL32
    assert np.max(np.abs(np.array(out.hidden_states[-2]) - ref.hidden_states[-2].numpy())) <= ATOL32
    assert np.max(np.abs(np.array(out.pooler_output) - ref.pooler_output.numpy())) <= ATOL32


# ------------------------------------------------------------------------------------------ full size (slow)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["stable-diffusion-v1-5", "stable-diffusion-2-1"])
def test_full_size_random_weights(tmp_path, assets, name):
    cfg_path = assets / "configs" / name / "text_encoder" / "config.json"
    cfg = transformers.CLIPTextConfig.from_pretrained(str(cfg_path.parent))
    torch.manual_seed(0)
    ref_model = transformers.CLIPTextModel(cfg).eval()
    ref_model.save_pretrained(str(tmp_path), safe_serialization=True)
    _rewrite_keys(tmp_path, prefix=True, position_ids=True)  # the layout of the real checkpoints
    ids = _input_ids()
    ref = _reference_outputs(ref_model, ids)
    del ref_model
    out = load_text_encoder(tmp_path)(mx.array(ids.astype(np.int32)))
    errs = _errors(out, ref)
    print(f"\n[clip full-size {name}] max abs err: {errs}")
    for k, e in errs.items():
        assert e <= ATOL32, f"{k}: {e:.3g}"
