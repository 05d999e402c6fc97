"""Reading tasks for ``jobq push`` and reporting the outcome.

Lines stream through (constant memory).  A blank line is ignored.  A malformed
line (bad JSON, a JSON value that is not an object, a value with no
deterministic encoding) becomes a failure at its line number: it is reported
and not pushed, while every other line is pushed.  So after fixing the bad lines
the whole input can simply be pushed again: deduplication drops what was
already accepted.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import click

from ai4s_jobq.backends.base import PushOutcome
from ai4s_jobq.jobq import JobQ, PushFailure
from ai4s_jobq.ledger.push import SkippedOutcome
from ai4s_jobq.ledger.resolve import require

from .lines import MAX_LINE_CHARS

MAX_ERRORS_SHOWN = 20


class BadLine(ValueError):
    """Stands in for a line that could not be read as a task."""


def read_tasks(
    lines: Iterable[tuple[int, str | None]], line_format: str, env: Mapping[str, str]
) -> Iterator[Any]:
    """Yield one task per non-blank line: a shell command string, an arguments dict,
    or a :class:`BadLine` carrying the line number and what is wrong."""
    for number, raw in lines:
        if raw is None:
            yield _Numbered(
                number, BadLine(f"line {number}: longer than {MAX_LINE_CHARS:,} characters")
            )
            continue
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        undecodable = _first_undecodable(line)
        if undecodable is not None:
            yield _Numbered(number, BadLine(f"line {number}: {undecodable}"))
            continue
        is_json = line_format == "json" or (line_format == "auto" and line.lstrip().startswith("{"))
        if not is_json:
            yield _Numbered(number, {"cmd": line, **({"env": dict(env)} if env else {})})
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield _Numbered(
                number, BadLine(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})")
            )
            continue
        except (ValueError, RecursionError) as exc:  # an int past the digit limit, deep nesting
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:120]
            yield _Numbered(number, BadLine(f"line {number}: not usable JSON ({reason})"))
            continue
        if not isinstance(value, dict):
            yield _Numbered(
                number,
                BadLine(
                    f"line {number}: a JSON task must be an object of arguments, "
                    f"not {type(value).__name__}"
                ),
            )
            continue
        yield _Numbered(number, value)


#: A byte that was not UTF-8, as ``surrogateescape`` reads it (a lone surrogate).
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def _first_undecodable(line: str) -> str | None:
    """What is wrong with a line that was not UTF-8, or None.  A regular expression,
    not a loop over the characters: it runs for every pushed line (0.2 against 1.3 us
    for a 50-character line)."""
    found = _UNDECODABLE.search(line)
    if found is None:
        return None
    byte, column = ord(found.group()) - 0xDC00, found.start() + 1
    return f"not UTF-8 text (byte 0x{byte:02x} at column {column}); tasks are read as UTF-8"


class _Numbered:
    __slots__ = ("number", "value")

    def __init__(self, number: int, value: Any):
        self.number = number
        self.value = value


@dataclass
class LedgerPush:
    """The ledger options of ``jobq push``: ``--tag``, ``--skip-succeeded``, ``--wait``."""

    tag: str | None = None
    skip_succeeded: bool = False
    wait: bool = False
    timeout: timedelta | None = None


class _Counter:
    def __init__(self) -> None:
        self.pushed = self.duplicates = self.unknown = self.failed = 0


async def run_push(
    q: JobQ,
    tasks: Iterator[Any],
    *,
    num_retries: int | None,
    dedup_keys: list[str] | None,
    as_json: bool,
    show_progress: bool,
    print_ids: bool,
    ledger: LedgerPush | None = None,
) -> int:
    ledger = ledger or LedgerPush()
    pushed_ids: list[str] = []  # for --wait: every accepted ID, duplicates included
    line_numbers: dict[int, int] = {}
    counter = _Counter()
    errors_shown = 0

    def values() -> Iterator[Any]:
        for index, numbered in enumerate(tasks):
            line_numbers[index] = numbered.number
            yield numbered.value

    def on_result(index: int, task_id: str | None, outcome: PushOutcome | PushFailure) -> None:
        nonlocal errors_shown
        number = line_numbers.pop(index, index + 1)
        if isinstance(outcome, PushFailure):
            counter.failed += 1
            status, error = "failed", outcome.error
            if not error.startswith("line "):
                error = f"line {number}: {error}"
            if not as_json and errors_shown < MAX_ERRORS_SHOWN:
                click.echo(f"error: {error}", err=True)
                errors_shown += 1
        else:
            error = None
            if ledger.wait:
                pushed_ids.append(outcome.message_id)
            if outcome.duplicate is True:
                counter.duplicates += 1
                status = "duplicate"
            elif outcome.duplicate is False:
                counter.pushed += 1
                status = "pushed"
            else:
                counter.unknown += 1
                status = "accepted"
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "line": number,
                        "id": task_id,
                        "status": status,
                        **({"error": error} if error else {}),
                        **(
                            {"reason": outcome.reason}
                            if isinstance(outcome, SkippedOutcome)
                            else {}
                        ),
                    }
                )
            )
        elif print_ids and task_id:
            click.echo(f"{task_id}\t{status}")
        if progress is not None:
            progress.update(counter)

    if ledger.wait:
        require(q.ledger)  # before pushing: say at once that --wait needs a ledger
    progress = _Progress() if show_progress else None
    started = time.monotonic()
    try:
        await q.push_many(
            values(),
            num_retries=num_retries,
            dedup_keys=dedup_keys,
            on_result=on_result,
            tag=ledger.tag,
            skip_succeeded=ledger.skip_succeeded,
        )
    finally:
        if progress is not None:
            progress.stop(counter)
    elapsed = time.monotonic() - started
    if counter.failed > errors_shown and not as_json:
        click.echo(
            f"error: ... and {counter.failed - errors_shown} more rejected line(s)", err=True
        )
    summary = {
        "pushed": counter.pushed,
        "duplicates": counter.duplicates,
        "accepted_unknown": counter.unknown,
        "failed": counter.failed,
        "seconds": round(elapsed, 3),
    }
    if as_json:
        click.echo(json.dumps({"summary": summary}))
    else:
        unknown = f", {counter.unknown} accepted" if counter.unknown else ""
        click.echo(
            f"pushed {counter.pushed} new task(s), dropped {counter.duplicates} "
            f"duplicate(s){unknown}, rejected {counter.failed} in {elapsed:.2f}s "
            f"to {q.backend.description}",
            err=True,
        )
    if ledger.wait:
        return await _wait_for_pushed(q, pushed_ids, ledger, counter, as_json, show_progress)
    return 1 if counter.failed else 0


async def _wait_for_pushed(
    q: JobQ,
    ids: list[str],
    ledger: LedgerPush,
    counter: _Counter,
    as_json: bool,
    show_progress: bool,
) -> int:
    """``push --wait``: wait on exactly the IDs this push accepted.  Exit as ``jobq
    wait`` does, except that rejected lines still make it at least 1."""
    from .ledger_cmds import print_report, wait_on

    if not ids:
        return 1 if counter.failed else 0
    timeout = ledger.timeout.total_seconds() if ledger.timeout is not None else None
    report = await wait_on(q, ids, None, timeout, show_progress, quiet=as_json)
    print_report(report, as_json=as_json)
    code = report.exit_code
    return max(code, 1) if counter.failed and code == 0 else code


class _Progress:
    """A rich progress line on stderr, refreshed a few times a second."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=Console(file=sys.stderr),
            transient=False,
            refresh_per_second=5,
        )
        self._task = self._progress.add_task("pushing", total=None)
        self._progress.start()
        self._last = 0.0

    def update(self, counter: _Counter) -> None:
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        self._render(counter)

    def _render(self, counter: _Counter) -> None:
        self._progress.update(
            self._task,
            description=f"pushed {counter.pushed}  duplicates {counter.duplicates}  "
            f"rejected {counter.failed}",
        )

    def stop(self, counter: _Counter) -> None:
        self._render(counter)
        self._progress.stop()
