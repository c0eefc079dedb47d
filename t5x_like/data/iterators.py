"""Per-host batches: deterministic for a seed and resumable exactly (`partitioning.to_global_batch`
assembles them into global jax.Arrays).

Resume: a checkpoint holds each host's position twice. `state()` is a few JSON fields (the settings
that define the stream and the batches consumed), and `position_files()` is the tf.data iterator's
own checkpoint (`tf.train.Checkpoint(iterator=...)`, as T5X saves it): shuffle buffers, packing
state, file offsets. Restoring that takes about as long as starting a fresh pipeline, whatever the
position, where replaying the consumed batches grows with it (about 80 s at step 10k). Its price is
size, mostly the example shuffle buffer (a few MB per host: `benchmarks/data_pipeline.py`). A
pipeline tf.data cannot serialise (a Python generator or `py_function` in a preprocessor) or a
checkpoint from before this existed falls back to replay: the pipeline is a function of the seed
(seeded file and example shuffles, stateless-random preprocessors, deterministic interleave), so
rebuilding it and skipping the consumed batches gives the same stream.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import jax
import numpy as np
import seqio
import tensorflow as tf

from t5x_like.data import tasks as tasks_lib
from t5x_like.data.corpus import CorpusError

STATE_VERSION = 1
POSITION_PREFIX = "iterator"  # file prefix of the tf.data iterator checkpoint

log = logging.getLogger(__name__)


class DataResumeError(CorpusError):
    """A saved data position that cannot continue this run's stream (other task, lengths, seed...)."""


def host_shard_info() -> seqio.ShardInfo:
    """This process' shard: hosts read disjoint parts of the data that together cover it."""
    return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())


def get_dataset(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                split: str = "train", batch_size: int = 8, shuffle: bool = True, seed: int = 0,
                shard_info: Optional[seqio.ShardInfo] = None, pack: bool = True,
                num_epochs: Optional[int] = None,
                feature_converter: Optional[seqio.FeatureConverter] = None,
                objective: Optional[str] = None, drop_remainder: bool = True,
                model=None) -> tf.data.Dataset:
    """tf.data of this host's batches (`batch_size` rows each) with the model's feature names.

    `num_epochs=None` repeats forever (training); use 1 for evaluation. Every batch has the same
    static shape (one compile). The last partial batch of a finite stream is dropped, or, with
    `drop_remainder=False` (evaluation: every example counts exactly once), padded to `batch_size`
    with all-zero rows, which are padding (zero loss weights) to every model. The converter follows
    the task's objective unless `objective` (or a `feature_converter`) says otherwise, e.g. to read
    the prefix_lm subtask of an encoder-decoder mixture as encoder-decoder batches. A task
    registered with seqio directly (`seqio.TaskRegistry.add`) is read with `model`'s converter.
    """
    if not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer (got {seed!r}): without one the stream differs "
                         "between runs and hosts and cannot be resumed")
    if batch_size < 1:
        raise ValueError(f"batch_size (per host) must be >= 1, got {batch_size}")
    lengths = tasks_lib.check_task_feature_lengths(mixture_or_task_name, task_feature_lengths, objective)
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    if split not in provider.splits:
        raise CorpusError(f"{mixture_or_task_name!r} has no split {split!r}; it has {list(provider.splits)}")
    converter = feature_converter or tasks_lib.feature_converter_for_task(mixture_or_task_name, pack,
                                                                          objective, model)
    rows = int(getattr(converter, "rows_per_example", 1))  # preference pairs: 2 adjacent rows
    if batch_size % rows:
        raise CorpusError(f"{mixture_or_task_name!r} gives {rows} rows per example (a chosen/rejected pair), "
                          f"so the per-host batch size must be a multiple of {rows}; got {batch_size}")
    ds = seqio.get_dataset(
        mixture_or_task_name, task_feature_lengths=lengths, feature_converter=converter,
        dataset_split=split, shuffle=shuffle, num_epochs=num_epochs,
        shard_info=shard_info or host_shard_info(), seed=int(seed),
        batch_size=batch_size if drop_remainder else None, verbose=False)
    return ds if drop_remainder else pad_last_batch(ds.batch(batch_size), batch_size)


