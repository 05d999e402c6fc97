"""Human durations for options such as ``--dedup-window``.

A bare number means days (``7`` is seven days, as ai4s-jobq users expect);
otherwise a sequence of number+unit parts: ``12h``, ``30m``, ``2d``, ``90s``,
``1w``, ``1d12h``.

Every duration is bounded (at most :data:`MAX_DURATION` unless the caller says
less): a value beyond any sensible setting is a typo, and left alone it would
overflow ``timedelta`` or a broker's field and surface as a traceback.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_UNIT_NAMES = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


#: The longest duration any option takes (ten years).
MAX_DURATION = timedelta(days=3650)
#: The longest refresh or polling interval (a day): beyond it is a typo, and an
#: infinite one broke the dashboard's page.
MAX_INTERVAL_SECONDS = 86_400.0


def check_timeout(timeout: float | None) -> float | None:
    """A wait's ``timeout`` in seconds: None or inf (no limit, as None), else a number
    from 0 up; a ValueError for a negative one or nan (which would never time out)."""
    if timeout is None or timeout == math.inf:
        return None
    if not timeout >= 0:  # also true for nan
        raise ValueError(f"timeout must be None or a number of seconds from 0 up, got {timeout}")
    return float(timeout)


def check_interval(name: str, seconds: float, minimum: float = 0.0) -> float:
    """``seconds`` if it is above ``minimum`` (or equal to a non-zero one) and at most
    :data:`MAX_INTERVAL_SECONDS`; a ValueError naming ``name`` otherwise (nan too)."""
    low_ok = seconds >= minimum if minimum > 0 else seconds > 0
    if not (low_ok and seconds <= MAX_INTERVAL_SECONDS):  # both false for nan
        raise ValueError(
            f"{name} must be from {minimum:g} to {MAX_INTERVAL_SECONDS:g} seconds, got {seconds}"
        )
    return seconds


class DurationError(ValueError):
    pass


def parse_duration(
    text: str | int | float | timedelta,
    *,
    bare_unit: str = "d",
    maximum: timedelta = MAX_DURATION,
) -> timedelta:
    """A positive duration of at most ``maximum``; :class:`DurationError` otherwise."""
    seconds = _seconds(text, bare_unit)
    if not math.isfinite(seconds) or seconds <= 0:
        raise DurationError(f"duration must be positive, got {text!r}")
    if seconds > maximum.total_seconds():
        raise DurationError(f"duration {text!r} is too long: at most {format_duration(maximum)}")
    return timedelta(seconds=seconds)


def _seconds(text: str | int | float | timedelta, bare_unit: str) -> float:
    if isinstance(text, timedelta):
        return text.total_seconds()
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        try:
            return float(text) * _UNITS[bare_unit]
        except OverflowError:  # an int too large for a float
            return math.inf
    raw = str(text).strip().lower().replace(" ", "")
    if len(raw) > 100:
        raise DurationError(f"{str(text)[:40]!r}... is not a duration (too long)")
    if re.fullmatch(r"-?\d+(\.\d+)?", raw):
        return float(raw) * _UNITS[bare_unit]
    pos, seconds = 0, 0.0
    for match in _PART.finditer(raw):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not raw or pos != len(raw):
        unit = _UNIT_NAMES[bare_unit]
        raise DurationError(
            f"{text!r} is not a duration; use a number of {unit} or number+unit "
            "parts such as 12h, 30m, 2d, 90s, 1w, 1d12h"
        )
    return seconds


def format_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or f"{delta.total_seconds():g}s"
