"""Tiled VAE decode/encode (sd_mlx.models.vae_tiling) against diffusers' ``AutoencoderKL`` tiling, the peak
memory it saves, and the untiled-memory estimate.

Reference: a tiny diffusers ``AutoencoderKL`` (4 blocks, so ``vae_scale_factor`` 8; ``sample_size`` 32, so tiles
of 4 latents / 32 pixels by default), random init with ``torch.manual_seed``, every parameter perturbed, saved with
``save_pretrained(safe_serialization=True)`` and loaded with :func:`sd_mlx.models.vae.load_vae`. Latents of 12x10
give a 4x4 grid of tiles with partial tiles at the right and bottom. NCHW <-> NHWC only at the edges.

Tolerance (float32): max |ours - diffusers| <= 1e-4 * max(1, std(diffusers output)).

Memory: ``mx.get_peak_memory`` after ``mx.reset_peak_memory``, minus the memory already in use (weights, input).
Run ``pytest tests/test_vae_tiling.py -q -s`` to see the figures; the full-size SD VAE at 1024x1024 is a slow test
(``--runslow``; it needs ~40 GiB for the untiled decode on MLX's CPU backend and is skipped on smaller machines).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sd_mlx import ops  # noqa: E402
from sd_mlx.errors import InvalidArgumentError  # noqa: E402
from sd_mlx.models.vae import AutoencoderKL, VAEConfig, load_vae  # noqa: E402
from sd_mlx.models.vae_tiling import (  # noqa: E402
    estimate_decode_peak_bytes, should_tile, tile_geometry, tiled_decode, tiled_encode, tiled_encode_moments)

TOL32 = 1e-4
TINY = dict(block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, layers_per_block=1, latent_channels=4,
            sample_size=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae_tiling")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**TINY).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, load_vae(folder)


def nhwc(t) -> mx.array:
    return mx.array(t.permute(0, 2, 3, 1).numpy())


def check(got: mx.array, expected, what: str) -> float:
    got_np = np.array(got.astype(mx.float32))
    exp_np = expected.permute(0, 2, 3, 1).numpy()
    assert got_np.shape == exp_np.shape, f"{what}: shape {got_np.shape} != {exp_np.shape}"
    err, std = float(np.abs(got_np - exp_np).max()), float(exp_np.std())
    print(f"{what}: max abs error {err:.3g} (std {std:.3g})")
    assert err <= TOL32 * max(1.0, std), f"{what}: max abs error {err:.3g} (std {std:.3g})"
    return err


def set_reference_tiling(ref, tile_latent_size: int | None, overlap: float) -> None:
    """diffusers' enable_tiling() with its defaults, or with the given tile size/overlap."""
    ref.enable_tiling()
    ref.tile_sample_min_size = TINY["sample_size"] if tile_latent_size is None else tile_latent_size * 8
    ref.tile_latent_min_size = ref.tile_sample_min_size // 8
    ref.tile_overlap_factor = overlap


@pytest.mark.parametrize("latent_hw, batch, tile, overlap", [
    ((12, 10), 1, None, 0.25),   # default geometry: 4x4 tiles, partial ones at the edges
    ((7, 13), 2, 6, 0.5),        # other tile size and overlap, batch of 2
    ((4, 4), 1, None, 0.25),     # fits in one tile: plain decode, as diffusers
])
def test_tiled_decode_matches_diffusers(tiny, latent_hw, batch, tile, overlap):
    ref, ours = tiny
    torch.manual_seed(1)
    z = torch.randn(batch, 4, *latent_hw)
    set_reference_tiling(ref, tile, overlap)
    with torch.no_grad():
        expected = ref.decode(z).sample
    got = tiled_decode(ours, nhwc(z), tile_latent_size=tile, overlap=overlap)
    check(got, expected, f"tiled decode {latent_hw} B={batch} tile={tile} overlap={overlap}")
    if latent_hw != (4, 4):  # tiling really changed the result, so the comparison is meaningful
        plain = np.array(ours.decode(nhwc(z)))
        assert np.abs(plain - np.array(got)).max() > 1e-3


