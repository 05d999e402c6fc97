"""``jobq wait``, ``status``, ``tasks``, ``result``, ``workers`` and ``ledger prune``:
the commands that read (or prune) a queue's outcome ledger (:mod:`ai4s_jobq.ledger`).

Thin over the library: each command opens the queue, calls one ``JobQ``/store method
and prints.  Every read command has ``--json``.  A queue without a ledger (Service Bus
without ``--ledger``) and an unreachable ledger exit 4 with a message that says what to
set; ``wait --drained`` needs no ledger.

``jobq wait`` exit codes: 0 every task succeeded, 1 any was dead-lettered (or an ID /
tag is unknown to the ledger), 124 timeout, 4 configuration or connection error.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any, TextIO

import click

from ai4s_jobq.jobq import JobQ
from ai4s_jobq.ledger.base import (
    DEFAULT_RETENTION_DAYS,
    TaskRecord,
    TaskState,
    WorkerRecord,
)
from ai4s_jobq.ledger.recorder import heartbeat_seconds_from_env
from ai4s_jobq.ledger.resolve import require
from ai4s_jobq.ledger.wait import EXIT_OK, EXIT_TIMEOUT, WaitProgress, WaitReport

from .common import open_queue, run
from .lines import numbered_lines
from .options import LISTED, Duration, tag_option

#: A line of ``jobq push --json`` output is under a kilobyte; --from reads at most this.
MAX_ID_LINE_CHARS = 1024 * 1024

EXIT_CONFIG = 4
PLAIN_PROGRESS_EVERY = 10.0


def _run(coro: Any) -> Any:
    """``common.run``: known errors (a ledger error included) exit 4 with a clean message."""
    return run(coro)


def _open(ctx: click.Context) -> Any:
    return open_queue(ctx, check=False, create=False)


def _timeout(ctx: click.Context, param: click.Parameter, value: Any) -> float | None:
    converted = Duration("s", zero_ok=True).convert(value, param, ctx) if value else None
    return None if converted is None else converted.total_seconds()


# ---------------------------------------------------------------------- wait


@click.command("wait")
@click.argument("ids", nargs=-1)
@click.option(
    "--tag", metavar="NAME", callback=tag_option, help="Wait for every task pushed with --tag NAME."
)
@click.option(
    "--from",
    "from_file",
    type=click.File("r", encoding="utf-8"),
    metavar="FILE",
    help="Read task IDs from the JSON lines `jobq push --json` printed ('-' for stdin).",
)
@click.option(
    "--drained",
    is_flag=True,
    help="Wait until the queue has no active or scheduled messages (no ledger needed).",
)
@click.option("--timeout", callback=_timeout, metavar="D", help="Give up after D (exit 124).")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar (default: on a terminal)."
)
@click.pass_context
def wait_command(
    ctx: click.Context,
    ids: tuple[str, ...],
    tag: str | None,
    from_file: TextIO | None,
    drained: bool,
    timeout: float | None,
    as_json: bool,
    progress: bool | None,
) -> None:
    """Block until tasks are succeeded or dead-lettered. Exit 0 all succeeded, 1 any
    dead-lettered or unknown, 124 timeout, 4 configuration/connection error."""
    wanted = list(ids) + (list(ids_from_push_output(from_file)) if from_file else [])
    if drained:
        if wanted or tag:
            raise click.UsageError("--drained waits for the whole queue: give no IDs or --tag")
        sys.exit(_wait_drained(ctx, timeout, as_json))
    if wanted and tag:
        raise click.UsageError("wait on task IDs or on --tag NAME, not both")
    if not wanted and tag is None:
        if from_file is not None:
            click.echo("nothing to wait for: no task IDs in --from", err=True)
            sys.exit(EXIT_OK)
        raise click.UsageError(
            "name what to wait for: task IDs (arguments or --from FILE), --tag NAME, or --drained"
        )
    show = sys.stderr.isatty() if progress is None else progress

    async def main() -> WaitReport:
        async with _open(ctx) as q:
            return await wait_on(q, wanted or None, tag, timeout, show, as_json)

    report = _run(main())
    print_report(report, as_json=as_json)
    sys.exit(report.exit_code)


async def wait_on(
    q: JobQ,
    ids: list[str] | None,
    tag: str | None,
    timeout: float | None,
    show_progress: bool,
    quiet: bool = False,
) -> WaitReport:
    """Wait with a progress display: a rich bar on a terminal, else a plain line every
    ``PLAIN_PROGRESS_EVERY`` seconds on stderr (none with ``quiet``)."""
    display = _Bar() if show_progress else (None if quiet else _PlainLines())
    try:
        return await q.wait(
            ids=ids, tag=tag, timeout=timeout, on_progress=display.update if display else None
        )
    finally:
        if display is not None:
            display.stop()


def ids_from_push_output(stream: TextIO) -> Iterator[str]:
    """Task IDs from ``jobq push --json`` output (failed lines and the summary have
    none); a line that is a bare ID is taken as one.  Read through
    :func:`~.lines.numbered_lines`: such a line is short, so one over a mebibyte, or
    bytes that are not UTF-8, mean the wrong file, a usage error."""
    try:
        yield from _ids_from_lines(numbered_lines(stream, limit=MAX_ID_LINE_CHARS))
    except UnicodeDecodeError as exc:
        name = getattr(stream, "name", "--from")
        raise click.UsageError(
            f"--from {name}: not UTF-8 text ({exc.reason}); give the JSON lines "
            "`jobq push --json` printed"
        ) from None


def _ids_from_lines(lines: Iterable[tuple[int, str | None]]) -> Iterator[str]:
    for number, raw in lines:
        if raw is None:
            raise click.UsageError(
                f"--from line {number}: longer than {MAX_ID_LINE_CHARS:,} characters; "
                "give the JSON lines `jobq push --json` printed"
            )
        line = raw.strip()
        if not line:
            continue
        if not line.startswith("{"):
            yield line
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise click.UsageError(f"--from line {number}: not valid JSON ({exc.msg})") from None
        if isinstance(item, dict) and item.get("id") and item.get("status") != "failed":
            yield str(item["id"])


def _wait_drained(ctx: click.Context, timeout: float | None, as_json: bool) -> int:
    started = time.monotonic()

    async def main() -> bool:
        async with _open(ctx) as q:
            return await q.wait_drained(timeout)

    drained = _run(main())
    seconds = round(time.monotonic() - started, 3)
    if as_json:
        click.echo(json.dumps({"drained": drained, "seconds": seconds}))
    else:
        click.echo("queue drained" if drained else f"timed out after {seconds}s", err=True)
    return EXIT_OK if drained else EXIT_TIMEOUT


def print_report(report: WaitReport, *, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.as_dict()))
        return
    what = f"tag {report.tag!r}" if report.tag else f"{report.total} task(s)"
    for unknown in report.unknown:
        click.echo(f"unknown: {unknown} (the ledger has never seen it)", err=True)
    for task_id in report.dead_lettered_ids:
        click.echo(f"dead-lettered: {task_id}", err=True)
    line = (
        f"{what}: {report.succeeded} succeeded, {report.dead_lettered} dead-lettered, "
        f"{report.remaining} remaining in {report.seconds:.1f}s"
    )
    if report.timed_out:
        line += " (timed out)"
    click.echo(line, err=True)


class _Bar:
    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("waiting"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}  {task.fields[detail]}"),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            transient=False,
        )
        self._task = self._progress.add_task("wait", total=None, detail="")
        self._progress.start()

    def update(self, progress: WaitProgress) -> None:
        self._progress.update(
            self._task,
            total=progress.total,
            completed=progress.done,
            detail=f"failed {progress.dead_lettered}  remaining {progress.remaining}  "
            f"{progress.rate():.1f}/s",
        )

    def stop(self) -> None:
        self._progress.stop()


class _PlainLines:
    def __init__(self) -> None:
        self._last = time.monotonic()

    def update(self, progress: WaitProgress) -> None:
        now = time.monotonic()
        if now - self._last < PLAIN_PROGRESS_EVERY:
            return
        self._last = now
        rate = progress.rate()
        eta = f", ETA {progress.remaining / rate:.0f}s" if rate > 0 else ""
        click.echo(
            f"waiting: {progress.done}/{progress.total} done, {progress.dead_lettered} "
            f"dead-lettered, {progress.remaining} remaining, {rate:.1f}/s{eta}",
            err=True,
        )

    def stop(self) -> None:
        pass


# ---------------------------------------------------------------------- status


@click.command("status")
@click.option(
    "--tag", metavar="NAME", callback=tag_option, help="Only tasks pushed with --tag NAME."
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status_command(ctx: click.Context, tag: str | None, as_json: bool) -> None:
    """Counts by state, recent throughput, ETA, queue counts and live workers."""

    async def main() -> dict[str, Any]:
        async with _open(ctx) as q:
            store = require(q.ledger)
            summary = await store.status(tag)
            counts = await q.counts()
            workers = await store.workers()
        now = time.time()
        beat = heartbeat_seconds_from_env()
        live = [w for w in workers if not w.stopped and not w.is_stale(now, beat)]
        eta = summary.eta_seconds()
        return {
            "tag": tag,
            "counts": summary.counts,
            "total": summary.total,
            "remaining": summary.remaining,
            "unknown": summary.unknown,
            "finished_last_minutes": summary.finished_last_minutes,
            "window_minutes": summary.window_minutes,
            "rate_per_second": round(summary.rate_per_second, 3),
            "eta_seconds": None if eta is None else round(eta, 1),
            "queue": counts.as_dict(),
            "workers": {"live": len(live), "slots": sum(w.slots for w in live)},
        }

    data = _run(main())
    if as_json:
        click.echo(json.dumps(data))
        return
    click.echo(f"tasks{' tagged ' + repr(tag) if tag else ''}: {data['total']}")
    for state in TaskState:
        if data["counts"].get(state.value):
            click.echo(f"  {state.value:14} {data['counts'][state.value]}")
    eta = f", ETA {data['eta_seconds']:.0f}s" if data["eta_seconds"] is not None else ""
    click.echo(
        f"throughput: {data['finished_last_minutes']} finished in the last "
        f"{data['window_minutes']:.0f} min ({data['rate_per_second']}/s){eta}"
    )
    queue = data["queue"]
    click.echo(f"queue: {queue['active']} active, {queue['dead_letter']} dead-lettered")
    click.echo(f"workers: {data['workers']['live']} live ({data['workers']['slots']} slots)")


# ---------------------------------------------------------------------- tasks, result


@click.command("tasks")
@click.option("--tag", metavar="NAME", callback=tag_option)
@click.option("--state", type=click.Choice([s.value for s in TaskState]), default=None)
@click.option("-n", "limit", type=LISTED, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def tasks_command(
    ctx: click.Context, tag: str | None, state: str | None, limit: int, as_json: bool
) -> None:
    """Recently changed tasks with state, attempts, duration and error summary."""

    async def main() -> list[TaskRecord]:
        async with _open(ctx) as q:
            return await require(q.ledger).tasks(
                tag=tag, state=TaskState(state) if state else None, limit=limit
            )

    records = _run(main())
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in records]))
        return
    if not records:
        click.echo("(no tasks)")
    for r in records:
        duration = f"{r.duration:.2f}s" if r.duration is not None else "-"
        first = (r.summary or "").strip().splitlines()
        why = (
            f"  {r.reason}: {first[-1]}"
            if r.reason and first
            else (f"  {r.reason}" if r.reason else "")
        )
        click.echo(f"{r.id}  {r.state.value:13} attempt={r.attempt}  {duration}{why}")


@click.command("result")
@click.argument("task_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def result_command(ctx: click.Context, task_id: str, as_json: bool) -> None:
    """One task's ledger record and result (exit 1 if the ledger has never seen it)."""

    async def main() -> TaskRecord | None:
        async with _open(ctx) as q:
            return await q.result(task_id)

    record = _run(main())
    if record is None:
        click.echo(f"error: the ledger has no record of task {task_id}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(record.as_dict()))
        return
    for key, value in record.as_dict().items():
        if key in ("result", "summary") or value in (None, [], ""):
            continue
        click.echo(f"{key:14} {_when(value) if key.endswith('_at') else value}")
    if record.summary:
        click.echo("summary:")
        for line in record.summary.splitlines():
            click.echo(f"  {line}")
    if record.result is not None:
        click.echo("result:")
        click.echo(json.dumps(record.result, indent=2, ensure_ascii=False))


def _when(value: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(value)))


