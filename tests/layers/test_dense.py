"""DenseGeneral: multi-axis contractions, per-axis logical names, fan-in of the real kernel."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from t5x_like.layers import DenseGeneral


def test_multi_axis_projection_matches_einsum(random_params):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 4, 8)).astype(np.float32)  # [batch, length, heads, kv]
    mod = DenseGeneral(12, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=True)
    params = random_params(mod, x)
    assert params["kernel"].shape == (4, 8, 12) and params["bias"].shape == (12,)
    got = mod.apply({"params": params}, x)
    ref = np.einsum("blhd,hde->ble", x.astype(np.float64), params["kernel"]) + params["bias"]
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    split = DenseGeneral((3, 5), ("embed", "heads", "kv"))
    y = rng.normal(size=(2, 4, 7)).astype(np.float32)
    p2 = random_params(split, y)
    np.testing.assert_allclose(np.asarray(split.apply({"params": p2}, y)),
                               np.einsum("ble,ehd->blhd", y, p2["kernel"]), rtol=1e-5, atol=1e-5)


def test_logical_axes_and_fan_in_init():
    """Each kernel axis carries its name; variance scaling uses the product of contracted dims."""
    x = np.ones((1, 2, 16, 32), np.float32)
    mod = DenseGeneral(64, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=True)
    variables = mod.init(jax.random.key(0), x)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["kernel"]) == ("heads", "kv", "embed") and tuple(specs["bias"]) == ("embed",)
    kernel = np.asarray(nn.unbox(variables)["params"]["kernel"])
    assert abs(kernel.std() * np.sqrt(16 * 32) - 1.0) < 0.1, kernel.std()
    with pytest.raises(ValueError, match="kernel_axes"):
        DenseGeneral(4, ("embed",)).init(jax.random.key(0), x)
