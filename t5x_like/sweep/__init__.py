"""Hyperparameter sweeps on Optuna (`python -m t5x_like.main sweep --spec=FILE.yaml`).

A package so that its three parts import one way only, spec <- report <- worker:
- spec.py: the YAML spec and its checks (no Optuna);
- report.py: the tables and plots of a study's trials, and the user attrs they read;
- worker.py: one worker of a study (storage, grid bookkeeping, dead-worker retry, training).
The names below are what the rest of the repository uses (t5x_like/main.py).
"""

from t5x_like.sweep.report import write_report
from t5x_like.sweep.spec import Spec, SweepSpecError, check_gin, load_spec
from t5x_like.sweep.worker import run, run_worker

__all__ = ["Spec", "SweepSpecError", "check_gin", "load_spec", "run", "run_worker", "write_report"]
