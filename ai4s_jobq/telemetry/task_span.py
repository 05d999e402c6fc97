"""The worker's per-attempt span, made without the SDK's per-span machinery.

Why: creating and ending an SDK span costs 29 us in a tight loop and 60-120 us in a
worker (opentelemetry-sdk 1.45, the development VM) -- most of it validating each
attribute through ``BoundedAttributes``, a lock per span and the span-processor
fan-out -- which is more than a whole no-op task.  The worker makes one span per
task, with attributes it knows to be valid, so :class:`TaskSpan` takes the fast way:

* it is an SDK ``ReadableSpan`` (what exporters read) and an API ``Span`` (what a
  task's own code gets from ``trace.get_current_span()``) in one object;
* it is made by :class:`TaskSpans` from the provider's own sampler, ID generator,
  span limits and resource, exactly as the SDK's tracer would, and handed to the
  provider's processors when it ends;
* a task's code can use it as any recording span: ``set_attribute`` (validated by the
  API's ``BoundedAttributes`` from the first such call), ``add_event``,
  ``record_exception``, ``add_link``, ``set_status``, ``update_name``; its own spans
  nest under it.

Only one provider hands these out: :class:`TaskTracerProvider`, the SDK's provider
that :mod:`._sdk` installs, and only while every span processor on it is one of the
SDK's exporting processors, whose ``on_start`` does nothing (so skipping it loses
nothing).  Add any other processor and it goes back to SDK spans.  A program that
configures OpenTelemetry itself always gets SDK spans.

**Encoded when it ends.**  When every processor is the SDK's ``BatchSpanProcessor``
in front of jobq's OTLP exporter (:class:`~.otlp_spans.SpanExporter`, which says so
with ``encode_task_span``), a task span that ends is encoded at once and its batch
processor's queue gets ``(id of its TaskSpans, the encoded bytes)`` -- a tuple the
garbage collector soon stops scanning -- instead of the span object, which waited
there, with its dictionaries, for up to a few thousand tasks.  Measured by
instructions (callgrind, a worker draining 3,000 against 1,000 no-op tasks, three
runs each, session 9): 506,500 per task with OTLP export before, 493,000 after, the
span's encoding (about 25,000) now on the worker's thread and the exporter's thread
left with joining bytes and the HTTP request.  It reaches the queue through the batch
processor's ``_batch_processor.emit`` (what ``on_end`` calls after checking that the
span is sampled, as is done here); an SDK without it gets span objects, as before.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from random import getrandbits
from time import time_ns
from types import MappingProxyType
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import DEFAULT_ON
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

log = logging.getLogger("ai4s_jobq.telemetry")

_UNSET = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_EXPORTING_ONLY = (BatchSpanProcessor, SimpleSpanProcessor)
#: ``id(TaskSpans)`` -> the TaskSpans, for the exporter to find the resource and scope
#: of an encoded task span (see the module docstring).  A TaskSpans lives as long as
#: its provider: one per instrumentation scope.
ENCODED_GROUPS: dict[int, TaskSpans] = {}
_NO_STATE = trace_api.DEFAULT_TRACE_STATE

#: ``_new_tuple(SpanContext, fields)`` makes a SpanContext without its Python-level
#: constructor (which checks what is known here): one call less per task.
_new_tuple: Any = tuple.__new__


class TaskTracerProvider(TracerProvider):
    """The SDK's tracer provider, which also says whether :class:`TaskSpan` may stand
    in for its spans (``task_span_processors``: the processors, or None)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.span_limits: SpanLimits = kwargs.setdefault("span_limits", SpanLimits())
        super().__init__(*args, **kwargs)
        self.task_span_processors: tuple[Any, ...] | None = ()
        self._task_spans: dict[tuple[str, str], TaskSpans] = {}

    def add_span_processor(self, span_processor: Any) -> None:
        super().add_span_processor(span_processor)
        if self.task_span_processors is not None and type(span_processor) in _EXPORTING_ONLY:
            self.task_span_processors = (*self.task_span_processors, span_processor)
        else:  # its on_start may matter: SDK spans from now on
            self.task_span_processors = None

    def task_spans(self, name: str, version: str) -> TaskSpans:
        """One :class:`TaskSpans` per scope, so that the spans of every worker in the
        process share one scope object (exporters group spans by it)."""
        found = self._task_spans.get((name, version))
        if found is None:
            found = self._task_spans[(name, version)] = TaskSpans(
                self, InstrumentationScope(name, version)
            )
        return found


