"""The worker loop: receive, run, settle -- readable top to bottom.

For each message the worker holds a lock (peek-lock, lease or visibility
timeout) and renews it while the task runs.  Outcomes:

* success -> complete;
* failure with attempts left -> put back *delayed* by the retry policy
  (:mod:`.retry`), with the attempt counted in the envelope (:mod:`.attempts`);
* failure on the last attempt, or a permanent error -> dead-letter with the reason
  and description (exit code and stderr tail, redacted);
* a message that is not a task -> dead-letter ``MalformedTask``, keep going;
* lock lost -> cancel the task and leave the message alone: another worker owns it;
* interruption (SIGTERM/SIGINT after the grace period, a preemption notice from
  :mod:`.preemption`, a delivery that never settled) -> put back at once, counted as
  an interruption, not an attempt; past ``max_interruptions`` -> dead-letter
  ``TooManyInterruptions``.

A slot is a running *task*: when a task ends its slot takes the next message
while the settle (a broker round trip) is still in flight, so short tasks do not
leave slots idle waiting on the broker.  At most ``max(slots,
SETTLES_IN_FLIGHT)`` settles may be in flight beyond that (a broker may hold
completions a moment to commit them together); past it, slots wait.  Shutdown
waits for every settle.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence

from ..backends.base import (
    Backend,
    ConnectionFailedError,
    CredentialsRefusedError,
    LockLostError,
    PermanentBackendError,
    QueueUnavailableError,
    ReceivedMessage,
)
from ..redact import redact
from ..task import MalformedTaskError, Task
from .attempts import RunCounters, next_copy
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
from .lookahead import WAIT_LIMIT_SECONDS, LookAhead
from .preemption import EvictionNotice, PreemptionWatcher
from .processors import Processor, TaskFailed, install_signal_handlers
from .running import Running
from .settings import ExitCode, WorkerPolicy, WorkerStats  # noqa: F401 - re-exported
from .stopping import Stopping
from .sync_calls import Admission, NotStarted, current_admission
from .wakeup import Wakeup

log = logging.getLogger("ai4s_jobq.worker")

RECEIVE_WAIT_SECONDS = 1.0
RECEIVE_RETRY_MAX = 30.0
RECEIVE_LINGER_SECONDS = 0.05
#: After a delayed retry comes due, how long an idle worker still waits for it at least
#: (whole-second visibility timeouts, a poll back-off in between).
RETRY_SLACK = 3.0
#: Settles that may be in flight beyond the running tasks (at least; ``slots`` if more).
SETTLES_IN_FLIGHT = 64


class Worker(Stopping):
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
        self._running: set[Running] = set()
        self._slot_freed = Wakeup()
        self._settling = 0  # handlers whose task is over, settling its message
        self._signal: int | None = None
        self._stop: str | None = None  # why intake stopped early (signal, preemption)
        self._kill_at: float | None = None  # when running tasks are cancelled
        self._notice: EvictionNotice | None = None
        self._delayed_until = 0.0  # monotonic time the last retry delayed here comes due
        self._taken = 0
        self._look_ahead = LookAhead(
            self.policy.slots, stop_after_failures=bool(self.policy.max_consecutive_failures)
        )

    # ------------------------------------------------------------------ main loop

    async def run(self) -> WorkerStats:
        restore = install_signal_handlers(asyncio.get_running_loop(), self._on_signal)
        watcher = PreemptionWatcher(self.policy.preemption, self._on_preemption)
        await self.hooks.start(self.identity)
        try:
            await watcher.start()
            self.stats.stop_reason = await self._receive_loop()
            if self.stats.stop_reason not in ("task limit", "idle timeout"):
                self._withdraw_waiting()
            await self._finish_running()
            await watcher.acknowledge()
        finally:
            await watcher.stop()
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
            if self._stop is not None:
                return self._stop
            if policy.time_limit is not None and time.monotonic() - started >= policy.time_limit:
                return "time limit"
            if policy.max_tasks is not None and self._taken >= policy.max_tasks:
                return "task limit"
            if self._too_many_failures():
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
                if _stops_the_worker(exc):  # retrying cannot help: say why, exit code 4
                    log.error("cannot receive: %s", redact(str(exc)))
                    self.stats.exit_code = ExitCode.CONFIGURATION
                    return "configuration error"
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
                if not await self._retries_pending():
                    return "idle timeout"
                last_activity = time.monotonic() - policy.idle_timeout + RECEIVE_WAIT_SECONDS

    async def _retries_pending(self) -> bool:
        """Whether delayed retries will still come due: ours (every broker), or any
        scheduled message where the broker counts them (Service Bus, local) -- not for
        ``jobq pull``, which waits ``--wait`` for one task and no longer."""
        if self.policy.max_tasks is not None:
            return False
        if time.monotonic() < self._delayed_until + max(self.policy.idle_timeout, RETRY_SLACK):
            return True  # the idle time counts from when our last retry comes due
        try:
            scheduled = (await self.backend.counts()).scheduled
        except Exception as exc:  # e.g. a Listen-only key cannot read counts
            log.debug("cannot read scheduled count: %s", redact(str(exc))[:200])
            return False
        return bool(scheduled)

    async def _gather_free_slots(self) -> int:
        """With tasks running and few slots free, wait up to ``RECEIVE_LINGER_SECONDS``
        for half the slots to free up, so one receive fetches a batch: a broker round
        trip (notably on Storage Queue) costs more than a short task."""
        deadline = time.monotonic() + RECEIVE_LINGER_SECONDS
        half = (self.policy.slots + 1) // 2
        while self._stop is None:
            free = self._free_slots()
            left = deadline - time.monotonic()
            if free >= half or left <= 0 or not self._running:
                return free
            self._slot_freed.clear()
            await self._wait_for(self._slot_freed, left)
        return self._free_slots()

    def _free_slots(self) -> int:
        """Slots minus running tasks, minus settles in flight beyond the allowance."""
        settling = self._settling
        tasks = len(self._running) - settling
        allowed = max(self.policy.slots, SETTLES_IN_FLIGHT)
        capacity = self.policy.slots + self._look_ahead.extra_slots()
        return capacity - tasks - max(0, settling - allowed)

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

    async def _wait_for(self, event: Wakeup, timeout: float) -> None:
        await event.wait(timeout)

    def _start(self, message: ReceivedMessage) -> None:
        self._taken += 1
        running = Running(message)
        running.handler = asyncio.ensure_future(self._handle(running))
        self._running.add(running)

        def done(_: object) -> None:
            self._running.discard(running)
            if running.settling:
                self._settling -= 1
            self._slot_freed.set()

        running.handler.add_done_callback(done)

    # ------------------------------------------------------------------ one message

    async def _handle(self, running: Running) -> None:
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
        counters = RunCounters.of(task)
        lost = counters.lost_deliveries(message.delivery_count)
        if lost or counters.attempt > task.max_attempts:
            self._task_over(running)
            await self._put_back_unrun(message, task, counters, lost)
            return
        context = TaskContext(task.id, counters.attempt, counters.interruptions)
        running.context = context
        # The lock keeper starts only once the task has run for a renew interval.
        timer = asyncio.get_running_loop().call_later(
            self.backend.lock_renew_interval(message), self._start_keeper, running
        )
        lane = self._look_ahead.lane_for(self.processor)
        attempt = TaskRun(task, message, counters.attempt)
        # In this task's own context, which the processor's call copies: a hook's
        # context variables (telemetry's current span) reach the task's code.
        self.hooks.task_entered(attempt)
        try:
            if lane is None:
                self._begin(running, attempt, counters, time.time())
                await self._run_processor(running, task, context)
            else:  # the call may wait in the lane; _begin runs when it really starts
                begin = functools.partial(self._begin, running, attempt, counters)
                token = current_admission.set(Admission(lane, begin, WAIT_LIMIT_SECONDS))
                try:
                    await self._run_processor(running, task, context)
                finally:
                    current_admission.reset(token)
        finally:
            timer.cancel()
            if running.keeper is not None:
                running.keeper.cancel()
        self._task_over(running)
        run = running.run
        if run is None and not running.cancelled and not isinstance(running.error, NotStarted):
            # A processor that said it reports its start but ran without doing so.
            self._begin(running, attempt, counters, time.time())
            run = running.run
        if run is None:
            if isinstance(running.error, NotStarted):
                self._look_ahead.waited_too_long()
            await self._put_back_unstarted(running, task, counters)
            return
        seconds = time.monotonic() - running.began
        if lane is not None:
            self._look_ahead.ran(seconds)
        await self._settle_outcome(running, run, counters, seconds)
        if lane is not None and lane.held:  # a failure: go on, unless that was the limit
            if self._too_many_failures():
                self._withdraw_waiting()
            else:
                lane.resume()

    def _too_many_failures(self) -> bool:
        limit = self.policy.max_consecutive_failures
        return limit is not None and limit > 0 and self.stats.consecutive_failures >= limit

    def _begin(self, running: Running, run: TaskRun, counters: RunCounters, at: float) -> None:
        """The attempt starts (``at``, wall clock): tell the hooks (first: a hook may
        tag the attempt's log records) and log it."""
        running.began = time.monotonic()
        run.started_at = at
        running.run = run
        self.hooks.task_started(run)
        log.info(
            "task %s: attempt %d of %d%s",
            run.task.id,
            counters.attempt,
            run.task.max_attempts,
            f" ({counters.interruptions} interruptions)" if counters.interruptions else "",
        )

    async def _put_back_unstarted(
        self, running: Running, task: Task, counters: RunCounters
    ) -> None:
        """A looked-ahead message that never began (the worker is stopping, or it
        waited too long behind a long task): back to the queue with its counters
        unchanged -- neither an attempt nor an interruption."""
        if running.lock_lost:
            return  # the message is another worker's now
        log.debug("task %s: never started here; putting it back unchanged", task.id)
        await self._reschedule(running.message, task, counters, 0.0)

    async def _put_back_unrun(
        self, message: ReceivedMessage, task: Task, counters: RunCounters, lost: int
    ) -> None:
        """A message with deliveries that never settled (its worker died or lost the
        lock): count them as interruptions and put it back at once, unrun -- which also
        completes a reschedule that a dying worker left half done (see
        :mod:`.attempts`)."""
        if counters.attempt > task.max_attempts:
            why = f"{counters.attempt - 1} failed attempts, {task.max_attempts} allowed"
            await self._dead_letter_unrun(message, task, counters, "MaxAttemptsExceeded", why)
            return
        log.warning(
            "task %s: %d earlier deliveries never finished (worker lost); counted as interruptions",
            task.id,
            lost,
        )
        await self._interrupted(message, task, counters.interrupted(lost), "WorkerLost")

    async def _dead_letter_unrun(
        self, message: ReceivedMessage, task: Task, counters: RunCounters, reason: str, why: str
    ) -> None:
        """Dead-letter a task that will not run again, telling the hooks (the ledger
        records it as dead-lettered rather than leaving it running or interrupted)."""
        self.stats.dead_lettered += 1
        run = TaskRun(task, message, counters.attempt)
        self.hooks.task_finished(run, TaskOutcome(DEAD_LETTERED, 0.0, reason=reason, summary=why))
        await self._settle("dead_letter", message, reason, why)

    async def _run_processor(self, running: Running, task: Task, context: TaskContext) -> None:
        """Run the processor in this handler, with ``context`` current (asyncio tasks
        and threads it starts see it); record its result, error or cancellation."""
        running.working = True
        try:
            with task_context(context):
                running.result = await self.processor(task)
        except asyncio.CancelledError:
            cancelling = getattr(running.handler, "cancelling", None)  # Python >= 3.11
            if not running.cancelled and (cancelling is None or cancelling()):
                raise  # not the loop's doing: the worker is being torn down
            running.cancelled = True  # (or the processor raised CancelledError itself)
            if cancelling is not None:
                uncancel = running.handler.uncancel  # type: ignore[attr-defined]
                while cancelling():
                    uncancel()
        except BaseException as exc:  # a processor's failure (TaskFailed or not)
            running.error = exc
        finally:
            running.working = False

    def _task_over(self, running: Running) -> None:
        """Free the slot for the next message while this one is settled."""
        running.settling = True
        self._settling += 1
        self._slot_freed.set()

    async def _settle_outcome(
        self, running: Running, run: TaskRun, counters: RunCounters, seconds: float
    ) -> None:
        message, task = running.message, run.task
        if running.lock_lost:
            self.stats.lost_locks += 1
            self.hooks.task_finished(run, TaskOutcome(LOCK_LOST, seconds, reason="LockLost"))
            log.warning(
                "task %s: lock lost, task cancelled; the message is left to its new owner", task.id
            )
            return
        if running.cancelled:
            reason = running.interrupted or "Shutdown"
            self.hooks.task_finished(run, TaskOutcome(INTERRUPTED, seconds, reason=reason))
            await self._interrupted(message, task, counters.interrupted(), reason)
            return
        error = running.error
        if error is None:
            self.stats.succeeded += 1
            self.stats.consecutive_failures = 0
            log.info("task %s: succeeded in %.2fs", task.id, seconds)
            if self.hooks:
                self.hooks.task_finished(
                    run, TaskOutcome(SUCCEEDED, seconds, result=running.result)
                )
            await self._settle("complete", message)
            return
        failure = (
            error if isinstance(error, TaskFailed) else TaskFailed(type(error).__name__, str(error))
        )
        description = redact(failure.description)
        permanent = getattr(failure, "permanent", False)
        self.stats.failed += 1
        self.stats.consecutive_failures += 1
        final = permanent or counters.attempt >= task.max_attempts
        if self.hooks:
            self.hooks.task_finished(
                run,
                TaskOutcome(
                    DEAD_LETTERED if final else FAILED,
                    seconds,
                    reason=failure.reason,
                    summary=description,
                    exit_code=failure.exit_code,
                ),
            )
        if final:
            self.stats.dead_lettered += 1
            log.error(
                "task %s: failed (%s), attempt %d of %d: dead-lettering%s",
                task.id,
                description.splitlines()[0] if description else failure.reason,
                counters.attempt,
                task.max_attempts,
                " (permanent error: no retry)" if permanent else "",
            )
            await self._settle("dead_letter", message, failure.reason, description)
            return
        delay = self.policy.retry_delay.seconds(counters.attempt)
        log.warning(
            "task %s: failed (%s), attempt %d of %d: retrying in %.1fs",
            task.id,
            failure.reason,
            counters.attempt,
            task.max_attempts,
            delay,
        )
        await self._reschedule(message, task, counters.failed(), delay)

    async def _interrupted(
        self, message: ReceivedMessage, task: Task, counters: RunCounters, reason: str
    ) -> None:
        """Put an interrupted task back at once without using an attempt, or dead-letter
        it once it has been interrupted more than ``max_interruptions`` times."""
        self.stats.interrupted += 1
        if counters.interruptions > self.policy.max_interruptions:
            why = (
                f"interrupted {counters.interruptions} times (last: {reason}); "
                f"--max-interruptions is {self.policy.max_interruptions}"
            )
            log.error("task %s: %s: dead-lettering", task.id, why)
            await self._dead_letter_unrun(message, task, counters, "TooManyInterruptions", why)
            return
        log.warning(
            "task %s: interrupted (%s); putting it back at once (attempt %d kept, interruption %d)",
            task.id,
            reason,
            counters.attempt,
            counters.interruptions,
        )
        await self._reschedule(message, task, counters, 0.0)

    async def _reschedule(
        self, message: ReceivedMessage, task: Task, counters: RunCounters, delay: float
    ) -> None:
        copy = next_copy(
            task,
            counters,
            message.message_id,
            message.delivery_count,
            in_place=self.backend.reschedules_in_place,
        )
        if delay > 0:
            self.stats.rescheduled += 1
            self._delayed_until = max(self._delayed_until, time.monotonic() + delay)
        await self._settle("reschedule", message, copy.message_id, copy.body, delay)

    def _start_keeper(self, running: Running) -> None:
        if running.working:
            running.keeper = asyncio.ensure_future(self._keep_locked(running))

    async def _keep_locked(self, running: Running) -> None:
        """Renew the lock (the first renew interval has passed) until the work ends;
        if the lock is lost, cancel the work."""
        message = running.message
        while running.working:
            try:
                await self.backend.renew(message)
            except LockLostError:
                running.lock_lost = True
            except Exception as exc:  # transient: keep trying while the lock may still hold
                log.warning("task %s: lock renewal failed (%s); retrying", message.message_id, exc)
                if message.locked_until is not None and message.locked_until <= time.time():
                    running.lock_lost = True
            if running.lock_lost:
                running.stop()
                return
            await asyncio.sleep(self.backend.lock_renew_interval(message))

    async def _settle(self, action: str, message: ReceivedMessage, *args: object) -> None:
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


async def run_worker(backend: Backend, processor: Processor, policy: WorkerPolicy) -> WorkerStats:
    return await Worker(backend, processor, policy).run()


def _stops_the_worker(exc: BaseException) -> bool:
    """Receive errors that retrying cannot fix: refused credentials, a missing queue, a
    damaged queue file.  An unreachable broker is retried (it may be a network blip)."""
    if isinstance(exc, (CredentialsRefusedError, PermanentBackendError)):
        return True
    return isinstance(exc, QueueUnavailableError) and not isinstance(exc, ConnectionFailedError)
