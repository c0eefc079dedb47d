"""Token-level cross-entropy with T5X-style label smoothing and z-loss, as sums (the default objective).

Everything is returned as sums over weighted tokens so that microbatches, hosts and eval batches
can be added up before dividing once; the training loss is normalised afterwards by
`loss_normalizer`. Perplexity comes from `nll_sum / tokens`, which never includes label smoothing
or z-loss (they are regularisers and are reported on their own).
"""

from __future__ import annotations

from typing import Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.objectives.metrics import SUM_KEYS

LossNormalizingFactor = Union[str, float, None]
NUM_REAL_TARGET_TOKENS = "num_real_target_tokens"


def smoothing_constants(vocab: int, label_smoothing: float) -> tuple[float, float, float]:
    """(confidence, low, entropy) of the smoothed target: 1 - ls on the target, ls / (V - 1) on
    every other id; its entropy is subtracted so that a perfect prediction still scores 0."""
    confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
    entropy = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
    return confidence, low, entropy


def token_losses(logits, targets, *, label_smoothing: float = 0.0, z_loss: float = 0.0):
    """Per-token (training loss, nll, z-loss term).

    Smoothing as in `smoothing_constants`; the soft cross-entropy is written via sum(log_probs)
    so no [.., V] one-hot is materialised.
    """
    logits = jnp.asarray(logits, jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - log_z[..., None]
    nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    ce = nll
    if label_smoothing:
        confidence, low, entropy = smoothing_constants(logits.shape[-1], label_smoothing)
        ce = (confidence - low) * nll - low * jnp.sum(log_probs, axis=-1) - entropy
    z = z_loss * jnp.square(log_z)
    return ce + z, nll, z


def cross_entropy_sums(logits, targets, weights=None, *, label_smoothing: float = 0.0,
                       z_loss: float = 0.0) -> dict:
    """Weighted sums: loss (smoothed CE + z-loss), nll_sum, z_loss, tokens, correct."""
    weights = (targets > 0) if weights is None else weights
    weights = jnp.asarray(weights, jnp.float32)
    loss, nll, z = token_losses(logits, targets, label_smoothing=label_smoothing, z_loss=z_loss)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {"loss": jnp.sum(loss * weights), "nll_sum": jnp.sum(nll * weights), "z_loss": jnp.sum(z * weights),
            "tokens": jnp.sum(weights), "correct": jnp.sum(correct * weights)}


def loss_normalizer(sums: Mapping, loss_normalizing_factor: LossNormalizingFactor = NUM_REAL_TARGET_TOKENS):
    """What the summed loss is divided by.

    "num_real_target_tokens" (default): the batch's total loss weight, i.e. the mean per weighted
    token over the whole (global, all-microbatch) batch. A float: a constant, as T5X uses to mimic
    Mesh TensorFlow. None: no normalisation (plain sum). All three are linear in the per-token
    losses, so microbatch sums add up to exactly the full-batch value.
    """
    if loss_normalizing_factor is None:
        return jnp.float32(1.0)
    if isinstance(loss_normalizing_factor, str):
        if loss_normalizing_factor.lower() != NUM_REAL_TARGET_TOKENS:
            raise ValueError(f"loss_normalizing_factor={loss_normalizing_factor!r}; use "
                             f"{NUM_REAL_TARGET_TOKENS!r}, a positive number, or None")
        tokens = sums["tokens"]
        return jnp.where(tokens > 0, tokens, 1.0)
    if loss_normalizing_factor <= 0:
        raise ValueError(f"loss_normalizing_factor={loss_normalizing_factor} must be positive")
    return jnp.float32(loss_normalizing_factor)

