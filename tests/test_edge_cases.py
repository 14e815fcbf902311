"""Inputs people really send (issue 5): prompts, sizes, step counts, guidance scales, damaged checkpoints, output
paths, interruptions, float16 overflow, seeds and batches.

Each case asserts the right value, or the exact error type and a message fragment; errors about arguments must come
before any weights are loaded (``pipe.loaded_models`` still empty). Runs on the tiny random checkpoints at 64x64
with 1-3 steps; the many-step cases use a stub U-Net (a cheap callable put in ``pipe._models["unet"]``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

import sd_mlx
import mlx.core as mx
from sd_mlx import ConfigError, InvalidArgumentError, ModelNotFoundError, NonFiniteError, WeightLoadError, txt2img
from sd_mlx import ops
from sd_mlx.models.layers import repeat_rows
from sd_mlx.pipeline import StableDiffusionPipeline, estimate_memory, load_pipeline, loop
from sd_mlx.schedulers import SCHEDULER_NAMES, get_scheduler

KW = dict(height=64, width=64, num_inference_steps=1, seed=0)
WORDS = ("a majestic lion resting on a rock at sunset with golden light and tall grass around it "
         "under a dramatic sky full of orange clouds while birds fly over distant blue mountains").split()


def long_text(n_words: int) -> str:
    """``n_words`` common words; each is one CLIP token."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


@pytest.fixture(scope="module")
def pipe(tiny_sd1):
    """The shared tiny SD1 pipeline (weights loaded once for the module)."""
    return load_pipeline(tiny_sd1)


@pytest.fixture
def fresh(tiny_sd1):
    """A pipeline with nothing loaded, for checks that errors come before loading."""
    return load_pipeline(tiny_sd1)


class StubUNet:
    """A cheap stand-in for the U-Net: counts calls and batch sizes (rows of the context), returns ``scale * x``
    (or ``fill``) with one row per context row, as the U-Net does for latents shared by several contexts."""

    def __init__(self, fill: float | None = None) -> None:
        self.calls, self.batches, self.fill = 0, [], fill

    def __call__(self, x, t, context):
        self.calls += 1
        self.batches.append(context.shape[0])
        out = mx.full(x.shape, self.fill) if self.fill is not None else 0.1 * x
        return repeat_rows(out, context.shape[0])


def stubbed(folder: Path, fill: float | None = None) -> tuple[StableDiffusionPipeline, StubUNet]:
    p = load_pipeline(folder)
    stub = StubUNet(fill)
    p._models["unet"] = stub
    return p, stub


def check_raises_before_loading(p: StableDiffusionPipeline, exc: type, match: str, **kw) -> None:
    args = {**KW, **kw}
    prompt = args.pop("prompt", "a cat")
    with pytest.raises(exc, match=match):
        p(prompt, **args)
    assert p.loaded_models == (), "the error came after loading weights"


