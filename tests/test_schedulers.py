"""Scheduler parity with diffusers (sd_mlx.schedulers).

For every scheduler, the Stable Diffusion 1.5 (epsilon, PNDM config) and 2.1 (v_prediction, DDIM config) scheduler
configs, every timestep spacing and 1, 2, 3, 20, 50, 999 and 1000 steps (test_parity_with_diffusers):

* ``timesteps`` equal diffusers' (values, length = number of U-Net evaluations, integer/float kind) exactly, except
  fractional Karras timesteps (Euler/Heun/LMS), compared at rtol 1e-6 / atol 1e-5 (see ``_assert_timesteps``);
  ``sigmas`` to rtol 1e-6, ``init_noise_sigma`` to rtol 1e-6, the final sigma is 0 where diffusers' is. Step counts
  we refuse are checked to be ones diffusers cannot run (it raises, indexes out of range or returns NaN/inf).
* A full fake denoising loop (model output ``0.1 * x_in + base * cos(t / 250)``, seeded numpy arrays of shape
  (1, 8, 8, 4), identical injected noise) matches diffusers' loop at every iteration:
  ``max|ours - ref| <= tol * scale`` with ``scale`` the largest ``|latent|`` of the run so far (initial noise
  included), ``tol = 1e-5`` for runs up to 50 steps; loops of 999 and 1000 steps run in test_long_runs with
  ``tol = 2e-5`` (see LONG_LOOP_TOL), and LMS's last step there at 1e-2 (ill-conditioned, see ``_compare_loops``).

diffusers is driven the way its pipelines do (``scale_model_input(x, t)``, ``step(out, t, x)``), with the
scheduler's begin index set to 0 where it has one (our loop is index based; we also check the first timestep is
unique, so a pipeline's timestep lookup would start at 0 too). Ancestral/LCM noise is injected by patching the
scheduler module's ``randn_tensor``; DDIM (eta > 0) and DPM-Solver SDE take ``variance_noise``. diffusers' LMS needs
scipy (not installed): its ``integrate.quad`` is replaced by a 3-point Gauss-Legendre rule, exact for the (at most
cubic) Lagrange polynomials LMS integrates.

Measured (float32, x86 CPU, diffusers 0.42 / torch 2.13): betas and alphas_cumprod bit-identical; 494 of 538
schedules have identical timesteps, the 44 Karras ones differ by at most 6.1e-5 (one float32 ulp); sigmas within
1.2e-7 relative. Loop error relative to the run's scale: <= 1.4e-6 for runs up to 50 steps (2.9e-6 for LMS's last
step), <= 5.8e-6 for 999/1000 steps except DPM++ 2M SDE Karras (9.6e-6) and LMS's final step (7.1e-3).
"""


from __future__ import annotations

import json
import math
import types
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from sd_mlx.errors import ConfigError, InvalidArgumentError
from sd_mlx.schedulers import (SCHEDULER_CLASSES, SCHEDULER_NAMES, DDIMScheduler, EulerDiscreteScheduler,
                               LCMScheduler, LMSDiscreteScheduler, SchedulerConfig, get_scheduler)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.schedulers import scheduling_euler_ancestral_discrete as _ea_mod  # noqa: E402
from diffusers.schedulers import scheduling_lcm as _lcm_mod  # noqa: E402
from diffusers.schedulers import scheduling_lms_discrete as _lms_mod  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")

STEP_COUNTS = (1, 2, 3, 20, 50, 999, 1000)
SPACINGS = ("leading", "trailing", "linspace")
SHAPE = (1, 8, 8, 4)
LOOP_TOL = 1e-5       # runs of <= 50 steps: max|ours - ref| <= LOOP_TOL * (largest |latent| of the run so far)
LONG_LOOP_TOL = 2e-5  # 999/1000-step runs: tiny steps (h ~ 0.006) make e.g. 1 - exp(-2h) cancel in float32, which
                      # magnifies 1-ulp libm differences between torch and numpy (measured worst: 9.6e-6, DPM++ SDE)

