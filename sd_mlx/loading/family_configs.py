"""Configs of the model families a single-file checkpoint can hold, carried with sd_mlx as data.

A single ``.safetensors`` file holds weights only; the sizes, head counts and schedules that make a model out of
them come from its family. The values below are facts of the public diffusers configs of the reference models
(``stable-diffusion-v1-5``, ``stable-diffusion-inpainting``, ``stable-diffusion-2-1`` (768, v-prediction),
``stable-diffusion-2-1-base`` (512), ``stable-diffusion-xl-base-1.0``, ``stable-diffusion-xl-refiner-1.0``), written
here as the fields diffusers' ``config.json`` files use, so they feed the same parsers as a folder's configs
(``tests/test_single_file.py`` checks every field sd_mlx reads against those public files). Two families have no
reference config in sd_mlx's test assets and are derived the way the original LDM configs define them: SD 2.x
inpainting is SD 2.1-base with 9 U-Net input channels (epsilon prediction), SDXL inpainting is SDXL base with 9.

Use :func:`family_configs`; the returned dicts are fresh copies the caller may change.
"""

from __future__ import annotations

import copy
from typing import Any

FAMILIES = ("sd1", "sd1-inpainting", "sd2", "sd2-inpainting", "sdxl", "sdxl-inpainting", "sdxl-refiner")
"""Family names, as :func:`sd_mlx.loading.single_file.detect_family` reports them."""

DESCRIPTIONS = {
    "sd1": "Stable Diffusion 1.x",
    "sd1-inpainting": "Stable Diffusion 1.x inpainting (9-channel U-Net)",
    "sd2": "Stable Diffusion 2.x",
    "sd2-inpainting": "Stable Diffusion 2.x inpainting (9-channel U-Net)",
    "sdxl": "Stable Diffusion XL base",
    "sdxl-inpainting": "Stable Diffusion XL inpainting (9-channel U-Net)",
    "sdxl-refiner": "Stable Diffusion XL refiner",
}

_SD_BLOCKS = {
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
_UNET_COMMON = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
}
_UNET_SD1 = dict(_UNET_COMMON, **_SD_BLOCKS, attention_head_dim=8, cross_attention_dim=768, in_channels=4,
                 sample_size=64)
_UNET_SD2 = dict(_UNET_COMMON, **_SD_BLOCKS, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                 in_channels=4, sample_size=64, use_linear_projection=True)
_UNET_SDXL = dict(
    _UNET_COMMON, addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], in_channels=4,
    projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], upcast_attention=None,
    use_linear_projection=True)
_UNET_REFINER = dict(
    _UNET_COMMON, addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[6, 12, 24, 24], block_out_channels=[384, 768, 1536, 1536], cross_attention_dim=1280,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"], in_channels=4,
    projection_class_embeddings_input_dim=2560, sample_size=128, transformer_layers_per_block=4,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], upcast_attention=None,
    use_linear_projection=True)

_VAE_SD = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
}
_VAE_SDXL = dict(_VAE_SD, force_upcast=True, sample_size=1024, scaling_factor=0.13025)

_CLIP_COMMON = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "layer_norm_eps": 1e-05,
                "max_position_embeddings": 77, "model_type": "clip_text_model", "vocab_size": 49408}
_CLIP_L = dict(_CLIP_COMMON, architectures=["CLIPTextModel"], hidden_act="quick_gelu", hidden_size=768,
               intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
# SD 2.x conditions on the penultimate layer of OpenCLIP ViT-H/14's 24: diffusers' config keeps 23 layers.
_OPEN_CLIP_H = dict(_CLIP_COMMON, architectures=["CLIPTextModel"], hidden_act="gelu", hidden_size=1024,
                    intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, projection_dim=512)
_OPEN_CLIP_BIG_G = dict(_CLIP_COMMON, architectures=["CLIPTextModelWithProjection"], hidden_act="gelu",
                        hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                        projection_dim=1280)

_SCHED_SD = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "trained_betas": None}
_SCHED_SD1 = dict(_SCHED_SD, _class_name="PNDMScheduler")
_SCHED_SD1_INPAINT = dict(_SCHED_SD, _class_name="DDIMScheduler")
_SCHED_SD2_V = dict(_SCHED_SD, _class_name="DDIMScheduler", prediction_type="v_prediction")
_SCHED_SD2_BASE = dict(_SCHED_SD, _class_name="PNDMScheduler", prediction_type="epsilon")
_SCHED_SDXL = dict(_SCHED_SD, _class_name="EulerDiscreteScheduler", interpolation_type="linear",
                   prediction_type="epsilon", sample_max_value=1.0, timestep_spacing="leading",
                   use_karras_sigmas=False)

