"""The Stable Diffusion pipeline object: components, loading and release, and the phases of a call.

A call runs ``plan (checks, no weights) -> conditioning (text encoders) -> initial latents (mode) -> the shared
denoising loop (:mod:`.loop`) -> decode (:mod:`.decode`) -> images + PNG parameters``, following diffusers'
``StableDiffusionPipeline`` step for step (same order of operations, same classifier-free guidance batch
``[uncond, cond]``, same scaling of latents), with MLX's lazy evaluation: each denoising step builds one graph and
is evaluated once with ``mx.eval``.

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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import ops
from ..cpu.memory import return_freed_memory
from ..errors import InvalidArgumentError, ModelNotFoundError
from ..images import GenerationParameters, to_pil
from ..loading.components import parse_dtype
from ..loading.hub import resolve_model
from ..profiling import Profile
from ..tokenizer import CLIPTokenizer
from .decode import decode_latents, want_tiling
from .loop import LoopInputs, StepCallback, denoise
from .memory import MemoryEstimate, available_memory_bytes, estimate_memory, format_bytes, info_bytes
from .noise import initial_noise
from .plan import Plan, make_plan
from .text import encode_prompts, sd_conditioning

COMPONENTS = ("text_encoder", "unet", "vae")


def _check_source_components(source: Any, *, vae_given: bool) -> None:
    """The components an SD 1.x/2.x text-to-image pipeline needs are in ``source``.

    Raises:
        ModelNotFoundError: a folder lacks a component folder, or a single file lacks a component (a VAE-less file
            needs ``vae``).
        ConfigError: a single file of a family this pipeline does not run (SDXL).
    """
    from ..errors import ConfigError

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
    from ..loading.vae_source import TAESD, VaeSource, classify_vae

    if classify_vae(path) == TAESD:
        return None
    model_cfg = source.config("vae")[0] if (getattr(source, "family", None) is not None or source.has("vae")) \
        else None
    return VaeSource(path, model_cfg)


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
        cpu_kernels: ``None`` (default) follows ``SD_MLX_CPU_KERNELS``; ``False`` runs the portable code a Mac or
            CUDA user runs even on the CPU (see :mod:`sd_mlx.ops`); ``True`` allows the Linux CPU machinery. Applies
            to this pipeline's loading and calls; for direct component calls use ``with sd_mlx.ops.cpu_kernels(...)``.

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
                 quantize_convolutions: bool = True, cpu_kernels: bool | None = None) -> None:
        from ..models.clip import CLIP_TEXT_SPEC
        from ..models.unet import UNET_SPEC
        from ..models.vae import VAE_SPEC, vae_load_dtype

        from ..loading.source import FolderSource

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
        if cpu_kernels is not None and not isinstance(cpu_kernels, bool):
            raise InvalidArgumentError(f"cpu_kernels must be True, False or None, got {cpu_kernels!r}")
        self.cpu_kernels = cpu_kernels
        with ops.cpu_kernels(cpu_kernels):
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
            self.weight_bytes[name] = info_bytes(src.header(name, prefer_fp16=half), load_dtype.size)
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
        with ops.cpu_kernels(self.cpu_kernels):
            return self._load_component(name)

    def _load_component(self, name: str) -> nn.Module:
        from ..loading.components import load_from_source
        from ..loading.weights import evaluate_parameters

        quantized = bool(self.quantize) and name in ("text_encoder", "unet")
        if name in ("text_encoder", "unet"):
            from ..models.clip import CLIP_TEXT_SPEC
            from ..models.unet import UNET_SPEC

            folder = self.folder / name
            spec = CLIP_TEXT_SPEC if name == "text_encoder" else UNET_SPEC
            model = load_from_source(self.source, name, spec, dtype=self.dtype, evaluate=not quantized,
                                     config=self.text_config if name == "text_encoder" else self.unet_config_parsed)
        elif name == "vae":
            if self._vae_source is None:
                from ..models.taesd import load_taesd

                model = load_taesd(self._vae_path, dtype=self.dtype)
            else:
                from ..models.vae import VAE_SPEC, vae_load_dtype

                model = load_from_source(self._vae_source, "vae", VAE_SPEC, config=self.vae_config,
                                         dtype=vae_load_dtype(self.vae_config, self.dtype))
        else:  # pragma: no cover - internal
            raise KeyError(name)
        if quantized:
            from ..quantization import quantize_model

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
            f"{width}x{height} needs at least about {format_bytes(est.total)} of memory (U-Net self-attention "
            f"{format_bytes(est.attention)}, VAE decoding {format_bytes(est.decoder)}, weights {format_bytes(est.weights)}), more than the "
            f"{format_bytes(limit)} available; {suggestion}use a smaller size, fewer images at a time, float16 or "
            f"release_models=True (the CLI's default)")

    # ----- text -------------------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str], *, long_prompt: str = "truncate", clip_skip: int | None = None,
                      num_chunks: int | None = None, what: str = "prompt") -> mx.array:
        """Text embeddings ``(B, T, D)`` of ``prompts`` (see :func:`sd_mlx.pipeline.text.encode_prompts`), as
        diffusers' ``encode_prompt`` computes them.

        Raises:
            InvalidArgumentError: a prompt is not a string, or ``num_chunks`` is too small.
        """
        with ops.cpu_kernels(self.cpu_kernels):
            return encode_prompts(self.text_encoder, self.tokenizer, prompts, long_prompt=long_prompt,
                                  clip_skip=clip_skip, num_chunks=num_chunks, what=what)


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
            callback: see :data:`sd_mlx.pipeline.loop.StepCallback`.
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
        with ops.cpu_kernels(self.cpu_kernels):
            plan = make_plan(self, prompt, negative_prompt, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, height=height, width=width,
                             num_images_per_prompt=num_images_per_prompt, seed=seed, scheduler=scheduler,
                             latents=latents, output_type=output_type, eta=eta, long_prompt=long_prompt,
                             clip_skip=clip_skip, release_models=release_models, vae_batch_size=vae_batch_size,
                             unet_batch_size=unet_batch_size)
            profile = Profile()
            conditioning = self._encode(plan, profile)
            if release_models:
                self.release("text_encoder")
            unet = self._ensure_loaded("unet", profile)
            noise = plan.latents if plan.latents is not None else initial_noise(plan.seeds, plan.latent_shape)
            run = LoopInputs(latents=noise.astype(mx.float32) * plan.scheduler.init_noise_sigma,
                             scheduler=plan.scheduler, seeds=plan.seeds, conditioning=conditioning,
                             guidance_scale=plan.guidance_scale, compute_dtype=self.compute_dtype,
                             unet_batch=plan.unet_batch)
            final = denoise(unet, run, profile, callback=callback, show_progress=show_progress)
            del unet
            if release_models:
                self.release("unet")
            return self._finish(final, plan, profile, output_type=output_type, vae_batch_size=vae_batch_size,
                                tiled_decode=tiled_decode)

    def _encode(self, plan: Plan, profile: Profile) -> Any:
        """The call's :class:`~sd_mlx.pipeline.loop.Conditioning` (text encoder loaded if needed)."""
        text_encoder = self._ensure_loaded("text_encoder", profile)
        with profile.phase("text_encoding"):
            return sd_conditioning(text_encoder, self.tokenizer, plan.prompts, plan.negatives if plan.do_cfg else None,
                                   num_images_per_prompt=plan.num_images_per_prompt, long_prompt=plan.long_prompt,
                                   clip_skip=plan.clip_skip, compute_dtype=self.compute_dtype)

    def _finish(self, final: mx.array, plan: Plan, profile: Profile, *, output_type: str, vae_batch_size: int,
                tiled_decode: bool | None) -> PipelineOutput:
        """Decode the final latents ``(B, h, w, C)`` (unless ``output_type="latent"``) into the call's output."""
        if output_type == "latent":
            return PipelineOutput(final, plan.seeds, plan.params, profile)
        vae = self._ensure_loaded("vae", profile)
        with profile.phase("decoding"):
            tiled = want_tiling(vae, tiled_decode, final.shape, vae_batch_size, self.vae_scale_factor)
            images = decode_latents(vae, final, batch_size=vae_batch_size, dtype=self.dtype, check=True, tiled=tiled)
        if output_type == "mx":
            return PipelineOutput(images, plan.seeds, plan.params, profile)
        np_images = np.array(images.astype(mx.float32))
        out: Any = np_images if output_type == "np" else to_pil(np_images)
        return PipelineOutput(out, plan.seeds, plan.params, profile)

    def decode_latents(self, latents: mx.array, *, batch_size: int = 1, vae: nn.Module | None = None,
                       check: bool = False, tiled: bool = False) -> mx.array:
        """Diffusion latents ``(B, h, w, 4)`` -> images ``(B, 8h, 8w, 3)`` in ``[0, 1]`` (float32) with :attr:`vae`
        or the given decoder (e.g. a TAESD for previews); see :func:`sd_mlx.pipeline.decode.decode_latents`.

        Raises:
            NonFiniteError: with ``check``, when the decoder's output (before clipping) holds NaN or Inf.
        """
        with ops.cpu_kernels(self.cpu_kernels):
            return decode_latents(self.vae if vae is None else vae, latents, batch_size=batch_size, dtype=self.dtype,
                                  check=check, tiled=tiled)


