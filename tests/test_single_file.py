"""Single-file (original LDM layout) checkpoints: key maps, family detection, strictness, configs, tokenizer, pickles.

Each tiny diffusers checkpoint (SD 1.x, SD 2.x, SD 1.x inpainting, SDXL base, SDXL refiner) is written as a single
file by ``tools/convert.py``; sd_mlx's diffusers-named weights of every component must equal, bit for bit (dtype
and values), both the diffusers folder it came from and what diffusers' ``from_single_file`` loads from the same file
(given the folder as ``config``). The built-in configs are checked field by field against the public configs in the
assets, and the key plan against the real model sizes (diffusers models built on torch's meta device, no weights).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import sd_mlx
import mlx.core as mx
from mlx.utils import tree_flatten

from sd_mlx.errors import ConfigError, ModelNotFoundError, WeightLoadError
from sd_mlx.loading import family_configs as fc
from sd_mlx.loading.builtin_tokenizer import builtin_tokenizer, clip_bpe
from sd_mlx.loading.components import load_component, load_from_source
from sd_mlx.loading.keymaps.ldm import Piece, diffusers_clip_key_to_open_clip, diffusers_unet_key_to_ldm, \
    diffusers_vae_key_to_ldm, ldm_unet_key, ldm_vae_key, open_clip_key
from sd_mlx.loading.single_file import (
    IGNORED_REASONS,
    SingleFileSource,
    TEXT_ENCODERS,
    default_prediction_type,
    detect_family,
    file_prediction_type,
    plan_keys,
    vae_file_weights,
)
from sd_mlx.loading.source import FolderSource, open_source

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_extra  # noqa: E402
from conftest import CHECKPOINT_CACHE, assets_dir, require_reference_libs  # noqa: E402

from tools.convert import ckpt_to_safetensors, diffusers_to_single, single_to_diffusers  # noqa: E402

KINDS = ("sd1", "sd2", "sd1-inpainting", "sdxl", "sdxl-refiner")
COMPONENTS = {"sd1": ("unet", "vae", "text_encoder"), "sd2": ("unet", "vae", "text_encoder"),
              "sd1-inpainting": ("unet", "vae", "text_encoder"),
              "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"),
              "sdxl-refiner": ("unet", "vae", "text_encoder_2")}
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
             "sd1-inpainting": "StableDiffusionInpaintPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}


def _norm_text(state: dict) -> dict:
    """Text-encoder keys without ``text_model.`` and without the ``position_ids`` buffer."""
    return {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in state.items()
            if not k.endswith("embeddings.position_ids")}


def _np(a) -> np.ndarray:
    if isinstance(a, mx.array):
        return np.array(a.astype(mx.float32)) if a.dtype == mx.bfloat16 else np.array(a)
    return a.detach().float().numpy() if str(a.dtype) == "torch.bfloat16" else a.detach().numpy()


def _same(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        x, y = _np(a[k]), _np(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what} '{k}': {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
        assert np.array_equal(x, y), f"{what} '{k}' differs"


@pytest.fixture(scope="session")
def folders(tiny_sd1, tiny_sd2) -> dict[str, Path]:
    """The tiny diffusers folders of :data:`KINDS`."""
    require_reference_libs()
    out = {"sd1": tiny_sd1, "sd2": tiny_sd2}
    for kind in tiny_extra.KINDS:
        out[kind] = tiny_extra.build_cached(kind, CHECKPOINT_CACHE, assets_dir())
    return out


@pytest.fixture(scope="session")
def files(folders, tmp_path_factory) -> dict[str, Path]:
    """Each tiny folder written as one single file by tools/convert.py."""
    root = tmp_path_factory.mktemp("single")
    return {k: diffusers_to_single(v, root / f"{k}.safetensors") for k, v in folders.items()}


def _rewrite(src: Path, dst: Path, *, drop=(), add=None, metadata=None) -> Path:
    arrays = dict(mx.load(str(src)))
    for k in drop:
        arrays.pop(k)
    arrays.update(add or {})
    mx.save_safetensors(str(dst), arrays, metadata=metadata or {"format": "pt"})
    return dst


# ------------------------------------------------------------------------------------------ bit-exact mapping

@pytest.mark.parametrize("kind", KINDS)
def test_weights_equal_folder_and_diffusers_from_single_file(kind, folders, files):
    import diffusers

    src = SingleFileSource(files[kind], config=folders[kind])
    assert src.family.name == kind
    assert set(src.components) == set(COMPONENTS[kind])
    assert not src.plan.ignored
    folder = FolderSource(folders[kind])
    pipe = getattr(diffusers, PIPELINES[kind]).from_single_file(str(files[kind]), config=str(folders[kind]),
                                                                local_files_only=True)
    for comp in COMPONENTS[kind]:
        ours, _ = src.weights(comp)
        theirs, _ = folder.weights(comp)
        ref = getattr(pipe, comp).state_dict()
        if comp.startswith("text_encoder"):
            theirs, ref = _norm_text(theirs), _norm_text(ref)
        _same(ours, theirs, f"{kind} {comp} vs folder")
        _same(ours, ref, f"{kind} {comp} vs diffusers from_single_file")
        header = src.header(comp)
        assert {k: v.shape for k, v in header.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert src.scheduler_config()["prediction_type"] == pipe.scheduler.config.prediction_type


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sd1-inpainting", "sdxl"])
def test_sd_mlx_models_load_strictly_from_the_file(kind, folders, files):
    """The existing strict loaders build each supported component from the file, parameters equal to the ones
    loaded from the folder (SDXL: its text encoders and VAE; its U-Net is the SDXL work's)."""
    from sd_mlx.models.clip import CLIP_TEXT_SPEC
    from sd_mlx.models.unet import UNET_SPEC
    from sd_mlx.models.vae import VAE_SPEC

    src = SingleFileSource(files[kind], config=folders[kind])
    specs = {"unet": UNET_SPEC, "vae": VAE_SPEC, "text_encoder": CLIP_TEXT_SPEC, "text_encoder_2": CLIP_TEXT_SPEC}
    for comp in COMPONENTS[kind]:
        if kind.startswith("sdxl") and comp == "unet":
            continue
        ours = dict(tree_flatten(load_from_source(src, comp, specs[comp]).parameters()))
        ref = dict(tree_flatten(load_component(folders[kind] / comp, specs[comp]).parameters()))
        _same(ours, ref, f"{kind} {comp} model")


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_round_trip_to_diffusers_folder(kind, folders, files, tmp_path):
    import diffusers

    out = single_to_diffusers(files[kind], tmp_path / "back", config=folders[kind])
    for comp in COMPONENTS[kind]:
        a, _ = FolderSource(out).weights(comp)
        b, _ = FolderSource(folders[kind]).weights(comp)
        if comp.startswith("text_encoder"):
            a, b = _norm_text(a), _norm_text(b)
        _same(a, b, f"round trip {comp}")
        assert json.loads((out / comp / "config.json").read_text()) == json.loads(
            (folders[kind] / comp / "config.json").read_text())
    pipe = getattr(diffusers, PIPELINES[kind]).from_pretrained(str(out))  # a valid diffusers folder
    assert pipe.unet.config.in_channels == 4
    with pytest.raises(sd_mlx.OutputError, match="exists"):
        single_to_diffusers(files[kind], out, config=folders[kind])


def test_folder_from_builtin_configs_is_a_diffusers_pipeline(files, tmp_path):
    """to-diffusers without --config writes sd_mlx's built-in configs and packaged tokenizer; transformers' and
    diffusers' own loaders accept them (tokenizer ids equal to the reference tokenizer's)."""
    from transformers import CLIPTokenizer

    folder = tmp_path / "cfg"
    shutil.copytree(assets_dir() / "configs" / "stable-diffusion-v1-5", folder)
    tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    # The tiny file's sizes do not fit the real configs, so check the written files themselves.
    from tools.convert import _tokenizer_files

    _tokenizer_files(None, tmp_path / "tok", fc.PAD_ENDOFTEXT)
    ours = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = "a photo of an astronaut riding a horse on mars!"
    assert ours(text).input_ids == tok(text).input_ids


# ------------------------------------------------------------------------------------- configs as package data

def _with_defaults(cls, config: dict) -> dict:
    """The ``__init__`` arguments diffusers builds ``cls`` with from ``config`` (signature defaults filled in)."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    out = {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}
    out.update(cls.extract_init_dict(dict(config))[0])
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


_REFERENCE = [("sd1", None, "stable-diffusion-v1-5"), ("sd1-inpainting", None, "stable-diffusion-inpainting"),
              ("sd2", None, "stable-diffusion-2-1"), ("sd2", "epsilon", "stable-diffusion-2-1-base"),
              ("sdxl", None, "stable-diffusion-xl-base-1.0"), ("sdxl-refiner", None, "stable-diffusion-xl-refiner-1.0")]


@pytest.mark.parametrize("family,pt,ref", _REFERENCE)
def test_builtin_configs_equal_the_public_configs(family, pt, ref, assets):
    """Every field (diffusers/transformers defaults filled in) equals the public config's."""
    require_reference_libs()
    import diffusers
    from transformers import CLIPTextConfig

    ours = fc.family_configs(family, pt)
    folder = assets / "configs" / ref
    for comp, cls in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL)):
        theirs = json.loads((folder / comp / "config.json").read_text())
        a, b = _with_defaults(cls, ours[comp]), _with_defaults(cls, theirs)
        assert a == b, f"{comp}: {[(k, a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)]}"
    for comp in ("text_encoder", "text_encoder_2"):
        if not (folder / comp).is_dir():
            assert comp not in ours
            continue
        skip = ("_name_or_path", "torch_dtype", "dtype", "transformers_version", "output_hidden_states",
                "dropout")  # dropout: no effect in inference (not a transformers 5 config field)
        a = {k: v for k, v in CLIPTextConfig(**ours[comp]).to_dict().items() if k not in skip}
        b = {k: v for k, v in CLIPTextConfig.from_json_file(str(folder / comp / "config.json")).to_dict().items()
             if k not in skip}
        assert a == b, f"{comp}: {[(k, a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)]}"
    theirs = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, theirs["_class_name"])
    assert ours["scheduler"]["_class_name"] == theirs["_class_name"]
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(cls.from_config(ours["scheduler"]).config) == public(cls.from_config(theirs).config)
    for name, pad in ours["tokenizers"].items():
        special = json.loads((folder / name / "special_tokens_map.json").read_text())
        assert special["pad_token"] == pad


