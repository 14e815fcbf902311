"""A VAE given apart from the model (``--vae``): a TAESD, or an ``AutoencoderKL`` folder or single file.

:func:`classify_vae` tells the kinds apart from the files alone:

- **TAESD** (tiny autoencoder, decode previews or fast decodes): a diffusers ``AutoencoderTiny`` folder
  (``config.json`` with ``"_class_name": "AutoencoderTiny"``), a folder with ``taesd*_decoder.safetensors``, or such
  a ``*_encoder``/``*_decoder.safetensors`` file (see :func:`sd_mlx.models.taesd.load_taesd`);
- **AutoencoderKL folder**: diffusers ``vae/``-style folder (``config.json`` + weights), with its own config;
- **AutoencoderKL file**: one ``.safetensors`` (or pickle, read by the restricted reader) in the LDM layout
  (``encoder.down.*``, ``first_stage_model.*``) or diffusers layout, e.g. ``vae-ft-mse-840000-ema-pruned`` or
  ``sdxl_vae``. A file carries no config: the model's own VAE config is used (the replacement must have the same
  architecture, checked strictly when loaded), so the scaling factor stays the model's, as AUTOMATIC1111 and
  diffusers' ``AutoencoderKL.from_single_file(config=model)`` do.

:class:`VaeSource` offers a KL VAE through the model-source interface (``config``, ``weights``, ``header``) used
by :func:`sd_mlx.loading.components.load_from_source`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx

from ..errors import ModelNotFoundError, WeightLoadError
from .configs import read_json
from .single_file import TensorInfo, _SAFETENSORS_DTYPES, is_vae_file, open_checkpoint, vae_file_weights
from .weights import find_weight_file, read_safetensors

TAESD = "taesd"
KL_FOLDER = "kl-folder"
KL_FILE = "kl-file"


def classify_vae(path: Path | str) -> str:
    """:data:`TAESD`, :data:`KL_FOLDER` or :data:`KL_FILE` for an existing VAE path.

    Raises:
        ModelNotFoundError: the path does not exist.
        WeightLoadError: a file that is neither a TAESD nor a VAE (names what its keys look like).
        ConfigError: an unreadable ``config.json``.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"{p}: VAE not found; pass 'taesd', a TAESD or AutoencoderKL folder, or a VAE "
                                 f".safetensors file")
    if p.is_dir():
        if (p / "config.json").is_file():
            cls = read_json(p / "config.json").get("_class_name")
            if cls == "AutoencoderKL":
                return KL_FOLDER
            if cls == "AutoencoderTiny":
                return TAESD
        return TAESD  # folders of original TAESD files; load_taesd reports what is missing
    if p.name.endswith(("_decoder.safetensors", "_encoder.safetensors")):
        return TAESD
    keys = list(open_checkpoint(p).tensors)
    if is_vae_file(keys) and any(".down." in k or ".down_blocks." in k or ".up." in k or ".up_blocks." in k
                                 for k in keys):
        return KL_FILE
    raise WeightLoadError(f"{p}: not a VAE file (neither an AutoencoderKL in the LDM or diffusers layout nor a "
                          f"TAESD *_decoder.safetensors)")


class VaeSource:
    """An ``AutoencoderKL`` given apart from the model, as a model source with one component, ``"vae"``.

    Args:
        path: a KL folder or file (see :func:`classify_vae`).
        model_config: the model's own VAE config dict, used for a file (which carries none); ``None`` refuses
            files.

    Raises:
        ModelNotFoundError: the path does not exist, or a file without ``model_config``.
    """

    def __init__(self, path: Path | str, model_config: Mapping[str, Any] | None) -> None:
        self.path = Path(path).expanduser()
        self.kind = classify_vae(self.path)
        if self.kind == TAESD:
            raise ModelNotFoundError(f"{self.path}: a TAESD, not an AutoencoderKL")
        if self.kind == KL_FILE and model_config is None:
            raise ModelNotFoundError(f"{self.path}: a VAE file carries no config, and the model has none to lend "
                                     f"it; pass a diffusers AutoencoderKL folder instead")
        self._model_config = dict(model_config) if model_config is not None else None
        self.name = str(self.path)

    def config(self, component: str = "vae") -> tuple[dict[str, Any], str]:
        """``(config dict, where it came from)``: the folder's ``config.json``, or the model's VAE config."""
        if self.kind == KL_FOLDER:
            path = self.path / "config.json"
            return read_json(path), str(path)
        return dict(self._model_config or {}), f"the model's VAE config (for {self.path})"

    def weights(self, component: str = "vae", *, prefer_fp16: bool = False) -> tuple[dict[str, mx.array], str]:
        """``({diffusers_key: lazy array}, source)``."""
        if self.kind == KL_FOLDER:
            path = find_weight_file(self.path, "diffusion_pytorch_model", prefer_fp16=prefer_fp16)
            return read_safetensors(path), str(path)
        return vae_file_weights(self.path, self.config()[0])

    def header(self, component: str = "vae", *, prefer_fp16: bool = False) -> dict[str, TensorInfo]:
        """``{key: TensorInfo}`` (shapes and dtypes of the lazy arrays; nothing is read)."""
        arrays, _ = self.weights(component, prefer_fp16=prefer_fp16)
        return {k: TensorInfo(tuple(a.shape), _SAFETENSORS_DTYPES.get(a.dtype, "F32")) for k, a in arrays.items()}
