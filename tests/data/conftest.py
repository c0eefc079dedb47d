"""Data tests share one data directory per session: the embedded corpus and its SentencePiece model
are built once (a few seconds) in a temporary folder, never in the user's cache."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5x_like_data")
    old = os.environ.get("T5X_LIKE_DATA_DIR")
    os.environ["T5X_LIKE_DATA_DIR"] = str(path)
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # TF must leave accelerators to JAX
    yield path
    if old is None:
        os.environ.pop("T5X_LIKE_DATA_DIR", None)
    else:
        os.environ["T5X_LIKE_DATA_DIR"] = old


@pytest.fixture
def write_file(tmp_path):
    """write_file("a.txt", b"...") -> path; bytes so tests can plant invalid UTF-8."""
    def write(name: str, content: bytes) -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return str(path)
    return write
