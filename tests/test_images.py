"""PNG output: A1111 parameters round trip, atomic writes, never overwriting without being asked."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from sd_mlx.errors import OutputError
from sd_mlx.images import (GenerationParameters, expand_output_paths, next_free_paths, read_parameters, save_png,
                           to_uint8)

PARAMS = GenerationParameters(prompt="a cat, très mignon", negative_prompt="blurry", steps=20, sampler="Euler a",
                              cfg_scale=7.5, seed=2**64 - 1, width=512, height=520, model="some/model")


def _img() -> Image.Image:
    return Image.new("RGB", (16, 8), (10, 20, 30))


def test_to_uint8_matches_diffusers_rounding():
    x = np.array([0.0, 0.5 / 255, 1.5 / 255, 0.5, 1.0, 1.2, -0.1], np.float32).reshape(1, 1, 7, 1)
    assert to_uint8(x).ravel().tolist() == np.round(np.clip(x, 0, 1) * 255).astype(np.uint8).ravel().tolist()
    assert to_uint8(x).ravel().tolist()[-2:] == [255, 0]


def test_parameters_text_round_trip(tmp_path):
    text = PARAMS.to_a1111()
    assert text.splitlines() == [
        "a cat, très mignon", "Negative prompt: blurry",
        f"Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: {2**64 - 1}, Size: 512x520, Model: some/model"]
    p = save_png(_img(), tmp_path / "a.png", parameters=text)
    assert read_parameters(p) == text
    with Image.open(p) as im:
        assert im.size == (16, 8)


def test_no_overwrite_without_flag(tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(b"precious")
    with pytest.raises(OutputError, match="file exists; pass --overwrite"):
        save_png(_img(), p)
    assert p.read_bytes() == b"precious"
    save_png(_img(), p, overwrite=True)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in tmp_path.iterdir()] == ["a.png"]  # no temporary file left


def test_missing_and_readonly_folders(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        save_png(_img(), tmp_path / "nope" / "a.png")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write to read-only folders (root)")
        with pytest.raises(OutputError, match="not writable"):
            save_png(_img(), ro / "a.png")
    finally:
        ro.chmod(0o700)


def test_unwritable_folder_even_for_root(tmp_path, monkeypatch):
    """A read-only mount refuses even root: the OSError becomes a clear OutputError."""
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match="cannot create files there"):
        save_png(_img(), tmp_path / "a.png")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_png(_img(), tmp_path / "a.png")
    assert list(tmp_path.iterdir()) == []


def test_default_names_never_collide(tmp_path):
    (tmp_path / "sd_mlx-00007.png").write_bytes(b"x")
    paths = next_free_paths(tmp_path, "sd_mlx", 2)
    assert [p.name for p in paths] == ["sd_mlx-00008.png", "sd_mlx-00009.png"]
    assert [p.name for p in expand_output_paths(str(tmp_path), 1)] == ["sd_mlx-00008.png"]
    assert [p.name for p in expand_output_paths(str(tmp_path / "cat"), 2)] == ["cat-1.png", "cat-2.png"]
    assert [p.name for p in expand_output_paths(str(tmp_path / "cat.png"), 1)] == ["cat.png"]
    with pytest.raises(OutputError, match="does not exist"):
        expand_output_paths(str(tmp_path / "missing" / "cat.png"), 1)
