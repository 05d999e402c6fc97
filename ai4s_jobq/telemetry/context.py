"""Is OpenTelemetry on, and the W3C trace context a task carries in its envelope.

Why the ``sys.modules`` test in :func:`otel_active`: when nothing configured
OpenTelemetry, nothing imported it either, and then no provider can be installed;
answering from ``sys.modules`` costs nothing and keeps ``import ai4s_jobq`` from
loading the API just to learn that it is off.  When something did import it (our
:mod:`.setup`, or an application that configures OpenTelemetry itself), the answer
is whether a real (SDK) tracer or meter provider has been installed globally: the
library then takes part in the application's traces without any jobq setting.

A shell task's process gets the task span's context as ``TRACEPARENT`` in its
environment (:func:`child_process_env`).

The trace context travels as the envelope's ``traceparent`` (and ``tracestate``)
extra fields: every backend carries the body, and ``Task.from_body`` keeps unknown
envelope fields in ``Task.extra``.  The task ID hashes only the arguments, so the
context never changes it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .names import TRACEPARENT, TRACESTATE

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from ..task import Task


def otel_active() -> bool:
    """True when an OpenTelemetry SDK tracer or meter provider is installed globally."""
    if "opentelemetry.trace" not in sys.modules and "opentelemetry.metrics" not in sys.modules:
        return False
    from opentelemetry import metrics, trace

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return True
    # The API hands out a private proxy class until a meter provider is set.
    return type(metrics.get_meter_provider()).__name__ != "_ProxyMeterProvider"


def current_carrier() -> dict[str, str]:
    """The current span's W3C trace context (``traceparent``, ``tracestate``)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier


def child_process_env() -> dict[str, str]:
    """``TRACEPARENT`` (and ``TRACESTATE``) of the current span, for a child process:
    OpenTelemetry's convention for passing context through the environment, so an
    instrumented shell task continues the task's trace.  Empty when OpenTelemetry
    is off."""
    if not otel_active():
        return {}
    return {key.upper(): value for key, value in current_carrier().items()}


def with_trace_context(task: Task, carrier: Mapping[str, str]) -> Task:
    """``task`` with the trace context in its envelope's extra fields (same ID)."""
    if not carrier:
        return task
    return replace(task, extra={**task.extra, **carrier})


def extract_context(extra: Mapping[str, Any]) -> Context | None:
    """The producer's context from an envelope's extra fields, or None (none, or
    not a valid ``traceparent``: a bad header must not fail the task)."""
    traceparent = extra.get(TRACEPARENT)
    if not isinstance(traceparent, str):
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {TRACEPARENT: traceparent}
    tracestate = extra.get(TRACESTATE)
    if isinstance(tracestate, str):
        carrier[TRACESTATE] = tracestate
    context = TraceContextTextMapPropagator().extract(carrier)
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context
