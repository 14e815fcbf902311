"""Parity of sd_mlx's U-Net with diffusers' ``UNet2DConditionModel``, plus loading errors.

Reference models are tiny diffusers U-Nets (random init with ``torch.manual_seed``, every parameter perturbed so
the zero-initialised ones matter too), saved with ``save_pretrained(safe_serialization=True)`` and loaded with
:func:`sd_mlx.models.unet.load_unet`. Inputs are converted NCHW <-> NHWC only here.

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
from sd_mlx.models.unet import UNetConfig, load_unet  # noqa: E402

TOL32 = 1e-4
TOL16 = 2e-2
WEIGHTS = "diffusion_pytorch_model.safetensors"

SD1_STYLE = dict(  # conv projection, int attention_head_dim (= number of heads), 4 blocks like SD 1.x
    block_out_channels=(16, 32, 32, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2, cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8, sample_size=32,
)
SD2_STYLE = dict(  # linear projection, per-block head counts, upcast_attention, per-block transformer depth
    block_out_channels=(16, 32, 48, 48),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1, cross_attention_dim=40, attention_head_dim=[2, 4, 6, 6], norm_num_groups=8,
    use_linear_projection=True, upcast_attention=True, transformer_layers_per_block=[1, 2, 1, 1], sample_size=32,
)
INPAINT_STYLE = dict(SD1_STYLE, in_channels=9, block_out_channels=(16, 32, 32), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def make_reference(folder: Path, seed: int = 0, **config):
    """Build, perturb, save (safetensors) and return a diffusers U-Net in eval mode."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def run_both(ref, ours, sample_nchw, timestep, context, dtype=mx.float32):
    with torch.no_grad():
        t_ref = torch.tensor(timestep) if isinstance(timestep, list) else timestep
        expected = ref(sample_nchw, t_ref, context).sample.permute(0, 2, 3, 1).numpy()
    t_ours = mx.array(timestep) if isinstance(timestep, list) else timestep
    got = ours(mx.array(sample_nchw.permute(0, 2, 3, 1).numpy()), t_ours, mx.array(context.numpy()).astype(dtype))
    return np.array(got.astype(mx.float32)), expected


def max_err(got, expected):
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max()), float(expected.std())


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet_sd1")
    return make_reference(folder, seed=0, **SD1_STYLE), folder


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet_sd2")
    return make_reference(folder, seed=1, **SD2_STYLE), folder


# Every timestep form on the square size; two timesteps on the others (MLX's CPU exp makes big attention slow).
CASES = [((32, 32), (999, 500.5, 1, [10, 700])), ((40, 56), (999, 1)), ((33, 45), (500.5, [3, 999]))]


@pytest.mark.parametrize("style", ["sd1", "sd2"])
@pytest.mark.parametrize("size,timesteps", CASES, ids=[f"{h}x{w}" for (h, w), _ in CASES])
def test_parity_float32(style, size, timesteps, request):
    ref, folder = request.getfixturevalue(style)
    ours = load_unet(folder, "float32")
    torch.manual_seed(10)
    sample = torch.randn(2, 4, *size)
    context = torch.randn(2, 7, ref.config.cross_attention_dim)
    for t in timesteps:
        got, expected = run_both(ref, ours, sample, t, context)
        err, std = max_err(got, expected)
        assert err <= TOL32 * max(1.0, std), f"{style} {size} t={t}: max abs error {err:.3g} (std {std:.3g})"


