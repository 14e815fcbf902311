"""Arrays given to sd_mlx's public entry points: ``mx.array`` or numpy (or nested lists), checked and converted.

Every public component call (text encoders, U-Net, VAE encode/decode, TAESD, schedulers' ``step``, the pipeline's
``latents=``) passes its array arguments through :func:`float_array` or :func:`int_array`, so numpy arrays of any
sensible dtype work the same as ``mx.array`` and a wrong rank or channel count is an
:class:`~sd_mlx.errors.InvalidArgumentError` naming the argument and the expected shape, raised before any work.
"""

from __future__ import annotations

from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from .errors import InvalidArgumentError

Shape = Sequence["int | str | None"]
"""An expected shape: one entry per axis, an ``int`` that axis must equal, or a name (``"B"``, ``"H"``...) / ``None``
for any size. Names only label the axis in error messages."""

_FLOAT_KINDS = "fc"  # numpy kinds accepted as floating input (complex is refused below)


def _describe(shape: Shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _kind(value: Any) -> tuple[str, tuple[int, ...]]:
    """numpy kind letter and shape of an ``mx.array`` / numpy array / array-like, without copying an mx.array."""
    if isinstance(value, mx.array):
        dt = value.dtype
        if dt == mx.bool_:
            return "b", tuple(value.shape)
        if mx.issubdtype(dt, mx.floating):
            return "f", tuple(value.shape)
        if mx.issubdtype(dt, mx.complexfloating):
            return "c", tuple(value.shape)
        return ("u" if mx.issubdtype(dt, mx.unsignedinteger) else "i"), tuple(value.shape)
    arr = np.asarray(value)
    return arr.dtype.kind, tuple(arr.shape)


def _check_shape(name: str, got: tuple[int, ...], shape: Shape | None, layout: str) -> None:
    if shape is None:
        return
    ok = len(got) == len(shape) and all(not isinstance(d, int) or g == d for g, d in zip(got, shape))
    if not ok:
        where = f" {layout}" if layout else ""
        raise InvalidArgumentError(f"{name} must have shape {_describe(shape)}{where}, got {got}")


def float_array(value: Any, name: str, shape: Shape | None = None, *, layout: str = "",
                dtype: mx.Dtype | None = None) -> mx.array:
    """``value`` as a floating-point ``mx.array``.

    Args:
        value: ``mx.array``, numpy array, or array-like of real numbers (integers are accepted and converted;
            booleans and complex numbers are not).
        name: the argument's name, for errors.
        shape: the expected shape (see :data:`Shape`), or ``None`` for any.
        layout: words appended to the expected shape in errors, e.g. ``"(B, h, w, C) NHWC"``.
        dtype: the result's dtype; ``None`` keeps an ``mx.array``'s floating dtype and maps numpy float16/bfloat16
            to the same, everything else to float32 (MLX has no float64 on the GPU).

    Returns:
        An ``mx.array`` (the input itself when it already has the right dtype: no copy).

    Raises:
        InvalidArgumentError: not numeric, boolean, complex, or the wrong shape (names ``name`` and the shape).
    """
    try:
        kind, got = _kind(value)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{name} must be an array of numbers (mx.array or numpy), got "
                                   f"{type(value).__name__}: {e}") from None
    if kind not in "fiu":
        what = {"b": "booleans", "c": "complex numbers", "O": "Python objects", "U": "strings", "S": "bytes"}
        raise InvalidArgumentError(f"{name} must hold real numbers, got {what.get(kind, f'dtype kind {kind!r}')}")
    _check_shape(name, got, shape, layout)
    if isinstance(value, mx.array):
        target = dtype or (value.dtype if kind == "f" else mx.float32)
        return value if value.dtype == target else value.astype(target)
    arr = np.asarray(value)
    if dtype is None:
        dtype = mx.float16 if arr.dtype == np.float16 else mx.float32
    if arr.dtype == np.float64 or arr.dtype.kind in "iu":
        arr = arr.astype(np.float32)
    return mx.array(arr).astype(dtype)


def int_array(value: Any, name: str, shape: Shape | None = None, *, layout: str = "") -> mx.array:
    """``value`` as an ``mx.array`` of int32 (token ids and other indices).

    Args:
        value: ``mx.array``, numpy array or array-like of integers (any signed or unsigned width; floats holding
            whole numbers are refused, as an index given as a float is usually a mistake).
        name, shape, layout: as :func:`float_array`.

    Raises:
        InvalidArgumentError: not integers, values outside int32, or the wrong shape.
    """
    try:
        kind, got = _kind(value)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{name} must be an array of integers (mx.array or numpy), got "
                                   f"{type(value).__name__}: {e}") from None
    if kind not in "iu":
        raise InvalidArgumentError(f"{name} must hold integers (token ids), got "
                                   f"{'floats' if kind == 'f' else f'dtype kind {kind!r}'}")
    _check_shape(name, got, shape, layout)
    if isinstance(value, mx.array):
        return value if value.dtype == mx.int32 else value.astype(mx.int32)
    arr = np.asarray(value)
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise InvalidArgumentError(f"{name} holds values outside the int32 range")
    return mx.array(arr.astype(np.int32))


def timestep_array(value: Any, name: str, batch: int) -> mx.array:
    """A diffusion timestep as a ``(batch,)`` float32 ``mx.array``: a Python/numpy scalar, a 0-d array, or a
    ``(batch,)`` (or ``(1,)``) array of any real dtype.

    Raises:
        InvalidArgumentError: not real numbers, or a shape other than ``()``, ``(1,)`` or ``(batch,)``.
    """
    t = float_array(value, name, dtype=mx.float32)
    if t.ndim == 0 or t.shape == (1,):
        return mx.broadcast_to(t.reshape(1), (batch,))
    if t.shape != (batch,):
        raise InvalidArgumentError(f"{name} must be a scalar or have shape ({batch},) (one per sample), got "
                                   f"{tuple(t.shape)}")
    return t
