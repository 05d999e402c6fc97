"""The worker's light task spans (``telemetry/task_span.py``) against SDK spans.

A :class:`TaskSpan` must be indistinguishable from the span the SDK's tracer would
have made: the same sampling decisions, and the same OTLP encoding -- by the SDK's
encoder (which reads it as any ``ReadableSpan``) and by ours (which reads its
fields) -- for every shape a task's code can give it.  And a provider that gets a
processor whose ``on_start`` may matter must go back to SDK spans."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace  # noqa: E402
from opentelemetry.context import Context  # noqa: E402
from opentelemetry.exporter.otlp.proto.common.trace_encoder import (  # noqa: E402
    encode_spans as sdk_encode_spans,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest,
)
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, TraceIdRatioBased  # noqa: E402
from opentelemetry.trace import (  # noqa: E402
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from ai4s_jobq.backends.base import ReceivedMessage  # noqa: E402
from ai4s_jobq.task import make_task  # noqa: E402
from ai4s_jobq.telemetry import otlp_spans  # noqa: E402
from ai4s_jobq.telemetry.task_span import TaskSpan, TaskTracerProvider  # noqa: E402
from ai4s_jobq.telemetry.worker_hook import TelemetryHook  # noqa: E402
from ai4s_jobq.worker.hooks import TaskOutcome, TaskRun, WorkerIdentity  # noqa: E402

FIXED = {"messaging.system": "jobq.local", "messaging.destination.name": "q", "n": 1}


def parsed(data: bytes) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    request.ParseFromString(data)
    return request


def provider_with_memory(**kwargs) -> tuple[TaskTracerProvider, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TaskTracerProvider(
        resource=Resource.create({"service.name": "task-spans"}),
        span_limits=SpanLimits(max_span_attributes=6, max_events=2, max_links=1),
        shutdown_on_exit=False,
        **kwargs,
    )
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, memory


@pytest.fixture
def recorded() -> Iterator[tuple[TaskTracerProvider, InMemorySpanExporter]]:
    provider, memory = provider_with_memory()
    yield provider, memory
    provider.shutdown()


def parent(sampled: bool, trace_state: TraceState | None = None) -> Context:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    context = SpanContext(0x5A5A, 0x77, is_remote=True, trace_flags=flags, trace_state=trace_state)
    return trace.set_span_in_context(NonRecordingSpan(context))


def start(provider: TaskTracerProvider, context: Context, **own) -> trace.Span:
    span = provider.task_spans("jobq.test", "9.9").start(
        "process q", context, SpanKind.CONSUMER, FIXED, {"task.id": "a" * 32, **own}, 10**18
    )
    assert span is not None
    return span


def test_task_spans_of_every_shape_encode_as_the_sdk_encodes_them(recorded):
    provider, memory = recorded
    plain = start(provider, Context())  # a root, nothing added: our encoder's fast way
    plain.set_known_attribute("outcome", "succeeded")
    plain.end(10**18 + 5)
    child = start(provider, parent(True, TraceState([("vendor", "v1")])), attempt=2)
    child.set_status(Status(StatusCode.ERROR, "ValueError"))
    child.update_name("process q, child")
    child.end()
    busy = start(provider, Context())  # what a task's code may do to its span
    busy.set_attribute("user.step", 3)
    busy.set_attributes({"user.words": ["a", "b"], "user.more": 1.5, "over": "limit"})
    busy.add_event("checkpoint", {"file": "/tmp/c"})
    busy.record_exception(ValueError("bad input"))
    busy.add_event("dropped: over max_events")
    busy.add_link(SpanContext(0x1, 0x2, is_remote=True), {"why": "batch"})
    busy.update_name("process q, renamed")
    busy.set_status(StatusCode.OK)
    busy.set_status(StatusCode.ERROR)  # ignored, as the SDK does: OK is final
    busy.end()
    busy.set_attribute("late", 1)  # after the end: ignored
    spans = list(memory.get_finished_spans())
    assert [type(s) for s in spans] == [TaskSpan] * 3

    ours = parsed(otlp_spans.encode_spans(spans))
    theirs = parsed(sdk_encode_spans(spans).SerializePartialToString())
    assert ours == theirs
    encoded = {s.name: s for r in ours.resource_spans for sc in r.scope_spans for s in sc.spans}
    assert dict(plain.attributes) == {**FIXED, "task.id": "a" * 32, "outcome": "succeeded"}
    assert encoded["process q"].end_time_unix_nano == 10**18 + 5
    assert encoded["process q"].parent_span_id == b""
    assert child.parent is not None and child.parent.span_id == 0x77
    assert encoded["process q, renamed"].dropped_attributes_count == 2  # limit 6 of 8
    assert encoded["process q, renamed"].dropped_events_count == 1
    assert busy.status.status_code is StatusCode.OK
    assert "late" not in busy.attributes


@pytest.mark.parametrize(
    "sampler, context, sampled",
    [
        (None, Context(), True),  # the default, ParentBased(ALWAYS_ON): a root is sampled
        (None, "sampled parent", True),
        (None, "unsampled parent", False),
        (ALWAYS_OFF, Context(), False),
        (TraceIdRatioBased(1.0), "unsampled parent", True),  # not parent-based
    ],
)
def test_task_spans_are_sampled_as_the_sdk_samples(sampler, context, sampled):
    if context == "sampled parent":
        context = parent(True, TraceState([("k", "v")]))
    elif context == "unsampled parent":
        context = parent(False, TraceState([("k", "v")]))
    kwargs = {} if sampler is None else {"sampler": sampler}
    provider, memory = provider_with_memory(**kwargs)
    try:
        ours = start(provider, context)
        theirs = provider.get_tracer("sdk").start_span("sdk", context, SpanKind.CONSUMER)
        assert ours.is_recording() is theirs.is_recording()
        ours_context, their_context = ours.get_span_context(), theirs.get_span_context()
        assert ours_context.trace_flags.sampled is their_context.trace_flags.sampled is sampled
        assert ours_context.trace_state == their_context.trace_state
        assert (ours_context.trace_id == 0x5A5A) is (their_context.trace_id == 0x5A5A)
        ours.end()
        theirs.end()
        assert len(memory.get_finished_spans()) == (2 if sampled else 0)
    finally:
        provider.shutdown()


class StartRecorder(SpanProcessor):
    def __init__(self) -> None:
        self.started: list[str] = []

    def on_start(self, span, parent_context=None) -> None:
        self.started.append(span.name)


def test_a_processor_that_watches_starts_turns_task_spans_off(recorded):
    provider, memory = recorded
    assert provider.task_spans("x", "1").start("a", Context(), SpanKind.CONSUMER, {}, {}, 1)
    recorder = StartRecorder()
    provider.add_span_processor(recorder)
    assert provider.task_spans("x", "1").start("b", Context(), SpanKind.CONSUMER, {}, {}, 1) is None

    async def one_task() -> None:  # the worker's hook then makes SDK spans
        hook = TelemetryHook(depth_interval=0, tracer_provider=provider)
        await hook.start(WorkerIdentity(queue="q"))
        message = ReceivedMessage("m-1", b"{}", 1, None, None)
        run = TaskRun(make_task({"i": 1}), message, 1)
        hook.task_started(run)
        hook.task_finished(run, TaskOutcome("succeeded", 0.01))

    asyncio.run(one_task())
    assert recorder.started == ["process q"]
    (span,) = [s for s in memory.get_finished_spans() if s.name == "process q"]
    assert not isinstance(span, TaskSpan)
    assert span.attributes["jobq.task.outcome"] == "succeeded"


class BatchSizes(InMemorySpanExporter):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def export(self, spans):
        self.batches.append(len(spans))
        return super().export(spans)


@pytest.mark.parametrize(
    "environ, batches",
    [({}, [1000]), ({"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "512"}, [512, 488])],
)
def test_spans_go_in_batches_of_2048_unless_the_variables_say(monkeypatch, environ, batches):
    from ai4s_jobq.telemetry._sdk import make_tracer_provider

    for name, value in environ.items():
        monkeypatch.setenv(name, value)  # the SDK's processor reads os.environ
    exporter = BatchSizes()
    provider = make_tracer_provider(Resource.create({}), [exporter], environ)
    try:
        spans = provider.task_spans("x", "1")
        for _ in range(1000):
            spans.start("s", Context(), SpanKind.CONSUMER, FIXED, {}, 1).end()
        assert provider.force_flush()
        assert exporter.batches == batches
    finally:
        provider.shutdown()


@pytest.mark.parametrize("fast", [True, False], ids=["inline", "through-the-api"])
def test_the_task_span_is_current_for_the_task_and_keeps_the_rest_of_the_context(recorded, fast):
    """The hook makes the span current inline (telemetry/fast_context.py) where the
    API's runtime context allows, else through the API: the same either way."""
    from opentelemetry import context as otel_context

    provider, memory = recorded
    seen: dict[str, object] = {}

    async def one_task() -> None:
        hook = TelemetryHook(depth_interval=0, tracer_provider=provider)
        await hook.start(WorkerIdentity(queue="q"))
        assert hook._span_setter is not None  # the default runtime context
        if not fast:
            hook._span_setter = None
        message = ReceivedMessage("m-1", b"{}", 1, None, None)
        run = TaskRun(make_task({"i": 1}), message, 1)

        async def attempt() -> None:  # as the loop runs each message: a task of its own
            otel_context.attach(otel_context.set_value("pipeline.key", "kept"))
            hook.task_started(run)
            seen["span"] = trace.get_current_span()
            seen["kept"] = otel_context.get_value("pipeline.key")
            with trace.get_tracer("t", tracer_provider=provider).start_as_current_span("own"):
                pass
            hook.task_finished(run, TaskOutcome("failed", 0.01, reason="ValueError"))

        await asyncio.create_task(attempt())
        seen["after"] = trace.get_current_span()

    asyncio.run(one_task())
    (task_span,) = [s for s in memory.get_finished_spans() if s.name == "process q"]
    (own,) = [s for s in memory.get_finished_spans() if s.name == "own"]
    assert seen["span"] is task_span and isinstance(task_span, TaskSpan)
    assert seen["kept"] == "kept"
    assert own.parent is not None and own.parent.span_id == task_span.context.span_id
    assert task_span.attributes["jobq.task.outcome"] == "failed"
    assert task_span.attributes["error.type"] == "ValueError"
    assert seen["after"] is trace.INVALID_SPAN  # the attempt's task, not the worker's


