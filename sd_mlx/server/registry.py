"""The models a server may load: the start-up ``--model`` and the models inside ``--models-dir``: diffusers
folders, and single-file checkpoints (``.safetensors``, ``.ckpt``, ``.pt``, titled by their file name as A1111 does;
their family is detected and sd_mlx's built-in configs are used, see :func:`sd_mlx.load_pipeline`).

Clients pick a model by its *title* (``GET /sdapi/v1/sd-models``), never by a path: a name is looked up in the list
of titles, and the list holds only the start-up model (the administrator's choice) and folders whose real path
(symbolic links resolved) lies inside ``models_dir``. So ``..``, absolute paths or links leading elsewhere name
nothing. The folder is listed again on each look-up, so models added while the server runs appear.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelNotFoundError

_REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt")


@dataclass(frozen=True)
class ModelEntry:
    """One loadable model.

    Attributes:
        title: the name clients use (A1111's ``title`` and ``model_name``).
        source: what :func:`sd_mlx.load_pipeline` is given (a folder, or the start-up repo id).
    """

    title: str
    source: str

    def as_json(self) -> dict[str, Any]:
        """The A1111 ``SDModelItem``: ``title``, ``model_name``, ``hash``, ``sha256``, ``filename``, ``config``
        (no hashes: hashing gigabytes of weights per listing is not worth it; A1111 also sends ``None`` until it
        has computed one)."""
        return {"title": self.title, "model_name": self.title, "hash": None, "sha256": None,
                "filename": self.source, "config": None}


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` looks like a diffusers Stable Diffusion folder (``unet/``, ``text_encoder/``,
    ``tokenizer/``, ``scheduler/``)."""
    return path.is_dir() and all((path / sub).is_dir() for sub in _REQUIRED)


class ModelRegistry:
    """The list of models (see the module docstring).

    Args:
        startup: the ``--model`` value (folder, repo id, or a title from ``models_dir``).
        models_dir: the models folder or ``None``.

    Raises:
        ModelNotFoundError: ``models_dir`` is given but is not a folder.
    """

    def __init__(self, startup: str, models_dir: Path | None = None) -> None:
        self.models_dir = Path(models_dir).expanduser().resolve() if models_dir is not None else None
        if self.models_dir is not None and not self.models_dir.is_dir():
            raise ModelNotFoundError(f"{models_dir}: --models-dir is not a folder")
        inside = self._scan()
        match = next((e for e in inside if e.title == startup), None)
        if match is not None:
            self.startup = match
        else:
            path = Path(startup).expanduser()
            local = path.exists()
            self.startup = ModelEntry(title=path.name if local else startup, source=str(path) if local else startup)

    def _scan(self) -> list[ModelEntry]:
        if self.models_dir is None:
            return []
        out = []
        for child in sorted(self.models_dir.iterdir()):
            real = child.resolve()
            if real.parent != self.models_dir and self.models_dir not in real.parents:
                continue  # a link leading outside the models folder
            if is_model_folder(real) or (real.is_file() and real.suffix.lower() in SINGLE_FILE_SUFFIXES):
                out.append(ModelEntry(title=child.name, source=str(real)))
        return out

    def entries(self) -> list[ModelEntry]:
        """The start-up model first, then the folders of ``models_dir`` (listed now)."""
        return [self.startup] + [e for e in self._scan() if e.title != self.startup.title]

    def find(self, title: str) -> ModelEntry:
        """The model called ``title`` (A1111 clients may append ``" [hash]"``; it is ignored).

        Raises:
            ModelNotFoundError: no model has that title.
        """
        entries = self.entries()
        for candidate in (title, title.rsplit(" [", 1)[0] if title.endswith("]") else title):
            for e in entries:
                if e.title == candidate:
                    return e
        raise ModelNotFoundError(f"model {title!r} not found; available: {', '.join(e.title for e in entries)} "
                                 f"(GET /sdapi/v1/sd-models)")
