"""Batched serving in the infer mode: bucketed outputs equal unbucketed `generate` per prompt in
input order, per-request max_new_tokens and stop strings, one compilation per bucket shape,
streaming of the finished prefix, and one-line errors naming the bad request's line."""

import functools
import json

import jax
import numpy as np
import pytest

from t5x_like.data import vocabularies
from t5x_like.errors import UserError
from t5x_like.inference import decoding, modes, serving
from t5x_like.models import DecoderOnlyConfig, model_for_config

COMMON = dict(vocab_size=384, d_model=32, num_heads=4, head_dim=8, mlp_dim=64, num_layers=1)
CONFIGS = {
    "rotary": DecoderOnlyConfig(position_embedding="rotary", num_kv_heads=2, mlp_activations=("silu", "linear"),
                                tie_embeddings=False, **COMMON),
    "rotary3": DecoderOnlyConfig(position_embedding="rotary", num_kv_heads=2, mlp_activations=("silu", "linear"),
                                 tie_embeddings=False, **{**COMMON, "num_layers": 3}),
    "learned": DecoderOnlyConfig(position_embedding="learned", max_position_embeddings=80, norm_type="layer",
                                 use_bias=True, **COMMON),
}
TEXTS = ["hello world", "x", "a somewhat longer prompt that needs the next bucket up", "ab", "", "tiny",
         "the quick brown fox jumps over the lazy dog", "z", "medium length one", "q"]


@functools.lru_cache(maxsize=None)
def random_model(name):
    model = model_for_config(CONFIGS[name])
    shapes = jax.eval_shape(lambda: model.init_variables(jax.random.key(0)))
    rng = np.random.default_rng(0)

    def draw(path, s):
        if "scale" in jax.tree_util.keystr(path):
            return (1.0 + rng.normal(0, 0.1, s.shape)).astype(np.float32)
        return rng.normal(0, 0.3, s.shape).astype(np.float32)
    return model, jax.tree_util.tree_map_with_path(draw, shapes)  # {"params": ...}


def run_infer(tmp_path, lines, name="rotary", **kw):
    model, variables = random_model(name)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(line + "\n" for line in lines))
    kw = {"batch_size": 4, "max_new_tokens": 6, **kw}
    modes.infer(str(src), str(out), model=model, checkpoint_dir="unused", vocabulary="byte", variables=variables,
                **kw)
    return [json.loads(x) for x in out.read_text().splitlines()]


def direct(name, text, max_new_tokens):
    """Unbucketed reference: one prompt alone, exact shape (byte ids = byte + 3, BOS 0, EOS 1)."""
    model, variables = random_model(name)
    ids = np.array([[0] + [b + 3 for b in text.encode()]], np.int32)
    res = decoding.generate(model, variables, ids, max_new_tokens=max_new_tokens, eos_id=1)
    toks = [int(t) for t in res.tokens[0][:res.lengths[0]] if t != 1]
    return toks, float(res.scores[0]), int(res.lengths[0])


@pytest.mark.parametrize("name", ["rotary", pytest.param("learned", marks=pytest.mark.slow)])
def test_bucketed_outputs_equal_generate_in_input_order(tmp_path, name):
    texts, limits = TEXTS[:7], [6, 3, 9, 6, 2, 1, 5]  # buckets 16 and 64, new tokens 8 and 16
    lines = [t if m == 6 else json.dumps({"input": t, "max_new_tokens": m}) for t, m in zip(texts, limits)]
    rows = run_infer(tmp_path, lines, name=name)
    assert [r["input"] for r in rows] == texts
    vocab = vocabularies.get_vocabulary("byte")
    for r, text, m in zip(rows, texts, limits):
        toks, score, n = direct(name, text, m)
        assert r["tokens"] == toks, text
        assert r["output"] == vocab.decode(toks)
        assert r["finish_reason"] == ("stop" if n < m else "length")
        if r["finish_reason"] == "stop" or m in (1, 2, 4):  # not cut: the decoder's own score
            np.testing.assert_allclose(r["score"], score, rtol=1e-4, atol=1e-4)
        else:  # decoded to the bucket's 8 and cut to m: that score covered dropped tokens
            assert r["score"] is None


@pytest.mark.slow
def test_beam_batches_by_exact_limit_and_equal_generate(tmp_path):
    model, variables = random_model("rotary")
    texts, limits = ["hello world", "x", "medium length one"], [3, 5, 3]
    rows = run_infer(tmp_path, [json.dumps({"input": t, "max_new_tokens": m}) for t, m in zip(texts, limits)],
                     method="beam", num_beams=3)
    for r, text, m in zip(rows, texts, limits):
        ids = np.array([[0] + [b + 3 for b in text.encode()]], np.int32)
        res = decoding.generate(model, variables, ids, max_new_tokens=m, method="beam", num_beams=3, eos_id=1)
        assert r["tokens"] == [int(t) for t in res.tokens[0][:res.lengths[0]] if t != 1]
        np.testing.assert_allclose(r["score"], float(res.scores[0]), rtol=1e-4, atol=1e-4)


