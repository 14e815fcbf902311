"""Shared schedule maths and the common scheduler interface.

Schedule maths (betas, ``alphas_cumprod``, timestep spacing, sigma tables) is computed in numpy, reproducing
diffusers' float32/float64 arithmetic step by step (torch's float32 ``linspace`` and its float64-accumulated
``cumprod`` are emulated exactly), so timesteps are identical and sigmas agree to float32 rounding. The per-step
update runs in MLX on ``mx.array`` with Python-float coefficients computed in numpy float32 like diffusers' 0-d
float32 tensors.

Interface for an MLX sampling loop (latents ``(B, H, W, C)``; all maths is elementwise, so any layout works)::

    sched = EulerDiscreteScheduler(config)          # SchedulerConfig, a config dict, or None (class defaults)
    sched.set_timesteps(num_inference_steps)        # fills sched.timesteps (np.ndarray), sched.sigmas
    latents = noise * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):         # len(sched.timesteps) == number of U-Net evaluations
        x_in = sched.scale_model_input(latents, i)
        eps = unet(x_in, t, ...)
        latents = sched.step(eps, i, latents, noise=fresh_noise if sched.needs_noise else None)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping, Sequence

import mlx.core as mx
import numpy as np

from ..arrays import float_array
from ..errors import ConfigError, InvalidArgumentError
from .config import DIFFUSERS_DEFAULTS, SchedulerConfig

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

_F32 = np.float32


# ----------------------------------------------------------------------------------------------------------------
# Noise schedule (training betas)
# ----------------------------------------------------------------------------------------------------------------

def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` bit for bit, in numpy.

    Torch rounds ``start``, ``end`` and ``step = (end - start) / (steps - 1)`` to float32, then evaluates
    ``start + step * i`` for the first half and ``end - step * (steps - 1 - i)`` for the second with a fused
    multiply-add (one rounding); the product of two float32 values is exact in float64, so float64 arithmetic
    followed by one rounding to float32 reproduces it.

    Returns:
        float32 array of shape ``(steps,)``.
    """
    if steps == 1:
        return np.array([start], dtype=_F32)
    s, e = _F32(start), _F32(end)
    step = (e - s) / _F32(steps - 1)
    i = np.arange(steps, dtype=np.float64)
    head = np.float64(s) + np.float64(step) * i
    tail = np.float64(e) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, head, tail).astype(_F32)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of a float32 vector on CPU: accumulated in float64, each prefix rounded to float32."""
    return np.cumprod(x.astype(np.float64)).astype(_F32)


def betas_for_alpha_bar_cosine(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The ``squaredcos_cap_v2`` betas (Nichol & Dhariwal cosine schedule), float64 maths rounded to float32.

    ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)`` with ``abar(t) = cos((t + 0.008) / 1.008 * pi/2)^2``.
    """
    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return np.array([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=_F32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale float32 ``betas`` so the last step has zero SNR (Lin et al. 2023, Algorithm 1), in float32.

    Follows diffusers' ``rescale_zero_terminal_snr``: shift and scale ``sqrt(alphas_cumprod)`` so it ends at 0 and
    keeps its first value, then undo the cumulative product.
    """
    alphas = _F32(1.0) - betas
    sqrt_abar = np.sqrt(cumprod_f32(alphas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar * sqrt_abar
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (_F32(1.0) - alphas).astype(_F32)


def make_betas(config: SchedulerConfig) -> np.ndarray:
    """Training betas ``(num_train_timesteps,)`` float32 from a resolved config (as diffusers' ``__init__``).

    ``rescale_betas_zero_snr`` is applied when the config has it true (classes that do not read it have None).
    """
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=_F32)
    elif config.beta_schedule == "linear":
        betas = torch_linspace_f32(config.beta_start, config.beta_end, n)
    elif config.beta_schedule == "scaled_linear":
        betas = torch_linspace_f32(config.beta_start ** 0.5, config.beta_end ** 0.5, n) ** 2
    else:  # squaredcos_cap_v2 (validated before)
        betas = betas_for_alpha_bar_cosine(n)
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """``((1 - abar) / abar) ** 0.5`` in float32, index = training timestep (ascending noise)."""
    return np.sqrt((_F32(1.0) - alphas_cumprod) / alphas_cumprod)


# ----------------------------------------------------------------------------------------------------------------
# Timestep spacing and sigma tables
# ----------------------------------------------------------------------------------------------------------------

def spaced_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int,
                     linspace_round: bool, dtype: type) -> np.ndarray:
    """Descending inference timesteps for ``"linspace" | "leading" | "trailing"`` (diffusers' Table-2 spacings).

    ``linspace``: ``linspace(0, T-1, n)`` (rounded when ``linspace_round``, as the integer-timestep schedulers do;
    computed in float32 otherwise, as the sigma schedulers do). ``leading``: ``arange(n) * (T // n) + offset``.
    ``trailing``: ``round(arange(T, 0, -T / n)) - 1`` (numpy's float arange may yield ``n + 1`` values, as in
    diffusers). Returns an array of ``dtype``.
    """
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        if linspace_round:
            ts = np.linspace(0, T - 1, n).round()[::-1].astype(dtype)
        else:
            ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(dtype)
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(dtype)
        ts += steps_offset
    else:
        ts = np.arange(T, 0, -T / n).round().astype(dtype)
        ts -= 1
    return ts.copy()


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) sigmas ``(max^(1/rho) + ramp (min^(1/rho) - max^(1/rho)))^rho``, float64 ``(n,)``."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of ``sigmas`` by linear interpolation in log-sigma (diffusers' ``_sigma_to_t``).

    Args:
        sigmas: float64 ``(n,)``; log_sigmas: float32 ``(T,)``, ascending. Returns float64 ``(n,)``.
    """
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    dists = log_sigma[np.newaxis, :] - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return (1 - w) * low + w * high


# ----------------------------------------------------------------------------------------------------------------
# Scheduler base class
# ----------------------------------------------------------------------------------------------------------------

def _as_config(config: SchedulerConfig | Mapping[str, Any] | None) -> SchedulerConfig:
    if config is None:
        return SchedulerConfig()
    if isinstance(config, SchedulerConfig):
        return config
    if isinstance(config, Mapping):
        return SchedulerConfig.from_dict(config)
    raise InvalidArgumentError(f"scheduler config must be a SchedulerConfig or a dict, got {type(config).__name__}")


class Scheduler:
    """Common interface of the sd_mlx schedulers (one instance per generation; state lives in the instance).

    Class attributes:
        diffusers_class: name of the diffusers class whose behaviour is reproduced.

    Instance attributes (after construction):
        config: the resolved :class:`SchedulerConfig` (fields this class reads filled with its diffusers
            defaults; fields it ignores set to ``None``).
        betas, alphas_cumprod: float32 ``(num_train_timesteps,)`` training schedule.

    After :meth:`set_timesteps`:
        timesteps: ``np.ndarray`` ``(num_evaluations,)``, the value passed to the U-Net at each iteration, with
            diffusers' dtype (float32 for the sigma schedulers, int64 for the others).
        sigmas: float32 ``np.ndarray`` (diffusers' ``sigmas``, ending with the final sigma, 0 unless
            ``final_sigmas_type="sigma_min"``), or ``None`` for schedulers without sigmas (DDIM, PNDM, LCM).
        num_inference_steps: the requested step count.

    After each :meth:`step`: ``pred_original_sample``, the step's x0 prediction (``mx.array`` in float32, for
    previews; the denoised output for LCM; ``None`` for PNDM, which has none).
    """

    diffusers_class: ClassVar[str] = ""
    #: whether a zero-terminal-SNR schedule gets ``alphas_cumprod[-1] = 2**-24`` (diffusers' sigma schedulers)
    _zero_snr_floor: ClassVar[bool] = False
    #: prediction types this class implements
    _prediction_types: ClassVar[tuple[str, ...]] = PREDICTION_TYPES

    def __init__(self, config: SchedulerConfig | Mapping[str, Any] | None = None, **overrides: Any) -> None:
        """Build from a config (``SchedulerConfig``, a ``scheduler_config.json`` dict, or None for defaults).

        Args:
            config: training parameters; fields this class does not read are ignored (like diffusers'
                ``from_config``).
            **overrides: config fields to change (e.g. ``timestep_spacing="trailing"``, ``use_karras_sigmas=True``).

        Raises:
            ConfigError: a value this scheduler does not support (message names the field and the config source),
                or an unknown override name.
        """
        cfg = _as_config(config)
        if overrides:
            cfg = cfg.replace(**overrides)
        self.config = self._resolve(cfg)
        self._check_common()
        self._check_config()
        self.betas = make_betas(self.config)
        self.alphas_cumprod = cumprod_f32(_F32(1.0) - self.betas)
        if self.config.rescale_betas_zero_snr and self._zero_snr_floor:
            self.alphas_cumprod[-1] = _F32(2.0 ** -24)  # keeps the terminal sigma finite
        self.timesteps: np.ndarray | None = None
        self.sigmas: np.ndarray | None = None
        self.num_inference_steps: int | None = None
        self._next_index: int | None = None
        self.pred_original_sample: mx.array | None = None

    @classmethod
    def from_config(cls, config: SchedulerConfig | Mapping[str, Any] | None, **overrides: Any) -> "Scheduler":
        """Same as the constructor (named like diffusers' ``from_config``)."""
        return cls(config, **overrides)

    # -- config -----------------------------------------------------------------------------------------------

    @classmethod
    def _resolve(cls, cfg: SchedulerConfig) -> SchedulerConfig:
        defaults = DIFFUSERS_DEFAULTS[cls.diffusers_class]
        values = {}
        for name in cfg.given():
            if name not in defaults and name != "class_name":
                values[name] = None
        for name, default in defaults.items():
            v = getattr(cfg, name)
            values[name] = default if v is None else v
        return cfg.replace(**values)

    def _fail(self, field: str, message: str) -> ConfigError:
        return ConfigError(f"{self.config.source}: {field} = {getattr(self.config, field)!r} {message} "
                           f"({type(self).__name__})")

    def _check_common(self) -> None:
        c = self.config
        if c.num_train_timesteps < 2:
            raise self._fail("num_train_timesteps", "must be at least 2")
        if c.trained_betas is not None:
            if len(c.trained_betas) != c.num_train_timesteps:
                raise ConfigError(f"{c.source}: trained_betas has {len(c.trained_betas)} values but "
                                  f"num_train_timesteps is {c.num_train_timesteps}")
        elif c.beta_schedule not in BETA_SCHEDULES:
            raise self._fail("beta_schedule", f"is not supported; use one of {', '.join(BETA_SCHEDULES)}")
        if c.prediction_type not in self._prediction_types:
            raise self._fail("prediction_type", f"is not supported; use one of {', '.join(self._prediction_types)}")
        if c.timestep_spacing is not None and c.timestep_spacing not in TIMESTEP_SPACINGS:
            raise self._fail("timestep_spacing", f"is not supported; use one of {', '.join(TIMESTEP_SPACINGS)}")
        if c.steps_offset is not None and c.steps_offset < 0:
            raise self._fail("steps_offset", "must be >= 0")
        for name in ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                     "use_flow_sigmas", "use_dynamic_shifting"):
            if getattr(c, name):
                raise self._fail(name, "is not implemented in sd_mlx; set it to false or use diffusers")
        if c.clip_sample_range is not None and c.clip_sample_range <= 0:
            raise self._fail("clip_sample_range", "must be > 0")

    def _check_config(self) -> None:
        """Class-specific support checks (raise ConfigError via :meth:`_fail`)."""

    # -- public interface -------------------------------------------------------------------------------------

    @property
    def display_name(self) -> str:
        """Sampler name for PNG metadata, as AUTOMATIC1111 writes it (e.g. ``"Euler a"``, ``"DPM++ 2M Karras"``)."""
        raise NotImplementedError

    @property
    def needs_noise(self) -> bool:
        """Whether :meth:`step` uses fresh noise (then every ``step`` call needs ``noise``)."""
        return False

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial latent noise (valid after :meth:`set_timesteps`)."""
        return 1.0

    def max_inference_steps(self) -> int:
        """Largest ``num_inference_steps`` :meth:`set_timesteps` accepts before schedule-specific checks."""
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Compute the inference schedule and reset all per-generation state.

        Args:
            num_inference_steps: int ``>= 1`` and ``<= max_inference_steps()`` (num_train_timesteps, or
                ``original_inference_steps`` for LCM).

        Raises:
            InvalidArgumentError: invalid step count (checked before anything changes), or a count for which
                diffusers' schedule is degenerate (e.g. a timestep outside the trained range).
        """
        n = self._check_steps(num_inference_steps)
        timesteps, sigmas = self._compute_schedule(n)
        self.num_inference_steps = n
        self.timesteps = timesteps
        self.sigmas = sigmas
        self._next_index = None
        self.pred_original_sample = None
        self._reset_state()

    def scale_model_input(self, sample: mx.array, i: int) -> mx.array:
        """The U-Net input for iteration ``i`` (identity unless the scheduler scales it).

        Args:
            sample: latents ``(B, H, W, C)`` (any layout), any float dtype; returned in the same dtype.
            i: iteration index into :attr:`timesteps`.
        """
        sample = float_array(sample, "sample")
        self._check_index(i)
        return sample

    def step(self, model_output: mx.array, i: int, sample: mx.array, noise: mx.array | None = None) -> mx.array:
        """One denoising update: the latents for iteration ``i + 1`` from the model output at iteration ``i``.

        Args:
            model_output: U-Net output (after guidance) for ``scale_model_input(sample, i)``, shape of ``sample``.
            i: iteration index into :attr:`timesteps`; calls must be consecutive (the first may start anywhere,
                e.g. img2img).
            sample: current latents ``(B, H, W, C)``.
            noise: standard-normal array with the shape of ``sample``; required when :attr:`needs_noise`.

        Returns:
            New latents, same shape and dtype as ``sample`` (computed in float32).

        Raises:
            InvalidArgumentError: ``set_timesteps`` not called, ``i`` out of range or not consecutive, shape
                mismatch, or ``noise`` missing when needed.
        """
        model_output = float_array(model_output, "model_output")
        sample = float_array(sample, "sample")
        noise = None if noise is None else float_array(noise, "noise")
        self._check_index(i)
        if self._next_index is not None and i != self._next_index:
            raise InvalidArgumentError(f"{type(self).__name__}.step: expected iteration {self._next_index}, got {i}; "
                                       f"steps must be consecutive (call set_timesteps to start again)")
        if tuple(model_output.shape) != tuple(sample.shape):
            raise InvalidArgumentError(f"{type(self).__name__}.step: model_output shape {tuple(model_output.shape)} "
                                       f"differs from sample shape {tuple(sample.shape)}")
        if self.needs_noise:
            if noise is None:
                raise InvalidArgumentError(f"{type(self).__name__}.step needs `noise` (standard normal, shape "
                                           f"{tuple(sample.shape)}) because the scheduler is stochastic")
            if tuple(noise.shape) != tuple(sample.shape):
                raise InvalidArgumentError(f"{type(self).__name__}.step: noise shape {tuple(noise.shape)} differs "
                                           f"from sample shape {tuple(sample.shape)}")
            noise = noise.astype(mx.float32)
        # scalar maths follows IEEE like torch (e.g. h = 0 on a repeated final sigma gives 1/inf = 0): no warnings
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            out = self._step(model_output.astype(mx.float32), i, sample.astype(mx.float32), noise)
        self._next_index = i + 1
        return out.astype(sample.dtype)

    def add_noise(self, original_samples: mx.array, noise: mx.array,
                  timesteps: int | float | Sequence[int | float] | np.ndarray) -> mx.array:
        """Noise clean latents to the level of ``timesteps`` (img2img), like diffusers' ``add_noise``.

        Args:
            original_samples: clean latents ``(B, H, W, C)``; noise: same shape, standard normal.
            timesteps: one timestep value (for all items) or one per batch item, as in :attr:`timesteps`.

        Returns:
            Noisy latents in ``original_samples``' dtype.
        """
        original_samples = float_array(original_samples, "original_samples")
        noise = float_array(noise, "noise", tuple(original_samples.shape))
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        """Clear multistep history (called by set_timesteps)."""

    def _compute_schedule(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def _step(self, model_output: mx.array, i: int, sample: mx.array, noise: mx.array | None) -> mx.array:
        raise NotImplementedError

    def _check_steps(self, num_inference_steps: Any) -> int:
        name = type(self).__name__
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise InvalidArgumentError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
        n = int(num_inference_steps)
        hi = self.max_inference_steps()
        if n < 1 or n > hi:
            raise InvalidArgumentError(f"num_inference_steps must be between 1 and {hi} for {name}, got {n}")
        return n

    def _check_index(self, i: Any) -> int:
        if self.timesteps is None:
            raise InvalidArgumentError(f"{type(self).__name__}: call set_timesteps before stepping")
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < len(self.timesteps):
            raise InvalidArgumentError(f"{type(self).__name__}: iteration index must be an int in "
                                       f"[0, {len(self.timesteps)}), got {i!r}")
        return int(i)

    def _timestep_list(self, timesteps: Any, batch: int) -> list:
        arr = np.atleast_1d(np.asarray(timesteps))
        if arr.ndim != 1 or (len(arr) != 1 and len(arr) != batch):
            raise InvalidArgumentError(f"add_noise: expected one timestep or {batch}, got shape {arr.shape}")
        return list(arr) * (batch if len(arr) == 1 else 1)

    def _index_for_timestep(self, t: Any) -> int:
        """Index of ``t`` in :attr:`timesteps` (the second match if it occurs twice, as diffusers does)."""
        if self.timesteps is None:
            raise InvalidArgumentError(f"{type(self).__name__}: call set_timesteps before add_noise")
        idx = np.nonzero(self.timesteps == t)[0]
        if len(idx) == 0:
            raise InvalidArgumentError(f"add_noise: timestep {t!r} is not in the schedule {type(self).__name__} "
                                       f"set ({len(self.timesteps)} steps)")
        return int(idx[1] if len(idx) > 1 else idx[0])

    def _add_noise_alphas(self, original_samples: mx.array, noise: mx.array, timesteps: Any) -> mx.array:
        """``sqrt(abar_t) x + sqrt(1 - abar_t) noise`` (DDIM/PNDM/LCM flavour, timesteps index alphas_cumprod)."""
        batch = original_samples.shape[0]
        ts = np.asarray(self._timestep_list(timesteps, batch)).astype(np.int64)
        if ts.min() < 0 or ts.max() >= self.config.num_train_timesteps:
            raise InvalidArgumentError(f"add_noise: timesteps must be in [0, {self.config.num_train_timesteps})")
        abar = self.alphas_cumprod[ts]
        a = np.sqrt(abar).reshape((batch,) + (1,) * (original_samples.ndim - 1))
        s = np.sqrt(_F32(1.0) - abar).reshape(a.shape)
        dtype = original_samples.dtype
        return (mx.array(a).astype(dtype) * original_samples + mx.array(s).astype(dtype) * noise).astype(dtype)

    def __repr__(self) -> str:
        steps = "" if self.timesteps is None else f", steps={self.num_inference_steps}"
        return f"{type(self).__name__}({self.display_name!r}{steps})"


def f32(x: Any) -> np.float32:
    """Round to a numpy float32 scalar (the dtype of diffusers' 0-d schedule tensors)."""
    return _F32(x)


def fl(x: Any) -> float:
    """A Python float of a numpy scalar, for MLX scalar arithmetic (keeps the array's dtype)."""
    return float(x)


class SigmaScheduler(Scheduler):
    """Base of the k-diffusion style schedulers (Euler, Euler a, Heun, LMS): ``x = x0 + sigma * noise``.

    The U-Net input is ``sample / sqrt(sigma_i^2 + 1)``; the initial noise is scaled by the largest sigma (or
    ``sqrt(max^2 + 1)`` for "leading" spacing), as in diffusers.
    """

    _zero_snr_floor = True

    @property
    def init_noise_sigma(self) -> float:
        """``max(sigmas)`` (``"linspace"``/``"trailing"``) or ``sqrt(max(sigmas)^2 + 1)`` (``"leading"``), float32."""
        if self.sigmas is None:
            raise InvalidArgumentError(f"{type(self).__name__}: call set_timesteps before init_noise_sigma")
        top = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(top)
        return float(np.sqrt(top * top + _F32(1.0)))

    def scale_model_input(self, sample: mx.array, i: int) -> mx.array:
        """``sample / sqrt(sigmas[i]^2 + 1)`` in ``sample``'s dtype (diffusers' ``scale_model_input``)."""
        sample = float_array(sample, "sample")
        i = self._check_index(i)
        sigma = self.sigmas[i]
        return sample / float(np.sqrt(sigma * sigma + _F32(1.0)))

    def add_noise(self, original_samples: mx.array, noise: mx.array,
                  timesteps: int | float | Sequence[int | float] | np.ndarray) -> mx.array:
        """``x + noise * sigma(t)`` with ``sigma(t)`` looked up in the current schedule (diffusers' ``add_noise``).

        Raises:
            InvalidArgumentError: ``set_timesteps`` not called, or a timestep that is not in :attr:`timesteps`.
        """
        original_samples = float_array(original_samples, "original_samples")
        noise = float_array(noise, "noise", tuple(original_samples.shape))
        batch = original_samples.shape[0]
        idx = [self._index_for_timestep(t) for t in self._timestep_list(timesteps, batch)]
        sig = self.sigmas[idx].reshape((batch,) + (1,) * (original_samples.ndim - 1))
        dtype = original_samples.dtype
        return (original_samples + noise * mx.array(sig).astype(dtype)).astype(dtype)

    def _predict_original(self, model_output: mx.array, sigma: np.float32, sample: mx.array) -> mx.array:
        """The x0 prediction at noise level ``sigma`` for the config's ``prediction_type``: epsilon
        ``x - sigma * eps``, v ``v * -sigma / sqrt(sigma^2 + 1) + x / (sigma^2 + 1)``, sample as is (diffusers'
        k-diffusion schedulers)."""
        if self.config.prediction_type == "epsilon":
            return sample - fl(sigma) * model_output
        if self.config.prediction_type == "v_prediction":
            s2p1 = sigma * sigma + f32(1.0)
            return model_output * fl(-sigma / np.sqrt(s2p1)) + sample / fl(s2p1)
        return model_output

    def _interp_sigmas(self, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float64 sigmas interpolated at ``timesteps``, float32 log of the training sigmas)."""
        train = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        return np.interp(timesteps, np.arange(0, len(train)), train), np.log(train)

    def _karras_bounds(self, sigmas: np.ndarray) -> tuple[float, float]:
        lo = self.config.sigma_min if self.config.sigma_min is not None else float(sigmas[-1])
        hi = self.config.sigma_max if self.config.sigma_max is not None else float(sigmas[0])
        return lo, hi

    def _sigma_timesteps(self, n: int) -> np.ndarray:
        c = self.config
        return spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset, linspace_round=False,
                                dtype=np.float32)
