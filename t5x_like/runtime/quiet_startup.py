"""Quiet start-up and shutdown of the CLI: TensorFlow, absl and Orbax chatter hidden unless `--verbose`.

Set up before TensorFlow / JAX are imported (`quiet_startup`), so that a command prints the
project's own output and, on a user error, exactly one `error:` line. Python warnings and the
project's log messages still show.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys


@contextlib.contextmanager
def _stderr_fd_silenced():
    """File descriptor 2 points at /dev/null inside (C++ logging writes to it directly)."""
    sys.stderr.flush()
    try:
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no fd 2 to redirect: nothing to silence
        yield
        return
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _QuietTensorFlowImport:
    """A meta-path finder for the first `import tensorflow`, wherever a mode triggers it: the
    import runs with fd 2 silenced, since TensorFlow's C++ start-up lines ("oneDNN custom
    operations", "Could not find cuda drivers", "failed call to cuInit") are written before absl
    logging is initialised and ignore TF_CPP_MIN_LOG_LEVEL. Python errors of the import still
    propagate (and print) as usual."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec_module(module):
            with _stderr_fd_silenced():
                exec_module(module)

        spec.loader.exec_module = quiet_exec_module
        return spec


def _from_orbax(unraisable) -> bool:
    """An exception Python could not raise (a garbage-collected coroutine, a closed event loop)
    that comes from Orbax / TensorStore background work abandoned by an error."""
    files = []
    code = getattr(unraisable.object, "cr_code", None) or getattr(unraisable.object, "__code__", None)
    if code is not None:
        files.append(code.co_filename)
    tb = unraisable.exc_traceback
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return any(f"{os.sep}orbax{os.sep}" in f or f"{os.sep}tensorstore{os.sep}" in f for f in files)


class OrbaxChatterFilter(logging.Filter):
    """Drops Orbax's INFO / WARNING records (logged through absl: "read_only=True, setting
    create=False", "Given directory is read only", ...), and seqio's uncached-source warning; errors
    still show."""

    def filter(self, record) -> bool:
        if record.levelno > logging.WARNING:
            return True
        if record.getMessage().startswith(UNCACHED_SOURCE_WARNING):
            return False
        return f"{os.sep}orbax{os.sep}" not in (record.pathname or "")


# seqio warns that a shuffled FunctionDataSource reshuffles poorly "on restarts"; a t5x_like run
# resumes by replaying the same seeded stream (data/iterators.py), so the warning does not apply.
UNCACHED_SOURCE_WARNING = "Using an uncached FunctionDataset for training"


class QuietUnraisableHook:
    """`sys.unraisablehook` that drops Orbax / TensorStore shutdown noise and passes the rest on."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, unraisable):
        if not _from_orbax(unraisable):
            self.fallback(unraisable)


def quiet_startup(verbose: bool = False) -> None:
    """Before TensorFlow / JAX start: no C++ start-up chatter, no absl pre-init warning, no
    TensorFlow Python INFO/WARNING logging, no Orbax INFO/WARNING chatter or shutdown tracebacks;
    `--verbose` keeps them all. Python warnings (the `warnings` module) and this project's log
    messages still show."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging  # first: absl creates its "absl" logger (an ABSLLogger)
    except ImportError:
        absl_logging = None
    if absl_logging is not None:
        absl_logging._warn_preinit_stderr = False  # "WARNING: Logging before flag parsing goes to stderr."
        absl_logger = logging.getLogger("absl")
        if not any(isinstance(f, OrbaxChatterFilter) for f in absl_logger.filters):
            absl_logger.addFilter(OrbaxChatterFilter())
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())
    if not isinstance(sys.unraisablehook, QuietUnraisableHook):
        sys.unraisablehook = QuietUnraisableHook(sys.unraisablehook)


def exit_quietly(status: int) -> None:
    """After a reported error, leave without the shutdown noise of abandoned library work
    (Orbax/TensorStore coroutines, asyncio "Event loop is closed", absl atexit logging)."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.disable(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None
    sys.exit(status)