# ---------------------------------------------------------------------- workers


@click.command("workers")
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--since",
    callback=_timeout,
    default="1h",
    show_default=True,
    metavar="D",
    help="Include workers stopped or stale within D.",
)
@click.pass_context
def workers_command(ctx: click.Context, as_json: bool, since: float) -> None:
    """Live and recently stopped or stale workers, from their heartbeats."""

    async def main() -> list[WorkerRecord]:
        async with _open(ctx) as q:
            return await require(q.ledger).workers(include_stopped_seconds=since)

    workers = _run(main())
    now, beat = time.time(), heartbeat_seconds_from_env()
    if as_json:
        click.echo(
            json.dumps([{**w.as_dict(), "status": _worker_status(w, now, beat)} for w in workers])
        )
        return
    if not workers:
        click.echo("(no workers)")
    for w in workers:
        click.echo(
            f"{w.worker_id}  {_worker_status(w, now, beat):7} {w.host}:{w.pid}  slots={w.slots}  "
            f"running={len(w.running)}  done={w.tasks_done}  started {_when(w.started_at)}  "
            f"seen {now - w.last_seen:.0f}s ago  v{w.version}"
        )
        for task_id in w.running:
            click.echo(f"    running {task_id}")


def _worker_status(worker: WorkerRecord, now: float, beat: float) -> str:
    if worker.stopped:
        return "stopped"
    return "stale" if worker.is_stale(now, beat) else "live"


