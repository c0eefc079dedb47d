"""LayerNorm and RMSNorm, computed in float32 whatever the activation dtype."""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn
from jax import lax


class Norm(nn.Module):
    """`kind='rms'`: x / rms(x) * scale (T5, LLaMA). `kind='layer'`: (x - mean) / std * scale + bias."""

    kind: str = "rms"
    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        x32 = jnp.asarray(x, jnp.float32)
        if self.kind == "layer":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * lax.rsqrt(var + self.epsilon)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (features,), self.param_dtype)
        y = y * jnp.asarray(scale, jnp.float32)
        if self.kind == "layer":
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                              (features,), self.param_dtype)
            y = y + jnp.asarray(bias, jnp.float32)
        return jnp.asarray(y, self.dtype)
