"""The standard ``OTEL_*`` variables that size the SDK's batches and export intervals.

Why jobq reads them itself: the OpenTelemetry specification says that an invalid value
of such a variable is warned about and treated as unset.  The Python SDK (1.45) raises
on some instead -- ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE=0``, ``OTEL_BLRP_MAX_QUEUE_SIZE=-5``,
``OTEL_METRIC_EXPORT_INTERVAL=-1`` made ``jobq push`` and ``jobq worker`` die with a
traceback -- and logs a traceback for others (``OTEL_BSP_SCHEDULE_DELAY=abc``).  Here
each variable is read once, an invalid one (not a positive number, absurdly large,
or a batch larger than its queue) costs one warning that names it, and the SDK classes get explicit
arguments, so they never read the environment themselves: a typo in a telemetry
setting never stops a worker.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ai4s_jobq.telemetry")


#: The largest value taken: a size (spans or records held in memory), a time (ms, one
#: day).  Past it the SDK overflows (a deque or a timer cannot be that large) or the
#: value is a typo; either way it is treated as invalid.
MAX_SIZE = 10_000_000
MAX_MILLIS = 86_400_000


@dataclass(frozen=True)
class Setting:
    """One variable: the SDK class's argument it sets, and the SDK's default."""

    variable: str
    argument: str
    default: int

    @property
    def maximum(self) -> int:
        return MAX_MILLIS if self.argument.endswith("_millis") else MAX_SIZE


#: ``BatchSpanProcessor``'s settings (the SDK's defaults).
SPAN_BATCH = (
    Setting("OTEL_BSP_SCHEDULE_DELAY", "schedule_delay_millis", 5000),
    Setting("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "max_export_batch_size", 512),
    Setting("OTEL_BSP_EXPORT_TIMEOUT", "export_timeout_millis", 30000),
    Setting("OTEL_BSP_MAX_QUEUE_SIZE", "max_queue_size", 2048),
)
#: ``BatchLogRecordProcessor``'s settings.
LOG_BATCH = (
    Setting("OTEL_BLRP_SCHEDULE_DELAY", "schedule_delay_millis", 1000),
    Setting("OTEL_BLRP_MAX_EXPORT_BATCH_SIZE", "max_export_batch_size", 512),
    Setting("OTEL_BLRP_EXPORT_TIMEOUT", "export_timeout_millis", 30000),
    Setting("OTEL_BLRP_MAX_QUEUE_SIZE", "max_queue_size", 2048),
)
#: ``PeriodicExportingMetricReader``'s settings.
METRIC_READER = (
    Setting("OTEL_METRIC_EXPORT_INTERVAL", "export_interval_millis", 60000),
    Setting("OTEL_METRIC_EXPORT_TIMEOUT", "export_timeout_millis", 30000),
)


def settings_from_env(
    settings: tuple[Setting, ...],
    environ: Mapping[str, str],
    defaults: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for the SDK class that ``settings`` describe: each variable's
    value if it is a positive number, else its default (``defaults``, by variable
    name, replaces the SDK's where jobq has its own), with a warning when it was set.
    A batch larger than its queue is cut to the queue's size (the SDK refuses it),
    with a warning if the batch size was set."""
    arguments: dict[str, Any] = {}
    given: set[str] = set()
    for setting in settings:
        default = (defaults or {}).get(setting.variable, setting.default)
        raw = environ.get(setting.variable, "").strip()
        arguments[setting.argument] = _positive(raw, setting, default) if raw else default
        if raw and arguments[setting.argument] != default:
            given.add(setting.argument)
    batch, queue = arguments.get("max_export_batch_size"), arguments.get("max_queue_size")
    if batch is not None and queue is not None and batch > queue:
        if "max_export_batch_size" in given:
            log.warning(
                "telemetry: an export batch of %d is larger than its queue of %d; using %d",
                batch,
                queue,
                queue,
            )
        arguments["max_export_batch_size"] = queue
    return arguments


def _positive(raw: str, setting: Setting, default: int) -> int:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 1 <= value <= setting.maximum):
        log.warning(
            "telemetry: %s=%r is not a number from 1 to %d; using %d",
            setting.variable,
            raw[:40],
            setting.maximum,
            default,
        )
        return default
    return int(value)
