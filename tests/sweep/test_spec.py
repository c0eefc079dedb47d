"""Sweep specs: a bad spec is one clear error before any trial, the shipped specs are valid, and
YAML exponents without a dot read as numbers."""

import glob
import os

import pytest

pytest.importorskip("optuna", reason="the sweep extra is not installed: pip install -e '.[sweep]'")

from t5x_like import main as cli  # noqa: E402
from t5x_like.sweep.spec import check_gin, load_spec  # noqa: E402

from tiny_sweeps import LR, REPO, write_spec  # noqa: E402

# -- spec checks: one line, exit 2, nothing created -------------------------------------------------

BAD_SPECS = {
    "unknown parameter": ({"adamw.peak_learning_rat": {"grid": [1e-3]}}, {}, "peak_learning_rat"),
    "unknown configurable": ({"Adamw.peak_learning_rate": {"grid": [1e-3]}}, {}, "Adamw"),
    "unknown macro": ({"TRAIN_STEPZ": {"grid": [1, 2]}}, {}, "unknown gin macro 'TRAIN_STEPZ'"),
    "unknown fixed binding": (LR, {"bindings": {"train.no_such_arg": 1}}, "no_such_arg"),
    "empty parameters": ({}, {}, "parameters: give at least one"),
    "empty grid": ({"adamw.peak_learning_rate": {"grid": []}}, {}, "non-empty list"),
    "low > high": ({"adamw.peak_learning_rate": {"log_uniform": [1e-2, 1e-4]}}, {}, "low < high"),
    "string bound": ({"adamw.peak_learning_rate": {"uniform": ["a", 1.0]}}, {}, "bounds must be numbers"),
    "unknown space": ({"adamw.peak_learning_rate": {"normal": [0, 1]}}, {}, "unknown space kind 'normal'"),
    "unknown top-level key": (LR, {"trials": 3}, "unknown key 'trials'"),
    "unknown pruner": (LR, {"pruner": {"kind": "hyperband"}}, "pruner.kind"),
    "grid mixed with uniform": ({**LR, "adamw.warmup_steps": {"int_uniform": [0, 9]}}, {}, "cannot be mixed"),
    "no budget": ({"adamw.peak_learning_rate": {"uniform": [1e-4, 1e-2]}}, {}, "needs n_trials"),
    "MODEL_DIR": (LR, {"bindings": {"MODEL_DIR": "x"}}, "MODEL_DIR is set per trial"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_is_one_clear_error_before_any_trial(case, tmp_path, capsys):
    parameters, overrides, expected = BAD_SPECS[case]
    path = write_spec(tmp_path, parameters, **overrides)
    assert cli.main(["sweep", f"--spec={path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not os.path.exists(tmp_path / "sweep")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))), ids=os.path.basename)
def test_shipped_specs_are_valid(path):
    spec = load_spec(path)
    check_gin(spec)
    assert spec.is_grid and len(spec.grid_points()) in (4, 9)


def test_yaml_exponents_without_dot_are_numbers(tmp_path):
    spec = load_spec(write_spec(tmp_path, {"adamw.peak_learning_rate": {"log_uniform": ["1e-4", "1e-2"]}},
                                budget={"n_trials": 2}))
    (space,) = spec.spaces
    assert (space.low, space.high) == (1e-4, 1e-2)
    # the YAML text itself, not yaml.safe_dump's quoting, is what users write:
    (tmp_path / "raw.yaml").write_text((tmp_path / "spec.yaml").read_text().replace("'1e-4'", "1e-4"))
    assert load_spec(str(tmp_path / "raw.yaml")).spaces[0].low == 1e-4
