"""Checks of a generation request shared by the front ends (the ``txt2img`` CLI and the HTTP server).

Both front ends call :func:`check_generation` before any work starts, so a request is refused with the same
checks and the same messages whichever way it came in; only the name of the field differs (the CLI says
``--steps``, the server ``steps``: see :data:`CLI_NAMES` and :data:`API_NAMES`). The checks of single values are
the pipeline's own (:func:`sd_mlx.pipeline.validate_size`, :func:`sd_mlx.pipeline.validate_seed`,
:func:`sd_mlx.schedulers.get_scheduler` with ``set_timesteps``), so the pipeline call that follows cannot refuse
what passed here for a reason these checks know about (it still checks memory, which needs the model's configs).

A server adds :class:`Limits` (most steps, largest side, most images per request); the CLI has none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import InvalidArgumentError

#: the CLI's names of the checked options
CLI_NAMES: Mapping[str, str] = {"steps": "--steps", "num_images": "--num-images",
                                "guidance_scale": "--guidance-scale"}
#: the HTTP API's names (AUTOMATIC1111's JSON field names)
API_NAMES: Mapping[str, str] = {"steps": "steps", "num_images": "batch_size", "guidance_scale": "cfg_scale"}


@dataclass(frozen=True)
class Limits:
    """Upper bounds a server puts on a request (``None``: no bound beyond the pipeline's own).

    Attributes:
        max_steps: most denoising steps (``num_inference_steps``) of one request.
        max_side: largest width or height in pixels.
        max_images: most images of one request (all batches together).
    """

    max_steps: int | None = None
    max_side: int | None = None
    max_images: int | None = None


def _is_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


def check_generation(*, steps: Any, num_images: Any, width: Any, height: Any, seed: Any,
                     guidance_scale: Any = 7.5, scheduler: str | None = None,
                     scheduler_config: Mapping[str, Any] | None = None, vae_scale_factor: int = 8,
                     total_images: int | None = None, limits: Limits = Limits(),
                     names: Mapping[str, str] = CLI_NAMES) -> int:
    """Check the settings of one generation before anything is loaded; return the seed to use.

    Args:
        steps: denoising steps (an integer ``>= 1``; with ``scheduler_config``, also within the scheduler's
            range, e.g. at most ``num_train_timesteps``).
        num_images: images per call (an integer ``>= 1``).
        width, height: pixels, multiples of ``vae_scale_factor``, or ``None`` for the model's default size.
        seed: the first image's seed, or ``None`` for a random one (drawn here).
        guidance_scale: classifier-free guidance weight (a finite number).
        scheduler: sampler name (see :func:`sd_mlx.schedulers.get_scheduler`); ``None``: the model's own.
        scheduler_config: the model's ``scheduler_config.json`` as a dict; when given, the scheduler is built
            and its schedule computed for ``steps`` (the pipeline's own step-count checks, in numpy only).
        vae_scale_factor: pixels per latent cell (8 for SD).
        total_images: images of the whole request when it makes several calls (checked against
            ``limits.max_images``); defaults to ``num_images``.
        limits: a server's bounds (:class:`Limits`).
        names: how the front end names each option in messages (:data:`CLI_NAMES`, :data:`API_NAMES`).

    Returns:
        The seed (``seed``, or a fresh random one when ``None``).

    Raises:
        InvalidArgumentError: the first failed check, naming the option, the value and how to fix it.
    """
    from .pipeline import validate_seed, validate_size
    from .schedulers import get_scheduler

    if width is not None or height is not None:
        validate_size(height if height is not None else vae_scale_factor,
                      width if width is not None else vae_scale_factor, vae_scale_factor)
    if limits.max_side is not None:
        for name, v in (("width", width), ("height", height)):
            if v is not None and v > limits.max_side:
                raise InvalidArgumentError(f"{name}={v} is above this server's limit of {limits.max_side} "
                                           f"pixels (--max-side)")
    if not _is_int(num_images) or num_images < 1:
        raise InvalidArgumentError(f"{names['num_images']} must be >= 1, got {num_images}")
    if total_images is None:
        total_images = int(num_images)
    if limits.max_images is not None and total_images > limits.max_images:
        raise InvalidArgumentError(f"{total_images} images in one request is above this server's limit of "
                                   f"{limits.max_images} (--max-images); send several requests")
    if not _is_int(steps) or steps < 1:
        raise InvalidArgumentError(f"{names['steps']} must be >= 1, got {steps}")
    if limits.max_steps is not None and steps > limits.max_steps:
        raise InvalidArgumentError(f"{names['steps']}={steps} is above this server's limit of {limits.max_steps} "
                                   f"steps (--max-steps)")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.floating)) \
            or not math.isfinite(guidance_scale):
        raise InvalidArgumentError(f"{names['guidance_scale']} must be a finite number, got {guidance_scale!r}")
    seed = validate_seed(seed)
    if scheduler_config is not None:
        name = scheduler if scheduler is not None else scheduler_config.get("_class_name", "PNDMScheduler")
        get_scheduler(name, scheduler_config).set_timesteps(int(steps))
    return seed
