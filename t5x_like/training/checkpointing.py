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

Integrity. Once Orbax has committed a step (renamed its tmp folder), process 0 writes
`<step>/manifest.json` (tmp file + rename): `{"format": 1, "step": N, "algorithm": "sha256",
"files": {relative path: {"size": bytes, "sha256": hex}}}` over every file of the step. Async
saves write it from a small thread that waits for Orbax's commit, so it lands milliseconds after the
step does; `wait_until_finished`, the next `save`, `close` and every restore wait for it. Before any
restore (train resume, eval, infer/score, fine-tuning's init checkpoint) the files are checked
against the manifest, the target's shapes against the checkpoint's metadata (another model config
is one `CheckpointError`, before Orbax reads anything), and the restored arrays for NaN/Inf (the
trainer never saves a non-finite state, so one means corruption).

A step with a manifest is *verified*; one without is *unverified*: written before manifests
existed, or killed between Orbax's commit and the manifest. Verified steps are always preferred;
an unverified step is used (with a warning, after the finiteness check) only when no verified one
restores. A training run moves corrupt steps, and unverified steps newer than the verified step it
resumes from, to `corrupt/` so that it saves those step numbers again. Readers (eval, infer, score,
fine-tuning) skip such steps with a warning but never move or change anything: they may run beside
a live training run. An explicitly requested step that fails verification is a `CheckpointError`.

Disk full: before each save, the free space of the directory is checked against the size of the
newest step; a save that still fails with ENOSPC has its unfinished `<step>.orbax-checkpoint-tmp*`
folder removed and becomes one `CheckpointError`; earlier steps are untouched.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
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
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
HASH = "sha256"


class CheckpointError(UserError):
    """A checkpoint directory that cannot be restored; the message says which and why."""


class CorruptCheckpointError(CheckpointError):
    """A step whose files differ from its manifest, or whose arrays hold NaN/Inf."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint step {step} is corrupt ({reason})")
        self.step, self.reason = step, reason


def save_params(directory: str, step: int, params) -> str:
    """Save `params` as checkpoint `step` under `directory` (with its manifest); returns the step
    folder."""
    directory = os.path.abspath(os.fspath(directory))
    with ocp.CheckpointManager(directory, item_names=("params",)) as manager:
        try:
            manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
            manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore wrap the OSError in many types
            _raise_save_error(directory, step, e)
    step_dir = os.path.join(directory, str(step))
    if jax.process_index() == 0:
        try:
            write_manifest(step_dir, step)
        except OSError as e:
            _raise_save_error(directory, step, e)
    return step_dir


def checkpoints_dir(run_dir: str) -> str:
    """Where a run (MODEL_DIR, or an `import_hf` output folder) keeps its step folders."""
    return os.path.join(os.path.abspath(os.fspath(run_dir)), RUN_CHECKPOINTS)


def restore_model_params(checkpoint_dir: str, model, step: Optional[int] = None, mesh=None):
    """`model`'s params from checkpoint `step` (default: latest verified) of `checkpoint_dir` (see
    `restore_params`), with the model's shapes and dtypes; laid out on `mesh` by its logical axes
    when one is given, otherwise on the default device."""
    return restore_params(checkpoint_dir, step=step, target=abstract_params(model, mesh))


def restore_params(directory: str, step: Optional[int] = None, target=None):
    """Params of checkpoint `step` (default: the newest that verifies and restores); `target`
    (arrays or ShapeDtypeStructs) fixes shapes, dtypes and shardings, otherwise they come back as
    saved, on the default device. `directory` is a run folder (MODEL_DIR, an import) or its
    checkpoints folder. Reads import folders (`params` item) and training folders (`state.params`)
    alike. Corrupt or unverified steps are skipped with a warning (nothing is moved: a reader may
    run beside a training run); an explicit corrupt `step` is a CheckpointError."""
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
            return _restore_params_step(directory, step, target, options)
        except CorruptCheckpointError as e:
            raise CheckpointError(_explicit_corrupt_message(directory, e, steps)) from None
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory}: it holds no step folders; pass the folder of a "
                              "run that has saved one")
    failures = []
    for s in _preference_order(directory, steps):
        verified = has_manifest(directory, s)
        try:
            params = _restore_params_step(directory, s, target, options)
        except CorruptCheckpointError as e:
            failures.append((s, e.reason))
            log.warning("checkpoint step %d in %s is corrupt (%s); skipping it", s, directory, e.reason)
            continue
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types for bad files
            failures.append((s, _short_reason(e)))
            log.warning("checkpoint step %d in %s cannot be restored (%s); skipping it", s, directory,
                        _short_reason(e))
            continue
        skipped = [x for x in steps if x > s and not has_manifest(directory, x)]
        if skipped:
            log.warning("checkpoint step(s) %s in %s have no manifest (a save in progress or interrupted); "
                        "using verified step %d", skipped, directory, s)
        if not verified:
            log.warning("checkpoint step %d in %s has no manifest (written before manifests, or its save was "
                        "interrupted); using it after a finiteness check", s, directory)
        elif failures:
            log.warning("using checkpoint step %d of %s instead", s, directory)
        return params
    details = "; ".join(f"step {s}: {r}" for s, r in failures)
    raise CheckpointError(f"no checkpoint in {directory} restores ({details}); write it again (train or "
                          "import_hf), or pass another checkpoint directory")


def _restore_params_step(directory: str, step: int, target, options):
    """Verify step `step`, check `target` against its metadata, restore its params, check they
    are finite."""
    verify_step(directory, step)
    step_dir = os.path.join(directory, str(step))
    target = None if target is None else _abstract(target)
    if os.path.isdir(os.path.join(step_dir, "params")):
        if target is not None:
            _check_compatible(directory, step, os.path.join(step_dir, "params"), target, prefix=("params",))
        with ocp.CheckpointManager(directory, item_names=("params",), options=options) as manager:
            out = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
            out = out if target is None else _check_shapes(out, target, "params")
    else:
        if target is None:  # a training state: read only its params subtree
            meta = _tree_metadata(os.path.join(step_dir, STATE))
            target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta["params"])
        else:
            _check_compatible(directory, step, os.path.join(step_dir, STATE), {"params": target}, partial=True)
        item = {"params": target}
        args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                      partial_restore=True)
        with ocp.CheckpointManager(directory, item_names=(STATE,), options=options) as manager:
            out = _check_shapes(manager.restore(step, args=ocp.args.Composite(**{STATE: args}))[STATE]["params"],
                                target, "params")
    _check_finite(step, out, "params")
    return out


def _explicit_corrupt_message(directory: str, e: CorruptCheckpointError, steps) -> str:
    others = [s for s in sorted(steps) if s != e.step]
    return (f"checkpoint step {e.step} in {directory} is corrupt ({e.reason}); request another step "
            f"(found {others}) or leave the step unset to use the newest one that verifies")


# --- integrity: manifests, shapes, finiteness ---------------------------------------------------

def _step_files(step_dir: str) -> list:
    """Relative paths of every file of a step folder, the manifest (and its tmp files) excluded."""
    out = []
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/")
            if rel != MANIFEST and not rel.startswith(f".{MANIFEST}."):
                out.append(rel)
    return sorted(out)


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASH).hexdigest()


def write_manifest(step_dir: str, step: int) -> dict:
    """Write `<step_dir>/manifest.json` (size and sha256 of every file) atomically; returns it."""
    files = {}
    for rel in _step_files(step_dir):
        path = os.path.join(step_dir, rel)
        files[rel] = {"size": os.path.getsize(path), HASH: _file_digest(path)}
    manifest = {"format": MANIFEST_FORMAT, "step": int(step), "algorithm": HASH, "files": files}
    tmp = os.path.join(step_dir, f".{MANIFEST}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(step_dir, MANIFEST))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return manifest


def has_manifest(directory: str, step: int) -> bool:
    return os.path.isfile(os.path.join(directory, str(step), MANIFEST))


def _check_manifest(directory: str, step: int) -> Optional[str]:
    """None when step `step` matches its manifest (or has none: see `verify_step`), else why not."""
    step_dir = os.path.join(directory, str(step))
    try:
        with open(os.path.join(step_dir, MANIFEST)) as f:
            manifest = json.load(f)
        files = manifest["files"]
        algorithm = manifest.get("algorithm", HASH)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST}: {type(e).__name__}: {e}"
    for rel, want in sorted(files.items()):  # sizes first: cheap, and most damage changes them
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            return f"file {rel} is missing"
        if os.path.getsize(path) != want["size"]:
            return f"file {rel} has {os.path.getsize(path)} bytes, the manifest says {want['size']}"
    for rel, want in sorted(files.items()):
        with open(os.path.join(step_dir, rel), "rb") as f:
            if hashlib.file_digest(f, algorithm).hexdigest() != want[algorithm]:
                return f"file {rel} does not match its {algorithm} checksum"
    return None


def verify_step(directory: str, step: int) -> bool:
    """Check step `step`'s files against its manifest: True when verified, False when it has no
    manifest (unverified); CorruptCheckpointError on a mismatch. Process 0 reads, all hosts agree."""
    def check():
        return {"manifest": has_manifest(directory, step), "error": _check_manifest(directory, step)}
    result = check() if jax.process_count() == 1 else _gather_json(
        check() if jax.process_index() == 0 else None)[0]
    if result["error"]:
        raise CorruptCheckpointError(step, result["error"])
    return bool(result["manifest"])


def _preference_order(directory: str, steps) -> list:
    """Verified steps newest first, then unverified ones newest first."""
    steps = sorted(steps, reverse=True)
    return [s for s in steps if has_manifest(directory, s)] + [s for s in steps if not has_manifest(directory, s)]


def _tree_metadata(item_dir: str):
    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir))
    return getattr(meta, "tree", meta)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flat_shapes(tree) -> dict:
    """{path tuple of names: shape} of the leaves that have a shape."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def _describe(path: tuple) -> str:
    if path[:1] == ("params",):
        return "parameter " + "/".join(path[1:])
    return "state entry " + "/".join(path)


