"""The one module that imports the OpenTelemetry SDK and exporters (the extra).

Kept apart from :mod:`.setup` so that importing ``setup`` (done by every CLI run)
costs nothing: this module is imported only when the environment asks for export,
and an ``ImportError`` here means "the extra is not installed".
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import _logs, metrics, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import HOST_NAME, SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..redact import redact
from . import names
from .durations import TaskDurations, TaskMeterProvider, WithTaskDurations
from .logs import TaskLogFilter
from .otel_env import LOG_BATCH, METRIC_READER, SPAN_BATCH, settings_from_env
from .task_span import TaskTracerProvider

if TYPE_CHECKING:
    from .setup import TelemetrySession

log = logging.getLogger("ai4s_jobq.telemetry")

PROTOCOLS = ("http/protobuf", "grpc")
LOG_LEVEL_ENV = "JOBQ_TELEMETRY_LOG_LEVEL"
EXEMPLAR_FILTER_ENV = "OTEL_METRICS_EXEMPLAR_FILTER"


def install(
    session: TelemetrySession,
    wanted: dict[str, list[str]],
    service_name: str,
    environ: Mapping[str, str],
) -> None:
    """Build the exporters ``wanted`` asks for, install the global providers of the
    signals that got at least one, and record them in ``session``."""
    resource = _resource(service_name)
    exporters: dict[str, list[Any]] = {}
    for signal, destinations in wanted.items():
        for destination in destinations:
            exporter = (
                _otlp_exporter(signal, environ)
                if destination == "otlp"
                else _azure_exporter(signal, environ)
            )
            if exporter is not None:
                exporters.setdefault(signal, []).append(exporter)
                session.exporters.setdefault(signal, []).append(destination)
    if "traces" in exporters:
        tracer_provider = make_tracer_provider(resource, exporters["traces"], environ)
        trace.set_tracer_provider(tracer_provider)
        session.providers.append(tracer_provider)
    if "metrics" in exporters:
        durations = _task_durations(environ)
        reader_settings = settings_from_env(METRIC_READER, environ)
        readers = [
            PeriodicExportingMetricReader(
                e if durations is None else WithTaskDurations(e, durations), **reader_settings
            )
            for e in exporters["metrics"]
        ]
        meter_provider = TaskMeterProvider(
            resource=resource,
            metric_readers=readers,
            shutdown_on_exit=False,
            exemplar_filter=_exemplar_filter(environ),
            task_durations=durations,
        )
        metrics.set_meter_provider(meter_provider)
        session.providers.append(meter_provider)
    if session.providers or "logs" in exporters:
        log.info(  # before the log handler is attached: a line for the terminal only
            "telemetry on: %s",
            "; ".join(f"{s} → {', '.join(d)}" for s, d in session.exporters.items()),
        )
    if "logs" in exporters:
        logger_provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
        log_settings = settings_from_env(LOG_BATCH, environ)
        for exporter in exporters["logs"]:
            logger_provider.add_log_record_processor(
                BatchLogRecordProcessor(exporter, **log_settings)
            )
        _logs.set_logger_provider(logger_provider)
        session.providers.append(logger_provider)
        handler = _logging_handler(logger_provider)
        handler.setLevel(_export_log_level(environ))
        handler.addFilter(TaskLogFilter())
        logging.getLogger("ai4s_jobq").addHandler(handler)
        session.log_handler = handler


def make_tracer_provider(
    resource: Resource, exporters: list[Any], environ: Mapping[str, str], **kwargs: Any
) -> TaskTracerProvider:
    """A tracer provider sending to ``exporters`` in batches; ``kwargs`` go to the
    SDK's provider (a sampler, say)."""
    provider = TaskTracerProvider(resource=resource, shutdown_on_exit=False, **kwargs)
    for exporter in exporters:
        provider.add_span_processor(_batch_span_processor(exporter, environ))
    return provider


def attach_env_context(traceparent: str, tracestate: str | None) -> Any:
    """Make the ``TRACEPARENT`` of the environment the current context; the token."""
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    context = TraceContextTextMapPropagator().extract(carrier)
    if not trace.get_current_span(context).get_span_context().is_valid:
        log.warning("telemetry: TRACEPARENT is not a W3C traceparent; ignoring it")
        return None
    return otel_context.attach(context)


def _resource(service_name: str) -> Resource:
    """The SDK's resource (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``), with
    ``service_name`` and our version where the environment says nothing."""
    from .. import __version__

    resource = Resource.create({})
    ours: dict[str, str] = {}
    if HOST_NAME not in resource.attributes:  # on the resource, not on every span
        ours[HOST_NAME] = socket.gethostname()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        ours[SERVICE_NAME] = service_name
    if SERVICE_VERSION not in resource.attributes:
        ours[SERVICE_VERSION] = __version__
    return resource.merge(Resource(ours)) if ours else resource


def _exemplar_filter(environ: Mapping[str, str]) -> Any:
    """No exemplars unless ``OTEL_METRICS_EXEMPLAR_FILTER`` asks for them (then the
    SDK reads the variable).  The SDK's default, ``trace_based``, samples an exemplar
    from every measurement made inside a sampled span -- each task's duration is --
    and that tripled the cost of recording it (measured in bench_telemetry.py)."""
    return None if environ.get(EXEMPLAR_FILTER_ENV) else AlwaysOffExemplarFilter()


