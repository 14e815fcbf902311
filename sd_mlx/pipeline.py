"""The text-to-image pipeline: prompt -> text embeddings -> denoising loop -> VAE decode.

Follows diffusers' ``StableDiffusionPipeline`` step for step (same order of operations, same classifier-free
guidance batch ``[uncond, cond]``, same scaling of latents), with MLX's lazy evaluation: each denoising step builds
one graph and is evaluated once with ``mx.eval``.

Every argument is checked, and the memory a call needs is estimated, before any model weights are loaded, so a bad
call fails in milliseconds. Models are loaded on first use and kept for later calls; with ``release_models=True``
a call drops the text encoder after encoding and the U-Net before decoding (lower peak memory, at the cost of
reloading them on the next call).

Reproducibility: image ``k`` of a call with seed ``s`` is bit-identical to the image made alone with seed ``s + k``
(same device, dtype and settings). Batched matrix products are not batch-invariant on every BLAS (a row's result
can depend on how many rows are multiplied at once), so the text encoder runs one text at a time and the U-Net one
image (its ``[uncond, cond]`` pair) at a time by default (``unet_batch_size=1``); ``unet_batch_size=None`` runs the
whole batch at once (faster on a GPU, images then agree with single runs only to float rounding).
"""

from __future__ import annotations

import os
import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import ops
from .cpu.memory import return_freed_memory
from .errors import InvalidArgumentError, ModelNotFoundError, NonFiniteError
from .images import GenerationParameters, to_pil
from .loading.components import parse_dtype
from .loading.hub import resolve_model
from .profiling import Profile
from .schedulers import Scheduler, get_scheduler
from .tokenizer import CLIPTokenizer

MAX_SEED = 2**64 - 1
MAX_SIDE = 16384
OUTPUT_TYPES = ("pil", "np", "latent", "mx")
LONG_PROMPT_MODES = ("truncate", "chunk")
COMPONENTS = ("text_encoder", "unet", "vae")

StepCallback = Callable[[int, float, mx.array], Any]
"""``callback(step_index, timestep, latents)`` after each U-Net evaluation (``step_index`` counts from 0 to
``len(scheduler.timesteps) - 1``; ``timestep`` is the value the U-Net saw; ``latents`` ``(B, h, w, 4)`` float32 are
the latents after that step). Return ``False`` to cancel the generation: the call then raises
``KeyboardInterrupt`` like Ctrl-C, so no output is produced. Raising inside the callback propagates."""

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass
class PipelineOutput:
    """Result of a pipeline call.

    Attributes:
        images: list of ``PIL.Image`` (``output_type="pil"``), a ``(B, H, W, 3)`` float32 numpy array in ``[0, 1]``
            (``"np"``), an ``mx.array`` of the same (``"mx"``), or the final latents ``(B, h, w, 4)`` float32
            ``mx.array`` (``"latent"``, not divided by the VAE scaling factor).
        seeds: the seed of each image (``seed + k`` for image ``k``).
        parameters: what made each image (for PNG metadata).
        profile: seconds and peak memory per phase.
    """

    images: Any
    seeds: list[int]
    parameters: list[GenerationParameters]
    profile: Profile = field(default_factory=Profile)


# ----------------------------------------------------------------------------------------------------------------
# Argument checks (no model needed)
# ----------------------------------------------------------------------------------------------------------------

def validate_size(height: int, width: int, vae_scale_factor: int = 8) -> None:
    """Check an image size before anything is loaded.

    Raises:
        InvalidArgumentError: a side is not a positive integer multiple of ``vae_scale_factor`` (the message gives
            the nearest valid sizes), or larger than :data:`MAX_SIDE` (16384) pixels.
    """
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InvalidArgumentError(f"{name} must be an integer number of pixels, got {v!r}")
        if v <= 0:
            raise InvalidArgumentError(f"{name} must be a positive number of pixels, got {v}")
        if v % vae_scale_factor:
            lo = v - v % vae_scale_factor
            near = f"{lo} or {lo + vae_scale_factor}" if lo > 0 else f"{vae_scale_factor}"
            raise InvalidArgumentError(f"{name}={v} is not a multiple of {vae_scale_factor}; use {near}")
        if v > MAX_SIDE:
            raise InvalidArgumentError(f"{name}={v} is too large (at most {MAX_SIDE} pixels)")


def validate_seed(seed: int | None) -> int:
    """Return ``seed``, or a fresh random one when ``None``. Seed 0 is a seed.

    Raises:
        InvalidArgumentError: not an integer, negative, or above ``2**64 - 1``.
    """
    if seed is None:
        return secrets.randbits(63)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidArgumentError(f"seed must be an integer, got {seed!r}")
    if seed < 0 or seed > MAX_SEED:
        raise InvalidArgumentError(f"seed must be between 0 and 2**64-1 ({MAX_SEED}), got {seed}")
    return int(seed)


def image_seeds(seed: int, count: int) -> list[int]:
    """Seeds of the images of one call: image ``k`` uses ``(seed + k) mod 2**64``."""
    return [(seed + k) % (MAX_SEED + 1) for k in range(count)]


def _seed_key(seed: int) -> mx.array:
    # mx.random.key takes an unsigned 64-bit seed: every seed in [0, 2**64 - 1] is its own key.
    return mx.random.key(int(seed))


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int], dtype: mx.Dtype = mx.float32) -> mx.array:
    """Standard normal initial latents, ``(len(seeds), h, w, C)``, image ``k`` drawn from ``seeds[k]`` alone, so
    an image does not depend on the batch it was made in."""
    return mx.concatenate([mx.random.normal((1, *shape), key=mx.random.split(_seed_key(s), 2)[0]) for s in seeds]
                          ).astype(dtype)


class StepNoise:
    """Per-step noise for ancestral/stochastic schedulers, reproducible per image: step ``i`` of image ``k`` uses a
    key derived from ``seeds[k]`` and ``i`` only."""

    def __init__(self, seeds: Sequence[int], shape: tuple[int, int, int], num_steps: int, dtype: mx.Dtype) -> None:
        self._keys = [mx.random.split(mx.random.split(_seed_key(s), 2)[1], max(num_steps, 1)) for s in seeds]
        self._shape, self._dtype = shape, dtype

    def __call__(self, i: int) -> mx.array:
        """Noise for step ``i``: ``(B, h, w, C)``."""
        return mx.concatenate([mx.random.normal((1, *self._shape), key=k[i]) for k in self._keys]).astype(self._dtype)


