"""Loading errors that do not depend on a particular model: safetensors validation, strict assignment, configs,
model resolution (folders, repo ids, offline cache)."""

from __future__ import annotations

import json
import struct

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from safetensors.numpy import save_file

from sd_mlx.errors import ConfigError, ModelNotFoundError, WeightLoadError
from sd_mlx.loading.configs import read_json
from sd_mlx.loading.hub import looks_like_repo_id, resolve_model
from sd_mlx.loading.weights import assign_weights, find_weight_file, read_safetensors, remap_weights


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2)
        self.norm = nn.LayerNorm(2)


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"proj.weight": rng.standard_normal((2, 3)).astype(np.float32),
            "proj.bias": rng.standard_normal(2).astype(np.float32),
            "norm.weight": np.ones(2, np.float32), "norm.bias": np.zeros(2, np.float32)}


def _identity(key, value):
    return [(key, value)]


def _load(path, model=None):
    model = model or Tiny()
    mapped = remap_weights(read_safetensors(path), _identity, source=str(path))
    assign_weights(model, mapped, source=str(path))
    return model


def test_strict_load_roundtrip(tmp_path):
    w = _weights()
    save_file(w, str(tmp_path / "w.safetensors"))
    m = _load(tmp_path / "w.safetensors")
    np.testing.assert_array_equal(np.array(m.proj.weight), w["proj.weight"])


@pytest.mark.parametrize("case, fragment", [
    ("missing", "missing weight for parameter 'norm.bias'"),
    ("unknown", "unknown key 'extra.weight'"),
    ("shape", "shape mismatch for 'proj.weight'"),
    ("nan", "weight 'proj.bias' contains NaN"),
])
def test_strict_errors_name_the_key(tmp_path, case, fragment):
    w = _weights()
    if case == "missing":
        del w["norm.bias"]
    elif case == "unknown":
        w["extra.weight"] = np.zeros(1, np.float32)
    elif case == "shape":
        w["proj.weight"] = np.zeros((3, 2), np.float32)
    else:
        w["proj.bias"][1] = np.nan
    path = tmp_path / "w.safetensors"
    save_file(w, str(path))
    with pytest.raises(WeightLoadError) as e:
        _load(path)
    assert fragment in str(e.value) and str(path) in str(e.value)


def test_truncated_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_weights(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(WeightLoadError, match="truncated"):
        read_safetensors(path)
    path.write_bytes(data[:4])
    with pytest.raises(WeightLoadError, match="not a safetensors file"):
        read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(WeightLoadError, match="corrupt or truncated"):
        read_safetensors(path)


def test_header_that_lies_about_sizes(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_weights(), str(path))
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["proj.weight"]["shape"] = [4, 3]  # claims 48 bytes, offsets give 24
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(WeightLoadError, match="lies about 'proj.weight'"):
        read_safetensors(path)
    header_bad = b"not json at all!"
    path.write_bytes(struct.pack("<Q", len(header_bad)) + header_bad)
    with pytest.raises(WeightLoadError, match="not JSON"):
        read_safetensors(path)


def test_cast_dtype(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_weights(), str(path))
    m = Tiny()
    assign_weights(m, remap_weights(read_safetensors(path), _identity, source="x"), source="x", dtype=mx.float16)
    assert m.proj.weight.dtype == mx.float16


def test_find_weight_file_prefers_variant(tmp_path):
    for name in ("model.safetensors", "model.fp16.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert find_weight_file(tmp_path, "model", prefer_fp16=True).name == "model.fp16.safetensors"
    assert find_weight_file(tmp_path, "model", prefer_fp16=False).name == "model.safetensors"
    (tmp_path / "model.safetensors").unlink()
    assert find_weight_file(tmp_path, "model", prefer_fp16=False).name == "model.fp16.safetensors"
    with pytest.raises(WeightLoadError, match="no diffusion_pytorch_model.safetensors"):
        find_weight_file(tmp_path, "diffusion_pytorch_model", prefer_fp16=False)
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(WeightLoadError, match="safetensors only"):
        find_weight_file(tmp_path, "diffusion_pytorch_model", prefer_fp16=False)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON") as e:
        read_json(tmp_path / "config.json")
    assert str(tmp_path / "config.json") in str(e.value)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        read_json(tmp_path / "config.json")


@pytest.mark.parametrize("name, ok", [("owner/model", True), ("stable-diffusion-v1-5/stable-diffusion-v1-5", True),
                                      ("no-slash", False), ("a/b/c", False), ("bad name/x", False), ("", False)])
def test_repo_id_shape(name, ok):
    assert looks_like_repo_id(name) is ok


def test_resolve_errors(tmp_path, monkeypatch):
    assert resolve_model(tmp_path) == tmp_path
    with pytest.raises(ModelNotFoundError, match="not a Hugging Face repo id"):
        resolve_model(str(tmp_path / "missing" / "folder" / "x"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model(tmp_path / "file.txt")


def test_offline_not_cached(tmp_path, monkeypatch):
    """A repo id that is not cached, offline: one clear error saying what to download."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import importlib

    import huggingface_hub.constants as c

    importlib.reload(c)
    try:
        with pytest.raises(ModelNotFoundError) as e:
            resolve_model("someone/not-cached-model")
    finally:
        monkeypatch.undo()
        importlib.reload(c)
    msg = str(e.value)
    assert "not in the Hugging Face cache" in msg and "hf download someone/not-cached-model" in msg
    assert "--model PATH" in msg


def test_taesd_names(tmp_path, monkeypatch):
    """--vae taesd goes to the Hub repo madebyollin/taesd (offline: the usual clear error); paths pass through."""
    from sd_mlx.pipeline import resolve_taesd

    assert resolve_taesd(tmp_path) == tmp_path
    with pytest.raises(ModelNotFoundError, match="TAESD not found"):
        resolve_taesd("no such taesd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import importlib

    import huggingface_hub.constants as c

    importlib.reload(c)
    try:
        with pytest.raises(ModelNotFoundError, match="hf download madebyollin/taesd"):
            resolve_taesd("taesd")
    finally:
        monkeypatch.undo()
        importlib.reload(c)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_all_finite_every_float_dtype(dtype):
    """The numpy-side finite check (bfloat16 on its bits) flags NaN, +Inf and -Inf anywhere, and only those."""
    from sd_mlx.loading.weights import all_finite

    x = np.linspace(-60000, 60000, 1001, dtype=np.float32)  # large but finite in every dtype
    assert all_finite(mx.array(x).astype(dtype))
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[777] = bad
        assert not all_finite(mx.array(y).astype(dtype)), (dtype, bad)
    assert all_finite(mx.array([1, 2, 3]))


def test_conv_kernel_layout_matches_transpose():
    """kernel_to_mlx gives exactly (O, I, kh, kw) -> (O, kh, kw, I), contiguous."""
    from sd_mlx.loading.keymaps.unet import kernel_to_mlx

    w = np.random.default_rng(0).standard_normal((5, 7, 3, 2)).astype(np.float32)
    out = kernel_to_mlx(mx.array(w))
    np.testing.assert_array_equal(np.array(out), w.transpose(0, 2, 3, 1))
    assert memoryview(out).c_contiguous
