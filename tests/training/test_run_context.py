"""training/run_context.open_run: MODEL_DIR locked for the run; writer, checkpointer and lock closed
in that order on exit, also when the run or one of the closes raises."""

import pytest

from t5x_like.training import run_context
from t5x_like.training.run_checks import RunValueError
from t5x_like.training.run_lock import RunLockedError


def _record_closes(run, order, fail=()):
    """Open the run's checkpointer and writer with closes that log their order (and maybe raise)."""
    lock = run._lock
    for name, thing in (("checkpointer", run.checkpointer(save_interval_steps=1, async_save=False)),
                        ("writer", run.writer(progress=False))):
        def close(name=name, original=thing.close):
            order.append((name, lock.held))
            original()
            if name in fail:
                raise OSError(f"{name} close failed")
        thing.close = close


def test_closes_writer_then_checkpointer_then_lock_on_error(tmp_path):
    order = []
    with pytest.raises(RuntimeError, match="step failed"):
        with run_context.open_run(str(tmp_path / "run")) as run:
            _record_closes(run, order)
            with pytest.raises(RunLockedError, match="is in use"):  # one run per MODEL_DIR
                with run_context.open_run(str(tmp_path / "run")):
                    pass
            raise RuntimeError("step failed")
    assert order == [("writer", True), ("checkpointer", True)]  # the lock goes last
    assert not run._lock.held
    with run_context.open_run(str(tmp_path / "run")) as again:  # released: the directory opens again
        assert again.model_dir == str(tmp_path / "run")


def test_a_failing_close_still_closes_the_rest(tmp_path):
    order = []
    with pytest.raises(OSError, match="writer close failed"):
        with run_context.open_run(str(tmp_path)) as run:
            _record_closes(run, order, fail=("writer",))
    assert order == [("writer", True), ("checkpointer", True)] and not run._lock.held


def test_write_file_and_a_bad_model_dir(tmp_path):
    with run_context.open_run(str(tmp_path)) as run:
        run.write_file("config.gin", "x = 1\n")
    assert (tmp_path / "config.gin").read_text() == "x = 1\n"
    (tmp_path / "file").write_text("")
    with pytest.raises(RunValueError, match="cannot be created"):
        with run_context.open_run(str(tmp_path / "file" / "run")):
            pass