def pad_last_batch(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """Batches of `batch_size` rows: a shorter (final) batch gets all-zero rows appended."""
    def pad(batch):
        out = {}
        for key, value in batch.items():
            missing = batch_size - tf.shape(value)[0]
            padding = tf.concat([[[0, missing]], tf.zeros([tf.rank(value) - 1, 2], tf.int32)], 0)
            out[key] = tf.ensure_shape(tf.pad(value, padding), [batch_size, *value.shape[1:]])
        return out
    return ds.map(pad)


class DataIterator:
    """Iterator of numpy batches with `state()` / `position_files()` / `restore(...)` for an exact resume.

    The state is a JSON-serialisable dict: the settings that define the stream and the number of
    batches consumed. Restoring into an iterator with different settings (another task, lengths,
    seed, batch size or host count) is refused, since it could not continue the same stream.
    """

    def __init__(self, make_dataset: Callable[[], tf.data.Dataset], config: Mapping[str, Any]):
        self._make_dataset = make_dataset
        self._config = json.loads(json.dumps(dict(config)))  # normalise tuples etc. for comparison
        self._consumed = 0
        self._iterator: Optional[Iterator] = None
        self._dataset: Optional[tf.data.Dataset] = None
        self._position: Optional[str] = None  # a saved tf.data position to start from
        self._checkpointable = True

    def _ensure(self) -> Iterator:
        if self._iterator is None:
            self._dataset = self._make_dataset()
            self._iterator = iter(self._dataset)
            if not (self._position is not None and self._read_position(self._position)):
                for _ in range(self._consumed):  # replay (not ds.skip: the position must stay saveable)
                    next(self._iterator)
            self._position = None
        return self._iterator

    def _read_position(self, path: str) -> bool:
        """Restore the tf.data iterator from `path`; False (with a warning) if it does not fit."""
        consumed = tf.Variable(-1, dtype=tf.int64)
        try:
            tf.train.Checkpoint(iterator=self._iterator, consumed=consumed).read(
                os.path.join(path, POSITION_PREFIX)).assert_consumed()
        except (tf.errors.OpError, AssertionError, ValueError) as e:
            log.warning("the saved data position in %s does not fit this input pipeline (%s); replaying %d "
                        "batches instead", path, str(e).splitlines()[0][:200], self._consumed)
            self._iterator = iter(self._dataset)
            return False
        if int(consumed.numpy()) != self._consumed:
            raise DataResumeError(f"the data position in {path} is at batch {int(consumed.numpy())} but the "
                                  f"checkpoint's data state says {self._consumed}; the checkpoint is mixed up, "
                                  "restore another step")
        return True

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._ensure())
        self._consumed += 1
        return tf.nest.map_structure(lambda t: t.numpy(), batch)

    @property
    def element_spec(self):
        self._ensure()
        return self._dataset.element_spec

    @property
    def batches_consumed(self) -> int:
        return self._consumed

    def state(self) -> dict:
        return {"version": STATE_VERSION, "config": self._config, "batches_consumed": self._consumed}

    def state_bytes(self) -> bytes:
        return json.dumps(self.state(), sort_keys=True).encode("utf-8")

    def position_files(self) -> Optional[dict[str, bytes]]:
        """The tf.data iterator's checkpoint now (file name -> contents; a checkpoint writes them
        into this host's folder), or None if this pipeline cannot be serialised (then a restore
        replays)."""
        if not self._checkpointable:
            return None
        iterator = self._ensure()
        with tempfile.TemporaryDirectory(prefix="data_position") as folder:
            try:
                tf.train.Checkpoint(iterator=iterator, consumed=tf.Variable(self._consumed, dtype=tf.int64)).write(
                    os.path.join(folder, POSITION_PREFIX))
            except (tf.errors.OpError, ValueError, TypeError) as e:
                log.warning("this input pipeline cannot be checkpointed by tf.data (%s); a resume will replay "
                            "the consumed batches", str(e).splitlines()[0][:200])
                self._checkpointable = False
                return None
            names = os.listdir(folder)
            return {n: open(os.path.join(folder, n), "rb").read() for n in names}

    def restore(self, state: Union[Mapping[str, Any], bytes, str], position: Optional[str] = None) -> None:
        """Continue after the saved state: from the tf.data checkpoint in the folder `position`
        (what `position_files` wrote) when there is one, else by replaying the consumed batches."""
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        if state.get("version") != STATE_VERSION:
            raise DataResumeError(f"data iterator state version {state.get('version')!r} is not "
                                  f"{STATE_VERSION}; it was saved by another version of t5x_like")
        saved = state["config"]
        if saved != self._config:
            diff = {k: (saved.get(k), self._config.get(k)) for k in sorted(set(saved) | set(self._config))
                    if saved.get(k) != self._config.get(k)}
            raise DataResumeError("cannot resume the data stream: the checkpoint's iterator had different settings "
                                  f"(saved, now): {diff}; resume with the same task, lengths, batch size, "
                                  "seed and host count, or start a fresh stream in a new MODEL_DIR")
        self._consumed = int(state["batches_consumed"])
        self._iterator = None  # rebuilt lazily, from the saved position or by replay
        self._position = position if position and os.path.isdir(position) else None


