"""``jobq top``: the dashboard's essentials, live in the terminal (rich).

:func:`render_top` turns a :class:`~.snapshot.QueueSnapshot` into a rich renderable
(pure, tested directly); :func:`run_top` refreshes it in a ``rich.live.Live`` until the
user presses ``q`` (or Ctrl-C).  The same snapshot code feeds the web page, so the two
views always show the same numbers.

Keys are read in cbreak mode (no Enter needed, Ctrl-C still a signal) through the event
loop's reader on stdin; the terminal's mode is restored on every exit path.  When stdin
is not a terminal there are no keys to read: Ctrl-C (SIGINT) or SIGTERM quits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..durations import check_interval
from .charts import STATE_COLOURS
from .snapshot import (
    STATE_ORDER,
    QueueSnapshot,
    QueueSource,
    collect,
    format_duration,
    format_rate,
)

SPARK = "▁▂▃▄▅▆▇█"
WORKER_STYLE = {"alive": "green", "stale": "yellow", "stopped": "dim"}


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """The last ``width`` values as block characters scaled to their maximum."""
    values = list(values)[-width:]
    if not values:
        return ""
    top = max(values) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1)))] for v in values)


def _num(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _headline(snap: QueueSnapshot) -> Table:
    grid = Table.grid(padding=(0, 3))
    cells: list[Text] = []

    def cell(label: str, value: str, style: str = "bold") -> None:
        cells.append(Text.assemble((label + " ", "dim"), (value, style)))

    cell("active", _num(snap.active), "bold cyan")
    if snap.scheduled is not None:
        cell("scheduled", _num(snap.scheduled))
    cell("dead-letter", _num(snap.dead_letter), "bold red" if snap.dead_letter else "bold")
    rate = format_rate(snap.rate_per_second)
    cell("throughput", rate + (f" ({snap.rate_source})" if snap.rate_source else ""))
    cell("ETA", format_duration(snap.eta_seconds))
    if snap.has_ledger:
        cell("workers", f"{snap.workers_alive} alive, {snap.workers_stale} stale")
    for _ in cells:
        grid.add_column()
    grid.add_row(*cells)
    return grid


def _states_table(snap: QueueSnapshot) -> Table:
    table = Table(title="Outcomes", title_justify="left", expand=True, box=None)
    table.add_column("tag")
    table.add_column("total", justify="right")
    for state in STATE_ORDER:
        table.add_column(state.replace("_", " "), justify="right", style=STATE_COLOURS[state])
    status = snap.status
    if status is not None:
        table.add_row(
            Text("all tasks", style="italic"),
            _num(status.total),
            *(_num(status.counts.get(s, 0)) for s in STATE_ORDER),
        )
    for tag in snap.tag_outcomes:
        table.add_row(tag.tag, _num(tag.total), *(_num(tag.counts.get(s, 0)) for s in STATE_ORDER))
    return table


def _failures_table(snap: QueueSnapshot) -> RenderableType:
    if not snap.failures:
        return Text("No failed tasks.", style="green")
    table = Table(title="Failures by reason", title_justify="left", expand=True, box=None)
    table.add_column("reason", style="red")
    table.add_column("tasks", justify="right")
    table.add_column("examples")
    table.add_column("last line", overflow="ellipsis", no_wrap=True, ratio=1)
    for group in snap.failures:
        last = (group.example_summary or "").strip().splitlines()
        table.add_row(
            group.reason,
            _num(group.count),
            " ".join(i[:12] for i in group.example_ids),
            last[-1] if last else "",
        )
    return table


def _workers_table(snap: QueueSnapshot) -> RenderableType:
    if not snap.workers:
        return Text("No worker heartbeats in the last hour.", style="dim")
    table = Table(title="Workers", title_justify="left", expand=True, box=None)
    for name, justify in (
        ("state", "left"),
        ("worker", "left"),
        ("host", "left"),
        ("pid", "right"),
        ("slots", "right"),
        ("running", "right"),
        ("done", "right"),
        ("last seen", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in snap.workers[:20]:
        w = row.record
        table.add_row(
            Text(row.state, style=WORKER_STYLE[row.state]),
            w.worker_id,
            w.host,
            str(w.pid),
            str(w.slots),
            str(len(w.running)),
            _num(w.tasks_done),
            format_duration(row.seen_ago) + " ago",
        )
    return table


def render_top(snap: QueueSnapshot, *, names: Sequence[str] = (), selected: int = 0) -> Panel:
    """One frame of ``jobq top`` for ``snap``."""
    parts: list[RenderableType] = [_headline(snap)]
    if snap.counts_error:
        parts.append(Text(f"queue counts unavailable: {snap.counts_error}", style="bold red"))
    depth = [float(s.active) for s in snap.history]
    if depth:
        parts.append(
            Text.assemble(
                ("depth ", "dim"),
                (sparkline(depth, 60), "cyan"),
                (f" max {max(depth):,.0f} over {len(depth)} samples", "dim"),
            )
        )
    if snap.ledger_error:
        style = "bold red" if snap.has_ledger else "yellow"
        parts.append(Text(snap.ledger_error, style=style))
    if snap.status is not None:
        parts += [Text(""), _states_table(snap), Text(""), _failures_table(snap)]
        if snap.durations is not None:
            d = snap.durations
            parts.append(
                Text.assemble(
                    ("\nruntime ", "dim"),
                    (sparkline([c for _, _, c in d.bins], len(d.bins)), "blue"),
                    (
                        f"  n={d.count:,} median {format_duration(d.p50)} "
                        f"p90 {format_duration(d.p90)} p99 {format_duration(d.p99)} "
                        f"max {format_duration(d.max)}",
                        "",
                    ),
                )
            )
        parts += [Text(""), _workers_table(snap)]
    if snap.dead_letters:
        reasons: dict[str, int] = {}
        for dead in snap.dead_letters:
            reasons[dead.reason or "?"] = reasons.get(dead.reason or "?", 0) + 1
        listed = ", ".join(f"{r} ×{n}" for r, n in sorted(reasons.items(), key=lambda x: -x[1]))
        parts.append(Text.assemble(("\ndead-letter queue: ", "dim"), (listed, "red")))
    title = Text("jobq top · ")
    if len(names) > 1:
        for i, name in enumerate(names):
            title.append(" | " if i else "")
            title.append(f"{i + 1}:{name}", style="bold reverse" if i == selected else "")
    else:
        title.append(snap.name)  # a Text, so brackets in a name are never markup
    when = time.strftime("%H:%M:%S", time.localtime(snap.taken_at))
    keys = "q quit" + (", 1-9 queue" if len(names) > 1 else "")
    return Panel(
        Group(*parts),
        title=title,
        title_align="left",
        subtitle=f"{when} · {keys}",
        subtitle_align="right",
    )


@contextlib.contextmanager
def _cbreak(fd: int) -> Iterator[bool]:
    """Single-key input on a terminal; yields whether keys can be read."""
    if not os.isatty(fd):
        yield False
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def run_top(
    sources: Sequence[QueueSource],
    *,
    interval: float = 2.0,
    console: Console | None = None,
    stdin_fd: int | None = None,
) -> None:
    """Refresh until ``q``/``Q``, Ctrl-C or SIGTERM."""
    check_interval("interval", interval)
    console = console or Console()
    loop = asyncio.get_running_loop()
    quit_event = asyncio.Event()
    wake = asyncio.Event()
    selected = 0
    fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    names = [s.name for s in sources]

    def on_key() -> None:
        nonlocal selected
        try:
            data = os.read(fd, 32)
        except OSError:
            data = b""
        if not data:  # end of input: stop watching it
            loop.remove_reader(fd)
            return
        for ch in data.decode("utf-8", "ignore"):
            if ch in "qQ":
                quit_event.set()
            elif ch.isdigit() and 1 <= int(ch) <= len(sources):
                selected = int(ch) - 1
                wake.set()

    with contextlib.ExitStack() as stack:
        keys = stack.enter_context(_cbreak(fd))
        if keys:
            loop.add_reader(fd, on_key)
            stack.callback(loop.remove_reader, fd)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, quit_event.set)
                stack.callback(loop.remove_signal_handler, sig)
        snap = await collect(sources[selected])
        with Live(
            render_top(snap, names=names, selected=selected),
            console=console,
            screen=console.is_terminal,
            auto_refresh=False,
            transient=False,
        ) as live:
            while not quit_event.is_set():
                waiter = asyncio.ensure_future(quit_event.wait())
                woken = asyncio.ensure_future(wake.wait())
                await asyncio.wait({waiter, woken}, timeout=interval, return_when="FIRST_COMPLETED")
                for future in (waiter, woken):
                    future.cancel()
                wake.clear()
                if quit_event.is_set():
                    break
                snap = await collect(sources[selected])
                live.update(render_top(snap, names=names, selected=selected), refresh=True)
