"""ai4s_jobq: push many small tasks to a queue with deterministic, deduplicating IDs,
and drain it with worker loops.  See README.md and docs/."""

from .api import push, push_many
from .ids import TaskEncodingError, canonical_json, identify
from .jobq import JobQ, PushFailure, PushResult, PushSummary
from .task import Task, make_task
from .worker import Worker, WorkerPolicy
from .worker.context import TaskContext, current_task
from .worker.permanent import PermanentError

__all__ = [
    "JobQ",
    "PermanentError",
    "PushFailure",
    "PushResult",
    "PushSummary",
    "Task",
    "TaskContext",
    "TaskEncodingError",
    "Worker",
    "WorkerPolicy",
    "canonical_json",
    "current_task",
    "identify",
    "make_task",
    "push",
    "push_many",
]
__version__ = "0.1.0"
