"""Fused, multi-threaded attention for MLX's CPU backend, compiled from C++ at first use.

MLX's CPU backend runs element-wise kernels on one thread and writes every score matrix to memory, so the
4096-token self-attention of SD1.5 (batch 2, 8 heads of 40) took 1.3-1.5 s a call on 2 cores, against about 0.36 s
in PyTorch. ``csrc/cpu_attention.cpp`` computes ``softmax(q k^T * scale) v`` block by block with a running
maximum and denominator (the "online softmax" of Milakov & Gimelshein 2018, as blocked in FlashAttention, Dao et
al. 2022), keeps each score block in cache and spreads (batch, head, query block) items over all cores:
0.34-0.38 s for that call (0.27 s on a later 2-core AVX-512 CPU, where the softmax pass uses 16-lane vectors: 0.29 s
with 8), same values to float32 rounding (about 1e-6 relative against a float64 reference).

The library is built once per source, compiler and CPU by :mod:`sd_mlx.cpu.native` and loaded with ``ctypes``. Where no
compiler is found, the build fails or ``SD_MLX_FUSED_ATTENTION=0`` is set, :func:`fused_attention` returns
``None`` and the caller uses MLX's own operations; :func:`fused_attention_status` says which and why (the CLI
prints it with ``--verbose`` and warns when it is off on a CPU). The caller's MLX version also gives the
derivatives (the kernel is an ``mx.custom_function`` whose vjp and jvp are the reference's) and the value inside
``mx.compile`` and ``mx.vmap``, where inputs cannot be evaluated.

Trade-off: the kernel works on evaluated buffers, so each call evaluates its inputs (``mx.eval``): a U-Net step on
the CPU is evaluated in pieces instead of once, with the same result. Its working buffers (packed keys and
values, about ``2 * B * heads * S * d`` floats) are outside MLX's allocator and not in ``mx.get_peak_memory``;
the output is an MLX array it fills in place (:class:`sd_mlx.cpu.native.KernelOutput`).
"""

from __future__ import annotations

import ctypes
import functools
from functools import partial
from typing import Callable

import mlx.core as mx

from . import native

SOURCE = native.CSRC / "cpu_attention.cpp"
_ENV = "SD_MLX_FUSED_ATTENTION"


FusedAttentionStatus = native.KernelStatus
"""Whether the fused CPU attention is in use (``turned_off``: ``SD_MLX_FUSED_ATTENTION=0``)."""


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Callable | None, FusedAttentionStatus]:
    return native.bind_kernel(SOURCE, _ENV, "the fused CPU attention", off_reason="MLX's attention operations",
                              in_use="fused CPU attention", bind=kernel_function)


def kernel_function(library: ctypes.CDLL) -> Callable:
    """The kernel's entry point ``sd_mlx_attention_f32`` in a loaded build of ``csrc/cpu_attention.cpp``, with its
    ctypes signature set. Raises ``AttributeError`` when the library does not export it."""
    fn = library.sd_mlx_attention_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5 + [ctypes.c_long] * 3 + [ctypes.c_float, ctypes.c_int]
    return fn


def fused_attention_status() -> FusedAttentionStatus:
    """Build and load the kernel if not done yet in this process, and say whether it is in use. Never raises."""
    return _load()[1]


def fused_attention_status_on_cpu() -> FusedAttentionStatus | None:
    """:func:`fused_attention_status` when MLX computes on the CPU (the only place the kernel is used), else
    ``None``. Never raises."""
    return native.status_on_cpu(fused_attention_status)


AttentionFn = Callable[[mx.array, mx.array, mx.array, int], mx.array]
"""``(q, k, v, heads) -> out``: token-major multi-head attention as in :func:`fused_attention`."""


