"""A Python task for the telemetry tests (``--proc telemetry_tasks:traced``): it adds
an attribute to the task's span, makes its own span and a log record, as
instrumented user code would."""

from __future__ import annotations

import logging

from opentelemetry import trace

log = logging.getLogger("ai4s_jobq.user")


def traced(name: str) -> None:
    trace.get_current_span().set_attribute("user.step", 3)
    with trace.get_tracer("user-code").start_as_current_span(name):
        log.warning("inside %s", name)
