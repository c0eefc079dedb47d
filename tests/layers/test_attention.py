"""Attention masks and MultiHeadAttention (MHA, GQA, MQA) against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.layers import MultiHeadAttention, make_cross_mask, make_decoder_mask, make_encoder_mask


# ---------------------------------------------------------------------------------------------
# Masks, each compared with a mask built element by element in numpy.


def _np_decoder_mask(length, batch, targets=None, segments=None, causal_attention=None,
                     positions=None, window=None):
    m = np.zeros((batch, 1, length, length), np.float32)
    pos = np.broadcast_to(np.arange(length), (batch, length)) if positions is None else np.asarray(positions)
    for b in range(batch):
        for i in range(length):
            for j in range(length):
                ok = j <= i
                if causal_attention is not None:
                    ok = ok or bool(causal_attention[b, i] and causal_attention[b, j])
                if targets is not None:
                    ok = ok and targets[b, i] > 0 and targets[b, j] > 0
                if segments is not None:
                    ok = ok and segments[b, i] == segments[b, j]
                if window is not None:
                    ok = ok and pos[b, i] - pos[b, j] < window
                m[b, 0, i, j] = ok
    return m


def test_encoder_mask_matches_numpy():
    """Bidirectional, hides padding keys and queries, and never crosses packed segments."""
    tokens = np.array([[5, 6, 7, 0, 0, 0], [3, 4, 5, 6, 7, 0]])
    segments = np.array([[1, 1, 2, 0, 0, 0], [1, 2, 2, 2, 3, 0]])
    ref_pad = np.zeros((2, 1, 6, 6), np.float32)
    ref_seg = np.zeros((2, 1, 6, 6), np.float32)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                ref_pad[b, 0, i, j] = tokens[b, i] > 0 and tokens[b, j] > 0
                ref_seg[b, 0, i, j] = ref_pad[b, 0, i, j] and segments[b, i] == segments[b, j]
    np.testing.assert_array_equal(np.asarray(make_encoder_mask(jnp.asarray(tokens))), ref_pad)
    np.testing.assert_array_equal(
        np.asarray(make_encoder_mask(jnp.asarray(tokens), jnp.asarray(segments))), ref_seg)


def test_cross_mask_matches_numpy():
    """Decoder queries see non-padding encoder keys of their own segment only."""
    dec = np.array([[4, 5, 6, 7, 0], [4, 5, 6, 0, 0]])
    enc = np.array([[3, 3, 3, 3, 0, 0, 0], [3, 3, 3, 3, 3, 3, 0]])
    dseg = np.array([[1, 1, 2, 2, 0], [1, 2, 2, 0, 0]])
    eseg = np.array([[1, 2, 2, 2, 0, 0, 0], [1, 1, 1, 2, 2, 2, 0]])
    ref_pad = np.zeros((2, 1, 5, 7), np.float32)
    ref_seg = np.zeros((2, 1, 5, 7), np.float32)
    for b in range(2):
        for i in range(5):
            for j in range(7):
                ref_pad[b, 0, i, j] = dec[b, i] > 0 and enc[b, j] > 0
                ref_seg[b, 0, i, j] = ref_pad[b, 0, i, j] and dseg[b, i] == eseg[b, j]
    np.testing.assert_array_equal(np.asarray(make_cross_mask(jnp.asarray(dec), jnp.asarray(enc))), ref_pad)
    got = make_cross_mask(jnp.asarray(dec), jnp.asarray(enc), jnp.asarray(dseg), jnp.asarray(eseg))
    np.testing.assert_array_equal(np.asarray(got), ref_seg)


@pytest.mark.parametrize("use_targets", [False, True])
@pytest.mark.parametrize("use_segments", [False, True])
@pytest.mark.parametrize("use_prefix", [False, True])
@pytest.mark.parametrize("window", [None, 1, 3])
def test_decoder_mask_matches_numpy(use_targets, use_segments, use_prefix, window):
    """Causal + padding + packed segments + prefix-LM + sliding window (on packed positions)."""
    length, batch = 8, 2
    targets = np.array([[5, 6, 7, 8, 9, 4, 0, 0], [5, 6, 7, 8, 9, 4, 3, 2]])
    segments = np.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 2, 2, 2]])
    positions = np.array([[0, 1, 2, 0, 1, 2, 0, 0], [0, 1, 2, 3, 4, 0, 1, 2]])
    prefix = np.array([[1, 1, 0, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 1, 0, 0]])
    kw = dict(
        decoder_target_tokens=jnp.asarray(targets) if use_targets else None,
        segment_ids=jnp.asarray(segments) if use_segments else None,
        causal_attention=jnp.asarray(prefix) if use_prefix else None,
        positions=jnp.asarray(positions) if use_segments else None,
        sliding_window=window)
    got = np.asarray(make_decoder_mask(length, batch, **kw))
    ref = _np_decoder_mask(length, batch, targets if use_targets else None, segments if use_segments else None,
                           prefix if use_prefix else None, positions if use_segments else None, window)
    assert got.shape == (batch, 1, length, length)
    np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------------------------------------
# MultiHeadAttention against a float64 reference that repeats each kv head num_heads // k times.


def _np_rotary(x, positions, theta):
    """Rotate the complex numbers x_i + i x_{i+d/2} by positions * theta^(-2i/d) (float64)."""
    d = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    z = x[..., : d // 2] + 1j * x[..., d // 2:]
    angles = np.asarray(positions, np.float64)[:, :, None, None] * inv_freq
    z = z * np.exp(1j * angles)
    return np.concatenate([z.real, z.imag], axis=-1)


def _np_attention(params, xq, xkv, num_heads, num_kv_heads, head_dim, scale, mask=None, bias=None,
                  rotary_theta=None, pos_q=None, pos_kv=None):
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    xq, xkv = np.asarray(xq, np.float64), np.asarray(xkv, np.float64)

    def proj(x, name):
        y = np.einsum("ble,ehd->blhd", x, p[name]["kernel"])
        return y + p[name]["bias"] if "bias" in p[name] else y

    q, k, v = proj(xq, "query"), proj(xkv, "key"), proj(xkv, "value")
    assert k.shape[2] == num_kv_heads
    if rotary_theta is not None:
        q, k = _np_rotary(q, pos_q, rotary_theta), _np_rotary(k, pos_kv, rotary_theta)
    groups = num_heads // num_kv_heads
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # head h uses kv head h // groups
    s = np.einsum("bqhd,bkhd->bhqk", q, k)
    if scale:
        s = s / np.sqrt(head_dim)
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    if mask is not None:
        s = np.where(np.asarray(mask) > 0, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    w = np.exp(s)
    w = w / w.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", w, v)
    out = np.einsum("bqhd,hde->bqe", o, p["out"]["kernel"])
    return out + p["out"]["bias"] if "bias" in p["out"] else out


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1), (6, 2)])
@pytest.mark.parametrize("scale_scores", [True, False])
def test_gqa_matches_numpy_reference(num_heads, num_kv_heads, scale_scores, random_params):
    """Grouped-query and multi-query attention = MHA with each kv head repeated; with bias and mask."""
    rng = np.random.default_rng(num_heads * 10 + num_kv_heads + 100 * scale_scores)
    batch, lq, lk, embed, head_dim = 2, 5, 7, 16, 8
    xq = rng.normal(size=(batch, lq, embed)).astype(np.float32)
    xkv = rng.normal(size=(batch, lk, embed)).astype(np.float32)
    mask = (rng.random((batch, 1, lq, lk)) < 0.7).astype(np.float32)
    mask[..., 0] = 1.0  # no fully masked query row (the reference would give NaN there)
    bias = rng.normal(size=(1, num_heads, lq, lk)).astype(np.float32)
    mha = MultiHeadAttention(num_heads, num_kv_heads, head_dim, use_bias=True, scale_scores=scale_scores)
    params = random_params(mha, xq, xkv, mask, bias, seed=num_heads + num_kv_heads)
    assert params["key"]["kernel"].shape == (embed, num_kv_heads, head_dim)
    assert params["query"]["kernel"].shape == (embed, num_heads, head_dim)
    got = mha.apply({"params": params}, xq, xkv, mask, bias)
    ref = _np_attention(params, xq, xkv, num_heads, num_kv_heads, head_dim, scale_scores, mask, bias)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)
    # Without mask and bias too (distinct code path: nothing added to the scores).
    got = mha.apply({"params": params}, xq, xkv)
    ref = _np_attention(params, xq, xkv, num_heads, num_kv_heads, head_dim, scale_scores)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_gqa_with_rotary_matches_numpy_reference(num_kv_heads, random_params):
    """Rotary is applied to q and k (at their own positions) before the grouped dot products."""
    rng = np.random.default_rng(num_kv_heads)
    batch, length, embed, heads, head_dim = 2, 6, 16, 4, 8
    x = rng.normal(size=(batch, length, embed)).astype(np.float32)
    pos = np.array([[0, 1, 2, 0, 1, 2], [3, 4, 5, 6, 7, 8]])
    mha = MultiHeadAttention(heads, num_kv_heads, head_dim, rotary_theta=10_000.0)
    params = random_params(mha, x, x)
    mask = np.tril(np.ones((length, length), np.float32))[None, None].repeat(batch, 0)
    got = mha.apply({"params": params}, x, x, mask, None, jnp.asarray(pos), jnp.asarray(pos))
    ref = _np_attention(params, x, x, heads, num_kv_heads, head_dim, True, mask, None, 10_000.0, pos, pos)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)


def test_fully_masked_query_is_finite_and_masked_keys_are_ignored(random_params):
    """A padding query with no visible key must not produce NaN; masked keys have no influence."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 4, 16)).astype(np.float32)
    mask = np.ones((1, 1, 4, 4), np.float32)
    mask[0, 0, 3, :] = 0.0  # query 3 sees nothing
    mask[0, 0, :3, 2] = 0.0  # key 2 hidden from queries 0..2
    mha = MultiHeadAttention(4, 2, 8)
    params = {"params": random_params(mha, x, x)}
    out = np.asarray(mha.apply(params, x, x, mask))
    assert np.all(np.isfinite(out))
    x2 = x.copy()
    x2[0, 2] += 5.0  # key/value 2 changes; queries 0, 1 must not notice (query 2 itself changes)
    out2 = np.asarray(mha.apply(params, x2, x2, mask))
    np.testing.assert_allclose(out2[0, :2], out[0, :2], atol=1e-6)


