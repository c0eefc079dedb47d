"""What every network shares: token embedding, absolute positions, and the logits projection."""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from t5x_like.layers.dense import DenseGeneral
from t5x_like.layers.embeddings import Embed, sinusoidal_positions
from t5x_like.layers.quantization import QuantizedArray, dequantize
from t5x_like.models.transformer import dtypes
from t5x_like.objectives.fused_cross_entropy import OutputHead


def default_positions(tokens, positions=None):
    """Positions [batch, length]: the packed `*_positions` feature if given, else 0..length-1."""
    if positions is not None:
        return positions
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


class NetworkBase(nn.Module):
    """Subclasses call `setup_embeddings()` from `setup()`, then use `embed` and `logits`."""

    def setup_embeddings(self):
        cfg = self.config
        dtype, param_dtype = dtypes(cfg)
        self.token_embed = Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype)
        if cfg.position_embedding == "learned":
            self.position_embed = Embed(cfg.max_position_embeddings, cfg.d_model, axes=("abspos_buckets", "embed"),
                                        embedding_init=nn.initializers.normal(0.02), dtype=dtype,
                                        param_dtype=param_dtype)
        if not cfg.tie_embeddings:
            self.logits_dense = DenseGeneral(cfg.vocab_size, ("embed", "vocab"), dtype=dtype, param_dtype=param_dtype)
        self.embed_dropout = nn.Dropout(cfg.dropout_rate)

    def embed(self, tokens, positions, deterministic: bool, extra=None):
        """Token (+ absolute position) (+ `extra`, e.g. token types) embeddings, then dropout."""
        cfg = self.config
        if cfg.position_embedding == "learned" and tokens.shape[-1] > cfg.max_position_embeddings:
            # Out-of-range lookups would silently fill NaN (jnp.take), poisoning every logit.
            raise ValueError(f"sequence length {tokens.shape[-1]} exceeds max_position_embeddings="
                             f"{cfg.max_position_embeddings} of the learned position table; shorten the "
                             "feature lengths or raise max_position_embeddings")
        x = self.token_embed(tokens)
        if cfg.position_embedding == "learned":
            x = x + self.position_embed(positions)
        elif cfg.position_embedding == "sinusoidal":
            x = x + sinusoidal_positions(positions, cfg.d_model).astype(x.dtype)
        if extra is not None:
            x = x + extra
        return x

    def dropout(self, x, deterministic: bool):
        return self.embed_dropout(x, deterministic=deterministic)

    def logits(self, x):
        """[batch, length, embed] -> float32 [batch, length, vocab]."""
        cfg = self.config
        if cfg.tie_embeddings:
            if cfg.scale_tied_logits:
                x = x * jnp.asarray(cfg.d_model ** -0.5, x.dtype)
            out = self.token_embed.attend(x)
        else:
            out = self.logits_dense(x)
        out = nn.with_logical_constraint(out, ("batch", "length", "vocab"))
        return out.astype(jnp.float32)

    def output_head(self) -> OutputHead:
        """The parameters `logits` projects with, for losses that project in chunks themselves. A
        quantized table or kernel (a `quantize` serving checkpoint, which is evaluated, not trained)
        is handed over dequantized: the fused loss projects from a plain array."""
        cfg = self.config
        if cfg.tie_embeddings:
            return OutputHead(_plain(self.token_embed.embedding), vocab_major=True,
                              scale=cfg.d_model ** -0.5 if cfg.scale_tied_logits else None)
        return OutputHead(_plain(self.logits_dense.variables["params"]["kernel"]))


def _plain(weight):
    return dequantize(weight) if isinstance(weight, QuantizedArray) else weight
