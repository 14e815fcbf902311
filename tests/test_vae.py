"""Parity of sd_mlx's ``AutoencoderKL`` with diffusers' (encode mean/logvar and decode), key-name variants,
dtype rule and config errors.

Reference: a tiny diffusers ``AutoencoderKL`` with 4 blocks (so ``vae_scale_factor`` is 8 as in SD), random init
with ``torch.manual_seed``, every parameter perturbed, saved with ``save_pretrained(safe_serialization=True)`` and
loaded with :func:`sd_mlx.models.vae.load_vae`. NCHW <-> NHWC conversion happens only here.

Tolerance (float32): max |ours - diffusers| <= 1e-4 * max(1, std(diffusers output)).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from sd_mlx.errors import ConfigError, WeightLoadError  # noqa: E402
from sd_mlx.models.vae import DiagonalGaussianDistribution, VAEConfig, load_vae  # noqa: E402

TOL32 = 1e-4
WEIGHTS = "diffusion_pytorch_model.safetensors"
TINY = dict(block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, layers_per_block=1, latent_channels=4,
            sample_size=64)


def make_reference(folder: Path, seed: int = 0, **config):
    """Build, perturb, save (safetensors) and return a diffusers AutoencoderKL in eval mode."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def nhwc(t) -> mx.array:
    return mx.array(t.permute(0, 2, 3, 1).numpy())


def check(got: mx.array, expected, what: str, tol: float = TOL32) -> float:
    got_np = np.array(got.astype(mx.float32))
    exp_np = expected.permute(0, 2, 3, 1).numpy()
    assert got_np.shape == exp_np.shape, what
    err, std = float(np.abs(got_np - exp_np).max()), float(exp_np.std())
    assert err <= tol * max(1.0, std), f"{what}: max abs error {err:.3g} (std {std:.3g})"
    return err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae_tiny")
    return make_reference(folder, **TINY), folder


@pytest.mark.parametrize("latent_hw", [(5, 7), (4, 4)])
def test_decode_parity(tiny, latent_hw):
    ref, folder = tiny
    ours = load_vae(folder)
    assert ours.vae_scale_factor == 8 and ours.dtype == mx.float32
    torch.manual_seed(1)
    z = torch.randn(2, 4, *latent_hw)
    with torch.no_grad():
        expected = ref.decode(z).sample
    got = ours.decode(nhwc(z))
    assert got.shape == (2, 8 * latent_hw[0], 8 * latent_hw[1], 3)
    check(got, expected, f"decode {latent_hw}")


@pytest.mark.parametrize("image_hw", [(40, 56), (44, 60)])  # 44x60 is not a multiple of 8: floors like diffusers
def test_encode_parity(tiny, image_hw):
    ref, folder = tiny
    ours = load_vae(folder)
    torch.manual_seed(2)
    x = torch.rand(2, 3, *image_hw) * 2 - 1
    with torch.no_grad():
        post = ref.encode(x).latent_dist
    got = ours.encode(nhwc(x))
    check(got.mean, post.mean, "posterior mean")
    check(got.logvar, post.logvar, "posterior logvar")
    check(got.std, post.std, "posterior std")
    check(got.mode(), post.mode(), "posterior mode")