def _check_compatible(directory: str, step: int, item_dir: str, target, partial: bool = False, prefix=()):
    """CheckpointError (one line) when `target`'s shapes or names differ from what step `step`
    holds: a checkpoint of another model size or family. Orbax would fail on it too, but with a
    long message and, after its event loop closes, hundreds of lines of TensorStore noise."""
    try:
        saved = {prefix + p: s for p, s in _flat_shapes(_tree_metadata(item_dir)).items()}
    except Exception:  # noqa: BLE001 - unreadable metadata: let the restore report it
        return
    wanted = {prefix + p: s for p, s in _flat_shapes(target).items()}
    fix = "it was written by another model config; use a new MODEL_DIR or the matching gin files"
    order = sorted(wanted, key=lambda p: (p[:1] != ("params",), p))
    for path in order:
        if path in saved and saved[path] != wanted[path]:
            raise CheckpointError(f"checkpoint step {step} in {directory} has {_describe(path)} of shape "
                                  f"{saved[path]}, the model expects {wanted[path]}: {fix}")
    missing = [p for p in order if p not in saved]
    if missing:
        raise CheckpointError(f"checkpoint step {step} in {directory} has no {_describe(missing[0])} "
                              f"({len(missing)} of the {len(wanted)} arrays the run expects are missing): {fix}")
    extra = [] if partial else sorted(set(saved) - set(wanted), key=lambda p: (p[:1] != ("params",), p))
    if extra:
        raise CheckpointError(f"checkpoint step {step} in {directory} has {_describe(extra[0])}, which the model "
                              f"does not ({len(extra)} arrays the run does not expect): {fix}")


