"""Request bodies of the AUTOMATIC1111 API: its JSON field names and defaults (``StableDiffusionProcessingTxt2Img``
/ ``Img2Img`` as its ``/sdapi/v1`` exposes them).

Fields sd_mlx has no use for (``restore_faces``, ``tiling``, ``styles``, ``s_churn``...) are accepted and ignored,
as A1111 clients send whole default bodies; unknown fields are ignored too. The fields that would change the
result and that sd_mlx cannot honour (hires fix, scripts, variation seeds) are refused with 422 by the routes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Generation(BaseModel):
    """Fields common to txt2img and img2img (A1111 ``StableDiffusionProcessing``)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int = Field(default=-1, description="seed of the first image; -1 draws a random one")
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(_Generation):
    """``POST /sdapi/v1/txt2img``."""

    enable_hr: bool = False
    denoising_strength: float | None = None
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    firstphase_width: int = 0
    firstphase_height: int = 0


class Img2ImgRequest(_Generation):
    """``POST /sdapi/v1/img2img``: ``init_images`` (base64), ``denoising_strength``, and for inpainting ``mask``
    (base64; white = repaint) with A1111's mask options."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    """``POST /sdapi/v1/png-info``: ``image`` (base64 PNG)."""

    image: str


class ProgressQuery(BaseModel):
    """``GET /sdapi/v1/progress`` query: ``skip_current_image``."""

    skip_current_image: bool = False
