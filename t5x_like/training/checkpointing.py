"""Orbax checkpoints: model variables (`save_params`/`restore_params`/`restore_model_params`) and
full training runs (`Checkpointer`).

Layout: `<directory>/<step>/<item>` managed by `ocp.CheckpointManager`. A training step folder holds
`state` (the train state pytree, any mix of jax/numpy arrays; typed PRNG keys are stored as their
uint32 key data), `data_state` (JSON: each host's data-iterator position, keyed `process_<i>`),
`gin_config` (JSON: the operative config text) and Orbax's own `metrics` (JSON: eval metrics used to
keep the best step). Imports write `<step>/params` only.

Orbax saves into `<step>.orbax-checkpoint-tmp` and renames on success, so an interrupted save
never looks like a step; Orbax removes that leftover when it saves the same step again. A finished
step that later fails to restore (a truncated or missing file) while an older step restores fine is
reported with a warning and moved to `<directory>/corrupt/<step>-<time>`: its data is kept for
inspection, and the step number is free for the resumed run to save again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from t5x_like.errors import UserError
from t5x_like.training.train_state import abstract_params

log = logging.getLogger(__name__)

STATE, DATA_STATE, GIN_CONFIG = "state", "data_state", "gin_config"
TMP_SUFFIX = ".orbax-checkpoint-tmp"
CORRUPT_DIR = "corrupt"
RUN_CHECKPOINTS = "checkpoints"  # the subfolder of a run directory holding step folders


class CheckpointError(UserError):
    """A checkpoint directory that cannot be restored; the message says which and why."""


def save_params(directory: str, step: int, params) -> str:
    """Save `params` as checkpoint `step` under `directory`; returns the step folder."""
    directory = os.path.abspath(os.fspath(directory))
    with ocp.CheckpointManager(directory, item_names=("params",)) as manager:
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        manager.wait_until_finished()
    return os.path.join(directory, str(step))


def checkpoints_dir(run_dir: str) -> str:
    """Where a run (MODEL_DIR, or an `import_hf` output folder) keeps its step folders."""
    return os.path.join(os.path.abspath(os.fspath(run_dir)), RUN_CHECKPOINTS)


def restore_model_params(checkpoint_dir: str, model, step: Optional[int] = None, mesh=None):
    """`model`'s params from checkpoint `step` (default: latest) of `checkpoint_dir` (see
    `restore_params`), with the model's shapes and dtypes; laid out on `mesh` by its logical axes
    when one is given, otherwise on the default device."""
    return restore_params(checkpoint_dir, step=step, target=abstract_params(model, mesh))


def restore_params(directory: str, step: Optional[int] = None, target=None):
    """Params of checkpoint `step` (default: latest); `target` (arrays or ShapeDtypeStructs) fixes
    shapes, dtypes and shardings, otherwise they come back as saved, on the default device.
    `directory` is a run folder (MODEL_DIR, an import) or its checkpoints folder. Reads import
    folders (`params` item) and training folders (`state.params`) alike."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.isdir(checkpoints_dir(directory)):
        directory = checkpoints_dir(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint directory {directory}; pass the folder that holds step folders")
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(directory, options=options) as manager:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise CheckpointError(f"no checkpoint step {step} in {directory}; found {manager.all_steps()}")
    target = None if target is None else _abstract(target)
    if os.path.isdir(os.path.join(directory, str(step), "params")):
        with ocp.CheckpointManager(directory, item_names=("params",), options=options) as manager:
            out = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
            return out if target is None else _check_shapes(out, target, "params")
    with ocp.CheckpointManager(directory, item_names=(STATE,), options=options) as manager:
        if target is None:  # a training state: read only its params subtree
            meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory) / str(step) / STATE)
            target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                            getattr(meta, "tree", meta)["params"])
        item = {"params": target}
        args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                      partial_restore=True)
        return _check_shapes(manager.restore(step, args=ocp.args.Composite(**{STATE: args}))[STATE]["params"],
                             target, "params")


# --- typed PRNG keys <-> key data (Orbax stores plain arrays) ---------------------------------

