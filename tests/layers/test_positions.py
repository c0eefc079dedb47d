"""T5 relative-position buckets and bias, and rotary embeddings (and their scaling), against independent references."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.layers import RelativePositionBias, apply_rotary, relative_position_buckets
from t5x_like.layers.positions import RopeScaling, RopeScalingError, dynamic_inv_freq, rope_inv_freq
from t5x_like.models.config import ConfigError, DecoderOnlyConfig

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


# ---------------------------------------------------------------------------------------------
# Rotary scaling: closed forms written from the papers' reference code, not from our module.

DIM, THETA = 64, 10_000.0
BASE_FREQ = THETA ** (-np.arange(0, DIM, 2, dtype=np.float64) / DIM)


def test_linear_scaling_divides_every_frequency():
    inv, factor = rope_inv_freq(DIM, THETA, RopeScaling("linear", 4.0))
    np.testing.assert_allclose(inv, BASE_FREQ / 4.0, rtol=1e-12)
    assert factor == 1.0


def _meta_llama31_scaling(freqs, factor, low, high, old_len):
    """Meta's `apply_scaling` (llama-models, Llama 3.1), one frequency at a time."""
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(freq)
        elif wavelen > old_len / low:
            out.append(freq / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


@pytest.mark.parametrize("factor, low, high, old_len", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192),
                                                        (4.0, 2.0, 8.0, 256)])
def test_llama3_matches_meta_reference(factor, low, high, old_len):
    s = RopeScaling("llama3", factor, old_len, low_freq_factor=low, high_freq_factor=high)
    inv, attn = rope_inv_freq(DIM, 500_000.0, s)
    base = 500_000.0 ** (-np.arange(0, DIM, 2) / DIM)
    ref = _meta_llama31_scaling(base, factor, low, high, old_len)
    np.testing.assert_allclose(inv, ref, rtol=1e-12)
    assert attn == 1.0
    # All three bands occur: kept, divided by factor, and smoothed in between.
    assert (inv == base).any() and np.isclose(inv, base / factor).any()
    assert ((inv < base) & (inv > base / factor)).any()


