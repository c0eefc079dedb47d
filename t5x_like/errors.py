"""The one error type a user can cause and fix: `main.py` prints `error: <message>` and exits 2.

Every module's own error class derives from `UserError` (and from `ValueError`, so callers that
caught the old classes as `ValueError` still do), and its message says what was wrong and what to
do. Anything else escaping to the command line is a bug: it keeps its traceback.
"""

import re


class UserError(ValueError):
    """A problem with the user's input, configuration or environment; the message names the fix."""


def _is_gin_proxy(exc: BaseException) -> bool:
    """gin re-raises an exception from a configurable as an instance of a generated subclass
    (`ExceptionProxy`) whose message has "In call to configurable ..." appended; the original
    exception is its `__context__`."""
    return "ExceptionProxy" in getattr(type(exc).__init__, "__qualname__", "")


def unwrap_gin(exc: BaseException) -> BaseException:
    """The exception a configurable raised, without gin's proxies around it."""
    seen = set()
    while _is_gin_proxy(exc) and isinstance(exc.__context__, BaseException) and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__context__
    return exc


# Lines gin appends to a message: where a configurable was called, or where a binding was parsed.
_GIN_CONTEXT_LINE = re.compile(r"^\s*(In call to configurable '.*'|In (file \".*\",|bindings string) line \d+)")


def strip_gin_context(message: str) -> str:
    """`message` without gin's "In call to configurable 'X' (...)" lines (and the binding
    location lines gin adds after them)."""
    lines = message.splitlines()
    for i, line in enumerate(lines):
        if _GIN_CONTEXT_LINE.match(line):
            lines = lines[:i]
            break
    return "\n".join(lines)


def one_line(message: str) -> str:
    """A multi-line message folded into one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def user_message(exc: BaseException) -> str:
    """The one line `main.py` prints for a user error: the original message without gin's suffix."""
    exc = unwrap_gin(exc)
    if isinstance(exc, OSError) and exc.filename is not None and not isinstance(exc, UserError):
        reason = exc.strerror or type(exc).__name__
        message = f"{reason}: {exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
    else:
        message = strip_gin_context(str(exc)) or type(exc).__name__
    return one_line(message)
