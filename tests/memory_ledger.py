"""An in-memory :class:`~ai4s_jobq.ledger.base.LedgerStore` and a worker hook that
fills it, for the dashboard and ``jobq top`` tests.

Why it exists: the views read the ledger only through the ``LedgerStore`` read API, so
a complete, small implementation of that API lets their tests run a real worker over
a real local queue and check what the views show, independent of how the persistent
stores (SQLite, Azure Table) write.  It follows the contract's rules (forward-only
states per attempt, tags include duplicates, failures grouped by reason, largest first).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import replace
from typing import Any

from ai4s_jobq.ledger.base import (
    FINAL_STATES,
    FailureGroup,
    LedgerStore,
    StatusSummary,
    TaskRecord,
    TaskState,
    WorkerRecord,
)
from ai4s_jobq.worker.hooks import (
    DEAD_LETTERED,
    FAILED,
    INTERRUPTED,
    SUCCEEDED,
    TaskOutcome,
    TaskRun,
    WorkerHook,
    WorkerIdentity,
)


class MemoryLedger(LedgerStore):
    def __init__(self) -> None:
        self.records: dict[str, TaskRecord] = {}
        self.changed: dict[str, float] = {}
        self.tag_members: dict[str, dict[str, None]] = {}  # tag -> ordered set of IDs
        self.tag_used: dict[str, float] = {}
        self.heartbeats: dict[str, WorkerRecord] = {}

    # ------------------------------------------------------------------ writes

    def record_push(self, ids: Iterable[str], tag: str | None = None, at: float | None = None):
        at = at or time.time()
        for task_id in ids:
            if task_id not in self.records:
                self.records[task_id] = TaskRecord(task_id, TaskState.QUEUED, pushed_at=at)
                self.changed[task_id] = at
            if tag is not None:
                self.tag_members.setdefault(tag, {})[task_id] = None
                if tag not in self.records[task_id].tags:
                    self.records[task_id].tags.append(tag)
        if tag is not None:
            self.tag_used[tag] = at

    def put(self, record: TaskRecord, changed: float | None = None) -> None:
        self.records[record.id] = record
        self.changed[record.id] = changed or record.finished_at or time.time()
        for tag in record.tags:
            self.tag_members.setdefault(tag, {})[record.id] = None
            self.tag_used.setdefault(tag, self.changed[record.id])

    def heartbeat(self, worker: WorkerRecord) -> None:
        self.heartbeats[worker.worker_id] = worker

    # ------------------------------------------------------------------ reads

    async def get(self, ids: Sequence[str]) -> dict[str, TaskRecord]:
        return {i: replace(self.records[i]) for i in ids if i in self.records}

    async def iter_tag(self, tag: str, *, page_size: int = 1000) -> AsyncIterator[TaskRecord]:
        for task_id in list(self.tag_members.get(tag, {})):
            yield self.records[task_id]

    def _selected(self, tag: str | None) -> Iterable[TaskRecord]:
        if tag is None:
            return self.records.values()
        return (self.records[i] for i in self.tag_members.get(tag, {}))

    async def status(self, tag: str | None = None, *, window_minutes: float = 5.0) -> StatusSummary:
        since = time.time() - window_minutes * 60
        counts: Counter[str] = Counter()
        recent = 0
        for record in self._selected(tag):
            counts[record.state.value] += 1
            if record.state in FINAL_STATES and (record.finished_at or 0) >= since:
                recent += 1
        return StatusSummary(dict(counts), sum(counts.values()), recent, window_minutes)

    async def tasks(
        self, *, tag: str | None = None, state: TaskState | None = None, limit: int = 50
    ) -> list[TaskRecord]:
        chosen = [r for r in self._selected(tag) if state is None or r.state == state]
        chosen.sort(key=lambda r: self.changed.get(r.id, 0), reverse=True)
        return chosen[:limit]

    async def failures(
        self, *, tag: str | None = None, limit: int = 20, examples: int = 3
    ) -> list[FailureGroup]:
        groups: dict[str, FailureGroup] = {}
        failing = (TaskState.FAILED, TaskState.DEAD_LETTERED)
        for record in self._selected(tag):
            if record.state not in failing:
                continue
            reason = record.reason or "unknown"
            group = groups.setdefault(reason, FailureGroup(reason, 0, [], record.summary))
            group.count += 1
            if len(group.example_ids) < examples:
                group.example_ids.append(record.id)
        return sorted(groups.values(), key=lambda g: (-g.count, g.reason))[:limit]

    async def durations(self, *, tag: str | None = None, limit: int = 10_000) -> list[float]:
        done = [
            r
            for r in self._selected(tag)
            if r.state == TaskState.SUCCEEDED and r.duration is not None
        ]
        done.sort(key=lambda r: r.finished_at or 0, reverse=True)
        return [r.duration for r in done[:limit] if r.duration is not None]

    async def workers(self, *, include_stopped_seconds: float = 3600) -> list[WorkerRecord]:
        since = time.time() - include_stopped_seconds
        return [w for w in self.heartbeats.values() if w.last_seen >= since]

    async def tags(self, *, limit: int = 50) -> list[str]:
        return sorted(self.tag_used, key=lambda t: self.tag_used[t], reverse=True)[:limit]

    async def prune(self, older_than_seconds: float) -> int:
        cutoff = time.time() - older_than_seconds
        old = [i for i, at in self.changed.items() if at < cutoff]
        for task_id in old:
            del self.records[task_id], self.changed[task_id]
            for members in self.tag_members.values():
                members.pop(task_id, None)
        return len(old)


class MemoryLedgerHook(WorkerHook):
    """Writes a real worker's task transitions and heartbeats into a MemoryLedger."""

    _STATES = {
        SUCCEEDED: TaskState.SUCCEEDED,
        FAILED: TaskState.FAILED,
        DEAD_LETTERED: TaskState.DEAD_LETTERED,
        INTERRUPTED: TaskState.INTERRUPTED,
    }

    def __init__(self, ledger: MemoryLedger, version: str = "test"):
        self.ledger = ledger
        self.version = version
        self.identity: WorkerIdentity | None = None
        self.running: dict[str, None] = {}
        self.done = 0

    def _beat(self, stopped: bool = False) -> None:
        who = self.identity
        if who is None:
            return
        self.ledger.heartbeat(
            WorkerRecord(
                worker_id=who.worker_id,
                host=who.host,
                pid=who.pid,
                slots=who.slots,
                queue=who.queue,
                started_at=who.started_at,
                last_seen=time.time(),
                running=list(self.running),
                tasks_done=self.done,
                version=self.version,
                stopped=stopped,
            )
        )

    async def start(self, worker: WorkerIdentity) -> None:
        self.identity = worker
        self._beat()

    def task_started(self, run: TaskRun) -> None:
        task_id = run.task.id
        old = self.ledger.records.get(task_id)
        record = replace(old) if old else TaskRecord(task_id, TaskState.QUEUED)
        record.state = TaskState.RUNNING
        record.attempt = run.attempt
        record.started_at = run.started_at
        if self.identity:
            record.worker_id, record.host = self.identity.worker_id, self.identity.host
        self.ledger.put(record, changed=time.time())
        self.running[task_id] = None
        self._beat()

    def task_finished(self, run: TaskRun, outcome: TaskOutcome) -> None:
        state = self._STATES.get(outcome.kind)
        self.running.pop(run.task.id, None)
        if state is None:
            return
        record = self.ledger.records[run.task.id]
        fields: dict[str, Any] = {
            "state": state,
            "duration": outcome.duration,
            "finished_at": outcome.finished_at,
            "reason": outcome.reason,
            "summary": outcome.summary,
            "exit_code": outcome.exit_code,
            "result": outcome.result,
        }
        if state == TaskState.INTERRUPTED:
            fields["interruptions"] = record.interruptions + 1
        self.ledger.put(replace(record, **fields), changed=outcome.finished_at)
        if state in FINAL_STATES:
            self.done += 1
        self._beat()

    async def stop(self, worker: WorkerIdentity, stats: Any) -> None:
        self._beat(stopped=True)