# ------------------------------------------------------------------------------------------------------- prompts
def test_long_prompt_truncates_like_diffusers_and_warns(pipe):
    long = long_text(150)
    head = long_text(75)
    with pytest.warns(UserWarning, match=r"^prompt longer than 77 tokens was truncated .*dropped: '(.+)'") as rec:
        emb = pipe.encode_prompt([long])
    dropped = re.search(r"dropped: '(.+?)'", str(rec[0].message)).group(1)
    assert dropped == " ".join(long.split()[75:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(np.array(emb), np.array(pipe.encode_prompt([head])))  # exactly the first 75 tokens
    # a whole call: long prompt, and short prompt + long negative prompt; never a shape error
    with pytest.warns(UserWarning, match="^prompt longer than 77"):
        out = pipe(long, negative_prompt="blurry", output_type="np", **KW)
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
    with pytest.warns(UserWarning, match="^negative prompt longer than 77"):
        out = pipe("a cat", negative_prompt=long_text(120), output_type="np", **KW)
    assert np.isfinite(out.images).all()


def test_chunked_long_prompt_pads_prompt_and_negative_to_the_same_chunks(pipe):
    long = long_text(150)  # 2 chunks of 75
    emb = pipe.encode_prompt([long], long_prompt="chunk")
    assert emb.shape == (1, 2 * 77, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = pipe.encode_prompt([long])
    assert np.array_equal(np.array(emb[:, :77]), np.array(first))  # chunk 1 is the truncated prompt
    seen = []
    original = loop.guided_output

    def spy(unet, x, t, context, *rest):
        seen.append(context.shape)
        return original(unet, x, t, context, *rest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "guided_output", spy)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # chunk mode drops nothing: no warning
            a = pipe(long, negative_prompt="blurry", long_prompt="chunk", output_type="np", **KW)
            b = pipe("a cat", negative_prompt=long_text(230), long_prompt="chunk", output_type="np", **KW)
    assert seen == [(2, 154, 32), (2, 308, 32)]  # [uncond, cond] of 2 and 4 chunks
    assert np.isfinite(a.images).all() and np.isfinite(b.images).all()


def test_odd_prompts_produce_finite_images(pipe):
    prompts = ["", "   ", "🦊", "crème brûlée à la café", "“curly quotes” ‘single’ „low“", "一只猫在雪地里",
               "line one\nline two\ttabbed"]
    out = pipe(prompts, negative_prompt="", output_type="np", **KW)
    assert out.images.shape == (len(prompts), 64, 64, 3) and np.isfinite(out.images).all()
    assert [p.prompt for p in out.parameters] == prompts
    out = pipe("a cat", negative_prompt="   ", output_type="np", **KW)
    assert np.isfinite(out.images).all()
    # only spaces encode like the empty prompt (CLIP strips whitespace)
    assert np.array_equal(np.array(pipe.encode_prompt(["   "])), np.array(pipe.encode_prompt([""])))


@pytest.mark.parametrize("n_tokens", [75, 76, 77])
def test_prompts_at_the_token_limit(pipe, n_tokens):
    prompt = long_text(n_tokens)
    assert len(pipe.tokenizer.encode_ids(prompt)) == n_tokens
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        emb = pipe.encode_prompt([prompt])
    assert emb.shape == (1, 77, 32)
    dropped = [str(w.message) for w in rec]
    if n_tokens == 75:
        assert dropped == []  # 75 tokens + BOS + EOS fill the 77 exactly
    else:
        assert len(dropped) == 1 and f"dropped: {' '.join(prompt.split()[75:])!r}" in dropped[0]
    assert pipe.encode_prompt([prompt], long_prompt="chunk").shape == (1, 77 * (1 if n_tokens == 75 else 2), 32)


def test_bad_prompt_types(fresh):
    check_raises_before_loading(fresh, InvalidArgumentError, "prompt must be a string or a non-empty list", prompt=[])
    check_raises_before_loading(fresh, InvalidArgumentError, "prompt must be a string", prompt=None)
    check_raises_before_loading(fresh, InvalidArgumentError, "negative_prompt has 2 entries for 3 prompts",
                          prompt=["a", "b", "c"], negative_prompt=["x", "y"])
    check_raises_before_loading(fresh, InvalidArgumentError, "long_prompt must be one of truncate, chunk",
                          long_prompt="split")


# --------------------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("height,width,message", [
    (512, 427, "width=427 is not a multiple of 8; use 424 or 432"),
    (427, 640, "height=427 is not a multiple of 8; use 424 or 432"),
    (5, 64, "height=5 is not a multiple of 8; use 8"),
    (0, 64, "height must be a positive number of pixels, got 0"),
    (64, -64, "width must be a positive number of pixels, got -64"),
    (100000, 512, "height=100000 is too large"),
    (64.0, 64, "height must be an integer number of pixels, got 64.0"),
])
def test_invalid_sizes_fail_before_loading(fresh, height, width, message):
    check_raises_before_loading(fresh, InvalidArgumentError, re.escape(message), height=height, width=width)


@pytest.mark.parametrize("height,width", [(512, 520), (608, 608), (640, 640), (8, 8), (16384, 8)])
def test_multiples_of_8_are_valid_sizes(height, width):
    from sd_mlx.pipeline import validate_size

    assert validate_size(height, width) is None  # no error (the large ones are not run here)


@pytest.mark.parametrize("height,width", [(8, 8), (64, 72), (72, 64), (40, 24)])
def test_small_multiples_of_8_work(pipe, height, width):
    """Latent sides that are odd or smaller than the U-Net's downsampling (1x1, 8x9) work, as in diffusers."""
    out = pipe("a cat", output_type="np", **{**KW, "height": height, "width": width})
    assert out.images.shape == (1, height, width, 3) and np.isfinite(out.images).all()


def test_memory_estimate_refuses_sizes_that_do_not_fit(fresh, monkeypatch):
    limit = 100 * 2**20
    monkeypatch.setattr(sd_mlx.pipeline.core, "available_memory_bytes", lambda: limit)
    with pytest.raises(InvalidArgumentError) as e:
        fresh("a cat", **{**KW, "height": 512, "width": 512})
    msg = str(e.value)
    assert fresh.loaded_models == ()
    est = fresh.estimate_memory(512, 512)
    full = 2 * 8 * (64 * 64) ** 2 * 4  # [uncond, cond] x 8 heads x 4096^2 scores x 4 bytes
    if ops.attention_is_chunked():  # the CPU attention works on bounded query chunks
        from sd_mlx.cpu.attention import CHUNK_ELEMENTS

        full = min(full, 3 * CHUNK_ELEMENTS * 4)
    assert est.attention == full
    assert f"512x512 needs at least about {sd_mlx.pipeline.format_bytes(est.total)} of memory" in msg, msg
    assert "U-Net self-attention" in msg and "more than the 104.9 MB available" in msg
    w, h = map(int, re.search(r"try (\d+)x(\d+)", msg).groups())
    assert fresh.estimate_memory(h, w).total <= limit and w % 8 == 0 and h % 8 == 0
    out = fresh("a cat", output_type="latent", **KW)  # 64x64 fits
    assert out.images.shape == (1, 8, 8, 4)


def test_memory_estimate_of_real_configs(assets):
    from sd_mlx.loading.configs import read_json
    from sd_mlx.models.unet import UNetConfig

    def unet(name):
        path = assets / "configs" / name / "unet" / "config.json"
        return UNetConfig.from_dict(read_json(path), str(path))

    sd15 = estimate_memory(unet("stable-diffusion-v1-5"), (128, 256, 512, 512), 0, height=512, width=512,
                           unet_rows=2, vae_batch=1, chunked_attention=False)
    assert sd15.attention == 2 * 8 * 4096**2 * 4  # 1.07 GB: 8 heads at 64x64 latents
    sd21 = estimate_memory(unet("stable-diffusion-2-1"), (128, 256, 512, 512), 0, height=768, width=768,
                           unet_rows=2, vae_batch=1, chunked_attention=False)
    assert sd21.attention == 2 * 5 * 9216**2 * 4  # 5 heads of 64 channels at 96x96 latents
    chunked = estimate_memory(unet("stable-diffusion-2-1"), (128, 256, 512, 512), 0, height=768, width=768,
                              unet_rows=2, vae_batch=1, chunked_attention=True)
    assert chunked.attention < sd21.attention / 10  # the CPU path's score buffers are bounded


# --------------------------------------------------------------------------------------------------------- steps
STEP_COUNTS = [0, 1, 2, 3, 9, 27, 999, 1000, 1001]


def _diffusers_timesteps(name: str, config: dict, n: int):
    """len and values of diffusers' timesteps for scheduler ``name`` after ``set_timesteps(n)``, or the exception."""
    diffusers = pytest.importorskip("diffusers")
    from sd_mlx.schedulers import _NAMED

    cls, implied = _NAMED[name]
    d = getattr(diffusers, cls.diffusers_class).from_config(config, **implied)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d.set_timesteps(n)
    return np.asarray(d.timesteps), getattr(d, "sigmas", None)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_step_counts_match_diffusers(pipe, name):
    """Every scheduler x step count: our count of U-Net evaluations is diffusers' ``len(timesteps)``, timesteps lie
    in ``[0, T)`` and the final sigma is 0; counts diffusers cannot do (an error, a degenerate schedule with
    timesteps outside the trained range) and 0 are an InvalidArgumentError."""
    config = pipe.scheduler_config
    T = 1000
    for n in STEP_COUNTS:
        try:
            ref_ts, ref_sigmas = _diffusers_timesteps(name, config, n)
            ref_error = None
        except ImportError as e:  # LMS needs scipy in diffusers
            ref_ts, ref_sigmas, ref_error = None, None, e
        except Exception as e:  # noqa: BLE001 - diffusers raises ValueError, ZeroDivisionError, IndexError...
            ref_ts, ref_sigmas, ref_error = None, None, e
        sched = get_scheduler(name, config)
        try:
            sched.set_timesteps(n)
        except InvalidArgumentError as e:
            assert "num_inference_steps" in str(e)
            degenerate = ref_ts is not None and (len(ref_ts) == 0 or ref_ts.min() < 0 or ref_ts.max() >= T)
            known_gap = (name in ("dpmpp_2m", "dpmpp_2m_sde") and n == 1000)  # see the scheduler's message
            assert n in (0, 1001) or ref_error is not None or degenerate or known_gap, (name, n, str(e))
            continue
        assert 1 <= n <= 1000
        ts = np.asarray(sched.timesteps)
        assert ts.min() >= 0 and ts.max() < T, (name, n)
        if sched.sigmas is not None:
            assert sched.sigmas[-1] == 0.0, (name, n)
        if isinstance(ref_error, ImportError):
            continue
        assert ref_error is None, (name, n, ref_error)
        assert len(ts) == len(ref_ts), (name, n)
        np.testing.assert_allclose(ts, ref_ts.astype(np.float64), rtol=0, atol=1e-3)
        if ref_sigmas is not None and sched.sigmas is not None:
            assert float(np.asarray(ref_sigmas)[-1]) == 0.0


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_pipeline_runs_the_unet_once_per_timestep(tiny_sd1, name):
    p, stub = stubbed(tiny_sd1)
    counts = [1, 2, 3, 9] + ([999] if name in ("euler", "heun", "dpmpp_2m_karras", "pndm", "ddim") else []) \
        + ([1000] if name in ("euler", "heun_karras") else [])
    for n in counts:
        sched = get_scheduler(name, p.scheduler_config)
        sched.set_timesteps(n)
        stub.calls = 0
        steps = []
        out = p("a cat", **{**KW, "num_inference_steps": n}, scheduler=name, output_type="latent",
                callback=lambda i, t, lat: steps.append(i))
        assert stub.calls == len(steps) == len(sched.timesteps), (name, n)
        assert np.isfinite(np.array(out.images)).all()
        assert out.parameters[0].steps == n


@pytest.mark.parametrize("n", [0, 1001, -3, 2.5, True, "20"])
def test_invalid_step_counts_fail_before_loading(fresh, n):
    check_raises_before_loading(fresh, InvalidArgumentError, "num_inference_steps must be", num_inference_steps=n,
                          scheduler="euler")


def test_lcm_step_limit(fresh):
    check_raises_before_loading(fresh, InvalidArgumentError, "num_inference_steps must be between 1 and 50 for LCM",
                          num_inference_steps=51, scheduler="lcm")


def test_every_scheduler_runs_the_real_model(pipe):
    for name in SCHEDULER_NAMES:
        out = pipe("a cat", output_type="latent", scheduler=name, **{**KW, "num_inference_steps": 2})
        assert np.isfinite(np.array(out.images)).all(), name


# ------------------------------------------------------------------------------------------------------ guidance
def _recording(p: StableDiffusionPipeline) -> list[int]:
    batches: list[int] = []
    unet = p.unet

    def rec(x, t, context):
        batches.append(context.shape[0])
        assert x.shape[0] == t.shape[0] == 1  # latents go in once, shared by the guidance's contexts
        return unet(x, t, context)

    p._models["unet"] = rec
    return batches


def test_guidance_at_or_below_one_is_a_single_conditional_pass(tiny_sd1):
    p = load_pipeline(tiny_sd1)
    batches = _recording(p)
    kw = {**KW, "num_inference_steps": 2, "scheduler": "euler", "output_type": "np"}
    results = {}
    for g in (0.0, 1.0, -2.5):
        batches.clear()
        results[g] = p("a cat", guidance_scale=g, **kw).images
        assert batches == [1, 1], g  # one image, conditional only
    assert np.array_equal(results[0.0], results[1.0]) and np.array_equal(results[1.0], results[-2.5])
    batches.clear()
    p("a cat", guidance_scale=7.5, **kw)
    assert batches == [2, 2]  # [uncond, cond] contexts for the one image
    with pytest.warns(UserWarning, match="guidance_scale=1.0 <= 1 disables classifier-free guidance: the "
                                         "negative prompt is ignored"):
        neg = p("a cat", negative_prompt="blurry", guidance_scale=1.0, **kw)
    assert np.array_equal(neg.images, results[1.0]) and neg.parameters[0].negative_prompt == ""
    for g in (1.0001, 7.5):
        batches.clear()
        out = p("a cat", guidance_scale=g, **kw).images
        assert batches == [2, 2], g  # [uncond, cond]
    assert not np.array_equal(out, results[1.0])
    for bad in (float("nan"), float("inf"), "7.5", None):
        check_raises_before_loading(load_pipeline(tiny_sd1), InvalidArgumentError, "guidance_scale must be a finite",
                              guidance_scale=bad)


# --------------------------------------------------------------------------------------------------- checkpoints
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_text_encoder(folder: Path, prefix: bool, position_ids: bool) -> None:
    from safetensors.numpy import load_file, save_file

    path = folder / "text_encoder" / "model.safetensors"
    tensors = load_file(str(path))
    out = {}
    for k, v in tensors.items():
        k = k.removeprefix("text_model.")
        if k.endswith("position_ids"):
            continue
        out[("text_model." if prefix else "") + k] = v
    if position_ids:
        out[("text_model." if prefix else "") + "embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(out, str(path))


@pytest.mark.parametrize("prefix,position_ids", [(True, True), (False, False), (True, False), (False, True)])
def test_text_encoder_key_layouts(pipe, tiny_sd1, tiny_sd1_noprefix, tmp_path, prefix, position_ids):
    if (prefix, position_ids) == (True, True):
        folder = tiny_sd1  # transformers 4 layout
    elif (prefix, position_ids) == (False, False):
        folder = tiny_sd1_noprefix  # transformers 5 layout
    else:
        folder = _copy(tiny_sd1, tmp_path / "ckpt")
        _rewrite_text_encoder(folder, prefix, position_ids)
    emb = load_pipeline(folder).encode_prompt(["a cat in the snow"])
    assert np.array_equal(np.array(emb), np.array(pipe.encode_prompt(["a cat in the snow"])))


def test_v_prediction_checkpoint_with_a_user_chosen_scheduler_follows_diffusers(tiny_sd2):
    """tiny_sd2 is v_prediction (DDIM config); with ``scheduler="euler"`` the prediction type still comes from the
    config, and the pipeline's loop (initial sigma, input scaling, step) reproduces diffusers' Euler on the same
    model outputs. (The full image against diffusers' pipeline: tests/test_pipeline_parity.py.)"""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    p = load_pipeline(tiny_sd2)
    assert p.scheduler_config["prediction_type"] == "v_prediction"
    assert get_scheduler("euler", p.scheduler_config).config.prediction_type == "v_prediction"
    record = []
    original = loop.guided_output

    def spy(unet, x, t, *rest):
        out = original(unet, x, t, *rest)
        record.append((np.array(x), t, np.array(out)))
        return out

    init = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "guided_output", spy)
        ours = np.array(p("a cat", **{**KW, "num_inference_steps": 3}, scheduler="euler", latents=init,
                          output_type="latent").images)
    ref = diffusers.EulerDiscreteScheduler.from_config(p.scheduler_config)
    assert ref.config.prediction_type == "v_prediction"
    ref.set_timesteps(3)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    lat = nchw(init) * ref.init_noise_sigma
    for (x, t, out), ref_t in zip(record, ref.timesteps):
        assert t == float(ref_t)
        np.testing.assert_allclose(x, ref.scale_model_input(lat, ref_t).numpy().transpose(0, 2, 3, 1), atol=1e-5)
        lat = ref.step(nchw(out), ref_t, lat).prev_sample
    err = np.abs(ours - lat.numpy().transpose(0, 2, 3, 1)).max()
    assert err < 1e-4, err


def _damage(folder: Path, kind: str) -> Path:
    unet = folder / "unet"
    weights = unet / "diffusion_pytorch_model.safetensors"
    if kind == "no_unet":
        shutil.rmtree(unet)
    elif kind == "config_not_json":
        (unet / "config.json").write_text('{"_class_name": "UNet2DConditionModel", ')
    elif kind == "no_weights":
        weights.unlink()
    elif kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "lying_header":
        data = weights.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        name = next(k for k in header if k != "__metadata__" and len(header[k]["shape"]) == 4)
        header[name]["shape"][0] *= 2  # the byte range no longer fits the shape
        raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        assert len(raw) == n
        weights.write_bytes(data[:8] + raw + data[8 + n:])
    elif kind == "nan":
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(weights))
        tensors["conv_in.weight"][0, 0, 0, 0] = np.nan
        save_file(tensors, str(weights))
    return weights