def _as_list(prompt: str | Sequence[str] | None, name: str) -> list[str] | None:
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, Sequence) and len(prompt) > 0 and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise InvalidArgumentError(f"{name} must be a string or a non-empty list of strings, got {prompt!r:.80}")


def _positive_int(value: Any, name: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgumentError(f"{name} must be an integer >= 1, got {value!r}")


def check_finite(x: mx.array, phase: str) -> None:
    """Raise :class:`NonFiniteError` naming ``phase`` if ``x`` holds NaN or Inf."""
    if not bool(mx.all(mx.isfinite(x)).item()):
        raise NonFiniteError(_non_finite_message(phase))


def _non_finite_message(phase: str) -> str:
    return (f"NaN or Inf appeared during {phase}; with float16 this is usually overflow: run with dtype float32 "
            f"(--dtype float32); no image was produced")


# ----------------------------------------------------------------------------------------------------------------
# Memory estimate
# ----------------------------------------------------------------------------------------------------------------

def available_memory_bytes() -> int:
    """Memory this process can use for MLX arrays, in bytes.

    The device's recommended working set (Apple GPU) or memory size as ``mx.device_info()`` reports it, else the
    physical RAM (``os.sysconf``), lowered to a cgroup v2 ``memory.max`` limit when one is set (containers).
    """
    candidates: list[int] = []
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        for key in ("max_recommended_working_set_size", "memory_size"):
            if isinstance(info.get(key), int) and info[key] > 0:
                candidates.append(int(info[key]))
                break
    except Exception:  # noqa: BLE001 - no device info on this backend
        pass
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return 2**62
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            candidates.append(int(limit))
    except OSError:
        pass
    return min(candidates)


@dataclass(frozen=True)
class MemoryEstimate:
    """A lower-bound estimate of a call's peak memory, in bytes.

    Attributes:
        weights: parameters of the models held at the same time (in the load dtype).
        attention: the U-Net's largest self-attention score matrix, ``rows * heads * (h*w)^2 * 4`` bytes at the first
            level with attention (``rows`` = images per U-Net evaluation, doubled by classifier-free guidance).
        decoder: VAE decoding of ``vae_batch_size`` images: full-resolution activations and the mid-block attention.
    """

    weights: int
    attention: int
    decoder: int

    @property
    def total(self) -> int:
        """``weights + max(attention, decoder)`` (the U-Net and the decoder do not run at the same time)."""
        return self.weights + max(self.attention, self.decoder)


def estimate_memory(unet_config: Any, vae_channels: Sequence[int], weight_bytes: int, *, height: int, width: int,
                    unet_rows: int, vae_batch: int, vae_scale_factor: int = 8, act_bytes: int = 4,
                    chunked_attention: bool | None = None) -> MemoryEstimate:
    """Estimate the peak memory of one generation (see :class:`MemoryEstimate`); deliberately a lower bound, so an
    error raised on it never refuses a call that would have fitted.

    Args:
        unet_config: :class:`sd_mlx.models.unet.UNetConfig` (``down_block_types``, ``heads``).
        vae_channels: the VAE's ``block_out_channels`` (empty for TAESD: its decoder is not counted).
        weight_bytes: bytes of the weights held during denoising.
        height, width: image size in pixels.
        unet_rows: rows of one U-Net evaluation (images at a time, times 2 with guidance).
        vae_batch: images decoded at once.
        act_bytes: bytes per activation element (4 for float32).
        chunked_attention: the U-Net's attention runs on bounded query chunks (MLX's CPU path) rather than on the
            whole score matrix; ``None`` means "when MLX's default device is the CPU".
    """
    if chunked_attention is None:
        chunked_attention = ops.attention_is_chunked()
    h, w = height // vae_scale_factor, width // vae_scale_factor
    attention = 0
    for level, (kind, heads) in enumerate(zip(unet_config.down_block_types, unet_config.heads)):
        if "CrossAttn" in kind:
            tokens = -(-h // 2**level) * -(-w // 2**level)
            attention = unet_rows * heads * tokens * tokens * 4
            if chunked_attention:
                from .cpu.attention import CHUNK_ELEMENTS

                attention = min(attention, 3 * CHUNK_ELEMENTS * 4)
            break
    decoder = 0
    if vae_channels:
        widest = max(vae_channels[:2])
        decoder = vae_batch * (height * width * widest * act_bytes * 3 + (h * w) ** 2 * 4)
    return MemoryEstimate(weights=int(weight_bytes), attention=int(attention), decoder=int(decoder))


def _info_bytes(header: dict[str, Any], target_float_bytes: int) -> int:
    """Bytes of the tensors of a header (``{key: TensorInfo}``), floating-point ones at ``target_float_bytes``."""
    total = 0
    for info in header.values():
        n = 1
        for d in info.shape:
            n *= int(d)
        total += n * (target_float_bytes if info.dtype in _FLOAT_DTYPES else _DTYPE_BYTES.get(info.dtype, 4))
    return total


# --- model sources (single-file support) ------------------------------------------------------------------------

def _check_source_components(source: Any, *, vae_given: bool) -> None:
    """The components an SD 1.x/2.x text-to-image pipeline needs are in ``source``.

    Raises:
        ModelNotFoundError: a folder lacks a component folder, or a single file lacks a component (a VAE-less file
            needs ``vae``).
        ConfigError: a single file of a family this pipeline does not run (SDXL).
    """
    from .errors import ConfigError

    family = getattr(source, "family", None)
    if family is None:  # a diffusers folder
        for sub in ("unet", "text_encoder", "tokenizer", "scheduler") + (() if vae_given else ("vae",)):
            if not (source.folder / sub).is_dir():
                raise ModelNotFoundError(f"{source.folder}: no {sub}/ folder; this is not a diffusers Stable "
                                         f"Diffusion model folder (expected unet/, vae/, text_encoder/, tokenizer/, "
                                         f"scheduler/)")
        return
    if family.base not in ("sd1", "sd2"):
        raise ConfigError(f"{source.name}: a {family.description} single file; its weights map (see "
                          f"tools/convert.py), but this pipeline runs SD 1.x/2.x only")
    for comp in ("unet", "text_encoder") + (() if vae_given else ("vae",)):
        if not source.has(comp):
            hint = "; pass a VAE with --vae / vae=" if comp == "vae" else ""
            raise ModelNotFoundError(f"{source.name}: the {family.description} file has no {comp} weights{hint}")


def _kl_vae_source(path: Path, source: Any) -> Any:
    """A :class:`~sd_mlx.loading.vae_source.VaeSource` for an AutoencoderKL ``path``; ``None`` for a TAESD. A VAE
    file takes the model's VAE config."""
    from .loading.vae_source import TAESD, VaeSource, classify_vae

    if classify_vae(path) == TAESD:
        return None
    model_cfg = source.config("vae")[0] if (getattr(source, "family", None) is not None or source.has("vae")) \
        else None
    return VaeSource(path, model_cfg)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    """A validated call: everything the phases need, computed before any model is loaded."""

    prompts: list[str]
    negatives: list[str]
    do_cfg: bool
    guidance_scale: float
    height: int
    width: int
    latent_shape: tuple[int, int, int]
    num_images_per_prompt: int
    batch: int
    seeds: list[int]
    scheduler: Scheduler
    params: list[GenerationParameters]
    latents: mx.array | None
    long_prompt: str
    clip_skip: int | None
    unet_batch: int


class StableDiffusionPipeline:
    """Stable Diffusion 1.x/2.x text-to-image in MLX, matching diffusers' ``StableDiffusionPipeline``.

    Build it with :func:`load_pipeline`. The constructor reads and checks every config and the headers of the
    weight files (a damaged or missing file is reported here, naming it); the weights themselves are loaded on
    first use. Components (``tokenizer``, ``text_encoder``, ``unet``, ``vae``) are attributes loaded on first
    access and kept until :meth:`release` (or a call with ``release_models=True``).

    Args:
        folder: a local diffusers model folder, or a model source (:mod:`sd_mlx.loading.source`: a
            :class:`~sd_mlx.loading.source.FolderSource` or a single-file
            :class:`~sd_mlx.loading.single_file.SingleFileSource`).
        dtype: parameter dtype of the models (``"float32"``, ``"float16"``, ``"bfloat16"``).
        model_name: the name the user gave (for PNG metadata).
        vae: ``None`` for the checkpoint's AutoencoderKL, or a path to a TAESD (diffusers ``AutoencoderTiny``
            folder, folder with ``taesd_decoder.safetensors``, or that file), or to an ``AutoencoderKL``
            replacing the model's (a diffusers folder, or a single VAE file in the LDM or diffusers layout, which
            takes the model's VAE config; see :mod:`sd_mlx.loading.vae_source`).
        quantize: ``None``, 4 or 8: quantize the U-Net's and text encoder's linear layers (and convolutions, see
            ``quantize_convolutions``) with ``mx.quantize`` (see :mod:`sd_mlx.quantization`).
        quantize_group_size: group size for quantization (32, 64 or 128).
        quantize_convolutions: with ``quantize``, also quantize the convolutions (default; needed for the 4-bit
            memory figures in the README) or only the linear layers (``False``, closer to the full-precision image).

    On the CPU, half-precision or quantized models compute in float32 (``compute_dtype``): the weights stay in
    their stored form and each one is widened as it is used (MLX's CPU half-precision and quantized products are
    50-75x slower than float32 ones). On a GPU ``compute_dtype`` is ``dtype``.

    Raises:
        ModelNotFoundError: a component folder is missing.
        ConfigError: a config is missing, not JSON, or has a value sd_mlx does not support (names file and field).
        WeightLoadError: a weight file is missing, truncated or its header is corrupt (names the file).
        InvalidArgumentError: bad ``dtype`` or quantization settings.
    """

    def __init__(self, folder: Path | Any, *, dtype: str = "float32", model_name: str | None = None,
                 vae: str | Path | None = None, quantize: int | None = None, quantize_group_size: int = 64,
                 quantize_convolutions: bool = True) -> None:
        from .models.clip import CLIP_TEXT_SPEC
        from .models.unet import UNET_SPEC
        from .models.vae import VAE_SPEC, vae_load_dtype

        # --- model source (single-file support): a folder path becomes a FolderSource ---
        from .loading.source import FolderSource

        self.source = FolderSource(folder) if isinstance(folder, (str, Path)) else folder
        self.folder = Path(self.source.name)
        self.dtype = parse_dtype(dtype)
        self.model_name = model_name or str(self.source.name)
        if quantize not in (None, 4, 8):
            raise InvalidArgumentError(f"quantize must be 4 or 8 (bits), got {quantize!r}")
        if quantize_group_size not in (32, 64, 128):
            raise InvalidArgumentError(f"quantize_group_size must be 32, 64 or 128, got {quantize_group_size!r}")
        self.quantize, self.quantize_group_size = quantize, quantize_group_size
        self.quantize_convolutions = bool(quantize_convolutions)
        self.compute_dtype = ops.compute_dtype(self.dtype, quantized=bool(quantize))
        self._vae_path = Path(vae).expanduser() if vae is not None else None
        if self._vae_path is not None and not self._vae_path.exists():
            raise ModelNotFoundError(f"{self._vae_path}: VAE not found; pass a TAESD (a folder with "
                                     f"taesd_decoder.safetensors, a diffusers AutoencoderTiny folder, or the file), "
                                     f"an AutoencoderKL folder or a VAE .safetensors file")
        _check_source_components(self.source, vae_given=vae is not None)
        self.scheduler_config: dict[str, Any] = self.source.scheduler_config()
        # Parse every config now (ConfigError names file and field) and check the weight files' headers.
        specs = {"text_encoder": CLIP_TEXT_SPEC, "unet": UNET_SPEC}
        configs: dict[str, Any] = {}
        for name, spec in specs.items():
            cfg, where = self.source.config(name)
            configs[name] = spec.config_from_dict(cfg, where)
        self.vae_config: Any = None
        # The VAE comes from the model, or from a KL VAE given apart (folder or single file), else it is a TAESD.
        self._vae_source: Any = self.source if self._vae_path is None else _kl_vae_source(self._vae_path,
                                                                                          self.source)
        if self._vae_source is not None:
            cfg, where = self._vae_source.config("vae")
            self.vae_config = VAE_SPEC.config_from_dict(cfg, where)
            specs["vae"] = VAE_SPEC
        self.unet_config_parsed = configs["unet"]
        self.text_config = configs["text_encoder"]
        self.weight_bytes: dict[str, int] = {}
        half = self.dtype != mx.float32
        for name, spec in specs.items():
            src = self._vae_source if name == "vae" else self.source
            load_dtype = vae_load_dtype(self.vae_config, self.dtype) if name == "vae" else self.dtype
            self.weight_bytes[name] = _info_bytes(src.header(name, prefer_fp16=half), load_dtype.size)
        self._models: dict[str, nn.Module] = {}
        self._tokenizer: CLIPTokenizer | None = None

    # ----- components -------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> CLIPTokenizer:
        """The CLIP tokenizer (``tokenizer/`` of a folder; for a single file see
        :meth:`sd_mlx.loading.single_file.SingleFileSource.tokenizer`)."""
        if self._tokenizer is None:
            self._tokenizer = self.source.tokenizer("tokenizer")
        return self._tokenizer

    def _get(self, name: str) -> nn.Module:
        if name not in self._models:
            self._models[name] = self._load(name)
        return self._models[name]

    def _ensure_loaded(self, name: str, profile: Profile) -> nn.Module:
        if name not in self._models:
            with profile.phase("load"):
                self._models[name] = self._load(name)
        return self._models[name]

    def _load(self, name: str) -> nn.Module:
        """Load one component's weights (``"text_encoder"``, ``"unet"`` or ``"vae"``) and evaluate them.

        A quantized component is loaded lazily, quantized, then evaluated in groups: each layer's float weights are
        read from the file, quantized and dropped in turn, so the full-precision model never exists in memory."""
        from .loading.components import load_from_source
        from .loading.weights import evaluate_parameters

        quantized = bool(self.quantize) and name in ("text_encoder", "unet")
        if name in ("text_encoder", "unet"):
            from .models.clip import CLIP_TEXT_SPEC
            from .models.unet import UNET_SPEC

            folder = self.folder / name
            spec = CLIP_TEXT_SPEC if name == "text_encoder" else UNET_SPEC
            model = load_from_source(self.source, name, spec, dtype=self.dtype, evaluate=not quantized,
                                     config=self.text_config if name == "text_encoder" else self.unet_config_parsed)
        elif name == "vae":
            if self._vae_source is None:
                from .models.taesd import load_taesd

                model = load_taesd(self._vae_path, dtype=self.dtype)
            else:
                from .models.vae import VAE_SPEC, vae_load_dtype

                model = load_from_source(self._vae_source, "vae", VAE_SPEC, config=self.vae_config,
                                         dtype=vae_load_dtype(self.vae_config, self.dtype))
        else:  # pragma: no cover - internal
            raise KeyError(name)
        if quantized:
            from .quantization import quantize_model

            flags: dict[str, mx.array] = {}
            quantize_model(model, bits=self.quantize, group_size=self.quantize_group_size,
                           convolutions=self.quantize_convolutions, finite_flags=flags)
            # Small groups: within one evaluation each layer's float source is kept until the group's NaN/Inf flags
            # are computed (measured 4-bit SD1.5 load peak: 64 MB groups 1.52 GB, 8 MB groups 0.65 GB).
            evaluate_parameters(model, source=str(folder), finite_flags=flags, group_bytes=8 * 2**20)
        if self.compute_dtype != self.dtype:
            model.compute_dtype = self.compute_dtype
        mx.eval(model.parameters())
        return model

    @property
    def text_encoder(self) -> nn.Module:
        """The CLIP text encoder (``CLIPTextModel``), loaded on first access."""
        return self._get("text_encoder")

    @property
    def unet(self) -> nn.Module:
        """The ``UNet2DConditionModel``, loaded on first access."""
        return self._get("unet")

    @property
    def vae(self) -> nn.Module:
        """The VAE (``AutoencoderKL``, or ``AutoencoderTiny`` when built with a TAESD), loaded on first access."""
        return self._get("vae")

    @property
    def loaded_models(self) -> tuple[str, ...]:
        """Names of the components whose weights are in memory now."""
        return tuple(self._models)

    def release(self, *names: str) -> None:
        """Drop loaded models (``"text_encoder"``, ``"unet"``, ``"vae"``; all when none named), MLX's cache and the
        free heap pages (:func:`sd_mlx.cpu.memory.return_freed_memory`).

        Raises:
            InvalidArgumentError: an unknown component name.
        """
        for n in names:
            if n not in COMPONENTS:
                raise InvalidArgumentError(f"unknown component {n!r}; use one of {', '.join(COMPONENTS)}")
        for n in names or tuple(self._models):
            self._models.pop(n, None)
        mx.clear_cache()
        return_freed_memory()  # sd_mlx.cpu.memory keeps freed buffers mapped; give them back between phases

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: ``2 ** (len(vae.block_out_channels) - 1)`` (8 for SD and for TAESD)."""
        if self.vae_config is not None:
            return 2 ** (len(self.vae_config.block_out_channels) - 1)
        return 8

    @property
    def unet_config(self) -> dict[str, Any]:
        """The U-Net's config (``unet/config.json`` of a folder) as a dict."""
        return self.source.config("unet")[0]

    # ----- memory -----------------------------------------------------------------------------------------------
    def estimate_memory(self, height: int, width: int, *, images_at_once: int = 1, guidance: bool = True,
                        vae_batch_size: int = 1, release_models: bool = False) -> MemoryEstimate:
        """Lower-bound peak memory of generating at ``width x height`` (see :func:`estimate_memory`).

        Args:
            images_at_once: images per U-Net evaluation (``unet_batch_size``, or the batch when that is None).
            guidance: classifier-free guidance doubles the U-Net rows.
            release_models: weights of the text encoder are not held during denoising.
        """
        held = ("unet", "vae") if release_models else ("text_encoder", "unet", "vae")
        weights = sum(self.weight_bytes.get(n, 0) for n in held)
        vae_channels = tuple(self.vae_config.block_out_channels) if self.vae_config is not None else ()
        return estimate_memory(self.unet_config_parsed, vae_channels, weights, height=height, width=width,
                               unet_rows=images_at_once * (2 if guidance else 1), vae_batch=vae_batch_size,
                               vae_scale_factor=self.vae_scale_factor)

    def _check_memory(self, height: int, width: int, **kw: Any) -> None:
        limit = available_memory_bytes()
        est = self.estimate_memory(height, width, **kw)
        if est.total <= limit:
            return
        suggestion = ""
        for f in (0.75, 0.5, 0.375, 0.25, 0.125):
            h2 = max(8, int(height * f) // 8 * 8)
            w2 = max(8, int(width * f) // 8 * 8)
            if self.estimate_memory(h2, w2, **kw).total <= limit:
                suggestion = f"try {w2}x{h2}, or "
                break
        raise InvalidArgumentError(
            f"{width}x{height} needs at least about {_gb(est.total)} of memory (U-Net self-attention "
            f"{_gb(est.attention)}, VAE decoding {_gb(est.decoder)}, weights {_gb(est.weights)}), more than the "
            f"{_gb(limit)} available; {suggestion}use a smaller size, fewer images at a time, float16 or "
            f"release_models=True (the CLI's default)")

    # ----- text -------------------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str], *, long_prompt: str = "truncate", clip_skip: int | None = None,
                      num_chunks: int | None = None, what: str = "prompt") -> mx.array:
        """Text embeddings ``(B, T, D)`` of ``prompts``, as diffusers' ``encode_prompt`` computes them.

        ``last_hidden_state``, or with ``clip_skip`` the output of layer ``-(clip_skip + 1)`` passed through the
        final layer norm. ``long_prompt="chunk"`` encodes 75-token chunks separately and concatenates them along
        ``T`` (A1111 style; ``T = 77 * num_chunks``); ``"truncate"`` cuts at 77 tokens (``T = 77``) and warns with
        the dropped text (``what`` names the prompt in the warning). Prompts are encoded one at a time, so a
        prompt's embedding does not depend on the others.

        Raises:
            InvalidArgumentError: a prompt is not a string, or ``num_chunks`` is too small.
        """
        tok = self.tokenizer
        rows = []
        for p in prompts:
            if long_prompt == "chunk":
                ids = tok.chunked([p], num_chunks=num_chunks)
                n = ids.shape[1] // tok.model_max_length
                chunks = [self._encode_ids(ids[:, i * tok.model_max_length:(i + 1) * tok.model_max_length],
                                           clip_skip) for i in range(n)]
                rows.append(mx.concatenate(chunks, axis=1))
                continue
            dropped = tok.truncate(p)[1]
            if dropped:
                warnings.warn(f"{what} longer than {tok.model_max_length} tokens was truncated (as diffusers "
                              f"does); dropped: {dropped!r}; use long_prompt='chunk' (--long-prompt chunk) to "
                              f"keep it", stacklevel=4)
            rows.append(self._encode_ids(tok([p]), clip_skip))
        return mx.concatenate(rows, axis=0)

    def _encode_ids(self, ids: mx.array, clip_skip: int | None) -> mx.array:
        out = self.text_encoder(ids)
        if clip_skip:
            return self.text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])
        return out.last_hidden_state

    def _encode_unique(self, texts: list[str], what: str, plan: _Plan, num_chunks: int | None) -> mx.array:
        unique = list(dict.fromkeys(texts))
        emb = self.encode_prompt(unique, long_prompt=plan.long_prompt, clip_skip=plan.clip_skip,
                                 num_chunks=num_chunks, what=what)
        index = mx.array([unique.index(t) for t in texts])
        return emb[index]

    # ----- generation -------------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        scheduler: str | None = None,
        latents: mx.array | np.ndarray | None = None,
        output_type: str = "pil",
        eta: float = 0.0,
        callback: StepCallback | None = None,
        long_prompt: str = "truncate",
        clip_skip: int | None = None,
        release_models: bool = False,
        vae_batch_size: int = 1,
        unet_batch_size: int | None = 1,
        tiled_decode: bool | None = None,
        show_progress: bool = False,
    ) -> PipelineOutput:
        """Generate images.

        Args:
            prompt: one prompt or a list (``P`` prompts).
            negative_prompt: one, or one per prompt; ``None`` means ``""`` (as diffusers). Ignored, with a warning,
                when ``guidance_scale <= 1``.
            num_inference_steps: denoising steps, ``1 <= N <= num_train_timesteps`` (scheduler-specific limits,
                e.g. LCM's ``original_inference_steps``); the U-Net runs ``len(scheduler.timesteps)`` times (Heun:
                ``2N - 1``), as in diffusers.
            guidance_scale: classifier-free guidance weight; ``> 1`` runs the U-Net on ``[uncond, cond]``, ``<= 1``
                (0, 1, negative) runs the conditional batch alone (diffusers' rule).
            height, width: pixels, multiples of ``vae_scale_factor`` (8); default ``unet.sample_size * 8``.
            num_images_per_prompt: images per prompt (``B = P * num_images_per_prompt``).
            seed: image ``k`` of the call uses seed ``seed + k`` (prompt-major order); ``None`` draws one.
                Integers in ``[0, 2**64 - 1]``.
            scheduler: a name from :data:`sd_mlx.schedulers.SCHEDULER_NAMES` (diffusers class names or A1111
                names); ``None`` uses the checkpoint's own. The checkpoint's training parameters (betas,
                ``prediction_type``...) are kept.
            latents: initial noise ``(B, h, w, 4)`` NHWC instead of seeded noise (it is multiplied by
                ``init_noise_sigma`` like diffusers does).
            output_type: ``"pil"``, ``"np"`` (float32 ``(B, H, W, 3)`` in ``[0, 1]``), ``"mx"`` or ``"latent"``.
            eta: DDIM's eta.
            callback: see :data:`StepCallback`.
            long_prompt: ``"truncate"`` (diffusers; warns) or ``"chunk"`` (A1111 75-token chunks; the prompt and
                the negative prompt are padded to the same number of chunks).
            clip_skip: use the hidden state ``clip_skip`` layers before the last (diffusers' ``clip_skip``).
            release_models: drop the text encoder after encoding and the U-Net before decoding.
            vae_batch_size: images decoded at once.
            unet_batch_size: images per U-Net evaluation (1: bit-identical to single-image runs; ``None``: all).
            tiled_decode: decode the VAE in overlapping tiles as diffusers' ``enable_tiling`` does (``True``),
                never (``False``), or only when the untiled decode's estimated peak would exceed the machine's
                memory (``None``, default). Tiles are blended, so a tiled image differs slightly from an untiled
                one; images that fit in one tile are decoded untiled either way. TAESD decodes untiled.
            show_progress: a tqdm bar over the steps (on stderr).

        Returns:
            :class:`PipelineOutput`.

        Raises:
            InvalidArgumentError: a bad argument, or a size whose estimated memory exceeds the machine's (all
                checked before any model is loaded).
            WeightLoadError, ConfigError: a component cannot be loaded (before any denoising).
            NonFiniteError: NaN/Inf in the text embeddings, the latents (names the step) or the decoded image.
            KeyboardInterrupt: Ctrl-C or a callback returning ``False``.
        """
        plan = self._prepare(prompt, negative_prompt, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, height=height, width=width,
                             num_images_per_prompt=num_images_per_prompt, seed=seed, scheduler=scheduler,
                             latents=latents, output_type=output_type, eta=eta, long_prompt=long_prompt,
                             clip_skip=clip_skip, release_models=release_models, vae_batch_size=vae_batch_size,
                             unet_batch_size=unet_batch_size)
        profile = Profile()
        context = self._encode(plan, profile)
        if release_models:
            self.release("text_encoder")
        final = self._denoise(plan, context, profile, callback=callback, show_progress=show_progress)
        if release_models:
            self.release("unet")
        if output_type == "latent":
            return PipelineOutput(final, plan.seeds, plan.params, profile)

        self._ensure_loaded("vae", profile)
        with profile.phase("decoding"):
            images = self.decode_latents(final, batch_size=vae_batch_size, check=True,
                                         tiled=self._want_tiling(tiled_decode, final.shape, vae_batch_size))
        if output_type == "mx":
            return PipelineOutput(images, plan.seeds, plan.params, profile)
        np_images = np.array(images.astype(mx.float32))
        out: Any = np_images if output_type == "np" else to_pil(np_images)
        return PipelineOutput(out, plan.seeds, plan.params, profile)

    def _prepare(self, prompt: Any, negative_prompt: Any, *, num_inference_steps: Any, guidance_scale: Any,
                 height: Any, width: Any, num_images_per_prompt: Any, seed: Any, scheduler: Any, latents: Any,
                 output_type: Any, eta: Any, long_prompt: Any, clip_skip: Any, release_models: bool,
                 vae_batch_size: Any, unet_batch_size: Any) -> _Plan:
        """Check every argument (no weights are loaded here) and build the plan of the call."""
        prompts = _as_list(prompt, "prompt")
        if prompts is None:
            raise InvalidArgumentError("prompt must be a string or a non-empty list of strings, got None")
        negatives = _as_list(negative_prompt, "negative_prompt")
        if negatives is not None and len(negatives) not in (1, len(prompts)):
            raise InvalidArgumentError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts; "
                                       f"give one, or one per prompt")
        _positive_int(num_images_per_prompt, "num_images_per_prompt")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating)) \
                or not np.isfinite(guidance_scale):
            raise InvalidArgumentError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if output_type not in OUTPUT_TYPES:
            raise InvalidArgumentError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if long_prompt not in LONG_PROMPT_MODES:
            raise InvalidArgumentError(f"long_prompt must be one of {', '.join(LONG_PROMPT_MODES)}, "
                                       f"got {long_prompt!r}")
        if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0):
            raise InvalidArgumentError(f"clip_skip must be an integer >= 0, got {clip_skip!r}")
        if clip_skip:
            layers = getattr(self.text_config, "num_hidden_layers", None)
            if layers is not None and clip_skip > layers:
                raise InvalidArgumentError(f"clip_skip={clip_skip} is larger than the text encoder's {layers} "
                                           f"layers")
        _positive_int(vae_batch_size, "vae_batch_size")
        _positive_int(unet_batch_size, "unet_batch_size", allow_none=True)
        ucfg = self.unet_config_parsed
        sample = ucfg.sample_size if isinstance(ucfg.sample_size, int) else 64
        default_px = int(sample or 64) * self.vae_scale_factor
        height = default_px if height is None else height
        width = default_px if width is None else width
        validate_size(height, width, self.vae_scale_factor)
        seed = validate_seed(seed)
        sched_name = scheduler if scheduler is not None else self.scheduler_config.get("_class_name",
                                                                                       "PNDMScheduler")
        sched = get_scheduler(sched_name, self.scheduler_config, **({"eta": eta} if eta else {}))
        sched.set_timesteps(num_inference_steps)  # raises InvalidArgumentError for a bad count
        do_cfg = float(guidance_scale) > 1.0
        neg_list = [""] * len(prompts) if negatives is None else (negatives * len(prompts) if len(negatives) == 1
                                                                   else negatives)
        if not do_cfg and any(neg_list):
            warnings.warn(f"guidance_scale={guidance_scale} <= 1 disables classifier-free guidance: the negative "
                          f"prompt is ignored", stacklevel=3)
        batch = len(prompts) * num_images_per_prompt
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        channels = ucfg.out_channels
        if ucfg.in_channels != channels:
            raise InvalidArgumentError(f"{self.folder}: the U-Net takes {ucfg.in_channels} input channels "
                                       f"(an inpainting model?); txt2img needs a plain text-to-image checkpoint")
        if latents is not None:
            latents = mx.array(latents) if not isinstance(latents, mx.array) else latents
            if tuple(latents.shape) != (batch, h, w, channels):
                raise InvalidArgumentError(f"latents must have shape {(batch, h, w, channels)} (B, h, w, C) for "
                                           f"{batch} images of {width}x{height}, got {tuple(latents.shape)}")
        unet_batch = batch if unet_batch_size is None else min(int(unet_batch_size), batch)
        self._check_memory(height, width, images_at_once=unet_batch, guidance=do_cfg,
                           vae_batch_size=min(vae_batch_size, batch), release_models=release_models)
        seeds = image_seeds(seed, batch)
        sampler_name = getattr(sched, "display_name", type(sched).__name__)
        params = [GenerationParameters(prompt=prompts[k // num_images_per_prompt],
                                       negative_prompt=neg_list[k // num_images_per_prompt] if do_cfg else "",
                                       steps=int(num_inference_steps), sampler=sampler_name,
                                       cfg_scale=float(guidance_scale), seed=seeds[k], width=width, height=height,
                                       model=self.model_name) for k in range(batch)]
        return _Plan(prompts=prompts, negatives=neg_list, do_cfg=do_cfg, guidance_scale=float(guidance_scale),
                     height=height, width=width, latent_shape=(h, w, channels),
                     num_images_per_prompt=num_images_per_prompt, batch=batch, seeds=seeds, scheduler=sched,
                     params=params, latents=latents, long_prompt=long_prompt, clip_skip=clip_skip,
                     unet_batch=unet_batch)

    def _encode(self, plan: _Plan, profile: Profile) -> tuple[mx.array, mx.array | None]:
        """``(cond, uncond)`` embeddings, one row per image ``(B, T, D)`` in the model dtype; ``uncond`` is None
        without guidance."""
        self._ensure_loaded("text_encoder", profile)
        with profile.phase("text_encoding"):
            num_chunks = None
            if plan.long_prompt == "chunk":
                texts = plan.prompts + (plan.negatives if plan.do_cfg else [])
                num_chunks = self.tokenizer.num_chunks(texts)
            n = plan.num_images_per_prompt
            cond = mx.repeat(self._encode_unique(plan.prompts, "prompt", plan, num_chunks), n, axis=0)
            uncond = None
            if plan.do_cfg:
                uncond = mx.repeat(self._encode_unique(plan.negatives, "negative prompt", plan, num_chunks), n,
                                   axis=0)
            cond = cond.astype(self.compute_dtype)
            uncond = uncond.astype(self.compute_dtype) if uncond is not None else None
            both = cond if uncond is None else mx.concatenate([uncond, cond])
            mx.eval(both)
            check_finite(both, "text encoding")
        return cond, uncond

    def _unet_eval(self, unet: Any, x: mx.array, t: float, cond: mx.array, uncond: mx.array | None,
                   guidance_scale: float) -> mx.array:
        """Guided model output for latents ``x`` ``(b, h, w, C)``: one U-Net evaluation on ``[uncond, cond]``
        (``2b`` rows) with guidance, else on ``cond`` alone; float32. With guidance the ``b`` latents go in once,
        shared by both contexts (the U-Net repeats them at its first cross-attention, see
        ``UNet2DConditionModel.__call__``): the result of ``[x, x]`` up to float32 rounding, with less work."""
        ctx = cond if uncond is None else mx.concatenate([uncond, cond], axis=0)
        t_in = mx.full((x.shape[0],), t, dtype=mx.float32)
        out = unet(x.astype(self.compute_dtype), t_in, ctx).astype(mx.float32)
        if uncond is None:
            return out
        out_uncond, out_text = mx.split(out, 2, axis=0)
        return out_uncond + guidance_scale * (out_text - out_uncond)

    def _denoise(self, plan: _Plan, context: tuple[mx.array, mx.array | None], profile: Profile, *,
                 callback: StepCallback | None, show_progress: bool) -> mx.array:
        """The sampling loop; returns the final latents ``(B, h, w, C)`` float32."""
        cond, uncond = context
        unet = self._ensure_loaded("unet", profile)
        sched = plan.scheduler
        latents = plan.latents if plan.latents is not None else initial_noise(plan.seeds, plan.latent_shape)
        latents = latents.astype(mx.float32) * sched.init_noise_sigma
        timesteps = [float(t) for t in np.asarray(sched.timesteps)]
        step_noise = StepNoise(plan.seeds, plan.latent_shape, len(timesteps), mx.float32) \
            if sched.needs_noise else None
        chunks = [(s, min(s + plan.unet_batch, plan.batch)) for s in range(0, plan.batch, plan.unet_batch)]
        bar = None
        if show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(timesteps), desc="denoising", unit="step")
        try:
            with profile.phase("denoising", steps=len(timesteps)):
                for i, t in enumerate(timesteps):
                    x = sched.scale_model_input(latents, i)
                    parts = []
                    for s, e in chunks:
                        part = self._unet_eval(unet, x[s:e], t, cond[s:e],
                                               uncond[s:e] if uncond is not None else None, plan.guidance_scale)
                        if len(chunks) > 1:
                            mx.eval(part)  # bound memory: one chunk's activations at a time
                        parts.append(part)
                    model_output = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
                    noise = step_noise(i) if step_noise is not None else None
                    latents = sched.step(model_output, i, latents, noise=noise)
                    finite = mx.all(mx.isfinite(latents))
                    mx.eval(latents, finite)
                    if not finite.item():
                        raise NonFiniteError(_non_finite_message(f"denoising (step {i + 1} of {len(timesteps)})"))
                    if bar is not None:
                        bar.update(1)
                    if callback is not None and callback(i, t, latents) is False:
                        raise KeyboardInterrupt("generation cancelled by the callback")
        finally:
            if bar is not None:
                bar.close()
        return latents

    def _want_tiling(self, tiled_decode: bool | None, latent_shape: tuple[int, ...], batch: int) -> bool:
        from .models.vae import AutoencoderKL
        from .models.vae_tiling import should_tile

        if tiled_decode is not None and not isinstance(tiled_decode, bool):
            raise InvalidArgumentError(f"tiled_decode must be True, False or None, got {tiled_decode!r}")
        if not isinstance(self.vae, AutoencoderKL) or tiled_decode is False:
            return False
        if tiled_decode:
            return True
        f = self.vae_scale_factor
        return should_tile(latent_shape[1] * f, latent_shape[2] * f, min(batch, latent_shape[0]),
                           available_memory_bytes(), config=self.vae.config)

    def decode_latents(self, latents: mx.array, *, batch_size: int = 1, vae: nn.Module | None = None,
                       check: bool = False, tiled: bool = False) -> mx.array:
        """Diffusion latents ``(B, h, w, 4)`` -> images ``(B, 8h, 8w, 3)`` in ``[0, 1]`` (float32).

        Decodes ``batch_size`` images at a time: ``vae.decode(latents / scaling_factor + shift_factor)``, then
        ``(x / 2 + 0.5).clip(0, 1)`` as diffusers' image processor does. ``vae`` defaults to :attr:`vae`; any
        decoder with a ``config`` holding ``scaling_factor`` (e.g. a TAESD for previews) can be passed.

        With ``tiled``, an ``AutoencoderKL`` decodes through :func:`sd_mlx.models.vae_tiling.tiled_decode`.

        Raises:
            NonFiniteError: with ``check``, when the decoder's output (before clipping) holds NaN or Inf.
        """
        vae = self.vae if vae is None else vae
        if tiled:
            from .models.vae_tiling import tiled_decode as _tiled_decode

            decode = lambda z: _tiled_decode(vae, z)  # noqa: E731
        else:
            decode = vae.decode
        cfg = vae.config
        scale = float(getattr(cfg, "scaling_factor", 0.18215) or 1.0)
        shift = float(getattr(cfg, "shift_factor", 0.0) or 0.0)
        vae_dtype = getattr(vae, "dtype", None) or self.dtype
        outs = []
        for s in range(0, latents.shape[0], batch_size):
            z = latents[s:s + batch_size] / scale + shift
            raw = decode(z.astype(vae_dtype)).astype(mx.float32)
            img = mx.clip(raw / 2 + 0.5, 0.0, 1.0)
            if check:
                finite = mx.all(mx.isfinite(raw))
                mx.eval(img, finite)
                if not finite.item():
                    raise NonFiniteError(_non_finite_message("VAE decoding"))
            else:
                mx.eval(img)
            outs.append(img)
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)


