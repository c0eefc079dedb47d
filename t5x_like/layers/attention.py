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

from t5x_like.layers import attention_kernels, kv_cache
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
    rope_scaling: Optional[object] = None  # positions.RopeScaling: scaled rotary frequencies
    dropout_rate: float = 0.0
    deterministic: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    # Autoregressive decoding through the 'cache' collection (layers/kv_cache.py): self-attention
    # takes chunks of tokens at per-row positions (`positions_q`, -1 = padding); initialising
    # with a full-length input allocates the cache. `cross_cache`: see `_cross_kv`.
    decode: bool = False
    # The cache is known to be empty (a prompt prefilled into a newly allocated cache): the chunk
    # attends to itself only, skipping the score work against the cache's empty slots.
    fresh_cache: bool = False
    cross_cache: bool = False
    sliding_window: Optional[int] = None  # the cache mask's; full-sequence masks carry it (kernels skip by it)
    # The caller's mask hides every key after its query: attend in query blocks of this size, each
    # to the keys up to its last query (0: off). Skipped blocks are all masked, so results match.
    causal_query_block: int = 0
    # Full-sequence attention: "xla" (the paths here), "dot_product", "pallas" or "auto" (per backend),
    # see attention_kernels.py. `causal`: the caller's mask is causal self-attention (no prefix-LM).
    # The KV-cache path is always XLA.
    attention_impl: str = "xla"
    causal: bool = False

    def _cross_kv(self, dense, inputs_kv):
        """Cross-attention keys / values of `inputs_kv`, or (inputs_kv None) the ones a `cross_cache`
        call stored: an encoder-decoder computes them once at prefill, not at every decode step."""
        if inputs_kv is None:
            return self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")
        k = dense((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "kv"), name="key")(inputs_kv)
        v = dense((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "kv"), name="value")(inputs_kv)
        if self.cross_cache:
            self.put_variable("cache", "cross_key", k)
            self.put_variable("cache", "cross_value", v)
        return k, v

    def _cached_attention(self, q, k, v, bias, positions, dropout):
        """Attend a chunk (grouped queries, its keys / values) to the KV cache and to itself, then
        write it (layers/kv_cache.py). `bias` [batch, heads, q, positions] is indexed by key position."""
        cache = {n: self.get_variable("cache", n) for n in kv_cache.NAMES if self.has_variable("cache", n)}
        window = self.sliding_window
        old_k, old_v = kv_cache.read(cache, k.dtype)
        sources = [(k, v, kv_cache.visible_chunk(positions, window), positions)]
        if not self.fresh_cache:
            sources.insert(0, (old_k, old_v, kv_cache.visible_cached(cache, positions, window), cache["cached_pos"]))
        parts = []
        for keys, values, visible, columns in sources:
            additive = [jnp.where(visible, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]]
            if bias is not None:
                additive.append(_group_heads(kv_cache.gather_columns(bias, columns), q.shape[2]))
            parts.append((rearrange(keys, "b s k d -> b k s d"), rearrange(values, "b s k d -> b k s d"), additive))
        out = _attend_parts(q, parts, dropout, self.dtype)
        for name, value in kv_cache.write(cache, k, v, positions).items():
            self.put_variable("cache", name, value)
        return out

    @nn.compact
    def __call__(self, inputs_q, inputs_kv, mask=None, bias=None, positions_q=None, positions_kv=None):
        """inputs [batch, length, embed]; mask [batch, 1, q, k]; bias [1|batch, heads, q, k]."""
        dense = functools.partial(DenseGeneral, axis=-1, use_bias=self.use_bias, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        q = dense((self.num_heads, self.head_dim), ("embed", "heads", "kv"), name="query")(inputs_q)
        k, v = self._cross_kv(dense, inputs_kv)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "kv"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "kv"))

        if self.rotary_theta is not None:
            batch, q_len, k_len = q.shape[0], q.shape[1], k.shape[1]
            if positions_q is None:
                positions_q = jnp.broadcast_to(jnp.arange(q_len), (batch, q_len))
            if positions_kv is None:
                positions_kv = jnp.broadcast_to(jnp.arange(k_len), (batch, k_len))
            q = apply_rotary(q, positions_q, self.rotary_theta, self.rope_scaling)
            k = apply_rotary(k, positions_kv, self.rotary_theta, self.rope_scaling)

        cached = self.decode and self.has_variable("cache", "cached_key")
        if self.decode and not cached:  # initialising: allocate, attend as without a cache
            for name, value in kv_cache.allocate(k.shape[:1], k.shape[1], k.shape[2], k.shape[3], k.dtype).items():
                self.put_variable("cache", name, value)
        elif cached and mask is not None:
            raise ValueError("cached self-attention builds its own mask from positions; pass mask=None")

        if self.scale_scores:
            q = q * jnp.asarray(self.head_dim ** -0.5, q.dtype)
        # Heads before positions ([b, kv_heads, group, length, head_dim]) so both products are plain
        # batched matmuls; the [b, l, h, d] einsums made XLA:CPU copy-transpose scores and values.
        groups = self.num_heads // self.num_kv_heads
        q = rearrange(q, "b l (k g) d -> b k g l d", g=groups)
        dropout = (nn.Dropout(self.dropout_rate, deterministic=False)
                   if self.dropout_rate > 0.0 and not self.deterministic else None)
        if cached:
            out = self._cached_attention(q, k, v, bias, positions_q, dropout)
        else:
            out = self._attention(q, k, v, bias, mask, groups, dropout)
        out = rearrange(out, "b k g l d -> b l (k g) d")
        out = DenseGeneral(inputs_q.shape[-1], ("heads", "kv", "embed"), axis=(-2, -1),
                           use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="out")(out)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))

    def _attention(self, q, k, v, bias, mask, groups, dropout):
        """Grouped queries against full-sequence keys / values under the caller's mask."""
        impl = attention_kernels.resolve(self.attention_impl, causal=self.causal, length=q.shape[3],
                                         xla_only=bias is not None or dropout is not None, dtype=q.dtype)
        window = self.sliding_window if self.causal else None
        if impl == "dot_product":
            return attention_kernels.dot_product(q, k, v, mask, self.causal, window, self.dtype)
        if impl == "pallas":
            return attention_kernels.splash(q, k, v, mask, window, self.dtype)
        k = rearrange(k, "b s k d -> b k s d")
        v = rearrange(v, "b s k d -> b k s d")
        if bias is not None:
            bias = _group_heads(bias, groups)
        if mask is not None:  # an additive -inf-like bias: one add instead of a select per score
            mask = jnp.where(mask > 0, 0.0, jnp.finfo(jnp.float32).min)[:, :, None]
        # At most MAX_QUERY_BLOCKS blocks: long sequences get larger blocks, not more small kernels.
        q_len = q.shape[3]
        block = max(self.causal_query_block, q_len // MAX_QUERY_BLOCKS) if self.causal_query_block else 0
        if block and q_len == k.shape[2] and q_len > block and q_len % block == 0:
            out = jnp.concatenate([_attend(q[:, :, :, i:i + block], k[:, :, :i + block], v[:, :, :i + block],
                                           _rows_cols(bias, i, block), _rows_cols(mask, i, block), dropout, self.dtype)
                                   for i in range(0, q_len, block)], axis=3)
        else:
            out = _attend(q, k, v, bias, mask, dropout, self.dtype)
        return out


def _attend(q, k, v, bias, mask_bias, dropout, dtype):
    """softmax(q k^T + bias + mask) v over [b, kv_heads, group, length, head_dim] blocks."""
    return _attend_parts(q, [(k, v, (bias, mask_bias))], dropout, dtype)


def _attend_parts(q, parts, dropout, dtype):
    """One softmax over the keys of several (keys, values, additive terms) parts, e.g. the KV cache
    and the chunk itself, without concatenating the cache."""
    scores = []
    for k, _, additive in parts:
        s = jnp.einsum("bkgld,bksd->bkgls", q, k, preferred_element_type=jnp.float32)
        for a in additive:
            if a is not None:
                s = s + a
        scores.append(s)
    weights = jax.nn.softmax(jnp.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0], axis=-1)
    weights = weights.astype(dtype)
    if dropout is not None:
        weights = dropout(weights)
    out, start = 0.0, 0
    for s, (_, v, _) in zip(scores, parts):
        w = weights[..., start:start + s.shape[-1]]
        start += s.shape[-1]
        out = out + jnp.einsum("bkgls,bksd->bkgld", w, v, preferred_element_type=jnp.float32)
    return out.astype(dtype)


def _group_heads(bias, groups: int):
    """[b, heads, q, k] -> [b, kv_heads, group, q, k], float32."""
    return rearrange(jnp.asarray(bias, jnp.float32), "b (k g) l s -> b k g l s", g=groups)


def _rows_cols(x, start: int, block: int):
    """Query rows [start, start + block) and key columns [0, start + block) of a [..., q, k] array."""
    return None if x is None else x[..., start:start + block, :start + block]