def _check_finite(step: int, tree, what: str) -> None:
    """CorruptCheckpointError naming the first floating-point array holding NaN or Inf."""
    leaves = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return
    flags = np.asarray(jax.device_get(jax.jit(lambda xs: jnp.stack([jnp.isfinite(x).all() for x in xs]))(
        [x for _, x in leaves])))
    if not flags.all():
        path = leaves[int(np.argmin(flags))][0]
        raise CorruptCheckpointError(step, f"{what}{jax.tree_util.keystr(path)} holds NaN or Inf")


def _short_reason(e: BaseException) -> str:
    reason = (str(e).strip().splitlines() or [""])[0].split(" [tensorstore_spec")[0][:300]
    return f"{type(e).__name__}: {reason}"


# --- disk full ----------------------------------------------------------------------------------

def _is_disk_full(e: BaseException) -> bool:
    """ENOSPC anywhere in `e`'s chain (Orbax and TensorStore re-raise it as other types)."""
    stack, seen = [e], set()
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if (isinstance(x, OSError) and x.errno == errno.ENOSPC) or "No space left" in str(x):
            return True
        stack.extend([x.__cause__, x.__context__, *getattr(x, "exceptions", ())])
    return False


class _DiskFullLogFilter(logging.Filter):
    """Drops Orbax's (absl) error records of a disk-full save, a dozen tracebacks each: the save
    becomes one CheckpointError instead (`_raise_save_error`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not ((exc is not None and _is_disk_full(exc)) or "No space left" in record.getMessage())


if not any(isinstance(f, _DiskFullLogFilter) for f in logging.getLogger("absl").filters):
    logging.getLogger("absl").addFilter(_DiskFullLogFilter())


def _join_orbax_threads(timeout: float = 300.0) -> None:
    """Wait for Orbax's writer threads: after one write fails, the others of that save carry on,
    and removing the folder under them would make them fail (and recreate it)."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax."):
            thread.join(max(0.0, deadline - time.monotonic()))


