"""A run directory held for the length of one run: its lock, metrics writer and checkpoint manager.

    with open_run(model_dir) as run:        # MODEL_DIR created and locked: one run per directory
        checkpointer = run.checkpointer(save_interval_steps=..., keep_last=..., ...)
        run.write_file("config.gin", text)  # process 0 only
        writer = run.writer(total_steps=..., initial_step=..., progress=...)
        ...
    # on exit, also on error: the writer closes, then the checkpointer (pending saves finish), then
    # the lock is released, each even if an earlier one failed

Shared by the trainer (training/trainer.py) and the RL loop (inference/rlhf.py), so both open and
tear down a run the same way.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import jax

from t5x_like.training import run_checks, run_lock
from t5x_like.training.checkpointing import Checkpointer, checkpoints_dir
from t5x_like.training.metrics_writer import MetricsWriter


class RunContext:
    """What an open run holds; made by `open_run`, which closes it."""

    def __init__(self, model_dir: str, lock: run_lock.RunLock):
        self.model_dir = model_dir
        self._lock = lock
        self._writer: Optional[MetricsWriter] = None
        self._checkpointer: Optional[Checkpointer] = None

    def checkpointer(self, **kwargs) -> Checkpointer:
        """The run's checkpoint manager over MODEL_DIR/checkpoints (kwargs: `Checkpointer`'s)."""
        assert self._checkpointer is None, "one checkpointer per run"
        self._checkpointer = Checkpointer(checkpoints_dir(self.model_dir), **kwargs)
        return self._checkpointer

    def writer(self, **kwargs) -> MetricsWriter:
        """The run's metrics writer over MODEL_DIR (kwargs: `MetricsWriter`'s)."""
        assert self._writer is None, "one metrics writer per run"
        self._writer = MetricsWriter(self.model_dir, **kwargs)
        return self._writer

    def write_file(self, name: str, text: str) -> None:
        """MODEL_DIR/name := text, written by process 0 only (config.gin, operative_config.gin)."""
        if jax.process_index() == 0:
            with open(os.path.join(self.model_dir, name), "w") as f:
                f.write(text)

    def close(self) -> None:
        """Writer, then checkpointer, then the lock; each one even if an earlier one raised."""
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            try:
                if self._checkpointer is not None:
                    self._checkpointer.close()
            finally:
                self._lock.release()


@contextlib.contextmanager
def open_run(model_dir: str) -> Iterator[RunContext]:
    """Create MODEL_DIR (a bad path is a one-line `RunValueError`) and lock it before anything is
    written (a held lock is a `RunLockedError`); close everything opened under it on exit."""
    model_dir = os.path.abspath(os.fspath(model_dir))
    run_checks.make_model_dir(model_dir)
    run = RunContext(model_dir, run_lock.lock_run_dir(model_dir))
    try:
        yield run
    finally:
        run.close()
