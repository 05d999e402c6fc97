"""Inline SVG charts, drawn on the server.

Why hand-written SVG rather than a charting library: the page must work offline, with
JavaScript off, and answer in a few milliseconds; the three charts it needs (a line of
queue depth over time, a runtime histogram, a stacked bar per tag) are each a few dozen
lines of geometry.  A JS library (Plotly is ~3.5 MB) would have to ship in the package
and would draw nothing without JavaScript; a Python one (matplotlib, pygal) would add a
heavy dependency for the same rectangles.  Measured: all charts of a page with a full
hour of depth samples (2 x 720 points), a 20-bin histogram and 13 stacked bars take
~14 ms on the shared 2-core development machine; ``bench/bench_dashboard.py`` reports
the whole page.

Every chart is an ``<svg role="img">`` with an ``aria-label`` and native ``<title>``
tooltips, sized by its ``viewBox`` so it scales with the page.  Functions return
markup strings; every text that comes from data is escaped here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from html import escape

#: one colour per task state, shared by the charts, the CSS legend and ``jobq top``
STATE_COLOURS = {
    "succeeded": "#2e7d32",
    "running": "#1565c0",
    "queued": "#90a4ae",
    "failed": "#ef6c00",
    "interrupted": "#7b1fa2",
    "dead_lettered": "#c62828",
}
SERIES_COLOURS = {"active": "#1565c0", "dead-letter": "#c62828", "scheduled": "#90a4ae"}


def nice_ceiling(value: float, minimum: float = 5.0) -> float:
    """The smallest 1/2/5 x 10^n at or above ``value`` and ``minimum`` (axis maximum;
    the minimum of 5 keeps the ticks of small counts whole numbers)."""
    value = max(value, minimum)
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        candidate = step * 10**exponent
        if candidate >= value:
            return float(candidate)
    return float(10 ** (exponent + 1))  # pragma: no cover - loop always returns


def short_number(value: float) -> str:
    if abs(value) >= 1_000_000:
        return f"{value / 1_000_000:.3g}M"
    if abs(value) >= 10_000:
        return f"{value / 1000:.3g}k"
    if value == int(value):
        return f"{int(value):,}"
    return f"{value:.3g}"


def short_seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.3g} ms"
    if value < 120:
        return f"{value:.3g} s"
    if value < 7200:
        return f"{value / 60:.3g} m"
    return f"{value / 3600:.3g} h"


def _svg(
    width: int, height: int, label: str, body: list[str], css_class: str, aspect: str = "meet"
) -> str:
    """``aspect="none"`` lets a bar stretch to its cell (a table column's width)."""
    fit = "none" if aspect == "none" else "xMidYMid meet"
    return (
        f'<svg class="chart {css_class}" role="img" aria-label="{escape(label)}" '
        f'viewBox="0 0 {width} {height}" preserveAspectRatio="{fit}" '
        f'xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(label)}</title>{''.join(body)}</svg>"
    )


def _empty(width: int, height: int, label: str, message: str, css_class: str) -> str:
    return _svg(
        width,
        height,
        label,
        [
            f'<rect class="frame" x="0.5" y="0.5" width="{width - 1}" height="{height - 1}"/>',
            f'<text class="empty" x="{width / 2}" y="{height / 2}" text-anchor="middle">'
            f"{escape(message)}</text>",
        ],
        css_class + " chart-empty",
    )


def line_chart(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    *,
    label: str,
    now: float | None = None,
    width: int = 1200,
    height: int = 240,
) -> str:
    """Lines of (time, value) points against a shared time axis ending at ``now``."""
    points_all = [p for _, points in series for p in points]
    if len({t for t, _ in points_all}) < 2:
        return _empty(width, height, label, "collecting samples…", "line")
    now = now or time.time()
    left, right, top, bottom = 48, 12, 26, 24
    t0 = min(t for t, _ in points_all)
    t1 = max(max(t for t, _ in points_all), min(now, t0 + 1e9))
    span = max(t1 - t0, 1e-9)
    ymax = nice_ceiling(max((v for _, v in points_all), default=0))
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(t: float) -> float:
        return left + (t - t0) / span * plot_w

    def y(v: float) -> float:
        return top + plot_h - v / ymax * plot_h

    body = [f'<rect class="frame" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}"/>']
    divisions = _divisions(ymax)
    for i in range(divisions + 1):
        value = ymax * i / divisions
        yy = y(value)
        body.append(
            f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{yy:.1f}" y2="{yy:.1f}"/>'
        )
        body.append(
            f'<text class="tick" x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">'
            f"{short_number(value)}</text>"
        )
    for i in range(4):
        t = t0 + span * i / 3
        anchor = "start" if i == 0 else "end" if i == 3 else "middle"
        ago = "now" if i == 3 else f"-{short_seconds(max(t1 - t, 0))}"
        body.append(
            f'<text class="tick" x="{x(t):.1f}" y="{height - 6}" text-anchor="{anchor}">'
            f"{escape(ago)}</text>"
        )
    legend_x = left
    for name, points in series:
        colour = SERIES_COLOURS.get(name, "#455a64")
        if points:
            path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
            last_t, last_v = points[-1]
            body.append(
                f'<polyline class="series" data-series="{escape(name)}" fill="none" '
                f'stroke="{colour}" stroke-width="2" points="{path}">'
                f"<title>{escape(name)}: {short_number(last_v)} now</title></polyline>"
            )
            body.append(
                f'<circle cx="{x(last_t):.1f}" cy="{y(last_v):.1f}" r="3" fill="{colour}"/>'
            )
        current = short_number(points[-1][1]) if points else "—"
        body.append(f'<rect x="{legend_x}" y="8" width="10" height="10" fill="{colour}"/>')
        body.append(
            f'<text class="legend" x="{legend_x + 14}" y="17">{escape(name)} {current}</text>'
        )
        legend_x += 150
    return _svg(width, height, label, body, "line")


def histogram(
    bins: Sequence[tuple[float, float, int]],
    *,
    label: str,
    log_scale: bool = False,
    width: int = 520,
    height: int = 200,
) -> str:
    """Bars of (low, high, count) runtime bins, labelled in seconds."""
    if not bins or not any(c for _, _, c in bins):
        return _empty(width, height, label, "no finished tasks yet", "histogram")
    left, right, top, bottom = 48, 12, 12, 24
    plot_w, plot_h = width - left - right, height - top - bottom
    ymax = nice_ceiling(max(c for _, _, c in bins))
    divisions = _divisions(ymax)
    bar_w = plot_w / len(bins)
    body = [f'<rect class="frame" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}"/>']
    for i in range(divisions + 1):
        value = ymax * i / divisions
        yy = top + plot_h - value / ymax * plot_h
        body.append(
            f'<text class="tick" x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">'
            f"{short_number(value)}</text>"
        )
    for i, (low, high, count) in enumerate(bins):
        h = count / ymax * plot_h
        xx = left + i * bar_w
        body.append(
            f'<rect class="bar" x="{xx + 1:.1f}" y="{top + plot_h - h:.1f}" '
            f'width="{max(bar_w - 2, 1):.1f}" height="{h:.1f}">'
            f"<title>{short_seconds(low)} – {short_seconds(high)}: {count:,} tasks</title></rect>"
        )
    for i in (0, len(bins) // 2, len(bins)):
        edge = bins[0][0] if i == 0 else bins[i - 1][1]
        anchor = "start" if i == 0 else "end" if i == len(bins) else "middle"
        body.append(
            f'<text class="tick" x="{left + i * bar_w:.1f}" y="{height - 6}" '
            f'text-anchor="{anchor}">{escape(short_seconds(edge))}</text>'
        )
    if log_scale:
        body.append(
            f'<text class="tick" x="{left + plot_w - 4}" y="{top + 12}" '
            'text-anchor="end">log scale</text>'
        )
    return _svg(width, height, label, body, "histogram")


def _divisions(ymax: float) -> int:
    """Grid divisions that give round tick values for a 1/2/5 x 10^n maximum."""
    leading = round(ymax / 10 ** math.floor(math.log10(ymax)))
    return 4 if leading == 2 else 5


def stacked_bar(
    counts: dict[str, int], total: int, *, label: str, width: int = 320, height: int = 18
) -> str:
    """One horizontal bar split by state, widest states first in the fixed state order."""
    if total <= 0:
        return _empty(width, height, label, "no tasks", "stacked")
    body = []
    xx = 0.0
    for state, colour in STATE_COLOURS.items():
        count = counts.get(state, 0)
        if not count:
            continue
        w = count / total * width
        body.append(
            f'<rect class="segment" data-state="{state}" x="{xx:.2f}" y="0" width="{w:.2f}" '
            f'height="{height}" fill="{colour}"><title>{state}: {count:,}</title></rect>'
        )
        xx += w
    return _svg(width, height, label, body, "stacked", aspect="none")