# ---------------------------------------------------------------------- ledger prune


@click.group("ledger")
def ledger_group() -> None:
    """Maintain the outcome ledger."""


@ledger_group.command("prune")
@click.option(
    "--older-than",
    callback=lambda ctx, param, value: _duration_d(ctx, param, value),
    default=f"{DEFAULT_RETENTION_DAYS}d",
    show_default=True,
    metavar="D",
    help="Delete records not updated for this long.",
)
@click.option(
    "--unfinished",
    is_flag=True,
    help="Also delete the records of tasks not finished (queued, running, to be retried), "
    "e.g. of a cleared queue.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def prune_command(
    ctx: click.Context, older_than: timedelta, unfinished: bool, as_json: bool
) -> None:
    """Delete old records of finished tasks, their tag memberships, and old worker
    heartbeats (a task not finished keeps its record unless --unfinished)."""

    async def main() -> int:
        async with _open(ctx) as q:
            return await require(q.ledger).prune(older_than.total_seconds(), unfinished=unfinished)

    deleted = _run(main())
    if as_json:
        click.echo(json.dumps({"deleted": deleted}))
    else:
        click.echo(f"pruned {deleted} task record(s)")


def _duration_d(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    return None if value is None else Duration("d", zero_ok=True).convert(value, param, ctx)


def register(group: click.Group) -> None:
    """Add the ledger commands to the ``jobq`` group (one line in main.py)."""
    for command in (
        wait_command,
        status_command,
        tasks_command,
        result_command,
        workers_command,
        ledger_group,
    ):
        group.add_command(command)