# Span batching where the standard variables say nothing: 2,048 spans per export
# and a queue of 8,192, not the SDK's 512 and 2,048.  A worker of short tasks ends
# thousands of spans a second; each export request costs about 2 ms of the worker's
# CPU whatever its size (the HTTP client), so 512-span batches cost 4 us per task
# (bench/bench_telemetry.py).  The queue must hold several batches, or spans ended
# while one is sent are dropped.
SPAN_BATCH_DEFAULTS = {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 2048, "OTEL_BSP_MAX_QUEUE_SIZE": 8192}


def _batch_span_processor(exporter: Any, environ: Mapping[str, str]) -> BatchSpanProcessor:
    """The SDK's batch processor; ours are only defaults, each variable wins (read by
    :mod:`.otel_env`, which also keeps a batch within its queue)."""
    return BatchSpanProcessor(
        exporter, **settings_from_env(SPAN_BATCH, environ, SPAN_BATCH_DEFAULTS)
    )


def _task_durations(environ: Mapping[str, str]) -> TaskDurations | None:
    """The worker's own duration histogram (see .durations), unless exemplars are
    asked for: only the SDK's histogram samples them."""
    if environ.get(EXEMPLAR_FILTER_ENV):
        return None
    from .. import __version__

    return TaskDurations(
        names.TASK_DURATION,
        "s",
        names.TASK_DURATION_DESCRIPTION,
        InstrumentationScope(names.INSTRUMENTATION_SCOPE, __version__),
    )


def _protocol(signal: str, environ: Mapping[str, str]) -> str:
    value = environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    return value.strip().lower()


def _http_endpoint(signal: str, environ: Mapping[str, str]) -> bool:
    """Whether the endpoint in effect for ``signal`` is an http(s) URL; else a warning
    now (the exporter would fail on every export, first at the worker's exit)."""
    for variable in (
        f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ):
        value = environ.get(variable, "").strip()
        if not value:
            continue
        parts = urlsplit(value)
        if parts.scheme in ("http", "https") and parts.netloc:
            return True
        log.warning(
            "telemetry: %s=%r is not an http:// or https:// URL; not exporting %s over OTLP",
            variable,
            redact(value)[:100],
            signal,
        )
        return False
    return True  # the exporter's own default


def _otlp_exporter(signal: str, environ: Mapping[str, str]) -> Any:
    protocol = _protocol(signal, environ)
    if protocol not in PROTOCOLS:
        log.warning(
            "telemetry: OTLP protocol %r is not supported (use http/protobuf or grpc); "
            "not exporting %s over OTLP",
            protocol,
            signal,
        )
        return None
    package = "http" if protocol == "http/protobuf" else "grpc"
    if package == "http" and not _http_endpoint(signal, environ):
        return None
    try:
        if signal == "traces" and package == "http":
            from .otlp_spans import SpanExporter  # the SDK's, with a faster encoder

            return SpanExporter()
        if signal == "traces":
            module = __import__(
                f"opentelemetry.exporter.otlp.proto.{package}.trace_exporter",
                fromlist=["OTLPSpanExporter"],
            )
            return module.OTLPSpanExporter()
        if signal == "metrics":
            module = __import__(
                f"opentelemetry.exporter.otlp.proto.{package}.metric_exporter",
                fromlist=["OTLPMetricExporter"],
            )
            return module.OTLPMetricExporter()
        module = __import__(
            f"opentelemetry.exporter.otlp.proto.{package}._log_exporter",
            fromlist=["OTLPLogExporter"],
        )
        return module.OTLPLogExporter()
    except ImportError:
        log.warning(
            "telemetry: OTLP over %s needs opentelemetry-exporter-otlp-proto-%s; "
            "not exporting %s over OTLP",
            protocol,
            package,
            signal,
        )
        return None


def _azure_exporter(signal: str, environ: Mapping[str, str]) -> Any:
    from azure.monitor.opentelemetry.exporter import (
        AzureMonitorLogExporter,
        AzureMonitorMetricExporter,
        AzureMonitorTraceExporter,
    )

    from .setup import AZURE_ENV

    classes = {
        "traces": AzureMonitorTraceExporter,
        "metrics": AzureMonitorMetricExporter,
        "logs": AzureMonitorLogExporter,
    }
    try:
        return classes[signal](connection_string=environ[AZURE_ENV])
    except ValueError as exc:  # a malformed connection string; the message may quote it
        log.warning(
            "telemetry: %s is not a valid Application Insights connection string (%s); "
            "not exporting to Azure Monitor",
            AZURE_ENV,
            redact(str(exc))[:200],
        )
        return None


def _export_log_level(environ: Mapping[str, str]) -> int:
    """``JOBQ_TELEMETRY_LOG_LEVEL`` (default WARNING): the per-task INFO lines repeat
    what the task's span says, and exporting them costs more than a short task."""
    name = (environ.get(LOG_LEVEL_ENV) or "WARNING").strip().upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        log.warning("telemetry: %s=%r is not a log level; using WARNING", LOG_LEVEL_ENV, name)
        return logging.WARNING
    return level


def _logging_handler(logger_provider: LoggerProvider) -> logging.Handler:
    """OpenTelemetry's logging bridge (the instrumentation package's, which replaces
    the SDK's deprecated one)."""
    try:
        from opentelemetry.instrumentation.logging.handler import LoggingHandler
    except ImportError:  # older installs: the SDK's own
        from opentelemetry.sdk._logs import LoggingHandler  # type: ignore[assignment]
    return LoggingHandler(logger_provider=logger_provider)
