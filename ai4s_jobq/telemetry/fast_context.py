"""Making a task's span current without the API's six calls.

Why: the worker makes each task attempt's span current in the attempt's own context,
so that the task's code sees it.  Through the API that is ``attach(set_span_in_context(
span))``: six Python calls (``set_span_in_context``, ``set_value``, ``get_current`` and
``attach`` each through the runtime context object), which on a busy worker cost
several microseconds per task -- a worker's Python calls cost several times what they
cost in a tight loop, with its event loop around them.  ``bench/bench_telemetry.py``
measured each small piece of the hook's per-task work at 3-5% of a no-op task's
rate (session 9, 25 rounds).

What it relies on: with its default runtime context, OpenTelemetry keeps the current
``Context`` (an immutable ``dict``) in one ``ContextVar``, and the current span under
one key.  Both names are private (``_RUNTIME_CONTEXT._current_context``,
``trace.propagation._SPAN_KEY``), so :func:`span_setter` looks for them once and
checks what it finds: with another runtime context (``OTEL_PYTHON_CONTEXT``) or an
API that no longer has them, the hook uses the API.  What it does is what the API
does -- copy the current context with the span added and set it -- and the token it
returns is the one ``detach`` takes (tested against the API).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any


def span_setter() -> tuple[ContextVar[Any], str] | None:
    """The context variable and span key the API uses, or None to use the API."""
    try:
        from opentelemetry import context as otel_context
        from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
        from opentelemetry.trace import propagation
    except ImportError:  # pragma: no cover - the API is a dependency
        return None
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    if type(runtime) is not ContextVarsRuntimeContext:
        return None
    variable = getattr(runtime, "_current_context", None)
    key = getattr(propagation, "_SPAN_KEY", None)
    if not isinstance(variable, ContextVar) or not isinstance(key, str):
        return None
    return variable, key
