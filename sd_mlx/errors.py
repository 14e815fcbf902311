"""Exception classes for errors a user can cause.

Every error raised on purpose by sd_mlx derives from :class:`SDMLXError`. Messages are one line that names the
problem (and the file or argument involved) and how to fix it. The CLI prints them without a traceback and exits
with status 2.
"""

from __future__ import annotations


class SDMLXError(Exception):
    """Base class of every error sd_mlx raises on purpose."""


class ModelNotFoundError(SDMLXError):
    """A model name is neither a local folder nor a reachable/cached Hugging Face repo id, or a component is missing."""


class ConfigError(SDMLXError):
    """A ``config.json`` (or scheduler config) is missing, not JSON, or has a value sd_mlx cannot honour."""


class WeightLoadError(SDMLXError):
    """A weight file is missing, corrupt, truncated, or its keys/shapes/values do not fit the model."""


class InvalidArgumentError(SDMLXError, ValueError):
    """An argument of a pipeline call or CLI option is invalid (size, steps, seed, scheduler name, ...)."""


class NonFiniteError(SDMLXError):
    """NaN or Inf appeared in latents or a decoded image; the message names the phase."""


class OutputError(SDMLXError):
    """An output file cannot be written (missing folder, read-only folder, existing file without overwrite)."""
