"""Pure train and eval steps (jit them with `make_train_step` / `make_eval_step`).

Gradients are accumulated over microbatches inside the step with `lax.scan`, so peak activation
memory is one microbatch's while the optimizer sees a single update per step. Losses and gradients
are summed over weighted tokens and divided once by the whole batch's normaliser, which makes k
microbatches give the same update as one full batch.

Metrics: `loss` (normalised training loss, with smoothing and z-loss), `grad_norm` (global norm of
the normalised gradient, before clipping), `learning_rate` (at this step), `is_finite` are per
step; `nll_sum`, `z_loss`, `tokens`, `correct` are sums over the batch's weighted target tokens,
to be added across steps/hosts before dividing (perplexity = exp(nll_sum / tokens)). MoE models
add `moe_aux_loss`, `moe_z_loss` (unweighted, summed over layers), `moe_dropped_fraction` and
`moe_expert_usage_max/min` (averaged over layers), all per step; their weighted losses are in `loss`.
"""

from __future__ import annotations

import functools
from typing import Mapping

import gin
import jax
import jax.numpy as jnp
import optax

from t5x_like.layers.moe import MOE_LOSS_KEYS, MOE_METRIC_KEYS
from t5x_like.training.losses import (NUM_REAL_TARGET_TOKENS, SUM_KEYS, LossNormalizingFactor,
                                      cross_entropy_sums, loss_normalizer, targets_and_weights)
from t5x_like.training.fused_loss import fused_cross_entropy_sums
from t5x_like.training.train_state import TrainState


def _uses_moe(model) -> bool:
    return bool(getattr(model.config, "num_experts", 0))


def _sum_keys(model) -> tuple[str, ...]:
    return SUM_KEYS + (MOE_LOSS_KEYS + MOE_METRIC_KEYS if _uses_moe(model) else ())


def _loss_sums(model, params, batch, dropout_rng, *, z_loss, label_smoothing, dropout, fused_loss):
    kwargs = dict(dropout_rng=dropout_rng if dropout else None, deterministic=not dropout)
    targets, weights = targets_and_weights(model, batch)
    if fused_loss:
        hidden, aux = model.compute_hidden_and_aux({"params": params}, batch, **kwargs)
        sums = fused_cross_entropy_sums(hidden, model.output_head(params), targets, weights,
                                        label_smoothing=label_smoothing, z_loss=z_loss)
    else:
        if _uses_moe(model):
            logits, aux = model.compute_logits_and_aux({"params": params}, batch, **kwargs)
        else:
            logits, aux = model.compute_logits({"params": params}, batch, **kwargs), {}
        sums = cross_entropy_sums(logits, targets, weights, label_smoothing=label_smoothing, z_loss=z_loss)
    if aux:
        # Router losses are per-batch means; weighting them by the token count makes them add like
        # a per-token loss, so the default normaliser turns them back into weight x mean, and
        # microbatches average them by tokens. They never enter nll_sum (perplexity).
        cfg, tokens = model.config, sums["tokens"]
        router = cfg.moe_aux_loss_weight * aux["moe_aux_loss"] + cfg.moe_z_loss_weight * aux["moe_z_loss"]
        sums["loss"] = sums["loss"] + tokens * router
        sums.update({k: aux[k] * tokens for k in MOE_LOSS_KEYS + MOE_METRIC_KEYS})
    return sums["loss"], sums


