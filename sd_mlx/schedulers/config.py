"""The scheduler configuration (``scheduler/scheduler_config.json``) and diffusers' per-class defaults.

One :class:`SchedulerConfig` holds the union of the fields that the diffusers schedulers sd_mlx implements read.
A field left ``None`` means "not given": each scheduler class fills it with *its own* diffusers default, and fields
a class does not read are ignored by it. That is what diffusers' ``Other.from_config(pipe.scheduler.config)`` does
(values the file did not contain are listed in ``_use_default_values`` and dropped, so the target class's defaults
apply: Stable Diffusion 1.5's file has no ``timestep_spacing``, and Euler built from it uses Euler's ``"linspace"``,
not PNDM's ``"leading"``), so users can swap the scheduler while keeping the checkpoint's training parameters
(``beta_*``, ``num_train_timesteps``, ``prediction_type``, ``steps_offset``...).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError
from ..loading.configs import dataclass_from_dict, read_json

_INF = math.inf

#: Defaults of diffusers' scheduler ``__init__`` arguments (diffusers 0.42) for the fields of SchedulerConfig, for
#: the classes sd_mlx implements; a class reads exactly the fields listed for it.
DIFFUSERS_DEFAULTS: dict[str, dict[str, Any]] = {
    "EulerDiscreteScheduler": {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "prediction_type": "epsilon", "interpolation_type": "linear",
        "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None,
        "sigma_max": None, "timestep_spacing": "linspace", "timestep_type": "discrete", "steps_offset": 0,
        "rescale_betas_zero_snr": False, "final_sigmas_type": "zero"},
    "EulerAncestralDiscreteScheduler": {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0,
        "rescale_betas_zero_snr": False},
    "DDIMScheduler": {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
        "prediction_type": "epsilon", "thresholding": False, "clip_sample_range": 1.0, "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False},
    "DPMSolverMultistepScheduler": {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
        "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
        "euler_at_final": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False, "final_sigmas_type": "zero",
        "lambda_min_clipped": -_INF, "variance_type": None, "timestep_spacing": "linspace", "steps_offset": 0,
        "rescale_betas_zero_snr": False, "use_dynamic_shifting": False},
    "PNDMScheduler": {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "skip_prk_steps": False, "set_alpha_to_one": False, "prediction_type": "epsilon",
        "timestep_spacing": "leading", "steps_offset": 0},
    "LCMScheduler": {
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "trained_betas": None, "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0,
        "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon", "thresholding": False,
        "timestep_spacing": "leading", "timestep_scaling": 10.0, "rescale_betas_zero_snr": False},
    "HeunDiscreteScheduler": {
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear",
        "trained_betas": None, "prediction_type": "epsilon", "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "clip_sample": False, "clip_sample_range": 1.0,
        "timestep_spacing": "linspace", "steps_offset": 0},
    "LMSDiscreteScheduler": {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0},
}

_INT_FIELDS = ("num_train_timesteps", "steps_offset", "solver_order", "original_inference_steps")
_FLOAT_FIELDS = ("beta_start", "beta_end", "clip_sample_range", "sigma_min", "sigma_max", "lambda_min_clipped",
                 "timestep_scaling")
_BOOL_FIELDS = ("rescale_betas_zero_snr", "clip_sample", "set_alpha_to_one", "skip_prk_steps", "thresholding",
                "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                "use_flow_sigmas", "use_dynamic_shifting", "lower_order_final", "euler_at_final")
_STR_FIELDS = ("beta_schedule", "prediction_type", "timestep_spacing", "interpolation_type", "timestep_type",
               "final_sigmas_type", "algorithm_type", "solver_type", "variance_type", "class_name")


@dataclass(frozen=True)
class SchedulerConfig:
    """Fields of a diffusers ``scheduler_config.json`` that change the maths of the schedulers sd_mlx implements.

    Every field defaults to ``None`` = "not given" (the scheduler class then uses its own diffusers default; see
    :data:`DIFFUSERS_DEFAULTS`). Values are type-checked here; whether a value is *supported* is checked by the
    scheduler class that reads it (``ConfigError`` naming the field and :attr:`source`).

    Attributes (diffusers meaning):
        num_train_timesteps: length of the training noise schedule (int, usually 1000).
        beta_start, beta_end, beta_schedule: ``"linear"``, ``"scaled_linear"`` or ``"squaredcos_cap_v2"``.
        trained_betas: explicit betas (tuple of floats, length ``num_train_timesteps``), overrides ``beta_*``.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        timestep_spacing: ``"leading"``, ``"trailing"`` or ``"linspace"``; steps_offset: int added ("leading").
        rescale_betas_zero_snr: rescale betas to zero terminal SNR (Lin et al. 2023).
        clip_sample, clip_sample_range: clamp the predicted x0 (DDIM, LCM, Heun).
        set_alpha_to_one: final ``alpha_cumprod`` is 1 instead of ``alphas_cumprod[0]`` (DDIM, PNDM, LCM).
        skip_prk_steps: PNDM runs PLMS only (Stable Diffusion's "PLMS").
        use_karras_sigmas, sigma_min, sigma_max, final_sigmas_type, interpolation_type, timestep_type: sigma
            schedule options (Euler, DPM-Solver, Heun, LMS).
        algorithm_type, solver_order, solver_type, lower_order_final, euler_at_final, lambda_min_clipped,
            variance_type: DPM-Solver multistep options.
        original_inference_steps, timestep_scaling: LCM options.
        thresholding, use_exponential_sigmas, use_beta_sigmas, use_lu_lambdas, use_flow_sigmas,
            use_dynamic_shifting: read only to be rejected when true (not implemented).
        class_name: the file's ``_class_name`` (diffusers class that wrote it), or None.
        source: where the config came from, used in error messages.

    Raises:
        ValueError: a field has the wrong type (``from_dict`` turns it into ``ConfigError`` naming the file).
    """

    num_train_timesteps: int | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str | None = None
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str | None = None
    timestep_spacing: str | None = None
    steps_offset: int | None = None
    rescale_betas_zero_snr: bool | None = None
    clip_sample: bool | None = None
    clip_sample_range: float | None = None
    set_alpha_to_one: bool | None = None
    skip_prk_steps: bool | None = None
    thresholding: bool | None = None
    interpolation_type: str | None = None
    use_karras_sigmas: bool | None = None
    use_exponential_sigmas: bool | None = None
    use_beta_sigmas: bool | None = None
    use_lu_lambdas: bool | None = None
    use_flow_sigmas: bool | None = None
    use_dynamic_shifting: bool | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str | None = None
    final_sigmas_type: str | None = None
    algorithm_type: str | None = None
    solver_order: int | None = None
    solver_type: str | None = None
    lower_order_final: bool | None = None
    euler_at_final: bool | None = None
    lambda_min_clipped: float | None = None
    variance_type: str | None = None
    original_inference_steps: int | None = None
    timestep_scaling: float | None = None
    class_name: str | None = None
    source: str = dataclasses.field(default="scheduler config", compare=False)

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"{name} must be a number, got {v!r}")
                object.__setattr__(self, name, float(v))
        for name in _BOOL_FIELDS:
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"{name} must be true or false, got {v!r}")
        for name in _STR_FIELDS:
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{name} must be a string, got {v!r}")
        if self.trained_betas is not None:
            tb = self.trained_betas
            if isinstance(tb, (str, bytes)) or not hasattr(tb, "__iter__"):
                raise ValueError(f"trained_betas must be a list of numbers, got {type(tb).__name__}")
            values = list(tb)
            if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in values):
                raise ValueError("trained_betas must be a list of numbers")
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in values))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "scheduler config") -> "SchedulerConfig":
        """Parse a ``scheduler_config.json`` mapping.

        Unknown keys are ignored (they do not change the maths of any implemented scheduler); ``_class_name`` is
        kept as :attr:`class_name`.

        Raises:
            ConfigError: a value has the wrong type (message names ``source`` and the field).
        """
        data = {k: v for k, v in d.items() if k not in ("source", "class_name")}
        class_name = d.get("_class_name")
        cfg = dataclass_from_dict(cls, data, source=source)
        return dataclasses.replace(cfg, class_name=class_name if isinstance(class_name, str) else None,
                                   source=source)

    @classmethod
    def from_file(cls, path: Path | str) -> "SchedulerConfig":
        """Read ``scheduler_config.json`` at ``path`` (a file, or a model folder holding ``scheduler/``).

        Raises:
            ConfigError: missing file, invalid JSON, or a value of the wrong type (message names the file).
        """
        path = Path(path)
        if path.is_dir():
            path = path / "scheduler" / "scheduler_config.json" if (path / "scheduler").is_dir() \
                else path / "scheduler_config.json"
        return cls.from_dict(read_json(path), source=str(path))

    def replace(self, **changes: Any) -> "SchedulerConfig":
        """A copy with ``changes`` applied (field names as in the dataclass).

        Raises:
            ConfigError: an unknown field name, or a value of the wrong type (message names :attr:`source`).
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"{self.source}: unknown scheduler option(s) {', '.join(unknown)}; known options: "
                              f"{', '.join(sorted(names - {'source', 'class_name'}))}")
        try:
            return dataclasses.replace(self, **changes)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{self.source}: {e}") from None

    def given(self) -> dict[str, Any]:
        """The fields that are set (not ``None``), without ``source``: a dict like diffusers' config."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "source" and getattr(self, f.name) is not None}