@pytest.mark.parametrize("budget", [20_000, 200_000])
def test_strip_paths_parity(tiny, budget, monkeypatch):
    """With a tiny strip budget, the large-input paths (streamed resnets, strip-wise GroupNorm statistics, strip
    convolutions with the fused x2 upsample, streamed norm_out + conv_out) run on a small model: decode and encode
    still match diffusers at TOL32."""
    from sd_mlx import ops
    from sd_mlx.models import layers

    ref, folder = tiny
    ours = load_vae(folder)
    calls = []
    real = ops.conv3x3_strips
    for module in (layers, ops):  # the resnets' norm + SiLU strips, and the convolutions' own
        monkeypatch.setattr(module, "conv3x3_strips", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(ops, "CONV_UNFOLD_BUDGET_BYTES", budget)
    torch.manual_seed(3)
    z = torch.randn(1, 4, 6, 5)
    x = torch.rand(1, 3, 40, 48) * 2 - 1
    with torch.no_grad():
        expected = ref.decode(z).sample
        post = ref.encode(x).latent_dist
    check(ours.decode(nhwc(z)), expected, f"strip decode (budget {budget})")
    check(ours.encode(nhwc(x)).mean, post.mean, f"strip encode (budget {budget})")
    assert any(k.get("prologue") for k in calls) and any(k.get("upsample2x") for k in calls)


def test_posterior_sample_and_clamp():
    moments = mx.concatenate([mx.zeros((1, 2, 3, 4)), mx.full((1, 2, 3, 4), 100.0)], axis=-1)
    post = DiagonalGaussianDistribution(moments)
    assert float(post.logvar.max()) == 20.0
    low = DiagonalGaussianDistribution(mx.concatenate([mx.ones((1, 2, 3, 4)), mx.full((1, 2, 3, 4), -100.0)], -1))
    assert float(low.logvar.min()) == -30.0
    key = mx.random.key(0)
    a, b = low.sample(key), low.sample(key)
    assert a.shape == (1, 2, 3, 4) and bool(mx.array_equal(a, b))
    assert np.allclose(np.array(a), 1.0, atol=1e-5)  # std = exp(-15)


def test_old_attention_key_names(tiny, tmp_path):
    """Checkpoints saved before diffusers 0.14 use query/key/value/proj_attn, sometimes as 1x1 conv kernels."""
    ref, folder = tiny
    shutil.copytree(folder, tmp_path / "vae")
    weights = load_file(tmp_path / "vae" / WEIGHTS)
    renamed = {}
    for k, v in weights.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                if k.startswith("decoder") and v.ndim == 2:
                    v = v[:, :, None, None]  # conv-style storage in the decoder, linear in the encoder
        renamed[k] = np.ascontiguousarray(v)
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in renamed
    assert renamed["decoder.mid_block.attentions.0.query.weight"].ndim == 4
    save_file(renamed, tmp_path / "vae" / WEIGHTS)
    ours = load_vae(tmp_path / "vae")
    torch.manual_seed(3)
    z = torch.randn(1, 4, 4, 6)
    with torch.no_grad():
        expected = ref.decode(z).sample
    check(ours.decode(nhwc(z)), expected, "decode with old key names")
    x = torch.rand(1, 3, 32, 40) * 2 - 1
    with torch.no_grad():
        expected_mean = ref.encode(x).latent_dist.mean
    check(ours.encode(nhwc(x)).mean, expected_mean, "encode with old key names")


def test_optional_parts_disabled(tmp_path):
    """mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False (diffusers options)."""
    ref = make_reference(tmp_path, seed=4, **dict(TINY, block_out_channels=(8, 16, 16), norm_num_groups=4,
                                                  down_block_types=("DownEncoderBlock2D",) * 3,
                                                  up_block_types=("UpDecoderBlock2D",) * 3,
                                                  mid_block_add_attention=False, use_quant_conv=False,
                                                  use_post_quant_conv=False))
    ours = load_vae(tmp_path)
    assert ours.vae_scale_factor == 4
    torch.manual_seed(5)
    z, x = torch.randn(2, 4, 5, 6), torch.rand(2, 3, 20, 24) * 2 - 1
    with torch.no_grad():
        dec, mean = ref.decode(z).sample, ref.encode(x).latent_dist.mean
    check(ours.decode(nhwc(z)), dec, "decode")
    check(ours.encode(nhwc(x)).mean, mean, "encode mean")


def test_float16_and_force_upcast(tiny, tmp_path):
    ref, folder = tiny
    assert load_vae(folder, "float16").dtype == mx.float32  # force_upcast defaults to true, as in diffusers
    assert load_vae(folder, "bfloat16").dtype == mx.bfloat16  # diffusers upcasts float16 only
    shutil.copytree(folder, tmp_path / "vae")
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    cfg["force_upcast"] = False
    (tmp_path / "vae" / "config.json").write_text(json.dumps(cfg))
    ours = load_vae(tmp_path / "vae", "float16")
    assert ours.dtype == mx.float16
    torch.manual_seed(6)
    z = torch.randn(2, 4, 4, 5)
    with torch.no_grad():
        expected = ref.decode(z).sample
    got = ours.decode(nhwc(z))
    assert got.dtype == mx.float16 and bool(mx.all(mx.isfinite(got)))
    check(got, expected, "float16 decode", tol=2e-2)


@pytest.mark.parametrize("field,value", [
    ("down_block_types", ["AttnDownEncoderBlock2D"] * 4),
    ("up_block_types", ["UpDecoderBlock2D"] * 3 + ["AttnUpDecoderBlock2D"]),
    ("act_fn", "gelu"),
    ("latents_mean", [0.0, 0.0, 0.0, 0.0]),
    ("latents_std", [1.0, 1.0, 1.0, 1.0]),
])
def test_unsupported_config_field(tiny, tmp_path, field, value):
    _, folder = tiny
    shutil.copytree(folder, tmp_path / "vae")
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "vae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=field):
        load_vae(tmp_path / "vae")


def test_weight_errors_name_the_key(tiny, tmp_path):
    _, folder = tiny
    shutil.copytree(folder, tmp_path / "vae")
    path = tmp_path / "vae" / WEIGHTS
    weights = load_file(path)
    del weights["decoder.conv_out.bias"]
    save_file(weights, path)
    with pytest.raises(WeightLoadError, match=r"decoder\.conv_out\.bias"):
        load_vae(tmp_path / "vae")
    weights = load_file(folder / WEIGHTS)
    weights["post_quant_conv.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    save_file(weights, path)
    with pytest.raises(WeightLoadError, match=r"post_quant_conv\.weight"):
        load_vae(tmp_path / "vae")


def _assets() -> Path:
    root = Path(os.environ.get("SD_MLX_ASSETS", Path(__file__).resolve().parents[1] / ".." / "shared" / "assets"))
    if not (root / "configs").is_dir():
        pytest.skip(f"shared assets not found at {root} (set SD_MLX_ASSETS)")
    return root


def test_real_configs():
    for name, scale, upcast in [("stable-diffusion-v1-5", 0.18215, True),
                                ("stable-diffusion-2-1", 0.18215, True),
                                ("stable-diffusion-xl-base-1.0", 0.13025, True)]:
        path = _assets() / "configs" / name / "vae" / "config.json"
        cfg = VAEConfig.from_dict(json.loads(path.read_text()), str(path))
        assert cfg.block_out_channels == (128, 256, 512, 512)
        assert cfg.scaling_factor == scale and cfg.force_upcast is upcast and cfg.shift_factor is None


@pytest.mark.slow
def test_full_size_decode(tmp_path):
    """Real SD 1.5 VAE config, random weights, 16x24 latents (128x192 image) and a 64x96 encode, float32.
    Tolerance 5e-4 (measured: decode 5.0e-5, encode 5e-6): errors grow with the 512-channel full-size stack."""
    cfg = json.loads((_assets() / "configs" / "stable-diffusion-v1-5" / "vae" / "config.json").read_text())
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL.from_config(cfg).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_vae(tmp_path)
    z = torch.randn(1, 4, 16, 24)
    with torch.no_grad():
        expected = ref.decode(z).sample
    check(ours.decode(nhwc(z)), expected, "full-size decode", tol=5e-4)
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        post = ref.encode(x).latent_dist
    got = ours.encode(nhwc(x))
    check(got.mean, post.mean, "full-size encode mean", tol=5e-4)
    check(got.logvar, post.logvar, "full-size encode logvar", tol=5e-4)
