"""Build diffusers-format Stable Diffusion checkpoint folders with random weights (test and benchmark artefacts).

Two kinds:

* **tiny** (``make_tiny_checkpoint``): an SD1-like or SD2-like pipeline small enough to build in seconds, with the
  real CLIP tokenizer and the real scheduler config copied from the assets folder. Every parameter is perturbed
  with gaussian noise after the default initialisation, so layers that diffusers zero-initialises (``conv_out``,
  ``proj_out``, ...) are not trivially zero and parity tests see every weight.
* **full** (``make_full_checkpoint``): a full-size pipeline from a real config folder (e.g.
  ``shared/assets/configs/stable-diffusion-v1-5``) with default-initialised random weights, for memory and speed
  measurements.

diffusers, transformers and torch are test-only dependencies; they are imported inside the functions.

CLI::

    python tools/make_checkpoint.py tiny-sd1 OUT [--no-text-model-prefix] [--seed N] [--overwrite]
    python tools/make_checkpoint.py tiny-sd2 OUT [--no-text-model-prefix] [--seed N] [--overwrite]
    python tools/make_checkpoint.py full CONFIG_DIR OUT [--dtype float32|float16|bfloat16] [--fp16-variant]
                                    [--no-text-model-prefix] [--seed N] [--overwrite]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

# Perturbation added to every parameter of a tiny model (std of the gaussian noise).
TINY_NOISE_STD = 0.05

# Real config folders the tiny checkpoints borrow their tokenizer, scheduler and CLIP constants from.
_TINY_SOURCES = {"sd1": "stable-diffusion-v1-5", "sd2": "stable-diffusion-2-1"}

# Components never generated: model_index.json gets ``[null, null]`` for them, as diffusers writes when a pipeline
# is saved with ``safety_checker=None, feature_extractor=None``.
_SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def assets_dir() -> Path:
    """The read-only assets folder: ``$SD_MLX_ASSETS`` or ``<repo>/../shared/assets`` (may not exist)."""
    env = os.environ.get("SD_MLX_ASSETS")
    return Path(env).expanduser() if env else (REPO_ROOT.parent / "shared" / "assets")


def _require_assets(sub: str) -> Path:
    path = assets_dir() / sub
    if not path.exists():
        raise FileNotFoundError(f"{path}: assets not found; set SD_MLX_ASSETS to the shared assets folder")
    return path


def _prepare_out(out: Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: folder exists and is not empty; pass overwrite=True (--overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _copy_folder(src: Path, dst: Path) -> None:
    """Copy the plain files of ``src`` into a fresh ``dst`` (writable copies; the assets are read-only)."""
    _clear(dst)
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            dst.joinpath(f.name).write_bytes(f.read_bytes())


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _torch_dtype(name: str):
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"dtype {name!r} not supported; use one of {', '.join(table)}")
    return table[name]


def text_encoder_state(state: dict, *, prefix: bool, max_positions: int, has_projection: bool = False) -> dict:
    """Return a CLIP text-encoder state dict in the requested key layout.

    Args:
        state: ``{key: torch.Tensor}`` with or without the ``text_model.`` prefix (transformers 5 saves
            ``CLIPTextModel`` without it; transformers 4 and real SD checkpoints have it).
        prefix: True -> every key starts with ``text_model.`` (except ``text_projection.*``) and
            ``text_model.embeddings.position_ids`` (int64 ``arange(max_positions)[None]``) is added, like older real
            checkpoints; False -> no prefix and no ``position_ids``.
        max_positions: ``max_position_embeddings`` of the config.
        has_projection: the model is ``CLIPTextModelWithProjection`` (its keys always keep the prefix, which is
            what transformers expects for that class).

    Returns:
        A new ``{key: tensor}`` dict (contiguous tensors).
    """
    import torch

    out: dict = {}
    for key, value in state.items():
        base = key[len("text_model."):] if key.startswith("text_model.") else key
        if base == "embeddings.position_ids":
            continue
        if base.startswith("text_projection."):
            out[base] = value.contiguous()
            continue
        use_prefix = prefix or has_projection
        out[("text_model." if use_prefix else "") + base] = value.contiguous()
    if prefix or has_projection:
        out["text_model.embeddings.position_ids"] = torch.arange(max_positions, dtype=torch.int64)[None]
    return out


def _save_safetensors(state: dict, path: Path, dtype=None) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for k, v in state.items():
        v = v.detach()
        if dtype is not None and torch.is_floating_point(v):
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def _rewrite_text_encoder(folder: Path, prefix: bool) -> None:
    from safetensors.torch import load_file

    cfg = _read_json(folder / "config.json")
    path = folder / "model.safetensors"
    state = load_file(str(path))
    has_proj = any(k.startswith("text_projection.") for k in state)
    new = text_encoder_state(state, prefix=prefix, max_positions=int(cfg.get("max_position_embeddings", 77)),
                             has_projection=has_proj)
    del state
    _save_safetensors(new, path)


# ----------------------------------------------------------------------------------------------------------- tiny

def tiny_unet_config(kind: str) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs of the tiny ``kind`` (``"sd1"`` or ``"sd2"``) checkpoint.

    sd1: conv ``proj_in/proj_out``, int ``attention_head_dim`` (8 heads everywhere), 2 layers a block, 8 groups.
    sd2: linear projection, per-block ``attention_head_dim`` [2, 4, 8] (mid block gets 8), ``upcast_attention``,
    1 layer a block, 32 groups. Both: block channels [32, 64, 64], cross-attention dim 32, sample size 8.
    """
    common = dict(
        sample_size=8, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
        freq_shift=0, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64), downsample_padding=1, mid_block_scale_factor=1, act_fn="silu",
        norm_eps=1e-5, cross_attention_dim=32,
    )
    if kind == "sd1":
        return dict(common, layers_per_block=2, norm_num_groups=8, attention_head_dim=8,
                    use_linear_projection=False, upcast_attention=False)
    if kind == "sd2":
        return dict(common, layers_per_block=1, norm_num_groups=32, attention_head_dim=(2, 4, 8),
                    use_linear_projection=True, upcast_attention=True)
    raise ValueError(f"unknown tiny checkpoint kind {kind!r}; use 'sd1' or 'sd2'")


