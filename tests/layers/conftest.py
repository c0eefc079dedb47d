"""Fixtures for layer tests (test folders have no __init__.py, so helpers are shared as fixtures)."""

import flax.linen as nn
import jax
import numpy as np
import pytest


def _random_params(module, *args, seed=0, **kwargs):
    """Params for `module` applied to `args`, drawn with numpy.

    Shapes come from `jax.eval_shape` (nothing is compiled, which keeps the suite fast), and every
    leaf is random: biases and norm scales are not left at 0 / 1, so a missing or misplaced bias
    or scale changes the output.
    """
    shapes = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs)))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            x = 1.0 + 0.2 * rng.standard_normal(s.shape)
        elif name.endswith("['bias']"):
            x = 0.3 * rng.standard_normal(s.shape)
        elif name.endswith("['kernel']"):
            x = rng.standard_normal(s.shape) / np.sqrt(s.shape[0])
        else:
            x = rng.standard_normal(s.shape)
        return np.asarray(x, s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture
def random_params():
    return _random_params
