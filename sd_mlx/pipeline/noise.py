"""Seeds and noise: image ``k`` of a call with seed ``s`` uses seed ``s + k`` alone, so an image does not depend on
the batch it was made in; ancestral and SDE schedulers draw their per-step noise from the same seed."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx

from .checks import MAX_SEED


def image_seeds(seed: int, count: int) -> list[int]:
    """Seeds of the images of one call: image ``k`` uses ``(seed + k) mod 2**64``."""
    return [(seed + k) % (MAX_SEED + 1) for k in range(count)]


def seed_key(seed: int) -> mx.array:
    # mx.random.key takes an unsigned 64-bit seed: every seed in [0, 2**64 - 1] is its own key.
    return mx.random.key(int(seed))


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int], dtype: mx.Dtype = mx.float32) -> mx.array:
    """Standard normal initial latents, ``(len(seeds), h, w, C)``, image ``k`` drawn from ``seeds[k]`` alone, so
    an image does not depend on the batch it was made in."""
    return mx.concatenate([mx.random.normal((1, *shape), key=mx.random.split(seed_key(s), 2)[0]) for s in seeds]
                          ).astype(dtype)


class StepNoise:
    """Per-step noise for ancestral/stochastic schedulers, reproducible per image: step ``i`` of image ``k`` uses a
    key derived from ``seeds[k]`` and ``i`` only."""

    def __init__(self, seeds: Sequence[int], shape: tuple[int, int, int], num_steps: int, dtype: mx.Dtype) -> None:
        self._keys = [mx.random.split(mx.random.split(seed_key(s), 2)[1], max(num_steps, 1)) for s in seeds]
        self._shape, self._dtype = shape, dtype

    def __call__(self, i: int) -> mx.array:
        """Noise for step ``i``: ``(B, h, w, C)``."""
        return mx.concatenate([mx.random.normal((1, *self._shape), key=k[i]) for k in self._keys]).astype(self._dtype)
