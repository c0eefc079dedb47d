"""Hugging Face checkpoints <-> t5x_like models.

A checkpoint is a directory as `save_pretrained` writes it: `config.json` plus safetensors weights
(one file or shards with an index). Pickled weights (`pytorch_model.bin`) are refused, never loaded.
Each supported architecture has a `Converter` in a sibling module (`hf_t5`, `hf_llama`, ...) that
maps config fields and weight names; this module does the file handling, dispatch and checks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from t5x_like.models.base import BaseModel, model_for_config

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


class HFInteropError(ValueError):
    """A checkpoint that cannot be converted; the message names the file, weight or field."""


class WeightReader:
    """Named weights of one checkpoint; `get` checks presence and shape and records use."""

    def __init__(self, weights: Mapping[str, np.ndarray], source: str):
        self.weights = dict(weights)
        self.source = source
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.weights

    def get(self, name: str, shape: Optional[tuple[int, ...]] = None) -> np.ndarray:
        if name not in self.weights:
            raise HFInteropError(f"missing weight {name!r} in {self.source}; the checkpoint does not match "
                                 "its config.json (re-save it with transformers' save_pretrained)")
        value = self.weights[name]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise HFInteropError(f"weight {name!r} in {self.source} has shape {tuple(value.shape)} but "
                                 f"config.json implies {tuple(shape)}; the config and weights disagree")
        self.used.add(name)
        return value

    def unused(self, ignore: tuple[str, ...] = ()) -> list[str]:
        return sorted(n for n in self.weights if n not in self.used
                      and not any(re.fullmatch(p, n) for p in ignore))


@dataclasses.dataclass(frozen=True)
class Converter:
    """How one HF architecture family maps onto a t5x_like config and parameter tree.

    Parameter trees here are unscanned (`layers_0`, `layers_1`, ...); stacking for `scan_layers`
    is done by this module.
    """

    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict], Any]            # HF config dict -> t5x_like config
    params_from_hf: Callable[[WeightReader, Any], dict]  # -> {"params": ...}-less params tree
    config_to_hf: Callable[[Any], dict]              # t5x_like config -> HF config dict
    params_to_hf: Callable[[dict, Any], dict]        # params tree -> {hf_name: array}
    can_export: Callable[[Any], bool]                # whether this converter writes that config
    ignored_weights: tuple[str, ...] = ()            # regexes of HF weights with no counterpart
    # Optional (config, reader) -> config, for facts only the weights show (T5: is lm_head tied?).
    config_from_weights: Optional[Callable[[Any, WeightReader], Any]] = None


_REGISTRY: list[Converter] = []


def register(converter: Converter) -> Converter:
    _REGISTRY.append(converter)
    return converter


def converters() -> list[Converter]:
    # Imported here so that each converter module can import this one to register itself.
    from t5x_like.interop import hf_bert, hf_gpt2, hf_llama, hf_mixtral, hf_t5  # noqa: F401
    return list(_REGISTRY)


def supported_architectures() -> list[str]:
    return sorted(a for c in converters() for a in c.architectures)


def _converter_for_hf(hf_config: dict, path: str) -> Converter:
    archs = hf_config.get("architectures") or []
    model_type = hf_config.get("model_type")
    for conv in converters():
        if any(a in conv.architectures for a in archs):
            return conv
    for conv in converters():
        if not archs and model_type in conv.model_types:
            return conv
    raise HFInteropError(f"unsupported Hugging Face architecture {archs or model_type!r} in {path}; "
                         f"supported: {', '.join(supported_architectures())}")


def read_hf_config(path: str) -> dict:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise HFInteropError(f"{path} is not a directory; pass the folder written by save_pretrained")
    if not os.path.exists(file):
        raise HFInteropError(f"no {CONFIG_FILE} in {path}; pass the folder written by save_pretrained")
    with open(file) as f:
        return json.load(f)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All weights of a checkpoint folder as float32/int numpy arrays (bfloat16 is widened)."""
    from safetensors import safe_open

    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, WEIGHTS_FILE)):
        files = [WEIGHTS_FILE]
    else:
        pickles = [p for p in PICKLE_FILES if os.path.exists(os.path.join(path, p))]
        hint = (f"it holds only {pickles[0]}, which t5x_like never loads (pickles can run code); re-save with "
                "`model.save_pretrained(dir, safe_serialization=True)`" if pickles else "no weights found")
        raise HFInteropError(f"no {WEIGHTS_FILE} in {path}: {hint}")
    weights = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise HFInteropError(f"missing weight shard {name} listed in {INDEX_FILE} of {path}")
        # framework="flax" reads bfloat16 too (numpy has no bfloat16).
        with safe_open(file, framework="flax") as f:
            for key in f.keys():
                arr = np.asarray(f.get_tensor(key))
                is_float = arr.dtype.kind == "f" or arr.dtype.name == "bfloat16"
                weights[key] = arr.astype(np.float32) if is_float else arr
    return weights


