"""``--task-timeout``: a task that runs too long is stopped and counted as failed.

A wrapper, so it works for every processor the same way: when the time is up it
cancels the inner call, and each processor's own cancellation stops the work (the
shell processor SIGTERMs the command's process group and SIGKILLs it after a short
grace; the process pool does the same to the task's pool process and replaces it).
The wait for that stop is part of the timeout, so the slot (and its GPUs) is free
only once the work is gone.  The attempt then fails with reason ``Timeout``: unlike
a shutdown or a lost lock it is the task's own doing, so it uses up a retry.

An in-process *sync* Python function cannot be stopped: its attempt still fails with
``Timeout`` at the deadline, but its thread runs on to its end;
``--isolation process`` makes such tasks stoppable.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

from ..durations import format_duration
from ..task import Task
from .processors import Processor, ProcessorWrapper, TaskFailed

log = logging.getLogger("ai4s_jobq.worker")


class TaskTimeout(ProcessorWrapper):
    """Wraps a processor: fail a task with ``Timeout`` after ``seconds``."""

    def __init__(self, inner: Processor, seconds: float):
        if seconds <= 0:
            raise ValueError("--task-timeout must be positive")
        super().__init__(inner)
        self.seconds = seconds

    async def __call__(self, task: Task) -> Any:
        # Its own asyncio task (copying the context): the deadline cancels only it.
        work = asyncio.ensure_future(self.inner(task))
        try:
            done, _ = await asyncio.wait([work], timeout=self.seconds)
        except asyncio.CancelledError:
            await _stop(work)
            raise
        if not done:
            await _stop(work)
            if work.cancelled() or work.exception() is not None:
                text = format_duration(timedelta(seconds=self.seconds))
                log.warning("task %s: stopped after the task timeout (%s)", task.id, text)
                raise TaskFailed(
                    "Timeout", f"Timeout: the task ran longer than {text} (--task-timeout)"
                )
        return work.result()


async def _stop(work: asyncio.Future[Any]) -> None:
    """Cancel and wait until the processor has stopped the work (its kill grace)."""
    work.cancel()
    await asyncio.wait([work])