@pytest.mark.parametrize("kind,exc,message", [
    ("no_unet", ModelNotFoundError, "no unet/ folder; this is not a diffusers Stable Diffusion model folder"),
    ("config_not_json", ConfigError, "unet/config.json: not valid JSON"),
    ("no_weights", WeightLoadError, "unet: no diffusion_pytorch_model.safetensors"),
    ("truncated", WeightLoadError, "diffusion_pytorch_model.safetensors: truncated safetensors file"),
    ("lying_header", WeightLoadError, "diffusion_pytorch_model.safetensors: safetensors header lies about"),
])
def test_damaged_checkpoint_fails_at_load_pipeline(tiny_sd1, tmp_path, kind, exc, message):
    folder = _copy(tiny_sd1, tmp_path / "ckpt")
    _damage(folder, kind)
    with pytest.raises(exc, match=re.escape(message)) as e:
        load_pipeline(folder)
    assert str(folder) in str(e.value)


def test_nan_weight_fails_before_denoising(tiny_sd1, tmp_path):
    folder = _copy(tiny_sd1, tmp_path / "ckpt")
    weights = _damage(folder, "nan")
    p = load_pipeline(folder)
    steps = []
    with pytest.raises(WeightLoadError, match=re.escape(f"{weights}: weight 'conv_in.weight' contains NaN or Inf")):
        p("a cat", **KW, callback=lambda *a: steps.append(a))
    assert steps == [] and "unet" not in p.loaded_models


