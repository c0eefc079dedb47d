"""Policy-gradient RLHF objectives: GRPO (group-relative advantages) and PPO (value head + GAE).

The formulas are TRL's (`GRPOTrainer`, `PPOTrainer`, v0.2x-1.x); the loop that makes rollouts and
calls these lives in `inference/rlhf.py`. Everything here is a pure function of arrays, so
`tests/objectives/test_rl.py` recomputes each one in float64 numpy.

Layout: a rollout is an ordinary (unpacked) batch of the model's features built with
`model.scoring_batch(prompts, completions)`: each row is prompt + sampled completion, the loss
weights (`targets_and_weights`) are 1 exactly on the completion's target tokens (the `mask` below),
so per-token arrays are [rows, L] aligned with the targets. A group is G consecutive rows sampled
from one prompt. Features the loop adds: `old_logps`, `ref_logps` [rows, L] (the sampling policy's
and the frozen reference's log-probabilities of the targets, temperature-scaled as TRL does),
`advantages` ([rows] for GRPO, [rows, L] for PPO) and, for PPO, `values` and `returns` [rows, L].

- GRPO advantages: (r - mean_group) / (std_group + eps), torch's unbiased std (TRL
  `scale_rewards=True`), or r - mean_group (`scale_rewards=False`, Dr. GRPO).
- GRPO loss per token: -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta k3, where
  ratio = exp(logp - old_logp) and k3 = exp(ref - logp) - (ref - logp) - 1 (TRL's KL estimator);
  reduced as TRL's `loss_type`: "grpo" (per-sequence mean, then mean over sequences), "bnpo" (mean
  over all completion tokens), "dr_grpo" (sum / (rows x max_completion_length)).
- PPO: per-token reward -kl_coef KL(t) (k1: logp - ref, or k3) plus the sequence's score at its
  last completion token; GAE(gamma, lambda) with the value past the last token = 0; returns =
  advantages + values; advantages whitened over the completion tokens (TRL). Loss: the clipped
  surrogate max(-A ratio, -A clip(ratio, 1 +- cliprange)) plus vf_coef x 0.5 max((v - R)^2,
  (clip(v, v_old +- cliprange_value) - R)^2), both means over completion tokens.
  TRL's PPOTrainer places the score one token after the last (a quirk of its truncation); here it is
  at the last completion token, the textbook placement.

Sums (objectives/metrics.py): `loss` and its normaliser `tokens` (sequences for "grpo" and
"dr_grpo", completion tokens for "bnpo" and PPO), so the train step's microbatches add up; the
per-token metric sums `kl`, `entropy`, `clipped` (and PPO's `value_loss`, `value_clipped`,
`approx_kl`, `policy_loss`) go with `completion_tokens`; the loop divides them by it.
"""

from __future__ import annotations

import dataclasses
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from t5x_like.errors import UserError

KL_ESTIMATORS = ("k1", "k3")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
POLICY, VALUE_HEAD = "policy", "value_head"
OLD_LOGPS, REF_LOGPS, ADVANTAGES, VALUES, RETURNS = "old_logps", "ref_logps", "advantages", "values", "returns"


class RLConfigError(UserError):
    """An RL objective setting that cannot work; the message names the fix."""


# ---------------------------------------------------------------- per-token quantities


def token_logps_and_entropy(logits, targets, temperature: float = 1.0):
    """(log-probability of each target [rows, L], entropy of each position's distribution [rows, L])
    under softmax(logits / temperature), the distribution the sampler drew from."""
    logits = logits.astype(jnp.float32) / jnp.float32(temperature)
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


