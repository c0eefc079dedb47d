"""Shared fixtures for parity tests against Hugging Face `transformers` (random weights, no download).

Use them as fixtures: `def test_x(assert_logits_match, save_hf): ...`.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _relative_error(ours, ref, mask=None) -> float:
    """max |ours - ref| / max |ref| over positions where mask (broadcast over vocab) is true."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        m = np.broadcast_to(np.asarray(mask, bool)[..., None], ours.shape)
        ours, ref = ours[m], ref[m]
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _assert_logits_match(ours, ref, mask=None, rtol=1e-4):
    assert np.shape(ours) == np.shape(ref), f"shapes differ: {np.shape(ours)} vs {np.shape(ref)}"
    err = _relative_error(ours, ref, mask)
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def _save_hf(model, path):
    """save_pretrained with safetensors (the only format t5x_like reads); returns the folder."""
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


@pytest.fixture
def relative_error():
    return _relative_error


@pytest.fixture
def assert_logits_match():
    return _assert_logits_match


@pytest.fixture
def save_hf():
    return _save_hf


@pytest.fixture(autouse=True)
def _torch_seed():
    torch.manual_seed(0)
    yield
