"""Single-file checkpoints in the original latent-diffusion layout (the ``*.safetensors`` of community sites).

One file holds every model of a pipeline under the prefixes of the original training code:

================================================  ==============================================================
prefix                                            model
================================================  ==============================================================
``model.diffusion_model.``                        U-Net (``openaimodel.UNetModel``)
``first_stage_model.``                            VAE (``AutoencoderKL``)
``cond_stage_model.transformer.``                 SD 1.x text encoder (OpenAI CLIP ViT-L/14, transformers names)
``cond_stage_model.model.``                       SD 2.x text encoder (OpenCLIP ViT-H/14, fused ``in_proj``)
``conditioner.embedders.0.transformer.``          SDXL base ``text_encoder`` (CLIP ViT-L/14)
``conditioner.embedders.1.model.``                SDXL base ``text_encoder_2`` (OpenCLIP ViT-bigG/14)
``conditioner.embedders.0.model.``                SDXL refiner ``text_encoder_2`` (OpenCLIP ViT-bigG/14)
================================================  ==============================================================

:func:`detect_family` names the family from key names and shapes (which text encoders are present; the U-Net's
input channels, 9 for inpainting; without a text encoder, the width of the U-Net's cross-attention keys as
diffusers' ``infer_diffusers_model_type`` uses it). :func:`plan_keys` then assigns **every** key of the file either
to a component, renamed to diffusers' name by the pure maps of :mod:`sd_mlx.loading.keymaps.ldm`, or to the ignored
set with a reason (:data:`IGNORED_REASONS`); any other key is an error naming it. :class:`SingleFileSource` offers
per component the diffusers-form config and a lazily readable mapping of diffusers-named arrays, which the existing
strict loaders (:func:`sd_mlx.loading.components.load_from_source`) turn into sd_mlx models.

Which weights are used, as diffusers (``extract_ema=False``) and AUTOMATIC1111 (``use_ema: False`` in the LDM
inference configs) do: the U-Net's ``model.diffusion_model.*`` weights; an EMA copy (``model_ema.*``, present in
full training checkpoints; EMA-only "pruned" files hold their EMA weights under ``model.diffusion_model.*``) is
ignored unless ``use_ema=True``.

Prediction type (epsilon or v), in order: the caller's ``prediction_type``; the scheduler config of a ``config``
folder; the file's own statement (a ``v_pred`` marker key as ComfyUI/Forge write, the SAI model-spec metadata
``modelspec.prediction_type`` = ``v``/``epsilon`` or ``modelspec.architecture`` ending ``-v``/``-512``); a pickle's
``global_step == 875000`` (SD 2.0-base, diffusers' rule); then diffusers' default for the family: SD 2.x single
files are taken as the SD 2.1 768-v model (v-prediction, 768 px), everything else epsilon. The noise-schedule
buffers some files carry (``alphas_cumprod``...) are the same for both parameterisations and say nothing about it.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlx.core as mx

from ..errors import ConfigError, ModelNotFoundError, WeightLoadError
from . import family_configs as fc
from .configs import read_json
from .keymaps.ldm import (
    Piece,
    clip_transformers_key,
    ldm_unet_key,
    ldm_vae_key,
    open_clip_key,
    open_clip_layer_index,
)
from .safe_pickle import PICKLE_SUFFIXES, TensorRef, checkpoint_state_dict, read_torch_checkpoint
from .weights import read_safetensors_metadata, validate_safetensors_header

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."

TEXT_ENCODERS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "sd1": (("text_encoder", "cond_stage_model.transformer.", "clip"),),
    "sd2": (("text_encoder", "cond_stage_model.model.", "open_clip"),),
    "sdxl": (("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "open_clip")),
    "sdxl-refiner": (("text_encoder_2", "conditioner.embedders.0.model.", "open_clip"),),
}
"""Per base family: ``(component, key prefix, layout)`` of each text encoder ("clip": transformers names,
"open_clip": OpenCLIP names)."""

# LatentDiffusion's DDPM training buffers (register_schedule) and its per-timestep loss weights.
_LDM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights")

IGNORED_REASONS = {
    "schedule": "noise-schedule buffer of LDM's DDPM training wrapper; the scheduler config defines the same "
                "schedule (and it does not tell epsilon from v-prediction)",
    "sigmas": "SGM's sigma table (denoiser.sigmas), derived from the noise schedule",
    "ema": "EMA copy of the U-Net; as diffusers and AUTOMATIC1111, the model.diffusion_model.* weights are used "
           "(use_ema=True selects the EMA weights)",
    "ema_bookkeeping": "EMA bookkeeping (decay, update count)",
    "non_ema": "non-EMA U-Net weights, not used with use_ema=True",
    "position_ids": "CLIP's position-id buffer (arange(77)); positions are recomputed",
    "logit_scale": "CLIP's contrastive temperature, not used for text conditioning",
    "sd2_projection": "OpenCLIP's text projection; SD 2.x conditions on the hidden states (diffusers' "
                      "CLIPTextModel has no projection)",
    "penultimate": "last OpenCLIP layer: SD 2.x conditions on the penultimate layer, so diffusers' text encoder "
                   "config has one layer fewer",
    "marker": "marker key (v_pred / ztsnr, ComfyUI/Forge convention), read for the scheduler config",
    "embedding_manager": "textual-inversion training state (LDM embedding manager), not part of the model",
    "vae_loss": "the VAE's training loss (LPIPS and discriminator weights)",
}

_SAFETENSORS_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.int64: "I64",
                       mx.int32: "I32", mx.int16: "I16", mx.int8: "I8", mx.uint8: "U8", mx.bool_: "BOOL"}


# --------------------------------------------------------------------------------------------------- the file

@dataclass(frozen=True)
class TensorInfo:
    """Shape and safetensors dtype name (``"F16"``...) of one tensor, known without reading it."""

    shape: tuple[int, ...]
    dtype: str


class CheckpointFile:
    """A single-file checkpoint opened for reading: names, shapes and dtypes now, tensors when asked.

    Build it with :func:`open_checkpoint`. Attributes: ``path``; ``kind`` (``"safetensors"`` or ``"pickle"``);
    ``tensors`` (``{key: TensorInfo}``); ``metadata`` (safetensors ``__metadata__``); ``training`` (a pickle's
    top-level numbers, e.g. ``global_step``).
    """

    def __init__(self, path: Path, kind: str, tensors: dict[str, TensorInfo], *, metadata: dict[str, str],
                 training: dict[str, Any], refs: dict[str, TensorRef] | None = None) -> None:
        self.path, self.kind, self.tensors = path, kind, tensors
        self.metadata, self.training = metadata, training
        self._refs = refs

    def arrays(self, keys: Sequence[str]) -> dict[str, mx.array]:
        """The tensors ``keys`` as MLX arrays: memory-mapped and lazy for safetensors, copied from the (mapped)
        archive for pickles. Nothing is cached here: once the caller drops an array (e.g. after casting it into
        a model), its memory is free again.

        Raises:
            WeightLoadError: the file cannot be read (names it).
        """
        if self._refs is not None:
            return {k: self._refs[k].to_mlx() for k in keys}
        try:
            loaded = mx.load(str(self.path))
        except Exception as e:  # MLX raises RuntimeError/ValueError with its own text
            raise WeightLoadError(f"{self.path}: cannot read safetensors file ({e}); re-download it") from None
        return {k: loaded[k] for k in keys}

    def array(self, key: str) -> mx.array:
        """One tensor (see :meth:`arrays`)."""
        return self.arrays([key])[key]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{key: shape}`` of every tensor."""
        return {k: t.shape for k, t in self.tensors.items()}


