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


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_log(path, lines):
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


KILLED_RUN = ([{"step": s, "split": "train", "loss": 10.0 - s} for s in range(1, 5)]
              + [{"step": 4, "split": "eval", "perplexity": 40.0}, {"step": 4, "split": "eval/task_a", "nll": 3.0}]
              + [{"step": s, "split": "train", "loss": 10.0 - s} for s in range(5, 8)]
              + [{"step": 6, "split": "eval", "perplexity": 30.0}])


def test_resume_drops_rows_logged_after_the_restored_step(tmp_path):
    log = tmp_path / "metrics.jsonl"
    write_log(log, KILLED_RUN)
    with open(log, "a") as f:
        f.write('{"step": 8, "split": "tr')  # cut off by the SIGKILL
    with MetricsWriter(tmp_path, is_process_zero=True, initial_step=4, progress=False, tensorboard=False) as w:
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
        for step in (5, 6):
            w.write_scalars(step, {"loss": 0.5 * step})
    got = rows(log)
    assert [(r["step"], r["split"]) for r in got] == [
        (1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "eval"), (4, "eval/task_a"),
        (5, "train"), (6, "train")]
    assert got[:6] == KILLED_RUN[:6]  # rows up to the restored step are kept as they were
    assert got[6]["loss"] == 2.5 and got[7]["loss"] == 3.0


def test_fresh_start_drops_everything_and_untouched_when_nothing_is_past(tmp_path):
    log = tmp_path / "metrics.jsonl"
    write_log(log, KILLED_RUN)
    inode, before = os.stat(log).st_ino, log.read_bytes()
    MetricsWriter(tmp_path, is_process_zero=True, initial_step=7, progress=False, tensorboard=False).close()
    assert os.stat(log).st_ino == inode and log.read_bytes() == before  # nothing past 7: not rewritten
    MetricsWriter(tmp_path, is_process_zero=False, initial_step=0, progress=False, tensorboard=False).close()
    assert log.read_bytes() == before  # only process 0 touches the log
    MetricsWriter(tmp_path, is_process_zero=True, progress=False, tensorboard=False).close()
    assert log.read_bytes() == before  # no initial_step (e.g. eval's output_dir): append only
    os.chmod(log, 0o640)
    MetricsWriter(tmp_path, is_process_zero=True, initial_step=0, progress=False, tensorboard=False).close()
    assert log.read_text() == "" and os.stat(log).st_mode & 0o777 == 0o640  # no checkpoint: start over


def test_read_metrics_keeps_each_step_once(tmp_path):
    from t5x_like.training.plotting import read_metrics

    resumed = [{"step": s, "split": "train", "loss": 1.0 * s} for s in (1, 2, 3, 2, 3, 4)]
    write_log(tmp_path / "metrics.jsonl", resumed + [{"step": 3, "split": "eval", "perplexity": 9.0},
                                                     {"step": 3, "split": "eval", "perplexity": 7.0}, [1, 2]])
    data = read_metrics(tmp_path)
    assert data["train"]["loss"] == ([1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0])
    assert data["eval"]["perplexity"] == ([3], [7.0])  # the last record of a repeated step wins