def test_attention_dropout_is_active_only_when_not_deterministic(random_params):
    """deterministic=True ignores the dropout rate; False draws masks from the 'dropout' rng."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 16)).astype(np.float32)
    plain = MultiHeadAttention(4, 4, 8)
    params = {"params": random_params(plain, x, x)}
    ref = plain.apply(params, x, x)
    det = MultiHeadAttention(4, 4, 8, dropout_rate=0.5, deterministic=True)
    np.testing.assert_allclose(np.asarray(det.apply(params, x, x)), np.asarray(ref), atol=1e-6)
    drop = MultiHeadAttention(4, 4, 8, dropout_rate=0.5, deterministic=False)
    a = drop.apply(params, x, x, rngs={"dropout": jax.random.key(1)})
    b = drop.apply(params, x, x, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(np.asarray(a), np.asarray(b), atol=1e-3)
    assert not np.allclose(np.asarray(a), np.asarray(ref), atol=1e-3)


@pytest.mark.parametrize("num_kv_heads, block", [(4, 4), (2, 8), (1, 3), (2, 1)])
def test_causal_query_blocks_match_numpy_reference(num_kv_heads, block, random_params):
    """Blocked causal attention (query block i against keys up to its last query) equals full
    attention on every query that sees a key, with packing, padding and a relative bias; a length
    the block does not divide falls back to one block; block 1 becomes 16 // 8 = 2 (the block cap)."""
    rng = np.random.default_rng(block)
    batch, length, embed, heads, head_dim = 2, 16, 16, 4, 8
    x = rng.normal(size=(batch, length, embed)).astype(np.float32)
    targets = np.ones((batch, length), np.int32)
    targets[1, 12:] = 0                                                  # padding
    segments = np.array([[1] * 6 + [2] * 10, [1] * 9 + [2] * 3 + [0] * 4])  # packing
    mask = np.asarray(make_decoder_mask(length, batch, jnp.asarray(targets), jnp.asarray(segments)))
    bias = rng.normal(size=(1, heads, length, length)).astype(np.float32)
    mha = MultiHeadAttention(heads, num_kv_heads, head_dim, causal_query_block=block)
    params = random_params(mha, x, x, mask, bias)
    got = np.asarray(mha.apply({"params": params}, x, x, mask, bias))
    seen = mask[:, 0].any(-1)                                            # queries with a visible key
    full_mask = np.where(seen[:, None, :, None], mask, 1.0)              # reference: no NaN rows
    ref = _np_attention(params, x, x, heads, num_kv_heads, head_dim, True, full_mask, bias)
    np.testing.assert_allclose(got[seen], ref[seen], rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(got))


