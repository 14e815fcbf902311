"""Safetensors reading and strict weight assignment.

Weights are read lazily: :func:`read_safetensors` validates the file's header against its size (so a truncated
file or a header that lies about sizes is an error naming the file) and then memory-maps the tensors through
``mx.load``; nothing is read until the arrays are evaluated. :func:`assign_weights` checks that every parameter of
an MLX module receives exactly one array of the right shape, casts to the target dtype and rejects non-finite
values.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import WeightLoadError

# dtype name in a safetensors header -> bytes per element
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}

KeyMap = Callable[[str, mx.array], Iterable[tuple[str, mx.array]]]
"""A pure function from one checkpoint key and its array to zero or more ``(mlx_key, array)`` pairs."""


def validate_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse and check the header of a ``.safetensors`` file without reading its tensors.

    Returns:
        The header's tensor entries: ``{name: {"dtype", "shape", "data_offsets"}}`` (``__metadata__`` removed).

    Raises:
        WeightLoadError: the file is missing, shorter than its header says, its header is not JSON, or a tensor's
            byte range does not match its dtype and shape or lies outside the file (message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightLoadError(f"{path}: weight file not found")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise WeightLoadError(f"{path}: not a safetensors file (only {size} bytes); re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise WeightLoadError(f"{path}: corrupt or truncated safetensors file (header claims {n} bytes, "
                                  f"file has {size}); re-download it")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightLoadError(f"{path}: corrupt safetensors header (not JSON); re-download the file") from None
    if not isinstance(header, dict):
        raise WeightLoadError(f"{path}: corrupt safetensors header; re-download the file")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            count = 1
            for d in shape:
                count *= int(d)
            expected = count * _DTYPE_SIZES[dtype]
        except (KeyError, TypeError, ValueError):
            raise WeightLoadError(f"{path}: corrupt safetensors header entry for '{name}'") from None
        if end - start != expected or start < 0:
            raise WeightLoadError(f"{path}: safetensors header lies about '{name}': {dtype}{list(shape)} needs "
                                  f"{expected} bytes, header gives {end - start}; re-download the file")
        if end > data_size:
            raise WeightLoadError(f"{path}: truncated safetensors file: '{name}' ends at byte {end} of the data "
                                  f"but the file holds {data_size}; re-download it")
    return header


def read_safetensors_metadata(path: Path | str) -> dict[str, str]:
    """The ``__metadata__`` entries of a safetensors header (string to string; empty when absent). Call after
    :func:`validate_safetensors_header` (this reads the same header again, without checks beyond JSON)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(min(n, 100 * 2**20))
    try:
        meta = json.loads(raw.decode("utf-8")).get("__metadata__") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def read_safetensors(path: Path | str) -> dict[str, mx.array]:
    """Lazily load every tensor of a ``.safetensors`` file as ``mx.array`` (memory-mapped, dtype as stored).

    Raises:
        WeightLoadError: see :func:`validate_safetensors_header`, or MLX cannot read the file.
    """
    path = Path(path)
    validate_safetensors_header(path)
    try:
        return dict(mx.load(str(path)))
    except Exception as e:  # MLX raises RuntimeError/ValueError with its own text
        raise WeightLoadError(f"{path}: cannot read safetensors file ({e}); re-download it") from None


def remap_weights(weights: Mapping[str, mx.array], keymap: KeyMap, *, source: str,
                  benign: Callable[[str], bool] = lambda k: False) -> dict[str, tuple[str, mx.array]]:
    """Apply ``keymap`` to every checkpoint entry.

    Returns:
        ``{mlx_key: (checkpoint_key, array)}``; keys for which ``benign(key)`` is true are dropped.

    Raises:
        WeightLoadError: two checkpoint keys map to the same MLX key (message names both and ``source``).
    """
    out: dict[str, tuple[str, mx.array]] = {}
    for key, value in weights.items():
        if benign(key):
            continue
        for new_key, new_value in keymap(key, value):
            if new_key in out:
                raise WeightLoadError(f"{source}: keys '{out[new_key][0]}' and '{key}' both map to '{new_key}'")
            out[new_key] = (key, new_value)
    return out


