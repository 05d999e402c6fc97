"""What a running task may know about its own attempt: ``current_task()``.

A shell task sees it as environment variables (``JOBQ_TASK_ID``, ``JOBQ_ATTEMPT``,
``JOBQ_INTERRUPTIONS``, ``JOBQ_GPUS`` and ``CUDA_VISIBLE_DEVICES``); a Python task calls
:func:`current_task`.  A context variable rather than extra keyword arguments, because a
task's arguments are its identity (they are hashed into its ID) and a function should
not have to accept parameters it does not use.  Context variables follow the call into
``asyncio`` tasks and into the thread that runs a sync function, so each slot sees its
own value.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass
class StopRequest:
    """Set by the loop before it cancels a task: how long the task may take to stop
    after SIGTERM (e.g. bounded by a preemption notice's deadline) before it is
    killed.  None: the processor's own default."""

    grace: float | None = None


@dataclass(frozen=True)
class TaskContext:
    task_id: str
    attempt: int = 1  # 1 on the first attempt; interruptions do not count
    interruptions: int = 0  # earlier runs stopped by preemption, shutdown or time limit
    gpus: tuple[str, ...] = ()  # the GPUs given to this task's slot (indices or UUIDs)
    stop: StopRequest = field(default_factory=StopRequest, compare=False, repr=False)

    def env(self) -> dict[str, str]:
        """The environment variables a child process of this task gets."""
        env = {
            "JOBQ_TASK_ID": self.task_id,
            "JOBQ_ATTEMPT": str(self.attempt),
            "JOBQ_INTERRUPTIONS": str(self.interruptions),
        }
        if self.gpus:
            env["JOBQ_GPUS"] = env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        return env


_current: ContextVar[TaskContext | None] = ContextVar("ai4s_jobq_task", default=None)


def current_task() -> TaskContext | None:
    """The running task's context, or None outside a task."""
    return _current.get()


@contextmanager
def task_context(context: TaskContext) -> Iterator[TaskContext]:
    """Make ``context`` current for the code (and the asyncio tasks it creates) inside."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)
