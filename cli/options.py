"""Bounded click parameter types for the durations and counts users type.

Every duration or count option goes through these types, so an absurd value
(``--dedup-window 99999999999``, ``-n 10**30``, a negative number) is a usage
error (exit 2) with a message saying the allowed range, never a traceback or an
overflow deep in a broker call.  The bounds are generous: they only catch typos.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import click

from ai4s_jobq.durations import (
    MAX_DURATION,
    MAX_INTERVAL_SECONDS,
    DurationError,
    format_duration,
    parse_duration,
)
from ai4s_jobq.ledger.base import check_tag
from ai4s_jobq.task import MAX_NUM_RETRIES

#: Largest count for ``-n`` of ``peek`` / ``dlq list`` (they hold it all in memory).
MAX_LISTED = 100_000
#: Longest lock any backend accepts (Storage Queue's visibility timeout: 7 days;
#: Service Bus allows 5 minutes and says so itself).
MAX_LOCK = timedelta(days=7)
#: Largest number of worker slots (concurrent tasks in one process).
MAX_SLOTS = 10_000


class Duration(click.ParamType):
    """``7``, ``12h``, ``1d12h``...: a bare number is in ``bare_unit``; ``zero_ok``
    lets ``0`` through (e.g. "0 = never")."""

    name = "duration"

    def __init__(self, bare_unit: str, *, maximum: timedelta = MAX_DURATION, zero_ok: bool = False):
        self.bare_unit = bare_unit
        self.maximum = maximum
        self.zero_ok = zero_ok

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, timedelta):
            return value
        if self.zero_ok and str(value).strip() in ("0", f"0{self.bare_unit}"):
            return timedelta(0)
        try:
            return parse_duration(value, bare_unit=self.bare_unit, maximum=self.maximum)
        except DurationError as exc:
            self.fail(str(exc), param, ctx)

    def __repr__(self) -> str:
        return f"Duration(bare_unit={self.bare_unit!r}, max={format_duration(self.maximum)})"


def tag_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--tag``: checked by the library's rule (a usage error, exit 2)."""
    if value is None:
        return None
    try:
        return check_tag(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


class Seconds(click.FloatRange):
    """A number of seconds from ``minimum`` to ``maximum`` (refresh and polling
    intervals).  Unlike ``click.FloatRange`` it refuses ``nan`` (which compares
    false with both bounds, so a range check lets it through) and ``inf``."""

    name = "seconds"

    def __init__(self, minimum: float, maximum: float = MAX_INTERVAL_SECONDS):
        super().__init__(minimum, maximum)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a number of seconds from {self.min:g} to {self.max:g}")
        return seconds


def dedup_keys_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> list[str] | None:
    """``--dedup-keys K1,K2`` as a list; one that names no argument (``""``, ``,,``:
    usually an unset variable) is a usage error, never "dedup on every argument"."""
    if value is None:
        return None
    keys = [key.strip() for key in value.split(",") if key.strip()]
    if not keys:
        raise click.BadParameter(f"{value!r} names no argument (is the variable set?)", ctx, param)
    return keys


def count(minimum: int, maximum: int) -> click.IntRange:
    """An integer count from ``minimum`` to ``maximum``; outside is a usage error."""
    return click.IntRange(minimum, maximum)


NUM_RETRIES = count(0, MAX_NUM_RETRIES)
SLOTS = count(1, MAX_SLOTS)
LISTED = count(1, MAX_LISTED)
FAILURES = count(1, 1_000_000)
