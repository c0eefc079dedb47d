"""Which parameters a run trains: a regex over parameter paths freezes everything else.

`TrainableSubset(optimizer, pattern)` is the optimizer a run with frozen parameters uses. Its
optimizer state covers only the trainable parameters (a LoRA run keeps Adam moments for the
adapters alone), and the train step (`training/steps.py`) takes gradients only with respect to them,
so frozen parameters cost no weight-gradient matmuls and come out of every step bitwise unchanged.

A parameter's path is its '/'-joined key path in the params tree, e.g.
`decoder/layers_3/self_attention/query/kernel` or `logits_dense/kernel`; the pattern is searched
(`re.search`) in it. Examples: `logits_dense/` (only the head), `norm` (only the norms),
`layers_(10|11)/` (the top two of twelve unscanned layers). With `scan_layers=True` the layers are
one stacked array each, so a pattern cannot pick individual layers.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

from t5x_like.errors import UserError
from t5x_like.layers.quantization import QuantizedArray


class TrainableParamsError(UserError):
    """A trainable-parameters pattern that is not a regex or selects no parameter."""


def param_paths(params) -> list[str]:
    return ["/".join(k) for k in traverse_util.flatten_dict(params)]


class TrainableSubset:
    """An optax-style optimizer over the parameters whose path matches `pattern` (None: all)."""

    def __init__(self, optimizer, pattern: Optional[str]):
        self.optimizer, self.pattern = optimizer, pattern
        try:
            self._regex = None if pattern is None else re.compile(pattern)
        except re.error as e:
            raise TrainableParamsError(f"trainable_params {pattern!r} is not a regular expression ({e}); "
                                       "e.g. 'logits_dense/|norm'") from None
        self.schedule = getattr(optimizer, "schedule", None)

    def is_trainable(self, path: str) -> bool:
        return self._regex is None or bool(self._regex.search(path))

    def check(self, params) -> None:
        """Refuse a pattern that selects nothing (a run that would train nothing) or a quantized
        kernel (integer codes have no gradient)."""
        flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
        if self._regex is not None and not any(self.is_trainable(p) for p in flat):
            raise TrainableParamsError(f"trainable_params {self.pattern!r} matches no parameter; paths look like "
                                       f"{list(flat)[:3]} ... (re.search over '/'-joined paths)")
        quantized = [p for p, v in flat.items() if self.is_trainable(p) and isinstance(v, QuantizedArray)]
        if quantized:
            raise TrainableParamsError(f"{quantized[0]} is stored quantized (weight_quantization) and cannot train; "
                                       "train LoRA adapters on top (QLoRA: set the model's lora) or exclude the "
                                       "quantized kernels with train.trainable_params")

    def split(self, params) -> tuple[Any, dict]:
        """(trainable, frozen) sub-trees of `params`; without a pattern, (params, {})."""
        if self._regex is None:
            return params, {}
        flat = traverse_util.flatten_dict(params)
        trainable = {k: v for k, v in flat.items() if self.is_trainable("/".join(k))}
        frozen = {k: v for k, v in flat.items() if k not in trainable}
        return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)

    def merge(self, trainable, frozen) -> Any:
        """The full params tree from `split`'s two halves."""
        if self._regex is None:
            return trainable
        flat = {**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trainable)}
        return traverse_util.unflatten_dict(flat)

    def flops_per_example(self, model, params, feature_lengths) -> float:
        """The model's training FLOPs per example (`params`: float shapes) when only this subset
        trains: a frozen kernel skips its weight-gradient matmul, 2 of the 6 FLOPs per parameter
        and token. The formula is linear in each kernel's size, so evaluating it with the frozen
        kernels emptied isolates their share."""
        full = model.flops_per_example(params, feature_lengths)
        if self._regex is None:
            return full
        empty = jax.ShapeDtypeStruct((0,), jnp.float32)
        flat = traverse_util.flatten_dict(params)
        trainable_only = traverse_util.unflatten_dict(
            {k: v if self.is_trainable("/".join(k)) else empty for k, v in flat.items()})
        return full - (full - model.flops_per_example(trainable_only, feature_lengths)) / 3

    @property
    def uses_param_axes(self) -> bool:
        return getattr(self.optimizer, "uses_param_axes", False)

    def init(self, params, param_axes=None):
        if param_axes is None:
            return self.optimizer.init(self.split(params)[0])
        return self.optimizer.init(self.split(params)[0], self.split(param_axes)[0])

    def update(self, grads, state, params=None):
        """`grads` and `params` are the trainable half (what `split` returns first)."""
        return self.optimizer.update(grads, state, params)


def trainable_subset(optimizer, pattern: Optional[str]) -> TrainableSubset:
    """`optimizer` restricted to `pattern` (an existing TrainableSubset is re-targeted)."""
    if isinstance(optimizer, TrainableSubset):
        optimizer = optimizer.optimizer
    return TrainableSubset(optimizer, pattern)
