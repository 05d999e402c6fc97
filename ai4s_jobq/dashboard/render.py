"""HTML for the dashboard: Jinja2 templates over :class:`~.snapshot.QueueSnapshot`.

Why Jinja2: the page is rendered on the server so that every number is in the HTML
(readable with JavaScript off, by ``curl``, by a screen reader), and task IDs, error
summaries and commands are user data that must be escaped: Jinja2's autoescaping does
that in one place instead of at every interpolation.  It is small, fast (templates are
compiled once) and ships its templates from the package (``templates/``).

The page is split into the whole document (``page.html``) and its ``<main>`` part
(``main.html``): the page's own script fetches the latter to refresh in place.
"""

from __future__ import annotations

import json
import time
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from ..ledger.base import TaskRecord, TaskState
from . import charts
from .snapshot import STATE_ORDER, QueueSnapshot, format_duration, format_rate

_env: Environment | None = None


def environment() -> Environment:
    global _env
    if _env is None:
        env = Environment(
            loader=PackageLoader("ai4s_jobq.dashboard", "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        env.filters.update(
            duration=format_duration,
            rate=format_rate,
            number=lambda v: "—" if v is None else f"{v:,}",
            when=_when,
            ago=lambda s: format_duration(s) + " ago",
        )
        env.globals.update(
            state_colours=charts.STATE_COLOURS, state_order=STATE_ORDER, TaskState=TaskState
        )
        _env = env
    return _env


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _charts(snap: QueueSnapshot) -> dict[str, Markup]:
    depth = [("active", [(s.at, float(s.active)) for s in snap.history])]
    if any(s.dead_letter for s in snap.history):
        depth.append(("dead-letter", [(s.at, float(s.dead_letter)) for s in snap.history]))
    if any(s.scheduled for s in snap.history):
        depth.append(("scheduled", [(s.at, float(s.scheduled or 0)) for s in snap.history]))
    out = {
        "depth": Markup(charts.line_chart(depth, label="Queue depth over time", now=snap.taken_at)),
        "runtime": Markup(
            charts.histogram(
                snap.durations.bins if snap.durations else [],
                label="Task runtime distribution",
                log_scale=bool(snap.durations and snap.durations.log_scale),
            )
        ),
    }
    if snap.status is not None:
        out["overall"] = Markup(
            charts.stacked_bar(snap.status.counts, snap.status.total, label="All tasks by state")
        )
    for i, tag in enumerate(snap.tag_outcomes):
        out[f"tag{i}"] = Markup(
            charts.stacked_bar(tag.counts, tag.total, label=f"Tag {tag.tag} by state")
        )
    return out


def page_context(
    names: list[str], selected: int, snap: QueueSnapshot, refresh_seconds: float
) -> dict[str, Any]:
    return {
        "snap": snap,
        "queues": names,
        "selected": selected,
        "refresh_seconds": refresh_seconds,
        "charts": _charts(snap),
        "generated": _when(snap.taken_at),
    }


def render_page(
    names: list[str], selected: int, snap: QueueSnapshot, refresh_seconds: float
) -> str:
    """The whole document."""
    context = page_context(names, selected, snap, refresh_seconds)
    return environment().get_template("page.html").render(context)


def render_main(
    names: list[str], selected: int, snap: QueueSnapshot, refresh_seconds: float
) -> str:
    """Only the ``<main>`` content, for the in-place refresh."""
    context = page_context(names, selected, snap, refresh_seconds)
    return environment().get_template("main.html").render(context)


def render_task(queue_name: str, selected: int, record: TaskRecord | None, task_id: str) -> str:
    result_json = (
        json.dumps(record.result, indent=2, sort_keys=True, default=str)
        if record is not None and record.result is not None
        else None
    )
    return (
        environment()
        .get_template("task.html")
        .render(
            queue=queue_name,
            selected=selected,
            record=record,
            task_id=task_id,
            result_json=result_json,
        )
    )


def render_message(title: str, message: str) -> str:
    return environment().get_template("message.html").render(title=title, message=message)
