"""RMSNorm and LayerNorm against numpy, including bfloat16 activations normalised in float32."""

import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.layers import Norm


def _np_norm(x, kind, scale, bias=None, eps=1e-6):
    x = np.asarray(x, np.float64)
    if kind == "layer":
        x = x - x.mean(-1, keepdims=True)
    y = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale
    return y + bias if bias is not None else y


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("eps", [1e-6, 1e-1])
def test_norm_matches_numpy(kind, eps, random_params):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 5, 32)) * 3 + 1.5).astype(np.float32)  # non-zero mean: rms != layer
    mod = Norm(kind, eps)
    params = random_params(mod, x)
    assert set(params) == ({"scale", "bias"} if kind == "layer" else {"scale"})
    got = mod.apply({"params": params}, x)
    assert got.dtype == jnp.float32
    ref = _np_norm(x, kind, params["scale"], params.get("bias"), eps)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_bfloat16_input_is_normalised_in_float32(kind, random_params):
    """bf16 in, bf16 out, but the statistics are float32: the result is the float32 result rounded.

    Doing the arithmetic in bfloat16 instead matches the correctly rounded value on only about
    half of the elements, so requiring (nearly) all of them catches it.
    """
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 8, 64)) * 3 + 0.5, jnp.bfloat16)
    mod = Norm(kind, dtype=jnp.bfloat16)
    params = random_params(mod, x, seed=3)
    assert all(np.asarray(p).dtype == np.float32 for p in params.values())
    got = mod.apply({"params": params}, x)
    assert got.dtype == jnp.bfloat16
    ref = jnp.asarray(_np_norm(np.asarray(x, np.float32), kind, params["scale"], params.get("bias")), jnp.bfloat16)
    exact = float(np.mean(np.asarray(got == ref)))
    assert exact > 0.99, f"only {exact:.1%} of bf16 outputs equal the rounded float32 result"
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=2 ** -7, atol=1e-2)
