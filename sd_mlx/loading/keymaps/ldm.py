"""Pure key maps between the original latent-diffusion (LDM / "single file") layout and diffusers' names.

A single-file Stable Diffusion checkpoint (``*.safetensors`` from CompVis, Stability AI, A1111, ComfyUI, kohya...)
stores every model under a prefix of the original training code (see :mod:`sd_mlx.loading.single_file` for the
prefixes); this module maps one key *below* such a prefix to the diffusers key of the same tensor, and back. The
facts come from the original LDM/SGM module trees (``openaimodel.UNetModel``, ``autoencoder.AutoencoderKL``,
OpenCLIP's ``TextTransformer``) and match diffusers' ``single_file_utils`` conversion:

- **U-Net** (``model.diffusion_model.*``): ``input_blocks.{i}`` counts every resnet, attention and downsampler of
  the down path in order (``i = 1 + block * (layers_per_block + 1) + layer``; the last slot of a block is its
  downsampler ``op``); ``output_blocks.{i}`` likewise for the up path (``layers_per_block + 1`` resnets per block,
  the upsampler at sub-index 1 without attention, 2 with it); resnet parts ``in_layers.{0,2}`` / ``out_layers.{0,3}``
  / ``emb_layers.1`` / ``skip_connection`` are ``norm1``/``conv1`` / ``norm2``/``conv2`` / ``time_emb_proj`` /
  ``conv_shortcut``; attention (``SpatialTransformer``) keys already have diffusers' names.
- **VAE** (``first_stage_model.*``): ``encoder.down.{i}.block.{j}`` -> ``encoder.down_blocks.{i}.resnets.{j}``; the
  decoder's ``up.{i}`` is stored from the lowest resolution *upwards*, so it is diffusers' ``up_blocks.{n-1-i}``;
  ``mid.block_{1,2}`` -> ``mid_block.resnets.{0,1}``; ``mid.attn_1.{norm,q,k,v,proj_out}`` ->
  ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`` whose 1x1 convolution kernels ``(C, C, 1, 1)``
  are diffusers' linear weights ``(C, C)``; ``nin_shortcut`` -> ``conv_shortcut``; ``norm_out`` -> ``conv_norm_out``.
- **OpenCLIP text tower** (SD 2.x ``cond_stage_model.model.*``, SDXL ``conditioner.embedders.{0,1}.model.*``) ->
  transformers ``CLIPTextModel`` names: ``transformer.resblocks.{n}`` -> ``encoder.layers.{n}``; the fused
  ``attn.in_proj_weight`` ``(3D, D)`` / ``in_proj_bias`` ``(3D,)`` hold q, k, v in that order, one third each;
  ``ln_1``/``ln_2`` -> ``layer_norm1``/``layer_norm2``; ``mlp.c_fc``/``mlp.c_proj`` -> ``mlp.fc1``/``mlp.fc2``;
  ``positional_embedding`` ``(77, D)`` -> ``embeddings.position_embedding.weight``; ``ln_final`` ->
  ``final_layer_norm``; ``text_projection`` ``(D, P)`` is used as ``x @ P`` and is the *transpose* of transformers'
  ``text_projection.weight`` ``(P, D)``.
- **OpenAI CLIP text encoder** (SD 1.x ``cond_stage_model.transformer.*``, SDXL ``conditioner.embedders.0.
  transformer.*``): already transformers names (``text_model.*``), kept as they are.

Text-encoder keys on the diffusers side are written without transformers' ``text_model.`` prefix (the layout
``CLIPTextModel.save_pretrained`` writes in transformers 5, which :mod:`sd_mlx.loading.keymaps.clip` reads).

Every map returns ``None`` (or an empty list) for a key it does not know, so the caller can report that key by
name. A :class:`Piece` says how the diffusers tensor is cut from the LDM one; it works on numpy, MLX and torch
arrays alike (only slicing, ``.T`` and ``reshape``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

# ------------------------------------------------------------------------------------------------------- pieces


@dataclass(frozen=True)
class Piece:
    """One diffusers tensor made from one LDM tensor.

    Attributes:
        key: the diffusers key.
        rows: ``(part, parts)``: take the ``part``-th of ``parts`` equal slices along axis 0 (fused q/k/v).
        transpose: transpose a 2-D array (OpenCLIP ``text_projection``).
        squeeze: ``(C, C, 1, 1)`` 1x1 convolution kernel -> ``(C, C)`` linear weight (LDM VAE attention).
    """

    key: str
    rows: tuple[int, int] | None = None
    transpose: bool = False
    squeeze: bool = False

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The diffusers tensor's shape for an LDM tensor of ``shape``.

        Raises:
            ValueError: ``shape`` does not fit the piece (e.g. a fused projection not divisible by 3, a 1x1 kernel
                that is not 4-D, a projection that is not 2-D); the message names the key.
        """
        shape = tuple(int(d) for d in shape)
        if self.rows is not None:
            part, parts = self.rows
            if not shape or shape[0] % parts:
                raise ValueError(f"'{self.key}': fused tensor of shape {shape} cannot be split in {parts} equal "
                                 f"parts along its first axis")
            shape = (shape[0] // parts, *shape[1:])
        if self.transpose:
            if len(shape) != 2:
                raise ValueError(f"'{self.key}': expected a 2-D projection, got shape {shape}")
            shape = (shape[1], shape[0])
        if self.squeeze:
            if len(shape) == 4 and shape[2:] == (1, 1):
                shape = shape[:2]
            elif len(shape) != 2:
                raise ValueError(f"'{self.key}': expected a 1x1 kernel (C, C, 1, 1) or a (C, C) weight, got "
                                 f"shape {shape}")
        return shape

    def apply(self, value: Any) -> Any:
        """Cut the diffusers tensor from the LDM ``value`` (numpy, MLX or torch array; lazy for MLX)."""
        if self.rows is not None:
            part, parts = self.rows
            n = value.shape[0] // parts
            value = value[part * n:(part + 1) * n]
        if self.transpose:
            value = value.T
        if self.squeeze and len(value.shape) == 4:
            value = value.reshape(int(value.shape[0]), int(value.shape[1]))
        return value


# --------------------------------------------------------------------------------------------------------- U-Net

_UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "label_emb.0.0": "add_embedding.linear_1",  # SDXL: the pooled-text + size/crop embedding ("text_time")
    "label_emb.0.2": "add_embedding.linear_2",
}
_UNET_TOP_INV = {v: k for k, v in _UNET_TOP.items()}
_UNET_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
                ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut"))