#: test id -> (name for get_scheduler, overrides for both sides, diffusers class name, DDIM eta)
CASES = {
    "euler": ("euler", {}, "EulerDiscreteScheduler", 0.0),
    "euler_karras": ("euler_karras", {}, "EulerDiscreteScheduler", 0.0),
    "euler_a": ("euler_a", {}, "EulerAncestralDiscreteScheduler", 0.0),
    "ddim": ("ddim", {}, "DDIMScheduler", 0.0),
    "ddim_eta": ("ddim", {}, "DDIMScheduler", 0.7),
    "dpmpp_2m": ("dpmpp_2m", {}, "DPMSolverMultistepScheduler", 0.0),
    "dpmpp_2m_karras": ("dpmpp_2m_karras", {}, "DPMSolverMultistepScheduler", 0.0),
    "dpmpp_2m_sde_karras": ("dpmpp_2m_sde_karras", {}, "DPMSolverMultistepScheduler", 0.0),
    "dpmpp_3m_heun": ("dpmpp_2m", {"solver_order": 3, "solver_type": "heun"}, "DPMSolverMultistepScheduler", 0.0),
    "plms": ("plms", {}, "PNDMScheduler", 0.0),
    "pndm_prk": ("pndm", {"skip_prk_steps": False}, "PNDMScheduler", 0.0),
    "lcm": ("lcm", {}, "LCMScheduler", 0.0),
    "heun": ("heun", {}, "HeunDiscreteScheduler", 0.0),
    "lms_karras": ("lms_karras", {}, "LMSDiscreteScheduler", 0.0),
}
#: the overrides each short name implies (applied to diffusers' side too)
IMPLIED = {
    "euler": {"use_karras_sigmas": False}, "euler_karras": {"use_karras_sigmas": True},
    "dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    "dpmpp_2m_karras": {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    "dpmpp_2m_sde_karras": {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    "plms": {"skip_prk_steps": True}, "heun": {"use_karras_sigmas": False}, "lms_karras": {"use_karras_sigmas": True},
}
LONG = 999


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------

def _config_path(assets: Path, model: str) -> Path:
    p = assets / "configs" / model / "scheduler" / "scheduler_config.json"
    if not p.is_file():
        pytest.skip(f"{p} not found")
    return p


@pytest.fixture(scope="module", params=["stable-diffusion-v1-5", "stable-diffusion-2-1"])
def model_config(request, assets) -> tuple[str, dict]:
    return request.param, json.loads(_config_path(assets, request.param).read_text())


def _diffusers_class(name: str):
    if name == "LMSDiscreteScheduler":
        return _lms_mod.LMSDiscreteScheduler
    return getattr(diffusers, name)


def _reference(config: dict, class_name: str, **overrides):
    """diffusers' ``Target.from_config(pipe.scheduler.config)``, the scheduler a pipeline swap gives (fields the file
    omits take the target class's defaults)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = _diffusers_class(config["_class_name"]).from_config(config)
        return _diffusers_class(class_name).from_config(original.config, **overrides)


def _gauss_legendre_quad(f, a, b, epsrel=None):
    x, w = np.polynomial.legendre.leggauss(3)
    a, b = float(a), float(b)
    mid, half = (a + b) / 2, (b - a) / 2
    return half * sum(wi * float(f(mid + half * xi)) for xi, wi in zip(x, w)), 0.0


@pytest.fixture(autouse=True)
def _patch_lms_integrate(monkeypatch):
    monkeypatch.setattr(_lms_mod, "integrate", types.SimpleNamespace(quad=_gauss_legendre_quad), raising=False)


class _Noise:
    """Feeds the same noise to diffusers' ``randn_tensor`` as to our ``step(noise=...)``."""

    def __init__(self):
        self.current = None

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == self.current.shape
        return self.current.to(dtype=dtype or torch.float32)


def _assert_timesteps(ours: np.ndarray, ref: np.ndarray, msg: str) -> None:
    """Same kind (int/float), same length; equal values, except fractional (Karras) float32 timesteps, which may
    differ by an ulp (rtol 1e-6, atol 1e-5 near t = 0): they are interpolated in the log of the training sigmas,
    and torch's CPU float32 sqrt is not correctly rounded (1 ulp off for ~20% of inputs), unlike numpy's."""
    assert ours.dtype.kind == ref.dtype.kind, (msg, ours.dtype, ref.dtype)
    assert ours.shape == ref.shape, msg
    if np.all(ref == np.round(ref)):
        np.testing.assert_array_equal(ours, ref, err_msg=msg)
    else:
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-5, err_msg=msg)


