"""The one exception type the CLI turns into a one-line error."""


class ActsparseError(Exception):
    """A user-facing error: bad input, a missing resource or a refused operation.

    The CLI prints ``error: <message>`` on one line and exits non-zero; no traceback.
    """