def _swap_prefix(rest: str, table: Sequence[tuple[str, str]], inverse: bool = False) -> str | None:
    for old, new in table:
        a, b = (new, old) if inverse else (old, new)
        if rest.startswith(a + "."):
            return b + rest[len(a):]
    return None


def _index_split(key: str, head: str) -> tuple[int, int, str] | None:
    """``"{head}.{i}.{j}.{rest}"`` -> ``(i, j, rest)``; ``None`` otherwise."""
    if not key.startswith(head + "."):
        return None
    parts = key[len(head) + 1:].split(".", 2)
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    return int(parts[0]), int(parts[1]), parts[2]


def ldm_unet_key(key: str, layers_per_block: int) -> str | None:
    """Diffusers ``UNet2DConditionModel`` key of the LDM U-Net key ``key`` (below ``model.diffusion_model.``).

    Args:
        key: e.g. ``"input_blocks.1.0.in_layers.2.weight"``.
        layers_per_block: the config's ``layers_per_block`` (resnets per down block).

    Returns:
        e.g. ``"down_blocks.0.resnets.0.conv1.weight"``; ``None`` for a key that is not part of the U-Net layout
        (including an index that does not fit ``layers_per_block``).
    """
    for old, new in _UNET_TOP.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    slots = layers_per_block + 1
    parsed = _index_split(key, "input_blocks")
    if parsed is not None:
        i, j, rest = parsed
        if i < 1:
            return None
        block, layer = (i - 1) // slots, (i - 1) % slots
        if j == 0 and rest.startswith("op."):
            return f"down_blocks.{block}.downsamplers.0.conv.{rest[3:]}" if layer == layers_per_block else None
        if layer == layers_per_block:
            return None
        if j == 0:
            sub = _swap_prefix(rest, _UNET_RESNET)
            return f"down_blocks.{block}.resnets.{layer}.{sub}" if sub else None
        if j == 1:
            return f"down_blocks.{block}.attentions.{layer}.{rest}"
        return None
    if key.startswith("middle_block."):
        head, _, rest = key[len("middle_block."):].partition(".")
        if head in ("0", "2"):
            sub = _swap_prefix(rest, _UNET_RESNET)
            return f"mid_block.resnets.{int(head) // 2}.{sub}" if sub else None
        if head == "1" and rest:
            return f"mid_block.attentions.0.{rest}"
        return None
    parsed = _index_split(key, "output_blocks")
    if parsed is not None:
        i, j, rest = parsed
        block, layer = i // slots, i % slots
        if j == 0:
            sub = _swap_prefix(rest, _UNET_RESNET)
            return f"up_blocks.{block}.resnets.{layer}.{sub}" if sub else None
        if j in (1, 2) and rest.startswith("conv."):
            return f"up_blocks.{block}.upsamplers.0.conv.{rest[5:]}" if layer == layers_per_block else None
        if j == 1:
            return f"up_blocks.{block}.attentions.{layer}.{rest}"
        return None
    return None


