"""DDIM (Song et al. 2020), following diffusers' ``DDIMScheduler``."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import mlx.core as mx
import numpy as np

from ..arrays import float_array
from ..errors import InvalidArgumentError
from .base import Scheduler, SchedulerConfig, f32, fl, spaced_timesteps


class DDIMScheduler(Scheduler):
    """Denoising diffusion implicit models; ``eta = 0`` is deterministic, ``eta > 0`` adds noise.

    Config fields read: the training schedule, ``prediction_type`` (epsilon, v_prediction, sample),
    ``timestep_spacing``, ``steps_offset``, ``rescale_betas_zero_snr``, ``clip_sample``, ``clip_sample_range``,
    ``set_alpha_to_one``. ``timesteps`` are int64; the previous timestep is ``t - num_train_timesteps // n``
    (diffusers' rule, whatever the spacing). ``init_noise_sigma`` is 1.

    Args:
        config, **overrides: see :class:`Scheduler`.
        eta: DDIM's eta in ``[0, 1]`` (diffusers' ``step(eta=...)``, the pipelines' ``eta`` argument); when > 0,
            :meth:`step` needs ``noise``.

    Raises:
        InvalidArgumentError: eta outside ``[0, 1]`` or not a number.
    """

    diffusers_class = "DDIMScheduler"

    def __init__(self, config: SchedulerConfig | Mapping[str, Any] | None = None, *, eta: float = 0.0,
                 **overrides: Any) -> None:
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise InvalidArgumentError(f"eta must be a number in [0, 1], got {eta!r}")
        self.eta = float(eta)
        super().__init__(config, **overrides)
        self.final_alpha_cumprod = f32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    @property
    def display_name(self) -> str:
        """``"DDIM"``."""
        return "DDIM"

    @property
    def needs_noise(self) -> bool:
        """True when ``eta > 0``."""
        return self.eta > 0

    def _compute_schedule(self, n: int) -> tuple[np.ndarray, None]:
        c = self.config
        ts = spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset, linspace_round=True,
                              dtype=np.int64)
        if ts.max() >= c.num_train_timesteps:
            raise InvalidArgumentError(
                f"num_inference_steps={n} with timestep_spacing '{c.timestep_spacing}' and steps_offset="
                f"{c.steps_offset} gives timestep {int(ts.max())}, outside the {c.num_train_timesteps} trained "
                f"timesteps; use fewer steps")
        return ts, None

    def add_noise(self, original_samples: mx.array, noise: mx.array,
                  timesteps: int | float | Sequence[int | float] | np.ndarray) -> mx.array:
        """``sqrt(abar_t) x + sqrt(1 - abar_t) noise`` (diffusers' ``add_noise``); timesteps index the training
        schedule directly."""
        original_samples = float_array(original_samples, "original_samples")
        noise = float_array(noise, "noise", tuple(original_samples.shape))
        return self._add_noise_alphas(original_samples, noise, timesteps)

    def _step(self, model_output: mx.array, i: int, sample: mx.array, noise: mx.array | None) -> mx.array:
        c = self.config
        t = int(self.timesteps[i])
        prev_t = t - c.num_train_timesteps // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = f32(1.0) - a_t
        sa, sb = np.sqrt(a_t), np.sqrt(b_t)
        if c.prediction_type == "epsilon":
            x0 = (sample - fl(sb) * model_output) / fl(sa)
            eps = model_output
        elif c.prediction_type == "sample":
            x0 = model_output
            eps = (sample - fl(sa) * x0) / fl(sb)
        else:
            x0 = fl(sa) * sample - fl(sb) * model_output
            eps = fl(sa) * model_output + fl(sb) * sample
        if c.clip_sample:
            x0 = mx.clip(x0, -c.clip_sample_range, c.clip_sample_range)
        self.pred_original_sample = x0
        variance = ((f32(1.0) - a_prev) / b_t) * (f32(1.0) - a_t / a_prev)
        std = f32(self.eta * np.sqrt(variance))
        direction = fl(np.sqrt(f32(1.0) - a_prev - std * std)) * eps
        prev = fl(np.sqrt(a_prev)) * x0 + direction
        if self.eta > 0:
            prev = prev + fl(std) * noise
        return prev
