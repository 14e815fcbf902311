"""Linear multistep sampler (k-diffusion LMS, order 4), following diffusers' ``LMSDiscreteScheduler``."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .base import SigmaScheduler, fl, karras_sigmas, sigma_to_t

_ORDER = 4


def lms_coefficient(sigmas: np.ndarray, i: int, order: int, j: int) -> float:
    """Integral over ``[sigmas[i], sigmas[i+1]]`` of the Lagrange basis polynomial of node ``sigmas[i - j]`` on the
    nodes ``sigmas[i], ..., sigmas[i - order + 1]``.

    Computed exactly (expanded polynomial, antiderivative by Horner's rule, float64); diffusers integrates the same
    polynomial numerically with ``scipy.integrate.quad``, which is exact for these degrees up to rounding.
    """
    nodes = [float(sigmas[i - k]) for k in range(order)]
    coeffs = [1.0]  # polynomial coefficients, lowest degree first
    denom = 1.0
    for k in range(order):
        if k == j:
            continue
        root = nodes[k]
        denom *= nodes[j] - root
        shifted = [0.0] + coeffs
        for d in range(len(coeffs)):
            shifted[d] -= root * coeffs[d]
        coeffs = shifted

    def antiderivative(x: float) -> float:
        acc = 0.0
        for d in range(len(coeffs) - 1, -1, -1):
            acc = acc * x + coeffs[d] / (d + 1)
        return acc * x

    return (antiderivative(float(sigmas[i + 1])) - antiderivative(float(sigmas[i]))) / denom


class LMSDiscreteScheduler(SigmaScheduler):
    """Adams-Bashforth style multistep on the sigma ODE with up to 4 past derivatives; A1111 "LMS [Karras]".

    Config fields read: the training schedule, ``prediction_type`` (epsilon, v_prediction, sample),
    ``timestep_spacing``, ``steps_offset``, ``use_karras_sigmas``. ``timesteps`` float32, ``sigmas`` float32 ending
    with 0.
    """

    diffusers_class = "LMSDiscreteScheduler"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._reset_state()

    @property
    def display_name(self) -> str:
        """``"LMS"`` or ``"LMS Karras"``."""
        return "LMS Karras" if self.config.use_karras_sigmas else "LMS"

    def _reset_state(self) -> None:
        self._derivatives: list[mx.array] = []

    def _compute_schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        timesteps = self._sigma_timesteps(n)
        sigmas, log_sigmas = self._interp_sigmas(timesteps)
        if self.config.use_karras_sigmas:
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
            timesteps = sigma_to_t(sigmas, log_sigmas)
        return timesteps.astype(np.float32), np.concatenate([sigmas, [0.0]]).astype(np.float32)

    def _step(self, model_output: mx.array, i: int, sample: mx.array, noise: mx.array | None) -> mx.array:
        sigma = self.sigmas[i]
        pred = self._predict_original(model_output, sigma, sample)
        self.pred_original_sample = pred
        self._derivatives.append((sample - pred) / fl(sigma))
        if len(self._derivatives) > _ORDER:
            self._derivatives.pop(0)
        order = min(i + 1, _ORDER)
        coeffs = [lms_coefficient(self.sigmas, i, order, j) for j in range(order)]
        acc = None
        for coeff, d in zip(coeffs, reversed(self._derivatives)):
            acc = coeff * d if acc is None else acc + coeff * d
        return sample + acc
