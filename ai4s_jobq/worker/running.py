"""The worker loop's record of one received message, from its handler's start to the end
of its settle: what the loop needs to stop its task, renew its lock and settle it.

Its own module so :mod:`.loop` reads as the loop alone.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import ReceivedMessage
from .context import TaskContext
from .hooks import TaskRun


@dataclass(eq=False)
class Running:
    """One received message, from its handler's start to its settle's end.  The
    processor runs inside the handler (no task of its own: a task, a wait and a
    lock keeper per message were a third of a no-op task's cost); cancelling the
    handler while ``working`` stops the processor."""

    message: ReceivedMessage
    working: bool = False  # the processor is running (cancel the handler to stop it)
    cancelled: bool = False  # the processor was stopped by the loop
    result: Any = None
    error: BaseException | None = None
    lock_lost: bool = False
    interrupted: str | None = None  # why the loop cancelled it: Shutdown, Preempted
    context: TaskContext | None = None
    settling: bool = False  # the task is over; its message is being settled
    keeper: asyncio.Task[None] | None = None  # renews the lock once the task runs long
    run: TaskRun | None = None  # the attempt, once it began (a looked-ahead one may not)
    began: float = 0.0  # time.monotonic() when it began
    handler: asyncio.Task[None] = field(init=False)

    def stop(self) -> bool:
        """Cancel the processor if it is running; False if it is not."""
        if not self.working:
            return False
        self.cancelled = True
        self.handler.cancel()
        return True