def test_model_names_that_are_neither_folder_nor_cached_repo(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="no such folder, and not a Hugging Face repo id"):
        load_pipeline(str(tmp_path / "missing" / "deeper" / "model"))
    with pytest.raises(ModelNotFoundError, match="not a Hugging Face repo id"):
        load_pipeline("not a repo id!")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError, match=re.escape("someone/some-model: not in the Hugging Face cache and "
                                                           "the Hub cannot be reached (offline=1)")) as e:
        load_pipeline("someone/some-model")
    assert "hf download someone/some-model" in str(e.value) and "--model PATH" in str(e.value)


# -------------------------------------------------------------------------------------------------------- output
def _main(args, capsys):
    code = txt2img.main([str(a) for a in args])
    return code, capsys.readouterr().err


def _no_loading(monkeypatch):
    monkeypatch.setattr(StableDiffusionPipeline, "_load", lambda self, name: pytest.fail("model loaded"))


def test_output_folder_missing(tiny_sd1, tmp_path, monkeypatch, capsys):
    _no_loading(monkeypatch)
    code, err = _main(["a cat", "--model", tiny_sd1, "--output", tmp_path / "nope" / "x.png"], capsys)
    assert code == 2 and f"{tmp_path / 'nope'}: output folder does not exist" in err
    assert not (tmp_path / "nope").exists()


