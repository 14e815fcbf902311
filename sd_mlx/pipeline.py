"""The text-to-image pipeline: prompt -> text embeddings -> denoising loop -> VAE decode.

Follows diffusers' ``StableDiffusionPipeline`` step for step (same order of operations, same classifier-free
guidance batch ``[uncond, cond]``, same scaling of latents), with MLX's lazy evaluation: each denoising step builds
one graph and is evaluated once with ``mx.eval``.

Models are loaded on first use and kept for later calls; with ``release_models=True`` a call drops the text encoder
after encoding and the U-Net before decoding (lower peak memory, at the cost of reloading them on the next call).
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import InvalidArgumentError, ModelNotFoundError, NonFiniteError
from .images import GenerationParameters, to_pil
from .loading.components import parse_dtype
from .loading.configs import read_json
from .loading.hub import resolve_model
from .profiling import Profile
from .schedulers import get_scheduler
from .tokenizer import CLIPTokenizer

MAX_SEED = 2**64 - 1
OUTPUT_TYPES = ("pil", "np", "latent", "mx")
LONG_PROMPT_MODES = ("truncate", "chunk")

StepCallback = Callable[[int, float, mx.array], Any]
"""``callback(step_index, timestep, latents)`` after each step; latents ``(B, h, w, 4)``; return ``False`` to
cancel the generation (raises ``KeyboardInterrupt`` like Ctrl-C, so no output is written)."""


@dataclass
class PipelineOutput:
    """Result of a pipeline call.

    Attributes:
        images: list of ``PIL.Image`` (``output_type="pil"``), a ``(B, H, W, 3)`` float32 numpy array in ``[0, 1]``
            (``"np"``), an ``mx.array`` of the same (``"mx"``), or the final latents ``(B, h, w, 4)`` (``"latent"``).
        seeds: the seed of each image (``seed + k`` for image ``k``).
        parameters: what made each image (for PNG metadata).
        profile: seconds and peak memory per phase.
    """

    images: Any
    seeds: list[int]
    parameters: list[GenerationParameters]
    profile: Profile = field(default_factory=Profile)


def validate_size(height: int, width: int, vae_scale_factor: int = 8) -> None:
    """Check an image size before anything is loaded.

    Raises:
        InvalidArgumentError: a side is not a positive integer multiple of ``vae_scale_factor`` (message gives the
            nearest valid sizes), or larger than 16384 pixels.
    """
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InvalidArgumentError(f"{name} must be an integer number of pixels, got {v!r}")
        if v <= 0:
            raise InvalidArgumentError(f"{name} must be positive, got {v}")
        if v % vae_scale_factor:
            lo = max(vae_scale_factor, v - v % vae_scale_factor)
            raise InvalidArgumentError(f"{name}={v} is not a multiple of {vae_scale_factor}; use {lo} or "
                                       f"{lo + vae_scale_factor}")
        if v > 16384:
            raise InvalidArgumentError(f"{name}={v} is too large (at most 16384 pixels)")


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
        raise InvalidArgumentError(f"seed must be between 0 and 2**64-1, got {seed}")
    return int(seed)


def image_seeds(seed: int, count: int) -> list[int]:
    """Seeds of the images of one call: image ``k`` uses ``(seed + k) mod 2**64``."""
    return [(seed + k) % (MAX_SEED + 1) for k in range(count)]


def _seed_key(seed: int) -> mx.array:
    # mx.random.key takes a 64-bit seed; keep the full 64 bits of large seeds.
    return mx.random.key(seed if seed < 2**63 else seed - 2**64)


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
    if isinstance(prompt, Sequence) and all(isinstance(p, str) for p in prompt) and len(prompt) > 0:
        return list(prompt)
    raise InvalidArgumentError(f"{name} must be a string or a non-empty list of strings")


def check_finite(x: mx.array, phase: str) -> None:
    """Raise :class:`NonFiniteError` naming ``phase`` if ``x`` holds NaN or Inf."""
    if not bool(mx.all(mx.isfinite(x)).item()):
        raise NonFiniteError(f"NaN or Inf appeared during {phase}; with float16 this is usually overflow: run with "
                             f"dtype float32 (--dtype float32)")


class StableDiffusionPipeline:
    """Stable Diffusion 1.x/2.x text-to-image in MLX, matching diffusers' ``StableDiffusionPipeline``.

    Build it with :func:`load_pipeline`. Components (``tokenizer``, ``text_encoder``, ``unet``, ``vae``) are
    attributes loaded on first access from the model folder and kept until :meth:`release`.

    Args:
        folder: a local diffusers model folder.
        dtype: parameter dtype of the models (``"float32"``, ``"float16"``, ``"bfloat16"``).
        model_name: the name the user gave (for PNG metadata).
        vae: ``None`` for the checkpoint's AutoencoderKL, or a path to a TAESD folder/file set (``"taesd"`` works
            through :func:`load_pipeline`).
        quantize: ``None``, 4 or 8: quantize the U-Net's and text encoder's linear layers with ``mlx.nn.quantize``.
        quantize_group_size: group size for quantization (32, 64 or 128).
    """

    def __init__(self, folder: Path, *, dtype: str = "float32", model_name: str | None = None,
                 vae: str | Path | None = None, quantize: int | None = None, quantize_group_size: int = 64) -> None:
        self.folder = Path(folder)
        self.dtype = parse_dtype(dtype)
        self.model_name = model_name or str(folder)
        if quantize not in (None, 4, 8):
            raise InvalidArgumentError(f"quantize must be 4 or 8 (bits), got {quantize!r}")
        if quantize_group_size not in (32, 64, 128):
            raise InvalidArgumentError(f"quantize_group_size must be 32, 64 or 128, got {quantize_group_size!r}")
        self.quantize, self.quantize_group_size = quantize, quantize_group_size
        self._vae_path = Path(vae) if vae is not None else None
        for sub in ("unet", "text_encoder", "tokenizer", "scheduler") + (() if vae else ("vae",)):
            if not (self.folder / sub).is_dir():
                raise ModelNotFoundError(f"{self.folder}: no {sub}/ folder; this is not a diffusers Stable "
                                         f"Diffusion model folder (expected unet/, vae/, text_encoder/, tokenizer/, "
                                         f"scheduler/)")
        self.scheduler_config: dict[str, Any] = read_json(self.folder / "scheduler" / "scheduler_config.json")
        self._models: dict[str, nn.Module] = {}
        self._tokenizer: CLIPTokenizer | None = None

    # ----- components -------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> CLIPTokenizer:
        """The CLIP tokenizer from ``tokenizer/``."""
        if self._tokenizer is None:
            self._tokenizer = CLIPTokenizer.from_folder(self.folder / "tokenizer")
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
        if name == "text_encoder":
            from .models.clip import load_text_encoder

            model = load_text_encoder(self.folder / "text_encoder", dtype=self.dtype)
        elif name == "unet":
            from .models.unet import load_unet

            model = load_unet(self.folder / "unet", dtype=self.dtype)
        elif name == "vae":
            if self._vae_path is not None:
                from .models.taesd import load_taesd

                model = load_taesd(self._vae_path, dtype=self.dtype)
            else:
                from .models.vae import load_vae

                model = load_vae(self.folder / "vae", dtype=self.dtype)
        else:  # pragma: no cover - internal
            raise KeyError(name)
        if self.quantize and name in ("text_encoder", "unet"):
            from .quantization import quantize_model

            quantize_model(model, bits=self.quantize, group_size=self.quantize_group_size)
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

    def release(self, *names: str) -> None:
        """Drop loaded models (``"text_encoder"``, ``"unet"``, ``"vae"``; all when none named) and MLX's cache."""
        for n in names or tuple(self._models):
            self._models.pop(n, None)
        mx.clear_cache()

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: ``2 ** (len(vae.block_out_channels) - 1)`` from ``vae/config.json`` (8 for SD)."""
        cfg_path = self.folder / "vae" / "config.json"
        if cfg_path.is_file():
            return 2 ** (len(read_json(cfg_path).get("block_out_channels", [0, 0, 0, 0])) - 1)
        return 8

    @property
    def unet_config(self) -> dict[str, Any]:
        """``unet/config.json`` as a dict."""
        return read_json(self.folder / "unet" / "config.json")

    def _vae_scaling(self) -> tuple[float, float]:
        cfg = self.vae.config
        return float(getattr(cfg, "scaling_factor", 0.18215) or 1.0), float(getattr(cfg, "shift_factor", 0.0) or 0.0)

    # ----- text -------------------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str], *, long_prompt: str = "truncate", clip_skip: int | None = None,
                      num_chunks: int | None = None) -> mx.array:
        """Text embeddings ``(B, T, D)`` of ``prompts``, as diffusers' ``encode_prompt`` computes them
        (``last_hidden_state``, or with ``clip_skip`` the output of layer ``-(clip_skip + 1)`` passed through the
        final layer norm). ``long_prompt="chunk"`` encodes 75-token chunks separately and concatenates them along
        ``T`` (A1111 style); ``"truncate"`` cuts at 77 tokens and warns with the dropped text."""
        tok = self.tokenizer
        if long_prompt == "chunk":
            ids = tok.chunked(prompts, num_chunks=num_chunks)
            n = ids.shape[1] // tok.model_max_length
            chunks = [self._encode_ids(ids[:, i * tok.model_max_length:(i + 1) * tok.model_max_length], clip_skip)
                      for i in range(n)]
            return mx.concatenate(chunks, axis=1)
        for p in prompts:
            dropped = tok.truncate(p)[1]
            if dropped:
                warnings.warn(f"prompt longer than {tok.model_max_length} tokens was truncated (as diffusers does); "
                              f"dropped: {dropped!r}; use long_prompt='chunk' (--long-prompt chunk) to keep it",
                              stacklevel=3)
        return self._encode_ids(tok(prompts), clip_skip)

    def _encode_ids(self, ids: mx.array, clip_skip: int | None) -> mx.array:
        out = self.text_encoder(ids)
        if clip_skip:
            enc = self.text_encoder
            return enc.final_layer_norm(out.hidden_states[-(clip_skip + 1)])
        return out.last_hidden_state

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
        show_progress: bool = False,
    ) -> PipelineOutput:
        """Generate images.

        Args:
            prompt: one prompt or a list (``B`` prompts).
            negative_prompt: one, or one per prompt; ``None`` means ``""`` (as diffusers). Ignored, with a warning,
                when ``guidance_scale <= 1``.
            num_inference_steps: denoising steps, ``1 <= N <= num_train_timesteps`` (scheduler-specific limits).
            guidance_scale: classifier-free guidance weight; ``> 1`` runs one U-Net batch ``[uncond, cond]`` of
                ``2B``, ``<= 1`` (0, 1, negative) runs the conditional batch alone (diffusers' rule).
            height, width: pixels, multiples of ``vae_scale_factor`` (8); default ``unet.sample_size * 8``.
            num_images_per_prompt: images per prompt.
            seed: image ``k`` of the call uses seed ``seed + k`` (prompt-major order); ``None`` draws one.
                Integers in ``[0, 2**64 - 1]``.
            scheduler: a name from :data:`sd_mlx.schedulers.SCHEDULER_NAMES` (diffusers class names or A1111
                names); ``None`` uses the checkpoint's own. The checkpoint's training parameters (betas,
                ``prediction_type``...) are kept.
            latents: initial noise ``(B * num_images_per_prompt, h, w, 4)`` NHWC instead of seeded noise (it is
                multiplied by ``init_noise_sigma`` like diffusers does).
            output_type: ``"pil"``, ``"np"`` (float32 ``(B, H, W, 3)`` in ``[0, 1]``), ``"mx"`` or ``"latent"``.
            eta: DDIM's eta.
            callback: see :data:`StepCallback`.
            long_prompt: ``"truncate"`` (diffusers; warns) or ``"chunk"`` (A1111 75-token chunks).
            clip_skip: use the hidden state ``clip_skip`` layers before the last (diffusers' ``clip_skip``).
            release_models: drop the text encoder after encoding and the U-Net before decoding.
            vae_batch_size: images decoded at once.
            show_progress: a tqdm bar over the steps.

        Returns:
            :class:`PipelineOutput`.

        Raises:
            InvalidArgumentError: a bad argument (checked before any model is loaded).
            NonFiniteError: NaN/Inf in the latents or the decoded image (names the phase).
            KeyboardInterrupt: Ctrl-C or a callback returning ``False``.
        """
        # -- validate everything before any work --
        prompts = _as_list(prompt, "prompt")
        negatives = _as_list(negative_prompt, "negative_prompt")
        assert prompts is not None
        if negatives is not None and len(negatives) not in (1, len(prompts)):
            raise InvalidArgumentError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts; "
                                       f"give one, or one per prompt")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise InvalidArgumentError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not np.isfinite(guidance_scale):
            raise InvalidArgumentError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if output_type not in OUTPUT_TYPES:
            raise InvalidArgumentError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if long_prompt not in LONG_PROMPT_MODES:
            raise InvalidArgumentError(f"long_prompt must be one of {', '.join(LONG_PROMPT_MODES)}, "
                                       f"got {long_prompt!r}")
        if clip_skip is not None and (not isinstance(clip_skip, int) or clip_skip < 0):
            raise InvalidArgumentError(f"clip_skip must be an integer >= 0, got {clip_skip!r}")
        if not isinstance(vae_batch_size, int) or vae_batch_size < 1:
            raise InvalidArgumentError(f"vae_batch_size must be an integer >= 1, got {vae_batch_size!r}")
        ucfg = self.unet_config
        default_px = int(ucfg.get("sample_size", 64)) * self.vae_scale_factor
        height = default_px if height is None else height
        width = default_px if width is None else width
        validate_size(height, width, self.vae_scale_factor)
        seed = validate_seed(seed)
        sched_name = scheduler or self.scheduler_config.get("_class_name", "PNDMScheduler")
        sched = get_scheduler(sched_name, self.scheduler_config, **({"eta": eta} if eta else {}))
        sched.set_timesteps(num_inference_steps)  # raises InvalidArgumentError for a bad count
        do_cfg = guidance_scale > 1.0
        if not do_cfg and negatives and any(negatives):
            warnings.warn(f"guidance_scale={guidance_scale} <= 1 disables classifier-free guidance: the negative "
                          f"prompt is ignored", stacklevel=2)
        batch = len(prompts) * num_images_per_prompt
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        channels = int(ucfg.get("out_channels", 4))
        if int(ucfg.get("in_channels", 4)) != channels:
            raise InvalidArgumentError(f"{self.folder}: the U-Net takes {ucfg.get('in_channels')} input channels "
                                       f"(an inpainting model?); txt2img needs a plain text-to-image checkpoint")
        if latents is not None:
            latents = mx.array(latents) if not isinstance(latents, mx.array) else latents
            if tuple(latents.shape) != (batch, h, w, channels):
                raise InvalidArgumentError(f"latents must have shape {(batch, h, w, channels)} (B, h, w, C) for "
                                           f"{batch} images of {width}x{height}, got {tuple(latents.shape)}")
        seeds = image_seeds(seed, batch)
        sampler_name = getattr(sched, "display_name", type(sched).__name__)
        neg_list = [""] * len(prompts) if negatives is None else (negatives * len(prompts) if len(negatives) == 1
                                                                   else negatives)
        params = [GenerationParameters(prompt=prompts[k // num_images_per_prompt],
                                       negative_prompt=neg_list[k // num_images_per_prompt] if do_cfg else "",
                                       steps=num_inference_steps, sampler=sampler_name,
                                       cfg_scale=float(guidance_scale), seed=seeds[k], width=width, height=height,
                                       model=self.model_name) for k in range(batch)]
        profile = Profile()

        # -- text encoding --
        self._ensure_loaded("text_encoder", profile)
        with profile.phase("text_encoding"):
            num_chunks = None
            if long_prompt == "chunk" and do_cfg:
                num_chunks = max(self.tokenizer.num_chunks(p) for p in prompts + neg_list)
            cond = self.encode_prompt(prompts, long_prompt=long_prompt, clip_skip=clip_skip, num_chunks=num_chunks)
            if do_cfg:
                uncond = self.encode_prompt(neg_list, long_prompt=long_prompt, clip_skip=clip_skip,
                                            num_chunks=num_chunks)
            cond = mx.repeat(cond, num_images_per_prompt, axis=0)
            if do_cfg:
                uncond = mx.repeat(uncond, num_images_per_prompt, axis=0)
                context = mx.concatenate([uncond, cond], axis=0)
            else:
                context = cond
            context = context.astype(self.dtype)
            mx.eval(context)
        if release_models:
            self.release("text_encoder")

        # -- denoising --
        unet = self._ensure_loaded("unet", profile)
        latent_dtype = mx.float32
        if latents is None:
            latents = initial_noise(seeds, (h, w, channels), latent_dtype)
        latents = latents.astype(latent_dtype) * sched.init_noise_sigma
        timesteps = [float(t) for t in np.asarray(sched.timesteps)]
        step_noise = StepNoise(seeds, (h, w, channels), len(timesteps), latent_dtype) \
            if sched.needs_noise else None
        iterator = range(len(timesteps))
        if show_progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=len(timesteps), desc="denoising", unit="step")
        with profile.phase("denoising", steps=len(timesteps)):
            for i in iterator:
                t = timesteps[i]
                x = sched.scale_model_input(latents, i)
                x_in = mx.concatenate([x, x], axis=0) if do_cfg else x
                t_in = mx.full((x_in.shape[0],), t, dtype=mx.float32)
                eps = unet(x_in.astype(self.dtype), t_in, context).astype(latent_dtype)
                if do_cfg:
                    eps_uncond, eps_text = mx.split(eps, 2, axis=0)
                    eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
                noise = step_noise(i) if step_noise is not None else None
                latents = sched.step(eps, i, latents, noise=noise)
                mx.eval(latents)
                if callback is not None and callback(i, t, latents) is False:
                    raise KeyboardInterrupt("generation cancelled by the callback")
        check_finite(latents, "denoising")
        if release_models:
            self.release("unet")
        del unet

        if output_type == "latent":
            return PipelineOutput(latents, seeds, params, profile)

        # -- decoding --
        self._ensure_loaded("vae", profile)
        with profile.phase("decoding"):
            images = self.decode_latents(latents, batch_size=vae_batch_size)
            check_finite(images, "VAE decoding")
        np_images = np.array(images.astype(mx.float32))
        if output_type == "np":
            out: Any = np_images
        elif output_type == "mx":
            out = images
        else:
            out = to_pil(np_images)
        return PipelineOutput(out, seeds, params, profile)

    def decode_latents(self, latents: mx.array, *, batch_size: int = 1) -> mx.array:
        """Diffusion latents ``(B, h, w, 4)`` -> images ``(B, 8h, 8w, 3)`` in ``[0, 1]`` (float32), decoding
        ``batch_size`` images at a time: ``vae.decode(latents / scaling_factor + shift_factor)``, then
        ``(x / 2 + 0.5).clip(0, 1)`` as diffusers' image processor does."""
        vae = self.vae
        scale, shift = self._vae_scaling()
        outs = []
        for s in range(0, latents.shape[0], batch_size):
            z = latents[s:s + batch_size] / scale + shift
            vae_dtype = getattr(vae, "dtype", None) or self.dtype
            img = vae.decode(z.astype(vae_dtype)).astype(mx.float32)
            img = mx.clip(img / 2 + 0.5, 0.0, 1.0)
            mx.eval(img)
            outs.append(img)
        return mx.concatenate(outs, axis=0)


def load_pipeline(name_or_path: str | Path, *, dtype: str = "float32", vae: str | Path | None = None,
                  quantize: int | None = None, quantize_group_size: int = 64,
                  revision: str | None = None) -> StableDiffusionPipeline:
    """Open a Stable Diffusion 1.x/2.x model: a local diffusers folder or a Hugging Face repo id.

    Only configs are read here; weights are memory-mapped when a component is first used.

    Args:
        name_or_path: folder or repo id (fetched through ``huggingface_hub``; honours its cache and
            ``HF_HUB_OFFLINE``).
        dtype: ``"float32"`` (default; use it on CPU), ``"float16"`` or ``"bfloat16"``; ``*.fp16.safetensors``
            files are preferred for the half types.
        vae: ``None`` (the model's own VAE) or a TAESD path (diffusers folder or folder with
            ``taesd_decoder.safetensors``).
        quantize: ``None``, 4 or 8: quantized linear layers in the U-Net and text encoder.
        quantize_group_size: 32, 64 or 128.
        revision: Hub revision.

    Raises:
        ModelNotFoundError: not a folder, not a valid repo id, not cached while offline, or not a diffusers SD folder.
        InvalidArgumentError: bad dtype or quantization settings.
    """
    dt = parse_dtype(dtype)
    variant = "fp16" if dt != mx.float32 else None
    folder = resolve_model(name_or_path, variant=variant, revision=revision)
    return StableDiffusionPipeline(folder, dtype=dtype, model_name=str(name_or_path), vae=vae, quantize=quantize,
                                   quantize_group_size=quantize_group_size)
