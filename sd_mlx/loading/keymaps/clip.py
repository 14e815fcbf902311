"""Key map for transformers CLIP text encoders (``CLIPTextModel`` / ``CLIPTextModelWithProjection``).

Checkpoint keys come in two layouts: with the ``text_model.`` prefix (every SD/SDXL ``text_encoder`` checkpoint,
written by transformers 4.x, and ``CLIPTextModelWithProjection`` in every version) and without it (what
transformers 5 ``CLIPTextModel.save_pretrained`` writes). The MLX module tree of
:class:`sd_mlx.models.clip.CLIPTextModel` uses the unprefixed names (``embeddings.token_embedding.weight``,
``encoder.layers.{i}.self_attn.q_proj.weight``, ``final_layer_norm.weight``, ``text_projection.weight``), and every
tensor keeps its layout (Linear ``(out, in)`` and Embedding ``(num, dim)`` are the same in MLX and PyTorch).
"""

from __future__ import annotations

import mlx.core as mx

PREFIX = "text_model."


def clip_text_keymap(key: str, value: mx.array) -> list[tuple[str, mx.array]]:
    """Map one transformers CLIP text-encoder key to the MLX key (the ``text_model.`` prefix is dropped).

    Keys that are not CLIP text-encoder keys pass through unchanged, so strict assignment reports them by name.
    """
    if key.startswith(PREFIX):
        key = key[len(PREFIX):]
    return [(key, value)]


def clip_text_benign(key: str) -> bool:
    """True for ``[text_model.]embeddings.position_ids``: a non-learned buffer (``arange(77)``) that old
    transformers versions saved; positions are recomputed, so it is ignored."""
    return key in ("embeddings.position_ids", PREFIX + "embeddings.position_ids")
