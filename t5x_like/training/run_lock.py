"""One run per MODEL_DIR: a lock that process 0 holds on `<model_dir>/.lock` for the run's lifetime.

Two runs writing one directory would interleave `metrics.jsonl` and delete each other's
checkpoint saves, so `trainer.train` takes this lock before it writes anything; a second run fails
at once with a `RunLockedError` naming the holder. `evaluate` only reads and takes no lock.

How it is held:
- an exclusive, non-blocking `fcntl.flock` on `.lock`. The kernel drops it when the holding process
  dies however it dies (SIGKILL included), so a crashed run never blocks the next one on its host;
- the holder's identity written into the file, one JSON object on one line:
  `{"host": "node-3", "pid": 4242, "pid_start": 91234567, "boot_id": "1c9e...", "pid_ns": "pid:[4026531836]",
  "since": "2025-01-31T09:15:02Z", "since_unix": 1738314902.1, "argv": "python -m t5x_like.main train ..."}`
  (`pid_start`: the process's start time in clock ticks after boot, field 22 of `/proc/PID/stat`;
  `boot_id` and `pid_ns` are null where there is no /proc);
- a heartbeat: the holder touches the file's mtime every `HEARTBEAT_S` seconds;
- on release (the end of `train`, an error, or SIGTERM's save-and-exit) the file is emptied, then
  unlocked. It is never deleted: deleting a lock file lets two processes lock two different inodes.
An empty file means "free".

When the flock is granted but the file still names a holder (the holder died without releasing,
or the filesystem does not enforce flock, as some network and FUSE filesystems do not), the
recorded holder decides:
- a file that names no holder (garbled by a crash while it was written): taken over;
- this machine (same host name, boot id and PID namespace): the holder is alive only if its pid
  exists, is not a zombie and has the recorded start time (so a reused pid does not count); a dead
  holder's lock is taken over with a warning;
- same host name but another boot id: the machine rebooted since, the holder is gone; taken over;
- another machine (or another PID namespace, e.g. a container sharing the host name): its pid
  cannot be checked, so it is trusted while its heartbeat is fresh, and taken over once the file
  has not been touched for `STALE_AFTER_S` seconds (10 minutes: ten missed heartbeats, and room
  for clock skew between hosts);
- `T5X_LIKE_BREAK_LOCK=1` takes over a recorded holder regardless (after making sure it is gone).
A flock refused by the kernel is never broken: some live process holds it.

Multi-host runs: only process 0 locks (it is the one that writes logs and decides saves); the
other processes learn the outcome through a broadcast, so all of them fail together.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Optional

from t5x_like.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
BREAK_ENV = "T5X_LIKE_BREAK_LOCK"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


class RunLockedError(UserError):
    """Another run holds the model directory's lock."""


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> Optional[tuple[str, int]]:
    """(state, start time in clock ticks after boot) of a pid from /proc, or None."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rpartition(")")[2].split()  # the name in parentheses may hold spaces
    try:
        return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    except (IndexError, ValueError):
        return None


def _machine() -> dict:
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_ns": pid_ns}


def this_process() -> dict:
    """What the lock file records about its holder."""
    now = time.time()
    stat = _proc_stat(os.getpid())
    return {**_machine(), "pid": os.getpid(), "pid_start": stat[1] if stat else None,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "since_unix": now,
            "argv": " ".join([os.path.basename(sys.executable)] + sys.argv)[:500]}


def _pid_alive(pid, pid_start) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    except OSError:
        return False
    stat = _proc_stat(pid)
    if stat is None:
        return not os.path.isdir("/proc/self")  # with /proc, an unreadable stat means it just ended
    state, start = stat
    if state in ("Z", "X"):
        return False
    return pid_start is None or start == pid_start


def stale_reason(holder: dict, mtime: float, now: Optional[float] = None) -> Optional[str]:
    """Why the recorded holder is certainly gone (its lock may be taken over), or None if it must
    be trusted."""
    now = time.time() if now is None else now
    if not holder.get("host") or not holder.get("pid"):
        return "the lock file names no holder (garbled, e.g. by a crash while it was written)"
    me = _machine()
    if holder.get("host") == me["host"]:
        if holder.get("boot_id") and me["boot_id"] and holder["boot_id"] != me["boot_id"]:
            return "this machine rebooted since it took the lock"
        if holder.get("pid_ns") == me["pid_ns"]:
            if not _pid_alive(holder.get("pid"), holder.get("pid_start")):
                return "its process no longer runs"
            return None
    if now - mtime > STALE_AFTER_S:
        return f"its heartbeat stopped {_ago(now - mtime)} ago"
    return None


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def describe(holder: dict, now: Optional[float] = None) -> str:
    """`pid 4242 on host node-3 since 2025-01-31T09:15:02Z (3 min ago)`."""
    now = time.time() if now is None else now
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    if holder.get("since"):
        text += f" since {holder['since']}"
        if isinstance(holder.get("since_unix"), (int, float)):
            text += f" ({_ago(now - holder['since_unix'])} ago)"
    return text


def _parse(text: str) -> Optional[dict]:
    if not text.strip():
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}  # garbled (e.g. written while the machine crashed): a holder we cannot name
    return holder if isinstance(holder, dict) else {}


def _read_fd(fd: int) -> str:
    chunks, offset = [], 0
    while True:
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            return b"".join(chunks).decode("utf-8", "replace")
        chunks.append(chunk)
        offset += len(chunk)


def _heartbeat(fd: int, stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        try:
            os.utime(fd)
        except OSError:
            pass


class RunLock:
    """`with RunLock(model_dir): ...`, or `acquire()` / `release()`. `active=False` (a process
    other than 0) makes both no-ops."""

    def __init__(self, model_dir: str, active: bool = True, heartbeat_s: float = HEARTBEAT_S):
        self.model_dir = os.path.abspath(os.fspath(model_dir))
        self.path = os.path.join(self.model_dir, LOCK_FILE)
        self.active = bool(active)
        self.heartbeat_s = heartbeat_s
        self._fd: Optional[int] = None
        self._stop: Optional[threading.Event] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _locked_error(self, holder: Optional[dict], extra: str = "") -> RunLockedError:
        if holder:
            who = f"another run ({describe(holder)})"
        else:
            who = "another run (its lock file names no holder yet)"
        return RunLockedError(
            f"{self.model_dir} is in use by {who}; wait for it to finish or stop it, or give this run "
            f"another MODEL_DIR{extra}")

    def acquire(self) -> "RunLock":
        if not self.active or self.held:
            if self.held:
                raise RunLockedError(f"{self.model_dir}: this RunLock is already held")
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._locked_error(_parse(_read_fd(fd))) from None
                log.warning("file locks are not supported on %s (%s); relying on the holder the lock "
                            "file records", self.path, e)
            holder = _parse(_read_fd(fd))
            if holder is not None:
                now = time.time()
                reason = stale_reason(holder, os.fstat(fd).st_mtime, now)
                if reason is None and os.environ.get(BREAK_ENV) == "1":
                    reason = f"{BREAK_ENV}=1"
                if reason is None:
                    raise self._locked_error(holder, extra=(
                        f" (if it is gone, e.g. its machine crashed, rerun with {BREAK_ENV}=1 or empty "
                        f"{self.path}; it goes stale {_ago(STALE_AFTER_S)} after its last heartbeat)"))
                log.warning("%s: taking over the lock of %s: %s", self.model_dir,
                            describe(holder, now) if holder else "an unnamed holder", reason)
            data = (json.dumps(this_process()) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # also drops the flock
            raise
        self._fd = fd
        if self.heartbeat_s and self.heartbeat_s > 0:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=_heartbeat, args=(fd, self._stop, self.heartbeat_s),
                                            name="t5x_like-run-lock-heartbeat", daemon=True)
            self._thread.start()
        return self

    def release(self) -> None:
        """Empty the file (no holder), then unlock. Safe to call twice or when never acquired."""
        if self._fd is None:
            return
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._stop = self._thread = None
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError as e:  # e.g. a read-only or full disk: the pid check still frees it later
            log.warning("could not empty %s: %s", self.path, e)
        finally:
            os.close(fd)  # drops the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(model_dir: str) -> RunLock:
    """The run's lock, taken by process 0; in a multi-host run every process raises if it failed."""
    import jax

    lock = RunLock(model_dir, active=jax.process_index() == 0)
    error: Optional[BaseException] = None
    try:
        lock.acquire()
    except Exception as e:  # noqa: BLE001  (told to the other processes, then re-raised)
        error = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils
        ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = RunLockedError(f"process 0 could not lock {lock.model_dir} (see its error); every "
                                   "process of this run stops")
    if error is not None:
        raise error
    return lock