def _yarn_reference(dim, base, factor, orig, beta_fast, beta_slow):
    """jquesnelle/yarn's `_yarn_find_correction_range` / `_yarn_linear_ramp_mask`, one dimension at a time."""
    def corr(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))
    low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
    out = []
    for i in range(dim // 2):
        freq = base ** (-2 * i / dim)
        ramp = min(max((i - low) / ((high - low) or 0.001), 0.0), 1.0)
        keep = 1.0 - ramp  # extrapolation weight
        out.append(freq / factor * (1 - keep) + freq * keep)
    return np.array(out), 0.1 * math.log(factor) + 1.0


@pytest.mark.parametrize("factor, orig, beta_fast, beta_slow", [(4.0, 2048, 32, 1), (16.0, 4096, 32, 1),
                                                                (8.0, 512, 16, 2)])
def test_yarn_matches_reference(factor, orig, beta_fast, beta_slow):
    s = RopeScaling("yarn", factor, orig, beta_fast=beta_fast, beta_slow=beta_slow)
    inv, attn = rope_inv_freq(DIM, THETA, s)
    ref, ref_attn = _yarn_reference(DIM, THETA, factor, orig, beta_fast, beta_slow)
    np.testing.assert_allclose(inv, ref, rtol=1e-12)
    assert attn == pytest.approx(ref_attn, rel=1e-12) and attn > 1.0
    # Fast dimensions (many turns over the original length) are kept, slow ones interpolated.
    assert inv[0] == BASE_FREQ[0] and inv[-1] == pytest.approx(BASE_FREQ[-1] / factor, rel=1e-12)


def test_yarn_attention_factor_options():
    assert rope_inv_freq(DIM, THETA, RopeScaling("yarn", 4.0, 512, attention_factor=0.5))[1] == 0.5
    mscale = rope_inv_freq(DIM, THETA, RopeScaling("yarn", 40.0, 4096, mscale=1.0, mscale_all_dim=0.5))[1]
    m = lambda k: 0.1 * k * math.log(40.0) + 1.0  # noqa: E731  (DeepSeek-V2's yarn_get_mscale)
    assert mscale == pytest.approx(m(1.0) / m(0.5), rel=1e-12)
    assert rope_inv_freq(DIM, THETA, RopeScaling("yarn", 1.0, 512))[1] == 1.0  # no scaling, no factor


@pytest.mark.parametrize("factor", [2.0, 8.0])
def test_dynamic_ntk_closed_form(factor):
    """Up to the original length the frequencies are RoPE's; beyond it the base grows so that the
    fastest frequency is kept and the slowest is divided by exactly alpha = factor L / orig - (factor - 1)."""
    s, orig = RopeScaling("dynamic", factor, 256), 256
    for length in (1, 100, 256):
        np.testing.assert_allclose(np.asarray(dynamic_inv_freq(DIM, THETA, s, length)), BASE_FREQ, rtol=1e-6)
    for length in (257, 512, 3000):
        alpha = factor * length / orig - (factor - 1)
        inv = np.asarray(dynamic_inv_freq(DIM, THETA, s, length), np.float64)
        base = THETA * alpha ** (DIM / (DIM - 2))
        np.testing.assert_allclose(inv, base ** (-np.arange(0, DIM, 2) / DIM), rtol=1e-5)
        assert inv[0] == 1.0 and inv[-1] == pytest.approx(BASE_FREQ[-1] / alpha, rel=1e-5)


def _np_scaled_rotary(x, positions, inv_freq, factor=1.0):
    z = x[..., : x.shape[-1] // 2] + 1j * x[..., x.shape[-1] // 2:]
    z = factor * z * np.exp(1j * np.asarray(positions, np.float64)[:, :, None, None] * inv_freq)
    return np.concatenate([z.real, z.imag], axis=-1)


@pytest.mark.parametrize("scaling", [RopeScaling("linear", 4.0), RopeScaling("yarn", 4.0, 16),
                                     RopeScaling("llama3", 8.0, 16), RopeScaling("dynamic", 4.0, 16)],
                         ids=lambda s: s.rope_type)
def test_apply_rotary_with_scaling(scaling):
    """Rotation by the scheme's frequencies (dynamic: at max position + 1 over the batch), cos/sin
    times YaRN's attention factor; all differ from unscaled RoPE at these positions."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 8, 2, DIM)).astype(np.float32)
    pos = np.array([np.arange(8), np.arange(30, 38)])
    if scaling.rope_type == "dynamic":
        inv, factor = np.asarray(dynamic_inv_freq(DIM, THETA, scaling, 38), np.float64), 1.0
    else:
        inv, factor = rope_inv_freq(DIM, THETA, scaling)
    got = np.asarray(apply_rotary(jnp.asarray(x), jnp.asarray(pos), THETA, scaling))
    np.testing.assert_allclose(got, _np_scaled_rotary(x, pos, inv, factor), rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, np.asarray(apply_rotary(jnp.asarray(x), jnp.asarray(pos), THETA)), atol=1e-3)


def test_rope_scaling_bad_input_is_one_line():
    with pytest.raises(RopeScalingError, match=r"rope_type='longrope' is not supported; use one of "
                                               r"linear, dynamic, yarn, llama3$"):
        RopeScaling("longrope", 2.0)
    with pytest.raises(RopeScalingError, match="needs original_max_position_embeddings"):
        RopeScaling("yarn", 4.0)
    with pytest.raises(RopeScalingError, match="factor=0"):
        RopeScaling("linear", 0)
    with pytest.raises(RopeScalingError, match="unknown keys \\['beta'\\]"):
        DecoderOnlyConfig(position_embedding="rotary", rope_scaling={"rope_type": "yarn", "factor": 2.0, "beta": 1})
    with pytest.raises(ConfigError, match="rotary positions only"):
        DecoderOnlyConfig(position_embedding="relative", rope_scaling={"rope_type": "linear", "factor": 2.0})


def test_config_takes_a_gin_dict_and_stays_hashable():
    c = DecoderOnlyConfig(position_embedding="rotary",
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64})
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 64)
    assert hash(c) == hash(c.replace())
