"""Tiny sweep specs for the sweep tests (imported by name: tests/sweep has no __init__.py).

`write_spec(tmp_path, parameters, **overrides)` writes a spec that trains the tiny model of
tests/tiny_lm_run.gin for 10 steps per trial into tmp_path/sweep and returns its path.
"""

import os

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_RUN_GIN = os.path.join(REPO, "tests", "tiny_lm_run.gin")
LR = {"adamw.peak_learning_rate": {"grid": [1e-3, 1e-2]}}


def write_spec(tmp_path, parameters, name="spec.yaml", **overrides):
    spec = {"study": "t", "gin_files": [TINY_RUN_GIN, "optimizers/adamw.gin"],
            "bindings": {"TRAIN_STEPS": 10, "train.eval_every": 5, "train.eval_batches": 1,
                         "train.checkpoint_every": 5, "train.async_checkpoints": False},
            "parameters": parameters, "pruner": {"kind": "none"}, "sweep_dir": str(tmp_path / "sweep"),
            "heartbeat": {"interval_s": 2, "grace_s": 30}}
    spec.update(overrides)
    spec["bindings"] = {"adamw.warmup_steps": 2, **spec["bindings"]}
    for varied in parameters:
        spec["bindings"].pop(varied, None)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)
