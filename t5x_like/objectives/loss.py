"""The loss hook: what a train step minimises, chosen by the run (`train.loss = @CrossEntropyLoss()`).

A loss is any callable `loss(model, params, batch, dropout_rng) -> sums`: a dict of sums over the
batch (objectives/metrics.py) with a differentiable `loss` sum and a `tokens` total that the step
divides by (`loss_normalizer`). It reads the batch only through the model's contract
(`targets_and_weights`, `forward`, `output_head`, `fold_aux_losses`, `score`, ...), so one loss
works for every family, and a new objective (preference, reward-model, distillation) is one
class here plus a gin binding: the train step and the trainer stay as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Protocol

import gin

from t5x_like.objectives.cross_entropy import cross_entropy_sums
from t5x_like.objectives.fused_cross_entropy import fused_cross_entropy_sums


class Loss(Protocol):
    def __call__(self, model, params, batch, dropout_rng: Optional["jax.Array"] = None) -> dict:  # noqa: F821
        """Sums over the batch: a differentiable `loss` and the normaliser `tokens`, plus metrics."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CrossEntropyLoss:
    """Next-token / span / masked-token cross-entropy with T5X's z-loss and label smoothing.

    `fused` projects to the vocabulary inside the loss, chunk by chunk
    (objectives/fused_cross_entropy.py); False materialises the full logits first (same values,
    more memory and time). The model folds in its own auxiliary losses (MoE router losses).
    """

    z_loss: float = 0.0
    label_smoothing: float = 0.0
    fused: bool = True

    def __call__(self, model, params, batch, dropout_rng=None) -> dict:
        targets, weights = model.targets_and_weights(batch)
        kwargs = dict(z_loss=self.z_loss, label_smoothing=self.label_smoothing)
        if self.fused:
            hidden, aux = model.forward(params, batch, dropout_rng=dropout_rng, return_hidden=True)
            sums = fused_cross_entropy_sums(hidden, model.output_head(params), targets, weights, **kwargs)
        else:
            logits, aux = model.forward(params, batch, dropout_rng=dropout_rng)
            sums = cross_entropy_sums(logits, targets, weights, **kwargs)
        return model.fold_aux_losses(sums, aux)
