"""The self-attention KV cache: chunk writes at per-row positions, a ring buffer, int8 storage.

One attention layer's cache (a scanned stack adds a leading `layers` axis to every leaf):
  cached_key, cached_value [batch, slots, kv_heads, head_dim]: float, or int8 codes with
      key_scale, value_scale [batch, slots, kv_heads] (per-token, per-head absmax / 127);
  cached_pos [batch, slots]: the position each slot holds (-1: empty);
  cache_index [batch]: positions committed per row (the next position to write).
Position p lives in slot p % slots: `slots` is the decode length (a full cache) or a sliding
window (plus slack), a ring buffer that overwrites positions the window no longer sees.

A chunk is k tokens per row at `positions` [batch, k] (k = 1: a decode step; the prompt: prefill;
gamma + 1: speculative verification). Position -1 marks padding: neither attended nor written.
The chunk attends to the committed entries before its first position plus itself (causally), then
is written; a row's index becomes its last written position + 1, so writing at a position
truncates the row there, and `set_index` rolls rows back (speculative rejection).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

KV_CACHE_DTYPES = (None, "int8")
NAMES = ("cached_key", "cached_value", "cached_pos", "cache_index", "key_scale", "value_scale")


def allocate(lead: tuple, slots: int, kv_heads: int, head_dim: int, dtype, kv_cache_dtype: Optional[str] = None):
    """An empty cache; `lead` = (batch,) or (layers, batch)."""
    store_dtype = jnp.int8 if kv_cache_dtype == "int8" else dtype
    cache = {"cached_key": jnp.zeros(lead + (slots, kv_heads, head_dim), store_dtype),
             "cached_value": jnp.zeros(lead + (slots, kv_heads, head_dim), store_dtype),
             "cached_pos": jnp.full(lead + (slots,), -1, jnp.int32),
             "cache_index": jnp.zeros(lead, jnp.int32)}
    if kv_cache_dtype == "int8":
        cache["key_scale"] = jnp.zeros(lead + (slots, kv_heads), jnp.float32)
        cache["value_scale"] = jnp.zeros(lead + (slots, kv_heads), jnp.float32)
    return cache


def relayout(tree, slots: Optional[int] = None, kv_cache_dtype: Optional[str] = None):
    """Every attention cache in `tree` (abstract or real) replaced by an empty one of `slots` slots
    (None: keep the length) stored as `kv_cache_dtype`; other leaves (cross-attention keys) zeroed."""
    if isinstance(tree, dict) and "cached_key" in tree:
        key = tree["cached_key"]
        *lead, length, heads, dim = key.shape
        return allocate(tuple(lead), slots or length, heads, dim, key.dtype, kv_cache_dtype)
    if isinstance(tree, dict):
        return {k: relayout(v, slots, kv_cache_dtype) for k, v in tree.items()}
    return jnp.zeros(tree.shape, tree.dtype)


def set_index(tree, index):
    """Every layer's `cache_index` set to `index` [batch] (roll rows back: later entries are ignored)."""
    if isinstance(tree, dict):
        return {k: (jnp.broadcast_to(jnp.asarray(index, jnp.int32), v.shape) if k == "cache_index"
                    else set_index(v, index)) for k, v in tree.items()}
    return tree


def quantize(x):
    """int8 codes and float32 scales [..., heads] of x [..., heads, head_dim] (absmax per vector)."""
    x = jnp.asarray(x, jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
    codes = jnp.round(x / jnp.where(scale > 0, scale, 1.0)[..., None])
    return jnp.clip(codes, -127, 127).astype(jnp.int8), scale


def read(cache: dict, dtype):
    """(keys, values) [batch, slots, kv_heads, head_dim] in `dtype`, dequantized if stored as int8."""
    k, v = cache["cached_key"], cache["cached_value"]
    if "key_scale" in cache:
        k = k.astype(jnp.float32) * cache["key_scale"][..., None]
        v = v.astype(jnp.float32) * cache["value_scale"][..., None]
    return k.astype(dtype), v.astype(dtype)


def _chunk_start(cache: dict, positions):
    """Each row's first real position in the chunk (its index if the chunk is all padding)."""
    big = jnp.iinfo(jnp.int32).max
    first = jnp.min(jnp.where(positions >= 0, positions, big), axis=1)
    return jnp.where(first == big, cache["cache_index"], first)


def visible_cached(cache: dict, positions, window: Optional[int] = None):
    """[batch, q, slots]: which cached entries each chunk query sees (committed, before the chunk,
    inside the window)."""
    limit = jnp.minimum(cache["cache_index"], _chunk_start(cache, positions))
    pos = cache["cached_pos"][:, None, :]
    ok = (pos >= 0) & (pos < limit[:, None, None])
    if window is not None:
        ok = ok & (positions[:, :, None] - pos < window)
    return ok


def visible_chunk(positions, window: Optional[int] = None):
    """[batch, q, k]: causal attention inside the chunk, padding hidden."""
    q, k = positions[:, :, None], positions[:, None, :]
    ok = (k >= 0) & (k <= q)
    if window is not None:
        ok = ok & (q - k < window)
    return ok


def write(cache: dict, k, v, positions) -> dict:
    """The cache with chunk keys / values [batch, k, kv_heads, head_dim] at `positions` [batch, k].

    Only each row's last `slots` real positions are written (a ring buffer takes a chunk longer
    than itself), so no two entries share a slot; the rest go to slot `slots`, dropped.
    """
    slots = cache["cached_key"].shape[1]
    real = positions >= 0
    index = jnp.where(jnp.any(real, axis=1), jnp.max(positions, axis=1) + 1, cache["cache_index"])
    keep = real & (positions >= index[:, None] - slots)
    slot = jnp.where(keep, positions % slots, slots)
    rows = jnp.arange(positions.shape[0])[:, None]

    def put(name, x):
        return cache[name].at[rows, slot].set(x.astype(cache[name].dtype), mode="drop")

    out = dict(cache, cache_index=index, cached_pos=put("cached_pos", positions))
    if "key_scale" in cache:
        (kc, ks), (vc, vs) = quantize(k), quantize(v)
        out.update(cached_key=put("cached_key", kc), cached_value=put("cached_value", vc),
                   key_scale=put("key_scale", ks), value_scale=put("value_scale", vs))
    else:
        out.update(cached_key=put("cached_key", k), cached_value=put("cached_value", v))
    return out


def gather_columns(bias, columns):
    """bias [batch, heads, q, positions] at key positions `columns` [batch, n] -> [batch, heads, q, n]."""
    cols = jnp.clip(columns, 0, bias.shape[-1] - 1)[:, None, None, :]
    cols = jnp.broadcast_to(cols, bias.shape[:3] + (columns.shape[1],))
    return jnp.take_along_axis(bias, cols, axis=-1)
