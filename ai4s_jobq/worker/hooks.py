"""The fixed points in a task's life where policies plug into the worker loop.

The loop (:mod:`.loop`) calls every registered :class:`WorkerHook` at the same few
moments: the worker starts, a task is entered (in its own context, just before its
code is called) and starts, a task ends (with its outcome), the worker stops.  The
outcome ledger, telemetry and heartbeats are hooks; the loop knows nothing about any
of them.  Like dramatiq's middleware, but smaller: a hook observes,
it does not steer — control policies (preemption, retry back-off) have their own
modules that the loop asks explicitly.

Why the per-task methods are plain (not ``async``) functions: they run for every task
on the hot path, and most hooks only append to a buffer that a background flush
writes out (the ledger batches; telemetry ends a span).  A hook that needs I/O starts
its own background work in :meth:`WorkerHook.start` and finishes it in
:meth:`WorkerHook.stop`.  A hook that raises is logged and never fails the task.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..backends.base import ReceivedMessage
    from ..task import Task

log = logging.getLogger("ai4s_jobq.worker")

# Outcome kinds, as the ledger records them (see ai4s_jobq.ledger.base.TaskState).
SUCCEEDED = "succeeded"
FAILED = "failed"  # this attempt failed; the task will be retried
DEAD_LETTERED = "dead_lettered"
INTERRUPTED = "interrupted"  # shutdown, preemption, time limit: not a failure
LOCK_LOST = "lock_lost"  # another worker owns the message now; nothing settled here


@dataclass
class WorkerIdentity:
    """Who this worker is, for heartbeats, the ledger and telemetry."""

    worker_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    slots: int = 1
    queue: str = ""
    started_at: float = field(default_factory=time.time)


@dataclass
class TaskRun:
    """One attempt of one task on this worker."""

    task: Task
    message: ReceivedMessage
    attempt: int  # 1 on the first delivery
    started_at: float = field(default_factory=time.time)  # wall clock, for records
    context: dict[str, Any] = field(default_factory=dict)  # a hook's own per-run state


@dataclass
class TaskOutcome:
    """How an attempt ended.  ``kind`` is one of the constants above."""

    kind: str
    duration: float
    reason: str | None = None  # e.g. "NonZeroExit", "ValueError", "Timeout", "Preempted"
    summary: str | None = None  # the meaningful last lines, redacted
    exit_code: int | None = None
    result: Any = None  # a Python task's return value
    finished_at: float = field(default_factory=time.time)


class WorkerHook:
    """Base class: override what you need; every method is optional."""

    async def start(self, worker: WorkerIdentity) -> None:
        """Called once before the first receive."""

    def task_entered(self, run: TaskRun) -> None:
        """Called in the attempt's own context (the one its code runs in, a copy of
        it for a sync function) just before the processor is called: the place to set
        context variables the task's code should see (telemetry's current span).
        ``task_started`` follows when the attempt really begins -- for a looked-ahead
        sync task (see :mod:`.lookahead`) later, from the worker's own bookkeeping,
        in another context -- or never, if it is put back before it began."""

    def task_started(self, run: TaskRun) -> None:
        """Called when an attempt starts running (after the message was decoded)."""

    def task_finished(self, run: TaskRun, outcome: TaskOutcome) -> None:
        """Called when an attempt ends, before its message is settled."""

    def malformed(self, message: ReceivedMessage, reason: str) -> None:
        """Called for a message that is not a task (it is dead-lettered)."""

    async def stop(self, worker: WorkerIdentity, stats: Any) -> None:
        """Called once after the last task settled (also on signals)."""


class HookChain:
    """Calls every hook, logging (never raising) a hook's own error."""

    def __init__(self, hooks: Sequence[WorkerHook] = ()):
        self.hooks = list(hooks)

    def __bool__(self) -> bool:
        return bool(self.hooks)

    async def start(self, worker: WorkerIdentity) -> None:
        for hook in self.hooks:
            try:
                await hook.start(worker)
            except Exception:
                log.exception("worker hook %s failed to start", type(hook).__name__)

    def task_entered(self, run: TaskRun) -> None:
        for hook in self.hooks:
            try:
                hook.task_entered(run)
            except Exception:
                log.exception("worker hook %s failed", type(hook).__name__)

    def task_started(self, run: TaskRun) -> None:
        for hook in self.hooks:
            try:
                hook.task_started(run)
            except Exception:
                log.exception("worker hook %s failed", type(hook).__name__)

    def task_finished(self, run: TaskRun, outcome: TaskOutcome) -> None:
        for hook in self.hooks:
            try:
                hook.task_finished(run, outcome)
            except Exception:
                log.exception("worker hook %s failed", type(hook).__name__)

    def malformed(self, message: ReceivedMessage, reason: str) -> None:
        for hook in self.hooks:
            try:
                hook.malformed(message, reason)
            except Exception:
                log.exception("worker hook %s failed", type(hook).__name__)

    async def stop(self, worker: WorkerIdentity, stats: Any) -> None:
        for hook in self.hooks:
            try:
                await hook.stop(worker, stats)
            except Exception:
                log.exception("worker hook %s failed to stop", type(hook).__name__)
