"""A restricted reader for PyTorch ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` checkpoints: tensors only, no code.

A PyTorch checkpoint is a zip archive holding one pickle (``<archive>/data.pkl``) and the raw bytes of each tensor
storage (``<archive>/data/<key>``). Unpickling it with Python's ``pickle`` (or ``torch.load`` without
``weights_only``) can call any importable function the file names, i.e. run arbitrary code. sd_mlx never does: this
module runs the pickle through an :class:`pickle.Unpickler` whose ``find_class`` resolves only an allowlist of
names, each to sd_mlx's *own* inert stand-in (not to the real object), the documented way to restrict what a
pickle can reach:

- ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor`` / ``_rebuild_parameter`` /
  ``torch._tensor._rebuild_from_type_v2`` -> records a :class:`TensorRef` (storage, offset, shape, strides;
  bounds-checked), nothing is read yet;
- the typed storage classes (``torch.FloatStorage``, ``torch.HalfStorage``, ``torch.BFloat16Storage``...) -> dtype
  markers for the storages the archive's ``persistent_load`` ids name;
- ``collections.OrderedDict``, ``builtins.set``/``frozenset``, ``torch.Size`` -> the same containers;
- ``_codecs.encode`` (how protocol 2 pickles ``bytes``), ``numpy.core.multiarray.scalar`` and ``numpy.dtype``
  (numeric scalars in training metadata) -> sd_mlx's own pure re-implementations, numeric dtypes only;
- classes of the training framework (``pytorch_lightning.*``, ``lightning.*``: callbacks saved next to the weights)
  -> an inert placeholder that ignores its arguments and state (the values are discarded).

Any other name (``os.system``, ``builtins.eval``, ``subprocess.*``...) makes the whole load fail with
:class:`~sd_mlx.errors.WeightLoadError` naming it, before anything it refers to is touched. Storages are
memory-mapped from the archive when stored uncompressed (how ``torch.save`` writes them) and copied into MLX arrays
only when a tensor is used. The legacy (PyTorch < 1.6, not zip) format and TorchScript archives are refused with the
conversion to use.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import WeightLoadError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
"""File suffixes treated as PyTorch pickles."""

CONVERSION_HINT = ("convert it to .safetensors once with `python tools/convert.py from-ckpt FILE OUT.safetensors` "
                   "(sd_mlx's restricted reader, no code is run) or, on a machine you trust, with "
                   "torch.load(FILE, weights_only=True) and safetensors.torch.save_file")

# storage class name -> (numpy dtype of the raw bytes, MLX dtype of the tensor)
_STORAGES: dict[str, tuple[np.dtype, mx.Dtype]] = {
    "FloatStorage": (np.dtype("<f4"), mx.float32),
    "HalfStorage": (np.dtype("<f2"), mx.float16),
    "BFloat16Storage": (np.dtype("<u2"), mx.bfloat16),
    "DoubleStorage": (np.dtype("<f8"), mx.float32),  # MLX has no float64 on every device: narrowed on use
    "LongStorage": (np.dtype("<i8"), mx.int64),
    "IntStorage": (np.dtype("<i4"), mx.int32),
    "ShortStorage": (np.dtype("<i2"), mx.int16),
    "CharStorage": (np.dtype("i1"), mx.int8),
    "ByteStorage": (np.dtype("u1"), mx.uint8),
    "BoolStorage": (np.dtype("?"), mx.bool_),
}
_FRAMEWORK_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric")


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allowlist."""


@dataclass(frozen=True)
class _StorageType:
    name: str


class _Storage:
    """One storage of the archive: raw bytes (memory-mapped or read) and their dtype."""

    def __init__(self, data: np.ndarray, kind: _StorageType, numel: int, key: str) -> None:
        np_dtype = _STORAGES[kind.name][0]
        need = numel * np_dtype.itemsize
        if data.nbytes < need:
            raise pickle.UnpicklingError(f"storage '{key}' has {data.nbytes} bytes, its record says {need}")
        self.values = data[:need].view(np_dtype)
        self.kind, self.key = kind, key


