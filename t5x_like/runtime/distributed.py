"""Joining a multi-host run: `jax.distributed.initialize` from flags or the environment.

One program runs per host; they find each other through a coordinator (process 0's address).
This must happen before anything asks JAX for devices, so `main.py` calls `initialize` first.
Values come from the arguments, else `T5X_LIKE_COORDINATOR_ADDRESS`, `T5X_LIKE_NUM_PROCESSES`,
`T5X_LIKE_PROCESS_ID` (or JAX's own `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`). `T5X_LIKE_DISTRIBUTED=auto` lets JAX detect a cluster (TPU pod, SLURM, ...).

A dead peer must not leave the others hanging in a collective forever: the coordination service
declares a process dead after `heartbeat_timeout_seconds` without a heartbeat and then stops every
other process with an error naming the dead task. The JAX default (100 s) is lowered here so a
run fails within about `heartbeat_timeout_seconds` plus a few seconds.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from t5x_like.errors import UserError

DEFAULT_HEARTBEAT_TIMEOUT_S = 30
DEFAULT_INITIALIZATION_TIMEOUT_S = 120


class DistributedError(UserError):
    """Inconsistent multi-host settings (e.g. a coordinator but no process id)."""


def _env(*names: str) -> Optional[str]:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return value
    return None


def _int(value, what: str) -> Optional[int]:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{what} must be an integer, got {value!r}") from None


def settings(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
             process_id: Optional[int] = None) -> Optional[dict]:
    """The resolved (coordinator_address, num_processes, process_id), or None for a single process.

    Raises DistributedError when only some of them are given, since guessing would let processes
    wait for peers that never come.
    """
    address = coordinator_address or _env("T5X_LIKE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
    count = _int(num_processes if num_processes is not None
                 else _env("T5X_LIKE_NUM_PROCESSES", "JAX_NUM_PROCESSES"), "num_processes")
    pid = _int(process_id if process_id is not None else _env("T5X_LIKE_PROCESS_ID", "JAX_PROCESS_ID"),
               "process_id")
    given = {"coordinator_address": address, "num_processes": count, "process_id": pid}
    if all(v is None for v in given.values()):
        return None
    if count == 1 and address is None:
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise DistributedError(f"multi-host run needs coordinator_address, num_processes and process_id; "
                               f"missing {missing}. Pass --coordinator_address=HOST:PORT --num_processes=N "
                               "--process_id=I (or the T5X_LIKE_* environment variables)")
    if not 0 <= pid < count:
        raise DistributedError(f"process_id {pid} is outside 0..{count - 1} (num_processes={count})")
    return given


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *,
               heartbeat_timeout_seconds: Optional[int] = None,
               initialization_timeout: Optional[int] = None) -> bool:
    """Join the run if settings say so; returns True when `jax.distributed` was initialized.

    Safe to call twice (the second call does nothing). On CPU the cross-process collectives use
    gloo, which is what makes multi-process CPU runs (tests, laptops) possible at all.
    """
    import jax

    if jax.distributed.is_initialized():
        return True
    heartbeat = heartbeat_timeout_seconds or _int(_env("T5X_LIKE_HEARTBEAT_TIMEOUT_S"), "heartbeat timeout") \
        or DEFAULT_HEARTBEAT_TIMEOUT_S
    init_timeout = initialization_timeout or _int(_env("T5X_LIKE_INITIALIZATION_TIMEOUT_S"), "init timeout") \
        or DEFAULT_INITIALIZATION_TIMEOUT_S
    if _env("T5X_LIKE_DISTRIBUTED") == "auto":
        jax.distributed.initialize(initialization_timeout=init_timeout, heartbeat_timeout_seconds=heartbeat)
        return True
    given = settings(coordinator_address, num_processes, process_id)
    if given is None:
        return False
    if not _env("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):  # only affects the CPU backend
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    print(f"jax.distributed: process {given['process_id']} of {given['num_processes']}, coordinator "
          f"{given['coordinator_address']} (a peer silent for {heartbeat}s stops the run)", file=sys.stderr)
    jax.distributed.initialize(given["coordinator_address"], num_processes=given["num_processes"],
                               process_id=given["process_id"], initialization_timeout=init_timeout,
                               heartbeat_timeout_seconds=heartbeat,
                               shutdown_timeout_seconds=max(heartbeat, 10))
    return True


_PEER_FAILURE_MARKERS = ("gloo", "connection reset", "connection refused", "heartbeat", "unavailable",
                         "coordination service", "barrier", "peer")


def peer_failure_message(exc: BaseException) -> Optional[str]:
    """A one-line explanation when `exc` is a collective failing because another process died,
    else None. Only in a multi-process run: a single process has no peers to blame."""
    import jax

    if not jax.distributed.is_initialized() or jax.process_count() < 2:
        return None
    # The collective's error can be hidden behind a later one (e.g. Orbax timing out in its
    # commit barrier while the loop unwinds), so look along the exception's chain.
    seen, chain, cause = set(), [], exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    hits = [e for e in chain if type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError", "TimeoutError")
            and any(m in str(e).lower() for m in _PEER_FAILURE_MARKERS)]
    if not hits:
        return None
    text = str(hits[-1]).strip()
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    return (f"process {jax.process_index()} of {jax.process_count()}: a cross-process collective failed, "
            f"most likely because another process died or was killed ({first}); check the other "
            "processes' logs, then rerun all of them to resume from the last checkpoint")


def exit_after_peer_failure(message: str, status: int = 3) -> None:
    """Print the message and leave at once: the normal exit would wait in jax.distributed's
    shutdown barrier for the dead peer and then abort with a C++ stack trace."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)