def test_output_folder_read_only(tiny_sd1, tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root may write anywhere, so os.access says yes: simulate a read-only mount
            import sd_mlx.images as images

            real = images.os.access
            monkeypatch.setattr(images.os, "access",
                                lambda p, mode, **kw: False if Path(p) == ro else real(p, mode, **kw))
        _no_loading(monkeypatch)
        code, err = _main(["a cat", "--model", tiny_sd1, "--output", ro / "x.png"], capsys)
        assert code == 2 and f"{ro}: output folder is not writable" in err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_existing_file_is_not_touched(tiny_sd1, tmp_path, monkeypatch, capsys):
    _no_loading(monkeypatch)
    (tmp_path / "a-1.png").write_bytes(b"keep")
    code, err = _main(["a cat", "--model", tiny_sd1, "--output", tmp_path / "a.png", "--num-images", 2], capsys)
    assert code == 2 and "a-1.png: file exists; pass --overwrite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-1.png"] and (tmp_path / "a-1.png").read_bytes() == b"keep"


def test_ctrl_c_during_sampling(pipe, tiny_sd1, tmp_path, monkeypatch, capsys):
    def interrupt(i, t, latents):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe("a cat", **KW, callback=interrupt)
    # the CLI: Ctrl-C in the middle of a step -> exit 130, no file (not even a temporary one)
    monkeypatch.setattr(loop, "guided_output", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    code, err = _main(["a cat", "--model", tiny_sd1, "--output", tmp_path / "x.png", "--width", 64, "--height", 64],
                      capsys)
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------- float16
def test_float16_intermediates_are_finite(tiny_sd1):
    p = load_pipeline(tiny_sd1, dtype="float16")
    finite = []
    out = p("a cat", **{**KW, "num_inference_steps": 2}, scheduler="euler", output_type="np",
            callback=lambda i, t, lat: finite.append(bool(mx.all(mx.isfinite(lat)).item())))
    assert finite == [True, True] and np.isfinite(out.images).all()
    assert p.unet.conv_in.weight.dtype == mx.float16  # weights stay half (on the CPU it computes in float32)


def test_nonfinite_latents_and_images_raise(tiny_sd1, monkeypatch):
    p, _ = stubbed(tiny_sd1, fill=float("inf"))
    with pytest.raises(NonFiniteError, match=re.escape("NaN or Inf appeared during denoising (step 1 of 3); with "
                                                       "float16 this is usually overflow: run with dtype float32")):
        p("a cat", **{**KW, "num_inference_steps": 3}, scheduler="euler")
    p, _ = stubbed(tiny_sd1)
    vae = p.vae
    monkeypatch.setattr(type(vae), "decode", lambda self, z: mx.full((z.shape[0], 64, 64, 3), float("nan")))
    with pytest.raises(NonFiniteError, match=re.escape("NaN or Inf appeared during VAE decoding")):
        p("a cat", **KW)


# ------------------------------------------------------------------------------------------------ seeds, batches
@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
def test_batch_image_k_is_the_single_image_with_seed_plus_k(pipe, scheduler):
    kw = {**KW, "num_inference_steps": 2, "scheduler": scheduler, "output_type": "np"}
    batch = pipe("a cat", num_images_per_prompt=4, **{**kw, "seed": 11})
    assert batch.seeds == [11, 12, 13, 14]
    for k in range(4):
        alone = pipe("a cat", **{**kw, "seed": 11 + k}).images[0]
        assert np.array_equal(batch.images[k], alone), k  # bit-identical
    again = pipe("a cat", num_images_per_prompt=4, **{**kw, "seed": 11})
    assert np.array_equal(again.images, batch.images)
    assert not np.array_equal(batch.images[0], batch.images[1])


def test_seed_range(pipe, fresh):
    kw = {**KW, "output_type": "latent", "scheduler": "euler"}
    zero, one = (np.array(pipe("a cat", **{**kw, "seed": s}).images) for s in (0, 1))
    assert not np.array_equal(zero, one)
    top = pipe("a cat", num_images_per_prompt=2, **{**kw, "seed": 2**64 - 1})
    assert top.seeds == [2**64 - 1, 0]  # image k uses (seed + k) mod 2**64
    assert np.array_equal(np.array(top.images[1:]), zero)
    for bad in (2**64, -1, 1.5, "3"):
        check_raises_before_loading(fresh, InvalidArgumentError, "seed must be", seed=bad)
