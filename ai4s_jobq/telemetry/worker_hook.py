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

Why the counts are plain integers behind observable (asynchronous) instruments:
a synchronous counter ``add`` through the SDK costs several microseconds (attribute
hashing, locks, exemplars), times six per task; incrementing an ``int`` costs
nothing, and the reader collects the totals at export time.  For the same reason,
when the providers are the ones ``jobq`` installed (:mod:`._sdk`), the span is a
:class:`~.task_span.TaskSpan` and the duration goes to a
:class:`~.durations.TaskDurations` series instead of the SDK's span and histogram,
which cost more than a no-op task between them; with providers a program
configured itself, the hook uses the SDK's.  Measured in
``bench/bench_telemetry.py``, see docs/monitoring.md.

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
import math
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
from .fast_context import span_setter
from .logs import LOGGED_TASK, reset_log_task, set_worker_id
from .push import messaging_attributes

if TYPE_CHECKING:
    from ..backends.base import Backend, QueueCounts, ReceivedMessage

log = logging.getLogger("ai4s_jobq.telemetry")

DEPTH_INTERVAL_ENV = "JOBQ_TELEMETRY_DEPTH_INTERVAL"
DEFAULT_DEPTH_INTERVAL = 30.0
#: depth samples are broker calls: not more often than this (a tiny value would make
#: the sampler a busy loop), nor less often than once a day
MIN_DEPTH_INTERVAL, MAX_DEPTH_INTERVAL = 0.5, 86_400.0
FIRST_SAMPLE_TIMEOUT = 5.0
_RUN_KEY = "telemetry"
_STARTED = "started"
_MALFORMED = "malformed"

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
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if seconds == 0 or MIN_DEPTH_INTERVAL <= seconds <= MAX_DEPTH_INTERVAL:  # 0: never
        return seconds
    log.warning(
        "%s=%r is not 0 (never) or %g to %g seconds; using %g",
        DEPTH_INTERVAL_ENV,
        value,
        MIN_DEPTH_INTERVAL,
        MAX_DEPTH_INTERVAL,
        DEFAULT_DEPTH_INTERVAL,
    )
    return DEFAULT_DEPTH_INTERVAL


