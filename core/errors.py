"""The exception types the CLI turns into a one-line error."""


class ActsparseError(Exception):
    """A user-facing error: bad input, a missing resource or a refused operation.

    The CLI prints ``error: <message>`` on one line and exits non-zero; no traceback.
    """


class Interrupted(ActsparseError):
    """Work stopped by the user (Ctrl-C) or a termination signal, after cleaning up what it had started.

    The CLI prints ``error: <message>`` on one line and exits 130.
    """
