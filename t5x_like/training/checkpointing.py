"""Orbax checkpoints: model variables (`save_params`/`restore_params`/`restore_model_params`) and
full training runs (`Checkpointer`).

Layout: `<directory>/<step>/<item>` managed by `ocp.CheckpointManager`. A training step folder holds
`state` (the train state pytree, any mix of jax/numpy arrays; typed PRNG keys are stored as their
uint32 key data), `data_state` (JSON: each host's data-iterator position, keyed `process_<i>`),
`data_position` (each host's tf.data iterator checkpoint in `process_<i>-of-<n>/`, written by that
host, so a resume need not replay the data; absent for pipelines tf.data cannot serialise),
`gin_config` (JSON: the operative config text) and Orbax's own `metrics` (JSON: eval metrics used to
keep the best step). Imports write `<step>/params` only.

Orbax saves into `<step>.orbax-checkpoint-tmp` and renames on success, so an interrupted save
never looks like a step; Orbax removes that leftover when it saves the same step again. A finished
step that later fails to restore (a truncated or missing file) while an older step restores fine is
reported with a warning and moved to `<directory>/corrupt/<step>-<time>`: its data is kept for
inspection, and the step number is free for the resumed run to save again.

Integrity (manifests, shape and finiteness checks) and disk-full handling live in
`checkpoint_integrity.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
import threading
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from t5x_like.training import checkpoint_integrity as integrity
from t5x_like.training.checkpoint_integrity import (MANIFEST, TMP_SUFFIX, CheckpointError,  # noqa: F401
                                                    CorruptCheckpointError, verify_step)
from t5x_like.training.train_state import abstract_params

log = logging.getLogger(__name__)

STATE, DATA_STATE, GIN_CONFIG, DATA_POSITION = "state", "data_state", "gin_config", "data_position"
CORRUPT_DIR = "corrupt"
RUN_CHECKPOINTS = "checkpoints"  # the subfolder of a run directory holding step folders


def save_params(directory: str, step: int, params) -> str:
    """Save `params` as checkpoint `step` under `directory` (with its manifest); returns the step
    folder."""
    directory = os.path.abspath(os.fspath(directory))
    with ocp.CheckpointManager(directory, item_names=("params",)) as manager:
        try:
            manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
            manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore wrap the OSError in many types
            integrity.raise_save_error(directory, step, e)
    step_dir = os.path.join(directory, str(step))
    if jax.process_index() == 0:
        try:
            integrity.write_manifest(step_dir, step)
        except OSError as e:
            integrity.raise_save_error(directory, step, e)
    return step_dir


def checkpoints_dir(run_dir: str) -> str:
    """Where a run (MODEL_DIR, or an `import_hf` output folder) keeps its step folders."""
    return os.path.join(os.path.abspath(os.fspath(run_dir)), RUN_CHECKPOINTS)


def restore_model_params(checkpoint_dir: str, model, step: Optional[int] = None, mesh=None):
    """`model`'s params from checkpoint `step` (default: latest verified) of `checkpoint_dir` (see
    `restore_params`), with the model's shapes and dtypes; laid out on `mesh` by its logical axes
    when one is given, otherwise on the default device."""
    return restore_params(checkpoint_dir, step=step, target=abstract_params(model, mesh))


def restore_params(directory: str, step: Optional[int] = None, target=None, partial: bool = False):
    """Params of checkpoint `step` (default: the newest that verifies and restores); see
    `restore_params_and_step`."""
    return restore_params_and_step(directory, step, target, partial)[0]


def restore_params_and_step(directory: str, step: Optional[int] = None, target=None, partial: bool = False):
    """(params, the step they come from) of checkpoint `step` (default: the newest that verifies
    and restores); `target` (arrays or ShapeDtypeStructs) fixes shapes, dtypes and shardings,
    otherwise they come back as saved, on the default device. `directory` is a run folder
    (MODEL_DIR, an import) or its checkpoints folder. Reads import folders (`params` item) and
    training folders (`state.params`) alike. Corrupt or unverified steps are skipped with a
    warning (nothing is moved: a reader may run beside a training run); an explicit corrupt
    `step` is a CheckpointError. `partial`: the checkpoint may hold arrays `target` lacks (a
    pretrained masked-LM head under a classifier being fine-tuned); they are not read."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.isdir(checkpoints_dir(directory)):
        directory = checkpoints_dir(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint directory {directory}; pass the folder that holds step folders")
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(directory, options=options) as manager:
        steps = sorted(manager.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"no checkpoint step {step} in {directory}; found {sorted(steps)}")
        try:
            return _restore_params_step(directory, step, target, options, partial), step
        except CorruptCheckpointError as e:
            raise CheckpointError(_explicit_corrupt_message(directory, e, steps)) from None
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory}: it holds no step folders; pass the folder of a "
                              "run that has saved one")
    failures = []
    for s in integrity.preference_order(directory, steps):
        verified = integrity.has_manifest(directory, s)
        try:
            params = _restore_params_step(directory, s, target, options, partial)
        except CorruptCheckpointError as e:
            failures.append((s, e.reason))
            log.warning("checkpoint step %d in %s is corrupt (%s); skipping it", s, directory, e.reason)
            continue
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types for bad files
            failures.append((s, integrity.short_reason(e)))
            log.warning("checkpoint step %d in %s cannot be restored (%s); skipping it", s, directory,
                        integrity.short_reason(e))
            continue
        skipped = [x for x in steps if x > s and not integrity.has_manifest(directory, x)]
        if skipped:
            log.warning("checkpoint step(s) %s in %s have no manifest (a save in progress or interrupted); "
                        "using verified step %d", skipped, directory, s)
        if not verified:
            log.warning("checkpoint step %d in %s has no manifest (written before manifests, or its save was "
                        "interrupted); using it after a finiteness check", s, directory)
        elif failures:
            log.warning("using checkpoint step %d of %s instead", s, directory)
        return params, s
    details = "; ".join(f"step {s}: {r}" for s, r in failures)
    raise CheckpointError(f"no checkpoint in {directory} restores ({details}); write it again (train or "
                          "import_hf), or pass another checkpoint directory")


