"""``PermanentError``: how a task says that retrying cannot help.

Some failures are certain to repeat -- a malformed input file, a missing argument,
code that cannot be imported -- and retrying them only delays the dead-letter queue by
``num_retries`` back-offs (minutes, with the default retry policy).  A Python task
raises :class:`PermanentError` (exported as ``ai4s_jobq.PermanentError``); the worker
then dead-letters it at once with reason ``Permanent`` and the message.  The worker
itself treats a shell task without ``cmd`` and an ``ImportError`` raised by a Python
task the same way (see :func:`is_permanent`).
"""

from __future__ import annotations

PERMANENT_REASON = "Permanent"


class PermanentError(Exception):
    """Raise from a task to have it dead-lettered at once, without retries."""


def is_permanent(error: BaseException) -> bool:
    """Errors that a retry cannot fix: ``PermanentError`` and import errors (the code
    the task needs is not there; it will not appear between attempts)."""
    return isinstance(error, (PermanentError, ImportError))
