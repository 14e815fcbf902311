"""CLIP text encoder (``transformers.CLIPTextModel`` / ``CLIPTextModelWithProjection``) in MLX.

Token ids ``(B, T)`` -> token + learned position embeddings -> ``num_hidden_layers`` pre-LayerNorm transformer
layers with causal self-attention -> final LayerNorm. The pooled output is the final state at the EOS position;
``CLIPTextModelWithProjection`` also projects it with a bias-free linear layer (``text_embeds``, used by SDXL).

Numerics: attention uses ``mx.fast.scaled_dot_product_attention`` with the ``"causal"`` mask (no large negative
constant that could overflow in float16) and computes its softmax in float32 for every input dtype; LayerNorm is
``mx.fast.layer_norm``. Everything else runs in the parameter dtype chosen at load time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..arrays import int_array
from ..errors import InvalidArgumentError
from ..loading.components import ComponentSpec, load_component
from ..loading.configs import dataclass_from_dict, require
from ..loading.keymaps.clip import clip_text_benign, clip_text_keymap

ACTIVATIONS = ("quick_gelu", "gelu")
ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")


@dataclass(frozen=True)
class CLIPTextConfig:
    """Fields of a transformers ``CLIPTextConfig`` ``config.json`` that change the maths (defaults as transformers).

    Attributes:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        max_position_embeddings: model sizes (``hidden_size`` must divide by ``num_attention_heads``).
        hidden_act: ``"quick_gelu"`` (``x * sigmoid(1.702 x)``, SD 1.x) or ``"gelu"`` (exact erf GELU, SD 2.x and
            SDXL's second encoder).
        layer_norm_eps: LayerNorm epsilon.
        projection_dim: output size of ``text_projection`` (used only by ``CLIPTextModelWithProjection``).
        bos_token_id, eos_token_id, pad_token_id: ``eos_token_id`` selects the pooling rule (see
            :class:`CLIPTextModel`); the others are informational.
        architectures: ``("CLIPTextModel",)`` or ``("CLIPTextModelWithProjection",)``.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int | None = 1
    architectures: tuple[str, ...] = ("CLIPTextModel",)
    source: str = field(default="<config>", compare=False, repr=False)

    def __post_init__(self) -> None:
        src = self.source
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v > 0, src,
                    f"{name} must be a positive integer, got {v!r}")
        require(self.hidden_size % self.num_attention_heads == 0, src,
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}")
        require(self.hidden_act in ACTIVATIONS, src,
                f"hidden_act {self.hidden_act!r} not supported; sd_mlx supports {', '.join(ACTIVATIONS)}")
        require(isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0, src,
                f"layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")
        eos = self.eos_token_id
        if isinstance(eos, (list, tuple)) and len(eos) == 1:
            eos = eos[0]
            object.__setattr__(self, "eos_token_id", eos)
        require(isinstance(eos, int) and not isinstance(eos, bool), src,
                f"eos_token_id must be one integer, got {eos!r}")
        archs = self.architectures
        if isinstance(archs, str):
            archs = (archs,)
        require(isinstance(archs, (list, tuple)) and len(archs) >= 1, src,
                f"architectures must be a list of class names, got {archs!r}")
        archs = tuple(archs)
        object.__setattr__(self, "architectures", archs)
        unknown = [a for a in archs if a not in ARCHITECTURES]
        require(not unknown, src, f"architectures {unknown} not supported; a text encoder is one of "
                                  f"{', '.join(ARCHITECTURES)}")
        if self.with_projection:
            p = self.projection_dim
            require(isinstance(p, int) and not isinstance(p, bool) and p > 0, src,
                    f"projection_dim must be a positive integer for CLIPTextModelWithProjection, got {p!r}")

    @property
    def with_projection(self) -> bool:
        """True for ``CLIPTextModelWithProjection`` (the model has ``text_projection`` and returns ``text_embeds``)."""
        return "CLIPTextModelWithProjection" in self.architectures

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> "CLIPTextConfig":
        """Build from a transformers ``config.json`` mapping.

        Raises:
            ConfigError: a value of the wrong type, or one sd_mlx does not support (message names ``source`` and the
                field): ``hidden_act`` other than quick_gelu/gelu, an unknown architecture, a list ``eos_token_id``.
        """
        data = dict(d)
        data.pop("source", None)
        data["source"] = source
        return dataclass_from_dict(cls, data, source=source)


@dataclass
class CLIPTextOutput:
    """Outputs of :class:`CLIPTextModel` (transformers' ``BaseModelOutputWithPooling`` / ``CLIPTextModelOutput``).

    Attributes:
        last_hidden_state: ``(B, T, D)`` after the final LayerNorm.
        hidden_states: ``num_hidden_layers + 1`` arrays ``(B, T, D)``: the embeddings, then each layer's output;
            the last one is *before* the final LayerNorm, ``hidden_states[-2]`` is the penultimate layer (SD 2.x /
            SDXL "clip skip").
        pooler_output: ``(B, D)`` final state at the EOS position.
        text_embeds: ``(B, projection_dim)`` ``text_projection(pooler_output)``, only with a projection (else None).
    """

    last_hidden_state: mx.array
    hidden_states: tuple[mx.array, ...]
    pooler_output: mx.array
    text_embeds: mx.array | None = None