_LAYER_KEY = re.compile(r"layers_(\d+)$")


def stack_layers(tree):
    """{'layers_0': t0, 'layers_1': t1, ...} -> {'layers': stack(t0, t1, ...)} at every level."""
    if not isinstance(tree, dict):
        return tree
    out = {k: stack_layers(v) for k, v in tree.items() if not _LAYER_KEY.match(k)}
    layers = sorted((int(_LAYER_KEY.match(k).group(1)), v) for k, v in tree.items() if _LAYER_KEY.match(k))
    if layers:
        out["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *[stack_layers(v) for _, v in layers])
    return out


def unstack_layers(tree):
    """Inverse of `stack_layers`."""
    if not isinstance(tree, dict):
        return tree
    out = {k: unstack_layers(v) for k, v in tree.items() if k != "layers"}
    if "layers" in tree:
        stacked = tree["layers"]
        n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
        for i in range(n):
            out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x: np.asarray(x[i]), stacked)
    return out


def _check_against_model(model: BaseModel, params: dict, source: str) -> None:
    """The converted tree must have exactly the structure and shapes the model initialises."""
    expected = jax.eval_shape(lambda: model.init_variables(jax.random.key(0)))["params"]
    exp_flat = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    got_flat = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
    for key in sorted(set(exp_flat) | set(got_flat)):
        if key not in got_flat:
            raise HFInteropError(f"{source}: no weight converted for parameter {key}")
        if key not in exp_flat:
            raise HFInteropError(f"{source}: converted parameter {key} has no place in the model")
        if tuple(got_flat[key]) != tuple(exp_flat[key]):
            raise HFInteropError(f"{source}: parameter {key} has shape {tuple(got_flat[key])}, "
                                 f"the model expects {tuple(exp_flat[key])}")


def load(path: str, **config_overrides) -> tuple[BaseModel, dict]:
    """(model, variables) from a `save_pretrained` folder.

    config_overrides replace fields of the derived config (e.g. `dtype="bfloat16"`,
    `scan_layers=True`); architecture fields should come from config.json.
    """
    path = os.fspath(path)
    hf_config = read_hf_config(path)
    conv = _converter_for_hf(hf_config, path)
    config = conv.config_from_hf(hf_config)
    reader = WeightReader(read_safetensors(path), path)
    if conv.config_from_weights is not None:
        config = conv.config_from_weights(config, reader)
    config = config.replace(**config_overrides)
    params = conv.params_from_hf(reader, config)
    unused = reader.unused(conv.ignored_weights)
    if unused:
        log.warning("%s: %d weights not used by t5x_like: %s", path, len(unused), ", ".join(unused[:8]))
    params = jax.tree_util.tree_map(np.asarray, params)
    if config.scan_layers:
        params = stack_layers(params)
    model = model_for_config(config)
    _check_against_model(model, params, path)
    dtype = np.dtype(jax.numpy.dtype(config.param_dtype))
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype), params)
    return model, {"params": params}


def save(model: BaseModel, variables: dict, path: str) -> None:
    """Write config.json and model.safetensors that `transformers` loads with from_pretrained.

    Written to a temporary folder first and moved into place, so an existing checkpoint at `path`
    is never left half-overwritten.
    """
    from safetensors.numpy import save_file

    config = model.config
    matches = [c for c in converters() if c.can_export(config)]
    if not matches:
        raise HFInteropError(f"no Hugging Face architecture matches {type(config).__name__} with "
                             f"position_embedding={config.position_embedding!r}; supported: "
                             f"{', '.join(supported_architectures())}")
    conv = matches[0]
    params = variables.get("params", variables)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    if config.scan_layers:
        params = unstack_layers(params)
    hf_config = conv.config_to_hf(config)
    weights = {k: np.ascontiguousarray(v) for k, v in conv.params_to_hf(params, config).items()}

    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".hf_save_", dir=parent)
    try:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        save_file(weights, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        os.makedirs(path, exist_ok=True)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
