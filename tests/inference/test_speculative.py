"""Speculative decoding: greedy output equals the target's own greedy `generate` (3 prompts of
different lengths; a 1-layer random draft that disagrees nearly always, perturbed drafts that agree
part of the time; Llama, GPT-2 with scanned layers, and (slow) a sliding-window ring buffer rolled back
past its window and a T5 encoder-decoder); a draft equal to the target keeps every proposal; sampling
matches the target's exact 2-token distribution (chi-square, slow); bad inputs are one-line
DecodingErrors; gin/runs/draft.gin makes a shallower model of the target's gin, or one of another width
(DRAFT_OVERRIDES), the same model SpeculativeDraft(config_overrides=...) builds for `infer`; a narrower
draft keeps the target's greedy output."""

import functools

import jax
import numpy as np
import pytest
from scipy import stats

from t5x_like.inference import decoding
from t5x_like.inference.speculative import SpeculativeDraft, draft_config, speculative_generate
from t5x_like.models import DecoderOnlyConfig, model_for_config

from test_decoding import CONFIGS, COMMON, LENGTHS, PROMPTS, random_model


def _perturbed(variables, scale, seed=1):
    """The target's weights plus noise: a draft that agrees with it part of the time."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: x + rng.normal(0, scale, x.shape).astype(x.dtype), variables)


@functools.lru_cache(maxsize=None)
def _pair(name):
    if name == "llama_1layer_draft":  # a 1-layer random draft: disagrees nearly always
        target, tvars = random_model("llama_rotary_gqa")
        draft = model_for_config(CONFIGS["llama_rotary_gqa"].replace(num_layers=1))
        return target, tvars, draft, draft.init_variables(jax.random.key(3))
    if name == "llama_narrow_draft":  # half the width, one layer, 2 heads: another config, same vocabulary
        target, tvars = random_model("llama_rotary_gqa")
        draft = model_for_config(draft_config(CONFIGS["llama_rotary_gqa"], NARROW))
        return target, tvars, draft, _perturbed(draft.init_variables(jax.random.key(3)), 0.3)
    target, tvars = random_model(name)
    return target, tvars, target, _perturbed(tvars, 0.03 if name.startswith("t5") else 0.15)


SLOW = pytest.mark.slow
NARROW = {"num_layers": 1, "d_model": 16, "num_heads": 2, "num_kv_heads": 1, "mlp_dim": 24}


@pytest.mark.parametrize("name,gamma", [
    ("llama_1layer_draft", 3), ("llama_narrow_draft", 4), pytest.param("llama_rotary_gqa", 4, marks=SLOW),
    ("gpt2_learned_scan", 2),
    pytest.param("mistral_window3", 4, marks=SLOW), pytest.param("t5_relative", 3, marks=SLOW)])
def test_greedy_equals_target_greedy(name, gamma):
    target, tvars, draft, dvars = _pair(name)
    kw = dict(prompt_lengths=LENGTHS, max_new_tokens=10, eos_id=-1)
    want = decoding.generate(target, tvars, PROMPTS, **kw)
    got = speculative_generate(target, tvars, draft, dvars, PROMPTS, gamma=gamma, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4, atol=1e-4)
    assert len({tuple(r) for r in got.tokens}) > 1
    if name.endswith("_draft"):
        assert got.acceptance_rate < 0.2
    else:  # partial acceptance: both the rejection and the all-kept (bonus token) paths ran
        assert 0.0 < got.acceptance_rate < 1.0, got.acceptance_rate
    assert got.tokens_per_pass == pytest.approx(1 + gamma * got.acceptance_rate)


def test_draft_equal_to_target_keeps_everything_and_eos_stops():
    target, tvars = random_model("llama_rotary_gqa")
    kw = dict(prompt_lengths=LENGTHS, max_new_tokens=10, eos_id=-1)
    got = speculative_generate(target, tvars, target, tvars, PROMPTS, gamma=4, **kw)
    assert got.acceptance_rate == 1.0
    assert got.target_passes == 3 * 2  # 10 tokens = 5 + 5 per row
    assert got.tokens_per_pass == 5.0
    eos = int(got.tokens[0, 2])
    kw["eos_id"] = eos
    want = decoding.generate(target, tvars, PROMPTS, **kw)
    got = speculative_generate(target, tvars, target, tvars, PROMPTS, gamma=4, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    assert got.lengths[0] <= 3 and np.all(got.tokens[0, got.lengths[0]:] == 0)


def test_bad_inputs_are_one_line_errors():
    target, tvars = random_model("llama_rotary_gqa")
    other = model_for_config(CONFIGS["llama_rotary_gqa"].replace(vocab_size=80))
    cases = [(dict(draft=other), "vocabulary"), (dict(gamma=0), "gamma=0"), (dict(method="beam"), "method"),
             (dict(draft=model_for_config(CONFIGS["t5_relative"])), "family")]
    for kw, needle in cases:
        args = dict(draft=target, gamma=4, method="greedy") | kw
        with pytest.raises(decoding.DecodingError, match=needle) as err:
            speculative_generate(target, tvars, args["draft"], tvars, PROMPTS, gamma=args["gamma"],
                                 method=args["method"])
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- the sampled distribution

TINY = dict(COMMON, vocab_size=12)


def _tiny(layers, seed):
    model = model_for_config(DecoderOnlyConfig(num_layers=layers, position_embedding="rotary", num_kv_heads=2,
                                               mlp_activations=("silu", "linear"), tie_embeddings=False, **TINY))
    shapes = jax.eval_shape(lambda: model.init_variables(jax.random.key(0)))
    rng = np.random.default_rng(seed)
    return model, jax.tree_util.tree_map(lambda s: rng.normal(0, 0.4, s.shape).astype(np.float32), shapes)


def _exact_joint(model, variables, prompt, temperature, top_k):
    """P(a, b | prompt) [V, V] in float64 from full-sequence logits (no cache, no sampler)."""
    vocab = TINY["vocab_size"]

    def probs(logits):
        logits = np.asarray(logits, np.float64) / temperature
        if top_k:
            kth = np.sort(logits, axis=-1)[..., -top_k][..., None]
            logits = np.where(logits < kth, -np.inf, logits)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    seqs = np.concatenate([np.repeat(prompt[None], vocab, 0), np.arange(vocab)[:, None]], axis=1).astype(np.int32)
    logits = model.decode_logits(variables["params"], None, seqs)
    first = probs(logits[0, len(prompt) - 1])
    second = probs(logits[:, len(prompt)])  # [a, b]
    return first[:, None] * second


@SLOW
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5)])
def test_sampling_matches_target_distribution(temperature, top_k):
    target, tvars = _tiny(2, 0)
    draft, dvars = _tiny(1, 5)
    prompt = np.array([3, 7, 1], np.int32)
    n = 20_000
    out = speculative_generate(target, tvars, draft, dvars, np.repeat(prompt[None], n, 0), gamma=3,
                               max_new_tokens=2, method="sample", temperature=temperature, top_k=top_k, eos_id=-1,
                               rng=jax.random.key(11))
    vocab = TINY["vocab_size"]
    observed = np.bincount(out.tokens[:, 0] * vocab + out.tokens[:, 1], minlength=vocab * vocab)
    want = _exact_joint(target, tvars, prompt, temperature, top_k).ravel()
    drafted = _exact_joint(draft, dvars, prompt, temperature, top_k).ravel()
    assert 0.5 * np.abs(want - drafted).sum() > 0.15  # the draft alone would fail this test
    assert 0.05 < out.acceptance_rate < 0.95
    assert np.all(observed[want == 0] == 0)  # top-k: no filtered-out pair is ever drawn
    big = want * n >= 5  # pool the rare cells into one
    obs, exp = observed[big], want[big] * n
    if want[~big].sum() > 0:
        obs, exp = np.append(obs, observed[~big].sum()), np.append(exp, want[~big].sum() * n)
    p = stats.chisquare(obs, exp).pvalue
    print(f"acceptance {out.acceptance_rate:.3f}, {big.sum()} cells, chi-square p {p:.3f}")
    assert p > 0.01, p


def test_draft_gin_shrinks_only_the_depth():
    from t5x_like import gin_config

    gin_config.parse(["models/llama_tiny.gin"])
    target = gin_config.model_from_gin()
    gin_config.parse(["models/llama_tiny.gin", "runs/draft.gin"])
    draft = gin_config.model_from_gin()
    assert (draft.config.num_layers, target.config.num_layers) == (1, 6)
    assert draft.config.replace(num_layers=6) == target.config  # same vocabulary, width, positions


def test_draft_gin_overrides_build_the_infer_draft():
    from t5x_like import gin_config

    overrides = {"num_layers": 2, "d_model": 64, "num_heads": 4, "head_dim": 16, "mlp_dim": 172}
    gin_config.parse(["models/llama_tiny.gin", "runs/draft.gin"], [f"DRAFT_OVERRIDES = {overrides!r}"])
    draft = gin_config.model_from_gin()
    gin_config.parse(["models/llama_tiny.gin"])
    target = gin_config.model_from_gin()
    assert draft.config == target.config.replace(**overrides)  # vocabulary, positions, norms: the target's
    assert SpeculativeDraft(checkpoint="x", config_overrides=overrides).model_for(target).config == draft.config
    both = SpeculativeDraft(checkpoint="x", num_layers=2, config_overrides=overrides).model_for(target)
    assert both.config == draft.config
    assert SpeculativeDraft(checkpoint="x").model_for(target).config == target.config.replace(num_layers=1)


def test_bad_draft_overrides_are_one_line_errors():
    config = CONFIGS["llama_rotary_gqa"]
    for overrides, needle in [({"depth": 2}, "not fields of DecoderOnlyConfig"), ({"vocab_size": 32}, "vocab_size")]:
        with pytest.raises(decoding.DecodingError, match=needle) as err:
            draft_config(config, overrides)
        assert "\n" not in str(err.value)
    with pytest.raises(decoding.DecodingError, match="contradicts"):
        SpeculativeDraft(checkpoint="x", num_layers=1, config_overrides={"num_layers": 2})
