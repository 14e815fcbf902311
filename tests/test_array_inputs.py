"""Every public entry point takes numpy arrays (any sensible dtype) exactly as it takes mx.array, and a wrong rank,
channel count or dtype kind is an InvalidArgumentError naming the argument and the expected shape.

The numpy results are compared with the mx.array results for the same values: equal bit for bit for float32 inputs
(the same computation), and within float32 rounding where the numpy input is float64 or float16 (converted once)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from sd_mlx import InvalidArgumentError, load_pipeline
from sd_mlx.arrays import float_array, int_array, timestep_array
from sd_mlx.schedulers import get_scheduler


@pytest.fixture(scope="module")
def pipe(tiny_sd1):
    return load_pipeline(tiny_sd1)


def _same(a: mx.array, b: mx.array) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert np.array_equal(np.array(a), np.array(b))


RNG = np.random.default_rng(0)
LAT = RNG.standard_normal((1, 8, 8, 4)).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, np.uint32])
def test_text_encoder_takes_numpy_ids(pipe, dtype):
    ids = pipe.tokenizer(["a red fox", ""])
    ref = pipe.text_encoder(ids).last_hidden_state
    got = pipe.text_encoder(np.array(ids).astype(dtype)).last_hidden_state
    _same(got, ref)


def test_text_encoder_rejects_bad_ids(pipe):
    with pytest.raises(InvalidArgumentError, match=r"input_ids must have shape \(B, T\) of token ids, got \(77,\)"):
        pipe.text_encoder(np.zeros(77, np.int32))
    with pytest.raises(InvalidArgumentError, match="input_ids must hold integers"):
        pipe.text_encoder(np.zeros((1, 77), np.float32))
    with pytest.raises(InvalidArgumentError, match="outside the int32 range"):
        pipe.text_encoder(np.full((1, 77), 2**40, np.int64))


def test_unet_takes_numpy(pipe):
    ctx = pipe.text_encoder(pipe.tokenizer(["a cat"])).last_hidden_state
    ref = pipe.unet(mx.array(LAT), mx.array([500.0]), ctx)
    _same(pipe.unet(LAT, 500, np.array(ctx)), ref)
    _same(pipe.unet(LAT, np.int64(500), np.array(ctx)), ref)
    _same(pipe.unet(LAT, np.array([500.0]), np.array(ctx)), ref)
    close = pipe.unet(LAT.astype(np.float64), 500.0, np.array(ctx).astype(np.float64))
    _same(close, ref)  # float64 is rounded to the same float32 values


def test_unet_rejects_bad_shapes(pipe):
    ctx = pipe.text_encoder(pipe.tokenizer(["a cat"])).last_hidden_state
    with pytest.raises(InvalidArgumentError, match=r"sample must have shape \(B, h, w, 4\) NHWC latents, got "
                                                   r"\(1, 4, 8, 8\)"):
        pipe.unet(LAT.transpose(0, 3, 1, 2), 500, ctx)
    with pytest.raises(InvalidArgumentError, match=r"encoder_hidden_states must have shape \(B, T, 32\)"):
        pipe.unet(LAT, 500, np.zeros((1, 77, 16), np.float32))
    with pytest.raises(InvalidArgumentError, match="sample must hold real numbers, got booleans"):
        pipe.unet(LAT > 0, 500, ctx)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_vae_decode_and_encode_take_numpy(pipe, dtype):
    z = LAT.astype(dtype)
    ref = pipe.vae.decode(mx.array(z.astype(np.float32)))
    got = pipe.vae.decode(z)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=0, atol=1e-6)
    img = np.clip(RNG.standard_normal((1, 64, 64, 3)), -1, 1).astype(dtype)
    ref_enc = pipe.vae.encode(mx.array(img.astype(np.float32))).mean
    np.testing.assert_allclose(np.array(pipe.vae.encode(img).mean), np.array(ref_enc), rtol=0, atol=1e-6)


def test_vae_rejects_bad_shapes(pipe):
    with pytest.raises(InvalidArgumentError, match=r"z must have shape \(B, h, w, 4\) NHWC latents, got \(8, 8, 4\)"):
        pipe.vae.decode(LAT[0])
    with pytest.raises(InvalidArgumentError, match=r"x must have shape \(B, H, W, 3\) NHWC images, got"):
        pipe.vae.encode(np.zeros((1, 64, 64, 4), np.float32))


def test_taesd_takes_numpy(assets):
    from sd_mlx.models.taesd import load_taesd

    taesd = load_taesd(assets / "taesd")
    ref = taesd.decode(mx.array(LAT))
    _same(taesd.decode(LAT), ref)
    img = np.zeros((1, 64, 64, 3), np.uint8)  # integers are converted like any real numbers
    _same(taesd.encode(img), taesd.encode(mx.zeros((1, 64, 64, 3))))
    with pytest.raises(InvalidArgumentError, match=r"TAESD decode input must have shape \(B, H, W, 4\) NHWC"):
        taesd.decode(LAT[..., :3])


@pytest.mark.parametrize("name", ["euler", "ddim", "dpmpp_2m_karras", "euler_a", "pndm"])
def test_scheduler_step_takes_numpy(pipe, name):
    def run(convert):
        sched = get_scheduler(name, pipe.scheduler_config)
        sched.set_timesteps(4)
        x = convert(LAT * sched.init_noise_sigma)
        out = []
        for i in range(2):
            xin = sched.scale_model_input(x, i)
            noise = convert(LAT) if sched.needs_noise else None
            x = sched.step(convert(np.array(xin) * 0.5), i, x, noise=noise)
            out.append(np.array(x))
        noisy = sched.add_noise(convert(LAT), convert(LAT), sched.timesteps[:1])
        return out, np.array(noisy)

    ref = run(mx.array)
    got = run(lambda a: np.asarray(a))
    for a, b in zip(ref[0] + [ref[1]], got[0] + [got[1]]):
        assert np.array_equal(a, b)


def test_scheduler_rejects_bad_inputs(pipe):
    sched = get_scheduler("euler", pipe.scheduler_config)
    sched.set_timesteps(4)
    with pytest.raises(InvalidArgumentError, match="model_output must hold real numbers"):
        sched.step(np.array([["a"]]), 0, LAT)
    with pytest.raises(InvalidArgumentError, match=r"noise must have shape \(1, 8, 8, 4\)"):
        sched.add_noise(LAT, LAT[..., :2], sched.timesteps[:1])


def test_pipeline_latents_take_numpy(pipe):
    kw = dict(num_inference_steps=2, height=64, width=64, seed=0, output_type="latent", scheduler="euler")
    ref = pipe("a cat", latents=mx.array(LAT), **kw).images
    for lat in (LAT, LAT.astype(np.float64)):
        _same(pipe("a cat", latents=lat, **kw).images, ref)
    with pytest.raises(InvalidArgumentError, match=r"latents must have shape \(1, 8, 8, 4\) \(B, h, w, C\) for 1 "
                                                   r"images of 64x64, got \(1, 4, 8, 8\)"):
        pipe("a cat", latents=LAT.transpose(0, 3, 1, 2), **kw)


def test_conversion_helpers():
    assert float_array(np.float64(2.5), "t").dtype == mx.float32
    assert float_array(np.zeros(3, np.float16), "x").dtype == mx.float16
    x = mx.zeros((2, 3))
    assert float_array(x, "x") is x  # no copy when nothing changes
    assert int_array([[1, 2]], "ids").dtype == mx.int32
    with pytest.raises(InvalidArgumentError, match="x must hold real numbers, got Python objects"):
        float_array(object(), "x", (1,))
    with pytest.raises(InvalidArgumentError, match="x must hold real numbers, got complex"):
        float_array(np.zeros(2, np.complex64), "x")
    assert timestep_array(7, "timestep", 3).tolist() == [7.0, 7.0, 7.0]
    with pytest.raises(InvalidArgumentError, match=r"timestep must be a scalar or have shape \(3,\)"):
        timestep_array(np.zeros(2), "timestep", 3)