@pytest.mark.parametrize("image_hw, batch, tile, overlap", [
    ((96, 80), 1, None, 0.25),   # 4x4 tiles of 32 pixels with stride 24, 8-pixel edge tiles
    ((72, 104), 2, 6, 0.5),
])
def test_tiled_encode_matches_diffusers(tiny, image_hw, batch, tile, overlap):
    ref, ours = tiny
    torch.manual_seed(2)
    x = torch.rand(batch, 3, *image_hw) * 2 - 1
    set_reference_tiling(ref, tile, overlap)
    with torch.no_grad():
        post = ref.encode(x).latent_dist
    got = tiled_encode(ours, nhwc(x), tile_latent_size=tile, overlap=overlap)
    check(got.mean, post.mean, f"tiled encode mean {image_hw} tile={tile}")
    check(got.logvar, post.logvar, f"tiled encode logvar {image_hw} tile={tile}")
    assert got.mean.shape == (batch, image_hw[0] // 8, image_hw[1] // 8, 4)


def test_force_tiles_small_inputs(tiny):
    """force=True is diffusers' tiled_decode / _tiled_encode called directly (they tile even a single-tile input)."""
    ref, ours = tiny
    set_reference_tiling(ref, None, 0.25)
    torch.manual_seed(3)
    z = torch.randn(1, 4, 4, 4)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected_dec = ref.tiled_decode(z).sample
        expected_enc = ref._tiled_encode(x)
    check(tiled_decode(ours, nhwc(z), force=True), expected_dec, "forced tiled decode 4x4")
    check(tiled_encode_moments(ours, nhwc(x), force=True), expected_enc, "forced tiled encode 32x32")


def test_geometry_defaults_and_errors(tiny):
    _, ours = tiny
    sd = VAEConfig(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
    g = tile_geometry(sd)
    assert (g.sample_size, g.latent_size, g.overlap) == (512, 64, 0.25)
    assert (g.decode_stride, g.decode_blend, g.decode_keep) == (48, 128, 384)
    assert (g.encode_stride, g.encode_blend, g.encode_keep) == (384, 16, 48)
    g768 = tile_geometry(VAEConfig(**{**sd.__dict__, "sample_size": 768}))
    assert (g768.sample_size, g768.latent_size) == (768, 96)
    for bad in (dict(overlap=1.0), dict(overlap=-0.1), dict(tile_latent_size=0), dict(tile_latent_size=1),
                dict(tile_latent_size=2.5), dict(tile_latent_size=5, overlap=0.5)):
        with pytest.raises(InvalidArgumentError):
            tile_geometry(ours.config, **bad)
    with pytest.raises(InvalidArgumentError):
        tiled_decode(ours, mx.zeros((4, 4, 4)))


def test_should_tile_formula():
    sd = VAEConfig(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
    est = estimate_decode_peak_bytes(512, 512, 1, config=sd)
    # 40 * 512*512 * 256 * 4 bytes + 3 * (64*64)^2 * 4 bytes
    assert est == int(40 * 512 * 512 * 256 * 4 + 3 * 4096.0 ** 2 * 4)
    assert estimate_decode_peak_bytes(512, 512, 2, config=sd) == 2 * est
    assert estimate_decode_peak_bytes(512, 512, 1) == est  # None means SD's channels
    assert estimate_decode_peak_bytes(512, 512, 1, config=sd, dtype_bytes=2) < est
    assert not should_tile(512, 512, 1, est + 1, config=sd)
    assert should_tile(512, 512, 1, est - 1, config=sd)
    assert should_tile(1024, 1024, 1, 16 << 30)
    assert not should_tile(4096, 4096, 8, None)
    with pytest.raises(InvalidArgumentError):
        should_tile(0, 512, 1, 1 << 30)
    with pytest.raises(InvalidArgumentError):
        should_tile(512, 512, 1, 0)


def random_vae(config: VAEConfig, seed: int = 0) -> AutoencoderKL:
    """An MLX VAE with random (MLX default init) weights, evaluated."""
    mx.random.seed(seed)
    model = AutoencoderKL(config)
    mx.eval(model.parameters())
    return model


def measure(fn, *args, **kwargs) -> tuple[int, float, mx.array]:
    """(peak bytes beyond what was already allocated, seconds, result) of ``fn`` evaluated."""
    mx.eval(*[a for a in args if isinstance(a, mx.array)])
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    mx.eval(out)
    seconds = time.perf_counter() - t0
    return int(mx.get_peak_memory() - base), seconds, out


def _memory_comparison(config: VAEConfig, image: int, what: str) -> tuple[int, int, int]:
    vae = random_vae(config)
    f = vae.vae_scale_factor
    z = mx.random.normal((1, image // f, image // f, config.latent_channels), key=mx.random.key(0))
    untiled, t_u, _ = measure(vae.decode, z)
    tiled, t_t, out = measure(tiled_decode, vae, z)
    assert out.shape == (1, image, image, config.out_channels)
    estimate = estimate_decode_peak_bytes(image, image, 1, config=config)
    print(f"\n{what} {image}x{image} float32 decode: untiled peak {untiled / 2**20:.0f} MiB ({t_u:.1f} s), "
          f"tiled peak {tiled / 2**20:.0f} MiB ({t_t:.1f} s, tiles of {tile_geometry(config).sample_size} px), "
          f"ratio {tiled / untiled:.3f}; estimate (untiled) {estimate / 2**20:.0f} MiB")
    return untiled, tiled, estimate


def test_tiled_decode_peak_memory_small_config(monkeypatch):
    """512x512 output with a small 4-level VAE (tiles of 256 px, as SD's 512 px tiles at 1024 px), against the
    plain lazy decode (row-strip and Winograd CPU convolutions off: they bound the untiled decode's memory on their
    own, the Winograd kernel by evaluating each convolution with its working buffers outside MLX's allocator)."""
    import sd_mlx.models.layers as layers

    monkeypatch.setattr(ops, "CONV_UNFOLD_BUDGET_BYTES", 2**62)
    monkeypatch.setattr(ops, "winograd_conv3x3", lambda *a, **k: None)
    cfg = VAEConfig(**{**TINY, "sample_size": 256})
    untiled, tiled, estimate = _memory_comparison(cfg, 512, "small VAE (16,32,32,32)")
    assert tiled <= untiled / 3
    # The estimate is in the right range on this backend: on the safe side (see estimate_decode_peak_bytes: its
    # factor was fitted at 1024x1024 before GroupNorm dropped a temporary; measured here 681 MiB, estimated 1472).
    assert 0.5 * untiled <= estimate <= 2.5 * untiled


def _assets() -> Path:
    from conftest import assets_dir
    return assets_dir()


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


@pytest.mark.slow
def test_tiled_decode_peak_memory_full_size_1024():
    """SD 1.5 VAE config, random weights, 1024x1024 output: tiled (512 px tiles) vs untiled peak memory.

    Measured on MLX's CPU backend (16 cores): untiled 39692 MiB (210 s), tiled 9876 MiB (296 s), ratio 0.25.
    Needs ~40 GiB free for the untiled decode; skipped on smaller machines."""
    if mx.default_device() == mx.cpu and _physical_memory_bytes() < 48 * 2**30:
        pytest.skip("untiled 1024x1024 decode of the SD VAE needs ~40 GiB on MLX's CPU backend; this machine has "
                    f"{_physical_memory_bytes() / 2**30:.0f} GiB")
    path = _assets() / "configs" / "stable-diffusion-v1-5" / "vae" / "config.json"
    cfg = VAEConfig.from_dict(json.loads(path.read_text()), str(path))
    untiled, tiled, _ = _memory_comparison(cfg, 1024, "SD 1.5 VAE")
    assert tiled <= untiled / 3


def test_pipeline_tiled_decode_option(tiny_sd1):
    """tiled_decode=True goes through tiled_decode (equal to it), False/None (fits in memory) decode untiled."""
    import numpy as np

    import sd_mlx

    pipe = sd_mlx.load_pipeline(tiny_sd1)
    kw = dict(num_inference_steps=2, height=96, width=80, seed=3, output_type="np", guidance_scale=1.0)
    plain = pipe("a cat", tiled_decode=False, **kw).images
    auto = pipe("a cat", **kw).images
    np.testing.assert_array_equal(plain, auto)
    latents = pipe("a cat", output_type="latent", **{k: v for k, v in kw.items() if k != "output_type"}).images
    tiled = pipe("a cat", tiled_decode=True, **kw).images
    scale = pipe.vae.config.scaling_factor
    ref = np.array(mx.clip(tiled_decode(pipe.vae, latents / scale, force=False) / 2 + 0.5, 0, 1))
    np.testing.assert_allclose(tiled, ref, atol=1e-6)
    with pytest.raises(sd_mlx.InvalidArgumentError, match="tiled_decode"):
        pipe("a cat", tiled_decode="yes", **kw)
