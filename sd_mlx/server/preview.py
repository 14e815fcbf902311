"""Progress previews: the current latents of a running job as a small RGB image.

With a TAESD (``--preview-vae``) the latents are decoded by it, through the pipeline's ``decode_latents`` as the
CLI's ``--preview`` does. Without one, a fixed linear map from the 4 latent channels to RGB gives a rough, blurry
colour picture at latent resolution, upscaled 8x (the coefficients are the ones AUTOMATIC1111 uses for its "Approx
cheap" preview of SD 1.x/2.x latents). Runs on the worker thread (MLX work stays on one thread).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..images import make_grid, to_pil

#: latent channel -> (R, G, B) weights of the cheap approximation, SD 1.x/2.x latents (after the VAE scaling)
CHEAP_COEFFICIENTS = np.array([[0.298, 0.207, 0.208],
                               [0.187, 0.286, 0.173],
                               [-0.158, 0.189, 0.264],
                               [-0.184, -0.271, -0.473]], dtype=np.float32)


def cheap_preview(latents: np.ndarray, scale: int = 8) -> list[Image.Image]:
    """Latents ``(B, h, w, 4)`` float32 -> ``B`` RGB images of ``(h * scale, w * scale)``, no model needed."""
    rgb = latents[..., :4] @ CHEAP_COEFFICIENTS  # (B, h, w, 3), about [-1, 1]
    images = to_pil((rgb + 1.0) / 2.0)
    return [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]


class Previewer:
    """Makes preview images for a pipeline's latents.

    Args:
        taesd: a TAESD location for :func:`sd_mlx.models.taesd.load_taesd`, or ``None`` (cheap approximation).
        dtype: the TAESD's weights dtype.

    The TAESD is loaded on first use, on the calling (worker) thread.
    """

    def __init__(self, taesd: Path | None, dtype: str = "float32") -> None:
        self.taesd, self.dtype = taesd, dtype
        self._decoder: Any = None

    def __call__(self, pipe: Any, latents: Any) -> Image.Image:
        """All images of ``latents`` (an ``mx.array`` ``(B, h, w, 4)``) side by side, as one RGB image."""
        if self.taesd is None or latents.shape[-1] != 4:
            images = cheap_preview(np.array(latents))
        else:
            if self._decoder is None:
                from ..models.taesd import load_taesd
                from ..pipeline import resolve_taesd

                self._decoder = load_taesd(resolve_taesd(self.taesd), dtype=self.dtype)
            decoded = pipe.decode_latents(latents, batch_size=latents.shape[0], vae=self._decoder)
            images = to_pil(np.array(decoded))
        return images[0] if len(images) == 1 else make_grid(images, 1, len(images))
