"""TAESD (``sd_mlx.models.taesd``) against diffusers' ``AutoencoderTiny`` with the real TAESD weights.

Tolerance: float32, max abs error <= 1e-4 for decode (images, range about [-1, 1]) and encode (raw latents, range
about [-3, 3]). The real weights are bf16 files; both sides cast the same values to float32.
Round-trip PSNR (encode -> decode, no 8-bit latent quantisation) on real photos is printed and asserted > 20 dB
(TAESD typically gives 25-31 dB): at 256x256 in the default run, at 512x512 in the slow run.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import sd_mlx  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx

from conftest import assets_dir, require_reference_libs
from sd_mlx.errors import ConfigError, InvalidArgumentError, ModelNotFoundError, WeightLoadError
from sd_mlx.loading.keymaps.taesd import taesd_decoder_keymap, taesd_encoder_keymap, taesd_keymap
from sd_mlx.models.taesd import AutoencoderTiny, TAESDConfig, load_taesd

TOL = 1e-4


def _weights_dir() -> Path:
    path = assets_dir() / "taesd"
    if not (path / "taesd_decoder.safetensors").is_file():
        pytest.skip(f"{path}: TAESD weights not found")
    return path


def _reference(name: str = "taesd"):
    """diffusers AutoencoderTiny from the real config, loaded with the original-layout weights (keys mapped here)."""
    require_reference_libs()
    import torch
    from diffusers import AutoencoderTiny as RefTiny
    from safetensors.torch import load_file

    torch.manual_seed(0)
    ref = RefTiny.from_config(RefTiny.load_config(str(assets_dir() / "configs" / "taesd"))).eval()
    state = {}
    for k, v in load_file(str(_weights_dir() / f"{name}_encoder.safetensors")).items():
        state[f"encoder.layers.{k}"] = v.float()
    for k, v in load_file(str(_weights_dir() / f"{name}_decoder.safetensors")).items():
        i, rest = k.split(".", 1)
        state[f"decoder.layers.{int(i) - 1}.{rest}"] = v.float()
    ref.load_state_dict(state, strict=True)
    return ref


def _nchw(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32)).transpose(0, 3, 1, 2)


def _nhwc(t) -> mx.array:
    return mx.array(t.permute(0, 2, 3, 1).contiguous().numpy())


def _photo(name: str, size: int) -> np.ndarray:
    """A real photo, resized (short side) and centre-cropped to ``size``; ``(1, size, size, 3)`` float32 in [-1, 1]."""
    from PIL import Image

    with Image.open(assets_dir() / "images" / name) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return arr[None]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images in [-1, 1] (compared in [0, 1], reconstruction clipped)."""
    a01 = (np.clip(a, -1, 1) + 1) / 2
    b01 = (np.clip(b, -1, 1) + 1) / 2
    mse = float(np.mean((a01 - b01) ** 2))
    return 10 * math.log10(1.0 / mse)


@pytest.fixture(scope="module")
def ref():
    return _reference()


@pytest.fixture(scope="module")
def model() -> AutoencoderTiny:
    return load_taesd(_weights_dir())


# ------------------------------------------------------------------------------------------------------- configs

def test_config_defaults_match_real_config() -> None:
    path = assets_dir() / "configs" / "taesd" / "config.json"
    cfg = TAESDConfig.from_dict(json.loads(path.read_text()), str(path))
    assert cfg == TAESDConfig()
    assert cfg.scaling_factor == 1.0 and cfg.latent_magnitude == 3 and cfg.latent_shift == 0.5
    assert cfg.downscale_factor == 8 and cfg.upscale_factor == 8


@pytest.mark.parametrize("field, value, words", [
    ("_class_name", "AutoencoderKL", "_class_name"),
    ("upsample_fn", "bilinear", "upsample_fn"),
    ("act_fn", "tanh", "act_fn"),
    ("encoder_block_out_channels", [32, 64, 64, 64], "encoder_block_out_channels"),
    ("num_decoder_blocks", [3, 3, 3], "num_decoder_blocks"),
    ("latent_channels", "4", "latent_channels"),
])
def test_config_errors(field: str, value, words: str) -> None:
    d = json.loads((assets_dir() / "configs" / "taesd" / "config.json").read_text())
    d[field] = value
    with pytest.raises(ConfigError, match=words):
        TAESDConfig.from_dict(d, "x/config.json")


# ---------------------------------------------------------------------------------------------------- key maps

def test_keymaps_are_pure_and_map_layouts() -> None:
    w = mx.zeros((8, 3, 3, 3))
    (k, v), = taesd_encoder_keymap("0.weight", w)
    assert k == "encoder.layers.0.weight" and v.shape == (8, 3, 3, 3)
    (k, v), = taesd_decoder_keymap("19.weight", mx.zeros((3, 64, 3, 3)))
    assert k == "decoder.layers.18.weight" and v.shape == (3, 3, 3, 64)
    (k, v), = taesd_decoder_keymap("3.conv.4.bias", mx.zeros((64,)))
    assert k == "decoder.layers.2.conv.4.bias"
    (k, v), = taesd_keymap("encoder.layers.1.conv.0.weight", mx.zeros((64, 64, 3, 3)))
    assert k == "encoder.layers.1.conv.0.weight" and v.shape == (64, 3, 3, 64)
    assert taesd_decoder_keymap("0.weight", w)[0][0] == "0.weight"  # no index 0 in a decoder: left as unknown


# ------------------------------------------------------------------------------------------------------ parity

