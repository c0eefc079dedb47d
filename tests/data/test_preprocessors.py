"""The pretraining preprocessors: exact lengths, lossless chunking, noise statistics, seeding, and
that each one plugs into a real seqio.Task and its feature converter."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_like.data import preprocessors as pp
from t5x_like.data.span_corruption import noise_counts

try:
    tf.config.set_visible_devices([], "GPU")  # the accelerators belong to JAX
except RuntimeError:  # TF already initialised its devices in this process
    pass

VOCAB = seqio.ByteVocabulary(extra_ids=100)
V = VOCAB.vocab_size  # 359: pad 0, eos 1, unk 2, bytes 3..258, sentinels 259..358
FIRST_SENTINEL = V - 100
FEATURES = {"inputs": seqio.Feature(VOCAB, add_eos=False),
            "targets": seqio.Feature(VOCAB, add_eos=False)}


def random_docs(num_docs, max_len, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, V - 101, size=rng.integers(1, max_len + 1)).astype(np.int32)
            for _ in range(num_docs)]


def run(preprocessor, docs, lengths, seed=0, **kwargs):
    ds = tf.data.Dataset.from_generator(
        lambda: ({"targets": d} for d in docs),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)})
    with seqio.utils.map_seed_manager(seed):
        out = preprocessor(ds, lengths, FEATURES, **kwargs)
    return list(out.as_numpy_iterator())


def stream_with_eos(docs):
    return np.concatenate([np.append(d, 1) for d in docs if len(d)])


def uncorrupt(ex):
    """Puts the spans of the targets back into the inputs; returns (chunk, spans)."""
    inputs, targets = ex["inputs"], ex["targets"]
    assert inputs[-1] == 1 and targets[-1] == 1
    sentinels = [t for t in targets[:-1] if t >= FIRST_SENTINEL]
    assert sentinels == list(range(V - 1, V - 1 - len(sentinels), -1))  # descending from V - 1
    assert [t for t in inputs[:-1] if t >= FIRST_SENTINEL] == sentinels
    assert targets[0] == V - 1 and inputs[0] < FIRST_SENTINEL  # chunks open kept, then noise
    spans, chunk = {}, []
    for t in targets[:-1]:
        if t >= FIRST_SENTINEL:
            spans[t] = []
            current = t
        else:
            spans[current].append(t)
    for t in inputs[:-1]:
        chunk.extend(spans[t] if t >= FIRST_SENTINEL else [t])
    return np.array(chunk), [spans[s] for s in sentinels]


# ------------------------------------------------------------------------------ span corruption


@pytest.mark.parametrize("inputs_length,raw_length,targets_length", [
    (64, 70, 14), (128, 141, 29), (256, 284, 58), (512, 568, 114), (1024, 1137, 229),
    (2048, 2274, 456)])
def test_span_corruption_lengths_table(inputs_length, raw_length, targets_length):
    assert pp.span_corruption_lengths(inputs_length) == (raw_length, targets_length)
    def corrupted_inputs_length(raw):
        n, s = noise_counts(raw)
        return raw - n + s + 1

    assert corrupted_inputs_length(raw_length) <= inputs_length  # T fits, T + 1 does not
    assert corrupted_inputs_length(raw_length + 1) > inputs_length


def test_max_inputs_length_for_100_sentinels():
    assert pp.max_inputs_length(100) == 1809
    assert noise_counts(pp.span_corruption_lengths(1809)[0])[1] == 100
    assert noise_counts(pp.span_corruption_lengths(1810)[0])[1] == 101


def test_span_corruption_reconstructs_stream_with_t5_statistics():
    docs = random_docs(1500, 400, seed=1)
    examples = run(pp.span_corruption, docs, {"inputs": 128, "targets": 29}, seed=3)
    assert len(examples) > 2000
    chunks, span_lengths = [], []
    for ex in examples:
        chunk, spans = uncorrupt(ex)
        assert (sum(map(len, spans)), len(spans)) == noise_counts(len(chunk))  # own length
        assert all(len(s) >= 1 for s in spans)
        assert len(ex["inputs"]) <= 128 and len(ex["targets"]) <= 29
        if len(chunk) == 141:  # full chunk: the table's exact lengths
            assert (len(ex["inputs"]), len(ex["targets"])) == (128, 29)
        chunks.append(chunk)
        span_lengths += [len(s) for s in spans]
    stream = np.concatenate(docs)
    rebuilt = np.concatenate(chunks)
    assert len(stream) - len(rebuilt) == (1 if len(stream) % 141 == 1 else 0)
    np.testing.assert_array_equal(rebuilt, stream[:len(rebuilt)])
    assert abs(sum(span_lengths) / len(rebuilt) - 0.15) < 0.01
    assert abs(np.mean(span_lengths) - 3.0) < 0.15
    assert np.std(span_lengths) > 1.0  # lengths come from a random segmentation


@pytest.mark.parametrize("inputs_length", [64, 512])
def test_span_corruption_full_chunks_fill_the_table_lengths(inputs_length):
    raw_length, targets_length = pp.span_corruption_lengths(inputs_length)
    docs = random_docs(40, 300, seed=inputs_length)
    examples = run(pp.span_corruption, docs,
                   {"inputs": inputs_length, "targets": targets_length})
    rebuilt = [uncorrupt(ex)[0] for ex in examples]
    assert all(len(c) == raw_length for c in rebuilt[:-1])
    assert len(rebuilt[-1]) <= raw_length
    for ex in examples[:-1]:
        assert len(ex["inputs"]) == inputs_length
        assert len(ex["targets"]) == targets_length


@pytest.mark.parametrize("tail", [0, 1, 2, 9])
def test_span_corruption_final_chunk_uses_its_own_length(tail):
    doc = np.arange(3, 3 + 70 * 2 + tail, dtype=np.int32) % 250 + 3  # T = 70 for inputs 64
    examples = run(pp.span_corruption, [doc], {"inputs": 64, "targets": 14})
    chunks = [uncorrupt(ex)[0] for ex in examples]
    kept = 2 * 70 + (0 if tail == 1 else tail)  # a lone final token cannot be noised
    assert [len(c) for c in chunks] == [70, 70] + ([tail] if tail > 1 else [])
    np.testing.assert_array_equal(np.concatenate(chunks), doc[:kept])
    if tail == 2:
        last = examples[-1]
        assert list(last["inputs"]) == [doc[-2], V - 1, 1]
        assert list(last["targets"]) == [V - 1, doc[-1], 1]


def test_span_corruption_errors_are_clear():
    docs = random_docs(2, 10)
    with pytest.raises(ValueError, match=r"2048 needs 114 noise spans.*100 sentinel.*<= 1809"):
        run(pp.span_corruption, docs, {"inputs": 2048, "targets": 456})
    with pytest.raises(ValueError, match=r"at least 3.*got 2"):
        run(pp.span_corruption, docs, {"inputs": 2, "targets": 3})
    with pytest.raises(ValueError, match=r"targets of 114 tokens.*is 100"):
        run(pp.span_corruption, docs, {"inputs": 512, "targets": 100})
    with pytest.raises(ValueError, match=r"sequence_length\['inputs'\]"):
        run(pp.span_corruption, docs, None)


# ----------------------------------------------------------------------- LM, prefix LM, MLM


def test_next_token_lm_chunks_lose_no_token():
    docs = random_docs(300, 50, seed=2) + [np.zeros([0], np.int32)]
    examples = run(pp.next_token_lm, docs, {"targets": 32})
    lengths = [len(ex["targets"]) for ex in examples]
    assert set(lengths[:-1]) == {32} and 1 <= lengths[-1] <= 32
    np.testing.assert_array_equal(np.concatenate([ex["targets"] for ex in examples]),
                                  stream_with_eos(docs))


@pytest.mark.parametrize("inputs_length,targets_length", [(16, 16), (12, 5)])
def test_prefix_lm_splits_chunks_at_random_points(inputs_length, targets_length):
    docs = random_docs(200, 40, seed=3)
    examples = run(pp.prefix_lm, docs, {"inputs": inputs_length, "targets": targets_length})
    for ex in examples:
        assert 1 <= len(ex["inputs"]) <= inputs_length
        assert 1 <= len(ex["targets"]) <= targets_length
    rebuilt = np.concatenate([np.concatenate([ex["inputs"], ex["targets"]]) for ex in examples])
    stream = stream_with_eos(docs)
    chunk = max(inputs_length, targets_length)
    assert len(stream) - len(rebuilt) == (1 if len(stream) % chunk == 1 else 0)
    np.testing.assert_array_equal(rebuilt, stream[:len(rebuilt)])
    splits = [len(ex["inputs"]) for ex in examples[:-1]]
    assert len(set(splits)) == min(inputs_length, targets_length, chunk - 1)  # every split occurs


def test_masked_lm_selects_15_percent_split_80_10_10():
    docs = random_docs(600, 200, seed=4)
    examples = run(pp.masked_lm, docs, {"inputs": 128, "targets": 128})
    masked = randomized = selected = eligible = 0
    for ex in examples:
        inputs, targets = ex["inputs"], ex["targets"]
        regular = (targets >= 3) & (targets < FIRST_SENTINEL)
        changed = inputs != targets
        assert not (changed & ~regular).any()  # EOS never touched
        n = regular.sum()
        eligible += n
        selected += min(max(round(0.15 * n), 1), n)
        masked += (inputs == V - 1).sum()
        replaced = changed & (inputs != V - 1)
        assert ((inputs[replaced] >= 3) & (inputs[replaced] < FIRST_SENTINEL)).all()
        randomized += replaced.sum()
    assert len(examples) > 400 and abs(selected / eligible - 0.15) < 0.005
    assert abs(masked / selected - 0.8) < 0.02
    # A random token equals the original 1 time in 256; those stay among the unchanged 10%.
    assert abs(randomized / selected - 0.1 * 255 / 256) < 0.015
    assert abs(1 - (masked + randomized) / selected - 0.1) < 0.015


def test_masked_lm_custom_mask_id_and_errors():
    docs = random_docs(20, 50)
    examples = run(pp.masked_lm, docs, {"inputs": 64, "targets": 64}, mask_id=2)
    assert any((ex["inputs"] == 2).any() for ex in examples)
    assert not any((ex["inputs"] == V - 1).any() for ex in examples)
    with pytest.raises(ValueError, match="mask_id 400"):
        run(pp.masked_lm, docs, {"inputs": 64}, mask_id=400)


@pytest.mark.parametrize("preprocessor", [pp.span_corruption, pp.prefix_lm, pp.masked_lm])
def test_same_seed_same_examples_other_seed_other_noise(preprocessor):
    docs = random_docs(50, 100, seed=5)
    lengths = {"inputs": 64, "targets": 64}

    def flat(seed):
        return [np.concatenate([ex["inputs"], [-1], ex["targets"]])
                for ex in run(preprocessor, docs, lengths, seed=seed)]

    first, again, other = flat(7), flat(7), flat(8)
    assert len(first) == len(again) and all(map(np.array_equal, first, again))
    assert not all(map(np.array_equal, first, other))


# ------------------------------------------------------------------- inside a real seqio.Task


WORDS = "the model reads tokens and learns to predict spans of text from a corpus".split()


def _texts(num_docs=120):
    rng = np.random.default_rng(6)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 40))) for _ in range(num_docs)]


@pytest.mark.parametrize("objective,converter,lengths", [
    ("span_corruption", seqio.EncDecFeatureConverter(pack=True), {"inputs": 64, "targets": 14}),
    ("next_token_lm", seqio.LMFeatureConverter(pack=True), {"targets": 64}),
    ("prefix_lm", seqio.PrefixLMFeatureConverter(pack=True), {"inputs": 32, "targets": 32}),
    ("masked_lm", seqio.EncoderFeatureConverter(mask_id=V - 1, pack=True),
     {"inputs": 64, "targets": 64}),
])
def test_preprocessor_runs_in_task_and_feature_converter(objective, converter, lengths):
    texts = _texts()
    source = seqio.FunctionDataSource(
        lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices(
            {"targets": texts}),
        splits=["train"])
    features = {k: FEATURES[k] for k in lengths}
    task = seqio.Task(f"test_preprocessors_{objective}", source=source,
                      preprocessors=[seqio.preprocessors.tokenize, getattr(pp, objective)],
                      output_features=features)

    def examples(seed):
        ds = task.get_dataset(lengths, split="train", shuffle=False, seed=seed)
        return list(ds.as_numpy_iterator())

    first = examples(seed=11)
    for ex in first:
        assert all(len(ex[k]) <= n for k, n in lengths.items())
    same, other = examples(seed=11), examples(seed=12)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, same) for k in lengths)
    if objective != "next_token_lm":
        assert not all(np.array_equal(a[k], b[k]) for a, b in zip(first, other) for k in lengths)

    batches = converter(task.get_dataset(lengths, split="train", shuffle=False, seed=11),
                        lengths).batch(4)
    model_lengths = converter.get_model_feature_lengths(lengths)
    batch = next(batches.as_numpy_iterator())
    assert set(batch) == set(model_lengths)
    assert all(batch[k].shape == (4, n) for k, n in model_lengths.items())
    tokens = batch.get("encoder_input_tokens", batch.get("decoder_target_tokens"))
    assert (tokens != 0).mean() > 0.5  # packing filled the rows
