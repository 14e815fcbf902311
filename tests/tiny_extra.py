"""Tiny random-weight diffusers pipelines the single-file tests need beyond ``tiny_sd1``/``tiny_sd2``: SD 1.x
inpainting (9-channel U-Net), SDXL base and SDXL refiner. Built with diffusers/transformers classes (test-only
dependencies), real tokenizer and scheduler files from the assets, every parameter perturbed like
``tools/make_checkpoint.py`` does; cached by :func:`build_cached` in ``.cache/test-checkpoints``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

KINDS = ("sd1-inpainting", "sdxl", "sdxl-refiner")


def _perturb(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)


def _sdxl_unet_config(refiner: bool) -> dict:
    if refiner:  # 4 blocks like the refiner (Down, CrossAttn, CrossAttn, Down); aesthetic score: 5 time ids
        return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                    block_out_channels=(32, 32, 64, 64),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    attention_head_dim=(2, 4, 4, 8), transformer_layers_per_block=2, cross_attention_dim=48,
                    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=48 + 5 * 8, norm_num_groups=8)
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 3), cross_attention_dim=32 + 48,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=48 + 6 * 8, norm_num_groups=8)


def make(kind: str, out: Path, assets: Path) -> Path:
    """Write the tiny ``kind`` pipeline (:data:`KINDS`) to ``out`` and return it."""
    import torch
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tools.make_checkpoint import tiny_text_config, tiny_unet_config, tiny_vae_config

    torch.manual_seed(0)
    vae_cfg = tiny_vae_config()
    if kind == "sd1-inpainting":
        src = assets / "configs" / "stable-diffusion-inpainting"
        unet = UNet2DConditionModel(**dict(tiny_unet_config("sd1"), in_channels=9))
        text = CLIPTextModel(CLIPTextConfig(**tiny_text_config("sd1")))
        _perturb(unet, 1), _perturb(text, 2)
        vae = AutoencoderKL(**vae_cfg)
        _perturb(vae, 3)
        sched_cfg = diffusers.DDIMScheduler.load_config(str(src / "scheduler"))
        pipe = diffusers.StableDiffusionInpaintPipeline(
            vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(str(src / "tokenizer")), unet=unet,
            scheduler=diffusers.DDIMScheduler.from_config(sched_cfg), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    else:
        src = assets / "configs" / ("stable-diffusion-xl-refiner-1.0" if kind == "sdxl-refiner"
                                    else "stable-diffusion-xl-base-1.0")
        unet = UNet2DConditionModel(**_sdxl_unet_config(kind == "sdxl-refiner"))
        vae = AutoencoderKL(**dict(vae_cfg, scaling_factor=0.13025, force_upcast=True))
        big = CLIPTextConfig(**dict(tiny_text_config("sd2"), hidden_size=48, intermediate_size=96,
                                    num_attention_heads=4, num_hidden_layers=3, projection_dim=48))
        text2 = CLIPTextModelWithProjection(big)
        _perturb(unet, 1), _perturb(vae, 3), _perturb(text2, 4)
        sched = diffusers.EulerDiscreteScheduler.from_config(
            diffusers.EulerDiscreteScheduler.load_config(str(src / "scheduler")))
        tok2 = CLIPTokenizer.from_pretrained(str(src / "tokenizer_2"))
        if kind == "sdxl":
            text = CLIPTextModel(CLIPTextConfig(**tiny_text_config("sd1")))
            _perturb(text, 2)
            pipe = diffusers.StableDiffusionXLPipeline(
                vae=vae, text_encoder=text, text_encoder_2=text2,
                tokenizer=CLIPTokenizer.from_pretrained(str(src / "tokenizer")), tokenizer_2=tok2, unet=unet,
                scheduler=sched)
        else:
            pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
                vae=vae, text_encoder=None, text_encoder_2=text2, tokenizer=None, tokenizer_2=tok2, unet=unet,
                scheduler=sched, requires_aesthetics_score=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def build_cached(kind: str, cache: Path, assets: Path) -> Path:
    """Build (or reuse) the tiny ``kind`` pipeline under ``cache`` (keyed by this file and the library versions)."""
    import diffusers
    import torch
    import transformers

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update((Path(__file__).resolve().parents[1] / "tools" / "make_checkpoint.py").read_bytes())
    h.update(f"{kind}|{diffusers.__version__}|{transformers.__version__}|{torch.__version__}".encode())
    target = cache / f"tiny-{kind}-{h.hexdigest()[:16]}"
    if (target / "model_index.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=cache))
    try:
        make(kind, tmp / "ckpt", assets)
        try:
            os.replace(tmp / "ckpt", target)
        except OSError:
            if not (target / "model_index.json").is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp / "ckpt", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
