"""Where training metrics go: TensorBoard event files, a JSONL log and a terminal progress bar.

Layout under `log_dir`: `<split>/events.out.tfevents.*` (one TensorBoard run per split, so train and
eval curves overlay under the same tag) and `metrics.jsonl`, one object per write:
`{"step": 100, "split": "train", "time": <unix s>, "loss": 2.3, ...}`. The JSONL is appended to, so a
resumed run continues its log. A run resumed from step N (`initial_step=N`) first drops the rows
past N, written by an earlier attempt after its last checkpoint (it was killed), so each step is
logged once; the file is rewritten atomically (a temporary file, then `os.replace`). Readers still
keep the last record of a repeated (split, step), for logs written before that.
Only process 0 writes; on other hosts every method is a no-op, so callers need no `if`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Mapping, Optional

import jax
import numpy as np

JSONL = "metrics.jsonl"

log = logging.getLogger(__name__)


def _tf():
    """TensorFlow for summaries only: hide accelerators so it never claims memory JAX needs."""
    import tensorflow as tf
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised, or no such device type
        pass
    return tf


def _plugin(tf, name: str):
    """Summary metadata TensorBoard's scalar/text dashboards look for. Written with `tf.summary.write`
    rather than `tf.summary.scalar`, which needs the `tensorboard` package (TF 2.21 no longer
    installs it); reading the logs still does."""
    from tensorflow.core.framework import summary_pb2
    meta = summary_pb2.SummaryMetadata()
    meta.plugin_data.plugin_name = name
    return meta


def _scalar(name, value) -> float:
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric {name!r} has shape {arr.shape}; only scalars can be written")
    return float(arr.reshape(()))


def drop_rows_after(path: str, step: int) -> int:
    """Remove the rows of a metrics.jsonl whose step is past `step` (and lines cut off by a crash),
    rewriting the file atomically; returns how many lines went. A file with nothing to drop is
    left untouched."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    keep, dropped = [], 0
    for line in data.splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:  # cut off by a crash (or not UTF-8): readers skip it anyway
            dropped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)) and rec["step"] > step:
            dropped += 1
            continue
        keep.append(line if line.endswith(b"\n") else line + b"\n")
    new = b"".join(keep)
    if new == data:
        return 0
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    if dropped:
        log.info("%s: dropped %d rows past step %d (logged after the last checkpoint by an earlier "
                 "attempt)", path, dropped, step)
    return dropped


class MetricsWriter:
    """`is_process_zero=None` asks JAX (`jax.process_index() == 0`). `initial_step`: the step this
    run starts from (the restored step of a resumed run, 0 for a fresh one): rows past it are
    dropped from metrics.jsonl before anything is appended, since this run logs those steps again.
    None (the default) appends to the log as it is."""

    def __init__(self, log_dir: str, is_process_zero: Optional[bool] = None, total_steps: Optional[int] = None,
                 initial_step: Optional[int] = None, progress: bool = True, tensorboard: bool = True):
        self.log_dir = os.fspath(log_dir)
        self.active = jax.process_index() == 0 if is_process_zero is None else bool(is_process_zero)
        self._writers, self._bar, self._jsonl, self._tf = {}, None, None, None
        self._tokens, self._t0 = 0, None
        if not self.active:
            return
        os.makedirs(self.log_dir, exist_ok=True)
        if initial_step is not None:
            drop_rows_after(os.path.join(self.log_dir, JSONL), int(initial_step))
        self._jsonl = open(os.path.join(self.log_dir, JSONL), "a", encoding="utf-8")
        if tensorboard:
            self._tf = _tf()
        if progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, initial=initial_step or 0, unit="step", dynamic_ncols=True,
                             smoothing=0.1)

    def _writer(self, split: str):
        if split not in self._writers:
            self._writers[split] = self._tf.summary.create_file_writer(os.path.join(self.log_dir, split))
        return self._writers[split]

    def write_scalars(self, step: int, scalars: Mapping[str, object], split: str = "train") -> None:
        if not self.active:
            return
        step = int(step)
        values = {k: _scalar(k, v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": step, "split": split, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()
        if self._tf is not None:
            with self._writer(split).as_default():
                for k, v in values.items():
                    self._tf.summary.write(k, self._tf.constant(v, self._tf.float32), step=step,
                                           metadata=_plugin(self._tf, "scalars"))

    def write_text(self, step: int, name: str, text: str, split: str = "train") -> None:
        """E.g. the operative gin config, readable in TensorBoard's Text tab."""
        if self.active and self._tf is not None:
            with self._writer(split).as_default():
                self._tf.summary.write(name, self._tf.constant(text), step=int(step),
                                       metadata=_plugin(self._tf, "text"))

    def update_progress(self, step: int, tokens: int = 0, **postfix) -> None:
        """Move the bar to `step`; `tokens` processed since the last call feed the tokens/s figure,
        averaged since the first call (the first call only starts the clock)."""
        if self._bar is None:
            return
        now = time.perf_counter()
        if self._t0 is None:
            self._t0 = now
        else:
            self._tokens += int(tokens)
        shown = {k: f"{_scalar(k, v):.4g}" for k, v in postfix.items()}
        if now > self._t0 and self._tokens:
            shown["tok/s"] = f"{self._tokens / (now - self._t0):,.0f}"
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(int(step) - self._bar.n)

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        for w in self._writers.values():
            w.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for w in self._writers.values():
            w.close()
        self._writers = {}
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