def get_iterator(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                 split: str = "train", batch_size: int = 8, shuffle: bool = True, seed: int = 0,
                 shard_info: Optional[seqio.ShardInfo] = None, pack: bool = True,
                 num_epochs: Optional[int] = None, objective: Optional[str] = None,
                 host_rows: Optional[tuple[int, int]] = None, model=None) -> DataIterator:
    """A resumable iterator over `get_dataset(...)` (same arguments).

    `host_rows=(start, stop)`: instead of its own shard, this host reads the whole (unsharded)
    stream in batches of `batch_size` (the global batch) and keeps rows start..stop-1 of each. The
    global batches are then the same for any number of hosts (reproducible across host counts,
    at the price of every host reading all data); see `partitioning.host_rows_of`.
    """
    if host_rows is not None:
        shard_info = seqio.ShardInfo(index=0, num_shards=1)
    shard_info = shard_info or host_shard_info()
    kwargs = dict(mixture_or_task_name=mixture_or_task_name,
                  task_feature_lengths=dict(task_feature_lengths), split=split,
                  batch_size=batch_size, shuffle=shuffle, seed=seed, pack=pack, num_epochs=num_epochs,
                  objective=objective)
    config = {**kwargs, "shard": [shard_info.index, shard_info.num_shards]}
    tasks_lib.check_task_feature_lengths(mixture_or_task_name, task_feature_lengths, objective)
    kwargs["model"] = model  # picks the converter of a task registered with seqio directly
    if host_rows is None:
        return DataIterator(lambda: get_dataset(shard_info=shard_info, **kwargs), config)
    start, stop = (int(x) for x in host_rows)
    if not 0 <= start < stop <= batch_size:
        raise ValueError(f"host_rows {host_rows} must lie within the global batch of {batch_size} rows")
    pairs = tasks_lib.REJECTED in seqio.get_mixture_or_task(mixture_or_task_name).output_features
    if pairs and (start % 2 or stop % 2):
        raise CorpusError(f"host_rows {host_rows} would split a (chosen, rejected) pair of {mixture_or_task_name!r} "
                          "between hosts; use a batch size that gives every host an even number of rows")
    config["host_rows"] = [start, stop]
    return DataIterator(lambda: get_dataset(shard_info=shard_info, **kwargs).map(
        lambda b: {k: v[start:stop] for k, v in b.items()}), config)
