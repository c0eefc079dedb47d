"""Hugging Face checkpoints <-> t5x_like models.

A checkpoint is a directory as `save_pretrained` writes it: `config.json` plus safetensors weights
(one file or shards with an index). Pickled weights (`pytorch_model.bin`) are refused, never loaded.
Each supported architecture has a `Converter` in a sibling module (`hf_t5`, `hf_llama`, ...) that
maps config fields and weight names and registers itself with `converter`; this module imports all
of them and does the file handling, dispatch and checks. The converter modules never import this
one, so the imports run one way: hf -> hf_<family> -> converter.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

import jax
import numpy as np

from t5x_like.interop import converter
# Every converter module; importing one registers it. A new family adds its module here.
from t5x_like.interop import hf_bert, hf_gpt2, hf_llama, hf_llama_reward, hf_mixtral, hf_t5  # noqa: F401
# Re-exported, as callers and tests use them as `hf.X`.
from t5x_like.interop.converter import (Converter, HFInteropError, WeightReader, register,  # noqa: F401
                                        stack_layers, unstack_layers)
from t5x_like.models import model_for_config

if TYPE_CHECKING:
    from t5x_like.models import BaseModel

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def converters() -> list[Converter]:
    """Every converter (all are imported above, so the list is complete)."""
    return converter.registered()


def supported_architectures() -> list[str]:
    return sorted(a for c in converters() for a in c.architectures)


def _converter_for_hf(hf_config: dict, path: str) -> Converter:
    conv = converter.for_hf_config(hf_config)
    if conv is not None:
        return conv
    archs, model_type = hf_config.get("architectures") or [], hf_config.get("model_type")
    raise HFInteropError(f"unsupported Hugging Face architecture {archs or model_type!r} in {path}; "
                         f"supported: {', '.join(supported_architectures())}")


def read_hf_config(path: str) -> dict:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise HFInteropError(f"{path} is not a directory; pass the folder written by save_pretrained")
    if not os.path.exists(file):
        raise HFInteropError(f"no {CONFIG_FILE} in {path}; pass the folder written by save_pretrained")
    with open(file) as f:
        try:
            config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HFInteropError(f"{file} is not valid JSON ({e}); pass a folder written by save_pretrained") from None
    if not isinstance(config, dict):
        raise HFInteropError(f"{file} holds a JSON {type(config).__name__}, not an object of config fields; "
                             "pass a folder written by save_pretrained")
    return config


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All weights of a checkpoint folder as float32/int numpy arrays (bfloat16 is widened)."""
    from safetensors import SafetensorError, safe_open

    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise HFInteropError(f"{index} is not a safetensors index with a weight_map ({type(e).__name__}: "
                                 f"{e}); re-save the checkpoint with save_pretrained") from None
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
        try:
            with safe_open(file, framework="flax") as f:
                for key in f.keys():
                    arr = np.asarray(f.get_tensor(key))
                    is_float = arr.dtype.kind == "f" or arr.dtype.name == "bfloat16"
                    weights[key] = arr.astype(np.float32) if is_float else arr
        except SafetensorError as e:  # a truncated or corrupt file
            raise HFInteropError(f"{file} is not a readable safetensors file ({e}); it may be truncated: "
                                 "download or save it again") from None
    return weights


def _check_against_model(model: BaseModel, params: dict, source: str) -> None:
    """The converted tree must have exactly the structure and shapes the model initialises."""
    expected = model.param_shapes()
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
    try:
        config = conv.config_from_hf(hf_config)
    except (KeyError, TypeError) as e:  # a field missing, or of the wrong type
        what = f"lacks the field {e.args[0]!r}" if isinstance(e, KeyError) else f"has a field of the wrong type ({e})"
        raise HFInteropError(f"{os.path.join(path, CONFIG_FILE)} {what}; pass a folder written by "
                             "save_pretrained") from None
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
    config = model.config
    conv = converter.for_config(config)
    if conv is None:
        raise HFInteropError(f"no Hugging Face architecture matches {type(config).__name__} with "
                             f"position_embedding={config.position_embedding!r}; supported: "
                             f"{', '.join(supported_architectures())}")
    params = variables.get("params", variables)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    if config.scan_layers:
        params = unstack_layers(params)
    hf_config = conv.config_to_hf(config)
    weights = {k: np.ascontiguousarray(v) for k, v in conv.params_to_hf(params, config).items()}

    write_config_and_weights(path, CONFIG_FILE, hf_config, WEIGHTS_FILE, weights)


def write_config_and_weights(path: str, config_file: str, config: dict, weights_file: str, tensors: dict) -> None:
    """`path`/config_file (JSON) and `path`/weights_file (safetensors, torch metadata), written to a
    temporary folder first and moved into place, so files already at `path` are never left
    half-overwritten (a Hugging Face checkpoint, a peft adapter folder)."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".save_", dir=parent)
    try:
        with open(os.path.join(tmp, config_file), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        save_file(tensors, os.path.join(tmp, weights_file), metadata={"format": "pt"})
        os.makedirs(path, exist_ok=True)
        for name in (config_file, weights_file):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
