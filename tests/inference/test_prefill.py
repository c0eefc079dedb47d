"""Parallel prefill and the chunked KV cache: prefill + decode equals the old one-token-per-step feed
and full recomputation (no cache) token for token, for decoder-only (dense, sliding-window ring
buffer, MoE) and encoder-decoder (dense, MoE) models; cross-attention keys / values are computed
once; chunks at per-row positions with rollback (speculative decoding's verify step) equal
recomputation; the int8 KV cache stays close to the float one."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.inference import decoding
from t5x_like.layers import kv_cache
from t5x_like.layers.dense import DenseGeneral
from t5x_like.models import DecoderOnlyConfig, EncoderDecoderConfig, model_for_config

from test_decoding import CONFIGS, COMMON, LENGTHS, PROMPTS, random_model

MOE = dict(num_experts=4, moe_top_k=2, moe_capacity_factor=None)
MOE_CONFIGS = {
    "mixtral_moe": DecoderOnlyConfig(num_layers=2, position_embedding="rotary", num_kv_heads=2,
                                     mlp_activations=("silu", "linear"), tie_embeddings=False, **MOE, **COMMON),
    "t5_moe": EncoderDecoderConfig(num_encoder_layers=1, num_decoder_layers=2, relative_num_buckets=8,
                                   relative_max_distance=20, tie_embeddings=False, **MOE, **COMMON),
}
CONFIGS.update(MOE_CONFIGS)
SLOW = pytest.mark.slow


def _generate(name, **kw):
    model, variables = random_model(name)
    return decoding.generate(model, variables, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=8, **kw)


@pytest.mark.parametrize("name,method", [  # default: decoder-only (Llama, both methods), MoE (t5_moe, both stacks)
    ("llama_rotary_gqa", "greedy"), ("llama_rotary_gqa", "beam"), pytest.param("mixtral_moe", "greedy", marks=SLOW),
    ("t5_moe", "greedy"),
    pytest.param("mistral_window3", "greedy", marks=SLOW), pytest.param("t5_relative", "greedy", marks=SLOW),
    pytest.param("gpt2_learned_scan", "greedy", marks=SLOW), pytest.param("t5_moe", "beam", marks=SLOW),
    pytest.param("mixtral_moe", "beam", marks=SLOW)])
def test_prefill_equals_step_by_step_and_no_cache(name, method):
    """(test_decoding.py runs the same prefilled and no-cache calls: compiled once per session.)"""
    kw = dict(method=method, num_beams=3, length_penalty=0.6)
    prefilled = _generate(name, **kw)
    stepwise = _generate(name, prefill=False, **kw)
    full = _generate(name, use_cache=False, **kw)
    for other in (stepwise, full):
        np.testing.assert_array_equal(prefilled.tokens, other.tokens)
        np.testing.assert_array_equal(prefilled.lengths, other.lengths)
        np.testing.assert_allclose(prefilled.scores, other.scores, rtol=1e-4, atol=1e-4)
    assert len({tuple(r) for r in prefilled.tokens}) > 1


@SLOW  # four sampling programs to compile
def test_sampling_draws_alike_with_either_feed():
    kw = dict(method="sample", temperature=1.5, rng=jax.random.key(7), eos_id=-1)
    a, b = _generate("llama_rotary_gqa", **kw), _generate("llama_rotary_gqa", prefill=False, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    greedy = _generate("llama_rotary_gqa", eos_id=-1)
    assert not np.array_equal(a.tokens, greedy.tokens)  # it did sample
    twice = decoding.generate(*random_model("llama_rotary_gqa"), np.repeat(PROMPTS[:1], 2, axis=0),
                              max_new_tokens=6, **kw)
    assert not np.array_equal(twice.tokens[0], twice.tokens[1])  # repeated prompts draw independently


def _count_cross_kv(model, fn):
    """Calls of the cross-attention key / value projections while `fn` runs (eagerly)."""
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (isinstance(module, DenseGeneral) and context.method_name == "__call__"
                and module.name in ("key", "value") and "cross_attention" in module.path):
            calls.append(module.path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        out = fn()
    return len(calls), out


@pytest.mark.parametrize("prefill", [True, False])
def test_cross_attention_keys_values_computed_once(prefill):
    """The decoding loop's step never projects the encoder output when prefilled (the old feed does
    at every step); the prefill projects it once per decoder layer."""
    model, variables = random_model("t5_relative")
    params = variables["params"]
    start = model.prefill(params, jnp.asarray(PROMPTS), jnp.asarray(LENGTHS))
    layers = model.config.num_decoder_layers
    count, (step, cache, seq, _) = _count_cross_kv(
        model, lambda: decoding._start(model, params, start, 1, 4, True, prefill, None))
    assert count == 2 * layers + (2 * layers if prefill else 0)  # init_cache traces every layer once
    count, (logits, _) = _count_cross_kv(model, lambda: step(cache, seq, 0))
    assert count == (0 if prefill else 2 * layers)
    # The cached keys / values give the logits that recomputing them gives.
    full = model.decode_logits(params, start.context, seq[:, :1])
    np.testing.assert_allclose(logits, full[:, 0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,slack", [("mistral_window3", 2), ("t5_relative", 0),
                                        pytest.param("gpt2_learned_scan", 0, marks=SLOW)])
def test_chunks_at_row_positions_and_rollback(name, slack):
    """Speculative decoding's verify step: a chunk of 3 tokens per row at each row's own positions
    scores them as recomputation does; rolled back by 2, a different token follows."""
    model, variables = random_model(name)
    params = variables["params"]
    rng = np.random.default_rng(1)
    seq = rng.integers(2, 64, (3, 12)).astype(np.int32)
    lengths = np.array([5, 3, 7])  # prompt tokens per row before the chunk
    encoded, total = None, 16
    if isinstance(model.config, EncoderDecoderConfig):
        encoded = model.prefill(params, jnp.asarray(PROMPTS), jnp.asarray(LENGTHS)).context
    full = np.asarray(model.decode_logits(params, encoded, jnp.asarray(seq)))
    cache = model.init_cache(encoded, 3, total, window_slack=slack)
    cache, context = model.prefill_cache(params, cache, encoded, jnp.asarray(seq), jnp.asarray(lengths + 1), total)
    positions = lengths[:, None] + np.arange(3)[None]
    chunk = np.take_along_axis(seq, positions, axis=1)
    logits, cache = model.decode_chunk(params, cache, context, jnp.asarray(chunk), jnp.asarray(positions), total)
    np.testing.assert_allclose(logits, np.take_along_axis(full, positions[:, :, None], axis=1), atol=1e-4, rtol=1e-4)

    cache = model.rollback_cache(cache, jnp.asarray(lengths + 1))  # keep the chunk's first token only
    other = seq.copy()
    other[np.arange(3), lengths + 1] = (seq[np.arange(3), lengths + 1] + 7) % 60 + 2
    full_other = np.asarray(model.decode_logits(params, encoded, jnp.asarray(other)))
    tok = other[np.arange(3), lengths + 1][:, None]
    logits, _ = model.decode_step(params, cache, context, jnp.asarray(tok), jnp.asarray(lengths[:, None] + 1), total)
    np.testing.assert_allclose(logits, full_other[np.arange(3), lengths + 1], atol=1e-4, rtol=1e-4)


def test_sliding_window_cache_is_a_ring_of_the_window():
    model, variables = random_model("mistral_window3")
    def slots(model):
        cache = model.init_cache(None, 3, 20)
        leaves = jax.tree_util.tree_leaves_with_path(cache)
        return {v.shape[1] for p, v in leaves if "cached_key" in jax.tree_util.keystr(p)}

    assert slots(model) == {model.config.sliding_window}
    relative = model_for_config(CONFIGS["mistral_window3"].replace(position_embedding="relative"))
    assert slots(relative) == {20}  # a relative bias table is indexed by position: full cache
    # prompts (6 tokens) longer than the ring: prefilled, stepped and recomputed alike
    ring = _generate("mistral_window3", eos_id=-1)
    np.testing.assert_array_equal(ring.tokens, _generate("mistral_window3", use_cache=False, eos_id=-1).tokens)


def test_int8_kv_cache_close_to_float():
    """Per-token-per-head absmax int8: logits of tokens reading int8 keys / values stay within a few
    percent of the float cache's, and their argmax agrees almost everywhere (measured: this random
    model has near-ties, so greedy paths may part after a flip)."""
    model, variables = random_model("llama_rotary_gqa")
    params = variables["params"]
    seq = jnp.asarray(np.random.default_rng(2).integers(2, 64, (16, 12)).astype(np.int32))

    @functools.partial(jax.jit, static_argnums=0)
    def logits(dtype):
        cache = model.init_cache(None, 16, 12, kv_cache_dtype=dtype)
        cache, _ = model.prefill_cache(params, cache, None, seq, jnp.full((16,), 9), 12)  # 8 tokens written
        pos = jnp.broadcast_to(8 + jnp.arange(4), (16, 4))
        return model.decode_chunk(params, cache, None, seq[:, 8:], pos, 12)[0]

    f32, int8 = np.asarray(logits(None)), np.asarray(logits("int8"))
    assert 0 < np.abs(int8 - f32).max() < 0.03 * np.abs(f32).max()
    agree = np.mean(int8.argmax(-1) == f32.argmax(-1))
    assert agree >= 0.9, agree
    out = _generate("llama_rotary_gqa", kv_cache_dtype="int8", eos_id=-1)
    assert np.mean(out.tokens == _generate("llama_rotary_gqa", eos_id=-1).tokens) >= 0.5


def test_int8_quantization_error_bound():
    """|x - dequant(quant(x))| <= scale / 2 per element, scale = absmax / 127 (float64 reference)."""
    x = np.random.default_rng(0).normal(0, 3, (2, 5, 4, 16)).astype(np.float32)
    codes, scale = kv_cache.quantize(x)
    ref_scale = np.abs(x.astype(np.float64)).max(-1) / 127
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
    err = np.abs(np.asarray(codes).astype(np.float64) * np.asarray(scale, np.float64)[..., None] - x)
    assert np.all(err <= ref_scale[..., None] / 2 + 1e-6) and codes.dtype == np.int8


def test_too_long_prompt_and_bad_cache_dtype():
    model, variables = random_model("gpt2_learned_scan")  # a learned table of 32 positions
    with pytest.raises(decoding.DecodingError, match="longer than the model's maximum length 32"):
        decoding.generate(model, variables, np.ones((1, 40), np.int32))
    with pytest.raises(decoding.DecodingError, match="kv_cache_dtype"):
        decoding.generate(model, variables, PROMPTS, kv_cache_dtype="int4")
