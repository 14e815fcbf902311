"""Locating a diffusers model: a local folder or a Hugging Face Hub repo id.

Repo ids go through ``huggingface_hub.snapshot_download`` restricted to the files sd_mlx reads, so the Hub cache,
``HF_HUB_OFFLINE``, ``HF_HOME`` and tokens behave as in diffusers.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelNotFoundError

# Files a pipeline needs: configs, tokenizer files and safetensors weights (never pickles).
PIPELINE_PATTERNS = (
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*", "tokenizer_2/*",
    "text_encoder/config.json", "text_encoder_2/config.json", "unet/config.json", "vae/config.json",
)


def _weight_patterns(variant: str | None) -> tuple[str, ...]:
    stems = ("text_encoder/model", "text_encoder_2/model", "unet/diffusion_pytorch_model",
             "vae/diffusion_pytorch_model")
    if variant:
        return tuple(f"{s}.{variant}.safetensors" for s in stems) + tuple(f"{s}.safetensors" for s in stems)
    return tuple(f"{s}.safetensors" for s in stems)


def looks_like_repo_id(name: str) -> bool:
    """True when ``name`` has the form ``owner/name`` of a Hub repo id (letters, digits, ``-_.``)."""
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name)
    except Exception:
        return False
    return name.count("/") == 1 and not name.startswith((".", "/")) and not name.endswith("/")


TAESD_REPOS = {"taesd": "madebyollin/taesd", "taesdxl": "madebyollin/taesdxl"}
"""Short names for the TAESD decoders on the Hub (diffusers ``AutoencoderTiny`` format)."""

TAESD_PATTERNS = ("config.json", "diffusion_pytorch_model.safetensors", "taesd*_encoder.safetensors",
                  "taesd*_decoder.safetensors")


def resolve_model(name_or_path: str | os.PathLike, *, variant: str | None = None,
                  revision: str | None = None, allow_patterns: tuple[str, ...] | None = None) -> Path:
    """Return a local folder holding the diffusers model named by ``name_or_path``.

    A path to an existing folder is returned as is. A repo id (``owner/name``) is fetched with
    ``huggingface_hub.snapshot_download`` (only configs, tokenizer files and safetensors; ``variant="fp16"`` also
    fetches ``*.fp16.safetensors``; ``allow_patterns`` replaces those patterns, e.g. :data:`TAESD_PATTERNS`), which
    reuses the Hub cache and honours ``HF_HUB_OFFLINE``.

    Raises:
        ModelNotFoundError: the name is neither an existing folder nor a valid repo id; or the repo is not cached
            while offline (or the Hub cannot be reached); or the repo does not exist or is gated. The message says
            what to download or which local folder to pass.
    """
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        return path
    name = os.fspath(name_or_path)
    if path.exists():
        raise ModelNotFoundError(f"{name}: is a file, not a model folder; pass a diffusers folder (with "
                                 f"model_index.json, unet/, vae/, text_encoder/, tokenizer/) or a Hub repo id")
    if not looks_like_repo_id(name):
        raise ModelNotFoundError(f"{name!r}: no such folder, and not a Hugging Face repo id (owner/name); pass an "
                                 f"existing diffusers model folder or a repo id like 'stable-diffusion-v1-5/"
                                 f"stable-diffusion-v1-5'")
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    patterns = list(allow_patterns) if allow_patterns else list(PIPELINE_PATTERNS) + list(_weight_patterns(variant))
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError) as e:
        raise ModelNotFoundError(f"{name}: repo not found on the Hugging Face Hub or access is gated "
                                 f"({type(e).__name__}); check the id, or log in with `hf auth login`") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, OSError):
        raise ModelNotFoundError(
            f"{name}: not in the Hugging Face cache and the Hub cannot be reached (offline="
            f"{os.environ.get('HF_HUB_OFFLINE', '0')}); download it on a connected machine with "
            f"`hf download {name}` (or copy its cache folder), or pass a local diffusers folder as --model PATH"
        ) from None
