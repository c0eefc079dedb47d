"""Direct preference optimisation (DPO and its IPO / hinge variants) as a loss hook.

`train.loss = @DPOLoss()` trains a model on preference pairs with the formulas of TRL's
`DPOTrainer`; the train step, the trainer and the metric plumbing stay as they are.

Batch layout: an ordinary (unpacked) batch of the model's features with 2N rows; row 2i is
prompt + chosen completion, row 2i+1 the same prompt + the rejected completion, and the loss
weights (the model's `targets_and_weights`) are 1 exactly on the completion's target tokens, 0 on
the prompt and the padding. A row's log-probability is the weighted sum of its target tokens'
log-probabilities (what `BaseModel.score` returns). All-zero rows (the padding evaluation adds to a
short last batch) contribute nothing: a pair counts iff its two rows carry some weight.
With `reference="features"` the batch also holds `reference_logps` [2N] float32: the reference
model's row log-probabilities, computed once beforehand with `reference_logps(model, params, batch)`.

Sums (objectives/metrics.py), with `tokens` = the number of pairs so that `summarize` and the
default loss normaliser give per-pair means, as TRL logs them:
`loss`, `tokens`, `rewards/chosen`, `rewards/rejected` (beta x the policy-reference log-ratio),
`rewards/accuracies` (chosen reward > rejected reward), `rewards/margins`, `logps/chosen`,
`logps/rejected` (summed completion log-probabilities of the policy).

Formulas (TRL's `DPOTrainer`, v1.x `_compute_loss`; z = (pi_c - pi_r) - (ref_c - ref_r)):
- sigmoid: -logsigmoid(beta z) (1 - ls) - logsigmoid(-beta z) ls (conservative DPO label
  smoothing `ls`, as TRL's sigmoid loss had it up to v0.2x; ls = 0 is TRL's current sigmoid loss);
- ipo: (z' - 1 / (2 beta))^2 where z' uses each row's log-ratio divided by its completion length
  (TRL's length-normalised IPO); rewards and logps stay summed, as TRL logs them;
- hinge: relu(1 - beta z).
With `rpo_alpha` > 0 (RPO, Pang et al. 2024; TRL's `rpo_alpha`) each pair adds rpo_alpha x the
chosen completion's negative log-likelihood per token (logged as `nll_loss`), which keeps the
chosen completions likely while the pair's margin grows. TRL averages that NLL over all chosen tokens
of the batch; here it is per pair (the same when completions have equal lengths), so microbatches
add up exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import gin
import jax
import jax.numpy as jnp

from t5x_like.errors import UserError
from t5x_like.layers.lora import LORA_B

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
REFERENCES = ("adapters_off", "features")
REFERENCE_FEATURE = "reference_logps"


class PreferenceError(UserError):
    """A preference-loss setting or batch that cannot work; the message names the fix."""


def _row_logps(model, params, batch: Mapping, dropout_rng=None):
    """(summed log-probability of each row's weighted targets [rows], weight per row [rows], aux)."""
    targets, weights = model.targets_and_weights(batch)
    logits, aux = model.forward(params, batch, dropout_rng=dropout_rng)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(picked * weights, axis=-1), jnp.sum(weights, axis=-1), aux


def reference_logps(model, params, batch: Mapping) -> jax.Array:
    """The `reference_logps` feature [rows] of a preference batch: each row's summed completion
    log-probability under `params` (the frozen reference), without dropout."""
    return _row_logps(model, params, batch)[0]


def adapters_off(params):
    """`params` with every LoRA `lora_b` replaced by zeros (the base model), and how many there were."""
    count = 0

    def walk(tree):
        nonlocal count
        if not hasattr(tree, "items"):
            return tree
        out = {}
        for k, v in tree.items():
            if k == LORA_B and not hasattr(v, "items"):
                out[k] = jnp.zeros_like(v)
                count += 1
            else:
                out[k] = walk(v)
        return out

    return walk(params), count


def _pairs(x):
    """[2N] -> ([N] chosen, [N] rejected)."""
    return x[0::2], x[1::2]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DPOLoss:
    """DPO / IPO / hinge preference loss over a batch of (chosen, rejected) row pairs (see the
    module docstring for the layout, the formulas and the sums).

    `reference`: "adapters_off" (LoRA-DPO: the reference is the same params with every adapter's
    `lora_b` zeroed, i.e. the base model, under stop_gradient and without dropout; no second copy of
    the weights) or "features" (the batch's precomputed `reference_logps`).
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: str = "adapters_off"
    rpo_alpha: float = 0.0
    # A (chosen, rejected) pair is two consecutive rows: microbatches keep pairs whole (steps.py).
    rows_per_example = 2

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise PreferenceError(f"DPOLoss.loss_type={self.loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
        if self.reference not in REFERENCES:
            raise PreferenceError(f"DPOLoss.reference={self.reference!r}; use one of {', '.join(REFERENCES)}")
        if not self.beta > 0:
            raise PreferenceError(f"DPOLoss.beta={self.beta} must be positive (TRL's default is 0.1)")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise PreferenceError(f"DPOLoss.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if not self.rpo_alpha >= 0:
            raise PreferenceError(f"DPOLoss.rpo_alpha={self.rpo_alpha} must be >= 0 (0: plain DPO; the RPO paper uses 1)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise PreferenceError(f"DPOLoss.label_smoothing applies to loss_type='sigmoid' only; set it to 0 for "
                                  f"{self.loss_type!r}")

    def _reference(self, model, params, batch: Mapping):
        if self.reference == "features":
            if REFERENCE_FEATURE not in batch:
                raise PreferenceError(f"DPOLoss(reference='features') needs a {REFERENCE_FEATURE!r} feature [rows] "
                                      f"in the batch (compute it once with objectives.preference.reference_logps); "
                                      f"got {sorted(batch)}")
            return jnp.asarray(batch[REFERENCE_FEATURE], jnp.float32)
        base, count = adapters_off(params)
        if count == 0:
            raise PreferenceError("DPOLoss(reference='adapters_off') needs a model with LoRA adapters (set the "
                                  "model's lora=@LoraConfig()); without them use reference='features' with "
                                  "precomputed reference_logps")
        return jax.lax.stop_gradient(_row_logps(model, jax.lax.stop_gradient(base), batch)[0])

    def eval_sums(self, model, params, batch) -> dict:
        """Held-out evaluation reports the DPO sums themselves (rewards/accuracies, margins, ...), not
        the completion perplexity, which DPO does not aim to lower."""
        return self(model, params, batch)

    def __call__(self, model, params, batch, dropout_rng=None) -> dict:
        ref = self._reference(model, params, batch)
        logps, lengths, aux = _row_logps(model, params, batch, dropout_rng)
        if logps.shape[0] % 2:
            raise PreferenceError(f"a preference batch has an even number of rows (chosen, rejected, ...); got "
                                  f"{logps.shape[0]}")
        if ref.shape != logps.shape:
            raise PreferenceError(f"{REFERENCE_FEATURE} has shape {tuple(ref.shape)}; the batch has "
                                  f"{logps.shape[0]} rows, one value each")
        pi_c, pi_r = _pairs(logps)
        ref_c, ref_r = _pairs(ref)
        len_c, len_r = _pairs(lengths)
        valid = ((len_c + len_r) > 0).astype(jnp.float32)
        chosen_ratio, rejected_ratio = pi_c - ref_c, pi_r - ref_r
        z = chosen_ratio - rejected_ratio
        beta, ls = self.beta, self.label_smoothing
        if self.loss_type == "sigmoid":
            per_pair = -jax.nn.log_sigmoid(beta * z) * (1 - ls) - jax.nn.log_sigmoid(-beta * z) * ls
        elif self.loss_type == "ipo":
            z_avg = chosen_ratio / jnp.maximum(len_c, 1.0) - rejected_ratio / jnp.maximum(len_r, 1.0)
            per_pair = (z_avg - 1 / (2 * beta)) ** 2
        else:  # hinge
            per_pair = jax.nn.relu(1 - beta * z)
        nll = -pi_c / jnp.maximum(len_c, 1.0)
        if self.rpo_alpha:
            per_pair = per_pair + self.rpo_alpha * nll
        chosen_rewards = jax.lax.stop_gradient(beta * chosen_ratio)
        rejected_rewards = jax.lax.stop_gradient(beta * rejected_ratio)
        total = lambda x: jnp.sum(valid * x)  # noqa: E731
        sums = {
            "loss": total(per_pair),
            "tokens": jnp.sum(valid),
            "rewards/chosen": total(chosen_rewards),
            "rewards/rejected": total(rejected_rewards),
            "rewards/accuracies": total((chosen_rewards > rejected_rewards).astype(jnp.float32)),
            "rewards/margins": total(chosen_rewards - rejected_rewards),
            "logps/chosen": total(jax.lax.stop_gradient(pi_c)),
            "logps/rejected": total(jax.lax.stop_gradient(pi_r)),
        }
        if self.rpo_alpha:
            sums["nll_loss"] = total(jax.lax.stop_gradient(nll))
        return model.fold_aux_losses(sums, aux)