def all_finite(a: mx.array) -> bool:
    """Whether an array has no NaN or Inf (integers: always), checked with numpy on MLX's buffer (zero-copy).

    numpy's vectorised ``isfinite`` is about 12x faster than MLX's ``mx.all(mx.isfinite(a))`` on the CPU backend
    (measured here: 0.36 against 4.3 s for SD1.5's 3.4 GB U-Net); bfloat16, which numpy lacks, is checked on its
    bits (all exponent bits set means Inf or NaN). Evaluates ``a`` if needed.
    """
    if not mx.issubdtype(a.dtype, mx.floating):
        return True
    if a.dtype == mx.bfloat16:
        return not bool(np.any((np.asarray(a.view(mx.uint16)) & 0x7F80) == 0x7F80))
    return bool(np.isfinite(np.asarray(a)).all())


def _eval_checked(arrays: list[tuple[str, mx.array]], flags: list[tuple[str, mx.array]], source: str,
                  check_finite: bool = True) -> None:
    """Evaluate the ``(key, array)`` pairs together with the lazy boolean scalars of ``flags`` (``(key, all
    finite)`` pairs); with ``check_finite`` also check every floating array (:func:`all_finite`). Raise
    WeightLoadError naming ``source`` and the first key found non-finite."""
    flag = mx.stack([f for _, f in flags]) if flags else None
    mx.eval([a for _, a in arrays] + ([flag] if flag is not None else []))
    bad = [key for (key, _), ok in zip(flags, flag.tolist()) if not ok] if flag is not None else []
    if check_finite:
        bad += [key for key, a in arrays if not all_finite(a)]
    if bad:
        raise WeightLoadError(f"{source}: weight '{bad[0]}' contains NaN or Inf; the file is corrupt or was "
                              f"saved from a diverged model")


def assign_weights(model: nn.Module, mapped: Mapping[str, tuple[str, mx.array]], *, source: str,
                   dtype: mx.Dtype | None = None, check_finite: bool = True,
                   keep_dtype: Callable[[str], bool] = lambda k: False, consume: bool = False,
                   evaluate: bool = True) -> None:
    """Strictly assign remapped weights to ``model`` in place.

    Every parameter of ``model`` must receive an array of exactly its shape, and every array must name a
    parameter. Arrays are cast to ``dtype`` (floating point arrays only; ``keep_dtype(mlx_key)`` keeps a
    parameter's current dtype, e.g. float32 norms). With ``check_finite``, the arrays are evaluated once and any
    NaN/Inf is an error naming the key. Arrays are cast and evaluated in groups of about 64 MB; with ``consume``
    (``mapped`` must then be a mutable dict the caller no longer needs), each source array is dropped from
    ``mapped`` once its cast copy exists, which keeps a float32 file loaded as float16 from holding both copies.
    With ``evaluate=False`` the (lazy, file-backed) cast arrays are assigned unevaluated and nothing is checked
    for NaN/Inf here: the caller transforms them (e.g. quantizes) and then calls :func:`evaluate_parameters`.

    Raises:
        WeightLoadError: a missing parameter, an unknown checkpoint key, a shape mismatch, or a non-finite value;
            the message names ``source`` and the key.
    """
    params = dict(tree_flatten(model.parameters()))
    missing = sorted(k for k in params if k not in mapped)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightLoadError(f"{source}: missing weight for parameter '{missing[0]}'{more}; the checkpoint does "
                              f"not match the config")
    unknown = sorted(orig for k, (orig, _) in mapped.items() if k not in params)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise WeightLoadError(f"{source}: unknown key '{unknown[0]}'{more}; the checkpoint does not match the "
                              f"config or model type")
    for k, p in params.items():
        orig, arr = mapped[k]
        if tuple(arr.shape) != tuple(p.shape):
            raise WeightLoadError(f"{source}: shape mismatch for '{orig}': checkpoint has {tuple(arr.shape)}, "
                                  f"model expects {tuple(p.shape)} (from the config)")

    def cast(k: str) -> mx.array:
        arr = mapped[k][1]
        target = params[k].dtype if keep_dtype(k) else (dtype or arr.dtype)
        return arr.astype(target) if mx.issubdtype(arr.dtype, mx.floating) and arr.dtype != target else arr

    if not evaluate:
        model.update(tree_unflatten([(k, cast(k)) for k in params]))
        return
    # Cast and evaluate a group of about 64 MB at a time, dropping each source array once its copy exists, so
    # a float32 file loaded as float16 never holds both full copies at once.
    new: list[tuple[str, mx.array]] = []
    group: list[tuple[str, mx.array]] = []
    group_bytes = 0
    names = list(params)
    for n, k in enumerate(names):
        arr = cast(k)
        group.append((k, arr))
        group_bytes += arr.nbytes
        del arr
        if group_bytes < 64 * 2**20 and n + 1 < len(names):
            continue
        _eval_checked([(mapped[gk][0], a) for gk, a in group], [], source, check_finite)
        for gk, _ in group:
            if consume:
                mapped[gk] = (mapped[gk][0], None)  # type: ignore[index]
        new += group
        group, group_bytes = [], 0
    model.update(tree_unflatten(new))