def resolve_taesd(vae: str | Path) -> Path:
    """A VAE location (TAESD, AutoencoderKL folder or file): an existing path as is; ``"taesd"``/``"taesdxl"`` or
    another TAESD repo id through the Hub
    (``madebyollin/taesd``; cache and ``HF_HUB_OFFLINE`` honoured).

    Raises:
        ModelNotFoundError: neither an existing path nor a fetchable repo id.
    """
    from .loading.hub import TAESD_PATTERNS, TAESD_REPOS, looks_like_repo_id

    path = Path(vae).expanduser()
    if path.exists():
        return path
    name = TAESD_REPOS.get(str(vae).lower(), str(vae))
    if not looks_like_repo_id(name):
        raise ModelNotFoundError(f"{vae}: TAESD not found; pass 'taesd', a Hub repo id, or a folder with "
                                 f"taesd_decoder.safetensors (or a diffusers AutoencoderTiny folder)")
    return resolve_model(name, allow_patterns=TAESD_PATTERNS)


def load_pipeline(name_or_path: str | Path, *, dtype: str = "float32", vae: str | Path | None = None,
                  quantize: int | None = None, quantize_group_size: int = 64, quantize_convolutions: bool = True,
                  revision: str | None = None, config: str | Path | None = None,
                  tokenizer: str | Path | None = None, prediction_type: str | None = None,
                  use_ema: bool = False) -> StableDiffusionPipeline:
    """Open a Stable Diffusion 1.x/2.x model: a local diffusers folder, a Hugging Face repo id, or a single
    checkpoint file in the original layout (``.safetensors``; ``.ckpt``/``.pt`` through the restricted tensors-only
    reader, see :mod:`sd_mlx.loading.single_file`).

    Configs and weight-file headers are read and checked here; weights are memory-mapped when a component is first
    used.

    Args:
        name_or_path: folder, repo id (fetched through ``huggingface_hub``; honours its cache and
            ``HF_HUB_OFFLINE``) or single file (family detected from its keys: ``pipe.source.describe()``).
        dtype: parameter dtype, ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``; ``*.fp16.safetensors``
            files are preferred for the half types. On the CPU the half types halve the weights' memory and still
            compute in float32 (see :class:`StableDiffusionPipeline`).
        vae: ``None`` (the model's own VAE), a TAESD path (diffusers folder, folder with
            ``taesd_decoder.safetensors``, or that file) or an AutoencoderKL folder or single VAE file.
        quantize: ``None``, 4 or 8: quantized linear layers (and convolutions) in the U-Net and text encoder.
        quantize_group_size: 32, 64 or 128.
        quantize_convolutions: with ``quantize``, quantize the convolutions too (default) or only linear layers.
        revision: Hub revision.
        config: single files only: a diffusers folder whose configs (and tokenizers) are used instead of sd_mlx's
            built-in ones for the detected family (as diffusers' ``from_single_file(config=...)``).
        tokenizer: a tokenizer folder (``vocab.json``, ``merges.txt``) replacing the model's or the packaged one.
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` replacing the detected (single file) or configured
            (folder) one.
        use_ema: single files only: use the U-Net's EMA weights (``model_ema.*``).

    Raises:
        ModelNotFoundError: not a folder, file or valid repo id, not cached while offline, or not an SD model.
        ConfigError: a config is missing, not JSON, or unsupported (names the file); an SDXL single file.
        WeightLoadError: a weight file is missing, truncated, has a corrupt header, an unknown or missing key, or is
            a pickle that names anything but tensors (names the file and key).
        InvalidArgumentError: bad dtype or quantization settings; ``config``/``use_ema`` with a folder.
    """
    from .loading.source import SINGLE_FILE_SUFFIXES, FolderSource, SingleFileSource, is_single_file

    dt = parse_dtype(dtype)
    given = Path(str(name_or_path)).expanduser()
    if given.suffix.lower() in SINGLE_FILE_SUFFIXES and not given.exists():
        raise ModelNotFoundError(f"{given}: no such checkpoint file; pass an existing single-file checkpoint, a "
                                 f"diffusers model folder or a Hub repo id")
    if is_single_file(name_or_path):
        source: Any = SingleFileSource(name_or_path, config=config, prediction_type=prediction_type,
                                       tokenizer=tokenizer, use_ema=use_ema)
    else:
        if config is not None or use_ema:
            raise InvalidArgumentError("config and use_ema apply to single-file checkpoints; a diffusers folder or "
                                       "repo carries its own configs")
        variant = "fp16" if dt != mx.float32 else None
        folder = resolve_model(name_or_path, variant=variant, revision=revision)
        source = FolderSource(folder, tokenizer=tokenizer, prediction_type=prediction_type)
    vae = resolve_taesd(vae) if vae is not None else None
    return StableDiffusionPipeline(source, dtype=dtype, model_name=str(name_or_path), vae=vae, quantize=quantize,
                                   quantize_group_size=quantize_group_size,
                                   quantize_convolutions=quantize_convolutions)