def _fake_model(x_in: np.ndarray, t: float, base: np.ndarray) -> np.ndarray:
    return (np.float32(0.1) * x_in + base * np.float32(math.cos(t / 250.0))).astype(np.float32)


def _run_ours(sched, n, x0, base, noises):
    sched.set_timesteps(n)
    x = mx.array(x0) * sched.init_noise_sigma
    outs = []
    for i, t in enumerate(sched.timesteps):
        x_in = np.array(sched.scale_model_input(x, i))
        out = _fake_model(x_in, float(t), base)
        x = sched.step(mx.array(out), i, x, noise=mx.array(noises[i]) if sched.needs_noise else None)
        outs.append(np.array(x))
    return outs


def _run_reference(ref, n, x0, base, noises, eta, patch: _Noise, stop_on_nonfinite: bool = False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.set_timesteps(n)
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(0)
        x = torch.from_numpy(x0) * ref.init_noise_sigma
        outs = []
        for i, t in enumerate(ref.timesteps):
            x_in = ref.scale_model_input(x, t)
            out = torch.from_numpy(_fake_model(x_in.numpy(), float(t), base))
            noise = torch.from_numpy(noises[i])
            patch.current = noise
            kwargs = {}
            if isinstance(ref, diffusers.DDIMScheduler) and eta > 0:
                kwargs = {"eta": eta, "variance_noise": noise}
            elif isinstance(ref, diffusers.DPMSolverMultistepScheduler) and "sde" in ref.config.algorithm_type:
                kwargs = {"variance_noise": noise}
            x = ref.step(out, t, x, **kwargs).prev_sample
            outs.append(x.numpy().copy())
            if stop_on_nonfinite and not np.isfinite(outs[-1]).all():
                break
    return outs


def _reference_fails(ref, n, x0, base, noises, eta, patch) -> bool:
    """True when diffusers cannot run ``n`` steps (raises, or produces non-finite latents)."""
    try:
        outs = _run_reference(ref, n, x0, base, noises, eta, patch, stop_on_nonfinite=True)
    except Exception:  # noqa: BLE001 - any diffusers failure counts
        return True
    return not all(np.isfinite(o).all() for o in outs)


# ------------------------------------------------------------------------------------------------------------------
# parity: schedules and full loops
# ------------------------------------------------------------------------------------------------------------------

def _compare_loops(ours, ref, n, eta, patch, rng, x0, base) -> float:
    """Run both loops for ``n`` steps; assert every iteration matches; return the worst relative error."""
    noises = rng.standard_normal((len(ours.timesteps),) + SHAPE).astype(np.float32)
    got = _run_ours(ours, n, x0, base, noises)
    want = _run_reference(ref, n, x0, base, noises, eta, patch)
    assert len(got) == len(want) == len(ref.timesteps) == len(ours.timesteps)
    tol = LOOP_TOL if n <= 50 else LONG_LOOP_TOL
    scale = max(1.0, float(np.abs(x0).max()) * float(ref.init_noise_sigma))
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        scale = max(scale, float(np.abs(w).max()))
        err = float(np.abs(g - w).max()) / scale
        worst = max(worst, err)
        if n >= LONG and i == len(got) - 1 and isinstance(ours, LMSDiscreteScheduler):
            # LMS's last step from sigma ~0.03 to 0 extrapolates a cubic fitted on nodes ~3e-4 apart: coefficients
            # of order 4e3 with alternating signs amplify float32 rounding (diffusers' own) about 1e4-fold
            assert err <= 1e-2, f"{n} steps, last LMS iteration: relative error {err:.3g}"
            continue
        assert err <= tol, f"{n} steps, iteration {i}: max abs error {err * scale:.3g} (scale {scale:.3g})"
    return worst


def _check_schedule(ours, ref, n, sigma_rtol: float = 1e-6) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.set_timesteps(n)
    ref_ts = ref.timesteps.numpy()
    _assert_timesteps(ours.timesteps, ref_ts, f"timesteps, {n} steps")
    if hasattr(ref, "sigmas") and ours.sigmas is not None:
        ref_sig = ref.sigmas.numpy()
        np.testing.assert_allclose(ours.sigmas, ref_sig, rtol=sigma_rtol, atol=0, err_msg=f"sigmas, {n} steps")
        if ref_sig[-1] == 0:
            assert ours.sigmas[-1] == 0
    else:
        assert ours.sigmas is None
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    if hasattr(ref, "set_begin_index") and len(ref_ts) > 1:
        assert np.sum(ref_ts == ref_ts[0]) == 1, "first timestep repeats: a pipeline would not start at 0"


def _setup(case, config, spacing, monkeypatch):
    name, extra, class_name, eta = CASES[case]
    ours = get_scheduler(name, config, eta=eta, **extra, timestep_spacing=spacing)
    assert ours.diffusers_class == class_name
    ref = _reference(config, class_name, **{**IMPLIED.get(name, {}), **extra, "timestep_spacing": spacing})
    patch = _Noise()
    monkeypatch.setattr(_ea_mod, "randn_tensor", patch)
    monkeypatch.setattr(_lcm_mod, "randn_tensor", patch)
    rng = np.random.default_rng(1234)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    base = rng.standard_normal(SHAPE).astype(np.float32)
    return ours, ref, eta, patch, rng, x0, base


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_diffusers(case, spacing, model_config, monkeypatch):
    """Schedules for all step counts; full loops up to 50 steps (long loops: test_long_runs)."""
    _, config = model_config
    ours, ref, eta, patch, rng, x0, base = _setup(case, config, spacing, monkeypatch)
    for n in STEP_COUNTS:
        try:
            ours.set_timesteps(n)
        except InvalidArgumentError:
            noises = rng.standard_normal((2 * n + 12,) + SHAPE).astype(np.float32)
            assert _reference_fails(ref, n, x0, base, noises, eta, patch), f"we refuse {n} steps, diffusers runs"
            continue
        _check_schedule(ours, ref, n)
        if n <= 50:
            _compare_loops(ours, ref, n, eta, patch, rng, x0, base)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("model,spacing,counts", [("stable-diffusion-v1-5", "linspace", (999, 1000)),
                                                  ("stable-diffusion-2-1", "trailing", (999,))])
def test_long_runs(case, model, spacing, counts, assets, monkeypatch):
    """999/1000-step loops, one spacing per config (the step maths does not depend on the spacing)."""
    config = json.loads(_config_path(assets, model).read_text())
    ours, ref, eta, patch, rng, x0, base = _setup(case, config, spacing, monkeypatch)
    if isinstance(ours, LCMScheduler):
        pytest.skip("LCM allows at most original_inference_steps (50) steps")
    if isinstance(ours, LMSDiscreteScheduler):  # diffusers' LMS integrates its coefficients: slow, one run is enough
        if model != "stable-diffusion-v1-5":
            pytest.skip("LMS long run: SD 1.5 only (speed)")
        counts = (999,)
    for n in counts:
        try:
            ours.set_timesteps(n)
        except InvalidArgumentError:
            continue  # checked against diffusers in test_parity_with_diffusers
        _check_schedule(ours, ref, n)
        _compare_loops(ours, ref, n, eta, patch, rng, x0, base)


@pytest.mark.parametrize("case,extra", [
    ("euler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("ddim", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("dpmpp_2m", {"beta_schedule": "squaredcos_cap_v2"}),
    ("dpmpp_2m_karras", {"beta_schedule": "linear", "final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("euler_karras", {"sigma_min": 0.1, "sigma_max": 10.0, "final_sigmas_type": "sigma_min"}),
    ("heun", {"use_karras_sigmas": True, "clip_sample": True, "prediction_type": "sample"}),
    ("ddim", {"set_alpha_to_one": True, "clip_sample": True, "prediction_type": "sample"}),
    ("lcm", {"original_inference_steps": 100, "timestep_scaling": 5.0, "set_alpha_to_one": True}),
])
def test_config_variants(case, extra, assets, monkeypatch):
    """Less common config fields against diffusers (SD 1.5 config + overrides; 2, 7 and 25 steps)."""
    config = json.loads(_config_path(assets, "stable-diffusion-v1-5").read_text())
    name, _, class_name, eta = CASES[case]
    ours = get_scheduler(name, config, **extra)
    ref = _reference(config, class_name, **{**IMPLIED.get(name, {}), **extra})
    # rtol 1e-5: torch's CPU float32 sqrt is not correctly rounded (1 ulp off for ~20% of inputs); the zero-SNR
    # rescale subtracts nearly equal square roots, which turns that ulp into ~4e-6 relative near the end
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5)
    patch = _Noise()
    monkeypatch.setattr(_lcm_mod, "randn_tensor", patch)
    rng = np.random.default_rng(7)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    base = rng.standard_normal(SHAPE).astype(np.float32)
    for n in (2, 7, 25):
        ours.set_timesteps(n)
        _check_schedule(ours, ref, n, sigma_rtol=1e-5)  # zero-SNR: see the alphas_cumprod comment above
        _compare_loops(ours, ref, n, eta, patch, rng, x0, base)


def test_betas_match_torch_exactly():
    """The float32 training schedule is bit-identical to diffusers' (torch linspace/cumprod emulation)."""
    for schedule, start, end in [("scaled_linear", 0.00085, 0.012), ("linear", 0.0001, 0.02),
                                 ("squaredcos_cap_v2", 0.0001, 0.02)]:
        ours = EulerDiscreteScheduler(SchedulerConfig(beta_schedule=schedule, beta_start=start, beta_end=end))
        ref = diffusers.EulerDiscreteScheduler(beta_schedule=schedule, beta_start=start, beta_end=end)
        np.testing.assert_array_equal(ours.betas, ref.betas.numpy())
        np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())


def test_trained_betas():
    betas = np.linspace(0.0001, 0.02, 1000).tolist()
    ours = get_scheduler("ddim", {"trained_betas": betas})
    ref = diffusers.DDIMScheduler(trained_betas=betas)
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
    with pytest.raises(ConfigError, match="trained_betas"):
        get_scheduler("ddim", {"trained_betas": betas[:10]})


def test_add_noise_matches_diffusers(assets):
    config = json.loads(_config_path(assets, "stable-diffusion-v1-5").read_text())
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2,) + SHAPE[1:]).astype(np.float32)
    noise = rng.standard_normal((2,) + SHAPE[1:]).astype(np.float32)
    for case in ("euler", "euler_a", "ddim", "dpmpp_2m_karras", "plms", "lcm", "heun", "lms_karras"):
        name, extra, class_name, _ = CASES[case]
        ours = get_scheduler(name, config, **extra)
        ref = _reference(config, class_name, **{**IMPLIED.get(name, {}), **extra})
        ours.set_timesteps(10)
        ref.set_timesteps(10)
        ts = ref.timesteps[[3, 5]]
        want = ref.add_noise(torch.from_numpy(x), torch.from_numpy(noise), ts).numpy()
        got = np.array(ours.add_noise(mx.array(x), mx.array(noise), ours.timesteps[[3, 5]]))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=case)


