"""Turn OpenTelemetry on from the standard environment, once, in an entry point.

``jobq worker``, ``jobq pull`` and ``jobq push`` call :func:`telemetry_session`; a
program using the library can too, or configure OpenTelemetry itself (the library
then takes part on its own, see :func:`~.context.otel_active`).

What turns it on, nothing else (so nothing is spent when neither is set):

* ``OTEL_EXPORTER_OTLP_ENDPOINT`` or a signal's own ``OTEL_EXPORTER_OTLP_{TRACES,
  METRICS,LOGS}_ENDPOINT`` → OTLP export of that signal.  The exporters read the rest
  of the standard variables themselves (headers, timeout, compression, certificates),
  as do the SDK's resource (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``) and
  processors (``OTEL_BSP_*``, ``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_BLRP_*``).
  ``OTEL_EXPORTER_OTLP[_signal]_PROTOCOL`` may be ``http/protobuf`` (the default) or
  ``grpc`` (needs ``opentelemetry-exporter-otlp-proto-grpc``).
* ``APPLICATIONINSIGHTS_CONNECTION_STRING`` → Azure Monitor (Application Insights),
  with the exporters of ``azure-monitor-opentelemetry`` plugged into the same
  providers, so both destinations can be fed at once.

``OTEL_SDK_DISABLED=true`` turns it all off; ``OTEL_{TRACES,METRICS,LOGS}_EXPORTER=none``
turns off one signal.  A standard ``TRACEPARENT`` variable (set by a pipeline
runner for its steps) becomes the current context, so ``jobq push`` joins that trace.

A missing extra or an unsupported protocol is a warning, never an error: telemetry
must not stop a worker.  Logs exported are those of the ``ai4s_jobq`` loggers, each
tagged with the task and worker IDs (:mod:`.logs`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..worker.hooks import WorkerHook

log = logging.getLogger("ai4s_jobq.telemetry")

SIGNALS = ("traces", "metrics", "logs")
AZURE_ENV = "APPLICATIONINSIGHTS_CONNECTION_STRING"
OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
EXPORTED_LOGGER = "ai4s_jobq"
SHUTDOWN_TIMEOUT = 5.0  # seconds for all providers to flush at exit
INSTALL_HINT = "pip install 'ai4s_jobq[telemetry]'"


@dataclass
class TelemetrySession:
    """What :func:`configure_telemetry` installed; ``enabled`` is False when nothing."""

    exporters: dict[str, list[str]] = field(default_factory=dict)  # signal -> destinations
    providers: list[Any] = field(default_factory=list)
    log_handler: logging.Handler | None = None
    context_token: Any = None

    @property
    def enabled(self) -> bool:
        return bool(self.providers)

    def worker_hooks(self, backend: Backend | None = None) -> list[WorkerHook]:
        """The hooks a worker needs for this session: none when telemetry is off."""
        if not self.enabled:
            return []
        from .worker_hook import TelemetryHook

        return [TelemetryHook(backend)]

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Flush and stop every provider (in a thread, so a collector that does not
        answer delays the exit by at most ``timeout`` seconds)."""
        if self.log_handler is not None:
            logging.getLogger(EXPORTED_LOGGER).removeHandler(self.log_handler)
            self.log_handler = None
        if self.context_token is not None:
            from opentelemetry import context as otel_context

            otel_context.detach(self.context_token)
            self.context_token = None
        providers, self.providers = self.providers, []
        if not providers:
            return

        def stop(provider: Any) -> None:
            try:
                provider.shutdown()
            except Exception as exc:
                log.warning("telemetry: shutting down %s failed: %s", type(provider).__name__, exc)

        # In parallel, each in a daemon thread: a collector that does not answer makes
        # every exporter retry until its own timeout; the exit waits for none of that
        # past ``timeout`` (the providers do not register exit handlers of their own).
        threads = [
            threading.Thread(target=stop, args=(p,), name="telemetry-shutdown", daemon=True)
            for p in providers
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            log.warning(
                "telemetry: the exporters did not finish within %.0fs (is the collector "
                "reachable?); exiting without them",
                timeout,
            )


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def _wanted_signals(environ: Mapping[str, str]) -> dict[str, list[str]]:
    """signal -> the destinations its variables ask for ("otlp", "azure")."""
    wanted: dict[str, list[str]] = {signal: [] for signal in SIGNALS}
    for signal in SIGNALS:
        if (environ.get(f"OTEL_{signal.upper()}_EXPORTER") or "").strip().lower() == "none":
            continue
        if environ.get(OTLP_ENDPOINT_ENV) or environ.get(
            f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"
        ):
            wanted[signal].append("otlp")
        if environ.get(AZURE_ENV):
            wanted[signal].append("azure")
    return {signal: dests for signal, dests in wanted.items() if dests}


def telemetry_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for any export (cheap: reads variables only)."""
    environ = os.environ if environ is None else environ
    return not _truthy(environ.get("OTEL_SDK_DISABLED")) and bool(_wanted_signals(environ))


def configure_telemetry(
    service_name: str = "jobq", environ: Mapping[str, str] | None = None
) -> TelemetrySession:
    """Install global tracer, meter and logger providers with the exporters the
    environment asks for; a disabled session when it asks for none.
    ``service_name`` is used unless ``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES``
    names the service.  ``environ`` decides what is turned on; the SDK and the
    exporters read their own settings from ``os.environ``, as they always do."""
    environ = os.environ if environ is None else environ
    if not telemetry_requested(environ):
        return TelemetrySession()
    wanted = _wanted_signals(environ)
    try:
        from . import _sdk
    except ImportError as exc:
        log.warning(
            "telemetry: the environment asks for export (%s) but the exporters are not "
            "installed (%s): %s. Continuing without telemetry.",
            ", ".join(sorted({d for dests in wanted.values() for d in dests})),
            exc.name,
            INSTALL_HINT,
        )
        return TelemetrySession()
    session = TelemetrySession()
    _sdk.install(session, wanted, service_name, environ)
    traceparent = environ.get("TRACEPARENT")
    if session.enabled and traceparent:
        session.context_token = _sdk.attach_env_context(traceparent, environ.get("TRACESTATE"))
    return session


@contextmanager
def telemetry_session(service_name: str = "jobq") -> Iterator[TelemetrySession]:
    """:func:`configure_telemetry` for the ``with`` block; flushes on the way out."""
    session = configure_telemetry(service_name)
    try:
        yield session
    finally:
        session.shutdown()
