"""Optax optimisers with their learning-rate schedules, configurable from gin.

Each factory returns an `Optimizer` = (optax transformation, schedule); the schedule travels with
it so the train step can log the learning rate it used. `Optimizer` also has `init`/`update`, so it
can stand wherever an optax transformation is expected.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import gin
import jax
import jax.numpy as jnp
import optax

from t5x_like.errors import UserError
from t5x_like.training import adafactor as adafactor_lib

Schedule = Callable[[jax.Array], jax.Array]


class Optimizer(NamedTuple):
    """`bind_axes(param_axes)`, when given, builds the transformation for params with those logical
    axes (Adafactor factors by them); `init` uses it when handed the axes, and `tx` (whose update
    reads everything it needs from the state) does the updates."""
    tx: optax.GradientTransformation
    schedule: Optional[Schedule] = None
    bind_axes: Optional[Callable[[Any], optax.GradientTransformation]] = None

    @property
    def uses_param_axes(self) -> bool:
        return self.bind_axes is not None

    def init(self, params, param_axes=None):
        if param_axes is not None and self.bind_axes is not None:
            return self.bind_axes(param_axes).init(params)
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
              max_grad_norm: Optional[float] = None, schedule: Optional[Schedule] = None,
              factor_rules: Optional[Mapping[str, str]] = None) -> Optimizer:
    """T5 Adafactor: factored second moments, beta2 = 1 - t^-0.8, no momentum, update clipping at
    RMS 1.0, step sizes relative to each parameter's RMS, and the rsqrt schedule by default.

    Given the params' logical axes (the train state hands them to `init`), the second moment is
    factored over merged axes by `factor_rules` (logical name -> row / column / batch / none,
    added to `adafactor.FACTOR_RULES`, T5X's): [embed, heads, kv] as embed x (heads*kv), each scanned
    layer and each expert on its own (training/adafactor.py). Otherwise optax's rule: the two
    largest axes."""
    if schedule is None:
        _check_steps("adafactor.warmup_steps", warmup_steps, 1, " (the rsqrt schedule divides by its square root)")
    schedule = schedule or rsqrt_schedule(base_learning_rate, warmup_steps)
    bad = {k: v for k, v in (factor_rules or {}).items() if v not in adafactor_lib.ROLES}
    if bad:
        raise OptimizerConfigError(f"adafactor.factor_rules {bad}: map each logical axis name to one of "
                                   f"{list(adafactor_lib.ROLES)}")

    def build(param_axes=None):  # the chain of optax.adafactor with our factored first steps
        tx = [adafactor_lib.scale_by_adafactor(
            factored=factored, decay_rate=decay_rate, min_dim_size_to_factor=min_dim_size_to_factor,
            clipping_threshold=clipping_threshold, multiply_by_parameter_scale=multiply_by_parameter_scale,
            factor_rules=factor_rules, param_axes=param_axes),
            optax.scale_by_learning_rate(schedule, flip_sign=False)]
        if momentum is not None:
            tx.append(optax.ema(momentum, debias=False, accumulator_dtype=jnp.float32))
        if weight_decay_rate is not None:
            tx.append(optax.add_decayed_weights(weight_decay_rate, mask=lambda p: decay_mask(p, decay_embeddings)))
        return _with_clipping(optax.chain(*tx, optax.scale(-1)), max_grad_norm)
    return Optimizer(build(), schedule, build)


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