def test_stop_strings_cut_output_and_tokens(tmp_path):
    vocab = vocabularies.get_vocabulary("byte")
    free = run_infer(tmp_path, [json.dumps({"input": t, "max_new_tokens": 12}) for t in TEXTS])
    row = next(r for r in free if len(r["output"]) >= 4 and r["finish_reason"] == "length")
    stop = row["output"][2:4]
    first = row["output"].find(stop)
    req = [json.dumps({"input": row["input"], "max_new_tokens": 12, "stop": ["\u2603never", stop]}),
           json.dumps({"input": row["input"], "max_new_tokens": 12, "stop": "\u2603never"})]
    stopped, untouched = run_infer(tmp_path, req)
    assert stopped["output"] == row["output"][:first] and stopped["finish_reason"] == "stop"
    k = len(stopped["tokens"])
    assert stop in vocab.decode(stopped["tokens"]) and stop not in vocab.decode(stopped["tokens"][:k - 1])
    assert stopped["tokens"] == row["tokens"][:k] and stopped["score"] is None
    assert untouched == {**row, "input": row["input"]}


def test_one_compilation_per_bucket(tmp_path):
    rng = np.random.default_rng(1)
    letters = np.array(list("abcdefghij"))
    first = ["".join(rng.choice(letters, n)) for n in rng.integers(0, 50, 24)]
    second = ["".join(rng.choice(letters, n)) for n in rng.integers(0, 50, 24)]
    buckets = {serving.pow2(max(len(t) + 1, 16)) for t in first + second}
    before = decoding._generate._cache_size()  # batch 3, new tokens 16: shapes no other test compiles
    run_infer(tmp_path, first, batch_size=3, max_new_tokens=13)  # 24 prompts, 3 a batch: >= 8 batches
    assert decoding._generate._cache_size() - before == len(buckets) == 3
    mid = decoding._generate._cache_size()
    run_infer(tmp_path, second, batch_size=3, max_new_tokens=11)  # other lengths and limit, same buckets
    assert decoding._generate._cache_size() == mid


class FakeModel:
    def max_length(self):
        return None

    def check_prompts(self, prompts, lengths, new):
        return None


def test_streams_the_finished_prefix_in_input_order():
    events = []
    reqs = [serving.Request(i, f"f:{i}", {"input": str(i)}, [5] * n, 3) for i, n in enumerate([2, 40, 3, 4, 50])]

    def decode(prompts, lengths, new):
        events.append(("decode", prompts.shape[1], tuple(lengths)))
        return np.full((len(lengths), new), 7), np.full((len(lengths),), new), np.zeros(len(lengths))
    serving.serve(reqs, decode, lambda r: events.append(("write", r["input"])), model=FakeModel(), batch_size=2,
                  eos_id=1, decode_text=str, min_width=8)
    assert events == [("decode", 8, (2, 3)), ("write", "0"), ("decode", 64, (40, 50)), ("write", "1"),
                      ("write", "2"), ("decode", 8, (4, 4)), ("write", "3"), ("write", "4")]


@pytest.mark.parametrize("line,why", [
    ('{"input": "b", "max_new_tokens": 0}', "max_new_tokens=0 must be a positive integer"),
    ('{"input": "b", "max_new_tokens": true}', "max_new_tokens=True must be a positive integer"),
    ('{"input": "b", "stop": 3}', "stop=3 must be"),
    ('{"input": "b"', "not valid JSON"),
    ("y" * 85, "longer than the model's maximum length 80"),
    ("y" * 76, "exceeds max_position_embeddings=80"),
])
def test_bad_request_is_one_line_naming_it(tmp_path, line, why):
    with pytest.raises(UserError) as err:
        run_infer(tmp_path, ["fine", line], name="learned")
    msg = str(err.value).splitlines()[0]  # gin appends the configurable's name on later lines
    assert "\n" not in msg and f"{tmp_path / 'in.jsonl'}:2: " in msg and why in msg


def test_infer_with_a_speculative_draft_gives_the_same_greedy_outputs(tmp_path):
    """infer.draft = SpeculativeDraft: a 1-layer draft of a 3-layer target (random weights, so it is
    often rejected) changes nothing in the greedy outputs, and its acceptance rate is recorded."""
    from t5x_like.inference.speculative import SpeculativeDraft

    target, _ = random_model("rotary3")
    draft = SpeculativeDraft(checkpoint="unused", num_layers=1, gamma=3)
    draft_model, _ = random_model("rotary")
    assert draft.model_for(target).config == draft_model.config
    lines = [json.dumps({"input": t, "max_new_tokens": 5}) for t in TEXTS[:6]]
    plain = run_infer(tmp_path, lines, name="rotary3")
    spec = run_infer(tmp_path, lines, name="rotary3", draft=draft, draft_variables=random_model("rotary")[1])
    assert [r["tokens"] for r in spec] == [r["tokens"] for r in plain]
    assert [r["output"] for r in spec] == [r["output"] for r in plain]
    assert draft.proposed > 0 and 0.0 <= draft.acceptance_rate < 1.0
    with pytest.raises(UserError, match="not 'beam'"):
        run_infer(tmp_path, lines[:1], name="rotary3", draft=draft, method="beam",
                  draft_variables=random_model("rotary")[1])