# ------------------------------------------------------------------------------------------------------------------
# validation, names, interface
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("bad", [0, -1, 1001, 2.5, "20", True, None])
def test_invalid_step_counts(name, bad):
    sched = get_scheduler(name, {})
    with pytest.raises(InvalidArgumentError, match="num_inference_steps"):
        sched.set_timesteps(bad)
    assert sched.timesteps is None  # nothing changed


def test_lcm_step_limit():
    sched = get_scheduler("lcm", {})
    sched.set_timesteps(50)
    with pytest.raises(InvalidArgumentError, match="between 1 and 50"):
        sched.set_timesteps(51)
    assert len(sched.timesteps) == 50  # the failed call left the schedule alone


def test_names_and_display_names():
    expected = {"euler": "Euler", "euler_karras": "Euler Karras", "euler_a": "Euler a", "ddim": "DDIM",
                "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras", "dpmpp_2m_sde": "DPM++ 2M SDE",
                "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras", "pndm": "PLMS", "plms": "PLMS", "lcm": "LCM",
                "heun": "Heun", "heun_karras": "Heun Karras", "lms": "LMS", "lms_karras": "LMS Karras"}
    sd15 = {"_class_name": "PNDMScheduler", "skip_prk_steps": True}
    for name in SCHEDULER_NAMES:
        sched = get_scheduler(name, sd15)
        assert sched.display_name == expected[name]
        # A1111 spellings round-trip
        assert type(get_scheduler(sched.display_name, sd15)) is type(sched)
        assert get_scheduler(sched.display_name, sd15).display_name == sched.display_name
    for class_name, cls in SCHEDULER_CLASSES.items():
        assert type(get_scheduler(class_name, {})) is cls
    with pytest.raises(InvalidArgumentError) as e:
        get_scheduler("dpm_fast", {})
    for name in SCHEDULER_NAMES:
        assert name in str(e.value)


