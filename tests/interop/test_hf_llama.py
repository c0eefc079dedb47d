"""Parity of the Llama/Mistral converter with `transformers` on tiny random models (no download)."""

import json

import numpy as np
import pytest

import torch
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
    (dict(rope_parameters={"rope_type": "longrope", "factor": 2.0, "rope_theta": 10000.0}), "rope_parameters"),
    (dict(rope_parameters=None, rope_theta=10000.0, rope_scaling={"type": "su", "factor": 4.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32,
                           "low_freq_factor": 4.0, "high_freq_factor": 1.0}), "high_freq_factor"),
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


# ---------------------------------------------------------------------------------------------
# RoPE scaling: every scheme on a sequence longer than the original length, so the scaling matters.

SCALED_LENGTHS = (40, 29, 7)
ROPE_SCHEMES = {
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 4.0}),
    # HF's dynamic NTK scales beyond max_position_embeddings (16 < 40).
    "dynamic": dict(max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 4.0}),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "yarn_deepseek": dict(rope_parameters={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                                           "beta_fast": 16, "beta_slow": 2, "mscale": 0.9, "mscale_all_dim": 0.5,
                                           "truncate": False}),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
}


def scaled_config(name, family="llama", theta=500.0):
    """theta 500 and head_dim 16: every frequency band (kept, interpolated, in between) occurs."""
    overrides = dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, **ROPE_SCHEMES[name])
    overrides["rope_parameters"] = {**overrides["rope_parameters"], "rope_theta": theta}
    cfg_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}[family]
    return cfg_cls(**{**BASE, **overrides})


def build_scaled(name, family="llama", theta=500.0):
    model_cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM}[family]
    return model_cls(scaled_config(name, family, theta)).eval()


@pytest.mark.parametrize("name", list(ROPE_SCHEMES))
def test_rope_scaled_logits_match(name, tmp_path, save_hf, assert_logits_match, relative_error):
    ref_model = build_scaled(name)
    path = save_hf(ref_model, tmp_path / "hf")
    model, variables = hf.load(path)
    assert model.config.rope_scaling.rope_type == ref_model.config.rope_parameters["rope_type"]
    ids, mask = padded_batch(ref_model.config.vocab_size, SCALED_LENGTHS)
    ref = hf_logits(ref_model, ids, mask)
    ours = our_logits(model, variables, ids)
    print(f"{name}: max relative error {relative_error(ours, ref, mask):.3g}")
    assert_logits_match(ours, ref, mask)
    # The scaling matters on this sequence: the same weights without it are far off.
    plain, plain_vars = hf.load(path, rope_scaling=None)
    assert relative_error(our_logits(plain, plain_vars, ids), ref, mask) > 1e-3


def test_rope_scaled_mistral_matches(tmp_path, save_hf, assert_logits_match):
    """Mistral (sliding window) shares the converter and its rope_scaling."""
    ref_model = build_scaled("yarn", "mistral")
    model, variables = hf.load(save_hf(ref_model, tmp_path / "hf"))
    assert model.config.sliding_window == ref_model.config.sliding_window
    ids, mask = padded_batch(ref_model.config.vocab_size, SCALED_LENGTHS)
    assert_logits_match(our_logits(model, variables, ids), hf_logits(ref_model, ids, mask), mask)


@pytest.mark.slow
def test_rope_scaled_mixtral_matches(tmp_path, save_hf, assert_logits_match):
    """Mixtral's converter reuses hf_llama's config path, rope_scaling included."""
    cfg = transformers.MixtralConfig(**{**BASE, "num_key_value_heads": 2, "num_local_experts": 4,
                                        "num_experts_per_tok": 2, "tie_word_embeddings": False,
                                        **ROPE_SCHEMES["llama3"]})
    ref_model = transformers.MixtralForCausalLM(cfg).eval()
    model, variables = hf.load(save_hf(ref_model, tmp_path / "hf"))
    assert model.config.rope_scaling.rope_type == "llama3" and model.config.num_experts == 4
    ids, mask = padded_batch(cfg.vocab_size, SCALED_LENGTHS)
    assert_logits_match(our_logits(model, variables, ids), hf_logits(ref_model, ids, mask), mask)
    from t5x_like.interop import converter
    assert converter.for_config(model.config).config_to_hf(model.config)["rope_parameters"] == cfg.rope_parameters


