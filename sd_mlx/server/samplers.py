"""AUTOMATIC1111 sampler and scheduler names <-> sd_mlx schedulers.

A1111 names a sampler (``"Euler a"``, ``"DPM++ 2M"``) and, since version 1.9, a noise schedule separately
(``scheduler``: ``"Automatic"``, ``"Karras"``...); older clients send the combined name (``"DPM++ 2M Karras"``).
Both forms are accepted. The names listed are the ``display_name`` of each sd_mlx scheduler, which is what the
pipeline writes into the PNG ``parameters`` chunk, so a listed name, the infotext and ``png-info`` agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from ..errors import InvalidArgumentError

#: A1111's aliases (its ``k_`` names) of the samplers it shares with sd_mlx, by sd_mlx short name
_A1111_ALIASES: dict[str, tuple[str, ...]] = {
    "euler": ("k_euler",), "euler_a": ("k_euler_a", "k_euler_ancestral"), "lms": ("k_lms",),
    "lms_karras": ("k_lms_ka",), "heun": ("k_heun",), "dpmpp_2m": ("k_dpmpp_2m",),
    "dpmpp_2m_karras": ("k_dpmpp_2m_ka",), "dpmpp_2m_sde": ("k_dpmpp_2m_sde",),
    "dpmpp_2m_sde_karras": ("k_dpmpp_2m_sde_ka",), "ddim": ("ddim",), "plms": ("plms",), "lcm": ("k_lcm",),
}

#: A1111 schedule names sd_mlx can honour: ``automatic`` (the sampler's own) and ``karras``
SCHEDULES: tuple[dict, ...] = (
    {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0, "need_inner_model": False},
    {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
)

DEFAULT_SAMPLER = "Euler"
"""A1111's sampler when a request names none."""


@dataclass(frozen=True)
class SamplerInfo:
    """One sampler as ``GET /sdapi/v1/samplers`` lists it.

    Attributes:
        name: the A1111 spelling (``display_name`` of the scheduler, e.g. ``"DPM++ 2M Karras"``).
        short: sd_mlx's short name (``"dpmpp_2m_karras"``), accepted by :func:`sd_mlx.schedulers.get_scheduler`.
        aliases: other accepted names.
        options: A1111's sampler options (``{"scheduler": "karras"}`` for Karras variants).
    """

    name: str
    short: str
    aliases: tuple[str, ...]
    options: dict

    def as_json(self) -> dict:
        """The A1111 ``SamplerItem``: ``{"name", "aliases", "options"}``."""
        return {"name": self.name, "aliases": list(self.aliases), "options": dict(self.options)}


@lru_cache(maxsize=1)
def samplers() -> tuple[SamplerInfo, ...]:
    """Every sampler sd_mlx offers, in :data:`sd_mlx.schedulers.SCHEDULER_NAMES` order (schedules computed in
    numpy: no MLX work)."""
    from ..schedulers import SCHEDULER_NAMES, get_scheduler

    out = []
    for short in SCHEDULER_NAMES:
        name = get_scheduler(short).display_name
        options = {"scheduler": "karras"} if short.endswith("_karras") else {}
        out.append(SamplerInfo(name=name, short=short, aliases=(short, *_A1111_ALIASES.get(short, ())),
                               options=options))
    return tuple(out)


def resolve_sampler(sampler_name: str | None, schedule: str | None = None) -> SamplerInfo:
    """The sampler a request asks for: ``sampler_name`` (A1111 name, alias, or sd_mlx short name; ``None``:
    :data:`DEFAULT_SAMPLER`) with the A1111 ``scheduler`` field (``None``/``"Automatic"`` or ``"Karras"``).

    Raises:
        InvalidArgumentError: unknown sampler (the message is :func:`sd_mlx.schedulers.get_scheduler`'s, as the
            CLI prints it), an unsupported schedule, or Karras sigmas for a sampler without them.
    """
    from ..schedulers import get_scheduler

    name = DEFAULT_SAMPLER if sampler_name in (None, "") else sampler_name
    if not isinstance(name, str):
        raise InvalidArgumentError(f"sampler_name must be a string, got {name!r}")
    table = samplers()
    found = _find(table, name)
    if found is None:
        # a diffusers class name (its config used as is, as the CLI does); anything else raises the CLI's message
        found = SamplerInfo(name=get_scheduler(name).display_name, short=name, aliases=(), options={})
    key = (schedule or "automatic").strip().lower()
    if key == "automatic":
        return found
    if key != "karras":
        raise InvalidArgumentError(f"scheduler {schedule!r} is not supported; use one of "
                                   f"{', '.join(s['label'] for s in SCHEDULES)}")
    if found.short.endswith("_karras"):
        return found
    karras = next((s for s in table if s.short == f"{found.short}_karras"), None)
    if karras is None:
        raise InvalidArgumentError(f"sampler {found.name!r} has no Karras variant; use scheduler \"Automatic\" or "
                                   f"one of {', '.join(s.name for s in table if s.short.endswith('_karras'))}")
    return karras


def _find(table: tuple[SamplerInfo, ...], name: str) -> SamplerInfo | None:
    low = name.strip().lower()
    key = re.sub(r"[\s\-]+", "_", low.replace("++", "pp").replace("+", "p"))
    for s in table:
        if low == s.name.lower() or low in (a.lower() for a in s.aliases) or key == s.short:
            return s
    return None
