"""Relative position schemes: rotary embeddings and T5's bucketed relative bias."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import flax.linen as nn


def apply_rotary(x, positions, theta: float = 10_000.0):
    """Rotate feature pairs (i, i + d/2) of x [batch, length, heads, d] by position-dependent angles.

    This is the "rotate half" layout used by GPT-NeoX and Hugging Face LLaMA checkpoints.
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq  # [b, l, d/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x32 = jnp.asarray(x, jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def relative_position_buckets(relative_position: np.ndarray, bidirectional: bool,
                              num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket ids for key_position - query_position, as in T5.

    Half of the buckets (all of them when causal) hold exact distances below num_buckets // 4
    (// 2 when causal); the rest grow logarithmically up to max_distance, beyond which distances
    share the last bucket. Bidirectional bucketing gives keys after the query the upper half.
    """
    rel = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        dist = np.abs(rel)
    else:
        dist = np.maximum(-rel, 0)
    max_exact = num_buckets // 2
    is_small = dist < max_exact
    with np.errstate(divide="ignore"):
        large = max_exact + (
            np.log(np.maximum(dist, 1).astype(np.float32) / max_exact)
            / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, dist, large)


class RelativePositionBias(nn.Module):
    """Per-head learned bias for each relative-position bucket, shared by all layers of a stack."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query_length: int, key_length: int, query_offset: int = 0):
        """Returns [1, heads, query_length, key_length]; lengths are static."""
        q = np.arange(query_offset, query_offset + query_length)[:, None]
        k = np.arange(key_length)[None, :]
        buckets = relative_position_buckets(k - q, self.bidirectional, self.num_buckets, self.max_distance)
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("relpos_buckets", "heads")),
            (self.num_buckets, self.num_heads), self.param_dtype)
        values = jnp.take(jnp.asarray(table, self.dtype), jnp.asarray(buckets), axis=0)  # [q, k, h]
        return jnp.transpose(values, (2, 0, 1))[None]