def resolve_taesd(vae: str | Path) -> Path:
    """A VAE location (TAESD, AutoencoderKL folder or file): an existing path as is; ``"taesd"``/``"taesdxl"`` or
    another TAESD repo id through the Hub
    (``madebyollin/taesd``; cache and ``HF_HUB_OFFLINE`` honoured).

    Raises:
        ModelNotFoundError: neither an existing path nor a fetchable repo id.
    """
    from ..loading.hub import TAESD_PATTERNS, TAESD_REPOS, looks_like_repo_id

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
                  use_ema: bool = False, cpu_kernels: bool | None = None) -> StableDiffusionPipeline:
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
        cpu_kernels: ``False`` runs the portable (Mac/CUDA) code even on the CPU; ``None`` follows
            ``SD_MLX_CPU_KERNELS`` (see :class:`StableDiffusionPipeline`).

    Raises:
        ModelNotFoundError: not a folder, file or valid repo id, not cached while offline, or not an SD model.
        ConfigError: a config is missing, not JSON, or unsupported (names the file); an SDXL single file.
        WeightLoadError: a weight file is missing, truncated, has a corrupt header, an unknown or missing key, or is
            a pickle that names anything but tensors (names the file and key).
        InvalidArgumentError: bad dtype or quantization settings; ``config``/``use_ema`` with a folder.
    """
    from ..loading.source import SINGLE_FILE_SUFFIXES, FolderSource, SingleFileSource, is_single_file

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
                                   quantize_convolutions=quantize_convolutions, cpu_kernels=cpu_kernels)
