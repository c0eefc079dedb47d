"""Sparse upcycling: start an MoE model from a dense checkpoint (Komatsuzaki et al., 2022).

Every parameter the two models share is copied; the dense MLP of each layer that becomes MoE is
copied into all of its experts, and only the routers are fresh. With top-k renormalised weights
(k > 1) and no dropped tokens, every token's expert outputs are then identical and sum with weights
adding to one, so the upcycled model computes exactly what the dense one did: training continues
from the dense model's quality rather than from scratch.
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import numpy as np
from flax import traverse_util

from t5x_like.layers.moe import EXPERT_PARAM_RE
from t5x_like.models.registry import model_for_config
from t5x_like.errors import UserError


class UpcyclingError(UserError):
    """The dense parameters do not fit the MoE config (different architecture or sizes)."""


def upcycle(dense_params: Mapping, moe_config, rng: Optional[jax.Array] = None) -> dict:
    """{'params': ...} for `moe_config` from a dense model's params (with or without a 'params' level).

    `moe_config` must be the dense model's config with MoE fields set (scan_layers may differ only
    if the dense tree is stacked the same way). `rng` draws the routers (default key 0).
    """
    dense = traverse_util.flatten_dict(dict(dense_params.get("params", dense_params)))
    model = model_for_config(moe_config)
    fresh = traverse_util.flatten_dict(model.init_variables(jax.random.key(0) if rng is None else rng)["params"])
    expert_axis = 1 if moe_config.scan_layers else 0  # scanned trees put `layers` first
    out = {}
    for key, target in fresh.items():
        name = "/".join(key)
        match = EXPERT_PARAM_RE.fullmatch(key[-1]) if len(key) >= 2 and key[-2] == "mlp" else None
        if "router" in key:
            value = np.asarray(target)
        elif match:
            source = key[:-1] + (match.group(1), "bias" if match.group(2) else "kernel")
            if source not in dense:
                raise UpcyclingError(f"MoE parameter {name} needs dense {'/'.join(source)}, which the dense "
                                     "params lack; upcycle from a model with the same architecture")
            value = np.repeat(np.expand_dims(np.asarray(dense[source]), expert_axis), moe_config.num_experts,
                              axis=expert_axis)
        elif key in dense:
            value = np.asarray(dense[key])
        else:
            raise UpcyclingError(f"parameter {name} of the MoE model has no dense counterpart; the dense "
                                 "checkpoint must come from the same config without MoE")
        if value.shape != target.shape:
            raise UpcyclingError(f"parameter {name}: dense value has shape {value.shape} but the MoE model "
                                 f"expects {target.shape}; sizes (and scan_layers) must match")
        out[key] = value.astype(target.dtype)
    return {"params": traverse_util.unflatten_dict(out)}