def _diffusers_index_split(key: str, head: str) -> tuple[int, str, int, str] | None:
    """``"{head}.{b}.{kind}.{n}.{rest}"`` -> ``(b, kind, n, rest)``."""
    if not key.startswith(head + "."):
        return None
    parts = key[len(head) + 1:].split(".", 3)
    if len(parts) != 4 or not parts[0].isdigit() or not parts[2].isdigit():
        return None
    return int(parts[0]), parts[1], int(parts[2]), parts[3]


def diffusers_unet_key_to_ldm(key: str, layers_per_block: int, up_block_has_attention: Sequence[bool]) -> str | None:
    """Inverse of :func:`ldm_unet_key`: the LDM key (below ``model.diffusion_model.``) of a diffusers U-Net key.

    Args:
        key: e.g. ``"up_blocks.1.upsamplers.0.conv.weight"``.
        layers_per_block: the config's ``layers_per_block``.
        up_block_has_attention: per up block, whether it is a ``CrossAttnUpBlock2D`` (its upsampler then sits at
            sub-index 2 of the LDM output block, else at 1).

    Returns:
        The LDM key, or ``None`` for a key outside the layout.
    """
    for new, old in _UNET_TOP_INV.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    slots = layers_per_block + 1
    parsed = _diffusers_index_split(key, "down_blocks")
    if parsed is not None:
        block, kind, n, rest = parsed
        if kind == "resnets":
            sub = _swap_prefix(rest, _UNET_RESNET, inverse=True)
            return f"input_blocks.{1 + block * slots + n}.0.{sub}" if sub else None
        if kind == "attentions":
            return f"input_blocks.{1 + block * slots + n}.1.{rest}"
        if kind == "downsamplers" and n == 0 and rest.startswith("conv."):
            return f"input_blocks.{1 + block * slots + layers_per_block}.0.op.{rest[5:]}"
        return None
    if key.startswith("mid_block."):
        parts = key[len("mid_block."):].split(".", 2)
        if len(parts) == 3 and parts[1].isdigit():
            kind, n, rest = parts[0], int(parts[1]), parts[2]
            if kind == "resnets" and n in (0, 1):
                sub = _swap_prefix(rest, _UNET_RESNET, inverse=True)
                return f"middle_block.{2 * n}.{sub}" if sub else None
            if kind == "attentions" and n == 0:
                return f"middle_block.1.{rest}"
        return None
    parsed = _diffusers_index_split(key, "up_blocks")
    if parsed is not None:
        block, kind, n, rest = parsed
        if kind == "resnets":
            sub = _swap_prefix(rest, _UNET_RESNET, inverse=True)
            return f"output_blocks.{block * slots + n}.0.{sub}" if sub else None
        if kind == "attentions":
            return f"output_blocks.{block * slots + n}.1.{rest}"
        if kind == "upsamplers" and n == 0 and rest.startswith("conv.") and block < len(up_block_has_attention):
            index = 2 if up_block_has_attention[block] else 1
            return f"output_blocks.{block * slots + layers_per_block}.{index}.conv.{rest[5:]}"
        return None
    return None


# ----------------------------------------------------------------------------------------------------------- VAE

_VAE_RESNET_PARTS = ("norm1", "conv1", "norm2", "conv2", "nin_shortcut")
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_ATTENTION_INV = {v: k for k, v in _VAE_ATTENTION.items()}
_VAE_SAME = ("conv_in", "conv_out")


def _vae_resnet(rest: str) -> str | None:
    part, _, tail = rest.partition(".")
    if part not in _VAE_RESNET_PARTS or not tail:
        return None
    return ("conv_shortcut" if part == "nin_shortcut" else part) + "." + tail


