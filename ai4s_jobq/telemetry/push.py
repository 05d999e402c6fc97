"""The producer side: a span per pushed batch, the trace context into each envelope.

``JobQ.push``/``push_many`` ask :func:`push_telemetry` once per call; it returns None
(and the push path is the one it always was) unless OpenTelemetry is configured.
Otherwise each batch handed to the backend runs inside a ``send <queue>`` span
(kind PRODUCER, messaging conventions), every task of the batch carries that span's
``traceparent`` in its envelope, so the worker's task span becomes its child however
late it runs, and the pushed / duplicate / failed counts go to counters.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..backends.base import OutgoingMessage, PushOutcome
from . import names
from .context import otel_active

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..task import Task


def push_telemetry(backend: Backend) -> PushTelemetry | None:
    """A :class:`PushTelemetry` for ``backend``, or None when OpenTelemetry is off."""
    if not otel_active():
        return None
    return PushTelemetry(backend)


def messaging_attributes(backend: Backend) -> dict[str, str]:
    """The attributes that say which queue: on every span and metric point."""
    return {
        names.MESSAGING_SYSTEM: names.MESSAGING_SYSTEMS.get(backend.kind, backend.kind),
        names.MESSAGING_DESTINATION: backend.queue_name,
    }


class _Instruments:
    """The push counters, created once per process (the SDK keys them by name)."""

    def __init__(self) -> None:
        from opentelemetry import metrics

        from .. import __version__

        meter = metrics.get_meter(names.INSTRUMENTATION_SCOPE, __version__)
        self.pushed = meter.create_counter(
            names.TASKS_PUSHED, unit="{task}", description="Tasks accepted by the queue"
        )
        self.duplicates = meter.create_counter(
            names.TASKS_DUPLICATES,
            unit="{task}",
            description="Pushed tasks dropped as duplicates of a task already queued",
        )
        self.failures = meter.create_counter(
            names.PUSH_FAILURES, unit="{task}", description="Tasks the queue did not accept"
        )


_instruments: _Instruments | None = None


class PushTelemetry:
    def __init__(self, backend: Backend):
        global _instruments
        from opentelemetry import trace

        from .. import __version__

        self.tracer = trace.get_tracer(names.INSTRUMENTATION_SCOPE, __version__)
        if _instruments is None:
            _instruments = _Instruments()
        self.instruments = _instruments
        self.attributes = messaging_attributes(backend)
        self.span_name = f"send {backend.queue_name}"

    async def push(
        self,
        send: Callable[[Sequence[OutgoingMessage]], Awaitable[list[PushOutcome]]],
        tasks: Sequence[Task],
    ) -> list[PushOutcome]:
        """``send`` (the backend's push, through the ledger if any) of ``tasks`` inside a
        span whose context each task carries."""
        from opentelemetry.trace import SpanKind, Status, StatusCode

        from .context import current_carrier, with_trace_context

        attributes: dict[str, Any] = {
            **self.attributes,
            names.MESSAGING_OPERATION_NAME: "send",
            names.MESSAGING_OPERATION_TYPE: "send",
            names.MESSAGING_BATCH_COUNT: len(tasks),
        }
        if len(tasks) == 1:
            attributes[names.MESSAGING_MESSAGE_ID] = tasks[0].id
        with self.tracer.start_as_current_span(
            self.span_name, kind=SpanKind.PRODUCER, attributes=attributes
        ) as span:
            carrier = current_carrier()
            # In the envelope for every backend; also as application properties where
            # the broker has them, for tools that read Service Bus headers.
            messages = [
                OutgoingMessage(t.id, with_trace_context(t, carrier).to_body(), carrier)
                for t in tasks
            ]
            try:
                outcomes = await send(messages)
            except Exception:
                self.instruments.failures.add(len(tasks), self.attributes)
                raise  # the span records it
            pushed = sum(1 for o in outcomes if o.error is None and o.duplicate is not True)
            duplicates = sum(1 for o in outcomes if o.error is None and o.duplicate is True)
            failed = [o for o in outcomes if o.error is not None]
            span.set_attributes(
                {
                    names.PUSH_PUSHED: pushed,
                    names.PUSH_DUPLICATES: duplicates,
                    names.PUSH_FAILED: len(failed),
                }
            )
            if failed:
                error_type = type(failed[0].error).__name__
                span.set_attribute(names.ERROR_TYPE, error_type)
                span.set_status(Status(StatusCode.ERROR, f"{len(failed)} task(s) not accepted"))
        if pushed:
            self.instruments.pushed.add(pushed, self.attributes)
        if duplicates:
            self.instruments.duplicates.add(duplicates, self.attributes)
        if failed:
            self.instruments.failures.add(len(failed), self.attributes)
        return outcomes
