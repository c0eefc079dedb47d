"""Process-level settings for the host (CPU) side that must exist before the interpreter starts.

XLA:CPU allocates every temporary buffer of an executable anew on each call. glibc serves large
requests with fresh `mmap`s, so a medium model's train step page-faults on about 5 GB of new 4 KiB
pages per step (1.3-1.8 million faults, 2-4 CPU-seconds in the kernel). `glibc.malloc.hugetlb=1`
makes malloc ask for transparent huge pages (2 MiB) instead: 50-70x fewer faults, and the step
runs 10-40% faster on CPU (benchmarks/README.md). glibc reads tunables only at start-up, so the
command-line entry point re-executes itself once with the variable set.
"""

from __future__ import annotations

import os
import platform
import sys

MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"
OPT_OUT = "T5X_LIKE_TUNE_MALLOC"  # set to 0 to keep the default allocator


def tuned_env(environ=None) -> dict:
    """`environ` with the allocator tunables added (a user's own GLIBC_TUNABLES is kept as is)."""
    env = dict(os.environ if environ is None else environ)
    if "GLIBC_TUNABLES" not in env and sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    return env


def reexec_with_tuned_allocator() -> None:
    """Replace this process by the same command with the tunables set (same pid, same stdio).

    A no-op when they are already set, off Linux/glibc, or when T5X_LIKE_TUNE_MALLOC=0.
    """
    if os.environ.get(OPT_OUT, "1") == "0":
        return
    env = tuned_env()
    if env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(getattr(sys, "orig_argv", [sys.executable] + sys.argv)), env)
