"""Human durations for options such as ``--dedup-window``.

A bare number means days (``7`` is seven days, as ai4s-jobq users expect);
otherwise a sequence of number+unit parts: ``12h``, ``30m``, ``2d``, ``90s``,
``1w``, ``1d12h``.
"""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


class DurationError(ValueError):
    pass


def parse_duration(text: str | int | float | timedelta, *, bare_unit: str = "d") -> timedelta:
    if isinstance(text, timedelta):
        return text
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
        if value <= 0:
            raise DurationError(f"duration must be positive, got {text}")
        return timedelta(seconds=value * _UNITS[bare_unit])
    raw = str(text).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        return parse_duration(float(raw), bare_unit=bare_unit)
    pos, seconds = 0, 0.0
    for match in _PART.finditer(raw):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not raw or pos != len(raw):
        raise DurationError(
            f"{text!r} is not a duration; use a number of days (7) or number+unit "
            "parts such as 12h, 30m, 2d, 90s, 1w, 1d12h"
        )
    if seconds <= 0:
        raise DurationError(f"duration must be positive, got {text!r}")
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or f"{delta.total_seconds():g}s"
