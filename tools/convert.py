"""Convert between diffusers model folders and original-layout single-file checkpoints, and read pickles safely.

Commands::

    python tools/convert.py to-single FOLDER OUT.safetensors [--family auto|sd1|sd2|sdxl|sdxl-refiner]
                                      [--dtype float32|float16|bfloat16] [--unet-dtype D] [--vae-dtype D]
                                      [--text-encoder-dtype D] [--overwrite]
    python tools/convert.py to-diffusers FILE OUT_FOLDER [--config FOLDER] [--prediction-type epsilon|v_prediction]
                                         [--tokenizer FOLDER] [--use-ema] [--overwrite]
    python tools/convert.py from-ckpt FILE.ckpt OUT.safetensors [--overwrite]
    python tools/convert.py inspect FILE

``to-single`` writes the layout of the original training code (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*`` / ``cond_stage_model.model.*`` /
``conditioner.embedders.*``) with the key maps of :mod:`sd_mlx.loading.keymaps.ldm`: OpenCLIP text encoders get
their fused ``in_proj`` and transposed ``text_projection`` back, VAE attention weights their 1x1 kernel shape. An
SD 2.x text encoder is written with the layers of the diffusers model (23 for SD 2.1; original files carry a 24th,
unused layer, which readers ignore). ``to-diffusers`` is the reverse through
:class:`sd_mlx.loading.single_file.SingleFileSource` (family detection, built-in or ``--config`` configs, the
packaged tokenizer): every tensor is copied bit for bit. ``from-ckpt`` reads a PyTorch pickle with sd_mlx's
restricted tensors-only reader (no code from the file runs) and writes the same keys as safetensors
(``global_step`` kept in the metadata). Outputs are written to a temporary name and renamed, so an interrupted run
leaves nothing; an existing output is replaced only with ``--overwrite``. Needs only sd_mlx's runtime dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import sd_mlx  # noqa: E402,F401  (before mlx: loads the fast BLAS)
import mlx.core as mx  # noqa: E402

from sd_mlx.errors import InvalidArgumentError, OutputError, SDMLXError  # noqa: E402
from sd_mlx.loading.components import parse_dtype  # noqa: E402
from sd_mlx.loading.configs import read_json  # noqa: E402
from sd_mlx.loading.keymaps.ldm import (  # noqa: E402
    diffusers_clip_key_to_open_clip,
    diffusers_unet_key_to_ldm,
    diffusers_vae_key_to_ldm,
)
from sd_mlx.loading.single_file import (  # noqa: E402
    UNET_PREFIX,
    VAE_PREFIX,
    TEXT_ENCODERS,
    SingleFileSource,
)
from sd_mlx.loading.source import FolderSource  # noqa: E402

BASE_FAMILIES = tuple(TEXT_ENCODERS)
_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# ------------------------------------------------------------------------------------------------ helpers

def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists; pass --overwrite (overwrite=True) to replace it")
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: output folder does not exist")


def _save_file(arrays: Mapping[str, mx.array], out: Path, metadata: Mapping[str, str], overwrite: bool) -> Path:
    """Write ``arrays`` to ``out`` (safetensors) atomically."""
    _check_out(out, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".safetensors", dir=out.parent)
    os.close(fd)
    try:
        mx.save_safetensors(tmp, dict(arrays), metadata=dict(metadata))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _cast(arrays: dict[str, mx.array], dtype: str | None) -> dict[str, mx.array]:
    if dtype is None:
        return arrays
    target = parse_dtype(dtype)
    return {k: (v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in arrays.items()}


def detect_folder_family(folder: Path) -> str:
    """The base family of a diffusers folder: ``sdxl`` (two text encoders), ``sdxl-refiner`` (``text_encoder_2``
    alone), ``sd2`` (one text encoder with GELU, OpenCLIP) or ``sd1`` (QuickGELU, OpenAI CLIP).

    Raises:
        InvalidArgumentError: no text encoder folder.
    """
    has1, has2 = (folder / "text_encoder").is_dir(), (folder / "text_encoder_2").is_dir()
    if has1 and has2:
        return "sdxl"
    if has2:
        return "sdxl-refiner"
    if not has1:
        raise InvalidArgumentError(f"{folder}: no text_encoder/ folder; pass --family")
    act = read_json(folder / "text_encoder" / "config.json").get("hidden_act", "quick_gelu")
    return "sd2" if act == "gelu" else "sd1"


def _text_keys(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """transformers CLIP keys without ``text_model.`` and without the ``position_ids`` buffer."""
    out = {}
    for k, v in weights.items():
        k = k[len("text_model."):] if k.startswith("text_model.") else k
        if k != "embeddings.position_ids":
            out[k] = v
    return out


def _open_clip_state(weights: Mapping[str, mx.array], prefix: str, source: str) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    fused: dict[str, dict[int, mx.array]] = {}
    for k, v in _text_keys(weights).items():
        mapped = diffusers_clip_key_to_open_clip(k)
        if mapped is None:
            raise InvalidArgumentError(f"{source}: text encoder key '{k}' has no OpenCLIP counterpart")
        name, part, transpose = mapped
        if part is not None:
            fused.setdefault(name, {})[part] = v
        else:
            out[prefix + name] = mx.contiguous(v.T) if transpose else v
    for name, parts in fused.items():
        if sorted(parts) != [0, 1, 2]:
            raise InvalidArgumentError(f"{source}: q/k/v projections of '{name}' incomplete")
        out[prefix + name] = mx.concatenate([parts[0], parts[1], parts[2]], axis=0)
    return out


# ---------------------------------------------------------------------------------------------- to-single

def diffusers_to_single(folder: Path | str, out: Path | str, *, family: str = "auto", dtype: str | None = None,
                        component_dtypes: Mapping[str, str] | None = None, metadata: Mapping[str, str] | None = None,
                        overwrite: bool = False) -> Path:
    """Write a diffusers folder as one original-layout ``.safetensors`` file.

    Args:
        folder: diffusers folder with ``unet/``, ``vae/`` and the text encoder(s).
        out: the ``.safetensors`` to write.
        family: ``"auto"`` (:func:`detect_folder_family`) or a base family (``sd1``, ``sd2``, ``sdxl``,
            ``sdxl-refiner``; the U-Net's input channels make it an inpainting file by themselves).
        dtype: cast every float tensor to this dtype (default: keep the stored dtypes).
        component_dtypes: per component (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``) dtypes, over
            ``dtype`` (mixed-precision files, e.g. a float16 U-Net with a float32 VAE).
        metadata: extra ``__metadata__`` entries.
        overwrite: replace an existing ``out``.

    Returns:
        ``out``.

    Raises:
        InvalidArgumentError: unknown family or a key outside the layout. OutputError: ``out`` exists.
        ModelNotFoundError, ConfigError, WeightLoadError: an unreadable folder.
    """
    folder, out = Path(folder), Path(out)
    _check_out(out, overwrite)
    family = detect_folder_family(folder) if family == "auto" else family
    if family not in BASE_FAMILIES:
        raise InvalidArgumentError(f"family must be auto or one of {', '.join(BASE_FAMILIES)}, got {family!r}")
    src = FolderSource(folder)
    dtypes = dict(component_dtypes or {})
    state: dict[str, mx.array] = {}

    unet_cfg, _ = src.config("unet")
    lpb = unet_cfg.get("layers_per_block", 2)
    up_attn = [t.startswith("CrossAttn") for t in unet_cfg.get("up_block_types", ())]
    weights, where = src.weights("unet")
    for k, v in _cast(weights, dtypes.get("unet", dtype)).items():
        ldm = diffusers_unet_key_to_ldm(k, lpb, up_attn)
        if ldm is None:
            raise InvalidArgumentError(f"{where}: U-Net key '{k}' has no original-layout counterpart")
        state[UNET_PREFIX + ldm] = v

    if src.has("vae"):
        vae_cfg, _ = src.config("vae")
        nblocks = len(vae_cfg.get("block_out_channels", (0,) * 4))
        weights, where = src.weights("vae")
        for k, v in _cast(weights, dtypes.get("vae", dtype)).items():
            parts = k.split(".")
            if ".attentions." in k and parts[-2] in _OLD_VAE_ATTENTION:
                k = ".".join(parts[:-2] + [_OLD_VAE_ATTENTION[parts[-2]], parts[-1]])
            mapped = diffusers_vae_key_to_ldm(k, nblocks)
            if mapped is None:
                raise InvalidArgumentError(f"{where}: VAE key '{k}' has no original-layout counterpart")
            ldm, unsqueeze = mapped
            state[VAE_PREFIX + ldm] = v.reshape(*v.shape, 1, 1) if unsqueeze and v.ndim == 2 else v

    for comp, prefix, layout in TEXT_ENCODERS[family]:
        weights, where = src.weights(comp)
        weights = _cast(weights, dtypes.get(comp, dtype))
        if layout == "clip":
            state.update({prefix + "text_model." + k: v for k, v in _text_keys(weights).items()})
        else:
            state.update(_open_clip_state(weights, prefix, where))
    meta = {"format": "pt", "sd_mlx.converted_from": "diffusers"}
    meta.update(metadata or {})
    return _save_file(state, out, meta, overwrite)


# ------------------------------------------------------------------------------------------- to-diffusers

def _tokenizer_files(tok: Any, folder: Path, pad: str) -> None:
    """Write a tokenizer folder (vocab.json, merges.txt, configs) of the packaged CLIP tokenizer."""
    from sd_mlx.loading.builtin_tokenizer import clip_bpe

    vocab, merges = clip_bpe()
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    added = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    specials = {"bos_token": dict(added, content="<|startoftext|>"), "eos_token": dict(added, content="<|endoftext|>"),
                "unk_token": dict(added, content="<|endoftext|>"), "pad_token": pad}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    config = dict(specials, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer",
                  add_prefix_space=False, errors="replace")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def single_to_diffusers(path: Path | str, out: Path | str, *, config: Path | str | None = None,
                        prediction_type: str | None = None, tokenizer: Path | str | None = None,
                        use_ema: bool = False, overwrite: bool = False) -> Path:
    """Write a single-file checkpoint as a diffusers folder (weights copied bit for bit).

    Args:
        path: the single file.
        out: the folder to create.
        config, prediction_type, tokenizer, use_ema: see :class:`sd_mlx.loading.single_file.SingleFileSource`.
        overwrite: replace an existing ``out``.

    Returns:
        ``out``.

    Raises:
        OutputError: ``out`` exists. ModelNotFoundError, WeightLoadError, ConfigError: see ``SingleFileSource``.
    """
    from sd_mlx.loading import family_configs as fc

    out = Path(out)
    _check_out(out, overwrite)
    src = SingleFileSource(path, config=config, prediction_type=prediction_type, tokenizer=tokenizer,
                           use_ema=use_ema)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        index: dict[str, Any] = {"_class_name": fc.family_configs(src.family.name)["pipeline"],
                                 "_diffusers_version": "0.30.0"}
        for comp in src.components:
            cfg, _ = src.config(comp)
            weights, _ = src.weights(comp)
            (tmp / comp).mkdir()
            if comp.startswith("text_encoder"):
                arch = (cfg.get("architectures") or ["CLIPTextModel"])[0]
                weights = {(k if k.startswith("text_projection.") else "text_model." + k): v
                           for k, v in weights.items()}
                mx.save_safetensors(str(tmp / comp / "model.safetensors"), weights, metadata={"format": "pt"})
                index[comp] = ["transformers", arch]
            else:
                cfg.setdefault("_class_name", {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}[comp])
                mx.save_safetensors(str(tmp / comp / "diffusion_pytorch_model.safetensors"), weights,
                                    metadata={"format": "pt"})
                index[comp] = ["diffusers", cfg["_class_name"]]
            (tmp / comp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        sched = src.scheduler_config()
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n",
                                                                 encoding="utf-8")
        index["scheduler"] = ["diffusers", sched.get("_class_name", "PNDMScheduler")]
        for name, pad in fc.family_configs(src.family.name)["tokenizers"].items():
            given = Path(tokenizer) if tokenizer else (Path(config) / name if config else None)
            if given is not None and given.is_dir():
                shutil.copytree(given, tmp / name)
            else:
                _tokenizer_files(None, tmp / name, pad)
            index[name] = ["transformers", "CLIPTokenizer"]
        if not src.family.base.startswith("sdxl"):
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


# ---------------------------------------------------------------------------------------------- from-ckpt

def ckpt_to_safetensors(path: Path | str, out: Path | str, *, overwrite: bool = False) -> Path:
    """Rewrite a PyTorch pickle checkpoint as ``.safetensors`` through sd_mlx's restricted reader (tensors only;
    a pickle naming anything else is refused and nothing is written). ``global_step`` goes into the metadata.

    Raises:
        WeightLoadError: see :func:`sd_mlx.loading.safe_pickle.read_torch_checkpoint`. OutputError: ``out`` exists.
    """
    from sd_mlx.loading.safe_pickle import checkpoint_state_dict, read_torch_checkpoint

    out = Path(out)
    _check_out(out, overwrite)
    refs, training = checkpoint_state_dict(read_torch_checkpoint(path), path)
    meta = {"format": "pt", "sd_mlx.converted_from": Path(path).name}
    if isinstance(training.get("global_step"), int):
        meta["global_step"] = str(training["global_step"])
    return _save_file({k: r.to_mlx() for k, r in refs.items()}, out, meta, overwrite)


# -------------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring). Returns the exit status (0 ok, 2 error)."""
    parser = argparse.ArgumentParser(description="Convert between diffusers folders and single-file checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("to-single", help="diffusers folder -> original-layout .safetensors")
    p.add_argument("folder", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--family", default="auto", choices=("auto",) + BASE_FAMILIES)
    for name in ("dtype", "unet-dtype", "vae-dtype", "text-encoder-dtype"):
        p.add_argument(f"--{name}", default=None, choices=["float32", "float16", "bfloat16"])
    p = sub.add_parser("to-diffusers", help="single file -> diffusers folder")
    p.add_argument("file", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"])
    p.add_argument("--tokenizer", type=Path, default=None)
    p.add_argument("--use-ema", action="store_true")
    p = sub.add_parser("from-ckpt", help="PyTorch pickle -> .safetensors (restricted reader, no code runs)")
    p.add_argument("file", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("inspect", help="print the family and key plan of a single file")
    p.add_argument("file", type=Path)
    for p in sub.choices.values():
        if p.prog.split()[-1] != "inspect":
            p.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-single":
            te = args.text_encoder_dtype
            per = {k: v for k, v in (("unet", args.unet_dtype), ("vae", args.vae_dtype), ("text_encoder", te),
                                     ("text_encoder_2", te)) if v}
            path = diffusers_to_single(args.folder, args.out, family=args.family, dtype=args.dtype,
                                       component_dtypes=per, overwrite=args.overwrite)
        elif args.command == "to-diffusers":
            path = single_to_diffusers(args.file, args.out, config=args.config, prediction_type=args.prediction_type,
                                       tokenizer=args.tokenizer, use_ema=args.use_ema, overwrite=args.overwrite)
        elif args.command == "from-ckpt":
            path = ckpt_to_safetensors(args.file, args.out, overwrite=args.overwrite)
        else:
            print(SingleFileSource(args.file).describe())
            return 0
    except SDMLXError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
