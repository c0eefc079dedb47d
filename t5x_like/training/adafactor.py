"""Adafactor's second moment factored over merged axes chosen by the parameters' logical names.

Why not optax's `scale_by_factored_rms`: it factors the two largest axes of the raw shape, so an
attention kernel [embed, heads, kv] with kv = 64 < `min_dim_size_to_factor` keeps a full second
moment (T5.1.1-XXL: optimizer state ~47% of the parameters), and a scanned [layers, embed, mlp] or
expert [expert, embed, mlp] kernel is factored across layers or experts. As T5X's `adafactor.py`
(`factor_rules`), each logical axis has a role: `row` and `column` axes are merged into one row
and one column, `batch` axes (`layers`, `expert`) are kept, so each layer and expert gets its own
factors, clipping RMS and parameter scale. The reduced factors are stored with the parameter's
rank, the reduced axes of size 1 (`v_row`: columns reduced, `v_col`: rows reduced), so a factor's
kept axes carry the parameter's logical names and shard like it (`train_state.opt_state_logical_axes`);
a factor that reduced the fsdp-split axis (embed) is also split over fsdp on a kept axis
(`partitioning.spread_state_sharding`), else it would be whole on every chip of an fsdp mesh.
The state's shapes are the plan: `update` reads which axes are rows, columns and batch from them,
so only `init` needs the logical axes.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROW, COLUMN, BATCH, NONE = "row", "column", "batch", "none"
ROLES = (ROW, COLUMN, BATCH, NONE)

# T5X's `standard_logical_factor_rules`, in this codebase's axis names (layers/, models/).
FACTOR_RULES = {
    "embed": ROW, "vocab": COLUMN, "mlp": COLUMN, "heads": COLUMN, "kv_heads": COLUMN, "kv": COLUMN,
    "abspos_buckets": COLUMN, "token_types": COLUMN, "layers": BATCH, "expert": BATCH,
    "relpos_buckets": NONE, "lora_rank": NONE, "classes": NONE, "reward": NONE,
}


class Plan(NamedTuple):
    """Axis indices of one parameter: merged rows, merged columns (both empty: not factored), batch."""
    rows: tuple
    cols: tuple
    batch: tuple

    @property
    def factored(self) -> bool:
        return bool(self.rows) and bool(self.cols)


def plan_from_shape(shape, factored: bool, min_dim_size_to_factor: int) -> Plan:
    """optax's rule, for a parameter without logical names: the two largest axes if the smaller is
    at least `min_dim_size_to_factor`."""
    if not factored or len(shape) < 2:
        return Plan((), (), ())
    order = np.argsort(shape)
    if shape[order[-2]] < min_dim_size_to_factor:
        return Plan((), (), ())
    return Plan((int(order[-2]),), (int(order[-1]),), ())


def plan_from_axes(names, shape, rules: Mapping[str, str], factored: bool, min_dim_size_to_factor: int) -> Plan:
    """The plan from logical axis names: factored when the merged rows and merged columns both have
    at least `min_dim_size_to_factor` entries and no axis is `none`. A name the rules do not know
    (or a missing one) falls back to `plan_from_shape`."""
    names = tuple(names or ())
    names += (None,) * (len(shape) - len(names))
    if any(n not in rules for n in names):
        return plan_from_shape(shape, factored, min_dim_size_to_factor)
    roles = [rules[n] for n in names]
    batch = tuple(i for i, r in enumerate(roles) if r == BATCH)
    rows = tuple(i for i, r in enumerate(roles) if r == ROW)
    cols = tuple(i for i, r in enumerate(roles) if r == COLUMN)
    size = lambda axes: math.prod(shape[i] for i in axes)  # noqa: E731
    if (not factored or NONE in roles or not rows or not cols
            or min(size(rows), size(cols)) < min_dim_size_to_factor):
        return Plan((), (), batch)
    return Plan(rows, cols, batch)


def plan_from_state(ndim: int, v_row, v_col, v) -> Plan:
    """The plan `init_leaf` wrote into the state's shapes: batch axes are kept by both factors,
    rows reduced in v_col, columns in v_row (a size-1 axis may count as both: a no-op either way);
    an unfactored parameter has its full `v` and factors that only mark the batch axes."""
    if ndim == 0:
        return Plan((), (), ())
    batch = tuple(d for d in range(ndim) if v_row.shape[d] != 1 and v_col.shape[d] != 1)
    if np.ndim(v) != 0:
        return Plan((), (), batch)
    return Plan(tuple(d for d in range(ndim) if d not in batch and v_col.shape[d] == 1),
                tuple(d for d in range(ndim) if d not in batch and v_row.shape[d] == 1), batch)


def _keep(shape, axes) -> tuple:
    return tuple(n if i in axes else 1 for i, n in enumerate(shape))


def init_leaf(param, plan: Plan):
    """(v_row, v_col, v) zeros: factored, v_row keeps batch+rows and v_col batch+columns and v is a
    scalar placeholder; unfactored, v is full and v_row = v_col keep only the batch axes."""
    shape, dtype = param.shape, param.dtype
    if not shape:
        return jnp.zeros((), dtype), jnp.zeros((), dtype), jnp.zeros((), dtype)
    if plan.factored:
        return (jnp.zeros(_keep(shape, plan.batch + plan.rows), dtype),
                jnp.zeros(_keep(shape, plan.batch + plan.cols), dtype), jnp.zeros((), dtype))
    marker = _keep(shape, plan.batch)  # two arrays: a train step donates each buffer once
    return jnp.zeros(marker, dtype), jnp.zeros(marker, dtype), jnp.zeros(shape, dtype)


def _rms(x, axes):
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True))


def update_leaf(grad, param, v_row, v_col, v, decay, *, epsilon, clipping_threshold, multiply_by_parameter_scale,
                min_scale):
    """One parameter's scaled update and new (v_row, v_col, v): the factored (or full) RMS
    scaling, clipping at RMS `clipping_threshold` and the parameter-RMS scale, each per batch slice."""
    plan = plan_from_state(grad.ndim, v_row, v_col, v)
    dtype = param.dtype
    grad_sqr = jnp.square(grad) + epsilon
    if plan.factored:
        v_row = (decay * v_row + (1 - decay) * jnp.mean(grad_sqr, axis=plan.cols, keepdims=True)).astype(dtype)
        v_col = (decay * v_col + (1 - decay) * jnp.mean(grad_sqr, axis=plan.rows, keepdims=True)).astype(dtype)
        row_factor = (v_row / jnp.mean(v_row, axis=plan.rows, keepdims=True)) ** -0.5
        update = grad * row_factor * v_col ** -0.5
    else:
        v = (decay * v + (1 - decay) * grad_sqr).astype(dtype)
        update = grad * v ** -0.5
    within = tuple(d for d in range(grad.ndim) if d not in plan.batch)  # a batch slice's axes
    if clipping_threshold is not None:
        update = update / jnp.maximum(1.0, _rms(update, within) / clipping_threshold)
    if multiply_by_parameter_scale:
        update = update * jnp.maximum(_rms(param, within), min_scale)
    return update.astype(dtype), v_row, v_col, v


class AdafactorState(NamedTuple):
    count: jax.Array
    v_row: Any
    v_col: Any
    v: Any


def scale_by_adafactor(*, factored: bool = True, decay_rate: float = 0.8, min_dim_size_to_factor: int = 128,
                       clipping_threshold: Optional[float] = 1.0, multiply_by_parameter_scale: bool = True,
                       factor_rules: Optional[Mapping[str, str]] = None, param_axes=None, epsilon: float = 1e-30,
                       min_scale: float = 1e-3) -> optax.GradientTransformation:
    """optax's factored RMS scaling, block-RMS clipping and parameter-block-RMS scale (the first
    steps of `optax.adafactor`), factored by `factor_rules` over `param_axes` (a tree of logical
    PartitionSpecs like the params); without `param_axes`, optax's largest-two-axes rule.
    `factor_rules` add to (or override) FACTOR_RULES."""
    rules = {**FACTOR_RULES, **(factor_rules or {})}

    def plans(leaves, treedef):
        if param_axes is None:
            return [plan_from_shape(p.shape, factored, min_dim_size_to_factor) for p in leaves]
        names = treedef.flatten_up_to(param_axes)
        return [plan_from_axes(n, p.shape, rules, factored, min_dim_size_to_factor) for n, p in zip(names, leaves)]

    def init(params):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        states = [init_leaf(p, plan) for p, plan in zip(leaves, plans(leaves, treedef))]
        pick = lambda i: treedef.unflatten([s[i] for s in states])  # noqa: E731
        return AdafactorState(jnp.zeros([], jnp.int32), pick(0), pick(1), pick(2))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("adafactor's update needs the params (parameter-scaled steps)")
        t = jnp.asarray(state.count + 1, jnp.float32)
        decay = 1.0 - t ** (-decay_rate)
        leaves, treedef = jax.tree_util.tree_flatten(grads)
        rest = [treedef.flatten_up_to(x) for x in (params, state.v_row, state.v_col, state.v)]
        out = [update_leaf(*args, decay, epsilon=epsilon, clipping_threshold=clipping_threshold,
                           multiply_by_parameter_scale=multiply_by_parameter_scale, min_scale=min_scale)
               for args in zip(leaves, *rest)]
        pick = lambda i: treedef.unflatten([o[i] for o in out])  # noqa: E731
        return pick(0), AdafactorState(optax.safe_increment(state.count), pick(1), pick(2), pick(3))

    return optax.GradientTransformation(init, update)