def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


def _key_impl(dtype):
    """The PRNG implementation of a key dtype (JAX names it only on the dtype's private field)."""
    impl = getattr(dtype, "_impl", None)
    if impl is None:
        name = re.fullmatch(r"key<(.+)>", str(dtype)).group(1)
        impl = {"fry": "threefry2x32"}.get(name, name)
    return impl


def _keys_to_data(tree):
    return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract(tree):
    """ShapeDtypeStructs (shardings kept) of `tree`, with keys as their key data."""
    def one(x):
        sharding = getattr(x, "sharding", None)
        if _is_key(x):
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
            if isinstance(sharding, jax.sharding.NamedSharding):  # key data adds trailing axes
                extra = (None,) * (data.ndim - len(x.shape))
                sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec, *extra))
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        x = x if hasattr(x, "dtype") else np.asarray(x)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
    return jax.tree_util.tree_map(one, tree)


def _check_shapes(restored, abstract, what: str):
    """Orbax only checks shapes of targets with a sharding; one without comes back as saved."""
    def check(path, r, a):
        if np.shape(r) != tuple(a.shape):
            raise ValueError(f"{what}{jax.tree_util.keystr(path)} has shape {np.shape(r)} in the checkpoint "
                             f"but {tuple(a.shape)} in the target")
    jax.tree_util.tree_map_with_path(check, restored, abstract)
    return restored


def _wrap_keys(restored, target):
    return jax.tree_util.tree_map(
        lambda t, r: jax.random.wrap_key_data(r, impl=_key_impl(t.dtype)) if _is_key(t) else r, target, restored)


