"""3x3 convolutions as shifted matrix products: MLX's CPU backend is faster this way, and needs no unfolded input.

MLX's CPU convolution unfolds its input into a ``(B*H*W, 9*C)`` matrix and multiplies it with the kernel. For the
U-Net's large maps the nine shifted products of :func:`conv3x3_taps` are faster there (and hold no 9x buffer);
:func:`upsample2x_conv3x3_taps` does the same for the four 2x2 kernels of a fused nearest-x2 upsampling convolution
(see :func:`sd_mlx.ops.upsample2x_conv3x3`). Only :mod:`sd_mlx.ops` calls these, and only when the CPU kernels are
in use: a Mac or CUDA user runs ``mx.conv2d``.
"""

from __future__ import annotations

import mlx.core as mx

# On the CPU, a stride-1 3x3 convolution with at least this many output pixels per image runs as nine shifted
# matrix products (conv3x3_taps) instead of MLX's unfold-then-GEMM. Measured on a 2-core x86 CPU with OpenBLAS,
# batch 2: 64x64x320 -> 320 channels 93 -> 135 GFLOP/s, 64x64x640 -> 320 93 -> 149, 32x32x640 -> 640 101 -> 107
# (and no 9x unfolded buffer); at 16x16 and below the unfolded GEMM is faster (the taps re-read the weights nine
# times), hence the threshold.
CPU_TAPS_MIN_PIXELS = 1024


def conv3x3_taps(x: mx.array, weight: mx.array, bias: mx.array | None = None, *, pad_rows: bool = True) -> mx.array:
    """Stride-1, padding-1 3x3 convolution as nine shifted matrix products, without an unfolded input.

    The input is zero-padded to ``(H + 3, W + 2)`` and flattened per image; the tap ``(dy, dx)`` then reads the
    contiguous run of ``H * (W + 2)`` rows starting at ``dy * (W + 2) + dx``, so each tap is one ``(H*(W+2), C) @
    (C, O)`` product on a view (no copy), accumulated with ``mx.addmm``. The outputs computed for the two padding
    columns are dropped at the end (3% extra work at 64 wide). Working memory is about two outputs and one padded
    input instead of MLX's ``(B*H*W, 9*C)`` unfolded matrix (283 MB for SD1.5's 64x64x960 up-block convolution at
    batch 2). Same sums as ``mx.conv2d`` up to float rounding (each pixel's 9*C products are summed per tap first).

    Args:
        x: ``(B, H, W, C)``.
        weight: ``(O, 3, 3, C)`` (MLX's convolution layout).
        bias: ``(O,)`` or ``None``.
        pad_rows: ``False`` when ``x`` already carries its one-row halo above and below (a row strip of a larger
            input): no zero rows are added and the output has ``H - 2`` rows.

    Returns:
        ``(B, H, W, O)`` (``(B, H - 2, W, O)`` without ``pad_rows``) in the promoted dtype of ``x`` and ``weight``.
    """
    b, _, w, _ = x.shape
    xf, h, wp = _flat_padded(x, pad_rows)
    out = _shifted_products(xf, h * wp, [(dy * wp + dx, weight[:, dy, dx, :].T) for dy in range(3) for dx in range(3)])
    out = out.reshape(b, h, wp, weight.shape[0])[:, :, :w]
    return out + bias if bias is not None else out


def _flat_padded(x: mx.array, pad_rows: bool) -> tuple[mx.array, int, int]:
    # x (B, H, W, C) zero-padded by one column each side, one row above and below (unless it already carries its
    # halo rows: pad_rows=False) and one spare row at the bottom (the last tap's run ends two values past the last
    # halo row), flattened per image to (B, rows * (W + 2), C). Returns it, the output rows and W + 2.
    b, h, w, c = x.shape
    top = 1 if pad_rows else 0
    h = h if pad_rows else h - 2
    return mx.pad(x, [(0, 0), (top, top + 1), (1, 1), (0, 0)]).reshape(b, (h + 3) * (w + 2), c), h, w + 2


def _shifted_products(xf: mx.array, n: int, taps: list[tuple[int, mx.array]]) -> mx.array:
    # sum over (start, kernel (C, O)) of xf[:, start:start + n] @ kernel: views of the flattened input, no copies,
    # accumulated with addmm
    out = None
    for start, kernel in taps:
        part = xf[:, start:start + n]
        out = part @ kernel if out is None else mx.addmm(out, part, kernel)
    return out


def upsample2x_conv3x3_taps(x: mx.array, kernels: dict[tuple[int, int], mx.array], *, pad_rows: bool = True
                            ) -> mx.array:
    """The four output parities of a fused nearest-x2 upsampling 3x3 convolution (see
    :func:`sd_mlx.ops.upsample2x_conv3x3`), each 2x2 kernel as four shifted matrix products over the flattened
    padded input, interleaved into ``(B, 2H, 2W, O)`` (``(B, 2(H - 2), 2W, O)`` without ``pad_rows``).

    Args:
        x: ``(B, H, W, C)``.
        kernels: the ``(O, 2, 2, C)`` kernel of each output parity ``(row % 2, column % 2)``.
        pad_rows: as :func:`conv3x3_taps`.
    """
    b, _, w, _ = x.shape
    o = kernels[0, 0].shape[0]
    xf, h, wp = _flat_padded(x, pad_rows)

    def parity(a: int, p: int) -> mx.array:
        out = _shifted_products(xf, h * wp, [((a + ty) * wp + p + tx, kernels[a, p][:, ty, tx, :].T)
                                              for ty in range(2) for tx in range(2)])
        return out.reshape(b, h, wp, o)[:, :, :w]

    y = mx.stack([mx.stack([parity(a, 0), parity(a, 1)], axis=3) for a in range(2)], axis=2)
    return y.reshape(b, 2 * h, 2 * w, o)