def _vae_resnet_inv(rest: str) -> str | None:
    part, _, tail = rest.partition(".")
    part = "nin_shortcut" if part == "conv_shortcut" else part
    if part not in _VAE_RESNET_PARTS or not tail:
        return None
    return part + "." + tail


def ldm_vae_key(key: str, num_blocks: int) -> Piece | None:
    """Diffusers ``AutoencoderKL`` tensor of the LDM VAE key ``key`` (below ``first_stage_model.``, or the whole
    key of a standalone VAE file).

    Args:
        key: e.g. ``"decoder.up.0.block.2.nin_shortcut.weight"``.
        num_blocks: ``len(block_out_channels)`` of the config (4 for every SD VAE): the decoder's ``up.{i}`` is
            diffusers' ``up_blocks.{num_blocks - 1 - i}``.

    Returns:
        The :class:`Piece` (attention q/k/v/proj_out weights are squeezed from 1x1 kernels), or ``None`` for a key
        outside the layout.
    """
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return Piece(key)
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder") or not rest:
        return None
    head, _, tail = rest.partition(".")
    if head in _VAE_SAME and tail:
        return Piece(key)
    if head == "norm_out" and tail:
        return Piece(f"{side}.conv_norm_out.{tail}")
    if head == "mid":
        part, _, tail = tail.partition(".")
        if part in ("block_1", "block_2"):
            sub = _vae_resnet(tail)
            return Piece(f"{side}.mid_block.resnets.{int(part[-1]) - 1}.{sub}") if sub else None
        if part == "attn_1":
            name, _, param = tail.partition(".")
            if name in _VAE_ATTENTION and param in ("weight", "bias"):
                return Piece(f"{side}.mid_block.attentions.0.{_VAE_ATTENTION[name]}.{param}",
                             squeeze=name != "norm" and param == "weight")
        return None
    expected = "down" if side == "encoder" else "up"
    if head != expected:
        return None
    index, _, tail = tail.partition(".")
    if not index.isdigit() or int(index) >= num_blocks:
        return None
    i = int(index)
    block = i if side == "encoder" else num_blocks - 1 - i
    kind = "down_blocks" if side == "encoder" else "up_blocks"
    part, _, tail = tail.partition(".")
    if part == "block":
        n, _, tail = tail.partition(".")
        sub = _vae_resnet(tail) if n.isdigit() else None
        return Piece(f"{side}.{kind}.{block}.resnets.{int(n)}.{sub}") if sub else None
    sampler = "downsample" if side == "encoder" else "upsample"
    if part == sampler and tail.startswith("conv.") and tail.count(".") == 1:
        samplers = "downsamplers" if side == "encoder" else "upsamplers"
        return Piece(f"{side}.{kind}.{block}.{samplers}.0.{tail}")
    return None