def test_options_and_errors():
    with pytest.raises(InvalidArgumentError, match="use_karas_sigmas"):
        get_scheduler("euler", {}, use_karas_sigmas=True)
    with pytest.raises(InvalidArgumentError, match="eta"):
        get_scheduler("euler", {}, eta=0.5)
    assert get_scheduler("euler", {}, eta=0.0).display_name == "Euler"
    with pytest.raises(InvalidArgumentError, match="eta"):
        get_scheduler("ddim", {}, eta=2.0)
    with pytest.raises(InvalidArgumentError, match="timestep_spacing"):
        get_scheduler("euler", {}, timestep_spacing=3)
    with pytest.raises(ConfigError, match="timestep_spacing"):
        get_scheduler("euler", {}, timestep_spacing="uniform")
    with pytest.raises(ConfigError, match="beta_schedule"):
        get_scheduler("euler", {"beta_schedule": "exp"})
    with pytest.raises(ConfigError, match="num_train_timesteps"):
        SchedulerConfig.from_dict({"num_train_timesteps": "1000"}, source="x/scheduler_config.json")
    with pytest.raises(ConfigError, match="thresholding"):
        get_scheduler("ddim", {"thresholding": True})
    with pytest.raises(ConfigError, match="prediction_type"):
        get_scheduler("euler_a", {"prediction_type": "sample"})
    with pytest.raises(ConfigError, match="algorithm_type"):
        get_scheduler("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"})
    with pytest.raises(ConfigError, match="interpolation_type"):
        get_scheduler("euler", {"interpolation_type": "log_linear"})
    # fields a class does not read are ignored, as in diffusers' from_config
    assert get_scheduler("ddim", {"use_karras_sigmas": True, "algorithm_type": "deis"}).config.use_karras_sigmas is None
    with pytest.raises(InvalidArgumentError, match=">= 4"):
        get_scheduler("pndm", {"skip_prk_steps": False}).set_timesteps(3)