def kl_estimate(logp, ref_logp, estimator: str = "k3"):
    """Per-token estimate of KL(policy || reference) from sampled tokens: k1 = logp - ref_logp,
    k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's unbiased, non-negative estimator; TRL GRPO)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        d = ref_logp - logp
        return jnp.exp(d) - d - 1.0
    raise RLConfigError(f"kl_estimator={estimator!r}; use one of {', '.join(KL_ESTIMATORS)}")


# ---------------------------------------------------------------- advantages


def grpo_advantages(rewards, group_size: int, scale_rewards: bool = True, eps: float = 1e-4):
    """[rows] advantages of rows grouped G consecutive per prompt (TRL GRPOTrainer)."""
    grouped = rewards.reshape(-1, group_size)
    centred = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    if scale_rewards:
        std = jnp.std(grouped, axis=1, keepdims=True, ddof=1) if group_size > 1 else jnp.zeros_like(centred)
        centred = centred / (std + eps)
    return centred.reshape(-1)


def group_reward_std(rewards, group_size: int):
    """Mean over groups of the unbiased std of their rewards (TRL's `reward_std`)."""
    if group_size < 2:
        return jnp.float32(0.0)
    return jnp.mean(jnp.std(rewards.reshape(-1, group_size), axis=1, ddof=1))


def last_token_mask(mask):
    """1 at each row's last weighted position, else 0 (all-zero rows stay zero)."""
    positions = jnp.arange(mask.shape[1])[None]
    last = jnp.max(jnp.where(mask > 0, positions, -1), axis=1, keepdims=True)
    return ((positions == last) & (mask > 0)).astype(jnp.float32)


def ppo_token_rewards(scores, logp, ref_logp, mask, kl_coef: float, estimator: str = "k1"):
    """Per-token rewards [rows, L]: -kl_coef KL per completion token, plus `scores` [rows] at the
    last one (TRL PPOTrainer's reward shaping)."""
    kl = kl_estimate(logp, ref_logp, estimator) * mask
    return -kl_coef * kl + scores[:, None] * last_token_mask(mask)


def gae(rewards, values, mask, gamma: float, lam: float):
    """(advantages, returns) [rows, L] by generalised advantage estimation over the completion
    tokens; the value after the last one (and every masked value) counts as 0."""
    rewards, values = rewards * mask, values * mask

    def back(carry, x):
        next_value, next_adv = carry
        r, v, m = x
        delta = r + gamma * next_value - v
        adv = (delta + gamma * lam * next_adv) * m
        return (v, adv), adv

    zeros = jnp.zeros(rewards.shape[0], rewards.dtype)
    xs = (rewards.T[::-1], values.T[::-1], mask.T[::-1])
    _, adv = jax.lax.scan(back, (zeros, zeros), xs)
    advantages = adv[::-1].T
    return advantages, (advantages + values) * mask


def masked_whiten(x, mask, shift_mean: bool = True):
    """(x - mean) / sqrt(var + 1e-8) over the masked entries, unbiased var (TRL `masked_whiten`)."""
    n = jnp.sum(mask)
    mean = jnp.sum(x * mask) / n
    var = jnp.sum(((x - mean) * mask) ** 2) / (n - 1)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


# ---------------------------------------------------------------- losses


def clipped_surrogate(logp, old_logp, advantages, eps_low: float, eps_high: float):
    """(per-token loss -min(ratio A, clip(ratio) A), whether the clip was active, ratio)."""
    ratio = jnp.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1 - eps_low, 1 + eps_high) * advantages
    return -jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(jnp.float32), ratio


def clipped_value_loss(values, old_values, returns, cliprange_value: float):
    """(per-token 0.5 max((v - R)^2, (clip(v, v_old +- c) - R)^2), whether the clipped term won)."""
    v_clipped = jnp.clip(values, old_values - cliprange_value, old_values + cliprange_value)
    a, b = (values - returns) ** 2, (v_clipped - returns) ** 2
    return 0.5 * jnp.maximum(a, b), (b > a).astype(jnp.float32)