@pytest.mark.parametrize("name", ["dynamic", "yarn_deepseek", "llama3"])
def test_rope_scaling_export_round_trip(name, tmp_path, save_hf):
    ref_model = build_scaled(name)
    model, variables = hf.load(save_hf(ref_model, tmp_path / "hf"))
    out = tmp_path / "export"
    hf.save(model, variables, out)
    written = json.loads((out / "config.json").read_text())
    want = {k: v for k, v in ref_model.config.rope_parameters.items() if v is not None}
    for field in ("rope_parameters", "rope_scaling"):  # transformers 5 and 4 spellings
        assert {k: written[field][k] for k in want} == want, field
    assert written["max_position_embeddings"] == ref_model.config.max_position_embeddings
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.rope_parameters == ref_model.config.rope_parameters
    ids, mask = padded_batch(ref_model.config.vocab_size, SCALED_LENGTHS)
    np.testing.assert_array_equal(hf_logits(reloaded, ids, mask), hf_logits(ref_model, ids, mask))
    again, _ = hf.load(out)
    assert again.config == model.config


def test_rope_scaling_transformers4_spelling():
    """4.x: rope_scaling with "type", theta at the top level, original length beside max_position_embeddings."""
    cfg = {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 500000.0, "max_position_embeddings": 4096,
           "rope_scaling": {"type": "yarn", "factor": 2.0}, "original_max_position_embeddings": 1024}
    c = hf_llama.config_from_hf(cfg)
    assert (c.rotary_theta, c.rope_scaling.rope_type, c.rope_scaling.factor) == (500000.0, "yarn", 2.0)
    assert c.rope_scaling.original_max_position_embeddings == 1024
    dynamic = hf_llama.config_from_hf({**cfg, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert dynamic.rope_scaling.original_max_position_embeddings == 4096  # HF's max_position_embeddings


def test_unsupported_rope_type_names_the_supported_ones(tmp_path, save_hf):
    path = tmp_path / "hf"
    save_hf(build("mha"), path)
    _edit_config(path, rope_parameters={"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 4,
                                        "long_factor": [2.0] * 4, "original_max_position_embeddings": 32})
    with pytest.raises(hf.HFInteropError) as info:
        hf.load(path)
    message = str(info.value)
    assert "\n" not in message and "'longrope' is not supported" in message
    assert "use one of default, linear, dynamic, yarn, llama3" in message


@pytest.mark.parametrize("name", list(ROPE_SCHEMES))
def test_inv_freq_matches_transformers(name):
    """Our closed forms against transformers' ROPE_INIT_FUNCTIONS (dynamic: at 3x its original length)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from t5x_like.layers.positions import dynamic_inv_freq, rope_inv_freq
    hf_config = scaled_config(name, theta=10000.0)
    c = hf_llama.config_from_hf(hf_config.to_dict())
    kind = c.rope_scaling.rope_type
    seq_len = 3 * hf_config.max_position_embeddings if kind == "dynamic" else None
    ref, ref_factor = ROPE_INIT_FUNCTIONS[kind](hf_config, None, seq_len=seq_len)
    if kind == "dynamic":
        ours, factor = np.asarray(dynamic_inv_freq(c.head_dim, c.rotary_theta, c.rope_scaling, seq_len)), 1.0
    else:
        ours, factor = rope_inv_freq(c.head_dim, c.rotary_theta, c.rope_scaling)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=3e-7)
    assert factor == pytest.approx(ref_factor, rel=1e-12)


@pytest.mark.parametrize("name", list(ROPE_SCHEMES))
def test_rotation_matches_transformers_rotary_embedding(name):
    """Rotated queries against LlamaRotaryEmbedding + apply_rotary_pos_emb at positions up to 95 (beyond
    the original lengths): tight enough to pin dynamic NTK's sequence length (max position + 1) and YaRN's factor."""
    from transformers.models.llama import modeling_llama

    from t5x_like.layers.positions import apply_rotary
    hf_config = scaled_config(name, theta=10000.0)
    c = hf_llama.config_from_hf(hf_config.to_dict())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 96, 2, c.head_dim)).astype(np.float32)
    positions = np.stack([np.arange(96), np.arange(96) // 2])  # the batch's max position is 95
    cos, sin = modeling_llama.LlamaRotaryEmbedding(hf_config)(torch.zeros(1), torch.as_tensor(positions))
    xt = torch.as_tensor(x).transpose(1, 2)  # HF: [batch, heads, length, head_dim]
    ref, _ = modeling_llama.apply_rotary_pos_emb(xt, xt, cos, sin)
    ours = np.asarray(apply_rotary(x, positions, c.rotary_theta, c.rope_scaling))
    np.testing.assert_allclose(ours, ref.transpose(1, 2).numpy(), rtol=1e-5, atol=2e-5)


def test_rope_scaling_survives_the_model_gin_file(tmp_path, save_hf):
    from t5x_like import gin_config
    model, _ = hf.load(save_hf(build_scaled("yarn_deepseek"), tmp_path / "hf"))
    path = tmp_path / "model.gin"
    path.write_text(gin_config.model_gin_text(model))
    gin_config.parse([str(path)])
    rebuilt = gin_config.model_from_gin()
    assert rebuilt.config == model.config and rebuilt.config.rope_scaling.mscale == 0.9



def _wide(model):
    """Wider weights than the 0.02 init, so greedy paths vary."""
    for p in model.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2) if p.ndim > 1 else None
    return model


PROMPT, NEW = 28, 12  # decoding positions 28..39: beyond the original lengths (16, 32)


@pytest.mark.parametrize("name", ["yarn", pytest.param("linear", marks=pytest.mark.slow),
                                  pytest.param("llama3", marks=pytest.mark.slow)])
def test_rope_scaled_greedy_decoding_matches_generate(name, tmp_path, save_hf):
    """Cached decoding past the original length equals transformers' `generate`, token for token. (Dynamic
    NTK is checked against transformers' cache below: `generate` prefills the whole prompt in one pass.)"""
    from t5x_like.inference import decoding
    ref_model = _wide(build_scaled(name))
    model, variables = hf.load(save_hf(ref_model, tmp_path / "hf"))
    prompts = np.random.default_rng(1).integers(3, BASE["vocab_size"], (2, PROMPT)).astype(np.int32)
    ours = decoding.generate(model, variables, prompts, max_new_tokens=NEW, eos_id=-1, method="greedy")
    with torch.no_grad():
        theirs = ref_model.generate(input_ids=torch.as_tensor(prompts, dtype=torch.long), max_new_tokens=NEW,
                                    do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(ours.tokens, theirs.numpy()[:, PROMPT:])
    assert len(set(ours.tokens[0].tolist())) > 2  # a path that varies, not one repeated token


@pytest.mark.parametrize("prefill", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_dynamic_ntk_cache_matches_transformers_cache(prefill, tmp_path, save_hf):
    """Dynamic NTK with a KV cache: each forward rotates its tokens at its own max position + 1 and cached
    keys keep their rotation, as transformers' DynamicCache does, for the same forward passes (prefill:
    the prompt but its last token in one pass, then one token per pass; else one token per pass)."""
    from t5x_like.inference import decoding
    ref_model = _wide(build_scaled("dynamic"))
    model, variables = hf.load(save_hf(ref_model, tmp_path / "hf"))
    prompts = np.random.default_rng(1).integers(3, BASE["vocab_size"], (2, PROMPT)).astype(np.int32)
    ours = decoding.generate(model, variables, prompts, max_new_tokens=NEW, eos_id=-1, method="greedy",
                             prefill=prefill)
    ids, cache, chunks = torch.as_tensor(prompts, dtype=torch.long), transformers.DynamicCache(), []
    if prefill:
        chunks.append(ids[:, :-1])
    else:
        chunks.extend(ids[:, i:i + 1] for i in range(PROMPT - 1))
    theirs = []
    with torch.no_grad():  # a fresh model: transformers' dynamic frequencies are stateful
        for chunk in chunks:
            ref_model(input_ids=chunk, cache=cache, use_cache=True)
        token = ids[:, -1:]
        for _ in range(NEW):
            token = ref_model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            theirs.append(token.numpy()[:, 0])
    np.testing.assert_array_equal(ours.tokens, np.stack(theirs, axis=1))