def test_config_from_file_and_class_defaults(assets):
    path = _config_path(assets, "stable-diffusion-v1-5")
    cfg = SchedulerConfig.from_file(path)
    assert cfg.class_name == "PNDMScheduler" and cfg.steps_offset == 1 and cfg.source == str(path)
    assert cfg.timestep_spacing is None  # not in the file
    assert SchedulerConfig.from_file(path.parent.parent) == cfg
    # fields the file omits take the *target* class's defaults, as diffusers' from_config(pipe.scheduler.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.EulerDiscreteScheduler.from_config(diffusers.PNDMScheduler.from_pretrained(path.parent).config)
    sched = EulerDiscreteScheduler(cfg)
    assert sched.config.timestep_spacing == ref.config.timestep_spacing == "linspace"
    assert get_scheduler("ddim", cfg).config.timestep_spacing == "leading"
    assert sched.config.use_karras_sigmas is False and sched.config.skip_prk_steps is None


def test_step_interface_errors_and_dtype():
    sched = get_scheduler("euler_a", {})
    x = mx.zeros(SHAPE, dtype=mx.float16)
    with pytest.raises(InvalidArgumentError, match="set_timesteps"):
        sched.step(x, 0, x, noise=x)
    sched.set_timesteps(4)
    with pytest.raises(InvalidArgumentError, match="noise"):
        sched.step(x, 0, x)
    with pytest.raises(InvalidArgumentError, match="iteration index"):
        sched.scale_model_input(x, 4)
    y = sched.step(x, 0, x, noise=mx.ones(SHAPE))
    assert y.dtype == mx.float16 and y.shape == SHAPE
    assert sched.scale_model_input(y, 1).dtype == mx.float16
    with pytest.raises(InvalidArgumentError, match="consecutive"):
        sched.step(x, 3, x, noise=x)
    sched.set_timesteps(4)  # resets the state
    sched.step(x, 2, x, noise=x)  # a run may start anywhere (img2img)
    assert not get_scheduler("euler", {}).needs_noise and get_scheduler("lcm", {}).needs_noise
    assert DDIMScheduler({}, eta=0.3).needs_noise and not DDIMScheduler({}).needs_noise
