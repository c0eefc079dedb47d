"""Tasks: every objective yields the model's batch names; no token is lost; packing is right."""

import collections
import os

import numpy as np
import pytest
import seqio

import t5x_like.data as data

LENGTHS = {"span_corruption": {"inputs": 64, "targets": 14}, "lm": {"targets": 64},
           "prefix_lm": {"inputs": 32, "targets": 32}, "mlm": {"inputs": 64, "targets": 64}}
MODEL_FEATURES = {
    "span_corruption": {"encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                        "decoder_loss_weights"},
    "lm": {"decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"},
    "prefix_lm": {"decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                  "decoder_causal_attention"},
    "mlm": {"encoder_input_tokens", "encoder_target_tokens", "encoder_loss_weights"},
}
PACKING_FEATURES = {"span_corruption": {"encoder_segment_ids", "encoder_positions", "decoder_segment_ids",
                                        "decoder_positions"},
                    "lm": {"decoder_segment_ids", "decoder_positions"},
                    "prefix_lm": {"decoder_segment_ids", "decoder_positions"},
                    "mlm": {"encoder_segment_ids", "encoder_positions"}}


def _batches(name, lengths, n, **kwargs):
    kwargs = {"batch_size": 4, "shuffle": False, "seed": 0, **kwargs}
    ds = data.get_dataset(name, lengths, **kwargs)
    return list((ds if n is None else ds.take(n)).as_numpy_iterator())


def test_tasks_exist_for_every_objective_corpus_and_vocabulary():
    for vocab in ("spm", "byte"):
        for objective in data.OBJECTIVES:
            assert data.task_name("embedded", objective, vocab) in seqio.TaskRegistry.names()
        assert data.mixture_name("embedded", vocab) in seqio.MixtureRegistry.names()
    assert data.info("embedded_prefix_lm_spm") == data.tasks.TaskInfo("embedded", "prefix_lm", "spm")


def test_registering_builds_nothing(monkeypatch, tmp_path, write_file):
    monkeypatch.setenv("T5X_LIKE_DATA_DIR", str(tmp_path / "fresh"))
    data.register_vocabulary("spmlazy", data.sentencepiece_vocabulary("embedded", 2000), overwrite=True)
    data.register_corpus("lazycorpus", text_glob=write_file("lazy.txt", b"text\n"), overwrite=True)
    assert "lazycorpus_span_corruption_spmlazy" in data.task_names()
    assert "embedded_mlm_spmlazy" in data.task_names()
    assert not os.path.exists(tmp_path / "fresh")


@pytest.mark.parametrize("objective", data.OBJECTIVES)
@pytest.mark.parametrize("pack", [True, False])
def test_every_objective_yields_the_model_batch_names(objective, pack):
    name = data.task_name("embedded", objective, "spm")
    (batch,) = _batches(name, LENGTHS[objective], 1, pack=pack, shuffle=True)
    assert set(batch) == MODEL_FEATURES[objective] | (PACKING_FEATURES[objective] if pack else set())
    for key, value in batch.items():
        assert value.dtype == np.int32 and value.shape[0] == 4
    tokens = batch.get("decoder_target_tokens", batch.get("encoder_target_tokens"))
    assert (tokens > 0).mean() > 0.4 and tokens.max() < data.get_vocabulary("spm").vocab_size


def test_lm_stream_loses_no_token_between_batches():
    vocab = data.get_vocabulary("spm")
    expected = []
    for doc in data.get_corpus("embedded").iter_documents("validation"):
        expected.extend(list(vocab.encode_tf(doc).numpy()) + [1])  # the pipeline's (TF) tokenizer
    for pack in (False, True):
        batches = _batches("embedded_lm_spm", {"targets": 64}, None, split="validation", pack=pack,
                           num_epochs=1)
        stream = np.concatenate([row[row > 0] for b in batches for row in b["decoder_target_tokens"]])
        # The whole split, but for the final partial batch (batches have a fixed shape).
        assert len(expected) - 4 * 64 < len(stream) <= len(expected) and len(stream) > 10_000
        np.testing.assert_array_equal(stream, expected[:len(stream)])
        # Teacher forcing: inputs are the targets shifted right within each row.
        b = batches[0]
        np.testing.assert_array_equal(b["decoder_input_tokens"][:, 1:], b["decoder_target_tokens"][:, :-1])


def _segments(row_tokens, row_segments):
    return [row_tokens[row_segments == s] for s in range(1, row_segments.max() + 1)]


def _check_packing(tokens, segment_ids, positions):
    """Segment ids count up from 1 then pad with 0; positions restart at 0 in every segment."""
    for toks, seg, pos in zip(tokens, segment_ids, positions):
        used = seg > 0
        assert np.all(np.diff(seg[used]) >= 0) and seg[used][0] == 1 and not np.any(seg[~used])
        assert np.all(np.diff(seg[used]) <= 1) and np.all(toks[~used] == 0) and np.all(pos[~used] == 0)
        for s in range(1, seg.max() + 1):
            np.testing.assert_array_equal(pos[seg == s], np.arange(np.sum(seg == s)))


def test_packed_prefix_lm_segments_positions_and_tokens():
    name, lengths = "embedded_prefix_lm_spm", LENGTHS["prefix_lm"]
    examples = list(seqio.get_mixture_or_task(name).get_dataset(
        lengths, "validation", shuffle=False, seed=0).take(40).as_numpy_iterator())
    batches = _batches(name, lengths, 4, split="validation", batch_size=4)
    tgt = np.concatenate([b["decoder_target_tokens"] for b in batches])
    seg = np.concatenate([b["decoder_segment_ids"] for b in batches])
    pos = np.concatenate([b["decoder_positions"] for b in batches])
    _check_packing(tgt, seg, pos)
    assert seg.max() >= 2  # rows really hold several examples
    segments = [s for row, ids in zip(tgt, seg) for s in _segments(row, ids)]
    for got, ex in zip(segments, examples):
        np.testing.assert_array_equal(got, np.concatenate([ex["inputs"], ex["targets"]]))
    # Loss on the continuation only; the prefix (plus the first target position) attends fully.
    b = batches[0]
    row, ids = 0, b["decoder_segment_ids"][0]
    first = examples[0]
    n_in, n_tgt = len(first["inputs"]), len(first["targets"])
    np.testing.assert_array_equal(b["decoder_loss_weights"][row][:n_in + n_tgt], [0] * n_in + [1] * n_tgt)
    np.testing.assert_array_equal(b["decoder_causal_attention"][row][:n_in + 1], [1] * (n_in + 1))
    assert ids[0] == 1


def test_packed_span_corruption_matches_unpacked_examples():
    name, lengths = "embedded_span_corruption_spm", LENGTHS["span_corruption"]
    task_ds = seqio.get_mixture_or_task(name).get_dataset(lengths, "validation", shuffle=False, seed=0)
    examples = list(task_ds.take(30).as_numpy_iterator())
    converter = data.feature_converter_for("span_corruption", pack=True)
    packed = list(converter(task_ds, {"inputs": 256, "targets": 64}).take(5).as_numpy_iterator())
    enc = np.stack([p["encoder_input_tokens"] for p in packed])
    enc_seg = np.stack([p["encoder_segment_ids"] for p in packed])
    dec = np.stack([p["decoder_target_tokens"] for p in packed])
    dec_seg = np.stack([p["decoder_segment_ids"] for p in packed])
    _check_packing(enc, enc_seg, np.stack([p["encoder_positions"] for p in packed]))
    _check_packing(dec, dec_seg, np.stack([p["decoder_positions"] for p in packed]))
    assert enc_seg.max() >= 3
    inputs = [s for r, i in zip(enc, enc_seg) for s in _segments(r, i)]
    targets = [s for r, i in zip(dec, dec_seg) for s in _segments(r, i)]
    for got_in, got_tgt, ex in zip(inputs, targets, examples):
        np.testing.assert_array_equal(got_in, ex["inputs"])
        np.testing.assert_array_equal(got_tgt, ex["targets"])
    # Sentinels come from the top of the vocabulary; every example ends in EOS.
    vocab_size = data.get_vocabulary("spm").vocab_size
    assert examples[0]["targets"][0] == vocab_size - 1 and examples[0]["inputs"][-1] == 1
    assert np.any(examples[0]["inputs"] >= vocab_size - 100)


def test_mlm_loss_covers_masked_and_replaced_positions():
    (batch,) = _batches("embedded_mlm_spm", LENGTHS["mlm"], 1, pack=False, batch_size=8)
    vocab_size = data.get_vocabulary("spm").vocab_size
    inputs, targets, weights = (batch[k] for k in ("encoder_input_tokens", "encoder_target_tokens",
                                                   "encoder_loss_weights"))
    np.testing.assert_array_equal(weights, (inputs == vocab_size - 1) | (inputs != targets))
    assert 0.08 < weights.sum() / (targets > 0).sum() < 0.2


def test_mixtures_sample_tasks_with_their_rates(write_file):
    (batch,) = _batches(data.mixture_name("embedded", "spm"), LENGTHS["span_corruption"], 1, shuffle=True)
    assert set(batch) >= MODEL_FEATURES["span_corruption"]
    # A subtask read the way its mixture feeds the model (evaluation per subtask).
    (batch,) = _batches("embedded_prefix_lm_spm", LENGTHS["span_corruption"], 1, objective="span_corruption")
    assert set(batch) >= MODEL_FEATURES["span_corruption"]
    data.register_corpus("aaa", text_glob=write_file("a.txt", b"aaaa aaaa\n" * 200), overwrite=True)
    data.register_corpus("zzz", text_glob=write_file("z.txt", b"zzzz zzzz\n" * 200), overwrite=True)
    data.register_mixture("az_lm_byte", [("aaa_lm_byte", 3), ("zzz_lm_byte", 1)])
    batches = _batches("az_lm_byte", {"targets": 8}, 50, batch_size=8, shuffle=True, pack=False)
    first = collections.Counter(int(row[0]) for b in batches for row in b["decoder_target_tokens"])
    a, z = data.get_vocabulary("byte").encode("az")
    share = first[a] / (first[a] + first[z])
    assert 0.65 < share < 0.85, first
    with pytest.raises(ValueError, match="mixes objectives"):
        data.register_mixture("bad_mix", [("aaa_lm_byte", 1), ("aaa_span_corruption_byte", 1)])


def test_length_and_name_errors_are_clear(write_file):
    with pytest.raises(ValueError, match="lack \\['targets'\\]"):
        data.get_dataset("embedded_span_corruption_spm", {"inputs": 64})
    with pytest.raises(ValueError, match="too short"):
        data.get_dataset("embedded_span_corruption_spm", {"inputs": 2, "targets": 2})
    with pytest.raises(ValueError, match="set it to 14"):
        data.get_dataset("embedded_span_corruption_spm", {"inputs": 64, "targets": 5})
    with pytest.raises(ValueError, match="extra_ids"):  # 4096 inputs need more than 100 sentinels
        data.get_dataset("embedded_span_corruption_spm", {"inputs": 4096, "targets": 1000})
    with pytest.raises(ValueError, match="too short"):
        data.get_dataset("embedded_lm_spm", {"targets": 1})
    with pytest.raises(ValueError, match="no task or mixture"):
        data.get_dataset("embedded_nope_spm", {"targets": 8})
    with pytest.raises(ValueError, match="no split"):
        data.get_dataset("embedded_lm_spm", {"targets": 8}, split="test")
    data.register_corpus("blankonly", text_glob=write_file("blank.txt", b"\n \n"), overwrite=True)
    with pytest.raises(data.CorpusError, match="no usable text"):
        data.get_dataset("blankonly_lm_byte", {"targets": 8})
