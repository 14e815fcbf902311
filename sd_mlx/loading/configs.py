"""Reading ``config.json`` files into dataclasses.

The dataclasses themselves live next to the model they configure (``sd_mlx.models.*``); this module holds the
shared parsing: JSON reading with clear errors and the field-by-field conversion.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

from ..errors import ConfigError

T = TypeVar("T")


def read_json(path: Path | str) -> dict[str, Any]:
    """Read a JSON object from ``path``.

    Raises:
        ConfigError: the file does not exist, is not valid JSON, or is not a JSON object (message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; a diffusers model folder has one per component "
                          f"(e.g. unet/config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); re-download the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def dataclass_from_dict(cls: type[T], data: Mapping[str, Any], *, source: str,
                        ignored: Iterable[str] = ()) -> T:
    """Build dataclass ``cls`` from a config mapping.

    Keys that name a field of ``cls`` are used (``None`` values fall back to the field default); keys starting with
    ``_`` and keys in ``ignored`` are skipped; any other key is ignored too (diffusers configs carry many fields that
    do not change the maths), so each config class must list every field that does change it and validate values
    in its ``__post_init__``.

    Raises:
        ConfigError: a value has the wrong type (message names ``source`` and the field).
    """
    kwargs: dict[str, Any] = {}
    skip = set(ignored)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data and f.name not in skip and data[f.name] is not None:
            kwargs[f.name] = data[f.name]
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None


def require(condition: bool, source: str, message: str) -> None:
    """Raise :class:`ConfigError` ``"{source}: {message}"`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{source}: {message}")
