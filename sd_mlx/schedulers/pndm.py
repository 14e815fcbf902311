"""Pseudo numerical methods (PNDM / PLMS, Liu et al. 2022), following diffusers' ``PNDMScheduler``."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np

from ..arrays import float_array
from ..errors import InvalidArgumentError
from .base import Scheduler, f32, fl, spaced_timesteps


class PNDMScheduler(Scheduler):
    """Linear multistep (PLMS) on the DDIM-style transfer; optional Runge-Kutta (PRK) warm-up.

    Config fields read: the training schedule, ``prediction_type`` (epsilon or v_prediction),
    ``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``, ``skip_prk_steps``.

    With ``skip_prk_steps=True`` (Stable Diffusion's setting, A1111 "PLMS") ``n`` steps take ``n + 1`` U-Net
    evaluations for ``n >= 2`` (the second timestep is evaluated twice, as in diffusers). With
    ``skip_prk_steps=False`` the first 12 evaluations are 3 pseudo Runge-Kutta steps (``n + 9`` in all, ``n >= 4``).
    ``timesteps`` are int64; ``init_noise_sigma`` is 1.
    """

    diffusers_class = "PNDMScheduler"
    _prediction_types = ("epsilon", "v_prediction")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.final_alpha_cumprod = f32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self._num_prk = 0
        self._reset_state()

    @property
    def display_name(self) -> str:
        """``"PLMS"`` (``skip_prk_steps``) or ``"PNDM"``."""
        return "PLMS" if self.config.skip_prk_steps else "PNDM"

    def _reset_state(self) -> None:
        self._ets: list[mx.array] = []
        self._counter = 0
        self._cur_sample: mx.array | None = None
        self._cur_model_output: mx.array | None = None

    def _compute_schedule(self, n: int) -> tuple[np.ndarray, None]:
        c = self.config
        T = c.num_train_timesteps
        # ascending, like diffusers' `_timesteps`
        base = spaced_timesteps(c.timestep_spacing, T, n, c.steps_offset, True, np.int64)[::-1].copy()
        if c.skip_prk_steps:
            prk = np.array([], dtype=np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        else:
            if len(base) < 4:
                raise InvalidArgumentError(f"PNDMScheduler with skip_prk_steps=false needs num_inference_steps >= 4, "
                                           f"got {n}")
            half = T // n // 2
            prk = base[-4:].repeat(2) + np.tile(np.array([0, half]), 4)
            prk = prk[:-1].repeat(2)[1:-1][::-1]
            plms = base[:-3][::-1]
        self._num_prk = len(prk)
        ts = np.concatenate([prk, plms]).astype(np.int64)
        if ts.max() >= T:
            raise InvalidArgumentError(
                f"num_inference_steps={n} with timestep_spacing '{c.timestep_spacing}' and steps_offset="
                f"{c.steps_offset} gives timestep {int(ts.max())}, outside the {T} trained timesteps; use fewer steps")
        return ts, None

    def add_noise(self, original_samples: mx.array, noise: mx.array,
                  timesteps: int | float | Sequence[int | float] | np.ndarray) -> mx.array:
        """``sqrt(abar_t) x + sqrt(1 - abar_t) noise`` (diffusers' ``add_noise``)."""
        original_samples = float_array(original_samples, "original_samples")
        noise = float_array(noise, "noise", tuple(original_samples.shape))
        return self._add_noise_alphas(original_samples, noise, timesteps)

    def _step(self, model_output: mx.array, i: int, sample: mx.array, noise: mx.array | None) -> mx.array:
        t = int(self.timesteps[i])
        if self._counter < self._num_prk:
            out = self._step_prk(model_output, t, sample)
        else:
            out = self._step_plms(model_output, t, sample)
        self._counter += 1
        return out

    def _step_prk(self, model_output: mx.array, t: int, sample: mx.array) -> mx.array:
        n = self.num_inference_steps
        k = self._counter
        prev_t = t - (0 if k % 2 else self.config.num_train_timesteps // n // 2)
        t = int(self.timesteps[k // 4 * 4])
        phase = k % 4
        if phase == 0:
            self._cur_model_output = (1 / 6) * model_output
            self._ets.append(model_output)
            self._cur_sample = sample
        elif phase in (1, 2):
            self._cur_model_output = self._cur_model_output + (1 / 3) * model_output
        else:
            model_output = self._cur_model_output + (1 / 6) * model_output
            self._cur_model_output = None
        cur = self._cur_sample if self._cur_sample is not None else sample
        return self._prev_sample(cur, t, prev_t, model_output)

    def _step_plms(self, model_output: mx.array, t: int, sample: mx.array) -> mx.array:
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        prev_t = t - ratio
        if self._counter != 1:
            self._ets = self._ets[-3:]
            self._ets.append(model_output)
        else:
            prev_t = t
            t = t + ratio
        e = self._ets
        if len(e) == 1 and self._counter == 0:
            self._cur_sample = sample
        elif len(e) == 1 and self._counter == 1:
            model_output = (model_output + e[-1]) / 2
            sample = self._cur_sample
            self._cur_sample = None
        elif len(e) == 2:
            model_output = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            model_output = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        self.pred_original_sample = None
        return self._prev_sample(sample, t, prev_t, model_output)

    def _prev_sample(self, sample: mx.array, t: int, prev_t: int, model_output: mx.array) -> mx.array:
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = f32(1.0) - a_t
        b_prev = f32(1.0) - a_prev
        if self.config.prediction_type == "v_prediction":
            model_output = fl(np.sqrt(a_t)) * model_output + fl(np.sqrt(b_t)) * sample
        sample_coeff = np.sqrt(a_prev / a_t)
        denom = a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev)
        return fl(sample_coeff) * sample - fl(a_prev - a_t) * model_output / fl(denom)
