"""Euler sampler (Karras et al. 2022, Algorithm 2 without churn), following diffusers' ``EulerDiscreteScheduler``."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .base import SigmaScheduler, f32, fl, karras_sigmas, sigma_to_t


class EulerDiscreteScheduler(SigmaScheduler):
    """Deterministic Euler steps on the sigma (k-diffusion) parametrisation; A1111 "Euler" / "Euler Karras".

    Config fields read: the training schedule, ``prediction_type`` (epsilon, v_prediction, sample),
    ``timestep_spacing``, ``steps_offset``, ``rescale_betas_zero_snr``, ``use_karras_sigmas`` (with optional
    ``sigma_min``/``sigma_max``), ``final_sigmas_type`` ("zero" or "sigma_min"), ``interpolation_type`` ("linear"
    only) and ``timestep_type`` ("discrete" only). ``s_churn`` (stochastic Euler) is not implemented: diffusers'
    default 0 is what this reproduces.

    ``timesteps`` are float32 (fractional with Karras sigmas); ``sigmas`` has ``len(timesteps) + 1`` entries.
    """

    diffusers_class = "EulerDiscreteScheduler"

    def _check_config(self) -> None:
        c = self.config
        if c.interpolation_type != "linear":
            raise self._fail("interpolation_type", "is not supported; only 'linear' is implemented")
        if c.timestep_type != "discrete":
            raise self._fail("timestep_type", "is not supported; only 'discrete' is implemented")
        if c.final_sigmas_type not in ("zero", "sigma_min"):
            raise self._fail("final_sigmas_type", "must be 'zero' or 'sigma_min'")

    @property
    def display_name(self) -> str:
        """``"Euler"`` or ``"Euler Karras"``."""
        return "Euler Karras" if self.config.use_karras_sigmas else "Euler"

    def _compute_schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        timesteps = self._sigma_timesteps(n)
        sigmas, log_sigmas = self._interp_sigmas(timesteps)
        if self.config.use_karras_sigmas:
            lo, hi = self._karras_bounds(sigmas)
            sigmas = karras_sigmas(lo, hi, n)
            timesteps = sigma_to_t(sigmas, log_sigmas)
        if self.config.final_sigmas_type == "sigma_min":
            a0 = self.alphas_cumprod[0]
            last = float(np.sqrt((f32(1.0) - a0) / a0))
        else:
            last = 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        return timesteps.astype(np.float32), sigmas

    def _step(self, model_output: mx.array, i: int, sample: mx.array, noise: mx.array | None) -> mx.array:
        sigma = self.sigmas[i]
        pred = self._predict_original(model_output, sigma, sample)
        self.pred_original_sample = pred
        derivative = (sample - pred) / fl(sigma)
        dt = self.sigmas[i + 1] - sigma
        return sample + derivative * fl(dt)
