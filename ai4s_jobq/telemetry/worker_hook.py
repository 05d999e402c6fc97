"""The consumer side: a span per task attempt, outcome counters, queue depth.

:class:`TelemetryHook` is a :class:`~ai4s_jobq.worker.hooks.WorkerHook`; the worker
CLI adds it only when telemetry is configured, so a worker without telemetry runs
the loop it always ran.  Per attempt it

* starts a ``process <queue>`` span (kind CONSUMER) whose parent is the push span
  named by the envelope's ``traceparent`` (a task pushed without one gets a root
  span), makes it current for the attempt (a Python task's own spans nest under it),
  and ends it with the outcome, exit code and error type;
* counts the attempt and its outcome, records its duration, tracks busy slots;
* tags the attempt's log records with the task ID (see :mod:`.logs`).

The queue depth (active, dead-letter, scheduled) is read with ``backend.counts()``
by a background task every ``depth_interval`` seconds (30 by default; each worker of
a fleet does it, so it is kept rare) and reported by an observable gauge from that
cache: the metric reader's thread never touches the broker.

Why the span's context is left attached when the attempt ends: the loop runs each
message in its own asyncio task, so what ``task_started`` attaches there dies with
that task, and the loop's closing log lines for the attempt (written after
``task_finished``) still carry the task's IDs and trace.  Only when the hook is
called from the worker's main task (never, with today's loop) is it detached.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from ..worker.hooks import (
    DEAD_LETTERED,
    FAILED,
    INTERRUPTED,
    LOCK_LOST,
    SUCCEEDED,
    TaskOutcome,
    TaskRun,
    WorkerHook,
    WorkerIdentity,
)
from . import names
from .context import extract_context
from .logs import log_task, reset_log_task, set_worker_id
from .push import messaging_attributes

if TYPE_CHECKING:
    from ..backends.base import Backend, QueueCounts, ReceivedMessage

log = logging.getLogger("ai4s_jobq.telemetry")

DEPTH_INTERVAL_ENV = "JOBQ_TELEMETRY_DEPTH_INTERVAL"
DEFAULT_DEPTH_INTERVAL = 30.0
FIRST_SAMPLE_TIMEOUT = 5.0
_RUN_KEY = "telemetry"

_OUTCOME_COUNTERS = {
    SUCCEEDED: (names.TASKS_SUCCEEDED, "Attempts that succeeded"),
    FAILED: (names.TASKS_FAILED, "Attempts that failed and will be retried"),
    DEAD_LETTERED: (
        names.TASKS_DEAD_LETTERED,
        "Tasks dead-lettered: last attempt failed, or the message is not a task",
    ),
    INTERRUPTED: (
        names.TASKS_INTERRUPTED,
        "Attempts stopped by shutdown, preemption or a time limit (not failures)",
    ),
    LOCK_LOST: (names.TASKS_LOCK_LOST, "Attempts cancelled because the message's lock was lost"),
}


def depth_interval_from_env() -> float:
    value = os.environ.get(DEPTH_INTERVAL_ENV)
    if not value:
        return DEFAULT_DEPTH_INTERVAL
    try:
        return max(0.0, float(value))
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %.0f", DEPTH_INTERVAL_ENV, value, 30)
        return DEFAULT_DEPTH_INTERVAL


class TelemetryHook(WorkerHook):
    """Traces, metrics and log tags for one worker.  ``backend`` (optional) is read
    for the queue depth every ``depth_interval`` seconds (0 = never)."""

    def __init__(self, backend: Backend | None = None, *, depth_interval: float | None = None):
        self.backend = backend
        self.depth_interval = (
            depth_interval_from_env() if depth_interval is None else depth_interval
        )
        self.depth: QueueCounts | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._main_task: asyncio.Task[Any] | None = None
        self._depth_warned = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self, worker: WorkerIdentity) -> None:
        from opentelemetry import metrics, trace

        from .. import __version__

        self.identity = worker
        self._main_task = asyncio.current_task()
        set_worker_id(worker.worker_id)
        self.tracer = trace.get_tracer(names.INSTRUMENTATION_SCOPE, __version__)
        meter = metrics.get_meter(names.INSTRUMENTATION_SCOPE, __version__)
        self.attributes: dict[str, Any] = (
            messaging_attributes(self.backend)
            if self.backend is not None
            else {names.MESSAGING_DESTINATION: worker.queue}
        )
        queue = self.attributes[names.MESSAGING_DESTINATION]
        self.span_name = f"process {queue}"
        self.span_attributes = {
            **self.attributes,
            names.MESSAGING_OPERATION_NAME: "process",
            names.MESSAGING_OPERATION_TYPE: "process",
            names.WORKER_ID: worker.worker_id,
            names.HOST_NAME: worker.host,
        }
        self.started = meter.create_counter(
            names.TASKS_STARTED, unit="{task}", description="Task attempts started"
        )
        self.outcomes = {
            kind: meter.create_counter(name, unit="{task}", description=text)
            for kind, (name, text) in _OUTCOME_COUNTERS.items()
        }
        self.duration = meter.create_histogram(
            names.TASK_DURATION, unit="s", description="How long task attempts ran"
        )
        self.busy = meter.create_up_down_counter(
            names.SLOTS_BUSY, unit="{slot}", description="Slots running a task"
        )
        meter.create_observable_gauge(
            names.SLOTS_TOTAL,
            callbacks=[self._observe_slots],
            unit="{slot}",
            description="Slots of the worker",
        )
        if self.backend is not None and self.depth_interval > 0:
            meter.create_observable_gauge(
                names.QUEUE_DEPTH,
                callbacks=[self._observe_depth],
                unit="{message}",
                description="Messages in the queue, by state (sampled by workers)",
            )
            try:  # a first value at once, so even a short run reports one
                await asyncio.wait_for(self._sample_depth(), FIRST_SAMPLE_TIMEOUT)
            except asyncio.TimeoutError:
                log.warning("telemetry: reading the queue depth took over %.0fs", 5)
            self._sampler = asyncio.ensure_future(self._sample_depth_forever())

    async def stop(self, worker: WorkerIdentity, stats: Any) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None

    # ------------------------------------------------------------------ per attempt

    def task_started(self, run: TaskRun) -> None:
        from opentelemetry import context as otel_context
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        task = run.task
        parent = extract_context(task.extra)
        attributes = {
            **self.span_attributes,
            names.MESSAGING_MESSAGE_ID: run.message.message_id,
            names.TASK_ID: task.id,
            names.TASK_ATTEMPT: run.attempt,
            names.TASK_MAX_ATTEMPTS: task.max_attempts,
        }
        span = self.tracer.start_span(
            self.span_name,
            # An explicit empty context: a task pushed without one is a root span,
            # never a child of whatever the worker process happens to be inside.
            context=parent if parent is not None else otel_context.Context(),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            start_time=int(run.started_at * 1e9),
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        log_token = log_task(task.id, run.attempt)
        run.context[_RUN_KEY] = (span, token, log_token, asyncio.current_task())
        self.started.add(1, self.attributes)
        self.busy.add(1, self.attributes)

    def task_finished(self, run: TaskRun, outcome: TaskOutcome) -> None:
        from opentelemetry import context as otel_context
        from opentelemetry.trace import Status, StatusCode

        state = run.context.pop(_RUN_KEY, None)
        if state is None:
            return
        span, token, log_token, started_in = state
        span.set_attribute(names.TASK_OUTCOME, outcome.kind)
        if outcome.exit_code is not None:
            span.set_attribute(names.EXIT_CODE, outcome.exit_code)
        if outcome.reason is not None:
            span.set_attribute(names.ERROR_TYPE, outcome.reason)
        if outcome.kind in (FAILED, DEAD_LETTERED):
            span.set_status(Status(StatusCode.ERROR, outcome.reason or outcome.kind))
        span.end()
        if started_in is self._main_task and started_in is asyncio.current_task():
            otel_context.detach(token)
            reset_log_task(log_token)
        attributes = self.attributes
        counter = self.outcomes.get(outcome.kind)
        if counter is not None:
            counter.add(1, attributes)
        self.duration.record(outcome.duration, {**attributes, names.TASK_OUTCOME: outcome.kind})
        self.busy.add(-1, attributes)

    def malformed(self, message: ReceivedMessage, reason: str) -> None:
        self.outcomes[DEAD_LETTERED].add(1, {**self.attributes, names.ERROR_TYPE: "MalformedTask"})

    # ------------------------------------------------------------------ gauges

    def _observe_slots(self, options: Any) -> Any:
        from opentelemetry.metrics import Observation

        return [Observation(self.identity.slots, self.attributes)]

    def _observe_depth(self, options: Any) -> Any:
        from opentelemetry.metrics import Observation

        depth = self.depth
        if depth is None:
            return []
        observations = [
            Observation(depth.active, {**self.attributes, names.QUEUE_STATE: "active"}),
            Observation(depth.dead_letter, {**self.attributes, names.QUEUE_STATE: "dead_letter"}),
        ]
        if depth.scheduled is not None:
            observations.append(
                Observation(depth.scheduled, {**self.attributes, names.QUEUE_STATE: "scheduled"})
            )
        return observations

    async def _sample_depth(self) -> None:
        assert self.backend is not None
        try:
            self.depth = await self.backend.counts()
        except Exception as exc:  # e.g. a Listen-only key cannot read counts
            if not self._depth_warned:
                self._depth_warned = True
                log.warning(
                    "telemetry: cannot read the queue depth (%s); the depth gauge stays empty",
                    type(exc).__name__,
                )

    async def _sample_depth_forever(self) -> None:
        while True:
            await asyncio.sleep(self.depth_interval)
            await self._sample_depth()