class ValueHead(nn.Module):
    """d_model -> 1 scalar value per position, read from the policy's final hidden states (TRL's
    `AutoModelForCausalLMWithValueHead`); zero-initialised so the first values are 0."""

    @nn.compact
    def __call__(self, hidden):
        dense = nn.Dense(1, kernel_init=nn.initializers.zeros, dtype=jnp.float32, name="dense")
        return dense(hidden.astype(jnp.float32))[..., 0]


def init_value_head(rng, d_model: int):
    return ValueHead().init(rng, jnp.zeros((1, 1, d_model), jnp.float32))["params"]


def logits_from_hidden(head, hidden):
    """The projection an `OutputHead` describes (objectives/fused_cross_entropy.py), in float32."""
    h = hidden.astype(jnp.float32)
    if head.scale is not None:
        h = h * head.scale
    w = jnp.asarray(head.weight, jnp.float32)
    logits = h @ (w.T if head.vocab_major else w)
    return logits if head.bias is None else logits + head.bias.astype(jnp.float32)


def _policy_outputs(model, params, batch, temperature, dropout_rng, with_values: bool):
    """(logp, entropy, values or None, mask, aux) of the rows under params[POLICY] (and the value head)."""
    targets, mask = model.targets_and_weights(batch)
    if with_values:
        hidden, aux = model.forward(params[POLICY], batch, dropout_rng=dropout_rng, return_hidden=True)
        logits = logits_from_hidden(model.output_head(params[POLICY]), hidden)
        values = ValueHead().apply({"params": params[VALUE_HEAD]}, hidden)
    else:
        logits, aux = model.forward(params[POLICY], batch, dropout_rng=dropout_rng)
        values = None
    logp, entropy = token_logps_and_entropy(logits, targets, temperature)
    return logp, entropy, values, mask, aux


def policy_stats(model, params, batch, temperature: float = 1.0, with_values: bool = False):
    """(logp, values or None) [rows, L] without dropout: the old log-probs and values of a rollout."""
    logp, _, values, _, _ = _policy_outputs(model, params, batch, temperature, None, with_values)
    return logp, values


