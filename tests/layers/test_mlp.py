"""Feed-forward blocks (plain and gated) against numpy."""

import math

import jax
import numpy as np
import pytest

from t5x_like.layers import Mlp

_ERF = np.vectorize(math.erf)
NP_ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": lambda x: 0.5 * x * (1.0 + _ERF(x / np.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3))),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "linear": lambda x: x,
}


@pytest.mark.parametrize("activations", [("relu",), ("gelu",), ("gelu_tanh",), ("silu", "linear"),
                                         ("gelu_tanh", "linear")])
@pytest.mark.parametrize("use_bias", [False, True])
def test_mlp_matches_numpy(activations, use_bias, random_params):
    """wo(prod_i act_i(wi_i x)): one projection `wi` when plain, `wi_0`, `wi_1` when gated."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 16)).astype(np.float32)
    mod = Mlp(24, activations, use_bias=use_bias)
    params = random_params(mod, x)
    names = ["wi"] if len(activations) == 1 else [f"wi_{i}" for i in range(len(activations))]
    assert set(params) == set(names) | {"wo"}
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    hidden = 1.0
    for name, act in zip(names, activations):
        h = x @ p[name]["kernel"] + (p[name]["bias"] if use_bias else 0.0)
        hidden = hidden * NP_ACTIVATIONS[act](h)
    ref = hidden @ p["wo"]["kernel"] + (p["wo"]["bias"] if use_bias else 0.0)
    got = mod.apply({"params": params}, x)
    assert got.shape == x.shape
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)


def test_gelu_variants_differ():
    """'gelu' is the exact erf form and 'gelu_tanh' the approximation; mixing them up is a bug."""
    from t5x_like.layers.mlp import ACTIVATION_FNS
    x = np.linspace(-4, 4, 101).astype(np.float32)
    np.testing.assert_allclose(np.asarray(ACTIVATION_FNS["gelu"](x)), NP_ACTIVATIONS["gelu"](x), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ACTIVATION_FNS["gelu_tanh"](x)), NP_ACTIVATIONS["gelu_tanh"](x), atol=1e-6)
    assert np.max(np.abs(NP_ACTIVATIONS["gelu"](x) - NP_ACTIVATIONS["gelu_tanh"](x))) > 1e-4


def test_mlp_dropout_only_when_not_deterministic(random_params):
    x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
    params = {"params": random_params(Mlp(32), x)}
    ref = np.asarray(Mlp(32).apply(params, x))
    np.testing.assert_allclose(np.asarray(Mlp(32, dropout_rate=0.5).apply(params, x)), ref, atol=1e-6)
    drop = Mlp(32, dropout_rate=0.5, deterministic=False)
    a = np.asarray(drop.apply(params, x, rngs={"dropout": jax.random.key(0)}))
    b = np.asarray(drop.apply(params, x, rngs={"dropout": jax.random.key(1)}))
    assert not np.allclose(a, b, atol=1e-3) and not np.allclose(a, ref, atol=1e-3)
