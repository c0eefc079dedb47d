"""A transformer layer (self-attention, optional cross-attention, MLP) and a stack of them.

Network assembly, so it lives with the models: it reads the family config's fields and wires the
config-free building blocks of `layers/` together.

The stack optionally scans over layers (one compiled body, params stacked on a `layers` axis) and
rematerialises each layer with a named policy. Both are configured, never hard-wired.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from t5x_like.layers.attention import MultiHeadAttention
from t5x_like.layers.mlp import Mlp
from t5x_like.layers.moe import moe_mlp_for_config
from t5x_like.layers.norms import Norm
from t5x_like.layers.positions import RelativePositionBias

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def dtypes(config):
    return jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)


class TransformerLayer(nn.Module):
    """Pre-norm (T5, GPT, LLaMA) or post-norm (BERT) residual layer."""

    config: "TransformerConfig"  # noqa: F821 (any family's config)
    has_cross_attention: bool = False
    deterministic: bool = True
    decode: bool = False  # self-attention reads/writes the KV cache (a chunk of tokens per call)
    fresh_cache: bool = False  # decode into an empty cache (prefill): attend within the chunk only
    use_moe: bool = False  # feed-forward block is a mixture of experts (layers/moe.py)
    causal_mask: bool = False  # the self-attention mask hides later keys (blocked attention may skip them)

    @nn.compact
    def __call__(self, x, mask, bias=None, positions=None, encoded=None, cross_mask=None):
        cfg = self.config
        dtype, param_dtype = dtypes(cfg)
        pre = cfg.norm_position == "pre"

        def norm(name):
            return Norm(cfg.norm_type, cfg.norm_epsilon, dtype=dtype, param_dtype=param_dtype, name=name)

        def attention(name, rotary, decode=False, causal=False, cross_cache=False, fresh_cache=False):
            return MultiHeadAttention(
                num_heads=cfg.num_heads, num_kv_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                use_bias=cfg.use_bias, scale_scores=cfg.scale_attention_scores,
                rotary_theta=cfg.rotary_theta if rotary else None, dropout_rate=cfg.dropout_rate,
                rope_scaling=cfg.rope_scaling if rotary else None,
                deterministic=self.deterministic, dtype=dtype, param_dtype=param_dtype, decode=decode, fresh_cache=fresh_cache,
                sliding_window=cfg.sliding_window if decode or causal else None, causal=causal,
                causal_query_block=cfg.causal_query_block if causal else 0, cross_cache=cross_cache,
                attention_impl=cfg.attention_impl, name=name)

        def residual(x, sublayer, norm_name):
            h = sublayer(norm(norm_name)(x) if pre else x)
            h = nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
            out = x + h if pre else norm(norm_name)(x + h)
            return nn.with_logical_constraint(out, ("batch", "length", "embed"))

        rotary = cfg.position_embedding == "rotary"
        x = residual(x, lambda h: attention("self_attention", rotary, self.decode, self.causal_mask,
                                          fresh_cache=self.fresh_cache)(
            h, h, mask, bias, positions, positions), "self_attention_norm")
        if self.has_cross_attention:
            # Decoding: keys / values of `encoded` stored once, read from the cache when it is None.
            x = residual(x, lambda h: attention("cross_attention", False, cross_cache=self.decode)(
                h, encoded, cross_mask), "cross_attention_norm")
        if self.use_moe:
            # Decoding never drops a token: its output must not depend on the other tokens routed
            # with it (the prompt's padding at prefill, one token per row at a step).
            moe_cfg = cfg.replace(moe_capacity_factor=None, moe_group_size=None) if self.decode else cfg
            mlp = moe_mlp_for_config(moe_cfg, self.deterministic, dtype=dtype, param_dtype=param_dtype)
        else:
            mlp = Mlp(cfg.mlp_dim, cfg.mlp_activations, use_bias=cfg.use_bias, dropout_rate=cfg.dropout_rate,
                      deterministic=self.deterministic, dtype=dtype, param_dtype=param_dtype, name="mlp")
        x = residual(x, mlp, "mlp_norm")
        return (x, None) if cfg.scan_layers else x


class TransformerStack(nn.Module):
    """num_layers TransformerLayers, the T5 relative bias shared by all of them, a final norm."""

    config: "TransformerConfig"  # noqa: F821
    num_layers: int
    has_cross_attention: bool = False
    causal: bool = False

    @nn.compact
    def __call__(self, x, mask, positions=None, encoded=None, cross_mask=None, deterministic=True,
                 decode: bool = False, decode_length: Optional[int] = None, causal_mask: bool = False,
                 fresh_cache: bool = False):
        """decode: x holds a chunk of tokens per row at `positions` [batch, k] (-1: padding); attention
        uses the KV cache (layers/kv_cache.py) of up to `decode_length` positions, and the relative
        bias is that full table's rows at `positions`, indexed by key position.
        causal_mask: `mask` hides every key after its query (not prefix-LM), so self-attention
        computes only the blocks on and below the diagonal (config.causal_query_block).
        fresh_cache: decoding into an empty cache (a prefill): the chunk attends to itself only."""
        cfg = self.config
        dtype, param_dtype = dtypes(cfg)
        bias = None
        if cfg.position_embedding == "relative":
            length = decode_length if decode else x.shape[1]
            bias = RelativePositionBias(cfg.relative_num_buckets, cfg.relative_max_distance, cfg.num_heads,
                                        bidirectional=not self.causal, dtype=dtype, param_dtype=param_dtype,
                                        name="relpos_bias")(length, length)
            if decode:  # [1, heads, L, L] -> the query rows at each row's positions: [batch, heads, k, L]
                rows = jnp.take(bias[0], jnp.clip(positions, 0, length - 1), axis=1)
                bias = jnp.transpose(rows, (1, 0, 2, 3))

        layer_cls = TransformerLayer
        if cfg.remat_policy != "none" and not decode:
            layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat_policy],
                                 prevent_cse=not cfg.scan_layers)
        args = (mask, bias, positions, encoded, cross_mask)
        make = lambda cls, name, moe=False: cls(cfg, self.has_cross_attention, deterministic,  # noqa: E731
                                                decode=decode, use_moe=moe, causal_mask=causal_mask,
                                                fresh_cache=fresh_cache, name=name)
        if cfg.scan_layers:
            scanned = nn.scan(layer_cls, variable_axes={"params": 0, "cache": 0, "intermediates": 0}, split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast,) * len(args), length=self.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            # Scanning requires identical layers, so MoE is on in all of them or none (config checks).
            x, _ = make(scanned, "layers", cfg.is_moe_layer(0))(x, *args)
        else:
            for i in range(self.num_layers):
                x = make(layer_cls, f"layers_{i}", cfg.is_moe_layer(i))(x, *args)

        if cfg.norm_position == "pre":
            x = Norm(cfg.norm_type, cfg.norm_epsilon, dtype=dtype, param_dtype=param_dtype, name="final_norm")(x)
        return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
