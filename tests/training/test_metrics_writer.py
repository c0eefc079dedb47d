"""MetricsWriter: TensorBoard events readable back per split, JSONL lines, no output off process 0."""

import glob
import json
import os

import numpy as np

from t5x_like.training.metrics_writer import MetricsWriter


def read_events(split_dir):
    import tensorflow as tf
    values = {}
    for path in glob.glob(os.path.join(split_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                values[(v.tag, event.step)] = (v.metadata.plugin_data.plugin_name, tf.make_ndarray(v.tensor))
    return values


def test_writes_tensorboard_and_jsonl(tmp_path, capsys):
    with MetricsWriter(tmp_path, is_process_zero=True, total_steps=20) as w:
        for step in (10, 20):
            w.update_progress(step, tokens=4096, loss=3.0 / step)
            w.write_scalars(step, {"loss": np.float32(3.0 / step), "learning_rate": 1e-3 * step}, split="train")
        w.write_scalars(20, {"loss": 2.5, "perplexity": np.exp(2.5)}, split="eval")
        w.write_text(0, "gin_config", "TRAIN_STEPS = 20")
        w.flush()

    train, evals = read_events(tmp_path / "train"), read_events(tmp_path / "eval")
    assert train[("loss", 10)][0] == "scalars"  # what TensorBoard's scalar dashboard shows
    np.testing.assert_allclose(train[("loss", 10)][1], 0.3, rtol=1e-6)
    np.testing.assert_allclose(train[("learning_rate", 20)][1], 0.02, rtol=1e-6)
    np.testing.assert_allclose(evals[("perplexity", 20)][1], np.exp(2.5), rtol=1e-6)
    assert set(evals) == {("loss", 20), ("perplexity", 20)}
    assert train[("gin_config", 0)] == ("text", b"TRAIN_STEPS = 20")

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in lines] == [(10, "train"), (20, "train"), (20, "eval")]
    assert lines[2]["perplexity"] == np.exp(2.5) and isinstance(lines[0]["loss"], float)
    err = capsys.readouterr().err
    assert "20/20" in err and "tok/s" in err  # the progress bar went to the terminal


def test_resumed_run_appends(tmp_path):
    for step in (1, 2):
        with MetricsWriter(tmp_path, is_process_zero=True, progress=False, tensorboard=False) as w:
            w.write_scalars(step, {"loss": float(step)})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert not os.path.exists(tmp_path / "train")


def test_other_processes_write_nothing(tmp_path, capsys):
    with MetricsWriter(tmp_path / "logs", is_process_zero=False, total_steps=5) as w:
        w.update_progress(5, tokens=10, loss=1.0)
        w.write_scalars(5, {"loss": 1.0})
        w.write_text(5, "x", "y")
        w.flush()
    assert not os.path.exists(tmp_path / "logs")
    assert capsys.readouterr().err == ""