def fused_attention(q: mx.array, k: mx.array, v: mx.array, heads: int, reference: AttentionFn) -> mx.array | None:
    """Multi-head ``softmax(q k^T / sqrt(d)) v`` on the CPU with the fused kernel, or ``None`` when it cannot run.

    Args:
        q: ``(B, L, heads * d)``; k, v: ``(B, S, heads * d)``, token-major as the projections give them, any float
            dtype (computed in float32).
        heads: number of heads ``h``; each head is ``d`` consecutive channels.
        reference: the same function written with MLX operations (float32 out). It supplies the derivatives
            (``mx.grad``, ``mx.vjp``, ``mx.jvp`` differentiate it, not the kernel, whose output is a constant to
            MLX) and the value wherever the inputs cannot be evaluated (inside ``mx.compile`` or ``mx.vmap``).

    Returns:
        ``(B, L, heads * d)`` float32; ``None`` when the kernel is unavailable (see :func:`fused_attention_status`)
        or an input is empty. Matches diffusers' ``AttnProcessor2_0`` without mask to float32 rounding.

    Raises:
        ValueError: inconsistent shapes or ``heads < 1``.
        MemoryError: the kernel could not allocate its working buffers.
    """
    if heads < 1 or q.ndim != 3 or k.ndim != 3 or v.shape != k.shape or q.shape[0] != k.shape[0] \
            or q.shape[2] != k.shape[2] or q.shape[2] % heads:
        raise ValueError(f"fused_attention: expected q (B, L, h*d) and k = v (B, S, h*d) with h={heads} >= 1, "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    fn = _load()[0]
    if fn is None or 0 in q.shape or 0 in k.shape:
        return None
    return _differentiable(heads, reference)(q, k, v)


@functools.lru_cache(maxsize=64)
def _differentiable(heads: int, reference: AttentionFn) -> Callable:
    """The (loaded) kernel as an ``mx.custom_function`` whose derivatives are those of ``reference``."""
    fn = _load()[0]
    return native.with_reference_derivatives(lambda q, k, v: _run_kernel(fn, q, k, v, heads),
                                             lambda q, k, v: reference(q, k, v, heads))


def _run_kernel(fn: Callable, q: mx.array, k: mx.array, v: mx.array, heads: int) -> mx.array | None:
    """Evaluate the inputs and run the kernel; ``None`` when they cannot be evaluated (a tracer of
    ``mx.compile`` or ``mx.vmap``)."""
    evaluated = native.evaluated_float32(q, k, v)
    if evaluated is None:
        return None
    (qn, kn, vn), _owners = evaluated
    b, lq, inner = qn.shape
    s = kn.shape[1]
    d = inner // heads
    out = native.KernelOutput((b, lq, inner))
    rc = fn(qn.ctypes.data, kn.ctypes.data, vn.ctypes.data, out.view.ctypes.data, b, lq, s, heads, d, inner, inner,
            inner, d ** -0.5, native.cpu_threads())
    if rc == 2:
        raise MemoryError(f"fused CPU attention: could not allocate working buffers for q {q.shape}, k {k.shape}")
    if rc != 0:
        raise ValueError(f"fused CPU attention rejected sizes q {q.shape}, k {k.shape}, heads {heads}")
    return out.array()


@partial(mx.compile, shapeless=True)
def _exp_shifted(scores: mx.array, row_max: mx.array) -> mx.array:
    return mx.exp(scores - row_max)


# Score-chunk budget of the CPU attention path: small enough that the chunk's buffers are recycled by the allocator
# instead of being mapped (and page-faulted) afresh, and that the ~10 operations MLX's CPU scheduler keeps in flight
# hold little memory; large enough to keep the matrix products efficient. Measured on SD1.5's 4096-token call
# (batch 2): 4 Mi elements 1.13 s / 312 MB working memory, 2 Mi 1.23 s / 177 MB, 1 Mi 1.34 s / 112 MB.
CHUNK_ELEMENTS = 2 * 2**20


def _chunked_heads(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    # softmax(q k^T * scale) v for (B, heads, L, d) inputs, in float32, over query chunks. Choices measured on a
    # 2-core x86 CPU for SD1.5's 4096-token self-attention (one call, batch 2, 8 heads of 40):
    # - q, k^T and v are made contiguous once: a strided operand is otherwise copied by every chunk's product;
    # - exp(s - max) is one fused compiled kernel (vectorised by the native JIT flags, see ``sd_mlx.cpu.jit``);
    # - v gets a column of ones, so e @ [v, 1] yields the softmax denominators with the numerators and no
    #   separate row-sum pass is made; the normalisation then divides L x d values instead of L x S.
    b, h, lq, _ = q.shape
    s = k.shape[2]
    q = mx.contiguous(q.astype(mx.float32) * scale)
    kt = mx.contiguous(k.astype(mx.float32).swapaxes(-1, -2))
    v = v.astype(mx.float32)
    v1 = mx.concatenate([v, mx.ones((*v.shape[:-1], 1), mx.float32)], axis=-1)
    rows = max(1, min(lq, CHUNK_ELEMENTS // (b * h * s)))
    outs = []
    for start in range(0, lq, rows):
        qc = q[:, :, start:start + rows]
        if outs:
            # Chain the chunks: without this MLX's breadth-first evaluation keeps up to ~20 chunks' score buffers
            # alive at once (measured: 414 MB of working memory for SD1.5's 4096-token call instead of ~70).
            qc = mx.depends(qc, outs[-1])
        scores = qc @ kt
        o = _exp_shifted(scores, mx.max(scores, axis=-1, keepdims=True)) @ v1
        outs.append(o[..., :-1] / o[..., -1:])
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def chunked_attention(q: mx.array, k: mx.array, v: mx.array, heads: int) -> mx.array:
    """Multi-head ``softmax(q k^T / sqrt(d)) v`` in MLX operations over query chunks of at most
    :data:`CHUNK_ELEMENTS` scores: the fused kernel's reference (its derivatives, and its value inside
    ``mx.compile`` / ``mx.vmap``) and the CPU path where the kernel is unavailable.

    Args: ``q`` ``(B, L, heads * d)``, ``k``/``v`` ``(B, S, heads * d)``, any float dtype. Returns:
    ``(B, L, heads * d)`` float32.
    """
    b, lq, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(0, 2, 1, 3) for t in (q, k, v))
    return _chunked_heads(q, k, v, d ** -0.5).transpose(0, 2, 1, 3).reshape(b, lq, inner)