# ---------------------------------------------------------------------------------------------
# The decoding KV cache (layers/kv_cache.py): chunks at per-row positions, ring buffer, int8.


@pytest.mark.parametrize("window, slots, kv_dtype", [(None, 12, None), (3, 3, None), (4, 6, None), (None, 12, "int8")])
def test_cached_chunks_match_numpy_reference(window, slots, kv_dtype, random_params):
    """Rows fed in chunks of 5, 1, 4, 2 tokens (row 1 padded inside chunks, as a ragged prefill is),
    through a full cache or a ring of `slots`, attend as full causal (windowed) attention over the
    whole sequence does, in float64 numpy; int8 storage within its rounding."""
    from t5x_like.layers import kv_cache

    rng = np.random.default_rng(slots)
    batch, length, embed, heads, kv_heads, head_dim, theta = 2, 12, 16, 4, 2, 8, 10_000.0
    x = rng.normal(size=(batch, length, embed)).astype(np.float32)
    mha = MultiHeadAttention(heads, kv_heads, head_dim, rotary_theta=theta, decode=True, sliding_window=window)
    params = random_params(MultiHeadAttention(heads, kv_heads, head_dim, rotary_theta=theta), x, x)
    pos = np.broadcast_to(np.arange(length), (batch, length))
    _, init = mha.init_with_output(jax.random.key(0), x, x, None, None, pos, pos)
    cache = kv_cache.relayout(init["cache"], slots, kv_dtype)
    apply = jax.jit(lambda cache, xs, p: mha.apply({"params": params, "cache": cache}, xs, xs, None, None, p, p,
                                                   mutable=["cache"]))
    got = np.zeros((batch, length, embed), np.float32)
    start = np.zeros(batch, int)
    for size in (5, 1, 4, 2):
        columns = start[:, None] + np.arange(size)[None]
        positions = columns.copy()
        if size > 1:
            positions[1, -1] = -1  # row 1 leaves its last chunk token for the next chunk
        xs = np.take_along_axis(x, np.minimum(columns, length - 1)[:, :, None], axis=1)
        out, mutated = apply(cache, xs, jnp.asarray(positions))
        cache = mutated["cache"]
        for b in range(batch):
            for j, p in enumerate(positions[b]):
                if p >= 0:
                    got[b, p] = np.asarray(out)[b, j]
        start = start + (positions >= 0).sum(1)
    assert np.all(start == np.asarray(cache["cache_index"]))
    mask = np.asarray(make_decoder_mask(length, batch, sliding_window=window))
    ref = _np_attention(params, x, x, heads, kv_heads, head_dim, True, mask, rotary_theta=theta, pos_q=pos, pos_kv=pos)
    tol = 0.05 if kv_dtype == "int8" else 1e-4
    for b in range(batch):  # row 1 wrote fewer positions
        np.testing.assert_allclose(got[b, :start[b]], ref[b, :start[b]], rtol=tol, atol=tol)
    if kv_dtype == "int8":
        assert not np.allclose(got[0], ref[0], rtol=1e-6, atol=1e-6)  # it did quantize