def tiny_vae_config() -> dict[str, Any]:
    """``AutoencoderKL`` kwargs of the tiny checkpoints: 4 blocks (``vae_scale_factor`` 8), channels [16, 32, 32, 32]."""
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
        act_fn="silu", latent_channels=4, norm_num_groups=8, sample_size=64, scaling_factor=0.18215,
    )


def tiny_text_config(kind: str) -> dict[str, Any]:
    """``CLIPTextConfig`` kwargs of the tiny checkpoints: the real SD config's vocabulary, activation and special ids
    (bos 0, eos 2, pad 1), with hidden size 32, 3 layers, 4 heads, 77 positions."""
    real = _read_json(_require_assets(f"configs/{_TINY_SOURCES[kind]}/text_encoder/config.json"))
    return dict(
        vocab_size=real["vocab_size"], hidden_size=32, intermediate_size=64, projection_dim=32,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=real["max_position_embeddings"],
        hidden_act=real["hidden_act"], layer_norm_eps=real["layer_norm_eps"], attention_dropout=0.0, dropout=0.0,
        initializer_range=0.02, initializer_factor=1.0, bos_token_id=real["bos_token_id"],
        eos_token_id=real["eos_token_id"], pad_token_id=real["pad_token_id"],
    )


def _perturb(model, generator, std: float) -> None:
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)


