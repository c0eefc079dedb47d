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
