"""Feed-forward block: plain (ReLU, GELU) or gated (GeGLU, SwiGLU) by the list of activations."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from t5x_like.layers.dense import DenseGeneral

ACTIVATION_FNS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "linear": lambda x: x,
}


class Mlp(nn.Module):
    """One input projection per activation, multiplied together, then an output projection.

    Projection names follow T5X: `wi` for a single activation, `wi_0`, `wi_1`, ... when gated.
    """

    mlp_dim: int
    activations: Sequence[str] = ("relu",)
    use_bias: bool = False
    dropout_rate: float = 0.0
    deterministic: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(DenseGeneral, use_bias=self.use_bias, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        hidden = None
        for i, act in enumerate(self.activations):
            name = "wi" if len(self.activations) == 1 else f"wi_{i}"
            h = ACTIVATION_FNS[act](dense(self.mlp_dim, ("embed", "mlp"), name=name)(x))
            hidden = h if hidden is None else hidden * h
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=self.deterministic)
        return dense(x.shape[-1], ("mlp", "embed"), name="wo")(hidden)