def _restore_params_step(directory: str, step: int, target, options, partial: bool = False):
    """Verify step `step`, check `target` against its metadata, restore its params, check they
    are finite."""
    integrity.verify_step(directory, step)
    step_dir = os.path.join(directory, str(step))
    target = None if target is None else _abstract(target)
    if os.path.isdir(os.path.join(step_dir, "params")):
        args = ocp.args.StandardRestore(target)
        if target is not None:
            integrity.check_compatible(directory, step, os.path.join(step_dir, "params"), target, partial=partial,
                                       prefix=("params",))
            if partial:
                args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                              restore_args=ocp.checkpoint_utils.construct_restore_args(target))
        with ocp.CheckpointManager(directory, item_names=("params",), options=options) as manager:
            out = manager.restore(step, args=ocp.args.Composite(params=args))["params"]
            out = out if target is None else _check_shapes(out, target, "params")
    else:
        if target is None:  # a training state: read only its params subtree
            meta = integrity.tree_metadata(os.path.join(step_dir, STATE))
            target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta["params"])
        else:
            integrity.check_compatible(directory, step, os.path.join(step_dir, STATE), {"params": target}, partial=True)
        item = {"params": target}
        args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                      partial_restore=True)
        with ocp.CheckpointManager(directory, item_names=(STATE,), options=options) as manager:
            out = _check_shapes(manager.restore(step, args=ocp.args.Composite(**{STATE: args}))[STATE]["params"],
                                target, "params")
    integrity.check_finite(step, out, "params")
    return out


def _explicit_corrupt_message(directory: str, e: CorruptCheckpointError, steps) -> str:
    others = [s for s in sorted(steps) if s != e.step]
    return (f"checkpoint step {e.step} in {directory} is corrupt ({e.reason}); request another step "
            f"(found {others}) or leave the step unset to use the newest one that verifies")


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


def _host_folder() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}"


class HostFilesHandler(ocp.CheckpointHandler):
    """Every host writes its own files into `<item>/process_<i>-of-<n>/` (its tf.data iterator
    checkpoint, as T5X's DatasetCheckpointHandler); a restore reads them by path."""

    def save(self, directory, args: "HostFilesSave"):
        folder = epath.Path(directory) / _host_folder()
        folder.mkdir(parents=True, exist_ok=True)
        for name, blob in args.files.items():
            (folder / name).write_bytes(blob)

    def restore(self, directory, args=None):
        return None

    def metadata(self, directory):
        return None


