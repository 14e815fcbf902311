"""Ancestral Euler sampler ("Euler a"), following diffusers' ``EulerAncestralDiscreteScheduler``."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .base import PREDICTION_TYPES, SigmaScheduler, fl


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """Euler step down to ``sigma_down`` then fresh noise of scale ``sigma_up`` (k-diffusion ancestral sampling).

    Config fields read: the training schedule, ``prediction_type`` (epsilon or v_prediction; "sample" is not
    implemented in diffusers either), ``timestep_spacing``, ``steps_offset``, ``rescale_betas_zero_snr``.

    :meth:`step` needs ``noise`` (standard normal, shape of the sample) at every call.
    """

    diffusers_class = "EulerAncestralDiscreteScheduler"
    _prediction_types = tuple(p for p in PREDICTION_TYPES if p != "sample")

    @property
    def display_name(self) -> str:
        """``"Euler a"``."""
        return "Euler a"

    @property
    def needs_noise(self) -> bool:
        """Always true: every step adds fresh noise."""
        return True

    def _compute_schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        timesteps = self._sigma_timesteps(n)
        sigmas, _ = self._interp_sigmas(timesteps)
        return timesteps, np.concatenate([sigmas, [0.0]]).astype(np.float32)

    def _step(self, model_output: mx.array, i: int, sample: mx.array, noise: mx.array | None) -> mx.array:
        sigma, sigma_to = self.sigmas[i], self.sigmas[i + 1]
        pred = self._predict_original(model_output, sigma, sample)
        self.pred_original_sample = pred
        with np.errstate(invalid="ignore"):
            sigma_up = np.sqrt(sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma))
            sigma_down = np.sqrt(sigma_to * sigma_to - sigma_up * sigma_up)
        derivative = (sample - pred) / fl(sigma)
        prev = sample + derivative * fl(sigma_down - sigma)
        return prev + noise * fl(sigma_up)