PAD_ENDOFTEXT = "<|endoftext|>"
PAD_EXCLAMATION = "!"
"""The two pad tokens of the CLIP tokenizers: OpenAI CLIP's (SD 1.x, SDXL ``tokenizer``) and OpenCLIP's ``"!"``
(SD 2.x, SDXL ``tokenizer_2``); the vocabulary and merges are the same."""


def family_configs(family: str, prediction_type: str | None = None) -> dict[str, Any]:
    """The diffusers-form configs of ``family``.

    Args:
        family: one of :data:`FAMILIES`.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``None`` (the family's default: ``"v_prediction"``
            for ``sd2``, the SD 2.1 768-v model diffusers assumes for SD 2.x single files; ``"epsilon"`` else). For
            ``sd2`` it also picks the model: v-prediction -> SD 2.1 (768 px, ``upcast_attention``), epsilon -> SD
            2.1-base (512 px).

    Returns:
        ``{"unet": {...}, "vae": {...}, "text_encoder": {...}, ["text_encoder_2": {...}], "scheduler": {...},
        "tokenizers": {"tokenizer": pad_token, ...}, "pipeline": diffusers pipeline class name}``.

    Raises:
        KeyError: an unknown family or prediction type (callers check these first).
    """
    if family not in FAMILIES:
        raise KeyError(family)
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise KeyError(prediction_type)
    out: dict[str, Any]
    if family in ("sd1", "sd1-inpainting"):
        inpaint = family == "sd1-inpainting"
        out = {"unet": dict(_UNET_SD1, in_channels=9 if inpaint else 4),
               "vae": dict(_VAE_SD, sample_size=256 if inpaint else 512),
               "text_encoder": _CLIP_L,
               "scheduler": _SCHED_SD1_INPAINT if inpaint else _SCHED_SD1,
               "tokenizers": {"tokenizer": PAD_ENDOFTEXT},
               "pipeline": "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline"}
    elif family in ("sd2", "sd2-inpainting"):
        v = family == "sd2" and prediction_type in (None, "v_prediction")
        unet = dict(_UNET_SD2, in_channels=9 if family == "sd2-inpainting" else 4)
        if v:
            unet.update(sample_size=96, upcast_attention=True, dual_cross_attention=False,
                        only_cross_attention=False, num_class_embeds=None)
        out = {"unet": unet, "vae": dict(_VAE_SD, sample_size=768), "text_encoder": _OPEN_CLIP_H,
               "scheduler": _SCHED_SD2_V if v else _SCHED_SD2_BASE,
               "tokenizers": {"tokenizer": PAD_EXCLAMATION},
               "pipeline": "StableDiffusionInpaintPipeline" if family == "sd2-inpainting" else
               "StableDiffusionPipeline"}
    elif family in ("sdxl", "sdxl-inpainting"):
        inpaint = family == "sdxl-inpainting"
        out = {"unet": dict(_UNET_SDXL, in_channels=9 if inpaint else 4), "vae": _VAE_SDXL,
               "text_encoder": _CLIP_L, "text_encoder_2": _OPEN_CLIP_BIG_G, "scheduler": _SCHED_SDXL,
               "tokenizers": {"tokenizer": PAD_ENDOFTEXT, "tokenizer_2": PAD_EXCLAMATION},
               "pipeline": "StableDiffusionXLInpaintPipeline" if inpaint else "StableDiffusionXLPipeline"}
    else:  # sdxl-refiner
        out = {"unet": _UNET_REFINER, "vae": _VAE_SDXL, "text_encoder_2": _OPEN_CLIP_BIG_G,
               "scheduler": _SCHED_SDXL, "tokenizers": {"tokenizer_2": PAD_EXCLAMATION},
               "pipeline": "StableDiffusionXLImg2ImgPipeline"}
    out = copy.deepcopy(out)
    if prediction_type is not None:
        out["scheduler"]["prediction_type"] = prediction_type
    return out
