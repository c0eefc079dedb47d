"""The command line re-executes itself with glibc's huge-page malloc tunable (runtime/host_runtime.py)."""

import os
import platform
import subprocess
import sys

import pytest

from t5x_like.runtime import host_runtime

PROBE = ("from t5x_like.runtime.host_runtime import reexec_with_tuned_allocator; reexec_with_tuned_allocator(); "
         "import os; print(os.environ.get('GLIBC_TUNABLES'))")
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tunables are glibc's")


def _run(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_runtime.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


@glibc_only
def test_reexec_sets_tunables_once():
    assert _run() == host_runtime.MALLOC_TUNABLES


@glibc_only
def test_users_own_tunables_and_opt_out_are_respected():
    assert _run(GLIBC_TUNABLES="glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2"
    assert _run(T5X_LIKE_TUNE_MALLOC="0") == "None"