class TaskSpans:
    """Starts :class:`TaskSpan` objects for one instrumentation scope."""

    def __init__(self, provider: TaskTracerProvider, scope: InstrumentationScope):
        self.provider = provider
        self.scope = scope
        self.limits = provider.span_limits
        ENCODED_GROUPS[id(self)] = self
        self._encoded_for: tuple[Any, ...] | None = None
        self._encoded_to: tuple[Any, tuple[Any, ...]] | None = None

    def encoded_to(self, processors: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]] | None:
        """``(encode, queue appenders)`` when every one of ``processors`` is a batch
        processor of an exporter that takes encoded task spans (see the module
        docstring), else None; worked out again only when the processors change."""
        if processors is self._encoded_for:
            return self._encoded_to
        encoders: set[Any] = set()
        emits: list[Any] = []
        for processor in processors:
            exporter = getattr(processor, "span_exporter", None)
            encode = getattr(exporter, "encode_task_span", None)
            emit = getattr(getattr(processor, "_batch_processor", None), "emit", None)
            if type(processor) is not BatchSpanProcessor or encode is None or emit is None:
                emits = []
                break
            encoders.add(encode)
            emits.append(emit)
        found = (encoders.pop(), tuple(emits)) if emits and len(encoders) == 1 else None
        self._encoded_for, self._encoded_to = processors, found
        return found

    def start(
        self,
        name: str,
        parent_context: Context,
        kind: SpanKind,
        fixed: Mapping[str, Any],
        attributes: dict[str, Any],
        start_time: int,
    ) -> trace_api.Span | None:
        """The span (a non-recording one when the sampler drops it), or None when
        this provider's spans must come from the SDK now.  Its attributes are
        ``fixed`` (the same for every task of a worker, never changed: it is shared
        and encoded once) and ``attributes`` (the task's, a dict the caller gives
        away).  An empty ``parent_context`` is a root."""
        provider = self.provider
        processors = provider.task_span_processors
        if processors is None:
            return None
        parent: SpanContext | None = None
        if parent_context:
            parent = trace_api.get_current_span(parent_context).get_span_context()
        if parent is not None and parent.is_valid:
            trace_id = parent.trace_id
        else:
            parent = None
            trace_id = 0
        ids = provider.id_generator
        if type(ids) is RandomIdGenerator:  # the default: its two calls, inline
            while not trace_id:
                trace_id = getrandbits(128)
            span_id = getrandbits(64)
            while not span_id:
                span_id = getrandbits(64)
        else:
            trace_id = trace_id or ids.generate_trace_id()
            span_id = ids.generate_span_id()
        sampler = provider.sampler
        if sampler is DEFAULT_ON:
            # The SDK's default, ParentBased(ALWAYS_ON), decided here as it decides:
            # a root is sampled, a child follows its parent, attributes unchanged.
            # A SpanContext is a tuple (trace_id, span_id, is_remote, trace_flags,
            # trace_state, is_valid); made directly, as the IDs are valid by making.
            if parent is None:
                fields = (trace_id, span_id, False, _SAMPLED, _NO_STATE, True)
                context = _new_tuple(SpanContext, fields)
            elif parent.trace_flags.sampled:
                state = parent.trace_state
                context = _new_tuple(SpanContext, (trace_id, span_id, False, _SAMPLED, state, True))
            else:
                context = SpanContext(trace_id, span_id, False, _NOT_SAMPLED, parent.trace_state)
                return trace_api.NonRecordingSpan(context)
            return TaskSpan(
                name, context, parent, kind, fixed, attributes, start_time, self, processors
            )
        attributes = {**fixed, **attributes}
        sampling = sampler.should_sample(parent_context, trace_id, name, kind, attributes, None)
        decision = sampling.decision
        context = SpanContext(
            trace_id,
            span_id,
            is_remote=False,
            trace_flags=_SAMPLED if decision.is_sampled() else _NOT_SAMPLED,
            trace_state=sampling.trace_state,
        )
        if not decision.is_recording():
            return trace_api.NonRecordingSpan(context)
        own = dict(sampling.attributes)  # the sampler may have changed them
        return TaskSpan(name, context, parent, kind, None, own, start_time, self, processors)


