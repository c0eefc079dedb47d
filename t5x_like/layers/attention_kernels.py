"""Fused attention kernels behind `attention_impl`: jax.nn.dot_product_attention and Pallas splash.

Both take the layout `MultiHeadAttention` works in: queries [batch, kv_heads, group, length, head_dim]
already scaled, keys / values [batch, length, kv_heads, head_dim], and the caller's boolean-valued
mask [batch, 1, q, k]; they return [batch, kv_heads, group, length, head_dim]. Softmax runs in
float32, as in the blocked XLA path (attention.py), which they must equal.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from einops import rearrange

IMPLS = ("auto", "xla", "dot_product", "pallas")
AUTO = {"cpu": "xla", "gpu": "dot_product", "tpu": "pallas"}  # "auto", by jax.default_backend()
SPLASH_BLOCKS = (512, 256, 128)  # the first dividing the length (splash needs multiples of 128)


def _half(dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve(impl: str, *, causal: bool, length: int, xla_only: bool, dtype=jnp.float32) -> str:
    """The implementation to trace. Dropout on the weights and an additive bias (T5's relative
    positions) exist only in the XLA path; splash covers causal self-attention (its masks are
    static), so other attention takes the XLA path too, as do lengths splash cannot block. "auto"
    on GPU in float32 keeps the blocked XLA path: cuDNN has no float32 flash kernel."""
    if impl == "auto":
        impl = AUTO.get(jax.default_backend(), "xla")
        if impl == "dot_product" and not _half(dtype):
            impl = "xla"
    if xla_only or (impl == "pallas" and (not causal or length % SPLASH_BLOCKS[-1])):
        return "xla"
    return impl


def dot_product(q, k, v, mask, causal: bool, window: Optional[int], dtype):
    """jax.nn.dot_product_attention: cuDNN flash attention on GPU in half precision (cuDNN has no
    float32 kernel), XLA elsewhere. `causal` and `window` restate what `mask` holds, so cuDNN can
    skip the blocks they hide; the mask itself keeps padding and packed segments exact."""
    groups = q.shape[2]
    query = rearrange(q, "b k g l d -> b l (k g) d").astype(k.dtype)
    out = jax.nn.dot_product_attention(
        query, k, v, mask=None if mask is None else mask > 0, scale=1.0, is_causal=causal,
        local_window_size=(window - 1, 0) if window is not None and causal else None,
        implementation="cudnn" if jax.default_backend() == "gpu" and _half(k.dtype) else None)
    return rearrange(out, "b l (k g) d -> b k g l d", g=groups).astype(dtype)


def segment_ids_from_mask(mask, length: int):
    """Packed-segment ids [batch, length] of a causal self-attention mask built by
    `make_decoder_mask` (causal, same segment, sliding window, padding): position i starts a new
    segment exactly when it may not see position i - 1, so the ids are a running count of the zeros
    on the mask's first sub-diagonal (O(length) values; XLA need not build the rest of the mask).
    Padding queries (all-zero rows) become one-token segments, differing from the XLA path only in
    those rows, which no other query sees."""
    if mask is None:
        return jnp.ones((1, length), jnp.int32)
    below = jnp.diagonal(mask[:, 0], offset=-1, axis1=1, axis2=2) > 0  # [batch, length - 1]
    starts = jnp.concatenate([jnp.ones_like(below[:, :1]), ~below], axis=1)
    return jnp.cumsum(starts.astype(jnp.int32), axis=1)


def _splash_kernel(groups: int, length: int, window: Optional[int], interpret: bool):
    """A multi-query splash kernel: `groups` query heads against one key / value head."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = next(b for b in SPLASH_BLOCKS if length % b == 0)
    if window is None:
        head = splash.CausalMask((length, length))
    else:  # keys at most window - 1 positions behind, none ahead
        head = splash.LocalMask((length, length), (window - 1, 0), offset=0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                              block_kv_dq=block)
    return splash.make_splash_mqa_single_device(splash.MultiHeadMask([head] * groups), block_sizes=sizes,
                                                interpret=interpret), splash.SegmentIds


def splash(q, k, v, mask, window: Optional[int], dtype):
    """Pallas splash attention for causal self-attention (sliding window optional), packed segments
    recovered from `mask`; interpreted off TPU (slow: for tests)."""
    batch, _, groups, length, _ = q.shape
    kernel, segment_ids = _splash_kernel(groups, length, window, jax.default_backend() != "tpu")
    ids = jnp.broadcast_to(segment_ids_from_mask(mask, length), (batch, length))
    k = rearrange(k, "b s k d -> b k s d").astype(q.dtype)
    v = rearrange(v, "b s k d -> b k s d").astype(q.dtype)
    per_head = lambda q, k, v, ids: kernel(q, k, v, segment_ids=segment_ids(ids, ids))  # noqa: E731
    per_row = jax.vmap(per_head, in_axes=(0, 0, 0, None))  # over key / value heads
    out = jax.vmap(per_row)(q, k, v, ids)
    return out.astype(dtype)

