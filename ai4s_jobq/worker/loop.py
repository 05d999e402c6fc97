"""The worker loop: receive, run, settle — readable top to bottom.

For each message the worker holds a lock (peek-lock, lease or visibility
timeout) and renews it while the task runs.  Outcomes:

* success → complete;
* failure with attempts left → abandon (the broker's delivery count is the
  attempt counter, so nothing is rewritten);
* failure on the last attempt → dead-letter with the reason and description
  (exit code and stderr tail);
* a message that is not a task → dead-letter ``MalformedTask``, keep going;
* lock lost → cancel the task and leave the message alone: another worker owns it;
* shutdown (SIGTERM/SIGINT) → stop receiving, give running tasks
  ``grace_period`` seconds, then cancel them and abandon their messages so they
  are redelivered at once.

A slot is a running *task*: when a task ends its slot takes the next message
while the settle (a broker round trip) is still in flight, so short tasks do not
leave slots idle waiting on the broker.  At most ``slots`` settles may be in
flight beyond that; past it, slots wait.  Shutdown waits for every settle.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from ..backends.base import Backend, LockLostError, ReceivedMessage
from ..redact import redact
from ..task import MalformedTaskError, Task
from .context import TaskContext, task_context
from .hooks import (
    DEAD_LETTERED,
    FAILED,
    INTERRUPTED,
    LOCK_LOST,
    SUCCEEDED,
    HookChain,
    TaskOutcome,
    TaskRun,
    WorkerHook,
    WorkerIdentity,
)
from .processors import Processor, TaskFailed, install_signal_handlers

log = logging.getLogger("ai4s_jobq.worker")

RECEIVE_WAIT_SECONDS = 1.0
RECEIVE_RETRY_MAX = 30.0
RECEIVE_LINGER_SECONDS = 0.05


class ExitCode(IntEnum):
    OK = 0  # idle timeout, time limit or task limit reached
    TASK_FAILED = 1  # `jobq pull`: the one task failed
    TOO_MANY_FAILURES = 3  # --max-consecutive-failures reached
    SIGINT = 128 + signal.SIGINT
    SIGTERM = 128 + signal.SIGTERM


@dataclass
class WorkerPolicy:
    slots: int = 1
    idle_timeout: float = 5.0  # seconds with an empty queue and nothing running; 0 = never
    time_limit: float | None = None  # stop taking tasks after this many seconds
    max_consecutive_failures: int | None = None
    grace_period: float = 30.0  # on SIGTERM/SIGINT, before running tasks are killed
    max_tasks: int | None = None  # `jobq pull` is max_tasks=1


@dataclass
class WorkerStats:
    succeeded: int = 0
    failed: int = 0  # attempts that failed (retried or dead-lettered)
    dead_lettered: int = 0
    malformed: int = 0
    lost_locks: int = 0
    interrupted: int = 0
    consecutive_failures: int = 0
    stop_reason: str = ""
    exit_code: int = 0


@dataclass(eq=False)
class _Running:
    message: ReceivedMessage
    work: asyncio.Future[None] | None = None
    lock_lost: bool = False
    settling: bool = False  # the task is over; its message is being settled
    handler: asyncio.Task[None] = field(init=False)


class Worker:
    def __init__(
        self,
        backend: Backend,
        processor: Processor,
        policy: WorkerPolicy | None = None,
        *,
        hooks: Sequence[WorkerHook] = (),
        identity: WorkerIdentity | None = None,
    ):
        self.backend = backend
        self.processor = processor
        self.policy = policy or WorkerPolicy()
        self.hooks = HookChain(hooks)
        self.identity = identity or WorkerIdentity(
            slots=self.policy.slots, queue=backend.description
        )
        self.stats = WorkerStats()
        self._running: set[_Running] = set()
        self._slot_freed = asyncio.Event()
        self._signal: int | None = None
        self._taken = 0

    # ------------------------------------------------------------------ main loop

    async def run(self) -> WorkerStats:
        restore = install_signal_handlers(asyncio.get_running_loop(), self._on_signal)
        await self.hooks.start(self.identity)
        try:
            self.stats.stop_reason = await self._receive_loop()
            await self._finish_running()
        finally:
            restore()
            self.stats.exit_code = self._exit_code()
            await self.hooks.stop(self.identity, self.stats)
        log.info(
            "worker stopped (%s): %d succeeded, %d failed attempts, %d dead-lettered",
            self.stats.stop_reason,
            self.stats.succeeded,
            self.stats.failed,
            self.stats.dead_lettered,
        )
        return self.stats

    async def _receive_loop(self) -> str:
        policy = self.policy
        started = last_activity = time.monotonic()
        receive_errors = 0
        while True:
            if self._signal is not None:
                return f"signal {signal.Signals(self._signal).name}"
            if policy.time_limit is not None and time.monotonic() - started >= policy.time_limit:
                return "time limit"
            if policy.max_tasks is not None and self._taken >= policy.max_tasks:
                return "task limit"
            if (
                policy.max_consecutive_failures
                and self.stats.consecutive_failures >= policy.max_consecutive_failures
            ):
                return "too many consecutive failures"
            free = self._free_slots()
            if free <= 0:
                self._slot_freed.clear()
                await self._wait_for(self._slot_freed, RECEIVE_WAIT_SECONDS)
                last_activity = time.monotonic()
                continue
            if self._running and free < (policy.slots + 1) // 2:
                free = await self._gather_free_slots()
            if policy.max_tasks is not None:
                free = min(free, policy.max_tasks - self._taken)
            try:
                messages = await self.backend.receive(free, self._receive_wait(last_activity))
            except Exception as exc:  # broker down or connection dropped: back off, retry
                receive_errors += 1
                delay = min(RECEIVE_RETRY_MAX, 0.5 * 2 ** min(receive_errors, 6))
                log.warning(
                    "receive failed (%s: %s); retrying in %.1fs",
                    type(exc).__name__,
                    redact(str(exc))[:300],
                    delay,
                )
                await self._wait_for(self._slot_freed, delay)
                last_activity = time.monotonic()
                continue
            receive_errors = 0
            if messages:
                last_activity = time.monotonic()
                for message in messages:
                    self._start(message)
            elif self._running:
                last_activity = time.monotonic()
            elif policy.idle_timeout and time.monotonic() - last_activity >= policy.idle_timeout:
                return "idle timeout"

    async def _gather_free_slots(self) -> int:
        """With tasks running and few slots free, wait up to ``RECEIVE_LINGER_SECONDS``
        for half the slots to free up, so one receive fetches a batch: a broker round
        trip (notably on Storage Queue) costs more than a short task."""
        deadline = time.monotonic() + RECEIVE_LINGER_SECONDS
        half = (self.policy.slots + 1) // 2
        while self._signal is None:
            free = self._free_slots()
            left = deadline - time.monotonic()
            if free >= half or left <= 0 or not self._running:
                return free
            self._slot_freed.clear()
            await self._wait_for(self._slot_freed, left)
        return self._free_slots()

    def _free_slots(self) -> int:
        """Slots minus running tasks, minus settles in flight beyond ``slots``."""
        settling = sum(1 for running in self._running if running.settling)
        tasks = len(self._running) - settling
        return self.policy.slots - tasks - max(0, settling - self.policy.slots)

    def _receive_wait(self, last_activity: float) -> float:
        """How long one receive may wait.  With an idle timeout, never longer than
        it: a receive issued while the last tasks run (or settle) would otherwise
        keep polling an empty queue after they end and overshoot ``--idle-timeout``
        by up to ``RECEIVE_WAIT_SECONDS``.  With nothing executing, at most the idle
        time left."""
        wait = RECEIVE_WAIT_SECONDS
        if self.policy.idle_timeout:
            wait = min(wait, self.policy.idle_timeout)
            if all(running.settling for running in self._running):
                left = self.policy.idle_timeout - (time.monotonic() - last_activity)
                wait = min(wait, max(left, 0.0))
        return wait

    async def _wait_for(self, event: asyncio.Event, timeout: float) -> None:
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _start(self, message: ReceivedMessage) -> None:
        self._taken += 1
        running = _Running(message)
        running.handler = asyncio.ensure_future(self._handle(running))
        self._running.add(running)

        def done(_: object) -> None:
            self._running.discard(running)
            self._slot_freed.set()

        running.handler.add_done_callback(done)

    # ------------------------------------------------------------------ one message

    async def _handle(self, running: _Running) -> None:
        message = running.message
        try:
            task = Task.from_body(message.body)
        except MalformedTaskError as exc:
            log.error("message %s is not a task (%s): dead-lettering it", message.message_id, exc)
            self.stats.malformed += 1
            self.hooks.malformed(message, str(exc))
            self._task_over(running)
            await self._settle("dead_letter", message, "MalformedTask", str(exc))
            return
        if message.delivery_count > task.max_attempts:
            # Earlier deliveries never settled: their worker died or lost the lock.
            self.stats.dead_lettered += 1
            self._task_over(running)
            why = (
                f"delivered {message.delivery_count} times, {task.max_attempts} attempts "
                "allowed; earlier attempts did not finish (worker killed or lock lost)"
            )
            self.hooks.task_finished(
                TaskRun(task, message, message.delivery_count),
                TaskOutcome(DEAD_LETTERED, 0.0, reason="MaxAttemptsExceeded", summary=why),
            )
            await self._settle("dead_letter", message, "MaxAttemptsExceeded", why)
            return
        log.info("task %s: attempt %d of %d", task.id, message.delivery_count, task.max_attempts)
        started = time.monotonic()
        run = TaskRun(task, message, message.delivery_count)
        self.hooks.task_started(run)
        # The processor's asyncio task copies the context: it sees its own TaskContext.
        with task_context(TaskContext(task.id, attempt=message.delivery_count)):
            running.work = asyncio.ensure_future(self.processor(task))
        keeper = asyncio.ensure_future(self._keep_locked(running))
        try:
            await asyncio.wait([running.work])
        finally:
            keeper.cancel()
        self._task_over(running)
        await self._settle_outcome(running, run, time.monotonic() - started)

    def _task_over(self, running: _Running) -> None:
        """Free the slot for the next message while this one is settled."""
        running.settling = True
        self._slot_freed.set()

    async def _settle_outcome(self, running: _Running, run: TaskRun, seconds: float) -> None:
        message, work, task = running.message, running.work, run.task
        assert work is not None
        if running.lock_lost:
            self.stats.lost_locks += 1
            self.hooks.task_finished(run, TaskOutcome(LOCK_LOST, seconds, reason="LockLost"))
            log.warning(
                "task %s: lock lost, task cancelled; the message is left to its new owner", task.id
            )
            return
        if work.cancelled():
            self.stats.interrupted += 1
            self.hooks.task_finished(run, TaskOutcome(INTERRUPTED, seconds, reason="Shutdown"))
            log.warning("task %s: interrupted by shutdown; abandoning it for redelivery", task.id)
            await self._settle("abandon", message)
            return
        error = work.exception()
        if error is None:
            self.stats.succeeded += 1
            self.stats.consecutive_failures = 0
            log.info("task %s: succeeded in %.2fs", task.id, seconds)
            if self.hooks:
                self.hooks.task_finished(run, TaskOutcome(SUCCEEDED, seconds, result=work.result()))
            await self._settle("complete", message)
            return
        failure = (
            error if isinstance(error, TaskFailed) else TaskFailed(type(error).__name__, str(error))
        )
        self.stats.failed += 1
        self.stats.consecutive_failures += 1
        final = message.delivery_count >= task.max_attempts
        if self.hooks:
            self.hooks.task_finished(
                run,
                TaskOutcome(
                    DEAD_LETTERED if final else FAILED,
                    seconds,
                    reason=failure.reason,
                    summary=redact(failure.description),
                    exit_code=failure.exit_code,
                ),
            )
        if final:
            self.stats.dead_lettered += 1
            log.error(
                "task %s: failed (%s), attempt %d of %d: dead-lettering",
                task.id,
                failure.description.splitlines()[0] if failure.description else failure.reason,
                message.delivery_count,
                task.max_attempts,
            )
            await self._settle("dead_letter", message, failure.reason, failure.description)
        else:
            log.warning(
                "task %s: failed (%s), attempt %d of %d: will retry",
                task.id,
                failure.reason,
                message.delivery_count,
                task.max_attempts,
            )
            await self._settle("abandon", message)

    async def _keep_locked(self, running: _Running) -> None:
        """Renew the lock until the work ends; if the lock is lost, cancel the work."""
        message, work = running.message, running.work
        assert work is not None
        while not work.done():
            await asyncio.sleep(self.backend.lock_renew_interval(message))
            if work.done():
                return
            try:
                await self.backend.renew(message)
            except LockLostError:
                running.lock_lost = True
            except Exception as exc:  # transient: keep trying while the lock may still hold
                log.warning("task %s: lock renewal failed (%s); retrying", message.message_id, exc)
                if message.locked_until is not None and message.locked_until <= time.time():
                    running.lock_lost = True
            if running.lock_lost:
                work.cancel()
                return

    async def _settle(self, action: str, message: ReceivedMessage, *args: str) -> None:
        """Settle, tolerating a lost lock or a broker hiccup: the broker will
        redeliver an unsettled message, which is the safe direction."""
        try:
            await getattr(self.backend, action)(message, *args)
        except LockLostError:
            log.warning(
                "message %s: lock lost before %s; it will be redelivered",
                message.message_id,
                action,
            )
        except Exception as exc:  # any backend failure: never let one message kill the worker
            log.error(
                "message %s: %s failed (%s: %s); it will be redelivered when its lock expires",
                message.message_id,
                action,
                type(exc).__name__,
                redact(str(exc))[:300],
            )

    # ------------------------------------------------------------------ shutdown

    def _on_signal(self, signum: int) -> None:
        if self._signal is None:
            self._signal = signum
            log.warning(
                "received %s: no new tasks; running tasks get %.0fs to finish",
                signal.Signals(signum).name,
                self.policy.grace_period,
            )
        else:
            log.warning("second signal: cancelling running tasks now")
            self._cancel_running()
        self._slot_freed.set()

    async def _finish_running(self) -> None:
        if not self._running:
            return
        handlers = [r.handler for r in self._running]
        timeout = self.policy.grace_period if self._signal is not None else None
        done, pending = await asyncio.wait(handlers, timeout=timeout)
        if pending:
            log.warning("grace period over: cancelling %d running task(s)", len(pending))
            self._cancel_running()
            await asyncio.wait(pending)

    def _cancel_running(self) -> None:
        for running in list(self._running):
            if running.work is not None and not running.work.done():
                running.work.cancel()

    def _exit_code(self) -> int:
        if self._signal is not None:
            return 128 + self._signal
        if self.stats.stop_reason == "too many consecutive failures":
            return ExitCode.TOO_MANY_FAILURES
        if self.policy.max_tasks == 1 and self.stats.failed + self.stats.malformed > 0:
            return ExitCode.TASK_FAILED
        return ExitCode.OK


async def run_worker(backend: Backend, processor: Processor, policy: WorkerPolicy) -> WorkerStats:
    return await Worker(backend, processor, policy).run()
