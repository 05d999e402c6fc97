"""The worker's own task-duration histogram (``telemetry/durations.py``).

It replaces the SDK's histogram on the hot path, so it must export what the SDK's
would have: the same durations recorded into both give equal data points (count,
sum, buckets and their bounds, min, max), cumulative or delta as the exporter
prefers; and it joins the ``ai4s_jobq`` scope of the export it is added to."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import Histogram as HistogramInstrument  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import (  # noqa: E402
    AggregationTemporality,
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope  # noqa: E402

from ai4s_jobq.telemetry.durations import TaskDurations, WithTaskDurations  # noqa: E402

# Bucket edges themselves (a value on a bound falls in the bucket it closes),
# values between, beyond the last bound, zero.
VALUES = [0.0, 0.003, 5.0, 5.0001, 12.5, 99.9, 100.0, 7_500.0, 12_000.0, 250.0, 0.2]
ATTRIBUTES = {"messaging.destination.name": "q", "jobq.task.outcome": "succeeded"}
SCOPE = InstrumentationScope("ai4s_jobq", "1.0")


def durations() -> TaskDurations:
    return TaskDurations("jobq.task.duration", "s", "How long", SCOPE)


def sdk_points(values: list[float], temporality: AggregationTemporality, exports: int = 1):
    """The SDK histogram's data points for ``values`` split over ``exports`` reads."""
    reader = InMemoryMetricReader(preferred_temporality={HistogramInstrument: temporality})
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    histogram = provider.get_meter("ai4s_jobq", "1.0").create_histogram("d", unit="s")
    points = []
    for part in split(values, exports):
        for value in part:
            histogram.record(value, ATTRIBUTES)
        data = reader.get_metrics_data()
        (point,) = data.resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
        points.append(point)
    provider.shutdown()
    return points


def split(values: list[float], parts: int) -> list[list[float]]:
    size = -(-len(values) // parts)
    return [values[i : i + size] for i in range(0, len(values), size)]


class Captured(MetricExporter):
    def __init__(self, temporality: AggregationTemporality):
        super().__init__(preferred_temporality={HistogramInstrument: temporality})
        self.exports: list[MetricsData] = []

    def export(self, metrics_data, timeout_millis=10_000, **kwargs):
        self.exports.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis=10_000):
        return True

    def shutdown(self, timeout_millis=30_000, **kwargs):
        pass


def our_points(values: list[float], temporality: AggregationTemporality, exports: int = 1):
    """Our data points for ``values``, through a wrapped exporter under a reader."""
    task_durations = durations()
    captured = Captured(temporality)
    exporter = WithTaskDurations(captured, task_durations)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    provider.get_meter("ai4s_jobq", "1.0").create_counter("other").add(1)  # the scope
    series = task_durations.series(ATTRIBUTES)
    points = []
    for part in split(values, exports):
        for value in part:
            series.record(value)
        exporter.export(reader.get_metrics_data())
        metrics = captured.exports[-1].resource_metrics[0].scope_metrics[0].metrics
        assert [m.name for m in metrics] == ["other", "jobq.task.duration"]  # same scope
        histogram = metrics[1].data
        assert histogram.aggregation_temporality == temporality
        (point,) = histogram.data_points
        points.append(point)
    provider.shutdown()
    return points


def same(ours, theirs) -> None:
    assert dict(ours.attributes) == dict(theirs.attributes)
    assert (ours.count, ours.bucket_counts, tuple(ours.explicit_bounds)) == (
        theirs.count,
        list(theirs.bucket_counts),
        tuple(theirs.explicit_bounds),
    )
    assert ours.sum == pytest.approx(theirs.sum)
    assert (ours.min, ours.max) == (theirs.min, theirs.max)


@pytest.mark.parametrize("exports", [1, 3])
@pytest.mark.parametrize(
    "temporality", [AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA]
)
def test_the_histogram_exports_what_the_sdk_histogram_would(temporality, exports):
    ours = our_points(VALUES, temporality, exports)
    theirs = sdk_points(VALUES, temporality, exports)
    assert len(ours) == len(theirs) == exports
    for mine, sdk in zip(ours, theirs):
        same(mine, sdk)
    if temporality == AggregationTemporality.DELTA and exports > 1:
        assert ours[1].start_time_unix_nano == ours[0].time_unix_nano  # back to back


def test_nothing_recorded_adds_nothing():
    captured = Captured(AggregationTemporality.CUMULATIVE)
    exporter = WithTaskDurations(captured, durations())
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    provider.get_meter("ai4s_jobq", "1.0").create_counter("other").add(1)
    exporter.export(reader.get_metrics_data())
    (scope,) = captured.exports[0].resource_metrics[0].scope_metrics
    assert [m.name for m in scope.metrics] == ["other"]
    provider.shutdown()


def test_a_scope_missing_from_the_export_is_added():
    task_durations = durations()
    task_durations.series(ATTRIBUTES).record(1.0)
    captured = Captured(AggregationTemporality.CUMULATIVE)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    provider.get_meter("someone.else").create_counter("other").add(1)
    WithTaskDurations(captured, task_durations).export(reader.get_metrics_data())
    scopes = captured.exports[0].resource_metrics[0].scope_metrics
    assert [(s.scope.name, [m.name for m in s.metrics]) for s in scopes] == [
        ("someone.else", ["other"]),
        ("ai4s_jobq", ["jobq.task.duration"]),
    ]
    provider.shutdown()