class CLIPTextEmbeddings(nn.Module):
    """Token + learned absolute position embeddings (transformers ``CLIPTextEmbeddings``).

    ``(B, T)`` int ids -> ``(B, T, D)`` in the weights' dtype; positions are ``0..T-1``.
    """

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def __call__(self, input_ids: mx.array) -> mx.array:
        t = input_ids.shape[-1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:t]


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention with biased q/k/v/out projections (transformers ``CLIPAttention``).

    ``(B, T, D)`` -> ``(B, T, D)``; scale ``head_dim ** -0.5``; softmax in float32 (``mx.fast`` SDPA).
    """

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def __call__(self, x: mx.array) -> mx.array:
        b, t, d = x.shape

        def heads(y: mx.array) -> mx.array:
            return y.reshape(b, t, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal")
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(b, t, d))


class CLIPMLP(nn.Module):
    """``fc2(act(fc1(x)))`` with ``act`` = quick_gelu or exact GELU (transformers ``CLIPMLP``); ``(B, T, D)``."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.quick = config.hidden_act == "quick_gelu"
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.fc1(x)
        h = h * mx.sigmoid(1.702 * h) if self.quick else nn.gelu(h)
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: ``x + attn(ln1(x))`` then ``+ mlp(ln2(.))`` (transformers ``CLIPEncoderLayer``)."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of :class:`CLIPEncoderLayer` (``layers``), as transformers ``CLIPEncoder``."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class CLIPTextModel(nn.Module):
    """CLIP text transformer, following transformers ``CLIPTextModel`` and ``CLIPTextModelWithProjection``.

    Parameter names equal transformers 5's unprefixed keys (``embeddings.*``, ``encoder.layers.{i}.*``,
    ``final_layer_norm.*``, plus ``text_projection.weight`` when ``config.with_projection``).

    Pooling (as transformers): with the legacy ``eos_token_id == 2`` of SD/SDXL configs the pooled position is the
    first position of the largest id in each row (the EOS token 49407 is the largest id a CLIP tokenizer emits);
    otherwise it is the first position equal to ``eos_token_id`` (position 0 when a row has none).
    """

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.with_projection = config.with_projection
        if self.with_projection:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    # Activation dtype; ``None`` means the parameter dtype (see ``UNet2DConditionModel.compute_dtype``).
    compute_dtype: mx.Dtype | None = None

    def pooled_positions(self, input_ids: mx.array) -> mx.array:
        """``(B,)`` int32 index of the pooled (EOS) position of each row of ``input_ids`` ``(B, T)``."""
        ids = input_ids.astype(mx.int32)
        if self.config.eos_token_id == 2:
            hit = ids == mx.max(ids, axis=-1, keepdims=True)
        else:
            hit = ids == self.config.eos_token_id
        t = ids.shape[-1]
        first = mx.min(mx.where(hit, mx.arange(t, dtype=mx.int32), t), axis=-1)
        return mx.where(first == t, 0, first).astype(mx.int32)

    def __call__(self, input_ids: mx.array) -> CLIPTextOutput:
        """Encode token ids.

        Args:
            input_ids: ``(B, T)`` integer ids (``mx.array`` or numpy, any integer dtype), ``T <=
                max_position_embeddings`` (77), e.g. from
                :class:`sd_mlx.tokenizer.CLIPTokenizer`.

        Returns:
            :class:`CLIPTextOutput` with arrays in the parameter dtype, or in ``compute_dtype`` when that is set
            (lazy; evaluate what you use).

        Raises:
            InvalidArgumentError: ``input_ids`` is not a 2-D integer array or is longer than
                ``max_position_embeddings``.
        """
        input_ids = int_array(input_ids, "input_ids", ("B", "T"), layout="of token ids")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise InvalidArgumentError(f"input_ids has {input_ids.shape[1]} tokens; the text encoder takes at most "
                                       f"{self.config.max_position_embeddings} (use chunking for long prompts)")
        h = self.embeddings(input_ids)
        if self.compute_dtype is not None:
            h = h.astype(self.compute_dtype)
        states = [h]
        for layer in self.encoder.layers:
            h = layer(h)
            states.append(h)
        last = self.final_layer_norm(h)
        pos = self.pooled_positions(input_ids)
        pooled = mx.take_along_axis(last, pos[:, None, None], axis=1)[:, 0]
        embeds = self.text_projection(pooled) if self.with_projection else None
        return CLIPTextOutput(last_hidden_state=last, hidden_states=tuple(states), pooler_output=pooled,
                              text_embeds=embeds)


CLIP_TEXT_SPEC = ComponentSpec(
    config_from_dict=CLIPTextConfig.from_dict,
    build=CLIPTextModel,
    keymap=clip_text_keymap,
    weight_stem="model",
    benign=clip_text_benign,
)
"""How to load a transformers CLIP text encoder folder (``text_encoder/``, ``text_encoder_2/``)."""


def load_text_encoder(folder: Path | str, dtype: str | mx.Dtype = "float32") -> CLIPTextModel:
    """Load ``folder/config.json`` + ``folder/model[.fp16].safetensors`` into a :class:`CLIPTextModel`.

    Accepts both key layouts (with and without the ``text_model.`` prefix); ``embeddings.position_ids`` is ignored.

    Raises:
        ModelNotFoundError: the folder does not exist.
        ConfigError: see :meth:`CLIPTextConfig.from_dict`.
        WeightLoadError: missing/unknown key, wrong shape, non-finite value, unreadable file (names the key).
    """
    return load_component(folder, CLIP_TEXT_SPEC, dtype=dtype)  # type: ignore[return-value]


__all__ = ["CLIPTextConfig", "CLIPTextModel", "CLIPTextOutput", "CLIP_TEXT_SPEC", "load_text_encoder"]