def _gather_json(obj) -> list:
    """Every host's `obj`: Orbax's JSON items are written by process 0 alone."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:raw.size] = raw
    allbuf = np.asarray(multihost_utils.process_allgather(buf))
    return [json.loads(bytes(allbuf[i, :n])) for i, n in enumerate(sizes)]


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data_state: Any  # this host's entry, None if the checkpoint has none for this host
    gin_config: str
    metrics: Optional[dict]


class Checkpointer:
    """Saves and resumes a training run.

    Retention: the last `keep_last` steps plus the `keep_best` steps with the lowest (`best_mode`
    "min") `best_metric` among those saved with metrics. Orbax's `max_to_keep` + `best_fn` cannot say
    "last N and best", so an `AnyPreservationPolicy(LatestN, BestN)` does; `best_fn` is still set
    because without it Orbax keeps metrics in memory only and forgets the best step on restart.
    """

    def __init__(self, directory: str, save_interval_steps: int = 1000, keep_last: Optional[int] = 3,
                 keep_best: int = 1, best_metric: str = "perplexity", best_mode: str = "min",
                 async_save: bool = True, cleanup_tmp_directories: bool = False):
        if best_mode not in ("min", "max"):
            raise CheckpointError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if keep_last is not None and keep_last < 1:  # Orbax's LatestN(0) would delete every step
            raise CheckpointError(f"keep_last must be None (keep all) or at least 1, got {keep_last}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.best_metric, self.best_mode = best_metric, best_mode
        worst = math.inf if best_mode == "min" else -math.inf
        score = lambda m: float(m.get(best_metric, worst)) if m else worst  # noqa: E731
        policies = [ocm.LatestN(keep_last)]
        if keep_best:
            policies.append(ocm.BestN(get_metric_fn=score, reverse=best_mode == "min", n=keep_best,
                                      keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps, enable_async_checkpointing=async_save,
            preservation_policy=ocm.AnyPreservationPolicy(policies), best_fn=score, best_mode=best_mode,
            cleanup_tmp_directories=cleanup_tmp_directories)
        self._manager = ocp.CheckpointManager(self.directory, item_names=(STATE, DATA_STATE, GIN_CONFIG),
                                              options=options)
        leftovers = sorted(n for n in os.listdir(self.directory) if TMP_SUFFIX in n) \
            if os.path.isdir(self.directory) else []
        if leftovers:
            log.warning("ignoring unfinished checkpoint save(s) %s in %s (interrupted; Orbax replaces "
                        "one when it saves that step again)", leftovers, self.directory)

    def all_steps(self) -> list:
        return list(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def best_step(self) -> Optional[int]:
        """The best step among those saved with `best_metric`, else None."""
        scored = [s for s in self.all_steps() if (self._manager.metrics(s) or {}).get(self.best_metric) is not None]
        return self._manager.best_step() if scored else None

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def save(self, step: int, state, data_state=None, gin_config: str = "", metrics: Optional[dict] = None,
             force: bool = False) -> bool:
        """Save if `step` is on the interval (or `force`, e.g. the last step); returns whether it did.

        Call on every host. `metrics` (e.g. {"perplexity": 12.3}) rank the step for `keep_best`; a
        step saved without them is kept only while among the last `keep_last`. As Orbax does, the
        first call of a run with no checkpoint yet saves whatever its step.
        """
        step = int(step)
        if not (force or self._manager.should_save(step)):
            return False
        if step in self._manager.all_steps():
            log.info("checkpoint step %d already exists in %s; not saving it again", step, self.directory)
            return False
        hosts = {f"process_{i}": d for i, d in enumerate(_gather_json(data_state))}
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(_keys_to_data(state)),
                                     DATA_STATE: ocp.args.JsonSave(hosts),
                                     GIN_CONFIG: ocp.args.JsonSave({"text": gin_config or ""})})
        return self._manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, target_state=None) -> Restored:
        """Checkpoint `step` onto `target_state` (arrays or ShapeDtypeStructs whose shardings may
        name another mesh than the one saved from); None gives arrays as saved."""
        self.wait_until_finished()
        abstract = None if target_state is None else _abstract(target_state)
        out = self._manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract), DATA_STATE: ocp.args.JsonRestore(),
            GIN_CONFIG: ocp.args.JsonRestore()}))
        state = out[STATE] if target_state is None else \
            _wrap_keys(_check_shapes(out[STATE], abstract, "state"), target_state)
        hosts = out[DATA_STATE] or {}
        mine = f"process_{jax.process_index()}"
        if mine not in hosts:
            log.warning("checkpoint step %d has no data state for %s (saved by %d hosts); the data "
                        "iterator starts afresh", step, mine, len(hosts))
        return Restored(step=step, state=state, data_state=hosts.get(mine),
                        gin_config=(out[GIN_CONFIG] or {}).get("text", ""), metrics=self._manager.metrics(step))

    def restore_latest(self, target_state=None) -> Optional[Restored]:
        """The newest step that restores; None when there is none (a fresh start).

        A newer step that fails while an older one succeeds is corrupt: warned about and moved aside.
        When every step fails the cause is likelier the target (a changed model or mesh shape), so
        nothing is moved and CheckpointError says why.
        """
        self.wait_until_finished()
        failures = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self.restore(step, target_state)
            except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types for bad files
                reason = (str(e).strip().splitlines() or [""])[0].split(" [tensorstore_spec")[0][:300]
                log.warning("checkpoint step %d in %s cannot be restored (%s: %s); trying the previous step",
                            step, self.directory, type(e).__name__, reason)
                failures.append((step, f"{type(e).__name__}: {reason}"))
                continue
            for bad, reason in failures:
                self._move_aside(bad, reason, restored.step)
            if failures:
                self._manager.reload()
            return restored
        if failures:
            details = "; ".join(f"step {s}: {r}" for s, r in failures)
            raise CheckpointError(f"no checkpoint in {self.directory} restores onto the given state ({details}). "
                                  "Check that the model and optimizer config match the run that saved it.")
        return None

    def _move_aside(self, step: int, reason: str, fallback: int) -> None:
        dest = os.path.join(self.directory, CORRUPT_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.rename(os.path.join(self.directory, str(step)), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"checkpointing_move_aside_{step}")
        log.warning("checkpoint step %d is corrupt (%s); moved it to %s and resumed from step %d",
                    step, reason, dest, fallback)

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
