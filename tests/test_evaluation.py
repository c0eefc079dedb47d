"""Evaluation counts every token of a split exactly once: the eval perplexity of a text file (through
the real `eval` mode) equals a float64 reference over every token of the file, for batch sizes that
do not divide its row count; hosts with fewer batches feed padding until all are done; the unigram
baseline counts every token."""

import os
import shutil
import sys
import threading

import jax
import numpy as np
import pytest

from t5x_like import evaluation, gin_config, main, partitioning
from t5x_like.data import iterators
from t5x_like.models import DecoderOnlyConfig, model_for_config
from t5x_like.training import checkpointing, trainer

LENGTH = 32
LINES = [f"line {i}: " + "the quick brown fox jumps over the lazy dog"[: 7 + (5 * i) % 37] for i in range(60)]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_text") / "valid.txt"
    path.write_text("\n".join(LINES) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny decoder-only checkpoint with random (non-uniform) params and its model.gin."""
    cfg = DecoderOnlyConfig(vocab_size=384, d_model=32, num_heads=2, head_dim=16, mlp_dim=64, num_layers=1,
                            position_embedding="rotary")
    model = model_for_config(cfg)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: np.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                                    model.param_shapes())
    folder = tmp_path_factory.mktemp("run")
    checkpointing.save_params(checkpointing.checkpoints_dir(folder), 0, params)
    (folder / "model.gin").write_text(gin_config.model_gin_text(model))
    return model, params, str(folder)


def token_stream(path):
    """Every token of the file: each non-empty (stripped) line's bytes + EOS (byte vocabulary:
    id = byte + 3; EOS = 1)."""
    stream = []
    with open(path, "rb") as f:
        for line in f:
            line = line.strip(b" \t\n\r\f\v")
            if line:
                stream += [b + 3 for b in line] + [1]
    return stream


def rows_of(path):
    """(inputs, targets): the stream cut into LENGTH-token chunks (the `lm` objective), one per
    unpacked row."""
    stream = token_stream(path)
    chunks = [stream[i:i + LENGTH] for i in range(0, len(stream), LENGTH)]
    inputs = np.zeros((len(chunks), LENGTH), np.int32)
    targets = np.zeros((len(chunks), LENGTH), np.int32)
    for i, chunk in enumerate(chunks):
        targets[i, :len(chunk)] = chunk
        inputs[i, 1:len(chunk)] = chunk[:-1]
    return inputs, targets


def reference(model, params, path):
    """(NLL sum, tokens, rows) over every token of the file, in float64 from the model's own logits."""
    inputs, targets = rows_of(path)
    logits = np.asarray(model.compute_logits({"params": params}, {"decoder_input_tokens": inputs}), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return -float(np.sum(picked[targets > 0])), int(np.sum(targets > 0)), len(targets)


def one_device_mesh():
    return partitioning.create_mesh(devices=jax.devices()[:1])


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_eval_of_a_text_file_counts_every_token(run, text_file, batch_size):
    model, params, folder = run
    nll, tokens, rows = reference(model, params, text_file)
    assert rows % 3 and rows % 7 and rows % 8, rows  # the last batch is partial for 3, 7 and 8 x 3
    task = evaluation.text_file_task(text_file, vocabulary="byte")
    results = trainer.evaluate(model=model, checkpoint_dir=folder, mixture_or_task_name=task,
                               task_feature_lengths={"targets": LENGTH}, batch_size=batch_size,
                               mesh_fn=one_device_mesh)
    got = results[task]
    assert got["tokens"] == tokens
    assert got["perplexity"] == pytest.approx(np.exp(nll / tokens), rel=2e-6)


def test_eval_mode_on_a_text_file_counts_every_token(run, text_file, capsys):
    """The real CLI path (eval mode, runs/eval_text.gin) on all 8 test devices: 3 rows per device."""
    model, params, folder = run
    nll, tokens, _ = reference(model, params, text_file)
    assert main.main(["eval", f"--gin_file={os.path.join(folder, 'model.gin')}", "--gin_file=runs/eval_text.gin",
                      f"--gin.CHECKPOINT_DIR='{folder}'", f"--gin.EVAL_TEXT_FILE='{text_file}'",
                      "--gin.EVAL_VOCABULARY='byte'", f"--gin.TASK_FEATURE_LENGTHS={{'targets': {LENGTH}}}",
                      f"--gin.BATCH_SIZE={3 * jax.device_count()}"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("validation ")][0]
    values = dict(kv.split("=") for kv in line.split(": ", 1)[1].split())
    assert float(values["tokens"]) == tokens
    assert float(values["perplexity"]) == pytest.approx(np.exp(nll / tokens), rel=1e-4)  # printed to 4 places


def test_last_partial_batch_is_padded_with_zero_rows(text_file):
    task = evaluation.text_file_task(text_file, vocabulary="byte")
    kwargs = dict(split="validation", shuffle=False, seed=0, num_epochs=1, objective="lm")
    _, rows = rows_of(text_file)  # one LENGTH-token chunk per packed row
    dropped = list(iterators.get_dataset(task, {"targets": LENGTH}, batch_size=7, **kwargs).as_numpy_iterator())
    padded = iterators.get_dataset(task, {"targets": LENGTH}, batch_size=7, drop_remainder=False, **kwargs)
    assert all(s.shape[0] == 7 for s in padded.element_spec.values())  # one static shape: one compile
    batches = list(padded.as_numpy_iterator())
    assert len(dropped) == len(rows) // 7 and len(batches) == -(-len(rows) // 7)
    np.testing.assert_array_equal(np.concatenate([b["decoder_target_tokens"] for b in batches])[:len(rows)],
                                  rows)
    for key, value in batches[-1].items():
        assert not value[len(rows) % 7:].any(), key


def test_hosts_with_fewer_batches_feed_padding_until_all_are_done():
    """Two simulated hosts (threads with an all-gather): the one with 2 batches feeds 3 padding
    batches while the other finishes its 5; with none left anywhere both stop together."""
    barrier, box = threading.Barrier(2), {}

    def allgather(flag, host):
        box[host] = flag
        barrier.wait()
        out = [box[0], box[1]]
        barrier.wait()
        return out

    outs = {}

    def host(i, n):
        batches = ({"x": np.full((2,), i * 10 + j + 1)} for j in range(n))
        zero = {"x": np.zeros((2,), np.int64)}
        outs[i] = list(evaluation.pad_to_longest_host(batches, zero, lambda f: allgather(f, i)))

    threads = [threading.Thread(target=host, args=(0, 2)), threading.Thread(target=host, args=(1, 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [b["x"][0] for b in outs[0]] == [1, 2, 0, 0, 0]
    assert [b["x"][0] for b in outs[1]] == [11, 12, 13, 14, 15]


def test_unigram_baseline_counts_every_token(run, text_file):
    model, _, _ = run
    stream = token_stream(text_file)
    task = evaluation.text_file_task(text_file, vocabulary="byte")
    # The file is both splits: the baseline trains its counts on it and scores it.
    from t5x_like.data import corpus as corpus_lib
    name = task[:-len("_lm_byte")]
    corpus_lib.register_corpus(name, text_glob={"train": [text_file], "validation": [text_file]}, overwrite=True)
    out = evaluation.unigram_baseline(model, task, {"targets": LENGTH}, batch_size=7, train_batches=1000,
                                      eval_batches=None)
    assert out["tokens"] == len(stream)
    # Add-one smoothed frequencies of the same tokens: compare with numpy.
    counts = np.ones(384) + np.bincount(stream, minlength=384)
    logp = np.log(counts / counts.sum())
    assert out["nll"] == pytest.approx(-float(np.sum(logp[stream])) / len(stream), rel=1e-9)


@pytest.mark.parametrize("family", ["decoder_only", "encoder_decoder", "encoder_only"])
def test_all_zero_padding_rows_add_nothing(family):
    """What padding relies on: an all-zero row has zero weight and finite logits in every family."""
    from t5x_like.models import EncoderDecoderConfig, EncoderOnlyConfig

    tiny = dict(vocab_size=384, d_model=16, num_heads=2, head_dim=8, mlp_dim=32)
    cfg = {"decoder_only": lambda: DecoderOnlyConfig(num_layers=1, position_embedding="rotary", **tiny),
           "encoder_decoder": lambda: EncoderDecoderConfig(num_encoder_layers=1, num_decoder_layers=1, **tiny),
           "encoder_only": lambda: EncoderOnlyConfig(num_layers=1, position_embedding="learned", **tiny)}[family]()
    model = model_for_config(cfg)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: np.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                                    model.param_shapes())
    names = model.required_features + model.optional_features + (model.targets_feature, model.weights_feature)
    batch = {k: np.zeros((2, 8), np.int32) for k in names if k}
    out = jax.device_get(jax.jit(model.eval_sums)(params, batch))
    assert {k: float(v) for k, v in out.items()} == {"nll_sum": 0.0, "tokens": 0.0, "correct": 0.0}


def test_eval_of_a_binary_or_non_utf8_file_is_refused(run, tmp_path):
    from t5x_like.data import CorpusError

    model, params, _ = run
    binary = shutil.which("ls") or sys.executable
    evaluate = evaluation.Evaluator(model, evaluation.text_file_task(binary), {"targets": LENGTH}, 1,
                                    one_device_mesh(), max_batches=None).evaluate
    with pytest.raises(CorpusError, match=f"{binary} looks binary"):
        evaluate(params)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 cr\u00e8me\nplain line\n".encode("latin-1"))
    evaluator = evaluation.Evaluator(model, evaluation.text_file_task(str(latin)), {"targets": LENGTH}, 1,
                                     one_device_mesh(), max_batches=None)
    with pytest.raises(CorpusError, match=f"{latin} is not valid UTF-8 text: 1 of 2 lines hold 2 bytes"):
        evaluator.evaluate(params)
    task = evaluation.text_file_task(str(latin), on_bad_text="replace")
    repaired = evaluation.Evaluator(model, task, {"targets": LENGTH}, 1, one_device_mesh(), max_batches=None)
    assert repaired.evaluate(params)[task]["tokens"] == len("caf\ufffd cr\ufffdme\nplain line\n".encode())
