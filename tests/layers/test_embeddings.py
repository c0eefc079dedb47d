"""Token embeddings (lookup and tied output projection) and sinusoidal positions against numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.layers import Embed, sinusoidal_positions


@pytest.mark.parametrize("features", [8, 32, 7])
def test_sinusoidal_positions_match_numpy(features):
    """First half sin(p / 10000^(i / (half - 1))), second half the cosines; odd widths zero-padded."""
    pos = np.array([[0, 1, 2, 3, 50], [7, 0, 1, 2, 511]])
    got = np.asarray(sinusoidal_positions(jnp.asarray(pos), features))
    assert got.shape == (2, 5, features)
    half = features // 2
    timescales = 10_000.0 ** (np.arange(half) / (half - 1))
    angles = pos[..., None] / timescales
    ref = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)
    if features % 2:
        ref = np.concatenate([ref, np.zeros(ref.shape[:-1] + (1,))], axis=-1)
    np.testing.assert_allclose(got, ref, atol=2e-4)  # float32 angles up to 511 rad
    np.testing.assert_allclose(got[0, 0, :half], 0.0)  # position 0: sin 0 = 0, cos 0 = 1
    np.testing.assert_allclose(got[0, 0, half: 2 * half], 1.0)


def test_embed_lookup_and_attend(random_params):
    ids = np.array([[3, 0, 9], [1, 1, 2]])
    mod = Embed(10, 6)
    params = random_params(mod, ids)
    table = np.asarray(params["embedding"])
    np.testing.assert_allclose(np.asarray(mod.apply({"params": params}, ids)), table[ids])
    x = np.random.default_rng(0).normal(size=(2, 3, 6)).astype(np.float32)
    got = mod.apply({"params": params}, x, method=Embed.attend)
    np.testing.assert_allclose(np.asarray(got), x @ table.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="integer ids"):
        mod.apply({"params": params}, ids.astype(np.float32))


def test_embed_bfloat16_computation_keeps_float32_table(random_params):
    ids = np.array([[3, 4]])
    mod = Embed(10, 6, dtype=jnp.bfloat16)
    params = random_params(mod, ids)
    assert params["embedding"].dtype == np.float32
    out = mod.apply({"params": params}, ids)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(params["embedding"])[ids], rtol=1e-2)