def split_microbatches(batch: Mapping, num_microbatches: int) -> dict:
    """[B, ...] -> [k, B/k, ...] with microbatch j holding rows j, j+k, j+2k, ...

    Strided rather than contiguous so that, with the batch sharded over devices in contiguous
    blocks, every microbatch still spreads evenly over all of them.
    """
    sizes = {k: v.shape[0] for k, v in batch.items()}
    bad = {k: n for k, n in sizes.items() if n % num_microbatches}
    if bad:
        raise ValueError(f"batch size {bad} is not divisible by num_microbatches={num_microbatches}; "
                         "pick a batch size that is a multiple of it")
    return {k: jnp.swapaxes(jnp.reshape(v, (v.shape[0] // num_microbatches, num_microbatches) + v.shape[1:]), 0, 1)
            for k, v in batch.items()}


def train_step(model, optimizer, state: TrainState, batch: Mapping, *, num_microbatches: int = 1,
               z_loss: float = 0.0, label_smoothing: float = 0.0, dropout: bool = True,
               loss_normalizing_factor: LossNormalizingFactor = NUM_REAL_TARGET_TOKENS, fused_loss: bool = True):
    """One optimizer update -> (new_state, metrics). `optimizer`: an `Optimizer` or optax transformation.

    `fused_loss` projects to the vocabulary inside the loss, chunk by chunk (training/fused_loss.py);
    False materialises the full logits first (same values, more memory and time)."""
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    step_rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.grad(functools.partial(_loss_sums, model, z_loss=z_loss, label_smoothing=label_smoothing,
                                         dropout=dropout, fused_loss=fused_loss), has_aux=True)

    if num_microbatches <= 1:
        grads, sums = grad_fn(state.params, batch, step_rng)
    else:
        def accumulate(carry, xs):
            index, micro = xs
            grads, sums = grad_fn(state.params, micro, jax.random.fold_in(step_rng, index))
            add = lambda a, b: a + b.astype(a.dtype)  # noqa: E731
            return jax.tree_util.tree_map(add, carry, (grads, sums)), None

        zeros = (jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params),
                 {k: jnp.zeros((), jnp.float32) for k in _sum_keys(model)})
        micro = split_microbatches(batch, num_microbatches)
        (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(num_microbatches), micro))

    norm = loss_normalizer(sums, loss_normalizing_factor)
    grads = jax.tree_util.tree_map(lambda g, p: (g / norm).astype(p.dtype), grads, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    loss, grad_norm = sums["loss"] / norm, optax.global_norm(grads)
    metrics = {"loss": loss, "nll_sum": sums["nll_sum"], "z_loss": sums["z_loss"], "tokens": sums["tokens"],
               "correct": sums["correct"], "grad_norm": grad_norm,
               "is_finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
    for k in _sum_keys(model)[len(SUM_KEYS):]:  # MoE: token-weighted means of the per-layer values
        metrics[k] = sums[k] / jnp.maximum(sums["tokens"], 1.0)
    schedule = getattr(optimizer, "schedule", None)
    if schedule is not None:
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(model, params, batch: Mapping) -> dict:
    """Sums for perplexity and accuracy: nll_sum, tokens, correct (no z-loss, no smoothing, no dropout)."""
    logits = model.compute_logits({"params": params}, batch)
    targets, weights = targets_and_weights(model, batch)
    sums = cross_entropy_sums(logits, targets, weights)
    return {k: sums[k] for k in ("nll_sum", "tokens", "correct")}


@gin.configurable(denylist=["model", "optimizer"])
def make_train_step(model, optimizer, *, num_microbatches: int = 1, z_loss: float = 0.0,
                    label_smoothing: float = 0.0, dropout: bool = True,
                    loss_normalizing_factor: LossNormalizingFactor = NUM_REAL_TARGET_TOKENS,
                    fused_loss: bool = True, **jit_kwargs):
    """jit(state, batch) -> (state, metrics), the state donated; extra kwargs (shardings) go to jit."""
    fn = functools.partial(train_step, model, optimizer, num_microbatches=num_microbatches, z_loss=z_loss,
                           label_smoothing=label_smoothing, dropout=dropout,
                           loss_normalizing_factor=loss_normalizing_factor, fused_loss=fused_loss)
    return jax.jit(fn, donate_argnums=(0,), **jit_kwargs)


def make_eval_step(model, **jit_kwargs):
    """jit(params, batch) -> metric sums."""
    return jax.jit(functools.partial(eval_step, model), **jit_kwargs)
