"""Session-wide test setup: 8 fake CPU devices (multi-device tests), no accelerator for TF."""

import os

# Must happen before jax is imported anywhere in the session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Corpus and SentencePiece caches of this session live in a temporary folder, never the user's.
if "T5X_LIKE_DATA_DIR" not in os.environ:
    import tempfile

    os.environ["T5X_LIKE_DATA_DIR"] = tempfile.mkdtemp(prefix="t5x_like_test_data_")

import gin  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _clear_gin():
    """Gin bindings are process-global: a config parsed by one test must not reach the next
    (gin-configurable configs would silently take its values for fields a test leaves unset)."""
    yield
    gin.clear_config()


# Layer and network-assembly tests (tests/layers, tests/models) share this helper as a fixture
# (test folders have no __init__.py).
def _random_params(module, *args, seed=0, **kwargs):
    """Params for `module` applied to `args`, drawn with numpy.

    Shapes come from `jax.eval_shape` (nothing is compiled, which keeps the suite fast), and every
    leaf is random: biases and norm scales are not left at 0 / 1, so a missing or misplaced bias
    or scale changes the output.
    """
    import flax.linen as nn
    import jax
    import numpy as np

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
