"""Worker log records tagged with the task ID and worker ID.

:class:`TaskLogFilter` sets ``jobq.task.id``, ``jobq.task.attempt`` and
``jobq.worker.id`` on each record it sees; OpenTelemetry's logging handler exports a
record's extra fields as attributes, so an exported worker log line can be filtered
by task or worker in any backend (the text line on stderr already names the task).

Where the values come from: :func:`log_task` is set by the telemetry hook when an
attempt starts, in the context of the loop's per-message asyncio task, so the loop's
own lines about that task carry it, and the processor's task (created after the hook
ran) inherits it; inside a Python task, ``current_task()`` is the fallback.  The
worker ID is one per process (the last worker started), as a worker process runs
one ``Worker``.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar, Token

from ..worker.context import current_task
from .names import TASK_ATTEMPT, TASK_ID, WORKER_ID

#: (task ID, attempt): a plain tuple, made once per task on the worker's hot path.
LoggedTask = tuple[str, int]


_task: ContextVar[LoggedTask | None] = ContextVar("ai4s_jobq_logged_task", default=None)
#: The variable itself, for the telemetry hook to set without a call of its own.
LOGGED_TASK = _task
_worker_id: str | None = None


def set_worker_id(worker_id: str | None) -> None:
    global _worker_id
    _worker_id = worker_id


def log_task(task_id: str, attempt: int) -> Token[LoggedTask | None]:
    """Tag this context's log records with the task (until ``reset_log_task``)."""
    return _task.set((task_id, attempt))


def reset_log_task(token: Token[LoggedTask | None]) -> None:
    _task.reset(token)


class TaskLogFilter(logging.Filter):
    """Adds the task and worker IDs to every record (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        logged = _task.get()
        if logged is not None:
            setattr(record, TASK_ID, logged[0])
            setattr(record, TASK_ATTEMPT, logged[1])
        else:
            context = current_task()
            if context is not None:
                setattr(record, TASK_ID, context.task_id)
                setattr(record, TASK_ATTEMPT, context.attempt)
        if _worker_id is not None:
            setattr(record, WORKER_ID, _worker_id)
        return True
