"""Squared-error regression: the loss of a model with one output per target (a classifier head
with `num_classes=1`, models/encoder_classifier.py), as sums (objectives/metrics.py).

Bind it in place of the default cross-entropy: `train.loss = @MeanSquaredErrorLoss()` (after the
run file, e.g. in the model's gin file). `metrics.summarize` then reports `loss` and `squared_error`
as the mean squared error per weighted target (per example for a classifier).
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp


def squared_error_sums(predictions, targets, weights) -> dict:
    """Weighted sums of (prediction - target)^2: `loss` (differentiable), `squared_error` (the same
    value, a statistic) and `tokens` (the total weight)."""
    weights = jnp.asarray(weights, jnp.float32)
    error = jnp.square(jnp.asarray(predictions, jnp.float32) - jnp.asarray(targets, jnp.float32))
    total = jnp.sum(error * weights)
    return {"loss": total, "squared_error": jax.lax.stop_gradient(total), "tokens": jnp.sum(weights)}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeanSquaredErrorLoss:
    """The model's single output per target position ([batch, length, 1] from `forward`) against
    float targets (`targets_and_weights`); MoE auxiliary losses folded in as for any loss."""

    def __call__(self, model, params, batch, dropout_rng=None) -> dict:
        targets, weights = model.targets_and_weights(batch)
        outputs, aux = model.forward(params, batch, dropout_rng=dropout_rng)
        if outputs.shape[-1] != 1:
            raise ValueError(f"MeanSquaredErrorLoss needs one output per target, but {type(model).__name__} "
                             f"gives {outputs.shape[-1]} (a classifier regresses with num_classes=1); use "
                             "CrossEntropyLoss for classification")
        return model.fold_aux_losses(squared_error_sums(outputs[..., 0], targets, weights), aux)
