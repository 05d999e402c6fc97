"""The task-duration histogram, aggregated by the worker and added at export time.

Why not the SDK's histogram: its ``record`` validates and copies the attributes,
sorts and hashes them to find the series, and takes two locks -- 20 us per call in a
tight loop and about twice that inside a worker (opentelemetry-sdk 1.45, the
development VM), a fifth of a no-op task's whole cost, on the worker's thread.
Here a worker's series are made once (one per outcome) and a task's duration is a
``bisect`` and four additions under one lock.

How it reaches the exporters: OpenTelemetry's Python SDK has no public way to feed a
metric reader data that was aggregated elsewhere, so :class:`WithTaskDurations`
wraps each metric exporter that :mod:`._sdk` builds (OTLP and Azure Monitor alike)
and adds the histogram -- SDK ``HistogramDataPoint`` objects, the exporter's own
input type -- to the ``ai4s_jobq`` scope of every export.  The series, the bucket
bounds (the SDK's defaults, so the exported metric is what the SDK histogram gave)
and the temporality the exporter prefers (cumulative, or delta as Azure Monitor
and ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=delta`` ask) are the same as
before; what is lost is exemplars, so :class:`~.worker_hook.TelemetryHook` keeps
the SDK histogram when ``OTEL_METRICS_EXEMPLAR_FILTER`` asks for them, or when the
meter provider is not the one :mod:`._sdk` installed.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import replace
from time import time_ns
from typing import Any

from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    ScopeMetrics,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

# The SDK's default explicit bucket bounds (ExplicitBucketHistogramAggregation).
BOUNDARIES: tuple[float, ...] = (0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0)
BOUNDARIES += (750.0, 1000.0, 2500.0, 5000.0, 7500.0, 10000.0)
_INF = float("inf")


class Series:
    """One attribute set's cumulative histogram (a worker's queue and one outcome)."""

    __slots__ = ("attributes", "counts", "count", "sum", "min", "max", "windows", "_lock")

    def __init__(self, attributes: Mapping[str, Any], lock: threading.Lock, windows: int):
        self.attributes = dict(attributes)
        self.counts = [0] * (len(BOUNDARIES) + 1)
        self.count = 0
        self.sum = 0.0
        self.min = _INF
        self.max = -_INF
        # The extremes since each delta exporter's last export (min and max are of
        # the interval there); cumulative exporters use the totals above.
        self.windows = [[_INF, -_INF] for _ in range(windows)]
        self._lock = lock

    def record(self, value: float) -> None:
        # bisect_left: bucket i holds bounds[i-1] < value <= bounds[i], as OTLP says.
        with self._lock:
            self.counts[bisect_left(BOUNDARIES, value)] += 1
            self.count += 1
            self.sum += value
            if value < self.min:
                self.min = value
            if value > self.max:
                self.max = value
            for window in self.windows:
                if value < window[0]:
                    window[0] = value
                if value > window[1]:
                    window[1] = value

    def snapshot(self, window: int | None) -> tuple[list[int], int, float, float, float]:
        """Totals, and the extremes: overall, or ``window``'s (then reset)."""
        with self._lock:
            low, high = self.min, self.max
            if window is not None:
                low, high = self.windows[window]
                self.windows[window] = [_INF, -_INF]
            return list(self.counts), self.count, self.sum, low, high


class TaskDurations:
    """The histogram's series, shared by a session's worker hooks (writers) and its
    wrapped exporters (readers)."""

    def __init__(self, name: str, unit: str, description: str, scope: InstrumentationScope):
        self.name, self.unit, self.description, self.scope = name, unit, description, scope
        self.start_time = time_ns()
        self._lock = threading.Lock()
        self._series: dict[tuple[tuple[str, Any], ...], Series] = {}
        self._windows = 0

    def series(self, attributes: Mapping[str, Any]) -> Series:
        key = tuple(sorted(attributes.items()))
        with self._lock:
            found = self._series.get(key)
            if found is None:
                found = self._series[key] = Series(attributes, self._lock, self._windows)
            return found

    def open_window(self) -> int:
        """A new window of extremes in every series, for one delta exporter."""
        with self._lock:
            for series in self._series.values():
                series.windows.append([_INF, -_INF])
            self._windows += 1
            return self._windows - 1

    def all_series(self) -> list[Series]:
        with self._lock:
            return list(self._series.values())


