"""The train state and the logical axes of everything in it.

`init_fn` is a pure function of the rng so it can be run three ways: eagerly (`TrainState.create`),
abstractly (`TrainState.abstract`, nothing allocated) and, by the partitioning code, under
`jax.jit(..., out_shardings=...)` so each device only ever materialises its own shard.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from t5x_like import partitioning


@flax.struct.dataclass
class TrainState:
    """`params` is the model's 'params' collection; `rng` is raw uint32 key data (checkpointable),
    fixed for the run: each step folds in its step number."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, model, optimizer, rng, batch_shapes: Optional[Mapping] = None) -> "TrainState":
        return init_fn(model, optimizer, batch_shapes)(rng)

    @classmethod
    def abstract(cls, model, optimizer, batch_shapes: Optional[Mapping] = None) -> "TrainState":
        """ShapeDtypeStructs of the state, for shardings and checkpoint restore targets."""
        return jax.eval_shape(init_fn(model, optimizer, batch_shapes), jax.random.PRNGKey(0))


def _init_batch(batch_shapes: Optional[Mapping]):
    """A one-row int batch with the given lengths: parameter shapes never depend on batch size."""
    if batch_shapes is None:
        return None
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in batch_shapes.items()}
    return {k: np.ones((1,) + shape[1:], np.int32) for k, shape in shapes.items()}


def init_fn(model, optimizer, batch_shapes: Optional[Mapping] = None):
    """rng -> fresh TrainState. `batch_shapes`: feature -> shape, array or ShapeDtypeStruct."""
    batch = _init_batch(batch_shapes)
    # An optimizer that factors by logical axes (Adafactor) gets the params' axes at init.
    param_axes = params_logical_axes(model, batch_shapes) if getattr(optimizer, "uses_param_axes", False) else None

    def init(rng):
        if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
            rng = jax.random.key_data(rng)
        init_rng, train_rng = jax.random.split(rng)
        params = model.init_variables(init_rng, batch)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params) if param_axes is None else optimizer.init(params, param_axes),
                          rng=train_rng)
    return init


def _drop_unit_dims(spec: tuple, shape: tuple) -> P:
    """Never split a size-1 axis (optax keeps (1,) placeholders), it cannot divide over a mesh axis."""
    return P(*(None if n == 1 else s for s, n in zip(spec, shape)))


def _spec_for(leaf_shape: tuple, param_shape: tuple, param_spec: P) -> P:
    """The param's spec if the shapes agree; with one axis dropped for a factored moment (the axis
    whose removal gives this shape; if that is ambiguous with different names, replicate)."""
    spec = tuple(param_spec) + (None,) * (len(param_shape) - len(param_spec))
    if len(leaf_shape) == len(param_shape) and all(n in (1, m) for n, m in zip(leaf_shape, param_shape)):
        return _drop_unit_dims(spec, leaf_shape)  # the param's shape, or reduced to 1 (keepdims factors)
    if len(leaf_shape) == len(param_shape) - 1:
        options = {spec[:i] + spec[i + 1:] for i in range(len(param_shape))
                   if param_shape[:i] + param_shape[i + 1:] == leaf_shape}
        if len(options) == 1:
            return _drop_unit_dims(options.pop(), leaf_shape)
    return P()


def opt_state_logical_axes(opt_state_shapes, params_axes, params_shapes=None):
    """PartitionSpecs for an optimizer state, matching params by tree path.

    A state leaf whose path ends with a parameter's path (adam's mu/nu, adafactor's v, v_row,
    v_col, ...) gets that parameter's spec when it has the parameter's shape or that shape with
    reduced axes of size 1 (`training/adafactor.py`'s factors), or the spec with the reduced axis
    dropped when it is a rank-reduced factored moment (optax's). Counts, placeholders and factors whose
    reduced axis is ambiguous are replicated (they are small). Without `params_shapes` only
    rank-matching leaves get the parameter's spec and factored moments are replicated.
    Logical specs only: `sharded_abstract_state` adds fsdp to leaves that leave it unused.
    """
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    param_specs = {tuple(p): s for p, s in jax.tree_util.tree_leaves_with_path(params_axes, is_leaf=is_spec)}
    shapes = {}
    if params_shapes is not None:
        shapes = {tuple(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(params_shapes)}

    def spec(path, leaf):
        shape = tuple(np.shape(leaf))
        for i in range(len(path)):  # longest suffix that is a parameter's path
            key = tuple(path[i:])
            if key in param_specs:
                if key in shapes:
                    return _spec_for(shape, shapes[key], param_specs[key])
                return _drop_unit_dims(tuple(param_specs[key]), shape) if len(param_specs[key]) == len(shape) else P()
        return P()

    leaves, treedef = jax.tree_util.tree_flatten_with_path(opt_state_shapes)
    return jax.tree_util.tree_unflatten(treedef, [spec(p, x) for p, x in leaves])


def params_logical_axes(model, batch_shapes: Optional[Mapping] = None, quantized: bool = True):
    """The model's 'params' tree of logical PartitionSpecs (`quantized=False`: of its float form)."""
    return model.logical_axes(_init_batch(batch_shapes), quantized=quantized)["params"]


def _with_shardings(abstract, shardings):
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract, shardings)


def abstract_params(model, mesh=None, batch_shapes: Optional[Mapping] = None, quantized: bool = True):
    """ShapeDtypeStructs of the model's 'params' tree (nothing allocated), carrying the
    NamedShardings its logical axes give on `mesh` when one is given: a restore target.
    `quantized=False`: the float form of a model with weight_quantization (a pretrained checkpoint)."""
    abstract = model.param_shapes(_init_batch(batch_shapes), quantized=quantized)
    if mesh is None:
        return abstract
    axes = params_logical_axes(model, batch_shapes, quantized)
    return _with_shardings(abstract, partitioning.logical_to_sharding(axes, mesh))


def train_state_logical_axes(model, state_shapes: TrainState, batch_shapes: Optional[Mapping] = None) -> TrainState:
    """A TrainState of logical PartitionSpecs (step and rng replicated)."""
    params_axes = params_logical_axes(model, batch_shapes)
    return TrainState(step=P(), params=params_axes, rng=P(),
                      opt_state=opt_state_logical_axes(state_shapes.opt_state, params_axes, state_shapes.params))


def sharded_abstract_state(model, optimizer, batch_shapes: Mapping, mesh):
    """(state ShapeDtypeStructs carrying their shardings, the shardings): targets for a sharded
    init, a checkpoint restore onto `mesh`, or an ahead-of-time compile. Nothing is allocated.
    Its params are `abstract_params(model, mesh, batch_shapes)`."""
    abstract = TrainState.abstract(model, optimizer, batch_shapes)
    with partitioning.activation_context(mesh):
        shardings = partitioning.logical_to_sharding(train_state_logical_axes(model, abstract, batch_shapes), mesh)
    # Factored moments whose reduced axis was the fsdp one also split over fsdp (partitioning.py).
    opt_shardings = partitioning.spread_state_shardings(shardings.opt_state, abstract.opt_state)
    shardings = shardings.replace(opt_state=opt_shardings)
    return _with_shardings(abstract, shardings), shardings