@dataclass(frozen=True)
class TensorRef:
    """A tensor of the checkpoint, not read yet.

    Attributes:
        shape: the tensor's shape. dtype: its MLX dtype (float64 storages become float32).
    """

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]

    @property
    def dtype(self) -> mx.Dtype:
        """The MLX dtype the tensor is read as."""
        return _STORAGES[self.storage.kind.name][1]

    def to_mlx(self) -> mx.array:
        """Copy the tensor into an MLX array (contiguous, dtype :attr:`dtype`)."""
        itemsize = self.storage.values.itemsize
        view = np.lib.stride_tricks.as_strided(self.storage.values[self.offset:], shape=self.shape,
                                               strides=tuple(s * itemsize for s in self.strides), writeable=False)
        arr = np.ascontiguousarray(view)
        if self.storage.kind.name == "BFloat16Storage":
            return mx.array(arr).view(mx.bfloat16)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        return mx.array(arr)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_ignored: Any) -> TensorRef:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor refers to something that is not a storage of the archive")
    try:
        shape = tuple(int(d) for d in size)
        strides = tuple(int(s) for s in stride)
        offset = int(offset)
    except (TypeError, ValueError):
        raise pickle.UnpicklingError("a tensor record has a malformed size, stride or offset") from None
    if len(shape) != len(strides) or offset < 0 or any(d < 0 for d in shape) or any(s < 0 for s in strides):
        raise pickle.UnpicklingError(f"a tensor record has an invalid layout (shape {shape}, strides {strides})")
    last = offset + sum((d - 1) * s for d, s in zip(shape, strides)) if all(shape) else offset - 1
    if last >= storage.values.size:
        raise pickle.UnpicklingError(f"a tensor reaches past the end of storage '{storage.key}'")
    return TensorRef(storage, offset, shape, strides)


def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    return data


def _rebuild_from_type(func: Any, _type: Any, args: Any, _state: Any) -> Any:
    if func not in (_rebuild_tensor, _rebuild_parameter):
        raise pickle.UnpicklingError("a tensor is rebuilt by a function outside the allowlist")
    return func(*args)


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError("unexpected use of _codecs.encode")
    return text.encode(encoding)


def _numpy_dtype(name: Any, *_ignored: Any) -> np.dtype:
    dt = np.dtype(str(name))
    if dt.kind not in "biufc":
        raise pickle.UnpicklingError(f"non-numeric numpy dtype {dt!r}")
    return dt


def _numpy_scalar(dtype: Any, data: Any = b"") -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, bytes):
        raise pickle.UnpicklingError("unexpected numpy scalar record")
    return np.frombuffer(data, dtype=dtype, count=1)[0].item()


class _Inert:
    """Stand-in for a training-framework object: accepts and discards everything."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _inert_class(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (_Inert,), {"__qualname__": name})


_SAFE: dict[str, Any] = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.Tensor": _StorageType("Tensor"),
    "torch.nn.parameter.Parameter": _StorageType("Parameter"),
    "torch.Size": tuple,
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "_codecs.encode": _codecs_encode,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "numpy.dtype": _numpy_dtype,
}
_SAFE.update({f"torch.{name}": _StorageType(name) for name in _STORAGES})


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, storages: "_StorageReader") -> None:
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in _SAFE:
            return _SAFE[full]
        if module.split(".", 1)[0] in _FRAMEWORK_MODULES:
            return _inert_class(full)
        raise UnsafePickleError(full)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]!r}")
        kind, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(kind, _StorageType) or kind.name not in _STORAGES:
            raise pickle.UnpicklingError(f"storage '{key}' has an unsupported type")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError("malformed storage record")
        return self._storages.get(key, kind, numel)


class _StorageReader:
    """Storages of a torch zip archive, memory-mapped when stored uncompressed."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, root: str) -> None:
        self.path, self.zf, self.root = path, zf, root
        self._cache: dict[str, _Storage] = {}

    def get(self, key: str, kind: _StorageType, numel: int) -> _Storage:
        if key in self._cache:
            return self._cache[key]
        name = f"{self.root}/data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise pickle.UnpicklingError(f"storage '{key}' is missing from the archive") from None
        data: np.ndarray
        if info.compress_type == zipfile.ZIP_STORED and info.file_size > 0:
            with open(self.path, "rb") as fh:
                fh.seek(info.header_offset)
                head = fh.read(30)
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                raise pickle.UnpicklingError(f"storage '{key}': corrupt zip entry")
            n, m = struct.unpack("<HH", head[26:30])
            start = info.header_offset + 30 + n + m
            if start + info.file_size > self.path.stat().st_size:
                raise pickle.UnpicklingError(f"storage '{key}' is truncated")
            data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=start, shape=(info.file_size,))
        else:
            data = np.frombuffer(self.zf.read(name), dtype=np.uint8)
        storage = _Storage(data, kind, numel, key)
        self._cache[key] = storage
        return storage


