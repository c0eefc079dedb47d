"""Optax optimisers with their learning-rate schedules, configurable from gin.

Each factory returns an `Optimizer` = (optax transformation, schedule); the schedule travels with
it so the train step can log the learning rate it used. `Optimizer` also has `init`/`update`, so it
can stand wherever an optax transformation is expected.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import gin
import jax
import jax.numpy as jnp
import optax

from t5x_like.errors import UserError

Schedule = Callable[[jax.Array], jax.Array]


class Optimizer(NamedTuple):
    tx: optax.GradientTransformation
    schedule: Optional[Schedule] = None

    def init(self, params):
        return self.tx.init(params)

    def update(self, updates, state, params=None):
        return self.tx.update(updates, state, params)


@gin.configurable
class OptimizerConfigError(UserError):
    """A schedule setting that cannot work; the message names the binding and the fix."""


def _check_steps(name: str, value, minimum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptimizerConfigError(f"{name}={value!r} must be an integer >= {minimum}{hint}")


def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> Schedule:
    """base / sqrt(max(step, warmup)): constant for `warmup_steps`, then 1/sqrt decay.

    T5's pre-training schedule is base 1.0 with 10k warmup, i.e. 0.01 for 10k steps. There is no
    ramp: Adafactor's relative step sizes make a ramp unnecessary.
    """
    def schedule(step):
        return base_learning_rate * jax.lax.rsqrt(jnp.maximum(jnp.asarray(step, jnp.float32), float(warmup_steps)))
    return schedule


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


@gin.configurable
def constant_schedule(learning_rate: float = 1e-3) -> Schedule:
    """A fixed rate, as T5 fine-tuning uses with Adafactor (0.001)."""
    return optax.constant_schedule(learning_rate)


def decay_mask(params, decay_embeddings: bool = False):
    """True where weight decay applies, decided by parameter path names.

    Biases, norm parameters (anything under a module whose name contains 'norm') and, unless
    `decay_embeddings`, embedding tables are left alone: decaying them shrinks offsets and scales
    towards 0 rather than regularising a weight matrix.
    """
    def keep(path, _):
        names = [_key_name(k) for k in path]
        leaf = names[-1] if names else ""
        if leaf.endswith("bias") or leaf == "scale" or any("norm" in n.lower() for n in names):
            return False
        return decay_embeddings or not leaf.endswith("embedding")
    return jax.tree_util.tree_map_with_path(keep, params)


def _with_clipping(tx, max_grad_norm: Optional[float]):
    return tx if max_grad_norm is None else optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)


@gin.configurable
def adafactor(base_learning_rate: float = 1.0, warmup_steps: int = 10_000, *, decay_rate: float = 0.8,
              clipping_threshold: Optional[float] = 1.0, multiply_by_parameter_scale: bool = True,
              factored: bool = True, min_dim_size_to_factor: int = 128, momentum: Optional[float] = None,
              weight_decay_rate: Optional[float] = None, decay_embeddings: bool = False,
              max_grad_norm: Optional[float] = None, schedule: Optional[Schedule] = None) -> Optimizer:
    """T5 Adafactor: factored second moments, beta2 = 1 - t^-0.8, no momentum, update clipping at
    RMS 1.0, step sizes relative to each parameter's RMS, and the rsqrt schedule by default."""
    if schedule is None:
        _check_steps("adafactor.warmup_steps", warmup_steps, 1, " (the rsqrt schedule divides by its square root)")
    schedule = schedule or rsqrt_schedule(base_learning_rate, warmup_steps)
    tx = optax.adafactor(
        learning_rate=schedule, min_dim_size_to_factor=min_dim_size_to_factor, decay_rate=decay_rate,
        multiply_by_parameter_scale=multiply_by_parameter_scale, clipping_threshold=clipping_threshold,
        momentum=momentum, weight_decay_rate=weight_decay_rate, factored=factored,
        weight_decay_mask=lambda p: decay_mask(p, decay_embeddings))
    return Optimizer(_with_clipping(tx, max_grad_norm), schedule)


@gin.configurable
def adamw(peak_learning_rate: float = 3e-4, warmup_steps: int = 1_000, decay_steps: int = 100_000, *,
          init_learning_rate: float = 0.0, end_learning_rate: float = 0.0, b1: float = 0.9, b2: float = 0.95,
          eps: float = 1e-8, weight_decay: float = 0.1, decay_embeddings: bool = False,
          max_grad_norm: Optional[float] = 1.0, schedule: Optional[Schedule] = None) -> Optimizer:
    """AdamW with linear warmup then cosine decay to `end_learning_rate` at `decay_steps` (a total
    that includes the warmup; bind it to TRAIN_STEPS). optax scales the decoupled weight decay by
    the learning rate, so decay follows the schedule."""
    if schedule is None:
        _check_steps("adamw.warmup_steps", warmup_steps, 0, "")
        _check_steps("adamw.decay_steps", decay_steps, warmup_steps + 1,
                     f" (adamw.warmup_steps + 1; it is TRAIN_STEPS in optimizers/adamw.gin): train for more "
                     "steps than the warmup, or lower --gin.adamw.warmup_steps")
    schedule = schedule or optax.warmup_cosine_decay_schedule(
        init_learning_rate, peak_learning_rate, warmup_steps, decay_steps, end_learning_rate)
    tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     mask=lambda p: decay_mask(p, decay_embeddings))
    return Optimizer(_with_clipping(tx, max_grad_norm), schedule)
