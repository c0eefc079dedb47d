"""Parity of the GPT-2 converter with `transformers` on tiny random models (no download)."""

import json

import numpy as np
import pytest

import transformers
from safetensors.numpy import load_file, save_file

from t5x_like.interop import hf

from causal_lm_parity import hf_logits, our_logits, padded_batch  # noqa: E402

LENGTH = 16
LENGTHS = (LENGTH, 11, 5)  # one full row, two padded
CONFIGS = {
    "small": dict(vocab_size=128, n_embd=32, n_head=4, n_layer=2, n_positions=32),
    "wider_gelu": dict(vocab_size=256, n_embd=64, n_head=8, n_layer=2, n_positions=48, n_inner=96,
                       activation_function="gelu", layer_norm_epsilon=1e-6,
                       # Accepted as a precision-only switch; it acts only in eager attention.
                       reorder_and_upcast_attn=True, attn_implementation="eager"),
    "untied": dict(vocab_size=128, n_embd=32, n_head=2, n_layer=2, n_positions=32, tie_word_embeddings=False),
}


def build(name):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIGS[name])).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match(name, tmp_path, save_hf, assert_logits_match, relative_error):
    ref_model = build(name)
    model, variables = hf.load(save_hf(ref_model, tmp_path / "hf"))
    assert model.config.tie_embeddings == ref_model.config.tie_word_embeddings
    ids, mask = padded_batch(ref_model.config.vocab_size, LENGTHS)
    ours, ref = our_logits(model, variables, ids), hf_logits(ref_model, ids, mask)
    print(f"{name}: max relative error {relative_error(ours, ref, mask):.3g}")
    assert_logits_match(ours, ref, mask)


@pytest.mark.parametrize("name", ["small", "untied"])
def test_scan_layers_and_round_trip(name, tmp_path, save_hf, assert_logits_match):
    ref_model = build(name)
    path = save_hf(ref_model, tmp_path / "hf")
    ids, mask = padded_batch(ref_model.config.vocab_size, LENGTHS)
    model, variables = hf.load(path)
    first = our_logits(model, variables, ids)

    scanned, scanned_vars = hf.load(path, scan_layers=True)
    assert_logits_match(our_logits(scanned, scanned_vars, ids), first, rtol=1e-6)

    for i, (m, v) in enumerate([(model, variables), (scanned, scanned_vars)]):
        out = tmp_path / f"export{i}"
        hf.save(m, v, out)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert isinstance(reloaded, transformers.GPT2LMHeadModel)
        np.testing.assert_array_equal(hf_logits(reloaded, ids, mask), hf_logits(ref_model, ids, mask))
        again, again_vars = hf.load(out)
        np.testing.assert_array_equal(our_logits(again, again_vars, ids), first)


def test_legacy_weight_names(tmp_path, save_hf, assert_logits_match, caplog):
    """OpenAI-converted checkpoints drop the `transformer.` prefix and keep causal-mask buffers."""
    ref_model = build("small")
    path = tmp_path / "hf"
    save_hf(ref_model, path)
    weights = {k.removeprefix("transformer."): v for k, v in load_file(path / "model.safetensors").items()}
    for i in range(ref_model.config.n_layer):
        weights[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
        weights[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    model, variables = hf.load(path)
    assert "not used" not in caplog.text
    ids, mask = padded_batch(ref_model.config.vocab_size, LENGTHS)
    assert_logits_match(our_logits(model, variables, ids), hf_logits(ref_model, ids, mask), mask)


@pytest.mark.parametrize("changes, field", [
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(add_cross_attention=True), "add_cross_attention"),
    (dict(activation_function="quick_gelu"), "activation_function"),
])
def test_unsupported_config_is_refused(changes, field, tmp_path, save_hf):
    path = tmp_path / "hf"
    save_hf(build("small"), path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))
    with pytest.raises(hf.HFInteropError, match=field):
        hf.load(path)
