"""Argument checks that need no model: sizes, seeds, prompts, counts, and arrays given by the caller.

Every public entry point checks its inputs here before any weights are loaded, so a bad call fails in milliseconds
with an :class:`~sd_mlx.errors.InvalidArgumentError` that names the argument and says what is expected.
"""

from __future__ import annotations

import secrets
from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from ..errors import InvalidArgumentError, NonFiniteError

MAX_SEED = 2**64 - 1
MAX_SIDE = 16384


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


def as_list(prompt: str | Sequence[str] | None, name: str) -> list[str] | None:
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, Sequence) and len(prompt) > 0 and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise InvalidArgumentError(f"{name} must be a string or a non-empty list of strings, got {prompt!r:.80}")


def positive_int(value: Any, name: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgumentError(f"{name} must be an integer >= 1, got {value!r}")


def check_finite(x: mx.array, phase: str) -> None:
    """Raise :class:`NonFiniteError` naming ``phase`` if ``x`` holds NaN or Inf."""
    if not bool(mx.all(mx.isfinite(x)).item()):
        raise NonFiniteError(non_finite_message(phase))


def non_finite_message(phase: str) -> str:
    return (f"NaN or Inf appeared during {phase}; with float16 this is usually overflow: run with dtype float32 "
            f"(--dtype float32); no image was produced")


# ----------------------------------------------------------------------------------------------------------------
# Memory estimate
# ----------------------------------------------------------------------------------------------------------------
