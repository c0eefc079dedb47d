"""T5 relative-position buckets and bias, and rotary embeddings, against independent references."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.layers import RelativePositionBias, apply_rotary, relative_position_buckets

BUCKET_SETTINGS = [(32, 128), (8, 20), (16, 64), (64, 256)]


def _t5_bucket(relative_position: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """T5's bucketing for one relative position (key - query), written out with Python scalars."""
    n = -relative_position  # query - key: positive when the key is in the past
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        if n < 0:  # key after the query
            bucket += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    log_bucket = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                                 * (num_buckets - max_exact))
    return bucket + min(log_bucket, num_buckets - 1)


@pytest.mark.parametrize("num_buckets,max_distance", BUCKET_SETTINGS)
@pytest.mark.parametrize("bidirectional", [True, False])
def test_buckets_match_scalar_reference(num_buckets, max_distance, bidirectional):
    rel = np.arange(-300, 301)
    got = relative_position_buckets(rel, bidirectional, num_buckets, max_distance)
    ref = np.array([_t5_bucket(int(r), bidirectional, num_buckets, max_distance) for r in rel])
    bad = got != ref
    assert not bad.any(), f"buckets differ at relative positions {rel[bad][:10]}: {got[bad][:10]} vs {ref[bad][:10]}"
    # Any array shape works (the bias module passes a [query, key] grid).
    grid = np.arange(5)[None, :] - np.arange(7)[:, None]
    np.testing.assert_array_equal(
        relative_position_buckets(grid, bidirectional, num_buckets, max_distance),
        np.vectorize(lambda r: _t5_bucket(int(r), bidirectional, num_buckets, max_distance))(grid))


@pytest.mark.parametrize("num_buckets,max_distance", BUCKET_SETTINGS)
def test_bucket_structure(num_buckets, max_distance):
    """Exact small buckets, increasing log buckets, the last bucket beyond max_distance, halves."""
    half = num_buckets // 2
    # Causal: distances into the past below num_buckets // 2 get their own bucket; future -> 0.
    past = -np.arange(0, num_buckets // 2)
    np.testing.assert_array_equal(relative_position_buckets(past, False, num_buckets, max_distance), -past)
    np.testing.assert_array_equal(relative_position_buckets(np.arange(1, 50), False, num_buckets, max_distance), 0)
    far = -np.arange(max_distance, max_distance + 200)
    np.testing.assert_array_equal(relative_position_buckets(far, False, num_buckets, max_distance), num_buckets - 1)
    mid = relative_position_buckets(-np.arange(num_buckets // 2, max_distance), False, num_buckets, max_distance)
    assert np.all(np.diff(mid) >= 0) and mid.min() == num_buckets // 2 and mid.max() <= num_buckets - 1
    # Bidirectional: the past uses [0, half), the future [half, num_buckets); exact below half // 2.
    np.testing.assert_array_equal(
        relative_position_buckets(-np.arange(half // 2), True, num_buckets, max_distance), np.arange(half // 2))
    np.testing.assert_array_equal(
        relative_position_buckets(np.arange(1, half // 2), True, num_buckets, max_distance),
        half + np.arange(1, half // 2))
    future = relative_position_buckets(np.arange(1, 300), True, num_buckets, max_distance)
    past = relative_position_buckets(-np.arange(1, 300), True, num_buckets, max_distance)
    assert np.all((future >= half) & (future < num_buckets)) and np.all(past < half)
    np.testing.assert_array_equal(future - half, past)  # symmetric distances, different halves
    assert future[-1] == num_buckets - 1 and past[-1] == half - 1


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bias_looks_up_buckets(bidirectional, random_params):
    """Bias[0, h, q, k] = table[bucket(k - q - offset), h]; the table is [num_buckets, heads]."""
    mod = RelativePositionBias(8, 20, num_heads=3, bidirectional=bidirectional)
    params = random_params(mod, 5, 7)
    table = np.asarray(params["rel_embedding"])
    assert table.shape == (8, 3)
    for offset in (0, 4):
        got = np.asarray(mod.apply({"params": params}, 5, 7, offset))
        assert got.shape == (1, 3, 5, 7)
        for q in range(5):
            for k in range(7):
                b = _t5_bucket(k - (q + offset), bidirectional, 8, 20)
                np.testing.assert_allclose(got[0, :, q, k], table[b], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Rotary


def _np_rotary(x, positions, theta):
    """Rotate the complex pairs x_i + i x_{i+d/2} by angle position * theta^(-2i/d), in float64."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    z = x[..., : d // 2] + 1j * x[..., d // 2:]
    z = z * np.exp(1j * np.asarray(positions, np.float64)[:, :, None, None] * inv_freq)
    return np.concatenate([z.real, z.imag], axis=-1)


@pytest.mark.parametrize("theta", [10_000.0, 500.0])
def test_rotary_matches_complex_rotation(theta):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 3, 16)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4, 5], [7, 0, 1, 2, 40, 41]])
    got = apply_rotary(jnp.asarray(x), jnp.asarray(pos), theta)
    assert got.dtype == jnp.float32 and got.shape == x.shape
    np.testing.assert_allclose(np.asarray(got), _np_rotary(x, pos, theta), rtol=1e-5, atol=1e-5)
    # Position 0 is the identity; other positions are not.
    np.testing.assert_allclose(np.asarray(got)[0, 0], x[0, 0], atol=1e-6)
    assert not np.allclose(np.asarray(got)[0, 1], x[0, 1], atol=1e-3)


def test_rotary_preserves_norms_and_dtype():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 9, 4, 8)).astype(np.float32)
    pos = rng.integers(0, 1000, size=(2, 9))
    out = np.asarray(apply_rotary(jnp.asarray(x), jnp.asarray(pos)))
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    out16 = apply_rotary(jnp.asarray(x, jnp.bfloat16), jnp.asarray(pos))
    assert out16.dtype == jnp.bfloat16


def test_rotary_scores_depend_only_on_position_difference():
    """<rot(q, m), rot(k, n)> is a function of m - n: shifting both positions changes nothing."""
    rng = np.random.default_rng(2)
    q = rng.normal(size=(1, 6, 2, 16)).astype(np.float32)
    k = rng.normal(size=(1, 6, 2, 16)).astype(np.float32)
    pos = np.array([[0, 1, 2, 5, 9, 20]])

    def scores(pq, pk):
        rq = np.asarray(apply_rotary(jnp.asarray(q), jnp.asarray(pq)), np.float64)
        rk = np.asarray(apply_rotary(jnp.asarray(k), jnp.asarray(pk)), np.float64)
        return np.einsum("blhd,bshd->bhls", rq, rk)

    base = scores(pos, pos)
    for shift in (1, 17, 300):
        np.testing.assert_allclose(scores(pos + shift, pos + shift), base, rtol=1e-4, atol=1e-4)
    # Shifting only the keys changes the relative positions, hence the scores.
    assert not np.allclose(scores(pos, pos + 3), base, atol=1e-2)
