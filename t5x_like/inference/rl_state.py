"""The RL run's train state and its frozen reference (the `rl` mode, inference/rlhf.py).

The state is a `TrainState` over params {"policy": the model's, "value_head": PPO's}: the policy
sharded by its logical axes, the value head (d_model + 1 numbers) replicated and always trained.
It starts from the seed, with the policy's params from `init_checkpoint` when given (model-fresh
parts such as LoRA adapters stay fresh). The reference is the policy's starting point re-derived at
every start and resume, never saved: with LoRA the same params with the adapters off (None here);
else `reference_checkpoint` (default `init_checkpoint`); else the seed's initial params.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from t5x_like import partitioning
from t5x_like.errors import UserError
from t5x_like.objectives import rl
from t5x_like.training.checkpointing import CheckpointError, restore_params
from t5x_like.training.train_state import TrainState, abstract_params, opt_state_logical_axes, params_logical_axes


class RLRunError(UserError):
    """An RL run setting that cannot work; the message names the fix."""


def trainable_pattern(model, pattern: Optional[str], value_head: bool) -> Optional[str]:
    """The run's trainable regex over {"policy": ..., "value_head": ...} paths; the value head always trains."""
    pattern = pattern if pattern is not None else model.trainable_params_regex()
    if pattern is None:
        return None
    return f"^{rl.VALUE_HEAD}/|(?:{pattern})" if value_head else pattern


def _param_axes(model, params):
    """Logical PartitionSpecs of {"policy": ..., "value_head": ...}; the value head is replicated."""
    axes = {rl.POLICY: params_logical_axes(model)}
    if rl.VALUE_HEAD in params:
        axes[rl.VALUE_HEAD] = jax.tree_util.tree_map(lambda _: P(), params[rl.VALUE_HEAD])
    return axes


def _init_fn(model, optimizer, value_head: bool):
    def init(rng):
        init_rng, head_rng, train_rng = jax.random.split(jax.random.wrap_key_data(rng), 3)
        params = {rl.POLICY: model.init_variables(init_rng)["params"]}
        if value_head:
            params[rl.VALUE_HEAD] = rl.init_value_head(head_rng, model.config.d_model)
        # An optimizer that factors by logical axes (training/adafactor.py) gets them, as train_state does.
        opt_state = (optimizer.init(params, _param_axes(model, params)) if getattr(optimizer, "uses_param_axes", False)
                     else optimizer.init(params))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                          rng=jax.random.key_data(train_rng))
    return init


def state_shardings(model, optimizer, mesh, value_head: bool):
    """(abstract state carrying shardings, shardings); the value head is replicated (d_model + 1 numbers)."""
    abstract = jax.eval_shape(_init_fn(model, optimizer, value_head), jax.random.key_data(jax.random.key(0)))
    axes = _param_axes(model, abstract.params)
    logical = TrainState(step=P(), params=axes, rng=P(),
                         opt_state=opt_state_logical_axes(abstract.opt_state, axes, abstract.params))
    with partitioning.activation_context(mesh):
        shardings = partitioning.logical_to_sharding(logical, mesh)
    # As the trainer's state: factored moments whose reduced axis was fsdp also split over fsdp.
    shardings = shardings.replace(opt_state=partitioning.spread_state_shardings(shardings.opt_state,
                                                                                 abstract.opt_state))
    target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, shardings)
    return target, shardings


def _restore_policy(model, mesh, path: str, what: str, fresh):
    """Params of the checkpoint at `path` (model-fresh parts, e.g. LoRA adapters, from `fresh`)."""
    base_target, _ = model.split_fresh_params(abstract_params(model, mesh, quantized=False))
    try:
        base = restore_params(path, target=base_target, partial=True)
    except CheckpointError as e:
        raise RLRunError(f"{what}={path} does not restore onto the policy's architecture ({e}); it must be a "
                         "checkpoint of the same model config") from None
    with partitioning.activation_context(mesh):
        base = jax.jit(model.quantize_params)(base)
    _, fresh_part = model.split_fresh_params(fresh)
    return model.join_params(base, fresh_part)


def fresh_state(model, optimizer, mesh, shardings, seed, value_head, init_checkpoint):
    """A new sharded state from `seed`, its policy restored from `init_checkpoint` when given."""
    with partitioning.activation_context(mesh):
        state = jax.jit(_init_fn(model, optimizer, value_head), out_shardings=shardings)(
            jax.random.key_data(jax.random.key(seed)))
    if init_checkpoint:
        policy = _restore_policy(model, mesh, init_checkpoint, "init_checkpoint", state.params[rl.POLICY])
        policy = jax.device_put(policy, shardings.params[rl.POLICY])
        state = state.replace(params={**state.params, rl.POLICY: policy})
    return state


def reference_params(model, mesh, shardings, seed, value_head, optimizer, init_checkpoint, reference_checkpoint):
    """The frozen reference's params, or None when it is the policy with adapters off (LoRA)."""
    if model.lora is not None and reference_checkpoint is None:
        return None
    path = reference_checkpoint or init_checkpoint
    fresh = fresh_state(model, optimizer, mesh, shardings, seed, value_head, None).params[rl.POLICY]
    if not path:
        return fresh  # the seed's initial params, re-derived
    return jax.device_put(_restore_policy(model, mesh, path, "reference_checkpoint", fresh),
                          shardings.params[rl.POLICY])
