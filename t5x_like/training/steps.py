"""The pure train step (jit it with `make_train_step`); evaluation uses the model's `eval_sums`.

Gradients are accumulated over microbatches inside the step with `lax.scan`, so peak activation
memory is one microbatch's while the optimizer sees a single update per step. Losses and gradients
are summed over weighted tokens and divided once by the whole batch's normaliser, which makes k
microbatches give the same update as one full batch.

What the step minimises comes from the run's loss hook (objectives/loss.py; default: the model's
token cross-entropy with z-loss and label smoothing), so a new objective needs no edit here.

Metrics: `loss` (normalised training loss), `grad_norm` (global norm of the normalised gradient,
before clipping), `learning_rate` (at this step), `is_finite` are per step; every other key is one
of the loss's sums over the batch (`nll_sum`, `z_loss`, `tokens`, `correct`, MoE router losses and
metrics, ...), to be added across steps/hosts before dividing (objectives/metrics.py).
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from t5x_like.objectives import NUM_REAL_TARGET_TOKENS, CrossEntropyLoss, Loss, LossNormalizingFactor, loss_normalizer
from t5x_like.training.train_state import TrainState
from t5x_like.training.trainable import TrainableSubset

PER_STEP_METRICS = ("loss", "grad_norm", "is_finite", "learning_rate")


def split_microbatches(batch: Mapping, num_microbatches: int, rows_per_example: int = 1) -> dict:
    """[B, ...] -> [k, B/k, ...] with microbatch j holding rows j, j+k, j+2k, ... (or, for a loss
    whose examples span `rows_per_example` consecutive rows, such as DPO's chosen/rejected pairs,
    the groups j, j+k, ... whole).

    Strided rather than contiguous so that, with the batch sharded over devices in contiguous
    blocks, every microbatch still spreads evenly over all of them.
    """
    k, g = num_microbatches, rows_per_example
    sizes = {name: v.shape[0] for name, v in batch.items()}
    bad = {name: n for name, n in sizes.items() if n % (k * g)}
    if bad:
        raise ValueError(f"batch size {bad} is not divisible by num_microbatches={k} x rows_per_example={g}; "
                         "pick a batch size that is a multiple of it")

    def split(v):
        grouped = jnp.reshape(v, (v.shape[0] // (k * g), k, g) + v.shape[1:])
        return jnp.reshape(jnp.swapaxes(grouped, 0, 1), (k, v.shape[0] // k) + v.shape[1:])
    return {name: split(v) for name, v in batch.items()}


def train_step(model, optimizer, state: TrainState, batch: Mapping, *, loss: Optional[Loss] = None,
               num_microbatches: int = 1, dropout: bool = True,
               loss_normalizing_factor: LossNormalizingFactor = NUM_REAL_TARGET_TOKENS):
    """One optimizer update -> (new_state, metrics). `optimizer`: an `Optimizer` or optax transformation;
    `loss`: the objective (default `CrossEntropyLoss()`)."""
    loss = CrossEntropyLoss() if loss is None else loss
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    step_rng = jax.random.fold_in(state.rng, state.step)
    # Gradients and updates only for the trainable parameters (all, unless the optimizer is a
    # TrainableSubset): frozen ones get no weight-gradient matmuls and stay bitwise unchanged.
    subset = optimizer if isinstance(optimizer, TrainableSubset) else TrainableSubset(optimizer, None)
    trainable, frozen = subset.split(state.params)

    def loss_sums(trainable, batch, rng):
        sums = loss(model, subset.merge(trainable, frozen), batch, rng if dropout else None)
        return sums["loss"], sums

    grad_fn = jax.grad(loss_sums, has_aux=True)
    if num_microbatches <= 1:
        grads, sums = grad_fn(trainable, batch, step_rng)
    else:
        def accumulate(carry, xs):
            index, micro = xs
            grads, sums = grad_fn(trainable, micro, jax.random.fold_in(step_rng, index))
            add = lambda a, b: a + b.astype(a.dtype)  # noqa: E731
            return jax.tree_util.tree_map(add, carry, (grads, sums)), None

        micro = split_microbatches(batch, num_microbatches, getattr(loss, "rows_per_example", 1))
        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        sum_shapes = jax.eval_shape(lambda p, b, r: loss_sums(p, b, r)[1], trainable, first, step_rng)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), (trainable, sum_shapes))
        (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(num_microbatches), micro))

    norm = loss_normalizer(sums, loss_normalizing_factor)
    grads = jax.tree_util.tree_map(lambda g, p: (g / norm).astype(p.dtype), grads, trainable)
    updates, opt_state = subset.update(grads, state.opt_state, trainable)
    params = subset.merge(optax.apply_updates(trainable, updates), frozen)

    value, grad_norm = sums["loss"] / norm, optax.global_norm(grads)
    metrics = {**{k: v for k, v in sums.items() if k != "loss"}, "loss": value, "grad_norm": grad_norm,
               "is_finite": jnp.isfinite(value) & jnp.isfinite(grad_norm)}
    schedule = getattr(optimizer, "schedule", None)
    if schedule is not None:
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(model, optimizer, *, loss: Optional[Loss] = None, num_microbatches: int = 1,
                    dropout: bool = True, loss_normalizing_factor: LossNormalizingFactor = NUM_REAL_TARGET_TOKENS,
                    **jit_kwargs):
    """jit(state, batch) -> (state, metrics), the state donated; extra kwargs (shardings) go to jit."""
    fn = functools.partial(train_step, model, optimizer, loss=loss, num_microbatches=num_microbatches,
                           dropout=dropout, loss_normalizing_factor=loss_normalizing_factor)
    return jax.jit(fn, donate_argnums=(0,), **jit_kwargs)
