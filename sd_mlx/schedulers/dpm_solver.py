"""DPM-Solver++ multistep (Lu et al. 2022), following diffusers' ``DPMSolverMultistepScheduler``."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np

from ..arrays import float_array
from ..errors import InvalidArgumentError
from .base import Scheduler, f32, fl, karras_sigmas, sigma_to_t, sigmas_from_alphas_cumprod

_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")


def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """(alpha_t, sigma_t) of the VP process for a k-diffusion sigma, float32."""
    alpha = f32(1.0) / np.sqrt(sigma * sigma + f32(1.0))
    return alpha, sigma * alpha


def _lambda(alpha: np.float32, sigma: np.float32) -> np.float32:
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(sigma)


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++ (2M by default; orders 1-3) and its SDE variant; A1111 "DPM++ 2M [SDE] [Karras]".

    Config fields read: the training schedule, ``prediction_type`` (epsilon, v_prediction, sample),
    ``timestep_spacing``, ``steps_offset``, ``rescale_betas_zero_snr``, ``algorithm_type`` ("dpmsolver++",
    "sde-dpmsolver++"; "deis" maps to "dpmsolver++" as in diffusers), ``solver_order`` (1, 2, 3), ``solver_type``
    ("midpoint", "heun"; "logrho"/"bh1"/"bh2" map to "midpoint"), ``lower_order_final``, ``euler_at_final``,
    ``use_karras_sigmas``, ``final_sigmas_type``, ``lambda_min_clipped``, ``variance_type`` (learned variances are
    rejected). ``timesteps`` are int64 (rounded, may repeat with Karras sigmas at high step counts); ``sigmas``
    float32 with ``len(timesteps) + 1`` entries; ``init_noise_sigma`` is 1 and the U-Net input is not scaled.
    "sde-dpmsolver++" needs ``noise`` at every :meth:`step`.
    """

    diffusers_class = "DPMSolverMultistepScheduler"
    _zero_snr_floor = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._reset_state()

    def _check_config(self) -> None:
        c = self.config
        changes = {}
        if c.algorithm_type == "deis":
            changes["algorithm_type"] = "dpmsolver++"
        if c.solver_type in ("logrho", "bh1", "bh2"):
            changes["solver_type"] = "midpoint"
        if changes:
            self.config = c = c.replace(**changes)
        if c.algorithm_type not in _ALGORITHMS:
            raise self._fail("algorithm_type", f"is not supported; use one of {', '.join(_ALGORITHMS)}")
        if c.solver_type not in ("midpoint", "heun"):
            raise self._fail("solver_type", "must be 'midpoint' or 'heun'")
        if c.solver_order not in (1, 2, 3):
            raise self._fail("solver_order", "must be 1, 2 or 3")
        if c.final_sigmas_type not in ("zero", "sigma_min"):
            raise self._fail("final_sigmas_type", "must be 'zero' or 'sigma_min'")
        if c.variance_type in ("learned", "learned_range"):
            raise self._fail("variance_type", "(learned variance) is not implemented in sd_mlx")

    @property
    def display_name(self) -> str:
        """``"DPM++ 2M"``, ``"DPM++ 2M Karras"``, ``"DPM++ 2M SDE"``, ``"DPM++ 2M SDE Karras"`` (order in the digit)."""
        c = self.config
        name = f"DPM++ {c.solver_order}M"
        if c.algorithm_type == "sde-dpmsolver++":
            name += " SDE"
        return name + (" Karras" if c.use_karras_sigmas else "")

    @property
    def needs_noise(self) -> bool:
        """True for ``algorithm_type="sde-dpmsolver++"``."""
        return self.config.algorithm_type == "sde-dpmsolver++"

    def _reset_state(self) -> None:
        self._model_outputs: list[mx.array | None] = [None] * self.config.solver_order
        self._lower_order_nums = 0

    def _compute_schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        T = c.num_train_timesteps
        ac = self.alphas_cumprod
        with np.errstate(divide="ignore"):
            lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(f32(1.0) - ac))
        last = T - int(np.searchsorted(lambdas[::-1], c.lambda_min_clipped, side="left"))
        if c.timestep_spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif c.timestep_spacing == "leading":
            ratio = last // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64)
            ts += c.steps_offset
        else:
            ts = np.arange(last, 0, -T / n).round().astype(np.int64)
            ts -= 1
        train = sigmas_from_alphas_cumprod(ac)
        log_sigmas = np.log(train)
        if c.use_karras_sigmas:
            flipped = train[::-1]
            sigmas = karras_sigmas(float(flipped[-1]), float(flipped[0]), n)
            t = sigma_to_t(sigmas, log_sigmas)
            if c.beta_schedule != "squaredcos_cap_v2":
                t = t.round()
            ts = t.astype(np.int64)
        else:
            sigmas = np.interp(ts, np.arange(0, len(train)), train)
        last_sigma = float(np.sqrt((f32(1.0) - ac[0]) / ac[0])) if c.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last_sigma]]).astype(np.float32)
        if len(ts) > 1 and np.any(np.diff(sigmas[:len(ts)]) == 0):
            raise InvalidArgumentError(
                f"num_inference_steps={n} with timestep_spacing '{c.timestep_spacing}' repeats a timestep, which "
                f"DPM-Solver cannot step over (zero step size); use fewer steps")
        return ts.copy(), sigmas

    def add_noise(self, original_samples: mx.array, noise: mx.array,
                  timesteps: int | float | Sequence[int | float] | np.ndarray) -> mx.array:
        """``alpha(t) x + sigma_t(t) noise`` with the VP ``alpha``/``sigma_t`` of the schedule's sigma at ``t``.

        Raises:
            InvalidArgumentError: ``set_timesteps`` not called, or a timestep not in :attr:`timesteps`.
        """
        original_samples = float_array(original_samples, "original_samples")
        noise = float_array(noise, "noise", tuple(original_samples.shape))
        batch = original_samples.shape[0]
        idx = [self._index_for_timestep(t) for t in self._timestep_list(timesteps, batch)]
        alpha, sig = _alpha_sigma(self.sigmas[idx])
        shape = (batch,) + (1,) * (original_samples.ndim - 1)
        dtype = original_samples.dtype
        a = mx.array(alpha.reshape(shape)).astype(dtype)
        s = mx.array(sig.reshape(shape)).astype(dtype)
        return (a * original_samples + s * noise).astype(dtype)

    def _step(self, model_output: mx.array, i: int, sample: mx.array, noise: mx.array | None) -> mx.array:
        c = self.config
        L = len(self.timesteps)
        lower_final = i == L - 1 and (c.euler_at_final or (c.lower_order_final and L < 15)
                                      or c.final_sigmas_type == "zero")
        lower_second = i == L - 2 and c.lower_order_final and L < 15

        # model output -> x0 prediction (DPM-Solver++ works on data predictions)
        alpha_s, sigma_s = _alpha_sigma(self.sigmas[i])
        if c.prediction_type == "epsilon":
            x0 = (sample - fl(sigma_s) * model_output) / fl(alpha_s)
        elif c.prediction_type == "v_prediction":
            x0 = fl(alpha_s) * sample - fl(sigma_s) * model_output
        else:
            x0 = model_output
        self.pred_original_sample = x0
        self._model_outputs = self._model_outputs[1:] + [x0]

        if c.solver_order == 1 or self._lower_order_nums < 1 or lower_final:
            prev = self._first_order(x0, i, sample, noise)
        elif c.solver_order == 2 or self._lower_order_nums < 2 or lower_second:
            prev = self._second_order(i, sample, noise)
        else:
            prev = self._third_order(i, sample, noise)
        if self._lower_order_nums < c.solver_order:
            self._lower_order_nums += 1
        return prev

    def _lambdas(self, i: int, k: int) -> tuple[np.float32, np.float32, list[np.float32]]:
        """alpha_t, sigma_t of the target sigma and [lambda_t, lambda_s0, ..., lambda_s{k-1}]."""
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        lams = [_lambda(alpha_t, sigma_t)]
        for j in range(k):
            a, s = _alpha_sigma(self.sigmas[i - j])
            lams.append(_lambda(a, s))
        return alpha_t, sigma_t, lams

    def _first_order(self, x0: mx.array, i: int, sample: mx.array, noise: mx.array | None) -> mx.array:
        alpha_t, sigma_t, (lam_t, lam_s) = self._lambdas(i, 1)
        _, sigma_s = _alpha_sigma(self.sigmas[i])
        h = lam_t - lam_s
        with np.errstate(invalid="ignore"):
            if self.config.algorithm_type == "dpmsolver++":
                return fl(sigma_t / sigma_s) * sample - fl(alpha_t * (np.exp(-h) - f32(1.0))) * x0
            e2 = np.exp(f32(-2.0) * h)
            return (fl(sigma_t / sigma_s * np.exp(-h)) * sample + fl(alpha_t * (f32(1.0) - e2)) * x0
                    + fl(sigma_t * np.sqrt(f32(1.0) - e2)) * noise)

    def _second_order(self, i: int, sample: mx.array, noise: mx.array | None) -> mx.array:
        alpha_t, sigma_t, (lam_t, lam_s0, lam_s1) = self._lambdas(i, 2)
        _, sigma_s0 = _alpha_sigma(self.sigmas[i])
        m0, m1 = self._model_outputs[-1], self._model_outputs[-2]
        h, h_0 = lam_t - lam_s0, lam_s0 - lam_s1
        r0 = h_0 / h
        d0, d1 = m0, fl(f32(1.0) / r0) * (m0 - m1)
        heun = self.config.solver_type == "heun"
        em1 = np.exp(-h) - f32(1.0)
        if self.config.algorithm_type == "dpmsolver++":
            x = fl(sigma_t / sigma_s0) * sample - fl(alpha_t * em1) * d0
            if heun:
                return x + fl(alpha_t * (em1 / h + f32(1.0))) * d1
            return x - fl(f32(0.5) * (alpha_t * em1)) * d1
        e2 = np.exp(f32(-2.0) * h)
        x = fl(sigma_t / sigma_s0 * np.exp(-h)) * sample + fl(alpha_t * (f32(1.0) - e2)) * d0
        if heun:
            x = x + fl(alpha_t * ((f32(1.0) - e2) / (f32(-2.0) * h) + f32(1.0))) * d1
        else:
            x = x + fl(f32(0.5) * (alpha_t * (f32(1.0) - e2))) * d1
        return x + fl(sigma_t * np.sqrt(f32(1.0) - e2)) * noise

    def _third_order(self, i: int, sample: mx.array, noise: mx.array | None) -> mx.array:
        alpha_t, sigma_t, (lam_t, lam_s0, lam_s1, lam_s2) = self._lambdas(i, 3)
        _, sigma_s0 = _alpha_sigma(self.sigmas[i])
        m0, m1, m2 = self._model_outputs[-1], self._model_outputs[-2], self._model_outputs[-3]
        h, h_0, h_1 = lam_t - lam_s0, lam_s0 - lam_s1, lam_s1 - lam_s2
        r0, r1 = h_0 / h, h_1 / h
        d1_0 = fl(f32(1.0) / r0) * (m0 - m1)
        d1_1 = fl(f32(1.0) / r1) * (m1 - m2)
        d1 = d1_0 + fl(r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = fl(f32(1.0) / (r0 + r1)) * (d1_0 - d1_1)
        if self.config.algorithm_type == "dpmsolver++":
            em1 = np.exp(-h) - f32(1.0)
            return (fl(sigma_t / sigma_s0) * sample - fl(alpha_t * em1) * m0
                    + fl(alpha_t * (em1 / h + f32(1.0))) * d1
                    - fl(alpha_t * ((np.exp(-h) - f32(1.0) + h) / (h * h) - f32(0.5))) * d2)
        e2 = np.exp(f32(-2.0) * h)
        two_h = f32(2.0) * h
        return (fl(sigma_t / sigma_s0 * np.exp(-h)) * sample + fl(alpha_t * (f32(1.0) - e2)) * m0
                + fl(alpha_t * ((f32(1.0) - e2) / (f32(-2.0) * h) + f32(1.0))) * d1
                + fl(alpha_t * ((f32(1.0) - e2 - two_h) / (two_h * two_h) - f32(0.5))) * d2
                + fl(sigma_t * np.sqrt(f32(1.0) - e2)) * noise)