class TaskMeterProvider(MeterProvider):
    """The SDK's meter provider, carrying the :class:`TaskDurations` its readers'
    exporters add (None: the hook records durations in an SDK histogram)."""

    def __init__(self, *args: Any, task_durations: TaskDurations | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.task_durations = task_durations


class WithTaskDurations(MetricExporter):
    """A metric exporter that adds ``durations`` to what its reader collected."""

    def __init__(self, inner: MetricExporter, durations: TaskDurations):
        # The inner exporter's preferences, so the reader treats both alike.
        super().__init__(
            preferred_temporality=getattr(inner, "_preferred_temporality", None),
            preferred_aggregation=getattr(inner, "_preferred_aggregation", None),
        )
        self.inner = inner
        self.durations = durations
        preferred = self._preferred_temporality or {}
        self.delta = preferred.get(HistogramInstrument) == AggregationTemporality.DELTA
        self._reported: dict[int, tuple[list[int], int, float]] = {}  # delta: last totals
        self._window = durations.open_window() if self.delta else None
        self._last_time = durations.start_time

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        metric = self._collect()
        if metric is not None:
            metrics_data = with_metric(metrics_data, metric, self.durations.scope)
        return self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)

    def _collect(self) -> Metric | None:
        now = time_ns()
        points = []
        for series in self.durations.all_series():
            counts, count, total, low, high = series.snapshot(self._window)
            if not count:
                continue
            start = self.durations.start_time
            if self.delta:  # what was added since the last export
                before = self._reported.get(id(series))
                self._reported[id(series)] = (counts, count, total)
                if before is not None:
                    counts = [a - b for a, b in zip(counts, before[0])]
                    count, total = count - before[1], total - before[2]
                start = self._last_time
                if not count:
                    continue
            points.append(
                HistogramDataPoint(
                    attributes=series.attributes,
                    start_time_unix_nano=start,
                    time_unix_nano=now,
                    count=count,
                    sum=total,
                    bucket_counts=counts,
                    explicit_bounds=BOUNDARIES,
                    min=low,
                    max=high,
                )
            )
        self._last_time = now
        if not points:
            return None
        temporality = (
            AggregationTemporality.DELTA if self.delta else AggregationTemporality.CUMULATIVE
        )
        return Metric(
            name=self.durations.name,
            description=self.durations.description,
            unit=self.durations.unit,
            data=Histogram(data_points=points, aggregation_temporality=temporality),
        )


def with_metric(data: MetricsData, metric: Metric, scope: InstrumentationScope) -> MetricsData:
    """``data`` with ``metric`` added to ``scope``'s metrics (by name and version),
    or to a new scope of the first resource."""
    if not data.resource_metrics:
        return data  # the reader collected nothing: there is no resource to add to
    resources = list(data.resource_metrics)
    for index, resource in enumerate(resources):
        scopes: Sequence[ScopeMetrics] = resource.scope_metrics
        for position, scoped in enumerate(scopes):
            if scoped.scope.name == scope.name and scoped.scope.version == scope.version:
                merged = replace(scoped, metrics=[*scoped.metrics, metric])
                resources[index] = replace(
                    resource, scope_metrics=[*scopes[:position], merged, *scopes[position + 1 :]]
                )
                return MetricsData(resource_metrics=resources)
    first = resources[0]
    added = ScopeMetrics(scope=scope, metrics=[metric], schema_url="")
    resources[0] = replace(first, scope_metrics=[*first.scope_metrics, added])
    return MetricsData(resource_metrics=resources)