# First down block without attention: the rows are shared through a whole block, its skips joined repeated.
LATE_CROSS_STYLE = dict(SD1_STYLE, block_out_channels=(16, 32, 32), layers_per_block=1,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


@pytest.mark.parametrize("style", ["sd1", "sd2", "late_cross"])
def test_shared_latents_match_repeated_ones(style, request, tmp_path):
    """Latents shared by several contexts (classifier-free guidance's [uncond, cond]) give diffusers' output for
    the repeated batch (tolerance TOL32 of the std), and the same as passing the repeated batch to sd_mlx (1e-5
    relative: only the order of float32 sums differs); per-latent timesteps follow their latents."""
    if style == "late_cross":
        ref, folder = make_reference(tmp_path, seed=3, **LATE_CROSS_STYLE), tmp_path
    else:
        ref, folder = request.getfixturevalue(style)
    ours = load_unet(folder, "float32")
    torch.manual_seed(13)
    sample = torch.randn(2, 4, 16, 24)
    context = torch.randn(6, 7, ref.config.cross_attention_dim)  # 3 contexts per latent
    repeated = torch.cat([sample] * 3)
    with torch.no_grad():
        expected = ref(repeated, torch.tensor([10.0, 700.0] * 3), context).sample.permute(0, 2, 3, 1).numpy()
    shared = np.array(ours(mx.array(sample.permute(0, 2, 3, 1).numpy()), mx.array([10.0, 700.0]),
                           mx.array(context.numpy())))
    full = np.array(ours(mx.array(repeated.permute(0, 2, 3, 1).numpy()), mx.array([10.0, 700.0] * 3),
                         mx.array(context.numpy())))
    err, std = max_err(shared, expected)
    assert err <= TOL32 * max(1.0, std), f"{style}: max abs error {err:.3g} (std {std:.3g})"
    np.testing.assert_allclose(shared, full, rtol=0, atol=1e-5 * np.abs(full).max())


def test_shared_latents_bad_counts(sd1):
    _, folder = sd1
    ours = load_unet(folder, "float32")
    x, ctx = mx.zeros((2, 16, 16, 4)), mx.zeros((3, 7, 24))
    with pytest.raises(ValueError, match="3 rows for 2 rows of sample"):
        ours(x, 1, ctx)
    with pytest.raises(ValueError, match="sample has no rows"):
        ours(mx.zeros((0, 16, 16, 4)), 1, mx.zeros((0, 7, 24)))
    with pytest.raises(ValueError, match="timestep has 4 values; expected 1 or one per row of sample"):
        ours(x, mx.array([1.0, 2.0, 3.0, 4.0]), mx.zeros((4, 7, 24)))


def test_inpainting_in_channels_9(tmp_path):
    ref = make_reference(tmp_path, seed=2, **INPAINT_STYLE)
    ours = load_unet(tmp_path)
    assert ours.config.in_channels == 9
    torch.manual_seed(11)
    sample, context = torch.randn(2, 9, 24, 20), torch.randn(2, 5, 24)
    got, expected = run_both(ref, ours, sample, 321, context)
    err, std = max_err(got, expected)
    assert got.shape == (2, 24, 20, 4)
    assert err <= TOL32 * max(1.0, std), f"max abs error {err:.3g}"


def test_float16_close(sd2):
    ref, folder = sd2
    ours = load_unet(folder, "float16")
    assert ours.dtype == mx.float16
    torch.manual_seed(12)
    sample, context = torch.randn(2, 4, 24, 40), torch.randn(2, 7, 40)
    got, expected = run_both(ref, ours, sample, 500, context, dtype=mx.float16)
    assert np.isfinite(got).all()
    err, std = max_err(got, expected)
    assert err <= TOL16 * max(1.0, std), f"float16 max abs error {err:.3g} (std {std:.3g})"


def test_config_reading_of_real_configs():
    root = Path(os.environ.get("SD_MLX_ASSETS", Path(__file__).resolve().parents[1] / ".." / "shared" / "assets"))
    folder = root / "configs"
    if not folder.is_dir():
        pytest.skip(f"shared assets not found at {root} (set SD_MLX_ASSETS)")
    for name, heads, linear in [("stable-diffusion-v1-5", (8, 8, 8, 8), False),
                                ("stable-diffusion-2-1", (5, 10, 20, 20), True),
                                ("stable-diffusion-inpainting", (8, 8, 8, 8), False)]:
        path = folder / name / "unet" / "config.json"
        cfg = UNetConfig.from_dict(json.loads(path.read_text()), str(path))
        assert cfg.heads == heads and cfg.use_linear_projection == linear
    path = folder / "stable-diffusion-xl-base-1.0" / "unet" / "config.json"
    with pytest.raises(ConfigError, match="addition_embed_type"):
        UNetConfig.from_dict(json.loads(path.read_text()), str(path))


# ----------------------------------------------------------------------------------------------- loading errors

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet_tiny")
    make_reference(folder, seed=3, **INPAINT_STYLE)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_key(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path / "unet")
    weights = load_file(folder / WEIGHTS)
    del weights["mid_block.attentions.0.proj_in.weight"]
    save_file(weights, folder / WEIGHTS)
    with pytest.raises(WeightLoadError, match=r"mid_block\.attentions\.0\.proj_in\.weight"):
        load_unet(folder)


def test_wrong_shape(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path / "unet")
    weights = load_file(folder / WEIGHTS)
    weights["conv_in.weight"] = np.zeros((16, 4, 3, 3), np.float32)  # config says 9 input channels
    save_file(weights, folder / WEIGHTS)
    with pytest.raises(WeightLoadError, match=r"conv_in\.weight"):
        load_unet(folder)


def test_unknown_key(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path / "unet")
    weights = load_file(folder / WEIGHTS)
    weights["add_embedding.linear_1.weight"] = np.zeros((4, 4), np.float32)
    save_file(weights, folder / WEIGHTS)
    with pytest.raises(WeightLoadError, match=r"add_embedding\.linear_1\.weight"):
        load_unet(folder)


@pytest.mark.parametrize("field,value", [
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("addition_embed_type", "text_time"),
    ("time_cond_proj_dim", 256),
    ("only_cross_attention", True),
    ("dual_cross_attention", True),
    ("resnet_time_scale_shift", "scale_shift"),
    ("num_attention_heads", 8),
    ("act_fn", "gelu"),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
])
def test_unsupported_config_field(tiny_folder, tmp_path, field, value):
    folder = _copy(tiny_folder, tmp_path / "unet")
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=field):
        load_unet(folder)


# ----------------------------------------------------------------------------------------------- full size (slow)

def _assets() -> Path:
    root = Path(os.environ.get("SD_MLX_ASSETS", Path(__file__).resolve().parents[1] / ".." / "shared" / "assets"))
    if not (root / "configs").is_dir():
        pytest.skip(f"shared assets not found at {root} (set SD_MLX_ASSETS)")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stable-diffusion-v1-5", "stable-diffusion-2-1"])
def test_full_size_parity(name, tmp_path):
    """Real SD 1.5 / 2.1 U-Net configs, random weights, 64x64 latents, batch 2, float32."""
    cfg = json.loads((_assets() / "configs" / name / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel.from_config(cfg).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_unet(tmp_path, "float32")
    sample = torch.randn(2, 4, 64, 64)
    context = torch.randn(2, 77, cfg["cross_attention_dim"])
    got, expected = run_both(ref, ours, sample, 981, context)
    err, std = max_err(got, expected)
    print(f"{name}: max abs error {err:.3g} (output std {std:.3g})")
    assert err <= TOL32 * max(1.0, std), f"{name}: max abs error {err:.3g} (std {std:.3g})"  # measured ~1.1e-5
