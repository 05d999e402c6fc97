"""The hand-written OTLP span encoder (``telemetry/otlp_spans.py``) against the SDK's.

Spans of every shape are encoded by both; both byte strings are parsed with
``opentelemetry-proto`` and the messages must be equal.  Then the exporter, over
real HTTP to the test receiver on 127.0.0.1, with the SDK's encoder made to fail, so
the test shows that our encoder (not a fallback) carried the spans."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from otlp_receiver import OtlpReceiver

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace  # noqa: E402
from opentelemetry.exporter.otlp.proto.common.trace_encoder import (  # noqa: E402
    encode_spans as sdk_encode_spans,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest,
)
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import (  # noqa: E402
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from ai4s_jobq.telemetry import otlp_spans  # noqa: E402


def parsed(data: bytes) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    request.ParseFromString(data)
    return request


def assert_same_encoding(spans: list[ReadableSpan]) -> ExportTraceServiceRequest:
    ours = parsed(otlp_spans.encode_spans(spans))
    theirs = parsed(sdk_encode_spans(spans).SerializePartialToString())
    assert ours == theirs
    return ours


@pytest.fixture
def recorded() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "enc", "k8s.pod.uid": "p-1"}, "https://s/1"),
        span_limits=SpanLimits(max_span_attributes=8, max_events=2, max_links=2),
        shutdown_on_exit=False,
    )
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield provider, memory
    provider.shutdown()


def remote_context(trace_state: TraceState | None = None) -> SpanContext:
    return SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=trace_state,
    )


def test_spans_of_every_shape_encode_as_the_sdk_encodes_them(recorded):
    provider, memory = recorded
    tracer = provider.get_tracer("jobq.test", "1.2.3", schema_url="https://s/scope")
    other = provider.get_tracer("other.scope")  # no version, no schema
    values = {
        "text": "naïve ☃",
        "empty": "",
        "yes": True,
        "no": False,
        "zero": 0,
        "negative": -42,
        "big": 2**62,
        "float": 2.5,
        "words": ["a", "b"],
        "numbers": [1, -2, 3],
    }
    remote = trace.set_span_in_context(
        NonRecordingSpan(remote_context(TraceState([("vendor", "v1"), ("ms", "x")])))
    )
    for kind in SpanKind:
        with tracer.start_as_current_span(
            f"span {kind.name}", context=remote, kind=kind, attributes=values
        ) as span:
            span.add_event("checkpoint", {"step": 3, "file": "/tmp/c"})
            span.add_event("bare")
            span.add_event("dropped beyond max_events")
            links = [Link(remote_context(), {"why": "batch"}), Link(span.get_span_context())]
            with other.start_as_current_span("child", links=links) as child:
                child.set_status(Status(StatusCode.ERROR, "Timeout: 1s"))
            span.set_status(Status(StatusCode.OK))
    with tracer.start_as_current_span("root, unset status, no attributes"):
        pass
    spans = list(memory.get_finished_spans())
    request = assert_same_encoding(spans)

    (resource_spans,) = request.resource_spans
    assert resource_spans.schema_url == "https://s/1"
    assert {s.scope.name for s in resource_spans.scope_spans} == {"jobq.test", "other.scope"}
    encoded = [s for scope in resource_spans.scope_spans for s in scope.spans]
    assert len(encoded) == len(spans) == 2 * len(SpanKind) + 1
    first = next(s for s in encoded if s.name == "span INTERNAL")
    assert first.dropped_attributes_count == len(values) - 8
    assert first.dropped_events_count == 1
    assert first.trace_state == "vendor=v1,ms=x"


def test_values_the_span_api_does_not_make_still_match():
    """Maps, nested arrays, bytes and None values come from other producers (and
    older SDKs); a span can also arrive with no status, resource schema or scope."""
    context = remote_context()
    span = ReadableSpan(
        name="hand-made",
        context=SpanContext(context.trace_id, 0x1, is_remote=False),
        parent=context,
        resource=Resource({"r": 1}),
        attributes={
            "map": {"a": 1, "nested": {"b": [True, 1.5]}},
            "blob": b"\x00\xff",
            "none": None,
            "mixed": ("x", 2),
        },
        kind=SpanKind.PRODUCER,
        instrumentation_scope=None,
        start_time=1,
        end_time=2**63,
    )
    assert_same_encoding([span])


def test_an_attribute_that_cannot_be_encoded_is_left_out_not_the_span(caplog):
    span = ReadableSpan(
        name="s",
        context=SpanContext(1, 2, is_remote=False),
        resource=Resource({}),
        attributes={"huge": 2**70, "ok": "kept"},
        start_time=1,
        end_time=2,
    )
    (encoded,) = parsed(otlp_spans.encode_spans([span])).resource_spans[0].scope_spans[0].spans
    assert [a.key for a in encoded.attributes] == ["ok"]
    assert "huge" in caplog.text


def test_exporter_sends_with_our_encoder_over_http(monkeypatch, recorded):
    """The SDK's encoder is made to fail: the spans arrive only if ours was used."""
    import opentelemetry.exporter.otlp.proto.http.trace_exporter as sdk_exporter

    def broken(spans):
        raise AssertionError("the SDK's encoder was used")

    monkeypatch.setattr(sdk_exporter, "encode_spans", broken)
    provider, memory = recorded
    with provider.get_tracer("t").start_as_current_span("sent", attributes={"n": 1}):
        pass
    with OtlpReceiver() as receiver:
        exporter = otlp_spans.SpanExporter(f"{receiver.endpoint}/v1/traces")
        try:
            result = exporter.export(memory.get_finished_spans())
        finally:
            exporter.shutdown()
        assert result.name == "SUCCESS"
        (span,) = receiver.spans()  # export() returned after the receiver replied
    assert span.name == "sent"
    assert span.attributes["n"] == 1