def test_another_runtime_context_makes_the_hook_use_the_api(monkeypatch):
    from opentelemetry import context as otel_context

    from ai4s_jobq.telemetry.fast_context import span_setter

    assert span_setter() is not None
    monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", object())
    assert span_setter() is None


class KeptRequests(otlp_spans.SpanExporter):
    """jobq's OTLP exporter with the HTTP request replaced by keeping its body."""

    def __init__(self) -> None:
        super().__init__(endpoint="http://127.0.0.1:9/v1/traces")
        self.items: list[object] = []
        self.requests: list[bytes] = []

    def export(self, spans):
        self.items += spans
        self.requests.append(otlp_spans.encode_spans(spans))
        return otlp_spans.SpanExportResult.SUCCESS


def test_a_task_span_reaches_jobqs_exporter_encoded_and_others_as_a_span():
    """Behind the SDK's batch processor and jobq's exporter, a task span is encoded
    when it ends (telemetry/task_span.py): the request holds what the SDK's encoder
    makes of the span.  Behind any other exporter it stays a span."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from ai4s_jobq.telemetry._sdk import make_tracer_provider

    ours = KeptRequests()
    provider = make_tracer_provider(Resource.create({"service.name": "enc"}), [ours], {})
    memory = InMemorySpanExporter()
    other = TaskTracerProvider(resource=Resource.create({}), shutdown_on_exit=False)
    other.add_span_processor(BatchSpanProcessor(memory))
    try:
        span = provider.task_spans("x", "1").start(
            "process q", parent(True), SpanKind.CONSUMER, FIXED, {"task.id": "b" * 32}, 7
        )
        span.set_known_attribute("outcome", "failed")
        span.set_status(Status(StatusCode.ERROR, "ValueError"))
        span.end(9)
        plain = other.task_spans("x", "1").start("p", Context(), SpanKind.CONSUMER, FIXED, {}, 1)
        plain.end()
        assert provider.force_flush() and other.force_flush()
        assert [type(item) for item in ours.items] == [tuple]
        (request,) = ours.requests
        assert parsed(request) == parsed(sdk_encode_spans([span]).SerializePartialToString())
        assert memory.get_finished_spans() == (plain,)
    finally:
        provider.shutdown()
        other.shutdown()