def read_torch_checkpoint(path: Path | str) -> Any:
    """Read a PyTorch checkpoint with the restricted unpickler (see the module docstring).

    Returns:
        The checkpoint's object tree (dicts, lists, numbers, strings), every tensor a :class:`TensorRef`.

    Raises:
        WeightLoadError: the file is missing, not a zip-format PyTorch checkpoint (legacy format, TorchScript, a
            bare pickle), damaged, or its pickle names a global outside the allowlist (the message names it and
            says how to convert the file).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightLoadError(f"{path}: weight file not found")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            head = fh.read(2)
        kind = "a legacy (PyTorch < 1.6) checkpoint or a bare pickle" if head[:1] == b"\x80" else \
            "not a PyTorch checkpoint (no zip archive)"
        raise WeightLoadError(f"{path}: {kind}; sd_mlx reads only zip-format PyTorch checkpoints and never "
                              f"unpickles anything else; on a machine you trust, load it with torch.load and "
                              f"save the state dict with safetensors.torch.save_file")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if any(n.endswith("/constants.pkl") for n in names):
                raise WeightLoadError(f"{path}: a TorchScript archive, not a checkpoint of weights; {CONVERSION_HINT}")
            if len(pkls) != 1:
                raise WeightLoadError(f"{path}: not a PyTorch checkpoint (no single <archive>/data.pkl in the zip); "
                                      f"{CONVERSION_HINT}")
            root = pkls[0].split("/", 1)[0]
            reader = _StorageReader(path, zf, root)
            with zf.open(pkls[0]) as fh:
                return _RestrictedUnpickler(io.BufferedReader(fh), reader).load()  # type: ignore[arg-type]
    except UnsafePickleError as e:
        raise WeightLoadError(f"{path}: refused: the pickle references '{e}', which is not a tensor or a plain "
                              f"container; loading it could run code from the file. If you trust the file, "
                              f"{CONVERSION_HINT}") from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OSError, RecursionError, struct.error) as e:
        raise WeightLoadError(f"{path}: corrupt or truncated PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e)[:200]}); re-download it") from None


def checkpoint_state_dict(obj: Any, path: Path | str) -> tuple[dict[str, TensorRef], dict[str, Any]]:
    """Split a checkpoint tree into its state dict and the top-level training metadata.

    Follows diffusers' rule: while the mapping has a ``"state_dict"`` entry, descend into it. The metadata keeps the
    top-level numbers and strings (``global_step``, ``epoch``...).

    Returns:
        ``({key: TensorRef}, {name: int | float | str})``.

    Raises:
        WeightLoadError: the checkpoint is not a mapping of names to tensors (names the first offending key).
    """
    if not isinstance(obj, dict):
        raise WeightLoadError(f"{path}: the checkpoint holds a {type(obj).__name__}, not a state dict")
    meta = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, (int, float, str))
            and not isinstance(v, bool)}
    while isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    out: dict[str, TensorRef] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise WeightLoadError(f"{path}: state dict key {k!r} is not a string")
        if not isinstance(v, TensorRef):
            raise WeightLoadError(f"{path}: state dict entry '{k}' is a {type(v).__name__}, not a tensor")
        out[k] = v
    return out, meta