def open_checkpoint(path: Path | str) -> CheckpointFile:
    """Open a ``.safetensors`` file, or a PyTorch pickle (``.ckpt``/``.pt``/``.pth``/``.bin``) through the
    restricted tensors-only reader of :mod:`sd_mlx.loading.safe_pickle` (never unpickled with code execution).

    Raises:
        ModelNotFoundError: no such file.
        WeightLoadError: a truncated or corrupt file, a header that lies about its sizes, a pickle naming anything
            but tensors and plain containers (refused, with the conversion to use); the message names the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix.lower() in PICKLE_SUFFIXES or zipfile.is_zipfile(path):
        refs, training = checkpoint_state_dict(read_torch_checkpoint(path), path)
        tensors = {k: TensorInfo(r.shape, _SAFETENSORS_DTYPES.get(r.dtype, "F32")) for k, r in refs.items()}
        return CheckpointFile(path, "pickle", tensors, metadata={}, training=training, refs=refs)
    header = validate_safetensors_header(path)
    tensors = {k: TensorInfo(tuple(int(d) for d in e["shape"]), str(e["dtype"])) for k, e in header.items()}
    return CheckpointFile(path, "safetensors", tensors, metadata=read_safetensors_metadata(path), training={})


# ------------------------------------------------------------------------------------------------ the family

@dataclass(frozen=True)
class Family:
    """The model family of a single-file checkpoint.

    Attributes:
        name: one of :data:`sd_mlx.loading.family_configs.FAMILIES` (``"sd1"``, ``"sd2-inpainting"``...).
        base: ``"sd1"``, ``"sd2"``, ``"sdxl"`` or ``"sdxl-refiner"`` (the text-encoder layout).
        inpainting: the U-Net takes 9 input channels (latents, mask, masked-image latents).
        evidence: the keys and shapes that decided it, for ``--verbose``.
    """

    name: str
    base: str
    inpainting: bool
    evidence: str

    @property
    def description(self) -> str:
        """Human-readable family name, e.g. ``"Stable Diffusion 2.x"``."""
        return fc.DESCRIPTIONS[self.name]

    @property
    def text_encoders(self) -> tuple[tuple[str, str, str], ...]:
        """``(component, prefix, layout)`` of each text encoder (see :data:`TEXT_ENCODERS`)."""
        return TEXT_ENCODERS[self.base]


_CROSS_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}


def _has(keys: Sequence[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _prefixes(keys: Sequence[str], n: int = 6) -> str:
    heads = sorted({".".join(k.split(".")[:2]) for k in keys})
    return ", ".join(heads[:n]) + (", ..." if len(heads) > n else "")


def is_vae_file(keys: Sequence[str]) -> bool:
    """True when the keys are those of a VAE alone (LDM ``encoder.down.*`` / ``decoder.up.*``, or diffusers
    ``encoder.down_blocks.*``, with or without ``first_stage_model.``)."""
    stripped = [k[len(VAE_PREFIX):] if k.startswith(VAE_PREFIX) else k for k in keys]
    return bool(stripped) and all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "loss.",
                                                EMA_PREFIX)) for k in stripped) \
        and _has(stripped, "decoder.")


def detect_family(shapes: Mapping[str, Sequence[int]], *, source: str = "<checkpoint>") -> Family:
    """Name the family of a single-file checkpoint from its key names and shapes (no tensor is read).

    Args:
        shapes: ``{key: shape}`` of every tensor of the file.
        source: the file, for messages.

    Raises:
        WeightLoadError: an unknown family (no original-layout U-Net: a VAE-only, LoRA or diffusers-layout file,
            another model type), an unsupported U-Net input width, or text encoders of no known family; the message
            says what the file looks like and what to pass instead.
    """
    keys = list(shapes)
    if not _has(keys, UNET_PREFIX):
        if is_vae_file(keys):
            raise WeightLoadError(f"{source}: this file holds only a VAE, not a Stable Diffusion checkpoint; pass it "
                                  f"as the VAE (--vae FILE, load_pipeline(..., vae=FILE))")
        if any(".lora_" in k or "lora_unet_" in k or ".lora_A." in k for k in keys):
            raise WeightLoadError(f"{source}: this is a LoRA file, not a complete checkpoint; load a base model and "
                                  f"apply the LoRA to it")
        if _has(keys, "down_blocks.") or _has(keys, "unet.") or _has(keys, "text_model."):
            raise WeightLoadError(f"{source}: diffusers-layout weights of one component, not an original-layout "
                                  f"single-file checkpoint; pass the diffusers model folder instead")
        raise WeightLoadError(f"{source}: unknown model family: no key starts with '{UNET_PREFIX}' (the U-Net of "
                              f"an original-layout Stable Diffusion file); its keys start with {_prefixes(keys)}")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        raise WeightLoadError(f"{source}: unknown model family: '{UNET_PREFIX}' holds no Stable Diffusion U-Net "
                              f"(no input_blocks.0.0.weight; another architecture, e.g. SD3 or Flux?); its keys "
                              f"start with {_prefixes([k for k in keys if k.startswith(UNET_PREFIX)])}")
    if _has(keys, "conditioner.embedders.1.model.") and _has(keys, "conditioner.embedders.0.transformer."):
        base, why = "sdxl", "conditioner.embedders.0.transformer.* (CLIP-L) + conditioner.embedders.1.model.* " \
                            "(OpenCLIP bigG)"
    elif _has(keys, "conditioner.embedders.0.model.") and not _has(keys, "conditioner.embedders.1."):
        base, why = "sdxl-refiner", "conditioner.embedders.0.model.* (OpenCLIP bigG) alone"
    elif _has(keys, "cond_stage_model.model.") and _has(keys, "cond_stage_model.transformer."):
        raise WeightLoadError(f"{source}: unknown model family: the file has both an SD 1.x "
                              f"(cond_stage_model.transformer.*) and an SD 2.x (cond_stage_model.model.*) text encoder")
    elif _has(keys, "cond_stage_model.model."):
        base, why = "sd2", "cond_stage_model.model.* (OpenCLIP ViT-H)"
    elif _has(keys, "cond_stage_model.transformer."):
        base, why = "sd1", "cond_stage_model.transformer.* (OpenAI CLIP ViT-L)"
    elif _has(keys, "cond_stage_model.") or _has(keys, "conditioner."):
        raise WeightLoadError(f"{source}: unknown model family: its text encoders "
                              f"({_prefixes([k for k in keys if k.startswith(('cond', 'conditioner'))])}) match no "
                              f"SD 1.x/2.x/XL layout")
    else:
        widths = {int(s[-1]) for k, s in shapes.items()
                  if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight") and len(s) == 2}
        if len(widths) != 1 or next(iter(widths)) not in _CROSS_WIDTH:
            raise WeightLoadError(f"{source}: unknown model family: no text encoder in the file and a U-Net "
                                  f"cross-attention width of {sorted(widths) or 'none'} (768: SD 1.x, 1024: SD 2.x, "
                                  f"2048: SDXL, 1280: SDXL refiner)")
        width = next(iter(widths))
        base, why = _CROSS_WIDTH[width], f"no text encoder; U-Net cross-attention width {width}"
    in_ch = int(conv_in[1])
    if in_ch not in (4, 9):
        raise WeightLoadError(f"{source}: a U-Net with {in_ch} input channels is not supported (4: text to image, "
                              f"9: inpainting; 8 is InstructPix2Pix, 7 the x4 upscaler)")
    if in_ch == 9 and base == "sdxl-refiner":
        raise WeightLoadError(f"{source}: unknown model family: an SDXL refiner with a 9-channel U-Net")
    name = base + ("-inpainting" if in_ch == 9 else "")
    return Family(name=name, base=base, inpainting=in_ch == 9,
                  evidence=f"{why}; U-Net input_blocks.0.0.weight {tuple(int(d) for d in conv_in)}")


# ------------------------------------------------------------------------------------------------- key plan

@dataclass
class KeyPlan:
    """Where every key of a file goes.

    Attributes:
        components: ``{component: {diffusers_key: (file_key, Piece)}}``.
        ignored: ``{file_key: reason}`` (reasons from :data:`IGNORED_REASONS`).
    """

    components: dict[str, dict[str, tuple[str, Piece]]] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)


def _int_config(cfg: Mapping[str, Any], name: str, source: str) -> int:
    v = cfg.get(name)
    if isinstance(v, (list, tuple)) and v and all(x == v[0] for x in v):
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{source}: {name}={v!r}: a single-file U-Net/VAE needs one positive integer here")
    return v


def ema_key(unet_key: str) -> str:
    """The EMA key LDM's ``LitEma`` stores for a ``model.diffusion_model.*`` key: ``model_ema.`` followed by the
    key without ``model.`` and without dots (``model_ema.diffusion_modelinput_blocks00weight``)."""
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


def plan_keys(shapes: Mapping[str, Sequence[int]], family: Family, configs: Mapping[str, Mapping[str, Any]], *,
              use_ema: bool = False, source: str = "<checkpoint>") -> KeyPlan:
    """Assign every key of a single-file checkpoint to a component (diffusers name) or to the ignored set.

    Args:
        shapes: ``{key: shape}`` of the file.
        family: from :func:`detect_family`.
        configs: diffusers-form configs (``"unet"``: ``layers_per_block``; ``"vae"``: ``block_out_channels``; each
            text encoder: ``num_hidden_layers``, ``architectures``).
        use_ema: take the U-Net from the EMA copy (``model_ema.*``) instead of ``model.diffusion_model.*``.
        source: the file, for messages.

    Returns:
        The :class:`KeyPlan`; a component whose prefix has no key in the file is absent from it.

    Raises:
        WeightLoadError: a key that belongs to no component and is not a known extra (names the key), two keys
            for one diffusers tensor, ``use_ema`` without EMA weights, a text encoder whose layer count fits
            neither the config nor the config plus SD 2.x's unused last layer.
        ConfigError: a config without the integers the key map needs.
    """
    plan = KeyPlan()
    unknown: list[str] = []
    lpb = _int_config(configs["unet"], "layers_per_block", "unet config")
    vae_blocks = len(configs.get("vae", {}).get("block_out_channels") or (0,) * 4)
    encoders = family.text_encoders
    text_layers: dict[str, tuple[int, int]] = {}
    for comp, prefix, layout in encoders:
        if layout == "open_clip" and comp in configs:
            found = {open_clip_layer_index(k[len(prefix):]) for k in shapes if k.startswith(prefix)} - {None}
            text_layers[comp] = (len(found), _int_config(configs[comp], "num_hidden_layers", f"{comp} config"))
    ema_keys = [k for k in shapes if k.startswith(EMA_PREFIX) and k not in ("model_ema.decay",
                                                                             "model_ema.num_updates")]
    if use_ema and not ema_keys:
        raise WeightLoadError(f"{source}: use_ema=True but the file has no EMA weights (model_ema.*); it is an "
                              f"EMA-only or pruned file whose model.diffusion_model.* weights are the ones to use")
    ema_used: set[str] = set()

    def put(comp: str, file_key: str, piece: Piece) -> None:
        target = plan.components.setdefault(comp, {})
        if piece.key in target:
            raise WeightLoadError(f"{source}: keys '{target[piece.key][0]}' and '{file_key}' both map to "
                                  f"{comp} '{piece.key}'")
        target[piece.key] = (file_key, piece)

    for key in shapes:
        if key.startswith(UNET_PREFIX):
            dk = ldm_unet_key(key[len(UNET_PREFIX):], lpb)
            if dk is None:
                unknown.append(key)
            elif use_ema:
                ek = ema_key(key)
                if ek not in shapes:
                    raise WeightLoadError(f"{source}: use_ema=True but '{key}' has no EMA copy '{ek}'")
                put("unet", ek, Piece(dk))
                ema_used.add(ek)
                plan.ignored[key] = IGNORED_REASONS["non_ema"]
            else:
                put("unet", key, Piece(dk))
            continue
        if key.startswith(EMA_PREFIX):
            if key in ("model_ema.decay", "model_ema.num_updates"):
                plan.ignored[key] = IGNORED_REASONS["ema_bookkeeping"]
            elif not use_ema:
                plan.ignored[key] = IGNORED_REASONS["ema"]
            continue  # used EMA keys were planned with their U-Net key; the rest are checked below
        if key.startswith(VAE_PREFIX):
            rest = key[len(VAE_PREFIX):]
            piece = ldm_vae_key(rest, vae_blocks) if vae_blocks else None
            if piece is not None:
                put("vae", key, piece)
            elif rest.startswith("loss."):
                plan.ignored[key] = IGNORED_REASONS["vae_loss"]
            else:
                unknown.append(key)
            continue
        for comp, prefix, layout in encoders:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if rest.endswith("embeddings.position_ids"):
                plan.ignored[key] = IGNORED_REASONS["position_ids"]
            elif layout == "clip":
                put(comp, key, Piece(clip_transformers_key(rest)))
            elif rest == "logit_scale":
                plan.ignored[key] = IGNORED_REASONS["logit_scale"]
            elif rest == "text_projection" and "CLIPTextModelWithProjection" not in \
                    (configs.get(comp, {}).get("architectures") or ()):
                plan.ignored[key] = IGNORED_REASONS["sd2_projection"]
            else:
                n = open_clip_layer_index(rest)
                found, wanted = text_layers.get(comp, (0, 0))
                if n is not None and n >= wanted and comp in text_layers:
                    if found == wanted + 1 and n == wanted:
                        plan.ignored[key] = IGNORED_REASONS["penultimate"]
                        break
                    raise WeightLoadError(f"{source}: '{key}': the file's text encoder has {found} layers, the "
                                          f"{comp} config {wanted} (an SD 2.x file may have one more, unused)")
                pieces = open_clip_key(rest)
                if not pieces:
                    unknown.append(key)
                for p in pieces:
                    put(comp, key, p)
            break
        else:
            top = key.split(".", 1)[0]
            if key in _LDM_BUFFERS:
                plan.ignored[key] = IGNORED_REASONS["schedule"]
            elif key == "denoiser.sigmas":
                plan.ignored[key] = IGNORED_REASONS["sigmas"]
            elif key in ("v_pred", "ztsnr"):
                plan.ignored[key] = IGNORED_REASONS["marker"]
            elif top == "embedding_manager":
                plan.ignored[key] = IGNORED_REASONS["embedding_manager"]
            else:
                unknown.append(key)
    if use_ema:
        unknown += [k for k in ema_keys if k not in ema_used]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise WeightLoadError(f"{source}: unknown key '{unknown[0]}'{more} for a {family.description} checkpoint "
                              f"(detected from {family.evidence}); the file does not match that layout")
    return plan


# --------------------------------------------------------------------------------------------- prediction type

PREDICTION_TYPES = ("epsilon", "v_prediction")


def file_prediction_type(keys: Sequence[str], metadata: Mapping[str, str],
                         training: Mapping[str, Any], family: Family) -> tuple[str | None, str]:
    """What the file itself says about its prediction type: ``(prediction_type or None, reason)``.

    Reads the ``v_pred`` marker key, the SAI model-spec metadata (``modelspec.prediction_type``,
    ``modelspec.architecture``) and, for SD 2.x pickles, ``global_step == 875000`` (SD 2.0-base, diffusers' rule).
    """
    if "v_pred" in keys:
        return "v_prediction", "the file's v_pred marker key"
    spec = metadata.get("modelspec.prediction_type", "").strip().lower()
    if spec in ("v", "v_prediction", "v-prediction"):
        return "v_prediction", "the file's modelspec.prediction_type metadata"
    if spec in ("epsilon", "eps"):
        return "epsilon", "the file's modelspec.prediction_type metadata"
    arch = metadata.get("modelspec.architecture", "").strip().lower()
    if arch.endswith("-v") or "-768-v" in arch:
        return "v_prediction", f"the file's modelspec.architecture metadata ({arch})"
    if arch.startswith("stable-diffusion-v2-512"):
        return "epsilon", f"the file's modelspec.architecture metadata ({arch})"
    step = training.get("global_step", metadata.get("global_step"))
    if family.base == "sd2" and str(step) == "875000":
        return "epsilon", "global_step 875000 (SD 2.0-base; diffusers' rule)"
    return None, ""


def default_prediction_type(family: Family) -> tuple[str, str]:
    """Diffusers' default for a single file of ``family``: ``(prediction_type, reason)``."""
    if family.name == "sd2":
        return "v_prediction", ("diffusers' default for SD 2.x single files (the SD 2.1 768-v model); pass "
                                "--prediction-type epsilon for a 512 px base model")
    return "epsilon", f"the {family.description} default"


def resolve_prediction_type(family: Family, *, explicit: str | None = None,
                            folder: tuple[str | None, str] | None = None,
                            said: tuple[str | None, str] = (None, "")) -> tuple[str, str]:
    """The prediction type of a single file and why: ``explicit`` (the caller's), else the config folder's
    scheduler config (``folder = (its prediction_type or None, folder name)``; diffusers' ``"epsilon"`` when it
    names none), else what the file says (:func:`file_prediction_type`), else :func:`default_prediction_type`."""
    if explicit is not None:
        return explicit, "asked for (prediction_type / --prediction-type)"
    if folder is not None:
        if folder[0] is not None:
            return folder[0], f"the scheduler config of {folder[1]}"
        if said[0] is None:
            return "epsilon", f"diffusers' default (the scheduler config of {folder[1]} names none)"
    if said[0] is not None:
        return said[0], said[1]
    return default_prediction_type(family)


# ------------------------------------------------------------------------------------------------- the source

COMPONENT_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}


