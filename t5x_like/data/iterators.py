"""Per-host batches: deterministic for a seed and resumable exactly (`partitioning.to_global_batch`
assembles them into global jax.Arrays).

Resume strategy: rebuild the pipeline with the same seed and skip the batches already consumed,
rather than checkpointing the tf.data iterator. The state is then a few JSON fields (Orbax saves it
as-is, on any host count of the same run), it survives TensorFlow upgrades, and it works with every
preprocessor, including Python generators and numpy functions that tf.data cannot serialise. The
price is that a restore replays the skipped batches inside tf.data (no numpy conversion); the
benchmark script reports how fast that is. Exactness rests on the whole pipeline being a function of
the seed: seeded file and example shuffles, stateless-random preprocessors, deterministic interleave.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import jax
import numpy as np
import seqio
import tensorflow as tf

from t5x_like.data import tasks as tasks_lib
from t5x_like.data.corpus import CorpusError

STATE_VERSION = 1


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
    """Iterator of numpy batches with `state()` / `restore(state)` for an exact resume.

    The state is a JSON-serialisable dict: the settings that define the stream and the number of
    batches consumed. Restoring into an iterator with different settings (another seed, batch size
    or host count) is refused, since it could not continue the same stream.
    """

    def __init__(self, make_dataset: Callable[[], tf.data.Dataset], config: Mapping[str, Any]):
        self._make_dataset = make_dataset
        self._config = json.loads(json.dumps(dict(config)))  # normalise tuples etc. for comparison
        self._consumed = 0
        self._iterator: Optional[Iterator] = None
        self._dataset: Optional[tf.data.Dataset] = None

    def _ensure(self) -> Iterator:
        if self._iterator is None:
            ds = self._make_dataset()
            if self._consumed:
                ds = ds.skip(self._consumed)
            self._dataset = ds
            self._iterator = iter(ds.as_numpy_iterator())
        return self._iterator

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._ensure())
        self._consumed += 1
        return batch

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

    def restore(self, state: Union[Mapping[str, Any], bytes, str]) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        if state.get("version") != STATE_VERSION:
            raise CorpusError(f"data iterator state version {state.get('version')!r} is not "
                              f"{STATE_VERSION}; it was saved by another version of t5x_like")
        saved = state["config"]
        if saved != self._config:
            diff = {k: (saved.get(k), self._config.get(k)) for k in set(saved) | set(self._config)
                    if saved.get(k) != self._config.get(k)}
            raise CorpusError("cannot resume the data stream: the saved iterator had different settings "
                              f"(saved, now): {diff}; resume with the same task, lengths, batch size, "
                              "seed and host count, or start a fresh stream")
        self._consumed = int(state["batches_consumed"])
        self._iterator = None  # rebuilt lazily, skipping the consumed batches


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