def test_decode_parity(ref, model: AutoencoderTiny) -> None:
    import torch

    z = torch.randn(2, 4, 12, 16, generator=torch.Generator().manual_seed(1)) * 2.0
    z[0, :, 0, 0] = 9.0  # exercises the tanh clamp
    with torch.no_grad():
        expected = ref.decode(z).sample.numpy()
    got = _nchw(model.decode(_nhwc(z)))
    assert got.shape == expected.shape == (2, 3, 96, 128)
    err = float(np.abs(got - expected).max())
    print(f"\nTAESD decode max abs error: {err:.2e} (output range {np.abs(expected).max():.2f})")
    assert err <= TOL


def test_encode_parity(ref, model: AutoencoderTiny) -> None:
    import torch

    x = np.concatenate([_photo("cat.jpeg", 128), _photo("dog.jpeg", 128)])
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        expected = ref.encode(xt).latents.numpy()
    got = _nchw(model.encode(mx.array(x)))
    assert got.shape == expected.shape == (2, 4, 16, 16)
    err = float(np.abs(got - expected).max())
    print(f"\nTAESD encode max abs error: {err:.2e} (latent range {np.abs(expected).max():.2f})")
    assert err <= TOL


def test_scale_unscale_and_forward(ref, model: AutoencoderTiny) -> None:
    import torch

    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 4
    s_ref = ref.scale_latents(z).numpy()
    s = _nchw(model.scale_latents(_nhwc(z)))
    np.testing.assert_allclose(s, s_ref, atol=1e-6)
    np.testing.assert_allclose(_nchw(model.unscale_latents(_nhwc(torch.from_numpy(s_ref)))),
                               ref.unscale_latents(torch.from_numpy(s_ref)).numpy(), atol=1e-6)
    # diffusers' forward: encode, 8-bit latents, decode. A latent within float error of a rounding boundary may
    # land on the neighbouring 8-bit level, so compare loosely.
    x = _photo("dog.jpeg", 64)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).sample.numpy()
    got = _nchw(model(mx.array(x)))
    assert float(np.abs(got - expected).mean()) < 1e-3


def test_diffusers_folder_layout(ref, tmp_path: Path) -> None:
    """save_pretrained of the reference -> load_taesd(folder) through TAESD_SPEC; also float16 loading."""
    import torch

    ref.save_pretrained(str(tmp_path / "taesd"), safe_serialization=True)
    model = load_taesd(tmp_path / "taesd")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref.decode(z).sample.numpy()
    assert float(np.abs(_nchw(model.decode(_nhwc(z))) - expected).max()) <= TOL
    half = load_taesd(tmp_path / "taesd", dtype="float16")
    assert half.dtype == mx.float16
    out16 = _nchw(half.decode(_nhwc(z)))
    assert float(np.abs(out16 - expected).max()) < 0.05


def test_taesdxl_original_layout() -> None:
    import torch

    ref = _reference("taesdxl")
    model = load_taesd(_weights_dir(), name="taesdxl")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ref.decode(z).sample.numpy()
    assert float(np.abs(_nchw(model.decode(_nhwc(z))) - expected).max()) <= TOL


# ---------------------------------------------------------------------------------------- loading and errors

def test_decoder_only(ref, tmp_path: Path) -> None:
    import torch

    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref.decode(z).sample.numpy()
    from_file = load_taesd(_weights_dir() / "taesd_decoder.safetensors")
    shutil.copy(_weights_dir() / "taesd_decoder.safetensors", tmp_path / "taesd_decoder.safetensors")
    from_folder = load_taesd(tmp_path)
    for m in (from_file, from_folder):
        assert not m.has_encoder and m.has_decoder
        assert float(np.abs(_nchw(m.decode(_nhwc(z))) - expected).max()) <= TOL
        with pytest.raises(InvalidArgumentError, match="decoder-only"):
            m.encode(mx.zeros((1, 64, 64, 3)))


def test_loading_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        load_taesd(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match="taesd_encoder"):
        load_taesd(tmp_path)
    shutil.copy(_weights_dir() / "taesdxl_decoder.safetensors", tmp_path / "taesdxl_decoder.safetensors")
    with pytest.raises(ModelNotFoundError, match="taesdxl_decoder"):
        load_taesd(tmp_path)  # hint names the file found
    # encoder weights under a decoder name: strict assignment refuses them
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(_weights_dir() / "taesd_encoder.safetensors", bad / "taesd_decoder.safetensors")
    with pytest.raises(WeightLoadError, match="taesd_decoder.safetensors"):
        load_taesd(bad)
    with pytest.raises(InvalidArgumentError):
        load_taesd(_weights_dir(), dtype="int8")


def test_bad_input_shapes(model: AutoencoderTiny) -> None:
    with pytest.raises(InvalidArgumentError):
        model.decode(mx.zeros((1, 8, 8, 3)))
    with pytest.raises(InvalidArgumentError):
        model.encode(mx.zeros((8, 8, 3)))


# -------------------------------------------------------------------------------------------------------- PSNR

def _roundtrip_psnr(model: AutoencoderTiny, size: int) -> dict[str, float]:
    out = {}
    for name in ("cat.jpeg", "dog.jpeg"):
        x = _photo(name, size)
        y = model.decode(model.encode(mx.array(x)))
        out[name] = _psnr(np.array(y.astype(mx.float32)), x)
    print(f"\nTAESD round-trip PSNR at {size}x{size}: " + ", ".join(f"{k} {v:.2f} dB" for k, v in out.items()))
    return out


def test_roundtrip_psnr_256(model: AutoencoderTiny) -> None:
    for name, psnr in _roundtrip_psnr(model, 256).items():
        assert psnr > 20.0, name


@pytest.mark.slow
def test_roundtrip_psnr_512(model: AutoencoderTiny) -> None:
    for name, psnr in _roundtrip_psnr(model, 512).items():
        assert psnr > 20.0, name
