"""Knowledge distillation (Hinton et al. 2015) through the loss hook: a student learns the teacher's
per-token distribution as well as the labels (a speculative-decoding draft learns to agree with its
target, which is what its acceptance rate measures).

Per weighted target token, with p_T = softmax(teacher_logits / T) and q_T = softmax(student_logits / T):

    loss = (1 - alpha) * CE(labels, q_1) + alpha * T^2 * KL(p_T || q_T)  (+ z-loss on the student)

T^2 keeps the soft term's gradient scale independent of T (Hinton et al.). The teacher's logits come
from the batch (feature `teacher_logits` [rows, length, vocab]), added on device by a frozen teacher
(training/reference.py `FrozenTeacher`: its own checkpoint and config, e.g. the target's), so the
loss never holds a second model. Sums (objectives/metrics.py): `loss`, `nll_sum` (perplexity of the
labels), `z_loss`, `correct`, `kl` (mean KL at T) and `teacher_match` (how often the student's
argmax is the teacher's: the greedy acceptance rate of a draft, token by token).
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

from t5x_like.errors import UserError
from t5x_like.objectives.cross_entropy import cross_entropy_sums

TEACHER_FEATURE = "teacher_logits"


class DistillationError(UserError):
    """A distillation setting or batch that cannot work; the message says what to change."""


def teacher_logits(teacher, params, batch, dtype=jnp.float32):
    """The teacher's logits [rows, length, vocab] of `batch` (no dropout, no gradient)."""
    logits, _ = teacher.forward(params, batch)
    return jax.lax.stop_gradient(logits).astype(dtype)


def distillation_token_terms(student_logits, teacher_logits_, temperature: float):
    """Per-token (KL(p_T || q_T), student argmax == teacher argmax), both [rows, length]."""
    s = jnp.asarray(student_logits, jnp.float32) / temperature
    t = jnp.asarray(teacher_logits_, jnp.float32) / temperature
    t_logp = jax.nn.log_softmax(t, axis=-1)
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - jax.nn.log_softmax(s, axis=-1)), axis=-1)
    match = jnp.argmax(student_logits, axis=-1) == jnp.argmax(teacher_logits_, axis=-1)
    return kl, match.astype(jnp.float32)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DistillationLoss:
    """`alpha` weighs the teacher's soft labels (1: distillation alone, 0: plain cross-entropy);
    `temperature` softens both distributions; `z_loss` as CrossEntropyLoss's (on the student)."""

    alpha: float = 0.5
    temperature: float = 1.0
    z_loss: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise DistillationError(f"DistillationLoss.alpha={self.alpha} must be in [0, 1] (the soft labels' weight)")
        if not self.temperature > 0:
            raise DistillationError(f"DistillationLoss.temperature={self.temperature} must be > 0")

    def __call__(self, model, params, batch, dropout_rng=None) -> dict:
        if TEACHER_FEATURE not in batch:
            raise DistillationError(f"DistillationLoss needs the batch feature {TEACHER_FEATURE!r}: set "
                                    "train.reference = @FrozenTeacher() (gin/runs/draft_distill.gin)")
        targets, weights = model.targets_and_weights(batch)
        logits, aux = model.forward(params, batch, dropout_rng=dropout_rng)
        teacher = batch[TEACHER_FEATURE]
        if teacher.shape != logits.shape:
            raise DistillationError(f"the teacher's logits {tuple(teacher.shape)} differ from the student's "
                                    f"{tuple(logits.shape)}; teacher and student need the same vocabulary size")
        hard = cross_entropy_sums(logits, targets, weights, z_loss=self.z_loss)
        kl, match = distillation_token_terms(logits, teacher, self.temperature)
        kl_sum = jnp.sum(kl * weights)
        loss = (1.0 - self.alpha) * hard["nll_sum"] + self.alpha * self.temperature ** 2 * kl_sum + hard["z_loss"]
        sums = dict(hard, loss=loss, kl=kl_sum, teacher_match=jnp.sum(match * weights))
        return model.fold_aux_losses(sums, aux)

    def eval_sums(self, model, params, batch) -> dict:
        """Held-out perplexity and accuracy of the labels plus `kl` and `teacher_match` (no dropout)."""
        sums = self(model, params, batch)
        return {k: sums[k] for k in ("nll_sum", "tokens", "correct", "kl", "teacher_match")}