class SingleFileSource:
    """A single-file checkpoint as a model source: per component, its config and its diffusers-named weights.

    Args:
        path: the ``.safetensors`` (or ``.ckpt``... read by the restricted reader) file.
        config: ``None`` (sd_mlx's built-in configs of the detected family, see
            :mod:`sd_mlx.loading.family_configs`) or a diffusers model folder whose ``*/config.json``,
            scheduler config and tokenizer folders are used instead (as diffusers' ``from_single_file(config=)``).
        prediction_type: ``"epsilon"`` / ``"v_prediction"`` to override the detected one (see the module docstring).
        tokenizer: a tokenizer folder (``vocab.json`` + ``merges.txt``) used for every tokenizer instead of the
            config folder's or sd_mlx's packaged one.
        use_ema: use the U-Net's EMA weights (``model_ema.*``) instead of ``model.diffusion_model.*``.

    Attributes: ``checkpoint`` (:class:`CheckpointFile`), ``family`` (:class:`Family`), ``prediction_type`` and
    ``prediction_reason``, ``plan`` (:class:`KeyPlan`), ``configs`` (diffusers-form dicts per component and
    ``"scheduler"``), ``config_source`` (where the configs came from).

    Raises:
        ModelNotFoundError: the file or the config folder does not exist.
        WeightLoadError: see :func:`open_checkpoint`, :func:`detect_family`, :func:`plan_keys`.
        ConfigError: a config of the folder is missing or invalid; an unknown ``prediction_type``.
    """

    def __init__(self, path: Path | str, *, config: Path | str | None = None, prediction_type: str | None = None,
                 tokenizer: Path | str | None = None, use_ema: bool = False) -> None:
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got "
                              f"{prediction_type!r}")
        self.checkpoint = open_checkpoint(path)
        self.path = self.checkpoint.path
        source = str(self.path)
        shapes = self.checkpoint.shapes()
        self.family = detect_family(shapes, source=source)
        self._config_folder = Path(config).expanduser() if config is not None else None
        self._tokenizer_folder = Path(tokenizer).expanduser() if tokenizer is not None else None
        if self._tokenizer_folder is not None and not self._tokenizer_folder.is_dir():
            raise ModelNotFoundError(f"{self._tokenizer_folder}: tokenizer folder not found (it needs vocab.json and "
                                     f"merges.txt)")
        if self._config_folder is not None:
            self.configs = self._folder_configs(self._config_folder)
            self.config_source = str(self._config_folder)
        else:
            self.configs = fc.family_configs(self.family.name)
            self.config_source = f"sd_mlx's built-in {self.family.description} configs"
        # The prediction type (and, for SD 2.x, the model variant it implies).
        said, said_why = file_prediction_type(list(shapes), self.checkpoint.metadata, self.checkpoint.training,
                                              self.family)
        pt, why = resolve_prediction_type(
            self.family, explicit=prediction_type, said=(said, said_why),
            folder=None if self._config_folder is None else (
                self.configs["scheduler"].get("prediction_type"), str(self._config_folder)))
        if self._config_folder is None:
            self.configs = fc.family_configs(self.family.name, pt)
        else:
            self.configs["scheduler"]["prediction_type"] = pt
        if "ztsnr" in shapes and prediction_type is None and self._config_folder is None:
            self.configs["scheduler"]["rescale_betas_zero_snr"] = True
        self.prediction_type, self.prediction_reason = pt, why
        self.plan = plan_keys(shapes, self.family, self.configs, use_ema=use_ema, source=source)
        self.use_ema = use_ema

    def _folder_configs(self, folder: Path) -> dict[str, Any]:
        if not folder.is_dir():
            raise ModelNotFoundError(f"{folder}: config folder not found; pass a diffusers model folder (with "
                                     f"unet/config.json, vae/config.json, scheduler/...) or leave it out to use "
                                     f"sd_mlx's built-in configs")
        out: dict[str, Any] = {}
        for comp in ("unet", "vae") + tuple(c for c, _, _ in self.family.text_encoders):
            out[comp] = read_json(folder / comp / "config.json")
        out["scheduler"] = read_json(folder / "scheduler" / "scheduler_config.json")
        return out

    # ----- the interface a pipeline uses ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The file, for messages."""
        return str(self.path)

    def has(self, component: str) -> bool:
        """Whether the file holds weights of ``component`` (``"unet"``, ``"vae"``, ``"text_encoder"``...)."""
        return component in self.plan.components

    @property
    def components(self) -> tuple[str, ...]:
        """The components the file holds weights for."""
        return tuple(self.plan.components)

    def config(self, component: str) -> tuple[dict[str, Any], str]:
        """``(diffusers-form config dict, where it came from)`` of ``component``.

        Raises:
            ModelNotFoundError: the family has no such component.
        """
        if component not in self.configs or component == "scheduler":
            raise ModelNotFoundError(f"{self.path}: a {self.family.description} checkpoint has no {component}")
        where = (str(self._config_folder / component / "config.json") if self._config_folder is not None
                 else f"{self.config_source} ({component})")
        return dict(self.configs[component]), where

    def scheduler_config(self) -> dict[str, Any]:
        """The scheduler config (with the resolved ``prediction_type``)."""
        return dict(self.configs["scheduler"])

    def header(self, component: str, *, prefer_fp16: bool = False) -> dict[str, TensorInfo]:
        """``{diffusers_key: TensorInfo}`` of ``component``'s tensors, without reading them.

        Raises:
            WeightLoadError: the file holds no weights of ``component``.
        """
        self._require(component)
        out = {}
        for dk, (fk, piece) in self.plan.components[component].items():
            info = self.checkpoint.tensors[fk]
            try:
                out[dk] = TensorInfo(piece.shape(info.shape), info.dtype)
            except ValueError as e:
                raise WeightLoadError(f"{self.path}: '{fk}': {e}") from None
        return out

    def weights(self, component: str, *, prefer_fp16: bool = False) -> tuple[dict[str, mx.array], str]:
        """``({diffusers_key: array}, source)`` of ``component``: lazy, memory-mapped arrays for safetensors.

        Raises:
            WeightLoadError: the file holds no weights of ``component``, or cannot be read.
        """
        self._require(component)
        self.header(component)  # shape checks of the pieces, naming the key
        planned = self.plan.components[component]
        arrays = self.checkpoint.arrays(sorted({fk for fk, _ in planned.values()}))
        out = {dk: piece.apply(arrays[fk]) for dk, (fk, piece) in planned.items()}
        return out, self.describe_component(component)

    def describe_component(self, component: str) -> str:
        """``"FILE (prefix*)"`` for messages about ``component``'s weights."""
        prefix = {"unet": EMA_PREFIX if self.use_ema else UNET_PREFIX, "vae": VAE_PREFIX}.get(component)
        for comp, p, _ in self.family.text_encoders:
            if comp == component:
                prefix = p
        return f"{self.path} ({prefix}*)"

    def original_key(self, component: str, key: str) -> str | None:
        """The file key holding diffusers tensor ``key`` of ``component`` in this family's layout (also for a key
        the file lacks), e.g. for a message about a missing weight; ``None`` outside the layout."""
        from .keymaps.ldm import diffusers_clip_key_to_open_clip, diffusers_unet_key_to_ldm, diffusers_vae_key_to_ldm

        if component == "unet":
            cfg = self.configs["unet"]
            up_attn = [t.startswith("CrossAttn") for t in cfg.get("up_block_types", ())]
            ldm = diffusers_unet_key_to_ldm(key, _int_config(cfg, "layers_per_block", "unet config"), up_attn)
            return None if ldm is None else (ema_key(UNET_PREFIX + ldm) if self.use_ema else UNET_PREFIX + ldm)
        if component == "vae":
            mapped = diffusers_vae_key_to_ldm(key, len(self.configs["vae"].get("block_out_channels") or (0,) * 4))
            return None if mapped is None else VAE_PREFIX + mapped[0]
        for comp, prefix, layout in self.family.text_encoders:
            if comp == component:
                key = key[len("text_model."):] if key.startswith("text_model.") else key
                if layout == "clip":
                    return prefix + "text_model." + key
                mapped_clip = diffusers_clip_key_to_open_clip(key)
                return None if mapped_clip is None else prefix + mapped_clip[0]
        return None

    def tokenizer(self, name: str = "tokenizer") -> Any:
        """The :class:`~sd_mlx.tokenizer.CLIPTokenizer` ``name`` (``"tokenizer"`` / ``"tokenizer_2"``): the
        ``tokenizer`` folder if given, else the config folder's ``name/``, else sd_mlx's packaged CLIP tokenizer
        with the family's pad token.

        Raises:
            ModelNotFoundError: the family has no such tokenizer.
            ConfigError: an unreadable tokenizer folder.
        """
        from ..tokenizer import CLIPTokenizer
        from .builtin_tokenizer import builtin_tokenizer

        pads = fc.family_configs(self.family.name)["tokenizers"]
        if name not in pads:
            raise ModelNotFoundError(f"{self.path}: a {self.family.description} checkpoint has no {name}")
        if self._tokenizer_folder is not None:
            return CLIPTokenizer.from_folder(self._tokenizer_folder)
        if self._config_folder is not None and (self._config_folder / name).is_dir():
            return CLIPTokenizer.from_folder(self._config_folder / name)
        return builtin_tokenizer(pads[name])

    def describe(self) -> str:
        """One paragraph for ``--verbose``: family and evidence, configs, prediction type, ignored keys."""
        reasons: dict[str, int] = {}
        for r in self.plan.ignored.values():
            reasons[r] = reasons.get(r, 0) + 1
        ignored = "; ".join(f"{n} x {r.split(';')[0].split(',')[0]}" for r, n in reasons.items()) or "none"
        comps = ", ".join(f"{c} ({len(v)} tensors)" for c, v in self.plan.components.items())
        return (f"single-file checkpoint {self.path.name}: {self.family.description} [{self.family.name}] "
                f"(detected from {self.family.evidence}); components: {comps}; configs: {self.config_source}; "
                f"prediction_type {self.prediction_type} ({self.prediction_reason}); ignored keys: {ignored}")

    def _require(self, component: str) -> None:
        if component not in self.plan.components:
            what = {"vae": f"no VAE ({VAE_PREFIX}*); pass one with --vae / vae="}.get(
                component, f"no {component} weights")
            raise WeightLoadError(f"{self.path}: the file has {what}")


