"""Heun's second-order sampler (Karras et al. 2022, Algorithm 1), following diffusers' ``HeunDiscreteScheduler``."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .base import SigmaScheduler, fl, karras_sigmas, sigma_to_t


class HeunDiscreteScheduler(SigmaScheduler):
    """Euler predictor + trapezoidal corrector: two U-Net evaluations per step except the last.

    Config fields read: the training schedule, ``prediction_type`` (epsilon, v_prediction, sample),
    ``timestep_spacing``, ``steps_offset``, ``use_karras_sigmas``, ``clip_sample``, ``clip_sample_range``.
    ``n`` steps give ``2n - 1`` evaluations: ``timesteps`` (float32) and ``sigmas`` repeat every inner entry, as in
    diffusers.
    """

    diffusers_class = "HeunDiscreteScheduler"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._reset_state()

    @property
    def display_name(self) -> str:
        """``"Heun"`` or ``"Heun Karras"``."""
        return "Heun Karras" if self.config.use_karras_sigmas else "Heun"

    def _reset_state(self) -> None:
        self._prev_derivative: mx.array | None = None
        self._dt: np.float32 | None = None
        self._sample: mx.array | None = None

    def _compute_schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        timesteps = self._sigma_timesteps(n)
        sigmas, log_sigmas = self._interp_sigmas(timesteps)
        if self.config.use_karras_sigmas:
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
            timesteps = sigma_to_t(sigmas, log_sigmas)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        sigmas = np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])
        timesteps = timesteps.astype(np.float32)
        return np.concatenate([timesteps[:1], timesteps[1:].repeat(2)]), sigmas

    def _step(self, model_output: mx.array, i: int, sample: mx.array, noise: mx.array | None) -> mx.array:
        c = self.config
        first = self._dt is None
        if first:
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        else:
            sigma, sigma_next = self.sigmas[i - 1], self.sigmas[i]
        sigma_in = sigma if first else sigma_next
        pred = self._predict_original(model_output, sigma_in, sample)
        if c.clip_sample:
            pred = mx.clip(pred, -c.clip_sample_range, c.clip_sample_range)
        self.pred_original_sample = pred
        if first:
            derivative = (sample - pred) / fl(sigma)
            dt = sigma_next - sigma
            self._prev_derivative, self._dt, self._sample = derivative, dt, sample
        else:
            derivative = (self._prev_derivative + (sample - pred) / fl(sigma_next)) / 2
            dt, sample = self._dt, self._sample
            self._prev_derivative = self._dt = self._sample = None
        return sample + derivative * fl(dt)