def _remove_unfinished(directory: str, step: int) -> list:
    """Remove `<step>.orbax-checkpoint-tmp*` (process 0) once Orbax's writers have stopped;
    returns what was removed."""
    _join_orbax_threads()
    found = sorted(glob.glob(os.path.join(glob.escape(directory), f"{step}{TMP_SUFFIX}*")))
    if jax.process_index() == 0:
        for path in found:
            shutil.rmtree(path, ignore_errors=True)
    return found


def _raise_save_error(directory: str, step: int, e: BaseException):
    """A disk-full save becomes one CheckpointError (its unfinished folder removed); anything
    else is re-raised as it is."""
    if not _is_disk_full(e):
        raise e
    _remove_unfinished(directory, step)
    kept = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []
    kept = [s for s in kept if s != step]
    raise CheckpointError(
        f"disk full: saving checkpoint step {step} to {directory} failed (no space left on device); the unfinished "
        f"save was removed and the earlier checkpoints {kept} are untouched. Free space (or move MODEL_DIR to a "
        "larger disk), then rerun the same command to resume") from None


def _step_bytes(directory: str, step: int) -> int:
    step_dir = os.path.join(directory, str(step))
    return sum(os.path.getsize(os.path.join(step_dir, rel)) for rel in _step_files(step_dir))


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
            if has_manifest(self.directory, step):
                try:
                    verify_step(self.directory, step)
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
        """
        step = int(step)
        if not (force or self._manager.should_save(step)):
            return False
        self._finish_pending()
        if step in self._manager.all_steps():
            log.info("checkpoint step %d already exists in %s; not saving it again", step, self.directory)
            return False
        self._check_free_space(step)
        hosts = {f"process_{i}": d for i, d in enumerate(_gather_json(data_state))}
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(_keys_to_data(state)),
                                     DATA_STATE: ocp.args.JsonSave(hosts),
                                     GIN_CONFIG: ocp.args.JsonSave({"text": gin_config or ""})})
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
                write_manifest(os.path.join(self.directory, str(step)), step)
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
                        write_manifest(os.path.join(self.directory, str(step)), step)
                    except OSError as e:
                        self._fail(step, e)
            except CheckpointError as e:
                self._save_error = e
        if raise_errors and self._save_error is not None:
            error, self._save_error = self._save_error, None
            raise error

    def _fail(self, step: int, e: BaseException):
        """Raise the CheckpointError of a disk-full save (see `_raise_save_error`), or `e`."""
        if _is_disk_full(e):
            self._manager.reload()  # forget the step Orbax may still list
        _raise_save_error(self.directory, step, e)

    def _check_free_space(self, step: int) -> None:
        """Refuse a save the disk cannot hold: one as large as the newest step (process 0 decides)."""
        def check():
            steps = self.all_steps()
            if not steps:
                return None
            try:
                needed = _step_bytes(self.directory, max(steps))
                free = shutil.disk_usage(self.directory).free
            except OSError:  # not a local filesystem: nothing to check
                return None
            return [free, needed] if free < needed else None
        short = check() if jax.process_count() == 1 else _gather_json(
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
        verify_step(self.directory, step)
        abstract = None if target_state is None else _abstract(target_state)
        if abstract is not None:
            _check_compatible(self.directory, step, os.path.join(self.directory, str(step), STATE), abstract)
        out = self._manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract), DATA_STATE: ocp.args.JsonRestore(),
            GIN_CONFIG: ocp.args.JsonRestore()}))
        state = out[STATE] if target_state is None else \
            _wrap_keys(_check_shapes(out[STATE], abstract, "state"), target_state)
        _check_finite(step, out[STATE], "state")
        hosts = out[DATA_STATE] or {}
        mine = f"process_{jax.process_index()}"
        if mine not in hosts:
            log.warning("checkpoint step %d has no data state for %s (saved by %d hosts); the data "
                        "iterator starts afresh", step, mine, len(hosts))
        return Restored(step=step, state=state, data_state=hosts.get(mine),
                        gin_config=(out[GIN_CONFIG] or {}).get("text", ""), metrics=self._manager.metrics(step))

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
        for step in _preference_order(self.directory, self.all_steps()):
            verified = has_manifest(self.directory, step)
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
                            step, self.directory, _short_reason(e))
                failures.append((step, _short_reason(e)))
                continue
            if verified:
                failures += [(s, "no manifest: its save was interrupted, or it predates manifests")
                             for s in self.all_steps() if s > step and not has_manifest(self.directory, s)]
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
