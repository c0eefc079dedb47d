"""Checkpoint integrity and disk-full handling, for `checkpointing.py`.

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

import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from t5x_like.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
HASH = "sha256"
TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointError(UserError):
    """A checkpoint directory that cannot be restored; the message says which and why."""


class CorruptCheckpointError(CheckpointError):
    """A step whose files differ from its manifest, or whose arrays hold NaN/Inf."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint step {step} is corrupt ({reason})")
        self.step, self.reason = step, reason


# --- integrity: manifests, shapes, finiteness ---------------------------------------------------

def step_files(step_dir: str) -> list:
    """Relative paths of every file of a step folder, the manifest (and its tmp files) excluded."""
    out = []
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/")
            if rel != MANIFEST and not rel.startswith(f".{MANIFEST}."):
                out.append(rel)
    return sorted(out)


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASH).hexdigest()


def write_manifest(step_dir: str, step: int) -> dict:
    """Write `<step_dir>/manifest.json` (size and sha256 of every file) atomically; returns it."""
    files = {}
    for rel in step_files(step_dir):
        path = os.path.join(step_dir, rel)
        files[rel] = {"size": os.path.getsize(path), HASH: file_digest(path)}
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


def check_manifest(directory: str, step: int) -> Optional[str]:
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
        return {"manifest": has_manifest(directory, step), "error": check_manifest(directory, step)}
    result = check() if jax.process_count() == 1 else gather_json(
        check() if jax.process_index() == 0 else None)[0]
    if result["error"]:
        raise CorruptCheckpointError(step, result["error"])
    return bool(result["manifest"])


def preference_order(directory: str, steps) -> list:
    """Verified steps newest first, then unverified ones newest first."""
    steps = sorted(steps, reverse=True)
    return [s for s in steps if has_manifest(directory, s)] + [s for s in steps if not has_manifest(directory, s)]


def tree_metadata(item_dir: str):
    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir))
    return getattr(meta, "tree", meta)


def key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flat_shapes(tree) -> dict:
    """{path tuple of names: shape} of the leaves that have a shape."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def describe(path: tuple) -> str:
    if path[:1] == ("params",):
        return "parameter " + "/".join(path[1:])
    return "state entry " + "/".join(path)


def check_compatible(directory: str, step: int, item_dir: str, target, partial: bool = False, prefix=()):
    """CheckpointError (one line) when `target`'s shapes or names differ from what step `step`
    holds: a checkpoint of another model size or family. Orbax would fail on it too, but with a
    long message and, after its event loop closes, hundreds of lines of TensorStore noise."""
    try:
        saved = {prefix + p: s for p, s in flat_shapes(tree_metadata(item_dir)).items()}
    except Exception:  # noqa: BLE001 - unreadable metadata: let the restore report it
        return
    wanted = {prefix + p: s for p, s in flat_shapes(target).items()}
    fix = "it was written by another model config; use a new MODEL_DIR or the matching gin files"
    order = sorted(wanted, key=lambda p: (p[:1] != ("params",), p))
    for path in order:
        if path in saved and saved[path] != wanted[path]:
            raise CheckpointError(f"checkpoint step {step} in {directory} has {describe(path)} of shape "
                                  f"{saved[path]}, the model expects {wanted[path]}: {fix}")
    missing = [p for p in order if p not in saved]
    if missing:
        raise CheckpointError(f"checkpoint step {step} in {directory} has no {describe(missing[0])} "
                              f"({len(missing)} of the {len(wanted)} arrays the run expects are missing): {fix}")
    extra = [] if partial else sorted(set(saved) - set(wanted), key=lambda p: (p[:1] != ("params",), p))
    if extra:
        raise CheckpointError(f"checkpoint step {step} in {directory} has {describe(extra[0])}, which the model "
                              f"does not ({len(extra)} arrays the run does not expect): {fix}")


def check_finite(step: int, tree, what: str) -> None:
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


def short_reason(e: BaseException) -> str:
    reason = (str(e).strip().splitlines() or [""])[0].split(" [tensorstore_spec")[0][:300]
    return f"{type(e).__name__}: {reason}"


# --- disk full ----------------------------------------------------------------------------------

def is_disk_full(e: BaseException) -> bool:
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


class DiskFullLogFilter(logging.Filter):
    """Drops Orbax's (absl) error records of a disk-full save, a dozen tracebacks each: the save
    becomes one CheckpointError instead (`raise_save_error`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not ((exc is not None and is_disk_full(exc)) or "No space left" in record.getMessage())


if not any(isinstance(f, DiskFullLogFilter) for f in logging.getLogger("absl").filters):
    logging.getLogger("absl").addFilter(DiskFullLogFilter())


def join_orbax_threads(timeout: float = 300.0) -> None:
    """Wait for Orbax's writer threads: after one write fails, the others of that save carry on,
    and removing the folder under them would make them fail (and recreate it)."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax."):
            thread.join(max(0.0, deadline - time.monotonic()))


def remove_unfinished(directory: str, step: int) -> list:
    """Remove `<step>.orbax-checkpoint-tmp*` (process 0) once Orbax's writers have stopped;
    returns what was removed."""
    join_orbax_threads()
    found = sorted(glob.glob(os.path.join(glob.escape(directory), f"{step}{TMP_SUFFIX}*")))
    if jax.process_index() == 0:
        for path in found:
            shutil.rmtree(path, ignore_errors=True)
    return found


def raise_save_error(directory: str, step: int, e: BaseException):
    """A disk-full save becomes one CheckpointError (its unfinished folder removed); anything
    else is re-raised as it is."""
    if not is_disk_full(e):
        raise e
    remove_unfinished(directory, step)
    kept = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []
    kept = [s for s in kept if s != step]
    raise CheckpointError(
        f"disk full: saving checkpoint step {step} to {directory} failed (no space left on device); the unfinished "
        f"save was removed and the earlier checkpoints {kept} are untouched. Free space (or move MODEL_DIR to a "
        "larger disk), then rerun the same command to resume") from None


def step_bytes(directory: str, step: int) -> int:
    step_dir = os.path.join(directory, str(step))
    return sum(os.path.getsize(os.path.join(step_dir, rel)) for rel in step_files(step_dir))


def gather_json(obj) -> list:
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
