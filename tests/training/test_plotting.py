"""plot_runs: curves of two runs into one PNG; reading a resumed run's log keeps the last record."""

import json

import numpy as np
import pytest

from t5x_like.training import plotting


def write_run(run_dir, scale, resumed=False):
    run_dir.mkdir()
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(10, 101, 10):
            f.write(json.dumps({"step": step, "split": "train", "loss": scale * 5 / np.sqrt(step)}) + "\n")
            if step % 50 == 0:
                loss = scale * 5.5 / np.sqrt(step)
                f.write(json.dumps({"step": step, "split": "eval", "loss": loss, "perplexity": np.exp(loss)}) + "\n")
        if resumed:  # a restart from step 80 rewrites steps 90 and 100
            f.write(json.dumps({"step": 90, "split": "train", "loss": 0.1}) + "\n")
            f.write('{"step": 100, "spl')  # cut off by a crash


def test_plot_two_runs(tmp_path):
    write_run(tmp_path / "small", 1.0)
    write_run(tmp_path / "large", 0.8, resumed=True)
    out = plotting.plot_runs([tmp_path / "small", tmp_path / "large"], str(tmp_path / "plots" / "curves.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "plots" / "curves.png").stat().st_size > 10_000

    data = plotting.read_metrics(tmp_path / "large")
    steps, values = data["train"]["loss"]
    assert steps == list(range(10, 101, 10)) and values[steps.index(90)] == 0.1
    assert data["eval"]["perplexity"][0] == [50, 100]


def test_missing_log_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plotting.plot_runs([tmp_path], str(tmp_path / "x.png"))
