"""The sweep report: tables best first and plots, from a study whose trials are told by hand."""

import csv

import pytest

pytest.importorskip("optuna", reason="the sweep extra is not installed: pip install -e '.[sweep]'")
from optuna.trial import TrialState  # noqa: E402

from t5x_like.sweep import worker  # noqa: E402
from t5x_like.sweep.report import write_report  # noqa: E402
from t5x_like.sweep.spec import load_spec  # noqa: E402

from tiny_sweeps import write_spec  # noqa: E402


def test_report_lists_trials_best_first_with_plots(tmp_path):
    """The tables and plots from a study whose trials are told by hand (no training)."""
    spec = load_spec(write_spec(tmp_path, {"adamw.peak_learning_rate": {"grid": [1e-3, 1e-2]},
                                           "adamw.warmup_steps": {"grid": [0, 5]}}))
    study = worker.open_study(spec)
    worker.enqueue_grid(study, spec)
    outcomes = iter([(TrialState.COMPLETE, 9.0), (TrialState.FAIL, None), (TrialState.PRUNED, 12.0),
                     (TrialState.COMPLETE, 7.0)])
    while (trial := worker.claim_next_trial(study, spec)) is not None:
        state, value = next(outcomes)
        if state == TrialState.PRUNED:
            trial.report(value, 5)
        if state == TrialState.FAIL:
            trial.set_user_attr("error", "ValueError: bad")
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    report = write_report(study, spec)
    with open(tmp_path / "sweep" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["trial"], r["state"], r["objective"]) for r in table] == [
        ("3", "COMPLETE", "7.0"), ("0", "COMPLETE", "9.0"), ("2", "PRUNED", "12.0"), ("1", "FAIL", "")]
    assert table[3]["error"] == "ValueError: bad" and table[0]["adamw.peak_learning_rate"] == "0.01"
    md = open(report).read()
    assert "Best: trial 3, perplexity 7.0000" in md and "| 1 | FAIL |  | 0.001 | 5 |  |" in md
    for png in ("objective.png", "curves.png"):
        assert (tmp_path / "sweep" / png).stat().st_size > 5000