class TaskSpan(trace_api.Span, ReadableSpan):
    """A recording span for one task attempt (see the module docstring).

    It has ``ReadableSpan``'s fields, so that class's properties read it; what is
    the same for every span starts out on the class (made once per task, each field
    set in ``__init__`` costs), and the resource and scope are its :class:`TaskSpans`'.
    """

    _fixed: Mapping[str, Any] | None = None
    _events: tuple[()] | BoundedList = ()
    _links: tuple[()] | BoundedList = ()
    _status = _UNSET
    _end_time: int | None = None
    _instrumentation_info = None

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        fixed: Mapping[str, Any] | None,
        attributes: dict[str, Any],
        start_time: int,
        spans: TaskSpans,
        processors: tuple[Any, ...],  # the provider's when the span started
    ):
        # ReadableSpan's fields, set directly: its constructor would build a Resource.
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        # The span's attributes are ``_fixed`` (shared by a worker's spans; read-only)
        # plus ``_attributes``; a task's first own attribute merges them.
        if fixed:
            self._fixed = fixed
        self._attributes: dict[str, Any] | BoundedAttributes = attributes
        self._start_time = start_time
        self._spans = spans
        self._processors = processors

    @property
    def _resource(self) -> Any:  # type: ignore[override]
        return self._spans.provider.resource

    @property
    def _instrumentation_scope(self) -> InstrumentationScope:  # type: ignore[override]
        return self._spans.scope

    # ------------------------------------------------------------------ the API

    @property
    def attributes(self) -> Mapping[str, Any]:
        fixed = self._fixed
        if fixed is None:
            return MappingProxyType(self._attributes)
        return MappingProxyType({**fixed, **self._attributes})

    def get_span_context(self) -> SpanContext:
        return self._context  # type: ignore[return-value]  # always set, here

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_known_attribute(self, key: str, value: str | int) -> None:
        """The worker's own attributes (a str or an int), without validation."""
        if self._end_time is None:
            self._attributes[key] = value

    def set_attribute(self, key: str, value: Any) -> None:
        if self._ended("set_attribute"):
            return
        self._bounded()[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if self._ended("set_attributes"):
            return
        bounded = self._bounded()
        for key, value in attributes.items():
            bounded[key] = value

    def add_event(
        self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None
    ) -> None:
        if self._ended("add_event"):
            return
        limits = self._spans.limits
        if not isinstance(self._events, BoundedList):
            self._events = BoundedList(limits.max_events)
        event_attributes = self._limited(limits.max_event_attributes, attributes)
        self._events.append(Event(name, event_attributes, timestamp or time_ns()))

    def add_link(self, context: SpanContext, attributes: Mapping[str, Any] | None = None) -> None:
        if self._ended("add_link") or context is None or not context.is_valid:
            return
        limits = self._spans.limits
        if not isinstance(self._links, BoundedList):
            self._links = BoundedList(limits.max_links)
        self._links.append(Link(context, self._limited(limits.max_link_attributes, attributes)))

    def update_name(self, name: str) -> None:
        if not self._ended("update_name"):
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # As the SDK: OK is final, and UNSET is never set.
        if self._ended("set_status") or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is not StatusCode.UNSET:
                self._status = status
        elif status is not StatusCode.UNSET:
            self._status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Mapping[str, Any] | None = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        kind = type(exception)
        module = kind.__module__
        exception_attributes: dict[str, Any] = {
            "exception.type": (
                f"{module}.{kind.__qualname__}"
                if module and module != "builtins"
                else kind.__qualname__
            ),
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            exception_attributes.update(attributes)
        self.add_event("exception", exception_attributes, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            log.debug("telemetry: span %s ended twice", self._name)
            return
        self._end_time = end_time if end_time is not None else time_ns()
        spans = self._spans
        encoded_to = spans.encoded_to(self._processors)
        context: Any = self._context  # (trace_id, span_id, is_remote, flags, ...)
        if encoded_to is not None and context[3] & 1:  # sampled, as on_end checks
            encode, emits = encoded_to
            item = (id(spans), encode(self))
            for emit in emits:
                emit(item)
            return
        for processor in self._processors:
            processor.on_end(self)

    # ------------------------------------------------------------------ helpers

    def _bounded(self) -> BoundedAttributes:
        """The attributes as the SDK keeps them, from a task's first own attribute."""
        attributes = self._attributes
        if isinstance(attributes, BoundedAttributes):
            return attributes
        limits = self._spans.limits
        if self._fixed is not None:
            attributes = {**self._fixed, **attributes}
        bounded = BoundedAttributes(
            limits.max_span_attributes,
            attributes,
            immutable=False,
            max_value_len=limits.max_span_attribute_length,
        )
        self._attributes = bounded
        self._fixed = None
        return bounded

    def _limited(
        self, count: int | None, attributes: Mapping[str, Any] | None
    ) -> BoundedAttributes:
        """An event's or a link's attributes, checked and cut to the span limits."""
        limit = self._spans.limits.max_attribute_length
        return BoundedAttributes(count, attributes, immutable=True, max_value_len=limit)

    def _ended(self, method: str) -> bool:
        if self._end_time is None:
            return False
        log.warning("telemetry: %s on a span that has ended", method)
        return True
