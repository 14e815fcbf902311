"""Model sources: where a pipeline's components come from, a diffusers folder or a single checkpoint file.

Both kinds offer the same small interface, so the pipeline does not care which it has:

- ``name``: for messages; ``components``: the components present; ``has(name)``;
- ``config(name) -> (diffusers-form config dict, where it came from)``;
- ``weights(name, prefer_fp16=...) -> ({diffusers_key: mx.array}, source)``: lazily readable (memory-mapped)
  arrays named as in a diffusers folder's weight file;
- ``header(name, prefer_fp16=...) -> {diffusers_key: TensorInfo}``: shapes and dtypes, nothing read;
- ``scheduler_config()``; ``tokenizer(name)``; ``describe()``: one line for ``--verbose``.

:class:`FolderSource` reads a diffusers folder; :class:`sd_mlx.loading.single_file.SingleFileSource` an
original-layout single file. :func:`open_source` picks one for a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import ModelNotFoundError
from .configs import read_json
from .single_file import SingleFileSource, TensorInfo
from .weights import find_weight_file, read_safetensors, validate_safetensors_header

WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class FolderSource:
    """A diffusers model folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``...).

    Args:
        folder: the folder.
        tokenizer: a tokenizer folder used instead of the model's own ``tokenizer*/`` folders.
        prediction_type: ``"epsilon"`` / ``"v_prediction"`` replacing the scheduler config's.

    Raises:
        ModelNotFoundError: the folder (or the tokenizer folder) does not exist.
        ConfigError: an unknown ``prediction_type``.
    """

    def __init__(self, folder: Path | str, *, tokenizer: Path | str | None = None,
                 prediction_type: str | None = None) -> None:
        from ..errors import ConfigError
        from .single_file import PREDICTION_TYPES

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ModelNotFoundError(f"{self.folder}: model folder not found")
        self._tokenizer_folder = Path(tokenizer).expanduser() if tokenizer is not None else None
        if self._tokenizer_folder is not None and not self._tokenizer_folder.is_dir():
            raise ModelNotFoundError(f"{self._tokenizer_folder}: tokenizer folder not found (it needs vocab.json "
                                     f"and merges.txt)")
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got "
                              f"{prediction_type!r}")
        self.family = None
        self.prediction_type = prediction_type

    @property
    def name(self) -> str:
        """The folder, for messages."""
        return str(self.folder)

    @property
    def components(self) -> tuple[str, ...]:
        """Model components with a folder here."""
        return tuple(c for c in WEIGHT_STEMS if (self.folder / c).is_dir())

    def has(self, component: str) -> bool:
        """Whether ``component/`` exists."""
        return (self.folder / component).is_dir()

    def config(self, component: str) -> tuple[dict[str, Any], str]:
        """``(component/config.json, its path)``; raises ``ConfigError`` naming the file."""
        path = self.folder / component / "config.json"
        return read_json(path), str(path)

    def scheduler_config(self) -> dict[str, Any]:
        """``scheduler/scheduler_config.json`` (with ``prediction_type`` replaced when one was given)."""
        cfg = read_json(self.folder / "scheduler" / "scheduler_config.json")
        if self.prediction_type is not None:
            cfg["prediction_type"] = self.prediction_type
        return cfg

    def weight_file(self, component: str, *, prefer_fp16: bool = False) -> Path:
        """The component's safetensors file (see :func:`sd_mlx.loading.weights.find_weight_file`)."""
        return find_weight_file(self.folder / component, WEIGHT_STEMS.get(component, "diffusion_pytorch_model"),
                                prefer_fp16=prefer_fp16)

    def header(self, component: str, *, prefer_fp16: bool = False) -> dict[str, TensorInfo]:
        """``{key: TensorInfo}`` of the component's weight file (header only)."""
        header = validate_safetensors_header(self.weight_file(component, prefer_fp16=prefer_fp16))
        return {k: TensorInfo(tuple(int(d) for d in e["shape"]), str(e["dtype"])) for k, e in header.items()}

    def weights(self, component: str, *, prefer_fp16: bool = False) -> tuple[dict[str, mx.array], str]:
        """``({key: lazy array}, path)`` of the component's weight file."""
        path = self.weight_file(component, prefer_fp16=prefer_fp16)
        return read_safetensors(path), str(path)

    def tokenizer(self, name: str = "tokenizer") -> Any:
        """``CLIPTokenizer`` of ``name/`` (or of the ``tokenizer`` folder given)."""
        from ..tokenizer import CLIPTokenizer

        return CLIPTokenizer.from_folder(self._tokenizer_folder or self.folder / name)

    def describe(self) -> str:
        """One line for ``--verbose``."""
        return f"diffusers folder {self.folder}"


def is_single_file(path: Path | str) -> bool:
    """True when ``path`` is an existing file with a checkpoint suffix (``.safetensors``, ``.ckpt``, ``.pt``,
    ``.pth``, ``.bin``)."""
    p = Path(path).expanduser()
    return p.is_file() and p.suffix.lower() in SINGLE_FILE_SUFFIXES


def open_source(path: Path | str, *, config: Path | str | None = None, prediction_type: str | None = None,
                tokenizer: Path | str | None = None, use_ema: bool = False) -> FolderSource | SingleFileSource:
    """A :class:`FolderSource` for a folder, a :class:`SingleFileSource` for a checkpoint file.

    ``config`` and ``use_ema`` apply to single files only (a folder carries its own configs).

    Raises:
        ModelNotFoundError, WeightLoadError, ConfigError: see the two classes;
        InvalidArgumentError: ``config`` or ``use_ema`` given with a folder.
    """
    from ..errors import InvalidArgumentError

    p = Path(path).expanduser()
    if p.is_dir():
        if config is not None or use_ema:
            raise InvalidArgumentError(f"{p}: config and use_ema apply to single-file checkpoints; a diffusers "
                                       f"folder carries its own configs")
        return FolderSource(p, tokenizer=tokenizer, prediction_type=prediction_type)
    return SingleFileSource(p, config=config, prediction_type=prediction_type, tokenizer=tokenizer,
                            use_ema=use_ema)
