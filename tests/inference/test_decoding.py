"""Decoding: the KV cache equals full recomputation, sampling filters hold, and greedy / beam search
equal transformers' generate on imported random-weight Llama and T5 models (no download)."""

import functools

import jax
import numpy as np
import pytest

from t5x_like.inference import decoding
from t5x_like.models import DecoderOnlyConfig, EncoderDecoderConfig, model_for_config

COMMON = dict(vocab_size=64, d_model=32, num_heads=4, head_dim=8, mlp_dim=64)
CONFIGS = {
    "llama_rotary_gqa": DecoderOnlyConfig(num_layers=2, position_embedding="rotary", num_kv_heads=2,
                                          mlp_activations=("silu", "linear"), tie_embeddings=False, **COMMON),
    "mistral_window3": DecoderOnlyConfig(num_layers=2, position_embedding="rotary", num_kv_heads=2, sliding_window=3,
                                         mlp_activations=("silu", "linear"), tie_embeddings=False, **COMMON),
    "gpt2_learned_scan": DecoderOnlyConfig(num_layers=2, position_embedding="learned", max_position_embeddings=32,
                                           norm_type="layer", use_bias=True, scan_layers=True, **COMMON),
    "t5_relative": EncoderDecoderConfig(num_encoder_layers=2, num_decoder_layers=2, relative_num_buckets=8,
                                        relative_max_distance=20, mlp_activations=("gelu_tanh", "linear"),
                                        tie_embeddings=False, **COMMON),
}


@functools.lru_cache(maxsize=None)
def random_model(name):
    """A model with random normal weights (wide enough logits that outputs vary token to token)."""
    model = model_for_config(CONFIGS[name])
    shapes = jax.eval_shape(lambda: model.init_variables(jax.random.key(0)))
    rng = np.random.default_rng(0)
    def draw(path, s):
        if "scale" in jax.tree_util.keystr(path):  # norm scales near 1 keep layer outputs informative
            return (1.0 + rng.normal(0, 0.1, s.shape)).astype(np.float32)
        return rng.normal(0, 0.3, s.shape).astype(np.float32)
    params = jax.tree_util.tree_map_with_path(draw, shapes)
    return model, params


PROMPTS = np.array([[5, 9, 13, 2, 40, 7], [11, 3, 0, 0, 0, 0], [60, 31, 8, 22, 0, 0]], np.int32)
LENGTHS = np.array([6, 2, 4])


SLOW = pytest.mark.slow


@pytest.mark.parametrize("name,method", [
    # Llama's prefilled-vs-no-cache calls are test_prefill.py's Llama cases exactly: slow here.
    pytest.param("llama_rotary_gqa", "greedy", marks=SLOW), pytest.param("llama_rotary_gqa", "beam", marks=SLOW),
    ("gpt2_learned_scan", "greedy"), ("t5_relative", "greedy"), ("mistral_window3", "greedy"),
    pytest.param("gpt2_learned_scan", "beam", marks=SLOW), pytest.param("t5_relative", "beam", marks=SLOW)])
def test_cache_equals_recompute(name, method):
    model, variables = random_model(name)
    kw = dict(prompt_lengths=LENGTHS, max_new_tokens=8, method=method, num_beams=3, length_penalty=0.6)
    cached = decoding.generate(model, variables, PROMPTS, **kw)
    full = decoding.generate(model, variables, PROMPTS, use_cache=False, **kw)
    np.testing.assert_array_equal(cached.tokens, full.tokens)
    np.testing.assert_allclose(cached.scores, full.scores, rtol=1e-4, atol=1e-4)
    assert len({tuple(r) for r in cached.tokens}) > 1


@pytest.mark.parametrize("name", ["llama_rotary_gqa", pytest.param("t5_relative", marks=SLOW)])
def test_rows_decode_as_if_alone(name):
    """Prompts of different lengths in one batch give each row what it gives alone."""
    model, variables = random_model(name)
    batch = decoding.generate(model, variables, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=6)
    for i, n in enumerate(LENGTHS):
        prompt = PROMPTS[i:i + 1, :n] if name.startswith("llama") else PROMPTS[i:i + 1]
        alone = decoding.generate(model, variables, prompt, max_new_tokens=6)
        np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])


def test_eos_stops_and_pads():
    model, variables = random_model("llama_rotary_gqa")
    free = decoding.generate(model, variables, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=8, eos_id=63)
    eos = int(free.tokens[0, 2])
    out = decoding.generate(model, variables, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=8, eos_id=eos)
    first = int(np.argmax(out.tokens[0] == eos))
    assert first <= 2 and out.lengths[0] == first + 1
    assert np.all(out.tokens[0, first + 1:] == 0)


def test_temperature_near_zero_is_greedy():
    model, variables = random_model("llama_rotary_gqa")
    greedy = decoding.generate(model, variables, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=8)
    cold = decoding.generate(model, variables, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=8,
                             method="sample", temperature=1e-6, rng=jax.random.key(3))
    np.testing.assert_array_equal(greedy.tokens, cold.tokens)


def test_top_k_top_p_only_allowed_tokens():
    """Over many draws, filtered sampling never leaves the allowed set and covers it."""
    rng = np.random.default_rng(0)
    logits = jax.numpy.asarray(rng.normal(0, 2.0, (1, 50)).astype(np.float32))
    probs = np.asarray(jax.nn.softmax(logits))[0]
    order = np.argsort(-probs)
    draws = 4000
    keys = jax.random.split(jax.random.key(0), draws)

    def sample(**kw):
        filtered = decoding.process_logits(jax.numpy.repeat(logits, draws, axis=0), **kw)
        return np.asarray(jax.vmap(jax.random.categorical)(keys, filtered))

    top5 = set(order[:5].tolist())
    got = sample(top_k=5)
    assert set(got.tolist()) == top5
    cum = np.cumsum(probs[order])
    nucleus = set(order[:int(np.searchsorted(cum, 0.7) + 1)].tolist())
    got = sample(top_p=0.7)
    assert set(got.tolist()) <= nucleus and len(set(got.tolist())) == len(nucleus)
    got = sample(top_k=3, top_p=0.99, temperature=0.5)
    assert set(got.tolist()) <= set(order[:3].tolist())
    # Frequencies follow the renormalised top-k distribution (chi-square-ish bound).
    got = sample(top_k=5)
    expected = probs[order[:5]] / probs[order[:5]].sum()
    freq = np.array([(got == t).mean() for t in order[:5]])
    assert np.all(np.abs(freq - expected) < 4 * np.sqrt(expected * (1 - expected) / draws) + 1e-3)


@SLOW
def test_sampling_in_the_loop_respects_top_k():
    model, variables = random_model("llama_rotary_gqa")
    out = decoding.generate(model, variables, PROMPTS[:1], max_new_tokens=1, method="sample", top_k=2,
                            rng=jax.random.key(0), eos_id=-1)
    full = np.asarray(model.compute_logits(variables, {"decoder_input_tokens": PROMPTS[:1]}))[0, -1]
    assert out.tokens[0, 0] in set(np.argsort(-full)[:2].tolist())


def test_bad_arguments():
    model, variables = random_model("llama_rotary_gqa")
    with pytest.raises(decoding.DecodingError, match="method"):
        decoding.generate(model, variables, PROMPTS, method="nucleus")
    with pytest.raises(decoding.DecodingError, match="prompt_lengths"):
        decoding.generate(model, variables, PROMPTS, prompt_lengths=[0, 1, 1])
