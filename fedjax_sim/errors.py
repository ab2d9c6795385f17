"""The error type for mistakes a user can fix.

A `UserError` carries a one-line message that names the problem and the fix. The CLI
prints it without a traceback; the Python API raises it like any exception.
"""


class UserError(ValueError):
    """A bad input (config value, data, model) with a one-line message saying what to do."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (SIGINT) between two calls of its compiled rounds.

    The message says where it stopped, whether a checkpoint was saved, and how to resume.
    The CLI prints it and exits with status 130 (128 + SIGINT), without a traceback.
    """
