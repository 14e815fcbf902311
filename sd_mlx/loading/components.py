"""Loading one model component (``unet/``, ``vae/``, ``text_encoder/`` ...) from a diffusers folder.

A component is described by a :class:`ComponentSpec`: its config dataclass (with ``from_dict``), its MLX module
class, the pure key map from checkpoint keys to the module tree, the weight file stem, and which keys are known to
be harmless extras.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from ..errors import ModelNotFoundError, WeightLoadError
from .configs import read_json
from .weights import KeyMap, assign_weights, find_weight_file, read_safetensors, remap_weights

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def parse_dtype(dtype: str | mx.Dtype) -> mx.Dtype:
    """Map ``"float32" | "float16" | "bfloat16"`` (or an ``mx.Dtype`` of those) to the ``mx.Dtype``.

    Raises:
        InvalidArgumentError: any other value.
    """
    from ..errors import InvalidArgumentError

    if isinstance(dtype, mx.Dtype):
        if dtype in DTYPES.values():
            return dtype
        raise InvalidArgumentError(f"dtype {dtype} not supported; use one of {', '.join(DTYPES)}")
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype {dtype!r} not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class ComponentSpec:
    """How to build and fill one component.

    Attributes:
        config_from_dict: ``(config_dict, source) -> config`` (raises ``ConfigError``).
        build: ``config -> nn.Module`` with freshly initialised parameters of the right shapes.
        keymap: pure checkpoint-key -> MLX-key map (see :data:`sd_mlx.loading.weights.KeyMap`).
        weight_stem: ``"diffusion_pytorch_model"`` (diffusers) or ``"model"`` (transformers).
        benign: predicate for checkpoint keys that are known, harmless and ignored.
        keep_dtype: predicate on MLX keys whose parameters keep the module's own dtype.
    """

    config_from_dict: Callable[[dict[str, Any], str], Any]
    build: Callable[[Any], nn.Module]
    keymap: KeyMap
    weight_stem: str = "diffusion_pytorch_model"
    benign: Callable[[str], bool] = lambda k: False
    keep_dtype: Callable[[str], bool] = lambda k: False


def load_component(folder: Path | str, spec: ComponentSpec, *, dtype: str | mx.Dtype = "float32",
                   weights_file: Path | str | None = None, evaluate: bool = True) -> nn.Module:
    """Build a component from ``folder/config.json`` and strictly load its safetensors weights.

    Args:
        folder: the component folder (e.g. ``model/unet``).
        spec: see :class:`ComponentSpec`.
        dtype: parameter dtype; the ``*.fp16.safetensors`` variant is preferred for float16/bfloat16.
        weights_file: an explicit weight file instead of the folder's default one.
        evaluate: ``False`` leaves the parameters as unevaluated file-backed casts (not yet checked for NaN/Inf)
            for the caller to transform and then evaluate with
            :func:`sd_mlx.loading.weights.evaluate_parameters` (the quantized load path).

    Returns:
        The module, parameters assigned and evaluated (unless ``evaluate=False``), ``eval()`` mode.

    Raises:
        ModelNotFoundError: ``folder`` does not exist.
        ConfigError, WeightLoadError: from the config and the weights (messages name the file and key).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: component folder not found; is this a diffusers model folder?")
    mx_dtype = parse_dtype(dtype)
    cfg_path = folder / "config.json"
    config = spec.config_from_dict(read_json(cfg_path), str(cfg_path))
    model = spec.build(config)
    path = Path(weights_file) if weights_file else find_weight_file(folder, spec.weight_stem,
                                                                   prefer_fp16=mx_dtype != mx.float32)
    mapped = remap_weights(read_safetensors(path), spec.keymap, source=str(path), benign=spec.benign)
    assign_weights(model, mapped, source=str(path), dtype=mx_dtype, keep_dtype=spec.keep_dtype, consume=True,
                   evaluate=evaluate)
    model.eval()
    return model


def load_from_source(source: Any, component: str, spec: ComponentSpec, *, dtype: str | mx.Dtype = "float32",
                     evaluate: bool = True, config: Any = None) -> nn.Module:
    """Build ``component`` from a model source (:mod:`sd_mlx.loading.source`: a diffusers folder or a single
    file) and strictly load its weights, exactly as :func:`load_component` does for a folder.

    Args:
        source: the model source (``config(name)``, ``weights(name, prefer_fp16=)``).
        component: ``"unet"``, ``"vae"``, ``"text_encoder"``, ``"text_encoder_2"``.
        spec: see :class:`ComponentSpec`.
        dtype: parameter dtype (for a folder, the ``*.fp16.safetensors`` variant is preferred for half types).
        evaluate: see :func:`load_component`.
        config: an already parsed config to use instead of ``source.config(component)``.

    Returns:
        The module in ``eval()`` mode.

    Raises:
        ConfigError, WeightLoadError: from the config and the weights (messages name the file, and for a single
            file the key prefix of the component).
    """
    mx_dtype = parse_dtype(dtype)
    if config is None:
        cfg_dict, where = source.config(component)
        config = spec.config_from_dict(cfg_dict, where)
    model = spec.build(config)
    weights, where = source.weights(component, prefer_fp16=mx_dtype != mx.float32)
    mapped = remap_weights(weights, spec.keymap, source=where, benign=spec.benign)
    del weights
    original_key = getattr(source, "original_key", None)
    if original_key is not None:
        from mlx.utils import tree_flatten

        missing = sorted(k for k, _ in tree_flatten(model.parameters()) if k not in mapped)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise WeightLoadError(f"{where}: missing weight '{original_key(component, missing[0]) or missing[0]}' "
                                  f"(parameter '{missing[0]}'){more}; the file does not match the {component} "
                                  f"config")
    assign_weights(model, mapped, source=where, dtype=mx_dtype, keep_dtype=spec.keep_dtype, consume=True,
                   evaluate=evaluate)
    model.eval()
    return model