@ocp.args.register_with_handler(HostFilesHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class HostFilesSave(ocp.args.CheckpointArgs):
    files: dict


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data_state: Any  # this host's entry, None if the checkpoint has none for this host
    gin_config: str
    metrics: Optional[dict]
    data_position: Optional[str] = None  # this host's tf.data iterator checkpoint folder, if saved


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
        self._manager = ocp.CheckpointManager(self.directory, item_names=(STATE, DATA_STATE, GIN_CONFIG, DATA_POSITION),
                                              options=options)
        leftovers = sorted(n for n in os.listdir(self.directory) if TMP_SUFFIX in n) \
            if os.path.isdir(self.directory) else []
        if leftovers:
            log.warning("ignoring unfinished checkpoint save(s) %s in %s (interrupted; Orbax replaces "
                        "one when it saves that step again)", leftovers, self.directory)
        self._async = async_save
        self._pending: Optional[int] = None          # a saved step whose commit/manifest is not yet checked
        self._manifest_thread: Optional[threading.Thread] = None
        self._manifest_error: Optional[BaseException] = None
        self._save_error: Optional[CheckpointError] = None  # a failed save not yet raised to the caller

    def all_steps(self) -> list:
        return list(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def latest_verified_step(self) -> Optional[int]:
        """The newest step whose files match its manifest (re-checked now), else None."""
        self._finish_pending(raise_errors=False)
        for step in sorted(self.all_steps(), reverse=True):
            if integrity.has_manifest(self.directory, step):
                try:
                    integrity.verify_step(self.directory, step)
                except CorruptCheckpointError:
                    continue
                return step
        return None

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
        first call of a run with no checkpoint yet saves whatever its step. A save that cannot fit
        on the disk (checked against the newest step's size first) is a CheckpointError.
        `data_state`: this host's JSON data state, or its `DataIterator` (then also its tf.data
        checkpoint, so the resume does not replay).
        """
        step = int(step)
        if not (force or self._manager.should_save(step)):
            return False
        self._finish_pending()
        if step in self._manager.all_steps():
            log.info("checkpoint step %d already exists in %s; not saving it again", step, self.directory)
            return False
        self._check_free_space(step)
        position = None
        if hasattr(data_state, "position_files"):  # a DataIterator: its JSON state and tf.data checkpoint
            position, data_state = data_state.position_files(), data_state.state()
        hosts = {f"process_{i}": d for i, d in enumerate(integrity.gather_json(data_state))}
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        items = {STATE: ocp.args.StandardSave(_keys_to_data(state)), DATA_STATE: ocp.args.JsonSave(hosts),
                 GIN_CONFIG: ocp.args.JsonSave({"text": gin_config or ""})}
        if position is not None:
            items[DATA_POSITION] = HostFilesSave(position)
        args = ocp.args.Composite(**items)
        try:
            saved = self._manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore wrap the OSError in many types
            self._fail(step, e)
        if saved:
            self._pending = step
            if not self._async:
                self._finish_pending()
            elif jax.process_index() == 0:
                self._manifest_thread = threading.Thread(target=self._manifest_after_commit, args=(step,),
                                                         name=f"checkpoint_manifest_{step}", daemon=True)
                self._manifest_thread.start()
        return saved

    def _manifest_after_commit(self, step: int) -> None:
        """Background (process 0, async saves): wait for Orbax's commit, then write the manifest."""
        try:
            self._manager.wait_until_finished()
        except BaseException:  # noqa: BLE001 - the save failed: the main thread reports it
            return
        try:
            if os.path.isdir(os.path.join(self.directory, str(step))):
                integrity.write_manifest(os.path.join(self.directory, str(step)), step)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self._manifest_error = e

    def _finish_pending(self, raise_errors: bool = True) -> None:
        """Wait for the last save: its commit, then (process 0) its manifest. A failed save raises
        here (or, with raise_errors=False, at the next call that does)."""
        step, self._pending = self._pending, None
        if step is not None:
            thread, self._manifest_thread = self._manifest_thread, None
            if thread is not None:
                thread.join()
            try:
                try:
                    self._manager.wait_until_finished()
                except Exception as e:  # noqa: BLE001
                    self._fail(step, e)
                error, self._manifest_error = self._manifest_error, None
                if error is not None:
                    self._fail(step, error)
                if thread is None and jax.process_index() == 0 and \
                        os.path.isdir(os.path.join(self.directory, str(step))):
                    try:  # synchronous saves: the step is committed when save returns
                        integrity.write_manifest(os.path.join(self.directory, str(step)), step)
                    except OSError as e:
                        self._fail(step, e)
            except CheckpointError as e:
                self._save_error = e
        if raise_errors and self._save_error is not None:
            error, self._save_error = self._save_error, None
            raise error

    def _fail(self, step: int, e: BaseException):
        """Raise the CheckpointError of a disk-full save (see `integrity.raise_save_error`), or `e`."""
        if integrity.is_disk_full(e):
            self._manager.reload()  # forget the step Orbax may still list
        integrity.raise_save_error(self.directory, step, e)

    def _check_free_space(self, step: int) -> None:
        """Refuse a save the disk cannot hold: one as large as the newest step (process 0 decides)."""
        def check():
            steps = self.all_steps()
            if not steps:
                return None
            try:
                needed = integrity.step_bytes(self.directory, max(steps))
                free = shutil.disk_usage(self.directory).free
            except OSError:  # not a local filesystem: nothing to check
                return None
            return [free, needed] if free < needed else None
        short = check() if jax.process_count() == 1 else integrity.gather_json(
            check() if jax.process_index() == 0 else None)[0]
        if short:
            free, needed = short
            raise CheckpointError(
                f"not enough disk space to save checkpoint step {step} in {self.directory}: {free:,} bytes free, "
                f"{needed:,} needed (the size of step {max(self.all_steps())}). Free space (or move MODEL_DIR to a "
                "larger disk), then rerun the same command to resume")

    def restore(self, step: int, target_state=None) -> Restored:
        """Checkpoint `step` onto `target_state` (arrays or ShapeDtypeStructs whose shardings may
        name another mesh than the one saved from); None gives arrays as saved. A step that fails
        its manifest or holds NaN/Inf is a CheckpointError naming it; so is a target of another
        model config."""
        self._finish_pending()
        try:
            return self._restore(step, target_state)
        except CorruptCheckpointError as e:
            raise CheckpointError(_explicit_corrupt_message(self.directory, e, self.all_steps())) from None

    def _restore(self, step: int, target_state) -> Restored:
        integrity.verify_step(self.directory, step)
        abstract = None if target_state is None else _abstract(target_state)
        if abstract is not None:
            integrity.check_compatible(self.directory, step, os.path.join(self.directory, str(step), STATE), abstract)
        out = self._manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract), DATA_STATE: ocp.args.JsonRestore(),
            GIN_CONFIG: ocp.args.JsonRestore()}))
        state = out[STATE] if target_state is None else \
            _wrap_keys(_check_shapes(out[STATE], abstract, "state"), target_state)
        integrity.check_finite(step, out[STATE], "state")
        hosts = out[DATA_STATE] or {}
        mine = f"process_{jax.process_index()}"
        if mine not in hosts:
            log.warning("checkpoint step %d has no data state for %s (saved by %d hosts); the data "
                        "iterator starts afresh", step, mine, len(hosts))
        position = os.path.join(self.directory, str(step), DATA_POSITION, _host_folder())
        return Restored(step=step, state=state, data_state=hosts.get(mine),
                        gin_config=(out[GIN_CONFIG] or {}).get("text", ""), metrics=self._manager.metrics(step),
                        data_position=position if mine in hosts and os.path.isdir(position) else None)

    def restore_latest(self, target_state=None) -> Optional[Restored]:
        """The newest verified step that restores (unverified ones only when none does); None when
        there is no step (a fresh start).

        A step that fails its manifest or holds NaN/Inf is corrupt; a newer step that fails to
        restore while an older one succeeds is too. Corrupt steps, and unverified steps newer than
        the verified one used, are warned about and moved aside. When every step fails to restore
        the cause is likelier the target (a changed model or mesh shape), so nothing is moved and
        CheckpointError says why; a target of another model config fails at once, in one line.
        """
        self._finish_pending()
        failures = []
        for step in integrity.preference_order(self.directory, self.all_steps()):
            verified = integrity.has_manifest(self.directory, step)
            try:
                restored = self._restore(step, target_state)
            except CorruptCheckpointError as e:
                log.warning("checkpoint step %d in %s is corrupt (%s); trying the previous step",
                            step, self.directory, e.reason)
                failures.append((step, e.reason))
                continue
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types for bad files
                log.warning("checkpoint step %d in %s cannot be restored (%s); trying the previous step",
                            step, self.directory, integrity.short_reason(e))
                failures.append((step, integrity.short_reason(e)))
                continue
            if verified:
                failures += [(s, "no manifest: its save was interrupted, or it predates manifests")
                             for s in self.all_steps() if s > step and not integrity.has_manifest(self.directory, s)]
            else:
                log.warning("checkpoint step %d in %s has no manifest (written before manifests, or its save "
                            "was interrupted); resuming from it after a finiteness check", step, self.directory)
            for bad, reason in failures:
                self._move_aside(bad, reason, restored.step)
            if failures:
                self._manager.reload()
            return restored
        if failures:
            details = "; ".join(f"step {s}: {r}" for s, r in failures)
            raise CheckpointError(f"no checkpoint in {self.directory} restores onto the given state ({details}). "
                                  "Check that the model and optimizer config match the run that saved it, or "
                                  "move the directory aside to start afresh.")
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
        """Wait for the last save to commit and its manifest to be written."""
        self._finish_pending()

    def close(self) -> None:
        try:
            self._finish_pending()
        finally:
            self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
