"""The one error type a user can cause and fix: `main.py` prints `error: <message>` and exits 2.

Every module's own error class derives from `UserError` (and from `ValueError`, so callers that
caught the old classes as `ValueError` still do), and its message says what was wrong and what to
do. Anything else escaping to the command line is a bug: it keeps its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input, configuration or environment; the message names the fix."""