# ------------------------------------------------------------------------------------------------- VAE files

def vae_file_weights(path: Path | str, vae_config: Mapping[str, Any]) -> tuple[dict[str, mx.array], str]:
    """The diffusers-named weights of a standalone VAE file (``vae-ft-mse-840000-ema-pruned.safetensors``,
    ``sdxl_vae.safetensors``...): LDM layout (``encoder.down.*``, optionally under ``first_stage_model.``) or
    diffusers ``AutoencoderKL`` layout (``encoder.down_blocks.*``, returned unchanged).

    Args:
        path: the file (``.safetensors``, or a pickle read by the restricted reader).
        vae_config: the diffusers VAE config it replaces (its ``block_out_channels`` size the LDM map).

    Returns:
        ``({diffusers_key: array}, source description)``.

    Raises:
        ModelNotFoundError: no such file.
        WeightLoadError: not a VAE file, or a key outside the VAE layout (names the key), or an unreadable file.
    """
    ckpt = open_checkpoint(path)
    keys = list(ckpt.tensors)
    if not is_vae_file(keys):
        raise WeightLoadError(f"{ckpt.path}: not a VAE file (its keys start with {_prefixes(keys)}); --vae takes a "
                              f"VAE .safetensors, a diffusers AutoencoderKL or AutoencoderTiny folder, or a TAESD")
    def below_prefix(k: str) -> str:
        return k[len(VAE_PREFIX):] if k.startswith(VAE_PREFIX) else k

    arrays = ckpt.arrays([k for k in keys if not below_prefix(k).startswith(("loss.", EMA_PREFIX))])
    nblocks = len(vae_config.get("block_out_channels") or (0,) * 4)
    out: dict[str, mx.array] = {}
    unknown: list[str] = []
    for key in keys:
        rest = below_prefix(key)
        if rest.startswith("loss.") or rest.startswith(EMA_PREFIX):
            continue  # training loss / EMA bookkeeping (IGNORED_REASONS["vae_loss"], ["ema_bookkeeping"])
        if ".down_blocks." in rest or ".up_blocks." in rest or ".mid_block." in rest or \
                rest.split(".", 1)[-1].startswith(("conv_norm_out.",)):
            out[rest] = arrays[key]  # diffusers layout already
            continue
        piece = ldm_vae_key(rest, nblocks)
        if piece is None:
            unknown.append(key)
            continue
        try:
            piece.shape(ckpt.tensors[key].shape)
        except ValueError as e:
            raise WeightLoadError(f"{ckpt.path}: '{key}': {e}") from None
        out[piece.key] = piece.apply(arrays[key])
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise WeightLoadError(f"{ckpt.path}: unknown key '{unknown[0]}'{more} for a VAE file")
    return out, str(ckpt.path)