def test_sd2_prediction_type_picks_the_model():
    v, eps = fc.family_configs("sd2"), fc.family_configs("sd2", "epsilon")
    assert v["scheduler"]["prediction_type"] == "v_prediction" and v["unet"]["sample_size"] == 96
    assert v["unet"]["upcast_attention"] is True
    assert eps["scheduler"]["prediction_type"] == "epsilon" and eps["unet"]["sample_size"] == 64
    assert "upcast_attention" not in eps["unet"]
    assert fc.family_configs("sd1", "v_prediction")["scheduler"]["prediction_type"] == "v_prediction"
    assert fc.family_configs("sd2-inpainting")["scheduler"]["prediction_type"] == "epsilon"
    with pytest.raises(KeyError):
        fc.family_configs("sd3")


# ------------------------------------------------------------------------- real model sizes, no weights needed

def _meta_state(cls, cfg: dict) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import PreTrainedModel

    with torch.device("meta"):
        model = cls(cls.config_class(**cfg)) if issubclass(cls, PreTrainedModel) else cls.from_config(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _ldm_shapes(family: str, configs: dict, states: dict[str, dict]) -> dict[str, tuple[int, ...]]:
    """Original-layout key shapes of diffusers state-dict shapes (the inverse maps, on shapes only)."""
    out: dict[str, tuple[int, ...]] = {}
    u = configs["unet"]
    up_attn = [t.startswith("CrossAttn") for t in u["up_block_types"]]
    for k, s in states["unet"].items():
        out["model.diffusion_model." + diffusers_unet_key_to_ldm(k, u["layers_per_block"], up_attn)] = s
    for k, s in states["vae"].items():
        ldm, unsq = diffusers_vae_key_to_ldm(k, 4)
        out["first_stage_model." + ldm] = s + (1, 1) if unsq else s
    for comp, prefix, layout in TEXT_ENCODERS[family.replace("-inpainting", "")]:
        for k, s in _norm_text(states[comp]).items():
            if layout == "clip":
                out[prefix + "text_model." + k] = s
                continue
            name, part, transpose = diffusers_clip_key_to_open_clip(k)
            if part is not None:
                s = (3 * s[0], *s[1:])
            out[prefix + name] = (s[1], s[0]) if transpose else s
    return out


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd1-inpainting", "sdxl", "sdxl-refiner"])
def test_real_layout_is_detected_and_fully_planned(family):
    """Full-size key names and shapes (from the built-in configs, diffusers models on the meta device) plus the
    extras real files carry: the family is detected, every diffusers tensor is planned with its shape, every
    extra is ignored with a reason; a foreign key is refused by name."""
    require_reference_libs()
    import diffusers
    import transformers

    configs = fc.family_configs(family)
    states = {"unet": _meta_state(diffusers.UNet2DConditionModel, configs["unet"]),
              "vae": _meta_state(diffusers.AutoencoderKL, configs["vae"])}
    for comp in ("text_encoder", "text_encoder_2"):
        if comp in configs:
            cls = getattr(transformers, configs[comp]["architectures"][0])
            states[comp] = _meta_state(cls, configs[comp])
    shapes = _ldm_shapes(family, configs, states)
    extras = {"alphas_cumprod": (1000,), "betas": (1000,), "model_ema.decay": (), "model_ema.num_updates": (),
              "model_ema.diffusion_modelinput_blocks00weight": shapes["model.diffusion_model.input_blocks.0.0.weight"]}
    base = family.replace("-inpainting", "")
    if base == "sd1":
        extras["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (1, 77)
        assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in shapes  # diffusers' v1 key
    if base == "sd2":
        assert shapes["model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"][-1] == 1024
        for k in [k for k in shapes if ".resblocks.22." in k]:  # the 24th OpenCLIP layer, unused
            extras[k.replace(".resblocks.22.", ".resblocks.23.")] = shapes[k]
        extras.update({"cond_stage_model.model.text_projection": (1024, 1024), "cond_stage_model.model.logit_scale": ()})
    if base == "sdxl":
        assert "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias" in shapes
        extras.update({"conditioner.embedders.1.model.logit_scale": (), "denoiser.sigmas": (1000,)})
    if base == "sdxl-refiner":
        assert "conditioner.embedders.0.model.text_projection" in shapes
    fam = detect_family(dict(shapes, **extras))
    assert fam.name == family
    plan = plan_keys(dict(shapes, **extras), fam, configs)
    assert set(plan.ignored) == set(extras)
    assert all(r in IGNORED_REASONS.values() for r in plan.ignored.values())
    for comp, state in states.items():
        want = _norm_text(state) if comp.startswith("text") else state
        got = {dk: piece.shape(shapes[fk]) for dk, (fk, piece) in plan.components[comp].items()}
        assert got == want, f"{comp}: {sorted(set(got) ^ set(want))[:4]}"
    with pytest.raises(WeightLoadError, match="unknown key 'model.diffusion_model.input_blocks.99.0.foo.weight'"):
        plan_keys(dict(shapes, **{"model.diffusion_model.input_blocks.99.0.foo.weight": (1,)}), fam, configs)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd1-inpainting"])
def test_builtin_configs_build_models_of_the_planned_shapes(family):
    """sd_mlx's models built from the built-in configs (parameters unevaluated, so nothing is allocated) take the
    full-size tensors of the plan: every parameter receives one array of its shape through the usual key maps."""
    require_reference_libs()
    import diffusers
    import transformers

    from sd_mlx.models.clip import CLIP_TEXT_SPEC
    from sd_mlx.models.unet import UNET_SPEC
    from sd_mlx.models.vae import VAE_SPEC
    from sd_mlx.loading.weights import remap_weights

    configs = fc.family_configs(family)
    for comp, spec, cls in (("unet", UNET_SPEC, diffusers.UNet2DConditionModel),
                            ("vae", VAE_SPEC, diffusers.AutoencoderKL),
                            ("text_encoder", CLIP_TEXT_SPEC, transformers.CLIPTextModel)):
        state = _meta_state(cls, configs[comp])
        model = spec.build(spec.config_from_dict(configs[comp], comp))
        params = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
        lazy = {k: mx.zeros(s) for k, s in (_norm_text(state) if comp == "text_encoder" else state).items()}
        mapped = remap_weights(lazy, spec.keymap, source=comp, benign=spec.benign)
        assert {k: tuple(a.shape) for k, (_, a) in mapped.items()} == params


# -------------------------------------------------------------------------------------------------- tokenizer

def test_packaged_tokenizer_equals_the_reference_files(assets):
    from sd_mlx.tokenizer import CLIPTokenizer

    ref = assets / "configs" / "stable-diffusion-v1-5" / "tokenizer"
    vocab, merges = clip_bpe()
    assert vocab == json.loads((ref / "vocab.json").read_text(encoding="utf-8"))
    packaged = Path(sd_mlx.__file__).parent / "data" / "clip_tokenizer" / "merges.txt.gz"
    assert hashlib.sha256(gzip.decompress(packaged.read_bytes())).hexdigest() == \
        hashlib.sha256((ref / "merges.txt").read_bytes()).hexdigest()
    prompts = ["a photo of a cat!! wearing a hat", "Héllo   WORLD <|endoftext|> 123 !", "emoji 😀 ﬁ", ""]
    for pad, folder in ((fc.PAD_ENDOFTEXT, "stable-diffusion-v1-5/tokenizer"),
                        (fc.PAD_EXCLAMATION, "stable-diffusion-2-1/tokenizer"),
                        (fc.PAD_EXCLAMATION, "stable-diffusion-xl-base-1.0/tokenizer_2")):
        ours, theirs = builtin_tokenizer(pad), CLIPTokenizer.from_folder(assets / "configs" / folder)
        assert ours(prompts).tolist() == theirs(prompts).tolist()
        assert ours.pad_token_id == theirs.pad_token_id


def test_tokenizer_sources(files, folders, tmp_path, assets):
    sd2 = SingleFileSource(files["sd2"], config=folders["sd2"])
    assert sd2.tokenizer().pad_token_id == 0                       # the config folder's
    xl = SingleFileSource(files["sdxl"], config=folders["sdxl"])
    assert xl.tokenizer("tokenizer").pad_token_id == 49407 and xl.tokenizer("tokenizer_2").pad_token_id == 0
    given = SingleFileSource(files["sd2"], config=folders["sd2"], tokenizer=assets / "configs" /
                             "stable-diffusion-v1-5" / "tokenizer")
    assert given.tokenizer().pad_token_id == 49407                 # --tokenizer wins
    cfg = tmp_path / "cfg"
    shutil.copytree(folders["sd2"], cfg, ignore=shutil.ignore_patterns("tokenizer"))
    assert SingleFileSource(files["sd2"], config=cfg).tokenizer().pad_token_id == 0   # packaged, SD 2 pad
    with pytest.raises(ModelNotFoundError, match="no tokenizer_2"):
        sd2.tokenizer("tokenizer_2")
    with pytest.raises(ModelNotFoundError, match="tokenizer folder not found"):
        SingleFileSource(files["sd2"], config=folders["sd2"], tokenizer=tmp_path / "nope")


# ------------------------------------------------------------------------------------------- prediction type

def test_prediction_type_rules(files, folders, tmp_path):
    fam2 = detect_family(SingleFileSource(files["sd2"], config=folders["sd2"]).checkpoint.shapes())
    fam1 = detect_family(SingleFileSource(files["sd1"], config=folders["sd1"]).checkpoint.shapes())
    assert default_prediction_type(fam2)[0] == "v_prediction"      # diffusers: SD 2.x files are 2.1 768-v
    assert default_prediction_type(fam1)[0] == "epsilon"
    assert file_prediction_type(["v_pred"], {}, {}, fam1)[0] == "v_prediction"
    assert file_prediction_type([], {"modelspec.prediction_type": "v"}, {}, fam1)[0] == "v_prediction"
    assert file_prediction_type([], {"modelspec.prediction_type": "epsilon"}, {}, fam2)[0] == "epsilon"
    assert file_prediction_type([], {"modelspec.architecture": "stable-diffusion-v2-768-v"}, {}, fam2)[0] == \
        "v_prediction"
    assert file_prediction_type([], {"modelspec.architecture": "stable-diffusion-v2-512"}, {}, fam2)[0] == "epsilon"
    assert file_prediction_type([], {}, {"global_step": 875000}, fam2)[0] == "epsilon"   # SD 2.0-base
    assert file_prediction_type([], {"global_step": "875000"}, {}, fam2)[0] == "epsilon"
    assert file_prediction_type([], {}, {"global_step": 875000}, fam1)[0] is None
    assert file_prediction_type([], {}, {}, fam2)[0] is None
    # Through the source: explicit > config folder's scheduler > the file's statement.
    marked = _rewrite(files["sd2"], tmp_path / "m.safetensors", add={"v_pred": mx.array([0.0])},
                      metadata={"modelspec.prediction_type": "v"})
    assert SingleFileSource(marked, config=folders["sd2"], prediction_type="epsilon").prediction_type == "epsilon"
    cfg = tmp_path / "cfg"
    shutil.copytree(folders["sd2"], cfg)
    sched = json.loads((cfg / "scheduler" / "scheduler_config.json").read_text())
    sched.pop("prediction_type")
    (cfg / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    src = SingleFileSource(marked, config=cfg)
    assert src.prediction_type == "v_prediction" and "v_pred marker" in src.prediction_reason
    assert src.plan.ignored["v_pred"] == IGNORED_REASONS["marker"]
    assert SingleFileSource(files["sd2"], config=cfg).prediction_type == "epsilon"   # diffusers' default
    with pytest.raises(ConfigError, match="prediction_type"):
        SingleFileSource(files["sd2"], prediction_type="sample")


# -------------------------------------------------------------------------------- strictness and bad inputs

def test_unknown_and_missing_keys_are_named(files, folders, tmp_path):
    from sd_mlx.models.unet import UNET_SPEC

    bad = _rewrite(files["sd1"], tmp_path / "u.safetensors", add={"model.diffusion_model.foo.weight": mx.zeros(3)})
    with pytest.raises(WeightLoadError, match="unknown key 'model.diffusion_model.foo.weight'"):
        SingleFileSource(bad, config=folders["sd1"])
    stray = _rewrite(files["sd1"], tmp_path / "s.safetensors", add={"cond_stage_model.extra.weight": mx.zeros(3)})
    with pytest.raises(WeightLoadError, match="unknown key 'cond_stage_model.extra.weight'.*Stable Diffusion 1.x"):
        SingleFileSource(stray, config=folders["sd1"])
    both = _rewrite(files["sd1"], tmp_path / "b.safetensors", add={"cond_stage_model.model.ln_final.weight":
                                                                  mx.zeros(3)})
    with pytest.raises(WeightLoadError, match="both"):
        SingleFileSource(both, config=folders["sd1"])
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    missing = _rewrite(files["sd1"], tmp_path / "m.safetensors", drop=[key])
    src = SingleFileSource(missing, config=folders["sd1"])
    with pytest.raises(WeightLoadError, match=f"missing weight '{key}' \\(parameter 'down_blocks.0.resnets.0.conv1"):
        load_from_source(src, "unet", UNET_SPEC)
    te = "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.k_proj.bias"
    src = SingleFileSource(_rewrite(files["sd1"], tmp_path / "t.safetensors", drop=[te]), config=folders["sd1"])
    from sd_mlx.models.clip import CLIP_TEXT_SPEC

    with pytest.raises(WeightLoadError, match=f"missing weight '{te}'"):
        load_from_source(src, "text_encoder", CLIP_TEXT_SPEC)


def test_malformed_files_get_named_errors(files, tmp_path):
    data = files["sd1"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightLoadError, match="truncated"):
        SingleFileSource(cut)
    foreign = tmp_path / "foreign.safetensors"
    mx.save_safetensors(str(foreign), {"double_blocks.0.img_attn.qkv.weight": mx.zeros((2, 2))})
    with pytest.raises(WeightLoadError, match="unknown model family"):
        SingleFileSource(foreign)
    sd3 = tmp_path / "sd3.safetensors"
    mx.save_safetensors(str(sd3), {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": mx.zeros(2)})
    with pytest.raises(WeightLoadError, match="unknown model family.*input_blocks"):
        SingleFileSource(sd3)
    vae_only = tmp_path / "vae.safetensors"
    arrays = {k[len("first_stage_model."):]: v for k, v in mx.load(str(files["sd1"])).items()
              if k.startswith("first_stage_model.")}
    mx.save_safetensors(str(vae_only), arrays)
    with pytest.raises(WeightLoadError, match="only a VAE.*--vae"):
        SingleFileSource(vae_only)
    odd = _rewrite(files["sd1"], tmp_path / "odd.safetensors",
                   add={"model.diffusion_model.input_blocks.0.0.weight": mx.zeros((32, 8, 3, 3))})
    with pytest.raises(WeightLoadError, match="8 input channels.*InstructPix2Pix"):
        SingleFileSource(odd)
    with pytest.raises(ModelNotFoundError, match="no such checkpoint file"):
        SingleFileSource(tmp_path / "absent.safetensors")


def test_sd2_extra_layer_projection_and_scale_are_ignored(files, folders, tmp_path):
    arrays = dict(mx.load(str(files["sd2"])))
    p = "cond_stage_model.model.transformer.resblocks."
    last = {k: v for k, v in arrays.items() if k.startswith(p + "2.")}
    extra = {k.replace(p + "2.", p + "3."): v for k, v in last.items()}
    extra.update({"cond_stage_model.model.text_projection": mx.zeros((32, 32)),
                  "cond_stage_model.model.logit_scale": mx.array(4.6)})
    f = _rewrite(files["sd2"], tmp_path / "x.safetensors", add=extra)
    src = SingleFileSource(f, config=folders["sd2"])
    assert set(src.plan.ignored) == set(extra)
    _same(src.weights("text_encoder")[0], SingleFileSource(files["sd2"], config=folders["sd2"]).weights(
        "text_encoder")[0], "sd2 text encoder")
    two = _rewrite(f, tmp_path / "y.safetensors", add={k.replace(p + "3.", p + "4."): v for k, v in extra.items()
                                                       if p in k})
    with pytest.raises(WeightLoadError, match="text encoder has 5 layers, the text_encoder config 3"):
        SingleFileSource(two, config=folders["sd2"])


def test_ema_weights(files, folders, tmp_path):
    """Non-EMA model.diffusion_model.* weights are used (diffusers, A1111); EMA only when asked."""
    from sd_mlx.loading.single_file import ema_key

    arrays = dict(mx.load(str(files["sd1"])))
    ema = {ema_key(k): v + 1 for k, v in arrays.items() if k.startswith("model.diffusion_model.")}
    ema.update({"model_ema.decay": mx.array(0.9999), "model_ema.num_updates": mx.array(10, dtype=mx.int32)})
    f = _rewrite(files["sd1"], tmp_path / "ema.safetensors", add=ema)
    plain = SingleFileSource(files["sd1"], config=folders["sd1"]).weights("unet")[0]
    default = SingleFileSource(f, config=folders["sd1"])
    _same(default.weights("unet")[0], plain, "non-EMA")
    assert default.plan.ignored["model_ema.decay"] == IGNORED_REASONS["ema_bookkeeping"]
    used = SingleFileSource(f, config=folders["sd1"], use_ema=True).weights("unet")[0]
    _same(used, {k: v + 1 for k, v in plain.items()}, "EMA")
    with pytest.raises(WeightLoadError, match="no EMA weights"):
        SingleFileSource(files["sd1"], config=folders["sd1"], use_ema=True)


def test_mixed_precision_file(folders, tmp_path):
    """A float16 U-Net with a float32 VAE and text encoder: stored dtypes kept, diffusers reads the same values."""
    import diffusers

    f = diffusers_to_single(folders["sd1"], tmp_path / "mixed.safetensors", component_dtypes={"unet": "float16"})
    src = SingleFileSource(f, config=folders["sd1"])
    assert {v.dtype for v in src.header("unet").values()} == {"F16"}
    assert {v.dtype for v in src.header("vae").values()} == {"F32"}
    pipe = diffusers.StableDiffusionPipeline.from_single_file(str(f), config=str(folders["sd1"]),
                                                              local_files_only=True)
    for comp in ("unet", "vae"):
        ours = {k: v.astype(mx.float32) for k, v in src.weights(comp)[0].items()}
        _same(ours, {k: v.float() for k, v in getattr(pipe, comp).state_dict().items()}, f"mixed {comp}")
    from sd_mlx.models.unet import UNET_SPEC

    unet = load_from_source(src, "unet", UNET_SPEC, dtype="float32")
    assert {v.dtype for _, v in tree_flatten(unet.parameters())} == {mx.float32}


def test_open_source_picks_the_kind(files, folders):
    assert isinstance(open_source(folders["sd1"]), FolderSource)
    assert isinstance(open_source(files["sd1"], config=folders["sd1"]), SingleFileSource)
    with pytest.raises(sd_mlx.InvalidArgumentError, match="single-file"):
        open_source(folders["sd1"], config=folders["sd1"])


def test_vae_files(files, folders, tmp_path):
    """A standalone VAE in the LDM layout (with or without first_stage_model., with training-loss keys) or the
    diffusers layout gives the folder's VAE tensors."""
    ref = FolderSource(folders["sd1"]).weights("vae")[0]
    cfg = json.loads((folders["sd1"] / "vae" / "config.json").read_text())
    arrays = {k: v for k, v in mx.load(str(files["sd1"])).items() if k.startswith("first_stage_model.")}
    for name, prefix in (("a", ""), ("b", "first_stage_model.")):
        path = tmp_path / f"{name}.safetensors"
        out = {prefix + k[len("first_stage_model."):]: v for k, v in arrays.items()}
        out["loss.discriminator.main.0.weight"] = mx.zeros(2)
        mx.save_safetensors(str(path), out)
        _same(vae_file_weights(path, cfg)[0], ref, f"VAE file {name}")
    diffusers_file = folders["sd1"] / "vae" / "diffusion_pytorch_model.safetensors"
    _same(vae_file_weights(diffusers_file, cfg)[0], ref, "diffusers VAE file")
    with pytest.raises(WeightLoadError, match="not a VAE file"):
        vae_file_weights(files["sd1"], cfg)


# ---------------------------------------------------------------------------------------------------- pickles

class _Payload:
    """Pickles to ``os.system(...)``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_ckpt_read_without_code_and_equal_to_safetensors(files, folders, tmp_path, monkeypatch):
    """A Lightning-style .ckpt (state_dict, global_step, a callback object) reads through the restricted
    reader, tensors equal to the safetensors file; from-ckpt converts it."""
    import torch
    import types

    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:  # stands for the trainer's callback object saved next to the weights
        def __init__(self):
            self.best_model_score = torch.tensor(0.5)
            self.monitor = "val/loss"

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.setitem(sys.modules, name, mod if name == mod.__name__ else types.ModuleType(name))
    sd = {k: torch.from_numpy(np.array(v)) for k, v in mx.load(str(files["sd1"])).items()}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000, "epoch": 3,
                "callbacks": {"ModelCheckpoint": ModelCheckpoint()}}, ckpt)
    src = SingleFileSource(ckpt, config=folders["sd1"])
    assert src.checkpoint.kind == "pickle" and src.checkpoint.training["global_step"] == 470000
    ref = SingleFileSource(files["sd1"], config=folders["sd1"])
    for comp in COMPONENTS["sd1"]:
        _same(src.weights(comp)[0], ref.weights(comp)[0], f"ckpt {comp}")
    out = ckpt_to_safetensors(ckpt, tmp_path / "model.safetensors")
    _same(dict(mx.load(str(out))), dict(mx.load(str(files["sd1"]))), "from-ckpt")


def test_malicious_and_broken_pickles_are_refused(tmp_path):
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(2)}, "x": _Payload(marker)}, evil)
    with pytest.raises(WeightLoadError, match=r"refused.*'(posix|os|nt)\.system'"):
        SingleFileSource(evil)
    assert not marker.exists()
    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(WeightLoadError, match="never unpickles"):
        SingleFileSource(raw)
    assert not marker.exists()
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(2)}}, good)
    broken = tmp_path / "broken.ckpt"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(broken, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, data[: len(data) // 2] if info.filename.endswith("data.pkl") else data)
    with pytest.raises(WeightLoadError, match="corrupt or truncated PyTorch checkpoint"):
        SingleFileSource(broken)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:100])
    with pytest.raises(WeightLoadError, match="PyTorch checkpoint|never unpickles"):
        SingleFileSource(cut)


# ------------------------------------------------------------------------------------------------- key maps

def test_key_maps_invert_each_other():
    up_attn = [False, True, True, True]
    for key in ("input_blocks.1.0.in_layers.2.weight", "input_blocks.3.0.op.bias", "input_blocks.5.1.proj_in.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.2.skip_connection.bias",
                "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.bias", "output_blocks.8.1.norm.weight",
                "time_embed.2.weight", "out.0.bias", "label_emb.0.2.weight"):
        dk = ldm_unet_key(key, 2)
        assert dk is not None and diffusers_unet_key_to_ldm(dk, 2, up_attn) == key, key
    for bad in ("input_blocks.3.0.in_layers.0.weight", "input_blocks.1.0.op.weight", "output_blocks.0.1.conv.weight",
                "middle_block.3.in_layers.0.weight", "input_blocks.1.0.foo.weight"):
        assert ldm_unet_key(bad, 2) is None, bad
    for key in ("encoder.down.0.block.1.nin_shortcut.weight", "decoder.up.0.upsample.conv.weight",
                "decoder.mid.attn_1.q.weight", "encoder.norm_out.bias", "post_quant_conv.weight"):
        piece = ldm_vae_key(key, 4)
        back, unsq = diffusers_vae_key_to_ldm(piece.key, 4)
        assert back == key and unsq == piece.squeeze
    assert ldm_vae_key("decoder.up.0.block.0.conv1.weight", 4).key == "decoder.up_blocks.3.resnets.0.conv1.weight"
    pieces = open_clip_key("transformer.resblocks.3.attn.in_proj_weight")
    assert [p.key for p in pieces] == [f"encoder.layers.3.self_attn.{n}_proj.weight" for n in "qkv"]
    w = np.arange(12).reshape(6, 2)
    assert [p.apply(w).tolist() for p in pieces] == [w[:2].tolist(), w[2:4].tolist(), w[4:].tolist()]
    assert open_clip_key("text_projection")[0].apply(np.arange(6).reshape(2, 3)).shape == (3, 2)
    assert open_clip_key("transformer.resblocks.0.attn.bogus") == []
    with pytest.raises(ValueError, match="cannot be split"):
        Piece("x", rows=(0, 3)).shape((4, 2))