def evaluate_parameters(model: nn.Module, *, source: str, check_finite: bool = True,
                        group_bytes: int = 64 * 2**20, finite_flags: Mapping[str, mx.array] | None = None) -> None:
    """Evaluate ``model``'s (lazy) parameters in groups of about ``group_bytes`` of results, so that the source
    arrays behind each group (file-backed weights, the float copies a quantization reads) are freed group by
    group instead of all being materialised first. ``finite_flags`` maps module paths to lazy boolean scalars
    (from :func:`sd_mlx.quantization.quantize_model`: the layer's float weight had no NaN/Inf), each evaluated
    with the group holding that module's parameters.

    Raises:
        WeightLoadError: with ``check_finite``, a floating-point parameter, or the source weight of a module in
            ``finite_flags``, contains NaN or Inf; the message names ``source`` and the key.
    """
    pending = dict(finite_flags or {})
    group: list[tuple[str, mx.array]] = []
    size = 0
    items = tree_flatten(model.parameters())
    for n, (k, a) in enumerate(items):
        group.append((k, a))
        size += a.nbytes
        if size < group_bytes and n + 1 < len(items):
            continue
        flags = []
        if check_finite:
            for gk, _ in group:
                mod = gk.rsplit(".", 1)[0]
                if mod in pending:
                    flags.append((mod + ".weight", pending.pop(mod)))
        _eval_checked(group, flags, source, check_finite)
        group, size = [], 0


def find_weight_file(folder: Path, stem: str, *, prefer_fp16: bool) -> Path:
    """Pick the safetensors file of a component folder.

    ``stem`` is ``diffusion_pytorch_model`` (diffusers) or ``model`` (transformers). With ``prefer_fp16`` the
    ``{stem}.fp16.safetensors`` variant is used when present, else ``{stem}.safetensors``; without it the plain file
    is preferred and the fp16 variant used only when it is the only one.

    Raises:
        WeightLoadError: neither file exists (message names the folder and suggests the fix; ``.bin``/``.ckpt``
            pickles are refused, since loading them can run arbitrary code).
    """
    plain, half = folder / f"{stem}.safetensors", folder / f"{stem}.fp16.safetensors"
    order = [half, plain] if prefer_fp16 else [plain, half]
    for p in order:
        if p.is_file():
            return p
    if (folder / f"{stem}.bin").is_file():
        raise WeightLoadError(f"{folder}: only {stem}.bin (PyTorch pickle) found; sd_mlx reads safetensors only: "
                              f"convert it with diffusers' save_pretrained(safe_serialization=True)")
    raise WeightLoadError(f"{folder}: no {stem}.safetensors (or .fp16.safetensors) found")