def _feature(batch, name):
    if name not in batch:
        raise RLConfigError(f"an RL batch needs the {name!r} feature (inference/rlhf.py adds it); got {sorted(batch)}")
    return jnp.asarray(batch[name], jnp.float32)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class GRPOLoss:
    """TRL GRPOTrainer's loss (module docstring). `beta`: weight of the k3 KL to the reference
    (TRL's default 0.0 since v0.18; 0.04 before), `epsilon_low` / `epsilon_high` the clip range
    (DAPO's asymmetric clip when they differ), `scale_rewards`, `loss_type`, `temperature` as TRL."""

    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    scale_rewards: bool = True
    loss_type: str = "grpo"
    temperature: float = 1.0
    uses_value_head = False

    def __post_init__(self):
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise RLConfigError(f"GRPOLoss.loss_type={self.loss_type!r}; use one of {', '.join(GRPO_LOSS_TYPES)}")
        if self.beta < 0 or not self.temperature > 0 or self.epsilon_low < 0 or self.epsilon_high < 0:
            raise RLConfigError("GRPOLoss needs beta >= 0, temperature > 0 and epsilon_low/high >= 0; got "
                                f"beta={self.beta}, temperature={self.temperature}, "
                                f"epsilon=({self.epsilon_low}, {self.epsilon_high})")

    def advantages(self, rewards, group_size: int):
        return grpo_advantages(rewards, group_size, self.scale_rewards)

    def __call__(self, model, params, batch, dropout_rng=None) -> dict:
        logp, entropy, _, mask, aux = _policy_outputs(model, params, batch, self.temperature, dropout_rng, False)
        adv = _feature(batch, ADVANTAGES)[:, None]
        per_token, clipped, _ = clipped_surrogate(logp, _feature(batch, OLD_LOGPS), adv, self.epsilon_low,
                                                  self.epsilon_high)
        kl = kl_estimate(logp, _feature(batch, REF_LOGPS), "k3")
        if self.beta:
            per_token = per_token + self.beta * kl
        row_tokens = jnp.sum(mask, axis=1)
        valid = (row_tokens > 0).astype(jnp.float32)
        if self.loss_type == "grpo":
            loss, tokens = jnp.sum(jnp.sum(per_token * mask, axis=1) / jnp.maximum(row_tokens, 1.0)), jnp.sum(valid)
        elif self.loss_type == "bnpo":
            loss, tokens = jnp.sum(per_token * mask), jnp.sum(mask)
        else:  # dr_grpo: a constant normaliser per sequence, the completion budget
            loss, tokens = jnp.sum(per_token * mask) / mask.shape[1], jnp.sum(valid)
        stop = jax.lax.stop_gradient
        sums = {"loss": loss, "tokens": tokens, "completion_tokens": jnp.sum(mask),
                "kl": jnp.sum(stop(kl) * mask), "entropy": jnp.sum(stop(entropy) * mask),
                "clipped": jnp.sum(clipped * mask)}
        return model.fold_aux_losses(sums, aux)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PPOLoss:
    """TRL PPOTrainer's objective (module docstring): `kl_coef` (TRL 0.05), `kl_estimator` ("k1" as
    TRL's default, or "k3"), `gamma` (1.0), `lam` (0.95), `cliprange` (0.2), `cliprange_value` (0.2),
    `vf_coef` (0.1), `whiten_advantages` (TRL: always), `temperature`."""

    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    temperature: float = 1.0
    uses_value_head = True

    def __post_init__(self):
        if self.kl_estimator not in KL_ESTIMATORS:
            raise RLConfigError(f"PPOLoss.kl_estimator={self.kl_estimator!r}; use one of {', '.join(KL_ESTIMATORS)}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise RLConfigError(f"PPOLoss.gamma={self.gamma} and lam={self.lam} must be in [0, 1]")
        if self.kl_coef < 0 or self.cliprange < 0 or self.cliprange_value < 0 or self.vf_coef < 0 or \
                not self.temperature > 0:
            raise RLConfigError("PPOLoss needs kl_coef, cliprange, cliprange_value, vf_coef >= 0 and temperature > 0")

    def advantages_and_returns(self, scores, logp, ref_logp, values, mask):
        """(advantages, returns, per-token rewards) [rows, L] of a rollout."""
        rewards = ppo_token_rewards(scores, logp, ref_logp, mask, self.kl_coef, self.kl_estimator)
        adv, returns = gae(rewards, values, mask, self.gamma, self.lam)
        if self.whiten_advantages:
            adv = masked_whiten(adv, mask)
        return adv, returns, rewards

    def __call__(self, model, params, batch, dropout_rng=None) -> dict:
        logp, entropy, values, mask, aux = _policy_outputs(model, params, batch, self.temperature, dropout_rng, True)
        adv = _feature(batch, ADVANTAGES)
        pg, clipped, ratio = clipped_surrogate(logp, _feature(batch, OLD_LOGPS), adv, self.cliprange, self.cliprange)
        vf, vf_clipped = clipped_value_loss(values, _feature(batch, VALUES), _feature(batch, RETURNS),
                                            self.cliprange_value)
        total = lambda x: jnp.sum(x * mask)  # noqa: E731
        stop = jax.lax.stop_gradient
        log_ratio = stop(logp - _feature(batch, OLD_LOGPS))
        sums = {"loss": total(pg + self.vf_coef * vf), "tokens": jnp.sum(mask), "completion_tokens": jnp.sum(mask),
                "policy_loss": total(stop(pg)), "value_loss": total(stop(vf)), "value_clipped": total(vf_clipped),
                "clipped": total(clipped), "approx_kl": total(0.5 * log_ratio ** 2),
                "kl": total(stop(kl_estimate(logp, _feature(batch, REF_LOGPS), self.kl_estimator))),
                "entropy": total(stop(entropy)), "ratio": total(stop(ratio))}
        return model.fold_aux_losses(sums, aux)

