"""The one exception type users see: a message that names the file, record or parameter and what to do."""


class NevaError(Exception):
    """A user-facing failure. The CLI prints its message without a traceback and exits with 2."""


class TransientError(NevaError):
    """A failure worth retrying (a dropped connection, a 5xx). Prefect tasks retry only these."""
