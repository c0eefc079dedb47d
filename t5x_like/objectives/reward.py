"""The Bradley–Terry pairwise loss of a reward model (RLHF), as a loss hook.

`train.loss = @PairwiseRewardLoss()` trains a model whose forward pass returns one scalar reward per
row, [rows, 1, 1] (models/reward_model.py's `RewardModel`), on preference pairs with the formula of
TRL's `RewardTrainer.compute_loss`:

    loss per pair = -logsigmoid(r_chosen - r_rejected - margin)
                    (+ center_rewards_coefficient * (r_chosen + r_rejected)^2, TRL's optional term)

Batch layout: DPOLoss's (objectives/preference.py), an unpacked batch of 2N rows, row 2i prompt +
chosen completion and row 2i+1 the same prompt + rejected completion (what
`data/tasks.PreferenceFeatureConverter` builds from a task of `data/preferences.register_preference_task`),
with the loss weights on the completion tokens. A pair counts iff its two rows carry some weight, so
all-zero padding rows contribute nothing.

Sums (objectives/metrics.py), with `tokens` = the number of pairs so that `summarize` and the
default loss normaliser give per-pair means, as TRL logs them: `loss`, `tokens`, `accuracy`
(r_chosen > r_rejected), `margin` (r_chosen - r_rejected), `rewards/chosen`, `rewards/rejected`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import gin
import jax
import jax.numpy as jnp

from t5x_like.errors import UserError


class RewardLossError(UserError):
    """A reward-loss setting or batch that cannot work; the message names the fix."""


def _rewards(model, params, batch: Mapping, dropout_rng=None):
    out, aux = model.forward(params, batch, dropout_rng=dropout_rng)
    if out.ndim != 3 or out.shape[1:] != (1, 1):
        raise RewardLossError(f"PairwiseRewardLoss needs a model returning one reward per row, [rows, 1, 1] "
                              f"(models/reward_model.RewardModel); {type(model).__name__} returned "
                              f"{tuple(out.shape)}")
    return out[:, 0, 0].astype(jnp.float32), aux


def score_completions(model, params, batch: Mapping) -> jax.Array:
    """The reward [rows] of each row of `batch` (e.g. `model.scoring_batch(prompts, completions)`
    or a preference batch) under `params`, without dropout."""
    return _rewards(model, params, batch)[0]


def pairwise_reward_sums(r_chosen, r_rejected, valid, margin: float = 0.0,
                         center_rewards_coefficient: float = 0.0) -> dict:
    """The sums of the module docstring from the rewards [N] of each pair and its validity [N]."""
    diff = r_chosen - r_rejected
    per_pair = -jax.nn.log_sigmoid(diff - margin)
    if center_rewards_coefficient:
        per_pair = per_pair + center_rewards_coefficient * (r_chosen + r_rejected) ** 2
    valid = valid.astype(jnp.float32)
    total = lambda x: jnp.sum(valid * x)  # noqa: E731
    stop = jax.lax.stop_gradient
    return {"loss": total(per_pair), "tokens": jnp.sum(valid),
            "accuracy": total((diff > 0).astype(jnp.float32)), "margin": total(stop(diff)),
            "rewards/chosen": total(stop(r_chosen)), "rewards/rejected": total(stop(r_rejected))}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PairwiseRewardLoss:
    """Bradley–Terry loss over (chosen, rejected) row pairs (see the module docstring).

    `margin`: a constant subtracted from r_chosen - r_rejected inside the log-sigmoid (TRL takes a
    per-example "margin" column; here one value for every pair). `center_rewards_coefficient`:
    TRL's optional penalty on (r_chosen + r_rejected)^2 that keeps rewards centred (0: off).
    """

    margin: float = 0.0
    center_rewards_coefficient: float = 0.0
    # A (chosen, rejected) pair is two consecutive rows: microbatches keep pairs whole (steps.py).
    rows_per_example = 2

    def __post_init__(self):
        if self.center_rewards_coefficient < 0:
            raise RewardLossError(f"PairwiseRewardLoss.center_rewards_coefficient={self.center_rewards_coefficient}"
                                  " must be >= 0 (TRL suggests 0.01)")

    def __call__(self, model, params, batch, dropout_rng=None) -> dict:
        rewards, aux = _rewards(model, params, batch, dropout_rng)
        if rewards.shape[0] % 2:
            raise RewardLossError(f"a preference batch has an even number of rows (chosen, rejected, ...); got "
                                  f"{rewards.shape[0]}")
        _, weights = model.targets_and_weights(batch)
        has_weight = jnp.sum(weights, axis=-1) > 0
        valid = has_weight[0::2] & has_weight[1::2]
        sums = pairwise_reward_sums(rewards[0::2], rewards[1::2], valid, self.margin,
                                    self.center_rewards_coefficient)
        return model.fold_aux_losses(sums, aux)
