"""A real OTLP/HTTP receiver on 127.0.0.1, for the telemetry tests and benchmark.

It speaks the protocol's HTTP binding: ``POST /v1/traces``, ``/v1/metrics`` and
``/v1/logs`` with a protobuf ``Export*ServiceRequest`` body (gzip or not), answered
with the matching empty ``Export*ServiceResponse``.  The requests are decoded with
the official ``opentelemetry-proto`` messages, so what a test asserts is what a
collector would have received.  It runs an aiohttp server on its own event loop
in a background thread (the code under test runs in subprocesses or on the test's
loop), on a free port, and stops when the ``with`` block ends.

Run as a script (``python tests/otlp_receiver.py``) it serves until killed,
printing its port and, on SIGTERM, a one-line JSON count of what it received:
the benchmark uses that so decoding does not share a process with the worker.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

T = TypeVar("T")


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: any_value(pair.value) for pair in pairs}


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int
    links: list[tuple[str, str]]
    start_ns: int
    end_ns: int


@dataclass
class Point:
    """One data point of one metric: a sum/gauge value or a histogram's count and sum."""

    metric: str
    kind: str  # "sum", "gauge", "histogram"
    attributes: dict[str, Any]
    value: float | None
    count: int | None
    total: float | None
    resource: dict[str, Any]
    unit: str
    exemplars: int = 0  # a histogram point's exemplars (links to spans)


@dataclass
class LogRecord:
    body: Any
    severity: str
    attributes: dict[str, Any]
    trace_id: str
    span_id: str
    resource: dict[str, Any]


@dataclass
class Received:
    spans: list[Span] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    logs: list[LogRecord] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=lambda: {"traces": 0, "metrics": 0, "logs": 0})


class OtlpReceiver:
    """``with OtlpReceiver() as r:`` — ``r.endpoint`` for OTEL_EXPORTER_OTLP_ENDPOINT."""

    def __init__(self, *, decode: bool = True) -> None:
        self.decode = decode  # False: count requests only (cheaper, for the benchmark)
        self.received = Received()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ reading

    def spans(self, name: str | None = None) -> list[Span]:
        with self._lock:
            return [s for s in self.received.spans if name is None or s.name == name]

    def points(self, metric: str) -> list[Point]:
        with self._lock:
            return [p for p in self.received.points if p.metric == metric]

    def logs(self) -> list[LogRecord]:
        with self._lock:
            return list(self.received.logs)

    def metric_total(self, metric: str, **attrs: Any) -> float:
        """The latest value of a cumulative sum, added up over its attribute sets
        (restricted to those matching ``attrs``)."""
        latest: dict[tuple[Any, ...], float] = {}
        for point in self.points(metric):
            if all(point.attributes.get(k) == v for k, v in attrs.items()):
                latest[tuple(sorted(point.attributes.items()))] = point.value or 0.0
        return sum(latest.values())

    def wait_for(self, what: Callable[[], T], timeout: float = 30.0) -> T:
        """Poll ``what()`` until it returns something truthy, or fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = what()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"OTLP receiver: condition not met in {timeout}s")
            time.sleep(0.05)

    # ------------------------------------------------------------------ serving

    def __enter__(self) -> OtlpReceiver:
        self._thread = threading.Thread(target=self._serve, name="otlp-receiver", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("OTLP receiver did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def _serve(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        app.router.add_post("/v1/logs", self._logs)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    async def _body(self, request: web.Request, signal: str) -> bytes:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        with self._lock:
            self.received.requests[signal] += 1
        return body

    async def _traces(self, request: web.Request) -> web.Response:
        body = await self._body(request, "traces")
        if self.decode:
            message = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            spans = list(_spans(message))
            with self._lock:
                self.received.spans.extend(spans)
        return _reply(trace_service_pb2.ExportTraceServiceResponse())

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self._body(request, "metrics")
        if self.decode:
            message = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
            points = list(_points(message))
            with self._lock:
                self.received.points.extend(points)
        return _reply(metrics_service_pb2.ExportMetricsServiceResponse())

    async def _logs(self, request: web.Request) -> web.Response:
        body = await self._body(request, "logs")
        if self.decode:
            message = logs_service_pb2.ExportLogsServiceRequest.FromString(body)
            records = list(_logs(message))
            with self._lock:
                self.received.logs.extend(records)
        return _reply(logs_service_pb2.ExportLogsServiceResponse())


def _reply(message: Any) -> web.Response:
    return web.Response(body=message.SerializeToString(), content_type="application/x-protobuf")


def _spans(message: trace_service_pb2.ExportTraceServiceRequest) -> Iterator[Span]:
    for resource_spans in message.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield Span(
                    name=span.name,
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    kind=span.kind,
                    attributes=attributes(span.attributes),
                    resource=resource,
                    status_code=span.status.code,
                    links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                    start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano,
                )


def _points(message: metrics_service_pb2.ExportMetricsServiceRequest) -> Iterator[Point]:
    for resource_metrics in message.resource_metrics:
        resource = attributes(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data")
                if kind in ("sum", "gauge"):
                    for point in getattr(metric, kind).data_points:
                        value = point.as_double if point.HasField("as_double") else point.as_int
                        yield Point(
                            metric.name,
                            kind,
                            attributes(point.attributes),
                            float(value),
                            None,
                            None,
                            resource,
                            metric.unit,
                        )
                elif kind == "histogram":
                    for hist in metric.histogram.data_points:
                        yield Point(
                            metric.name,
                            kind,
                            attributes(hist.attributes),
                            None,
                            hist.count,
                            hist.sum,
                            resource,
                            metric.unit,
                            len(hist.exemplars),
                        )


def _logs(message: logs_service_pb2.ExportLogsServiceRequest) -> Iterator[LogRecord]:
    for resource_logs in message.resource_logs:
        resource = attributes(resource_logs.resource.attributes)
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                yield LogRecord(
                    body=any_value(record.body),
                    severity=record.severity_text,
                    attributes=attributes(record.attributes),
                    trace_id=record.trace_id.hex(),
                    span_id=record.span_id.hex(),
                    resource=resource,
                )


def main() -> None:
    """Serve until SIGTERM; print the port first and the request counts last."""
    import json
    import signal
    import sys

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with OtlpReceiver(decode="--decode" in sys.argv) as receiver:
        print(receiver.port, flush=True)
        stop.wait()
        counts = dict(receiver.received.requests, spans=len(receiver.received.spans))
    print(json.dumps(counts), flush=True)


__all__ = ["OtlpReceiver", "Span", "Point", "LogRecord", "main"]

if __name__ == "__main__":
    main()
