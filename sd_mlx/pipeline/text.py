"""Prompts to conditioning for SD 1.x/2.x: one CLIP text encoder, as diffusers' ``StableDiffusionPipeline.encode_prompt``.

Each distinct prompt is encoded once, one at a time (a prompt's embedding does not depend on the others it is batched
with), then repeated for its images. Other families add their own function producing a
:class:`~sd_mlx.pipeline.loop.Conditioning` (SDXL: two encoders, pooled embeddings, time ids).
"""

from __future__ import annotations

import warnings
from typing import Any

import mlx.core as mx

from .checks import check_finite
from .loop import Conditioning


def encode_ids(text_encoder: Any, ids: mx.array, clip_skip: int | None) -> mx.array:
    """Hidden states ``(B, 77, D)`` of token ids ``(B, 77)``: ``last_hidden_state``, or with ``clip_skip`` the
    output of layer ``-(clip_skip + 1)`` passed through the final layer norm (diffusers' SD rule)."""
    out = text_encoder(ids)
    if clip_skip:
        return text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])
    return out.last_hidden_state


def encode_prompts(text_encoder: Any, tokenizer: Any, prompts: list[str], *, long_prompt: str = "truncate",
                   clip_skip: int | None = None, num_chunks: int | None = None, what: str = "prompt") -> mx.array:
    """Text embeddings ``(B, T, D)`` of ``prompts``, as diffusers' ``encode_prompt`` computes them.

    ``long_prompt="chunk"`` encodes 75-token chunks separately and concatenates them along ``T`` (A1111 style;
    ``T = 77 * num_chunks``); ``"truncate"`` cuts at 77 tokens (``T = 77``) and warns with the dropped text
    (``what`` names the prompt in the warning). Prompts are encoded one at a time.

    Raises:
        InvalidArgumentError: a prompt is not a string, or ``num_chunks`` is too small.
    """
    rows = []
    size = tokenizer.model_max_length
    for p in prompts:
        if long_prompt == "chunk":
            ids = tokenizer.chunked([p], num_chunks=num_chunks)
            chunks = [encode_ids(text_encoder, ids[:, i * size:(i + 1) * size], clip_skip)
                      for i in range(ids.shape[1] // size)]
            rows.append(mx.concatenate(chunks, axis=1))
            continue
        dropped = tokenizer.truncate(p)[1]
        if dropped:
            warnings.warn(f"{what} longer than {size} tokens was truncated (as diffusers does); dropped: "
                          f"{dropped!r}; use long_prompt='chunk' (--long-prompt chunk) to keep it", stacklevel=5)
        rows.append(encode_ids(text_encoder, tokenizer([p]), clip_skip))
    return mx.concatenate(rows, axis=0)


def encode_per_image(encode: Any, texts: list[str], repeats: int) -> mx.array:
    """``encode(unique_texts)`` once per distinct text, then one row per image: text ``k`` repeated ``repeats``
    times in order (prompt-major, as the images of a call)."""
    unique = list(dict.fromkeys(texts))
    emb = encode(unique)
    index = mx.array([unique.index(t) for t in texts])
    return mx.repeat(emb[index], repeats, axis=0)


def sd_conditioning(text_encoder: Any, tokenizer: Any, prompts: list[str], negatives: list[str] | None, *,
                    num_images_per_prompt: int, long_prompt: str, clip_skip: int | None,
                    compute_dtype: mx.Dtype) -> Conditioning:
    """The :class:`Conditioning` of an SD 1.x/2.x call: ``cond`` (and, when ``negatives`` is given, ``uncond``)
    ``(B, T, D)`` in ``compute_dtype``, ``B = len(prompts) * num_images_per_prompt``; evaluated and checked.

    With ``long_prompt="chunk"`` the prompts and negative prompts are padded to the same number of chunks.

    Raises:
        NonFiniteError: NaN or Inf in the embeddings.
    """
    num_chunks = tokenizer.num_chunks(prompts + (negatives or [])) if long_prompt == "chunk" else None

    def encoder(what: str) -> Any:
        return lambda texts: encode_prompts(text_encoder, tokenizer, texts, long_prompt=long_prompt,
                                            clip_skip=clip_skip, num_chunks=num_chunks, what=what)

    cond = encode_per_image(encoder("prompt"), prompts, num_images_per_prompt).astype(compute_dtype)
    uncond = None
    if negatives is not None:
        uncond = encode_per_image(encoder("negative prompt"), negatives, num_images_per_prompt)
        uncond = uncond.astype(compute_dtype)
    both = cond if uncond is None else mx.concatenate([uncond, cond])
    mx.eval(both)
    check_finite(both, "text encoding")
    return Conditioning(cond=cond, uncond=uncond)
