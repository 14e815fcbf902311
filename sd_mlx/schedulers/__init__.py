"""Diffusion schedulers matching diffusers, and the names users pick them by.

``get_scheduler(name, config, **overrides)`` accepts a diffusers class name (``"EulerDiscreteScheduler"``, the
config used as is) or an AUTOMATIC1111-style sampler name (``"euler"``, ``"euler_a"``, ``"dpmpp_2m_karras"``...,
case-insensitive; spaces, ``-`` and ``++`` as in "DPM++ 2M Karras" are accepted too), which also fixes the options
that define that sampler (e.g. ``use_karras_sigmas``). The checkpoint's training parameters always come from
``config``; see :mod:`sd_mlx.schedulers.config` for how fields are filled and ignored.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from ..errors import ConfigError, InvalidArgumentError
from .base import Scheduler, SigmaScheduler
from .config import DIFFUSERS_DEFAULTS, SchedulerConfig
from .ddim import DDIMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .lcm import LCMScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler

#: diffusers class name -> sd_mlx class
SCHEDULER_CLASSES: dict[str, type[Scheduler]] = {
    cls.diffusers_class: cls
    for cls in (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DDIMScheduler, DPMSolverMultistepScheduler,
                PNDMScheduler, LCMScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler)
}

_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}

#: short (A1111-style) name -> (class, config overrides that define the sampler)
_NAMED: dict[str, tuple[type[Scheduler], dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {"use_karras_sigmas": False}),
    "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {**_DPMPP, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {**_DPMPP, "use_karras_sigmas": True}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {**_DPMPP_SDE, "use_karras_sigmas": False}),
    "dpmpp_2m_sde_karras": (DPMSolverMultistepScheduler, {**_DPMPP_SDE, "use_karras_sigmas": True}),
    "pndm": (PNDMScheduler, {}),
    "plms": (PNDMScheduler, {"skip_prk_steps": True}),
    "lcm": (LCMScheduler, {}),
    "heun": (HeunDiscreteScheduler, {"use_karras_sigmas": False}),
    "heun_karras": (HeunDiscreteScheduler, {"use_karras_sigmas": True}),
    "lms": (LMSDiscreteScheduler, {"use_karras_sigmas": False}),
    "lms_karras": (LMSDiscreteScheduler, {"use_karras_sigmas": True}),
}

#: the short names :func:`get_scheduler` accepts (diffusers class names are accepted too)
SCHEDULER_NAMES: tuple[str, ...] = tuple(_NAMED)


def _normalise(name: str) -> str:
    s = name.strip().lower().replace("++", "pp").replace("+", "p")
    return re.sub(r"[\s\-]+", "_", s)


def get_scheduler(name: str, config: SchedulerConfig | Mapping[str, Any] | None = None,
                  **overrides: Any) -> Scheduler:
    """Build the scheduler called ``name`` with the checkpoint's ``config``.

    Args:
        name: a short name from :data:`SCHEDULER_NAMES` (or its A1111 spelling, e.g. ``"Euler a"``,
            ``"DPM++ 2M Karras"``), or a diffusers class name from :data:`SCHEDULER_CLASSES`.
        config: the checkpoint's scheduler config (``SchedulerConfig`` or the ``scheduler_config.json`` dict);
            None uses the class defaults.
        **overrides: config fields to change (e.g. ``timestep_spacing="trailing"``), applied after the name's own
            settings; ``eta=`` is DDIM's eta (``0`` is accepted and ignored by the other schedulers).

    Returns:
        A fresh scheduler; call ``set_timesteps`` before use.

    Raises:
        InvalidArgumentError: unknown name (the message lists the valid ones), an unknown option, a non-zero
            ``eta`` for a scheduler other than DDIM, or an option value of the wrong type.
        ConfigError: the config (or an override) holds a value the scheduler does not support.
    """
    if not isinstance(name, str):
        raise InvalidArgumentError(f"scheduler name must be a string, got {name!r}")
    if name in SCHEDULER_CLASSES:
        cls, implied = SCHEDULER_CLASSES[name], {}
    else:
        key = _normalise(name)
        if key not in _NAMED:
            raise InvalidArgumentError(
                f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULER_NAMES)} "
                f"(or a diffusers class: {', '.join(SCHEDULER_CLASSES)})")
        cls, implied = _NAMED[key]
    eta = overrides.pop("eta", None)
    kwargs: dict[str, Any] = {}
    if eta is not None:
        if cls is DDIMScheduler:
            kwargs["eta"] = eta
        elif eta != 0:
            raise InvalidArgumentError(f"eta applies to DDIM only, not to {name!r}")
    if config is None:
        cfg = SchedulerConfig()
    elif isinstance(config, SchedulerConfig):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = SchedulerConfig.from_dict(config)
    else:
        raise InvalidArgumentError(f"scheduler config must be a SchedulerConfig or a dict, got "
                                   f"{type(config).__name__}")
    known = {f for f in SchedulerConfig.__dataclass_fields__} - {"source", "class_name"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InvalidArgumentError(f"unknown scheduler option(s) {', '.join(unknown)}; known options: "
                                   f"{', '.join(sorted(known))}, eta")
    try:
        cfg = cfg.replace(**{**implied, **overrides})
    except ConfigError as e:
        raise InvalidArgumentError(str(e)) from None
    return cls(cfg, **kwargs)


__all__ = [
    "DIFFUSERS_DEFAULTS", "SCHEDULER_CLASSES", "SCHEDULER_NAMES", "DDIMScheduler", "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler", "LCMScheduler",
    "LMSDiscreteScheduler", "PNDMScheduler", "Scheduler", "SchedulerConfig", "SigmaScheduler", "get_scheduler",
]
