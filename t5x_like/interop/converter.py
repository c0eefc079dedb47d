"""What a Hugging Face converter module is given, and the registry it joins.

Each architecture family has one module `hf_<family>.py` that maps config fields and weight names
and ends with `CONVERTER = register(Converter(...))`. Those modules import only this one (and the
model configs), never `hf`: `hf` imports all of them to fill the registry, so an import back would
be a cycle. File handling, dispatch errors and the check against the model stay in `hf`.

The registry is keyed by what each side knows: a checkpoint's `architectures` / `model_type`
(import) and our config class (export). It holds only the converters imported so far; import
`t5x_like.interop.hf` to have all of them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from t5x_like.errors import UserError


class HFInteropError(UserError):
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


@dataclasses.dataclass(frozen=True)
class Converter:
    """How one HF architecture family maps onto a t5x_like config and parameter tree.

    Parameter trees here are unscanned (`layers_0`, `layers_1`, ...); stacking for `scan_layers`
    is done by `hf`.
    """

    architectures: tuple[str, ...]                   # HF `architectures` names this converter reads
    model_types: tuple[str, ...]                     # HF `model_type`s, used when a config lists no architecture
    config_class: type                               # t5x_like config class it exports (subclasses too)
    config_from_hf: Callable[[dict], Any]            # HF config dict -> t5x_like config
    params_from_hf: Callable[[WeightReader, Any], dict]  # -> {"params": ...}-less params tree
    config_to_hf: Callable[[Any], dict]              # t5x_like config -> HF config dict
    params_to_hf: Callable[[dict, Any], dict]        # params tree -> {hf_name: array}
    can_export: Callable[[Any], bool]                # whether this converter writes that config
    ignored_weights: tuple[str, ...] = ()            # regexes of HF weights with no counterpart
    # Optional (config, reader) -> config, for facts only the weights show (T5: is lm_head tied?).
    config_from_weights: Optional[Callable[[Any, WeightReader], Any]] = None


_REGISTRY: list[Converter] = []
_BY_ARCHITECTURE: dict[str, Converter] = {}
_BY_MODEL_TYPE: dict[str, Converter] = {}
_BY_CONFIG_CLASS: dict[type, list[Converter]] = {}


def register(converter: Converter) -> Converter:
    """Make `converter` findable by its HF names and config class; each family module calls it once."""
    if converter in _REGISTRY:
        return converter
    for table, names in ((_BY_ARCHITECTURE, converter.architectures), (_BY_MODEL_TYPE, converter.model_types)):
        taken = [n for n in names if n in table]
        if taken:
            raise ValueError(f"Hugging Face names {taken} already have a registered converter")
    _REGISTRY.append(converter)
    _BY_ARCHITECTURE.update((n, converter) for n in converter.architectures)
    _BY_MODEL_TYPE.update((n, converter) for n in converter.model_types)
    _BY_CONFIG_CLASS.setdefault(converter.config_class, []).append(converter)
    return converter


def registered() -> list[Converter]:
    """Converters registered so far, in registration order."""
    return list(_REGISTRY)


def for_hf_config(hf_config: dict) -> Optional[Converter]:
    """The converter for a config.json: by its first known architecture, by model_type only if it lists none."""
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if isinstance(arch, str) and arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    model_type = hf_config.get("model_type")
    if not archs and isinstance(model_type, str):
        return _BY_MODEL_TYPE.get(model_type)
    return None


def for_config(config) -> Optional[Converter]:
    """The first converter registered for `config`'s class (or a base class) that can export it."""
    for cls in type(config).__mro__:
        for conv in _BY_CONFIG_CLASS.get(cls, ()):
            if conv.can_export(config):
                return conv
    return None