class TelemetryHook(WorkerHook):
    """Traces, metrics and log tags for one worker.  ``backend`` (optional) is read
    for the queue depth every ``depth_interval`` seconds (0 = never).  The spans and
    metrics go to the global providers unless ``tracer_provider`` / ``meter_provider``
    are given (as OpenTelemetry instrumentations accept them)."""

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        depth_interval: float | None = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
    ):
        self.backend = backend
        self.tracer_provider = tracer_provider  # None: the global ones
        self.meter_provider = meter_provider
        self.depth_interval = (
            depth_interval_from_env() if depth_interval is None else depth_interval
        )
        self.depth: QueueCounts | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._main_task: asyncio.Task[Any] | None = None
        self._depth_warned = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self, worker: WorkerIdentity) -> None:
        from opentelemetry import context as otel_context
        from opentelemetry import metrics, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        from .. import __version__

        # Bound once here: the per-task methods below run on the worker's hot path.
        self._attach, self._detach = otel_context.attach, otel_context.detach
        self._empty_context = otel_context.Context()
        self._context_type = otel_context.Context
        self._span_setter = span_setter()  # None: through the API (see .fast_context)
        self._set_span_in_context = trace.set_span_in_context
        self._consumer, self._status, self._error = SpanKind.CONSUMER, Status, StatusCode.ERROR
        self.identity = worker
        self._main_task = asyncio.current_task()
        set_worker_id(worker.worker_id)
        self.tracer = trace.get_tracer(
            names.INSTRUMENTATION_SCOPE, __version__, tracer_provider=self.tracer_provider
        )
        # jobq's own provider makes light task spans (see .task_span); others, SDK ones.
        task_spans = getattr(
            self.tracer_provider or trace.get_tracer_provider(), "task_spans", None
        )
        self._task_spans = (
            task_spans(names.INSTRUMENTATION_SCOPE, __version__) if callable(task_spans) else None
        )
        self._task_span_type: type | None = None
        if self._task_spans is not None:  # (the SDK is there: jobq's provider is one)
            from .task_span import TaskSpan

            self._task_span_type = TaskSpan
        meter = metrics.get_meter(
            names.INSTRUMENTATION_SCOPE, __version__, meter_provider=self.meter_provider
        )
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
        }
        self._duration_attributes = {
            kind: {**self.attributes, names.TASK_OUTCOME: kind} for kind in _OUTCOME_COUNTERS
        }
        # Counts are plain integers read by asynchronous (observable) instruments at
        # export time: a counter ``add`` through the SDK costs more than a no-op task.
        self.counts: dict[str, int] = dict.fromkeys([*_OUTCOME_COUNTERS, _STARTED, _MALFORMED], 0)
        self.busy = 0
        meter.create_observable_counter(
            names.TASKS_STARTED,
            callbacks=[self._observer(_STARTED)],
            unit="{task}",
            description="Task attempts started",
        )
        for kind, (name, text) in _OUTCOME_COUNTERS.items():
            meter.create_observable_counter(
                name, callbacks=[self._observer(kind)], unit="{task}", description=text
            )
        self._duration_series: dict[str, Any] | None = None
        self._record_duration = self._duration_recorder(meter)
        meter.create_observable_gauge(
            names.SLOTS_BUSY,
            callbacks=[lambda _: [self._observation(self.busy, self.attributes)]],
            unit="{slot}",
            description="Slots running a task",
        )
        meter.create_observable_gauge(
            names.SLOTS_TOTAL,
            callbacks=[lambda _: [self._observation(worker.slots, self.attributes)]],
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

    def _duration_recorder(self, meter: Any) -> Any:
        """``record(seconds, outcome)``: into jobq's own histogram series when the
        meter provider has them (see .durations), else into an SDK histogram."""
        from opentelemetry import metrics

        provider = self.meter_provider or metrics.get_meter_provider()
        durations = getattr(provider, "task_durations", None)
        by_kind = self._duration_attributes
        if durations is not None:
            series = {kind: durations.series(attributes) for kind, attributes in by_kind.items()}
            self._duration_series = series  # task_finished records into these itself

            def record(value: float, kind: str) -> None:
                found = series.get(kind)
                if found is None:
                    found = series[kind] = durations.series(
                        {**self.attributes, names.TASK_OUTCOME: kind}
                    )
                found.record(value)

            return record
        histogram = meter.create_histogram(
            names.TASK_DURATION, unit="s", description=names.TASK_DURATION_DESCRIPTION
        )

        def record_in_sdk(value: float, kind: str) -> None:
            attributes = by_kind.get(kind)
            if attributes is None:
                attributes = {**self.attributes, names.TASK_OUTCOME: kind}
            histogram.record(value, attributes)

        return record_in_sdk

    def _observation(self, value: float, attributes: dict[str, Any]) -> Any:
        from opentelemetry.metrics import Observation

        return Observation(value, attributes)

    def _observer(self, kind: str) -> Any:
        def observe(_: Any) -> list[Any]:
            observations = [self._observation(self.counts[kind], self.attributes)]
            if kind == DEAD_LETTERED and self.counts[_MALFORMED]:  # not a task: dead-lettered
                observations.append(
                    self._observation(
                        self.counts[_MALFORMED],
                        {**self.attributes, names.ERROR_TYPE: "MalformedTask"},
                    )
                )
            return observations

        return observe

    async def stop(self, worker: WorkerIdentity, stats: Any) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None

    # ------------------------------------------------------------------ per attempt

    def task_entered(self, run: TaskRun) -> None:
        """The span starts and becomes current in the attempt's own context, which
        the task's code runs in (see ``WorkerHook.task_entered``)."""
        task = run.task
        parent = extract_context(task.extra) if task.extra else None
        attributes: dict[str, Any] = {
            names.MESSAGING_MESSAGE_ID: run.message.message_id,  # differs once requeued
            names.TASK_ID: task.id,
            names.TASK_ATTEMPT: run.attempt,
        }
        # An explicit empty context: a task pushed without one is a root span,
        # never a child of whatever the worker process happens to be inside.
        parent_context = parent if parent is not None else self._empty_context
        start_time = int(run.started_at * 1e9)
        span = None
        if self._task_spans is not None:
            span = self._task_spans.start(
                self.span_name,
                parent_context,
                self._consumer,
                self.span_attributes,
                attributes,
                start_time,
            )
        if span is None:
            span = self.tracer.start_span(
                self.span_name,
                context=parent_context,
                kind=self._consumer,
                attributes={**self.span_attributes, **attributes},
                start_time=start_time,
            )
        setter = self._span_setter
        if setter is not None:  # what attach(set_span_in_context(span)) does, inline
            variable, key = setter
            current = variable.get()
            values = {**current, key: span} if current else {key: span}
            token = variable.set(self._context_type(values))
        else:
            token = self._attach(self._set_span_in_context(span))
        log_token = LOGGED_TASK.set((task.id, run.attempt))
        run.context[_RUN_KEY] = (span, token, log_token, asyncio.current_task())

    def task_started(self, run: TaskRun) -> None:
        state = run.context.get(_RUN_KEY)
        if state is None:  # a caller that does not enter the attempt first
            self.task_entered(run)
        else:
            span: Any = state[0]
            own = type(span) is self._task_span_type
            if own:  # the true start: a looked-ahead sync call begins after it was entered
                span._start_time = int(run.started_at * 1e9)
        self.counts[_STARTED] += 1
        self.busy += 1

    def task_finished(self, run: TaskRun, outcome: TaskOutcome) -> None:
        state = run.context.pop(_RUN_KEY, None)
        if state is None:
            return
        span, token, log_token, started_in = state
        kind = outcome.kind
        # A task span takes the worker's own (valid) attributes without checks.
        own = type(span) is self._task_span_type
        set_attribute = span.set_known_attribute if own else span.set_attribute
        set_attribute(names.TASK_OUTCOME, kind)
        if outcome.exit_code is not None:
            set_attribute(names.EXIT_CODE, outcome.exit_code)
        if outcome.reason is not None:
            set_attribute(names.ERROR_TYPE, outcome.reason)
        if kind == FAILED or kind == DEAD_LETTERED:
            span.set_status(self._status(self._error, outcome.reason or kind))
        span.end()
        if started_in is self._main_task and started_in is asyncio.current_task():
            self._detach(token)
            reset_log_task(log_token)
        if kind in self.counts:
            self.counts[kind] += 1
        self.busy -= 1
        found = self._duration_series.get(kind) if self._duration_series is not None else None
        if found is not None:
            found.record(outcome.duration)
        else:
            self._record_duration(outcome.duration, kind)

    def malformed(self, message: ReceivedMessage, reason: str) -> None:
        self.counts[_MALFORMED] += 1

    # ------------------------------------------------------------------ gauges

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
