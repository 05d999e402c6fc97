"""The worker hook that writes task outcomes and heartbeats to the ledger.

The per-task hook methods only append an :class:`~.events.AttemptEvent` to a buffer
(microseconds, on the event loop); a background flusher writes the buffer every
``flush_interval`` seconds (or sooner when it fills up) in one store call — one SQLite
transaction or a few Table transactions — after :func:`~.events.coalesce` has merged
each short task's start and end into one write.  So the ledger costs the hot path an
append, not a round trip.  A start is not even an event until a flush finds the task
still running (a task that ends first is written once, with its outcome).

A write that fails is logged and retried on the next flush with the events kept (up to
``max_buffer`` events; beyond that the oldest are dropped, with a warning): the ledger
never fails or slows a task.  The worker's heartbeat is written every
``heartbeat_seconds`` and once more, marked stopped, when the worker exits; if the
process is killed, the last heartbeat ages and readers show the worker as stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from ..redact import redact
from ..worker.hooks import (
    DEAD_LETTERED,
    FAILED,
    INTERRUPTED,
    SUCCEEDED,
    TaskOutcome,
    TaskRun,
    WorkerHook,
    WorkerIdentity,
)
from .base import DEFAULT_HEARTBEAT_SECONDS, DEFAULT_RETENTION_DAYS, LedgerStore, WorkerRecord
from .events import AttemptEvent, coalesce, encode_result, summarize

log = logging.getLogger("ai4s_jobq.ledger")

HEARTBEAT_ENV = "JOBQ_HEARTBEAT_SECONDS"
RETENTION_ENV = "JOBQ_LEDGER_RETENTION"
PRUNE_EVERY_SECONDS = 86400.0
#: a worker looks at retention only after running this long: short-lived workers (and
#: benchmarks) never pay for a prune scan, which on Azurite costs the drain noticeably
PRUNE_DELAY_SECONDS = 60.0
_RECORDED = (SUCCEEDED, FAILED, DEAD_LETTERED, INTERRUPTED)
_WARN_EVERY = 60.0


#: heartbeat intervals accepted from the environment (seconds)
HEARTBEAT_RANGE = (0.1, 86_400.0)


def heartbeat_seconds_from_env() -> float:
    raw = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not raw:
        return DEFAULT_HEARTBEAT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{HEARTBEAT_ENV}={raw!r}: expected a number of seconds") from None
    if not HEARTBEAT_RANGE[0] <= value <= HEARTBEAT_RANGE[1]:  # nan fails too
        low, high = HEARTBEAT_RANGE
        raise ValueError(
            f"{HEARTBEAT_ENV}={raw!r}: expected {low:g} to {high:g} seconds (a worker "
            "writes its heartbeat that often; faster would flood the ledger)"
        )
    return value


def retention_seconds_from_env() -> float:
    """``JOBQ_LEDGER_RETENTION`` (a duration, bare numbers are days; default 30 days;
    0 turns pruning by workers off)."""
    from ..durations import parse_duration

    raw = os.environ.get(RETENTION_ENV, "").strip()
    if not raw:
        return DEFAULT_RETENTION_DAYS * 86400.0
    if raw in ("0", "0d"):
        return 0.0
    try:
        return parse_duration(raw, bare_unit="d").total_seconds()
    except ValueError as exc:
        raise ValueError(f"{RETENTION_ENV}: {exc}") from None


class LedgerRecorder(WorkerHook):
    """Records every attempt's start and end, and the worker's heartbeats."""

    def __init__(
        self,
        store: LedgerStore,
        *,
        heartbeat_seconds: float | None = None,
        flush_interval: float = 0.25,
        flush_size: int = 2000,
        max_buffer: int = 200_000,
        version: str | None = None,
        stop_timeout: float = 15.0,
        prune_delay: float = PRUNE_DELAY_SECONDS,
    ):
        self.store = store
        self.heartbeat_seconds = heartbeat_seconds or heartbeat_seconds_from_env()
        #: read now: a bad value stops the worker at its start, not a minute in
        self.retention_seconds = retention_seconds_from_env()
        self.flush_interval = flush_interval
        self.flush_size = flush_size
        self.max_buffer = max_buffer
        self.stop_timeout = stop_timeout
        self.prune_delay = prune_delay
        self.version = version if version is not None else _version()
        self._buffer: list[AttemptEvent] = []
        self._running: dict[str, float] = {}  # task ID -> started (wall clock)
        self._unrecorded_starts: dict[str, TaskRun] = {}  # started since the last flush
        self._done = 0
        self._identity: WorkerIdentity | None = None
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._pruner: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_warning = 0.0
        self._dropped = 0

    # ------------------------------------------------------------------ hook points

    async def start(self, worker: WorkerIdentity) -> None:
        self._identity = worker
        self._wake = asyncio.Event()
        # In the background, first heartbeat included: an unreachable ledger (whose
        # client retries for seconds) must not delay the worker's first receive.
        self._flusher = asyncio.ensure_future(self._flush_loop())
        self._pruner = asyncio.ensure_future(self._prune_if_due())

    def task_started(self, run: TaskRun) -> None:
        # The "running" event is made at the next flush, and only if the task is still
        # running then: a short task's start would be coalesced away anyway.
        self._running[run.task.id] = run.started_at
        self._unrecorded_starts[run.task.id] = run

    def _start_events(self) -> list[AttemptEvent]:
        identity = self._identity
        events = [
            AttemptEvent(
                id=run.task.id,
                state="running",
                attempt=run.attempt,
                at=run.started_at,
                started_at=run.started_at,
                worker_id=identity.worker_id if identity else None,
                host=identity.host if identity else None,
            )
            for run in self._unrecorded_starts.values()
        ]
        self._unrecorded_starts = {}
        return events

    def task_finished(self, run: TaskRun, outcome: TaskOutcome) -> None:
        self._running.pop(run.task.id, None)
        self._unrecorded_starts.pop(run.task.id, None)
        if outcome.kind not in _RECORDED:
            return  # lock lost: the message belongs to another worker, which reports it
        if outcome.kind != INTERRUPTED:
            self._done += 1
        result_json, note = (
            encode_result(outcome.result) if outcome.kind == SUCCEEDED else (None, None)
        )
        identity = self._identity
        self._append(
            AttemptEvent(
                id=run.task.id,
                state=outcome.kind,
                attempt=run.attempt,
                at=outcome.finished_at,
                started_at=run.started_at,
                worker_id=identity.worker_id if identity else None,
                host=identity.host if identity else None,
                duration=outcome.duration,
                exit_code=outcome.exit_code,
                reason=outcome.reason,
                summary=summarize(outcome.summary),
                result_json=result_json,
                result_note=note,
            )
        )

    async def stop(self, worker: WorkerIdentity, stats: Any) -> None:
        self._stopping = True
        self._wake.set()
        if self._pruner is not None and not self._pruner.done():
            self._pruner.cancel()
        if self._flusher is not None:  # its round in flight, bounded like the rest
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(self._flusher, self.stop_timeout)
        try:  # whatever the last round left, and the final heartbeat; bounded
            await asyncio.wait_for(self._final_writes(), self.stop_timeout)
        except asyncio.TimeoutError:
            log.warning("ledger: final writes took over %.0f s; giving up", self.stop_timeout)
        if self._buffer:
            log.warning(
                "ledger: %d task outcome(s) could not be written before exit; their "
                "records show an earlier state",
                len(self._buffer),
            )

    async def _final_writes(self) -> None:
        await self._flush()
        try:
            await self.store.heartbeat(self._worker_record(stopped=True))
        except Exception as exc:  # noqa: BLE001
            self._warn("could not write the final heartbeat", exc)

    # ------------------------------------------------------------------ background

    async def _prune_if_due(self) -> None:
        """Retention: delete records older than ``JOBQ_LEDGER_RETENTION`` when no
        prune has started on this ledger for a day (the marker is written first, so
        workers starting together mostly skip).  A ledger without a marker gets one
        now and its first prune a day later."""
        try:
            retention = self.retention_seconds
            if retention <= 0:
                return
            await asyncio.sleep(self.prune_delay)
            last = await self.store.last_pruned()
            now = time.time()
            if last is None:
                await self.store.mark_pruned(now)
                return
            if now - last < PRUNE_EVERY_SECONDS:
                return
            await self.store.mark_pruned(now)
            deleted = await self.store.prune(retention)
            if deleted:
                log.info("ledger: pruned %d record(s) older than the retention", deleted)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - retention is housekeeping
            self._warn("pruning old records failed", exc)

    def _append(self, event: AttemptEvent) -> None:
        self._buffer.append(event)
        if len(self._buffer) >= self.flush_size:
            self._wake.set()

    async def _flush_loop(self) -> None:
        try:
            await self.store.open()
            await self.store.heartbeat(self._worker_record(stopped=False))
        except Exception as exc:  # noqa: BLE001 - the ledger never stops a worker
            self._warn("could not write the first heartbeat", exc)
        next_beat = time.monotonic() + self.heartbeat_seconds
        while not self._stopping:
            timeout = min(self.flush_interval, max(0.0, next_beat - time.monotonic()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            ok = await self._flush()
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.heartbeat_seconds
                try:
                    await self.store.heartbeat(self._worker_record(stopped=False))
                except Exception as exc:  # noqa: BLE001
                    self._warn("heartbeat failed", exc)
            if not ok and not self._stopping:
                # The store is failing: do not hammer it; events stay buffered.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)

    async def _flush(self) -> bool:
        if self._unrecorded_starts:
            self._buffer.extend(self._start_events())
        if not self._buffer:
            return True
        events, self._buffer = coalesce(self._buffer), []
        try:
            await self.store.record_attempts(events)
        except Exception as exc:  # noqa: BLE001 - retried on the next flush
            self._warn(f"could not record {len(events)} task outcome(s); will retry", exc)
            self._buffer[:0] = events
            excess = len(self._buffer) - self.max_buffer
            if excess > 0:
                self._dropped += excess
                del self._buffer[:excess]
                log.warning("ledger: dropped %d old outcome event(s) (buffer full)", excess)
            return False
        return True

    def _warn(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY or self._stopping:
            self._last_warning = now
            log.warning("ledger: %s (%s: %s)", what, type(exc).__name__, redact(str(exc))[:300])

    def _worker_record(self, *, stopped: bool) -> WorkerRecord:
        identity = self._identity or WorkerIdentity()
        return WorkerRecord(
            worker_id=identity.worker_id,
            host=identity.host,
            pid=identity.pid,
            slots=identity.slots,
            queue=identity.queue,
            started_at=identity.started_at,
            last_seen=time.time(),
            running=list(self._running),
            tasks_done=self._done,
            version=self.version,
            stopped=stopped,
        )


def ledger_hooks(q: Any) -> list[WorkerHook]:
    """The hooks a worker of ``q`` (a :class:`~ai4s_jobq.jobq.JobQ`) records outcomes
    with: a :class:`LedgerRecorder` when the queue has a ledger, else none."""
    return [LedgerRecorder(q.ledger)] if q.ledger is not None else []


def _version() -> str:
    from .. import __version__

    return __version__