def make_tiny_checkpoint(kind: str, out: Path, *, text_encoder_prefix: bool = True, seed: int = 0,
                         overwrite: bool = False) -> Path:
    """Write a tiny random-weight diffusers ``StableDiffusionPipeline`` folder.

    Args:
        kind: ``"sd1"`` (epsilon prediction, PNDM scheduler config of SD1.5, conv attention projections,
            ``quick_gelu`` CLIP, tokenizer pads with ``<|endoftext|>``) or ``"sd2"`` (v_prediction DDIM scheduler
            config of SD2.1, linear projections, per-block head counts, ``upcast_attention``, ``gelu`` CLIP,
            tokenizer pads with ``"!"``). See :func:`tiny_unet_config`, :func:`tiny_vae_config`,
            :func:`tiny_text_config` for sizes (UNet sample size 8, VAE scale factor 8, CLIP hidden 32).
        out: destination folder (created; must be absent or empty unless ``overwrite``).
        text_encoder_prefix: True -> ``text_encoder/model.safetensors`` keys start with ``text_model.`` and hold
            ``text_model.embeddings.position_ids``; False -> no prefix (as transformers 5 saves).
        seed: torch seed for the initialisation and the perturbation.
        overwrite: replace the files of a non-empty ``out``.

    Returns:
        ``out`` (folder with model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; float32
        safetensors weights; tokenizer and scheduler files are verbatim copies of the real SD ones).

    Raises:
        ValueError: unknown ``kind``. FileNotFoundError: the assets folder is missing. FileExistsError: ``out``
        is not empty and ``overwrite`` is False. ImportError: diffusers/transformers/torch are not installed.
    """
    import torch
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if kind not in _TINY_SOURCES:
        raise ValueError(f"unknown tiny checkpoint kind {kind!r}; use 'sd1' or 'sd2'")
    src = _require_assets(f"configs/{_TINY_SOURCES[kind]}")
    out = _prepare_out(Path(out), overwrite)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        _clear(out / name)

    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(kind))
    _perturb(unet, gen, TINY_NOISE_STD)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**tiny_vae_config())
    _perturb(vae, gen, TINY_NOISE_STD)
    torch.manual_seed(seed + 3)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config(kind)))
    _perturb(text_encoder, gen, TINY_NOISE_STD)
    tokenizer = CLIPTokenizer.from_pretrained(str(src / "tokenizer"))
    sched_cfg = _read_json(src / "scheduler" / "scheduler_config.json")
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    del pipe, unet, vae, text_encoder

    # Real files verbatim, as the Hub repos ship them (old-format scheduler config, slow-tokenizer files only).
    _copy_folder(src / "tokenizer", out / "tokenizer")
    _copy_folder(src / "scheduler", out / "scheduler")
    _rewrite_text_encoder(out / "text_encoder", text_encoder_prefix)
    return out


# ----------------------------------------------------------------------------------------------------------- full

def _build_model(library: str, class_name: str, folder: Path):
    """Instantiate a default-initialised model of ``library.class_name`` from ``folder/config.json``."""
    if library == "diffusers":
        import diffusers

        cls = getattr(diffusers, class_name)
        return cls.from_config(cls.load_config(str(folder)))
    if library == "transformers":
        import transformers

        cls = getattr(transformers, class_name)
        config = cls.config_class.from_json_file(str(folder / "config.json"))
        return cls(config)
    raise ValueError(f"{folder}: unsupported library {library!r} in model_index.json")


