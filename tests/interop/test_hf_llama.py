"""Parity of the Llama/Mistral converter with `transformers` on tiny random models (no download)."""

import json

import numpy as np
import pytest

import transformers

from t5x_like.interop import hf, hf_llama

from causal_lm_parity import hf_logits, our_logits, padded_batch  # noqa: E402

LENGTH = 16
LENGTHS = (LENGTH, 11, 5)  # one full row, two padded
BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64)
CONFIGS = {
    "mha": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "gqa_tied_theta500k": ("llama", dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                                         rope_theta=500000.0, tie_word_embeddings=True)),
    "mqa": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=False)),
    "head_dim_16": ("llama", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
    "mistral_window4": ("mistral", dict(num_key_value_heads=2, sliding_window=4, tie_word_embeddings=False)),
}


def build(name):
    family, overrides = CONFIGS[name]
    cfg_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[family]
    return model_cls(cfg_cls(**{**BASE, **overrides})).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match(name, tmp_path, save_hf, assert_logits_match, relative_error):
    ref_model = build(name)
    model, variables = hf.load(save_hf(ref_model, tmp_path / "hf"))
    hc, c = ref_model.config, model.config
    assert (c.num_kv_heads, c.head_dim, c.tie_embeddings, c.sliding_window) == (
        hc.num_key_value_heads, hc.head_dim, hc.tie_word_embeddings, getattr(hc, "sliding_window", None))
    assert c.rotary_theta == hc.rope_parameters["rope_theta"]
    ids, mask = padded_batch(hc.vocab_size, LENGTHS)
    ours, ref = our_logits(model, variables, ids), hf_logits(ref_model, ids, mask)
    print(f"{name}: max relative error {relative_error(ours, ref, mask):.3g}")
    assert_logits_match(ours, ref, mask)


@pytest.mark.parametrize("name", ["gqa_tied_theta500k", "mistral_window4"])
def test_scan_layers_and_round_trip(name, tmp_path, save_hf, assert_logits_match):
    ref_model = build(name)
    path = save_hf(ref_model, tmp_path / "hf")
    ids, mask = padded_batch(ref_model.config.vocab_size, LENGTHS)
    model, variables = hf.load(path)
    first = our_logits(model, variables, ids)

    scanned, scanned_vars = hf.load(path, scan_layers=True)
    assert "layers" in scanned_vars["params"]["decoder"]
    assert_logits_match(our_logits(scanned, scanned_vars, ids), first, rtol=1e-6)

    # Export from the unscanned and the scanned model: both must give HF's own logits back.
    for i, (m, v) in enumerate([(model, variables), (scanned, scanned_vars)]):
        out = tmp_path / f"export{i}"
        hf.save(m, v, out)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(reloaded) is type(ref_model)
        np.testing.assert_array_equal(hf_logits(reloaded, ids, mask), hf_logits(ref_model, ids, mask))
        again, again_vars = hf.load(out)
        np.testing.assert_array_equal(our_logits(again, again_vars, ids), first)


def test_sliding_window_is_hf_semantics(tmp_path, save_hf, relative_error):
    """Only window 4 reproduces HF Mistral's window 4: pins the off-by-one convention of the mask."""
    ref_model = build("mistral_window4")
    path = save_hf(ref_model, tmp_path / "hf")
    ids, _ = padded_batch(ref_model.config.vocab_size, (LENGTH, LENGTH))
    ref = hf_logits(ref_model, ids)
    for window in (3, 4, 5, None):
        model, variables = hf.load(path, sliding_window=window)
        err = relative_error(our_logits(model, variables, ids), ref)
        assert (err <= 1e-4) == (window == 4), f"window {window}: relative error {err:.3g}"


@pytest.mark.parametrize("name", ["gqa_tied_theta500k", "mistral_window4"])
def test_packed_sequences_match_separate_runs(name, tmp_path, save_hf, assert_logits_match):
    model, variables = hf.load(save_hf(build(name), tmp_path / "hf"))
    rng = np.random.default_rng(1)
    a, b = (rng.integers(1, model.config.vocab_size, n).astype(np.int32) for n in (7, 9))
    packed = np.concatenate([a, b])[None]
    segments = np.array([[1] * 7 + [2] * 9], np.int32)
    positions = np.array([list(range(7)) + list(range(9))], np.int32)
    logits = our_logits(model, variables, packed, decoder_segment_ids=segments, decoder_positions=positions)
    assert_logits_match(logits[0, :7], our_logits(model, variables, a[None])[0], rtol=1e-5)
    assert_logits_match(logits[0, 7:], our_logits(model, variables, b[None])[0], rtol=1e-5)


def _edit_config(path, **changes):
    file = path / "config.json"
    cfg = json.loads(file.read_text())
    cfg.update(changes)
    file.write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, field", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope_parameters"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0}), "rope_parameters"),
    (dict(rope_parameters=None, rope_theta=10000.0, rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="tanh"), "hidden_act"),
])
def test_unsupported_config_is_refused(changes, field, tmp_path, save_hf):
    path = tmp_path / "hf"
    save_hf(build("mha"), path)
    _edit_config(path, **changes)
    with pytest.raises(hf.HFInteropError, match=field):
        hf.load(path)


def test_transformers4_config_spelling():
    """4.x writes rope_theta at the top level and rope_scaling: null instead of rope_parameters."""
    cfg = {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 500000.0, "rope_scaling": None}
    c = hf_llama.config_from_hf(cfg)
    assert (c.rotary_theta, c.num_kv_heads, c.head_dim, c.sliding_window) == (500000.0, 4, 8, None)
    assert hf_llama.config_from_hf({**cfg, "model_type": "mistral", "sliding_window": None}).sliding_window is None
