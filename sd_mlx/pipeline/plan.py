"""Planning a call: every argument checked, defaults resolved and the schedule built before any model is loaded."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..arrays import float_array
from ..errors import InvalidArgumentError
from ..images import GenerationParameters
from ..schedulers import Scheduler, get_scheduler
from .checks import as_list, positive_int, validate_seed, validate_size
from .noise import image_seeds

OUTPUT_TYPES = ("pil", "np", "latent", "mx")
LONG_PROMPT_MODES = ("truncate", "chunk")


@dataclass
class Plan:
    """A validated call: everything the phases need, computed before any model is loaded.

    Attributes:
        prompts, negatives: one entry per prompt (``negatives`` ``""`` where none was given).
        do_cfg, guidance_scale: classifier-free guidance (``guidance_scale > 1``) and its weight.
        height, width: output size in pixels; ``latent_shape`` ``(h, w, C)`` of one image's latents.
        num_images_per_prompt, batch: images per prompt and in all (``B``).
        seeds: seed of each image (``seed + k``).
        scheduler: the scheduler, ``set_timesteps`` done.
        params: what made each image (PNG metadata).
        latents: injected initial noise ``(B, h, w, C)`` float32, or ``None`` (seeded noise).
        long_prompt, clip_skip: text-encoding options.
        unet_batch: images per U-Net evaluation.
    """

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


def make_plan(pipe: Any, prompt: Any, negative_prompt: Any, *, num_inference_steps: Any, guidance_scale: Any,
              height: Any, width: Any, num_images_per_prompt: Any, seed: Any, scheduler: Any, latents: Any,
              output_type: Any, eta: Any, long_prompt: Any, clip_skip: Any, release_models: bool,
              vae_batch_size: Any, unet_batch_size: Any) -> Plan:
    """Check every argument of a :class:`~sd_mlx.pipeline.core.StableDiffusionPipeline` call (no weights are
    loaded here: configs and file headers only) and build its :class:`Plan`.

    Raises:
        InvalidArgumentError: a bad argument (naming it), or a size whose estimated memory exceeds the machine's.
    """
    prompts = as_list(prompt, "prompt")
    if prompts is None:
        raise InvalidArgumentError("prompt must be a string or a non-empty list of strings, got None")
    negatives = as_list(negative_prompt, "negative_prompt")
    if negatives is not None and len(negatives) not in (1, len(prompts)):
        raise InvalidArgumentError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts; "
                                   f"give one, or one per prompt")
    positive_int(num_images_per_prompt, "num_images_per_prompt")
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
        layers = getattr(pipe.text_config, "num_hidden_layers", None)
        if layers is not None and clip_skip > layers:
            raise InvalidArgumentError(f"clip_skip={clip_skip} is larger than the text encoder's {layers} "
                                       f"layers")
    positive_int(vae_batch_size, "vae_batch_size")
    positive_int(unet_batch_size, "unet_batch_size", allow_none=True)
    ucfg = pipe.unet_config_parsed
    sample = ucfg.sample_size if isinstance(ucfg.sample_size, int) else 64
    default_px = int(sample or 64) * pipe.vae_scale_factor
    height = default_px if height is None else height
    width = default_px if width is None else width
    validate_size(height, width, pipe.vae_scale_factor)
    seed = validate_seed(seed)
    sched_name = scheduler if scheduler is not None else pipe.scheduler_config.get("_class_name", "PNDMScheduler")
    sched = get_scheduler(sched_name, pipe.scheduler_config, **({"eta": eta} if eta else {}))
    sched.set_timesteps(num_inference_steps)  # raises InvalidArgumentError for a bad count
    do_cfg = float(guidance_scale) > 1.0
    neg_list = [""] * len(prompts) if negatives is None else (negatives * len(prompts) if len(negatives) == 1
                                                               else negatives)
    if not do_cfg and any(neg_list):
        warnings.warn(f"guidance_scale={guidance_scale} <= 1 disables classifier-free guidance: the negative "
                      f"prompt is ignored", stacklevel=4)
    batch = len(prompts) * num_images_per_prompt
    h, w = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    channels = ucfg.out_channels
    if ucfg.in_channels != channels:
        raise InvalidArgumentError(f"{pipe.folder}: the U-Net takes {ucfg.in_channels} input channels "
                                   f"(an inpainting model?); txt2img needs a plain text-to-image checkpoint")
    if latents is not None:
        latents = float_array(latents, "latents", (batch, h, w, channels),
                              layout=f"(B, h, w, C) for {batch} images of {width}x{height}", dtype=mx.float32)
    unet_batch = batch if unet_batch_size is None else min(int(unet_batch_size), batch)
    pipe._check_memory(height, width, images_at_once=unet_batch, guidance=do_cfg,
                       vae_batch_size=min(vae_batch_size, batch), release_models=release_models)
    seeds = image_seeds(seed, batch)
    sampler_name = getattr(sched, "display_name", type(sched).__name__)
    params = [GenerationParameters(prompt=prompts[k // num_images_per_prompt],
                                   negative_prompt=neg_list[k // num_images_per_prompt] if do_cfg else "",
                                   steps=int(num_inference_steps), sampler=sampler_name,
                                   cfg_scale=float(guidance_scale), seed=seeds[k], width=width, height=height,
                                   model=pipe.model_name) for k in range(batch)]
    return Plan(prompts=prompts, negatives=neg_list, do_cfg=do_cfg, guidance_scale=float(guidance_scale),
                height=height, width=width, latent_shape=(h, w, channels),
                num_images_per_prompt=num_images_per_prompt, batch=batch, seeds=seeds, scheduler=sched,
                params=params, latents=latents, long_prompt=long_prompt, clip_skip=clip_skip,
                unet_batch=unet_batch)
