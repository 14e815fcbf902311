"""Latent consistency model sampling (Luo et al. 2023), following diffusers' ``LCMScheduler``."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np

from ..arrays import float_array
from .base import Scheduler, f32, fl

_SIGMA_DATA = 0.5


class LCMScheduler(Scheduler):
    """Multistep consistency sampling: predict x0 with the boundary-condition scalings, re-noise to the next step.

    Config fields read: the training schedule, ``prediction_type`` (epsilon, v_prediction, sample),
    ``rescale_betas_zero_snr``, ``clip_sample``, ``clip_sample_range``, ``set_alpha_to_one``,
    ``original_inference_steps`` (the distillation schedule; ``num_inference_steps`` may not exceed it) and
    ``timestep_scaling``. ``timestep_spacing`` and ``steps_offset`` do not affect LCM (as in diffusers).
    ``timesteps`` are int64 (a subset of ``k * j - 1``, ``k = num_train_timesteps // original_inference_steps``);
    ``init_noise_sigma`` is 1. :meth:`step` needs ``noise`` (used at every step but the last).
    """

    diffusers_class = "LCMScheduler"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.final_alpha_cumprod = f32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def _check_config(self) -> None:
        c = self.config
        if not 1 <= c.original_inference_steps <= c.num_train_timesteps:
            raise self._fail("original_inference_steps", f"must be between 1 and num_train_timesteps "
                                                         f"({c.num_train_timesteps})")

    @property
    def display_name(self) -> str:
        """``"LCM"``."""
        return "LCM"

    @property
    def needs_noise(self) -> bool:
        """Always true (the last step ignores it)."""
        return True

    def max_inference_steps(self) -> int:
        """``original_inference_steps`` (diffusers refuses more)."""
        return self.config.original_inference_steps

    def _compute_schedule(self, n: int) -> tuple[np.ndarray, None]:
        c = self.config
        k = c.num_train_timesteps // c.original_inference_steps
        origin = (np.arange(1, c.original_inference_steps + 1) * k - 1)[::-1]
        idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        return origin[idx].astype(np.int64), None

    def add_noise(self, original_samples: mx.array, noise: mx.array,
                  timesteps: int | float | Sequence[int | float] | np.ndarray) -> mx.array:
        """``sqrt(abar_t) x + sqrt(1 - abar_t) noise`` (diffusers' ``add_noise``)."""
        original_samples = float_array(original_samples, "original_samples")
        noise = float_array(noise, "noise", tuple(original_samples.shape))
        return self._add_noise_alphas(original_samples, noise, timesteps)

    def _step(self, model_output: mx.array, i: int, sample: mx.array, noise: mx.array | None) -> mx.array:
        c = self.config
        t = int(self.timesteps[i])
        last = i == len(self.timesteps) - 1
        prev_t = t if last else int(self.timesteps[i + 1])
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t, b_prev = f32(1.0) - a_t, f32(1.0) - a_prev
        scaled = f32(t) * f32(c.timestep_scaling)
        c_skip = f32(_SIGMA_DATA ** 2) / (scaled * scaled + f32(_SIGMA_DATA ** 2))
        c_out = scaled / np.sqrt(scaled * scaled + f32(_SIGMA_DATA ** 2))
        if c.prediction_type == "epsilon":
            x0 = (sample - fl(np.sqrt(b_t)) * model_output) / fl(np.sqrt(a_t))
        elif c.prediction_type == "sample":
            x0 = model_output
        else:
            x0 = fl(np.sqrt(a_t)) * sample - fl(np.sqrt(b_t)) * model_output
        if c.clip_sample:
            x0 = mx.clip(x0, -c.clip_sample_range, c.clip_sample_range)
        denoised = fl(c_out) * x0 + fl(c_skip) * sample
        self.pred_original_sample = denoised
        if last:
            return denoised
        return fl(np.sqrt(a_prev)) * denoised + fl(np.sqrt(b_prev)) * noise
