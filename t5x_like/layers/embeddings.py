"""Token embeddings (with the tied output projection) and absolute position encodings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from t5x_like.layers.quantization import QuantizedArray, dequantize


class Embed(nn.Module):
    """A lookup table; `attend` reuses it as the output projection when embeddings are tied.

    The table may be stored as a `QuantizedArray` (layers/quantization.py: each vocab row quantized
    along embed, one scale per row for int8, per row and block for int4 / nf4; a serving checkpoint
    of the `quantize` mode). A lookup then gathers the ids' rows of codes and scales and dequantizes
    only those, which equals the lookup of the dequantized table exactly; `attend` dequantizes the
    table inside `jax.checkpoint` with its matmul (as `DenseGeneral` does: a backward pass keeps the
    codes, not a float copy), also when the table's `matmul` is "int8" (the int8-activation path
    is `DenseGeneral`'s: an untied `logits_dense` takes it, a tied `attend` does not).
    """

    num_embeddings: int
    features: int
    axes: tuple[str, str] = ("vocab", "embed")
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    embedding_init: nn.initializers.Initializer = nn.initializers.normal(stddev=1.0)

    def setup(self):
        shape = (self.num_embeddings, self.features)
        stored = self.get_variable("params", "embedding") if self.has_variable("params", "embedding") else None
        if isinstance(stored, QuantizedArray):
            # `param` would shape-check the codes against the table, so the stored pytree is read directly.
            if stored.full_shape != shape or stored.in_ndim != 1:
                raise ValueError(f"quantized embedding of shape {stored.full_shape} (in_ndim {stored.in_ndim}) "
                                 f"does not match the table {shape} quantized per row")
            self.embedding = stored
        else:
            self.embedding = self.param("embedding", nn.with_logical_partitioning(self.embedding_init, self.axes),
                                        shape, self.param_dtype)

    def __call__(self, ids):
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"Embed expects integer ids, got {ids.dtype}")
        table = self.embedding
        if isinstance(table, QuantizedArray):  # the ids' rows of codes and scales, then those rows dequantized
            rows = table.replace(codes=jnp.take(table.codes, ids, axis=0), scale=jnp.take(table.scale, ids, axis=0))
            out = dequantize(rows, self.dtype)
        else:
            out = jnp.take(jnp.asarray(table, self.dtype), ids, axis=0)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))

    def attend(self, x):
        """Logits: x . E^T over the embedding axis."""
        def project(x, table):
            return jnp.einsum("...d,vd->...v", jnp.asarray(x, self.dtype), jnp.asarray(table, self.dtype),
                              preferred_element_type=jnp.float32)

        if isinstance(self.embedding, QuantizedArray):
            return jax.checkpoint(lambda x, q: project(x, dequantize(q, self.dtype)))(x, self.embedding)
        return project(x, self.embedding)


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
