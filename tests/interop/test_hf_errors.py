"""Checkpoints that cannot be converted fail with a message naming the culprit, and nothing saved is damaged.

The file handling and checks live in `hf.py`; the T5 converter is the vehicle.
"""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import safetensors.numpy  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from t5x_like.interop import hf  # noqa: E402
from t5x_like.interop.hf_t5 import config_to_hf  # noqa: E402
from t5x_like.models import EncoderDecoderConfig, model_for_config  # noqa: E402


@pytest.fixture
def checkpoint(tmp_path, save_hf):
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=2,
                                   num_decoder_layers=1)
    return save_hf(transformers.T5ForConditionalGeneration(config), tmp_path / "t5")


def _edit_config(path, **changes):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    config.update(changes)
    with open(file, "w") as f:
        json.dump(config, f)


def _snapshot(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def test_unsupported_architecture(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"architectures": ["FooForBar"], "model_type": "foo"}, f)
    with pytest.raises(hf.HFInteropError, match="FooForBar") as e:
        hf.load(tmp_path)
    assert "T5ForConditionalGeneration" in str(e.value)  # says what is supported


def test_missing_weight(checkpoint):
    file = os.path.join(checkpoint, "model.safetensors")
    weights = load_file(file)
    del weights["decoder.block.0.layer.1.EncDecAttention.q.weight"]
    save_file(weights, file, metadata={"format": "pt"})
    with pytest.raises(hf.HFInteropError, match=r"missing weight 'decoder\.block\.0\.layer\.1\.EncDecAttention\.q"):
        hf.load(checkpoint)


def test_shape_mismatch_names_weight_and_shapes(checkpoint):
    _edit_config(checkpoint, d_ff=40)
    with pytest.raises(hf.HFInteropError) as e:
        hf.load(checkpoint)
    msg = str(e.value)
    assert "encoder.block.0.layer.1.DenseReluDense.wi.weight" in msg
    assert "(32, 16)" in msg and "(40, 16)" in msg


def test_unsupported_feed_forward_proj(checkpoint):
    _edit_config(checkpoint, feed_forward_proj="gated-mish")
    with pytest.raises(hf.HFInteropError, match="gated-mish"):
        hf.load(checkpoint)


def test_untied_head_with_scaled_outputs_is_refused(checkpoint):
    # transformers would use this lm_head and scale by d_model**-0.5: no t5x_like model does both.
    file = os.path.join(checkpoint, "model.safetensors")
    weights = load_file(file)
    weights["lm_head.weight"] = weights["shared.weight"] + 1.0
    save_file(weights, file, metadata={"format": "pt"})
    with pytest.raises(hf.HFInteropError, match="lm_head.weight differs from shared.weight"):
        hf.load(checkpoint)


def test_pickle_only_folder_is_refused(checkpoint):
    os.remove(os.path.join(checkpoint, "model.safetensors"))
    with open(os.path.join(checkpoint, "pytorch_model.bin"), "wb") as f:
        f.write(b"not to be unpickled")
    with pytest.raises(hf.HFInteropError, match="pytorch_model.bin.*never loads"):
        hf.load(checkpoint)


def test_no_config(tmp_path):
    with pytest.raises(hf.HFInteropError, match="no config.json"):
        hf.load(tmp_path)
    with pytest.raises(hf.HFInteropError, match="not a directory"):
        hf.load(tmp_path / "absent")


def test_unexportable_config_names_every_problem():
    cfg = EncoderDecoderConfig(norm_type="layer", use_bias=True, num_kv_heads=2)
    with pytest.raises(hf.HFInteropError) as e:
        config_to_hf(cfg)
    assert all(s in str(e.value) for s in ("norm_type='layer'", "use_bias", "num_kv_heads=2"))


def _tiny_model(**changes):
    cfg = EncoderDecoderConfig(vocab_size=64, d_model=16, num_heads=2, head_dim=8, mlp_dim=32,
                               num_encoder_layers=1, num_decoder_layers=1, **changes)
    model = model_for_config(cfg)
    return model, model.init_variables(jax.random.key(0))


def test_save_overwrites_atomically(checkpoint, monkeypatch):
    before = _snapshot(checkpoint)
    parent = os.path.dirname(checkpoint)

    # Refused before anything is written.
    with pytest.raises(hf.HFInteropError, match="norm_type"):
        hf.save(*_tiny_model(norm_type="layer"), checkpoint)
    assert _snapshot(checkpoint) == before

    # Failing halfway through writing the weights leaves the old checkpoint and no temporary folder.
    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.numpy, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        hf.save(*_tiny_model(), checkpoint)
    monkeypatch.undo()
    assert _snapshot(checkpoint) == before
    assert sorted(os.listdir(parent)) == ["t5"]

    # A successful save replaces it.
    model, variables = _tiny_model()
    hf.save(model, variables, checkpoint)
    loaded, loaded_vars = hf.load(checkpoint)
    assert loaded.config.d_model == 16 and loaded.config.num_encoder_layers == 1
    np.testing.assert_array_equal(loaded_vars["params"]["token_embed"]["embedding"],
                                  variables["params"]["token_embed"]["embedding"])
