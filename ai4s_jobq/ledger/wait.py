"""Waiting until named tasks reach a final state (``jobq wait``, ``JobQ.wait``).

Two shapes, chosen by what the caller names:

* **IDs** — the pending set shrinks as records turn final; each poll reads only the
  still-pending IDs.  An ID the ledger has never seen is reported as unknown at the
  first poll and not waited on (a typo must not block a pipeline forever).
* **a tag** — each poll asks the store for the tag's counts by state (one aggregate
  query on SQLite), so memory stays constant however many tasks the tag holds; the
  dead-lettered IDs are listed (capped) only at the end.

Polling, not events: the writers are other processes (workers on other machines), so
there is nothing to subscribe to.  The interval starts at ``poll_min`` and grows
towards ``poll_max``, but never beyond a few times what one poll costs, so a wait
returns within a fraction of a second of the last task finishing on a local ledger.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..durations import check_timeout
from ..ids import check_id_iterable
from .base import LedgerStore, StatusSummary, TaskRecord, TaskState

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_TIMEOUT = 124
FAILED_IDS_SHOWN = 100


@dataclass
class WaitProgress:
    """What a progress display needs, after each poll."""

    total: int
    succeeded: int
    dead_lettered: int
    unknown: int
    elapsed: float

    @property
    def done(self) -> int:
        return self.succeeded + self.dead_lettered

    @property
    def remaining(self) -> int:
        return self.total - self.done

    def rate(self, first_done: int = 0) -> float:
        return (self.done - first_done) / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class WaitReport:
    """How a wait ended.  ``records`` holds every final record of an ID wait (None
    for a tag wait: a tag may hold millions of tasks)."""

    total: int
    succeeded: int
    dead_lettered: int
    remaining: int
    timed_out: bool
    unknown: list[str] = field(default_factory=list)
    dead_lettered_ids: list[str] = field(default_factory=list)  # at most FAILED_IDS_SHOWN
    records: dict[str, TaskRecord] | None = None
    tag: str | None = None
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 all succeeded, 1 any dead-lettered or unknown, 124 timed out."""
        if self.timed_out:
            return EXIT_TIMEOUT
        if self.dead_lettered or self.unknown:
            return EXIT_FAILED
        return EXIT_OK

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "total": self.total,
            "succeeded": self.succeeded,
            "dead_lettered": self.dead_lettered,
            "remaining": self.remaining,
            "unknown": self.unknown,
            "dead_lettered_ids": self.dead_lettered_ids,
            "timed_out": self.timed_out,
            "seconds": round(self.seconds, 3),
            "exit_code": self.exit_code,
        }


ProgressCallback = Callable[[WaitProgress], None]


class _Pacer:
    """The poll interval: grows from ``low`` to ``high``, bounded by 3x a poll's cost."""

    def __init__(self, low: float, high: float):
        self.low, self.high, self.current = low, high, low

    def next(self, poll_seconds: float) -> float:
        self.current = min(self.high, self.current * 1.5)
        return max(self.low, min(self.current, max(3 * poll_seconds, self.low)))


async def wait_for_tasks(
    store: LedgerStore,
    *,
    ids: Iterable[str] | None = None,
    tag: str | None = None,
    timeout: float | None = None,
    on_progress: ProgressCallback | None = None,
    poll_min: float = 0.02,
    poll_max: float = 1.0,
) -> WaitReport:
    """Block until every task named (by ``ids`` or ``tag``) is final, or ``timeout``."""
    if (ids is None) == (tag is None):
        raise ValueError("wait on task IDs or on a tag (exactly one)")
    check_id_iterable(ids)
    timeout = check_timeout(timeout)
    if ids is not None:
        return await _wait_ids(
            store, list(dict.fromkeys(ids)), timeout, on_progress, poll_min, poll_max
        )
    assert tag is not None
    return await _wait_tag(store, tag, timeout, on_progress, poll_min, poll_max)


async def _wait_ids(
    store: LedgerStore,
    ids: Sequence[str],
    timeout: float | None,
    on_progress: ProgressCallback | None,
    poll_min: float,
    poll_max: float,
) -> WaitReport:
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    pending = list(ids)
    done: dict[str, TaskRecord] = {}
    unknown: list[str] = []
    first = True
    pacer = _Pacer(poll_min, poll_max)
    while True:
        poll_started = time.monotonic()
        records = await store.get(pending)
        if first:
            unknown = [i for i in pending if i not in records]
            first = False
        still: list[str] = []
        for task_id in pending:
            record = records.get(task_id)
            if record is None:
                continue
            if record.state.final:
                done[task_id] = record
            else:
                still.append(task_id)
        pending = still
        succeeded = sum(1 for r in done.values() if r.state is TaskState.SUCCEEDED)
        progress = WaitProgress(
            total=len(ids) - len(unknown),
            succeeded=succeeded,
            dead_lettered=len(done) - succeeded,
            unknown=len(unknown),
            elapsed=time.monotonic() - started,
        )
        if on_progress is not None:
            on_progress(progress)
        timed_out = bool(pending) and deadline is not None and time.monotonic() >= deadline
        if not pending or timed_out:
            dead = [i for i, r in done.items() if r.state is TaskState.DEAD_LETTERED]
            return WaitReport(
                total=progress.total,
                succeeded=succeeded,
                dead_lettered=len(dead),
                remaining=len(pending),
                timed_out=timed_out,
                unknown=unknown,
                dead_lettered_ids=dead[:FAILED_IDS_SHOWN],
                records=done,
                seconds=time.monotonic() - started,
            )
        await _sleep(pacer.next(time.monotonic() - poll_started), deadline)


async def _wait_tag(
    store: LedgerStore,
    tag: str,
    timeout: float | None,
    on_progress: ProgressCallback | None,
    poll_min: float,
    poll_max: float,
) -> WaitReport:
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    pacer = _Pacer(poll_min, poll_max)
    while True:
        poll_started = time.monotonic()
        summary = await store.status(tag)
        progress = _tag_progress(summary, time.monotonic() - started)
        if on_progress is not None:
            on_progress(progress)
        timed_out = summary.remaining > 0 and deadline is not None and time.monotonic() >= deadline
        if summary.remaining == 0 or timed_out:
            dead_ids: list[str] = []
            if progress.dead_lettered:
                failed = await store.tasks(
                    tag=tag, state=TaskState.DEAD_LETTERED, limit=FAILED_IDS_SHOWN
                )
                dead_ids = [r.id for r in failed]
            return WaitReport(
                total=progress.total,
                succeeded=progress.succeeded,
                dead_lettered=progress.dead_lettered,
                remaining=summary.remaining,
                timed_out=timed_out,
                # a tag nothing was ever pushed under is as unknown as an unknown ID
                unknown=[f"tag:{tag}"] if summary.total == 0 and not summary.unknown else [],
                dead_lettered_ids=dead_ids,
                tag=tag,
                seconds=time.monotonic() - started,
            )
        await _sleep(pacer.next(time.monotonic() - poll_started), deadline)


def _tag_progress(summary: StatusSummary, elapsed: float) -> WaitProgress:
    return WaitProgress(
        total=summary.total,
        succeeded=summary.counts.get(TaskState.SUCCEEDED.value, 0),
        dead_lettered=summary.counts.get(TaskState.DEAD_LETTERED.value, 0),
        unknown=summary.unknown,
        elapsed=elapsed,
    )


async def _sleep(seconds: float, deadline: float | None) -> None:
    if deadline is not None:
        seconds = max(0.0, min(seconds, deadline - time.monotonic()))
    await asyncio.sleep(seconds)
