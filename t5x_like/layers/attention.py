"""Dot-product attention: multi-head, grouped-query and multi-query, self and cross, with masks.

Masks are boolean-valued float arrays [batch, 1, query, key] (1 = may attend), built by the
helpers below from padding, causality, packed segments and prefix-LM inputs.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
from einops import rearrange

from t5x_like.layers.dense import DenseGeneral
from t5x_like.layers.positions import apply_rotary


def make_encoder_mask(tokens, segment_ids=None):
    """Bidirectional: non-padding queries attend to non-padding keys of their own segment."""
    mask = nn.make_attention_mask(tokens > 0, tokens > 0)
    if segment_ids is not None:
        mask = nn.combine_masks(mask, nn.make_attention_mask(segment_ids, segment_ids, jnp.equal))
    return mask


def make_cross_mask(decoder_target_tokens, encoder_tokens, decoder_segment_ids=None,
                    encoder_segment_ids=None):
    """Decoder queries attend to non-padding encoder keys (of the same packed segment)."""
    mask = nn.make_attention_mask(decoder_target_tokens > 0, encoder_tokens > 0)
    if decoder_segment_ids is not None and encoder_segment_ids is not None:
        mask = nn.combine_masks(
            mask, nn.make_attention_mask(decoder_segment_ids, encoder_segment_ids, jnp.equal))
    return mask


def make_decoder_mask(length: int, batch: int, decoder_target_tokens=None, segment_ids=None,
                      causal_attention=None, positions=None, sliding_window: Optional[int] = None):
    """Causal self-attention mask for a decoder.

    decoder_target_tokens: padding is where targets are 0 (inputs start with a 0 BOS, so they
        cannot mark padding). None means no padding mask (causality already hides trailing pads).
    segment_ids: packed examples never see each other.
    causal_attention: 1 on prefix-LM inputs, which attend to each other bidirectionally.
    sliding_window: a query sees only keys fewer than this many positions behind it.
    """
    idx = jnp.broadcast_to(jnp.arange(length), (batch, length))
    causal = nn.make_attention_mask(idx, idx, jnp.greater_equal)
    if causal_attention is not None:
        prefix = nn.make_attention_mask(causal_attention, causal_attention, jnp.logical_and)
        causal = jnp.logical_or(causal, prefix).astype(jnp.float32)
    masks = [causal]
    if decoder_target_tokens is not None:
        masks.append(nn.make_attention_mask(decoder_target_tokens > 0, decoder_target_tokens > 0))
    if segment_ids is not None:
        masks.append(nn.make_attention_mask(segment_ids, segment_ids, jnp.equal))
    if sliding_window is not None:
        pos = idx if positions is None else positions
        masks.append(nn.make_attention_mask(
            pos, pos, lambda q, k: (q - k) < sliding_window))
    return nn.combine_masks(*masks)


MAX_QUERY_BLOCKS = 8


class MultiHeadAttention(nn.Module):
    """Attention with num_kv_heads <= num_heads key/value heads (GQA; 1 = multi-query)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    use_bias: bool = False
    scale_scores: bool = True
    rotary_theta: Optional[float] = None
    dropout_rate: float = 0.0
    deterministic: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    # Autoregressive decoding with a KV cache (self-attention only): see `_use_cache`.
    decode: bool = False
    sliding_window: Optional[int] = None  # used by the cache mask only; full-sequence masks carry it
    # The caller's mask hides every key after its query: attend in query blocks of this size, each
    # to the keys up to its last query (0: off). Skipped blocks are all masked, so results match.
    causal_query_block: int = 0

    def _use_cache(self, k, v, mask):
        """Write this step's keys/values into the 'cache' collection and attend over all of it.

        Initialising with decode=True and a full-length input only allocates zero caches
        [batch, max_length, kv_heads, head_dim]; every later call feeds one token per row, shared
        position `cache_index` (the decoding loop forces prompt tokens, so rows never disagree).
        """
        initialised = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialised:
            return k, v, mask
        if k.shape[1] != 1:
            raise ValueError(f"decode=True takes one token per row, got length {k.shape[1]}")
        i = index.value
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), (0, i, 0, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), (0, i, 0, 0))
        index.value = i + 1
        key_pos = jnp.arange(cached_k.value.shape[1])
        valid = key_pos <= i
        if self.sliding_window is not None:
            valid = valid & (i - key_pos < self.sliding_window)
        cache_mask = jnp.broadcast_to(valid[None, None, None, :], (k.shape[0], 1, 1, key_pos.shape[0]))
        mask = cache_mask if mask is None else nn.combine_masks(mask, cache_mask)
        return cached_k.value, cached_v.value, mask

    @nn.compact
    def __call__(self, inputs_q, inputs_kv, mask=None, bias=None, positions_q=None, positions_kv=None):
        """inputs [batch, length, embed]; mask [batch, 1, q, k]; bias [1|batch, heads, q, k]."""
        dense = functools.partial(DenseGeneral, axis=-1, use_bias=self.use_bias, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        q = dense((self.num_heads, self.head_dim), ("embed", "heads", "kv"), name="query")(inputs_q)
        k = dense((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "kv"), name="key")(inputs_kv)
        v = dense((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "kv"), name="value")(inputs_kv)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "kv"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "kv"))

        if self.rotary_theta is not None:
            batch, q_len, k_len = q.shape[0], q.shape[1], k.shape[1]
            if positions_q is None:
                positions_q = jnp.broadcast_to(jnp.arange(q_len), (batch, q_len))
            if positions_kv is None:
                positions_kv = jnp.broadcast_to(jnp.arange(k_len), (batch, k_len))
            q = apply_rotary(q, positions_q, self.rotary_theta)
            k = apply_rotary(k, positions_kv, self.rotary_theta)

        if self.decode:
            k, v, mask = self._use_cache(k, v, mask)

        if self.scale_scores:
            q = q * jnp.asarray(self.head_dim ** -0.5, q.dtype)
        # Heads before positions ([b, kv_heads, group, length, head_dim]) so both products are plain
        # batched matmuls; the [b, l, h, d] einsums made XLA:CPU copy-transpose scores and values.
        groups = self.num_heads // self.num_kv_heads
        q = rearrange(q, "b l (k g) d -> b k g l d", g=groups)
        k = rearrange(k, "b s k d -> b k s d")
        v = rearrange(v, "b s k d -> b k s d")
        if bias is not None:
            bias = rearrange(jnp.asarray(bias, jnp.float32), "b (k g) l s -> b k g l s", g=groups)
        if mask is not None:  # an additive -inf-like bias: one add instead of a select per score
            mask = jnp.where(mask > 0, 0.0, jnp.finfo(jnp.float32).min)[:, :, None]
        dropout = (nn.Dropout(self.dropout_rate, deterministic=False)
                   if self.dropout_rate > 0.0 and not self.deterministic else None)
        # At most MAX_QUERY_BLOCKS blocks: long sequences get larger blocks, not more small kernels.
        q_len = q.shape[3]
        block = max(self.causal_query_block, q_len // MAX_QUERY_BLOCKS) if self.causal_query_block else 0
        if block and q_len == k.shape[2] and q_len > block and q_len % block == 0:
            out = jnp.concatenate([_attend(q[:, :, :, i:i + block], k[:, :, :i + block], v[:, :, :i + block],
                                           _rows_cols(bias, i, block), _rows_cols(mask, i, block), dropout, self.dtype)
                                   for i in range(0, q_len, block)], axis=3)
        else:
            out = _attend(q, k, v, bias, mask, dropout, self.dtype)
        out = rearrange(out, "b k g l d -> b l (k g) d")
        out = DenseGeneral(inputs_q.shape[-1], ("heads", "kv", "embed"), axis=(-2, -1),
                           use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="out")(out)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))


def _attend(q, k, v, bias, mask_bias, dropout, dtype):
    """softmax(q k^T + bias + mask) v over [b, kv_heads, group, length, head_dim] blocks."""
    scores = jnp.einsum("bkgld,bksd->bkgls", q, k, preferred_element_type=jnp.float32)
    for additive in (bias, mask_bias):
        if additive is not None:
            scores = scores + additive
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    if dropout is not None:
        weights = dropout(weights)
    return jnp.einsum("bkgls,bksd->bkgld", weights, v, preferred_element_type=jnp.float32).astype(dtype)


def _rows_cols(x, start: int, block: int):
    """Query rows [start, start + block) and key columns [0, start + block) of a [..., q, k] array."""
    return None if x is None else x[..., start:start + block, :start + block]