def make_full_checkpoint(config_dir: Path, out: Path, *, dtype: str = "float32", seed: int = 0,
                         fp16_variant: bool = False, text_encoder_prefix: bool = True,
                         overwrite: bool = False, verbose: bool = False) -> Path:
    """Write a full-size random-weight diffusers checkpoint from a real config folder.

    Every component listed in ``config_dir/model_index.json`` whose folder exists is produced: models
    (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``, ``CLIPTextModelWithProjection``, ...) are built
    one at a time from their ``config.json`` with the library's default initialisation, written as
    ``diffusion_pytorch_model.safetensors`` / ``model.safetensors`` and freed; tokenizer and scheduler folders and the
    model configs are copied verbatim. ``safety_checker`` / ``feature_extractor`` become ``[null, null]`` in
    model_index.json.

    Args:
        config_dir: e.g. ``shared/assets/configs/stable-diffusion-v1-5``.
        out: destination folder (absent or empty unless ``overwrite``).
        dtype: dtype of the main weight files (``"float32" | "float16" | "bfloat16"``).
        seed: torch seed (each component reseeds with ``seed + index``).
        fp16_variant: also write ``*.fp16.safetensors`` (float16) next to each weight file.
        text_encoder_prefix: ``text_model.`` key prefix and ``position_ids`` in CLIPTextModel weights (as in real
            SD1/SD2 checkpoints); False writes the transformers 5 layout.
        overwrite: replace the files of a non-empty ``out``.
        verbose: print progress to stderr.

    Returns:
        ``out``.

    Raises:
        FileNotFoundError: ``config_dir/model_index.json`` missing. FileExistsError: ``out`` not empty.
        ValueError: bad ``dtype`` or unsupported library. ImportError: diffusers/transformers/torch missing.
    """
    import torch

    config_dir = Path(config_dir)
    index_path = config_dir / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: not found; pass a diffusers config folder")
    main_dtype = _torch_dtype(dtype)
    out = _prepare_out(Path(out), overwrite)
    index = _read_json(index_path)
    for i, (name, entry) in enumerate(list(index.items())):
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue
        library, class_name = entry
        folder = config_dir / name
        if name in _SKIPPED_COMPONENTS or library is None or not folder.is_dir():
            index[name] = [None, None]
            continue
        t0 = time.perf_counter()
        _clear(out / name)
        if not (folder / "config.json").is_file() or "Tokenizer" in class_name or "Scheduler" in class_name:
            _copy_folder(folder, out / name)
            continue
        torch.manual_seed(seed + i)
        model = _build_model(library, class_name, folder)
        state = model.state_dict()
        (out / name).mkdir(parents=True)
        (out / name / "config.json").write_bytes((folder / "config.json").read_bytes())
        if library == "transformers":
            cfg = _read_json(folder / "config.json")
            has_proj = "Projection" in class_name
            if class_name.startswith("CLIPText"):
                state = text_encoder_state(state, prefix=text_encoder_prefix, has_projection=has_proj,
                                           max_positions=int(cfg.get("max_position_embeddings", 77)))
            stem = "model"
        else:
            stem = "diffusion_pytorch_model"
        _save_safetensors(state, out / name / f"{stem}.safetensors", main_dtype)
        if fp16_variant:
            _save_safetensors(state, out / name / f"{stem}.fp16.safetensors", torch.float16)
        n_params = sum(v.numel() for v in state.values() if torch.is_floating_point(v))
        del model, state
        gc.collect()
        if verbose:
            print(f"{name}: {class_name}, {n_params / 1e6:.1f} M parameters, {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr)
    if index.get("requires_safety_checker") is not None or "safety_checker" in index:
        index["requires_safety_checker"] = False
    _write_json(out / "model_index.json", index)
    return out


# ------------------------------------------------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring). Returns the exit status."""
    parser = argparse.ArgumentParser(description="Build random-weight diffusers checkpoints for tests/benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True)
    for kind in ("sd1", "sd2"):
        p = sub.add_parser(f"tiny-{kind}", help=f"tiny {kind.upper()}-like pipeline (seconds)")
        p.add_argument("out", type=Path)
    p = sub.add_parser("full", help="full-size pipeline from a real config folder")
    p.add_argument("config_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--fp16-variant", action="store_true", help="also write *.fp16.safetensors")
    for p in sub.choices.values():
        p.add_argument("--no-text-model-prefix", action="store_true",
                       help="text encoder keys without 'text_model.' (transformers 5 layout)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    args = parser.parse_args(argv)
    try:
        if args.command == "full":
            path = make_full_checkpoint(args.config_dir, args.out, dtype=args.dtype, seed=args.seed,
                                        fp16_variant=args.fp16_variant,
                                        text_encoder_prefix=not args.no_text_model_prefix,
                                        overwrite=args.overwrite, verbose=True)
        else:
            path = make_tiny_checkpoint(args.command.split("-")[1], args.out, seed=args.seed,
                                        text_encoder_prefix=not args.no_text_model_prefix,
                                        overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