def diffusers_vae_key_to_ldm(key: str, num_blocks: int) -> tuple[str, bool] | None:
    """Inverse of :func:`ldm_vae_key`: ``(ldm_key, unsqueeze)`` for a diffusers VAE key, where ``unsqueeze`` means
    the ``(C, C)`` linear weight is stored as a ``(C, C, 1, 1)`` kernel in the LDM layout; ``None`` outside it."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key, False
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder") or not rest:
        return None
    head, _, tail = rest.partition(".")
    if head in _VAE_SAME and tail:
        return key, False
    if head == "conv_norm_out" and tail:
        return f"{side}.norm_out.{tail}", False
    if head == "mid_block":
        kind, _, tail = tail.partition(".")
        n, _, tail = tail.partition(".")
        if kind == "resnets" and n in ("0", "1"):
            sub = _vae_resnet_inv(tail)
            return (f"{side}.mid.block_{int(n) + 1}.{sub}", False) if sub else None
        if kind == "attentions" and n == "0":
            name, _, param = tail.rpartition(".")
            if name in _VAE_ATTENTION_INV and param in ("weight", "bias"):
                ldm = _VAE_ATTENTION_INV[name]
                return f"{side}.mid.attn_1.{ldm}.{param}", ldm != "norm" and param == "weight"
        return None
    kind = "down_blocks" if side == "encoder" else "up_blocks"
    if head != kind:
        return None
    index, _, tail = tail.partition(".")
    if not index.isdigit() or int(index) >= num_blocks:
        return None
    block = int(index)
    i = block if side == "encoder" else num_blocks - 1 - block
    ldm_kind = "down" if side == "encoder" else "up"
    part, _, tail = tail.partition(".")
    if part == "resnets":
        n, _, tail = tail.partition(".")
        sub = _vae_resnet_inv(tail) if n.isdigit() else None
        return (f"{side}.{ldm_kind}.{i}.block.{n}.{sub}", False) if sub else None
    samplers = "downsamplers" if side == "encoder" else "upsamplers"
    if part == samplers and tail.startswith("0.conv."):
        sampler = "downsample" if side == "encoder" else "upsample"
        return f"{side}.{ldm_kind}.{i}.{sampler}.{tail[2:]}", False
    return None


# ------------------------------------------------------------------------------------------------- text encoders

_OPEN_CLIP_TOP = {
    "positional_embedding": "embeddings.position_embedding.weight",
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_OPEN_CLIP_TOP_INV = {v: k for k, v in _OPEN_CLIP_TOP.items()}
_OPEN_CLIP_LAYER = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                    ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))
_QKV = ("q_proj", "k_proj", "v_proj")


def open_clip_layer_index(key: str) -> int | None:
    """The resblock index ``n`` of an OpenCLIP key ``transformer.resblocks.{n}....``, else ``None``."""
    if not key.startswith("transformer.resblocks."):
        return None
    n = key[len("transformer.resblocks."):].partition(".")[0]
    return int(n) if n.isdigit() else None


def open_clip_key(key: str) -> list[Piece]:
    """Transformers ``CLIPTextModel`` tensors of one OpenCLIP text-tower key (below ``...model.``).

    Returns:
        One :class:`Piece`; three for a fused ``attn.in_proj_weight``/``in_proj_bias`` (q, k, v); none for a key
        outside the layout. ``text_projection`` becomes the transposed ``text_projection.weight``; ``logit_scale``
        (CLIP's contrastive temperature) is not a text-encoder tensor and is not mapped here.
    """
    if key in _OPEN_CLIP_TOP:
        return [Piece(_OPEN_CLIP_TOP[key])]
    if key == "text_projection":
        return [Piece("text_projection.weight", transpose=True)]
    n = open_clip_layer_index(key)
    if n is None:
        return []
    rest = key[len(f"transformer.resblocks.{n}."):]
    base = f"encoder.layers.{n}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        param = "weight" if rest.endswith("weight") else "bias"
        return [Piece(f"{base}self_attn.{name}.{param}", rows=(i, 3)) for i, name in enumerate(_QKV)]
    sub = _swap_prefix(rest, _OPEN_CLIP_LAYER)
    if sub is None or sub.rpartition(".")[2] not in ("weight", "bias"):
        return []
    return [Piece(base + sub)]


def diffusers_clip_key_to_open_clip(key: str) -> tuple[str, int | None, bool] | None:
    """Inverse of :func:`open_clip_key` for one transformers key (without ``text_model.``).

    Returns:
        ``(open_clip_key, qkv_part, transpose)``: ``qkv_part`` is 0/1/2 when the tensor is the q/k/v third of a
        fused ``in_proj`` (the caller concatenates the three in that order), ``transpose`` for
        ``text_projection``; ``None`` for a key outside the layout (e.g. ``embeddings.position_ids``).
    """
    if key in _OPEN_CLIP_TOP_INV:
        return _OPEN_CLIP_TOP_INV[key], None, False
    if key == "text_projection.weight":
        return "text_projection", None, True
    if not key.startswith("encoder.layers."):
        return None
    n, _, rest = key[len("encoder.layers."):].partition(".")
    if not n.isdigit():
        return None
    base = f"transformer.resblocks.{n}."
    for i, name in enumerate(_QKV):
        for param in ("weight", "bias"):
            if rest == f"self_attn.{name}.{param}":
                return f"{base}attn.in_proj_{param}", i, False
    sub = _swap_prefix(rest, _OPEN_CLIP_LAYER, inverse=True)
    return (base + sub, None, False) if sub else None


def clip_transformers_key(key: str) -> str:
    """The transformers ``CLIPTextModel`` key (without ``text_model.``) of an LDM OpenAI-CLIP key (below
    ``...transformer.``): ``text_model.encoder.layers.0...`` -> ``encoder.layers.0...``."""
    return key[len("text_model."):] if key.startswith("text_model.") else key
