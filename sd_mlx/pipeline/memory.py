"""How much memory a generation needs, and how much there is: checked before any weights are loaded, so a size
that cannot fit fails at once with a suggestion instead of swapping or crashing halfway."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx

from .. import ops

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def available_memory_bytes() -> int:
    """Memory this process can use for MLX arrays, in bytes.

    The device's recommended working set (Apple GPU) or memory size as ``mx.device_info()`` reports it, else the
    physical RAM (``os.sysconf``), lowered to a cgroup v2 ``memory.max`` limit when one is set (containers).
    """
    candidates: list[int] = []
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        for key in ("max_recommended_working_set_size", "memory_size"):
            if isinstance(info.get(key), int) and info[key] > 0:
                candidates.append(int(info[key]))
                break
    except Exception:  # noqa: BLE001 - no device info on this backend
        pass
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return 2**62
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            candidates.append(int(limit))
    except OSError:
        pass
    return min(candidates)


@dataclass(frozen=True)
class MemoryEstimate:
    """A lower-bound estimate of a call's peak memory, in bytes.

    Attributes:
        weights: parameters of the models held at the same time (in the load dtype).
        attention: the U-Net's largest self-attention score matrix, ``rows * heads * (h*w)^2 * 4`` bytes at the first
            level with attention (``rows`` = images per U-Net evaluation, doubled by classifier-free guidance).
        decoder: VAE decoding of ``vae_batch_size`` images: full-resolution activations and the mid-block attention.
    """

    weights: int
    attention: int
    decoder: int

    @property
    def total(self) -> int:
        """``weights + max(attention, decoder)`` (the U-Net and the decoder do not run at the same time)."""
        return self.weights + max(self.attention, self.decoder)


def estimate_memory(unet_config: Any, vae_channels: Sequence[int], weight_bytes: int, *, height: int, width: int,
                    unet_rows: int, vae_batch: int, vae_scale_factor: int = 8, act_bytes: int = 4,
                    chunked_attention: bool | None = None) -> MemoryEstimate:
    """Estimate the peak memory of one generation (see :class:`MemoryEstimate`); deliberately a lower bound, so an
    error raised on it never refuses a call that would have fitted.

    Args:
        unet_config: :class:`sd_mlx.models.unet.UNetConfig` (``down_block_types``, ``heads``).
        vae_channels: the VAE's ``block_out_channels`` (empty for TAESD: its decoder is not counted).
        weight_bytes: bytes of the weights held during denoising.
        height, width: image size in pixels.
        unet_rows: rows of one U-Net evaluation (images at a time, times 2 with guidance).
        vae_batch: images decoded at once.
        act_bytes: bytes per activation element (4 for float32).
        chunked_attention: the U-Net's attention runs on bounded query chunks (MLX's CPU path) rather than on the
            whole score matrix; ``None`` means "when MLX's default device is the CPU".
    """
    if chunked_attention is None:
        chunked_attention = ops.attention_is_chunked()
    h, w = height // vae_scale_factor, width // vae_scale_factor
    attention = 0
    for level, (kind, heads) in enumerate(zip(unet_config.down_block_types, unet_config.heads)):
        if "CrossAttn" in kind:
            tokens = -(-h // 2**level) * -(-w // 2**level)
            attention = unet_rows * heads * tokens * tokens * 4
            if chunked_attention:
                from ..cpu.attention import CHUNK_ELEMENTS

                attention = min(attention, 3 * CHUNK_ELEMENTS * 4)
            break
    decoder = 0
    if vae_channels:
        widest = max(vae_channels[:2])
        decoder = vae_batch * (height * width * widest * act_bytes * 3 + (h * w) ** 2 * 4)
    return MemoryEstimate(weights=int(weight_bytes), attention=int(attention), decoder=int(decoder))


def info_bytes(header: dict[str, Any], target_float_bytes: int) -> int:
    """Bytes the tensors of a header (``{key: TensorInfo}`` with ``shape`` and safetensors ``dtype``) take once
    loaded, floating-point ones at ``target_float_bytes`` each."""
    total = 0
    for info in header.values():
        n = 1
        for d in info.shape:
            n *= int(d)
        total += n * (target_float_bytes if info.dtype in _FLOAT_DTYPES else _DTYPE_BYTES.get(info.dtype, 4))
    return total


def format_bytes(n: int) -> str:
    """``n`` bytes as ``"1.2 GB"`` or ``"34.5 MB"``."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
