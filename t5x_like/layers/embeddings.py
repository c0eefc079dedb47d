"""Token embeddings (with the tied output projection) and absolute position encodings."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import flax.linen as nn


class Embed(nn.Module):
    """A lookup table; `attend` reuses it as the output projection when embeddings are tied."""

    num_embeddings: int
    features: int
    axes: tuple[str, str] = ("vocab", "embed")
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    embedding_init: nn.initializers.Initializer = nn.initializers.normal(stddev=1.0)

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(self.embedding_init, self.axes),
            (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, ids):
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"Embed expects integer ids, got {ids.dtype}")
        out = jnp.take(jnp.asarray(self.embedding, self.dtype), ids, axis=0)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))

    def attend(self, x):
        """Logits: x . E^T over the embedding axis."""
        return jnp.einsum("...d,vd->...v", jnp.asarray(x, self.dtype), jnp.asarray(self.embedding, self.dtype),
                          preferred_element_type=jnp.float32)


def sinusoidal_positions(positions, features: int, max_timescale: float = 10_000.0):
    """Transformer sine/cosine encodings for integer positions [..., length] -> [..., length, features].

    First half sines, second half cosines, timescales geometric from 1 to max_timescale.
    """
    half = features // 2
    log_increment = np.log(max_timescale) / max(half - 1, 1)
    inv_timescales = jnp.exp(-log_increment * jnp.arange(half, dtype=jnp.float32))
    scaled = jnp.asarray(positions, jnp.float32)[..., None] * inv_timescales
    enc = jnp.concatenate([jnp.sin(scaled), jnp.cos(scaled)], axis=-1)
    if features % 2:
        enc = jnp.pad(enc, [(0, 0)] * (enc.ndim - 1) + [(0, 1)])
    return enc
