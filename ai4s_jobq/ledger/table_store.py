"""The ledger in an Azure Table: for Storage Queue (same account) and Service Bus.

Why its own table (``jobqledger``) and not the dedup table (``jobqdedup``, see
:mod:`ai4s_jobq.backends.storage.dedup`): the dedup protocol relies on *insert* of a
(queue, task ID) entity being the claim, on the entity vanishing when a send fails, and
on its age being the dedup window.  A ledger record of the same key would be an
existing entity to every later claim, would be deleted by a release, and lives 30 days
rather than the window.  Two tables in one account cost nothing and keep both
protocols simple; both are created on first use.

Entities (one table may serve many queues; ``SCOPE`` is the queue name):

=========================  =====================  =======================================
PartitionKey               RowKey                 what
=========================  =====================  =======================================
``p~SCOPE``                task ID (escaped)      pushed: when (written by producers)
``t~SCOPE``                task ID (escaped)      the attempt record (written by workers)
``g~SCOPE~TAG``            task ID (escaped)      membership of a tag
``n~SCOPE``                tag (escaped)          a tag's first/last push times
``w~SCOPE``                worker ID              a worker's last heartbeat
``m~SCOPE``                ``prune``              when a prune last started
=========================  =====================  =======================================

A task is ``queued`` while it has a ``p~`` entity and no ``t~`` one.  Why producers and
workers write different entities: then neither has to read before writing in the
common case.  A push inserts ``p~`` entities (one transaction per 100); a worker's first
write of a task *inserts* its ``t~`` record and later writes replace it with the ETag
this process got back from its own previous write.  Only when a condition fails (another
worker wrote the record, the record was reset) does a write fall back to reading the
record (14 IDs per query), deciding with :func:`.events.moves_forward`, and writing with
the ETag it read — so a late write can never move a record backwards.  Measured on
Azurite, where each operation costs the (single-threaded) emulator 5-9 ms and a 14-ID
lookup ~75 ms, reading before every write nearly doubled a drain of no-op tasks.

A push accepted as new for an ID whose record is final (a new generation) deletes the
``t~`` record with its ETag.  A result (up to 32 KiB of JSON) is split over string
properties of 16,000 characters, below Table storage's 64 KiB per property.

Reads that aggregate (status, tasks, failures) scan the partitions (a merge of the
RowKey-ordered ``p~`` and ``t~`` streams, constant memory): fine for the thousands to
hundreds of thousands of tasks a run holds; the SQLite ledger is the one with
sub-second status on 100,000 tasks.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from .base import (
    FailureGroup,
    LedgerStore,
    StatusSummary,
    TaskRecord,
    TaskState,
    WorkerRecord,
)
from .events import FINAL, AttemptEvent, PushRecord, decode_result, moves_forward
from .table_access import (
    TRANSACTION_SIZE,
    TableAccess,
    account_access,
    etag,
    quote,
    row_key,
    storage_backend_access,
)

#: A Table query clause: the record is final (``events.FINAL``).
_FINAL_FILTER = " or ".join(f"state eq '{state}'" for state in FINAL)

RESULT_CHUNK = 16_000
REMEMBERED_WRITES = 10_000  # ETags of this process's own recent writes, per store
_MEMBER_BATCH = 200
_RECORD_FIELDS = (
    "state",
    "attempt",
    "interruptions",
    "started_at",
    "finished_at",
    "worker_id",
    "host",
    "duration",
    "exit_code",
    "reason",
    "summary",
    "result_note",
)


def _if_unchanged(tag: str) -> dict[str, Any]:
    from azure.core import MatchConditions

    return {"etag": tag, "match_condition": MatchConditions.IfNotModified}


def _if_match(tag: str) -> dict[str, Any]:
    """Options of a replace that applies only if the entity still has ETag ``tag``."""
    from azure.data.tables import UpdateMode

    return {"mode": UpdateMode.REPLACE, **_if_unchanged(tag)}


class TableLedger(LedgerStore):
    """A queue's ledger in one Azure Table (see the module docstring for the layout)."""

    def __init__(self, access: TableAccess, scope: str, *, clock: Callable[[], float] = time.time):
        self.access = access
        self.scope = scope
        self.clock = clock
        #: task ID -> (ETag, entity) of this process's last write of its t~ record
        self._written: OrderedDict[str, tuple[str, dict[str, Any]]] = OrderedDict()
        key = row_key(scope)
        self._tasks_pk, self._pushed_pk = f"t~{key}", f"p~{key}"
        self._names_pk, self._workers_pk, self._meta_pk = f"n~{key}", f"w~{key}", f"m~{key}"

    # ------------------------------------------------------------------ construction

    @classmethod
    def for_storage_backend(cls, backend: Any, table_name: str) -> TableLedger:
        """The ledger of a Storage Queue: a table in the queue's own account."""
        return cls(storage_backend_access(backend, table_name), backend.queue_name)

    @classmethod
    def for_account(
        cls,
        account: str | None,
        table_name: str,
        *,
        scope: str,
        connection_string: str | None = None,
    ) -> TableLedger:
        """A ledger table named by ``--ledger ACCOUNT[/TABLE]`` (see
        :func:`.table_access.account_access`)."""
        return cls(account_access(account, table_name, connection_string), scope)

    @property
    def description(self) -> str:
        return f"Azure Table ledger {self.access.where}"

    async def open(self) -> None:
        await self.access.open()

    async def close(self) -> None:
        await self.access.close()

    def _tag_pk(self, tag: str) -> str:
        return f"g~{row_key(self.scope)}~{row_key(tag)}"

    # ------------------------------------------------------------------ push writes

    def _pushed(self, task_id: str, now: float) -> dict[str, Any]:
        return {
            "PartitionKey": self._pushed_pk,
            "RowKey": row_key(task_id),
            "id": task_id,
            "pushed_at": now,
            "updated_at": now,
        }

    async def record_pushes(self, entries: Sequence[PushRecord], tag: str | None = None) -> None:
        if not entries:
            return
        now = self.clock()
        unique = list({e.id: e for e in entries}.values())
        for start in range(0, len(unique), TRANSACTION_SIZE):
            chunk = unique[start : start + TRANSACTION_SIZE]
            creates = [("create", self._pushed(e.id, now)) for e in chunk]
            if await self.access.transact("push", creates) is None:
                await self._record_known_pushes(chunk, now)
        if tag is not None:
            for start in range(0, len(unique), TRANSACTION_SIZE):
                members = [
                    (
                        "upsert",
                        {
                            "PartitionKey": self._tag_pk(tag),
                            "RowKey": row_key(e.id),
                            "id": e.id,
                            "added_at": now,
                        },
                    )
                    for e in unique[start : start + TRANSACTION_SIZE]
                ]
                await self.access.transact("tag", members)
            await self._upsert_tag_name(tag, now)

    async def _record_known_pushes(self, chunk: Sequence[PushRecord], now: float) -> None:
        """Some IDs were pushed before: add the missing ``p~`` entities; an ID pushed as
        new whose record is final starts a new generation (its record is deleted)."""
        ids = [e.id for e in chunk]
        pushed, records = await asyncio.gather(
            self.access.lookup(self._pushed_pk, ids), self.access.lookup(self._tasks_pk, ids)
        )
        creates = [("create", self._pushed(e.id, now)) for e in chunk if e.id not in pushed]
        if creates and await self.access.transact("push", creates) is None:
            for operation in creates:  # raced with another producer: one at a time
                await self.access.transact("push", [operation])
        for entry in chunk:
            record = records.get(entry.id)
            if entry.duplicate is not False or record is None or record.get("state") not in FINAL:
                continue
            self._written.pop(entry.id, None)
            delete = ("delete", record, _if_unchanged(etag(record)))
            await self.access.transact("new generation", [delete])
            if entry.id in pushed:
                renewed = ("upsert", self._pushed(entry.id, now))
                await self.access.transact("new generation", [renewed])

    async def _upsert_tag_name(self, tag: str, now: float) -> None:
        from azure.data.tables import UpdateMode

        entity = {"PartitionKey": self._names_pk, "RowKey": row_key(tag), "tag": tag}
        created = await self.access.transact(
            "tag name", [("create", {**entity, "first_pushed_at": now, "last_pushed_at": now})]
        )
        if created is None:
            await self.access.transact(
                "tag name",
                [("upsert", {**entity, "last_pushed_at": now}, {"mode": UpdateMode.MERGE})],
            )

    # ------------------------------------------------------------------ worker writes

    async def record_attempts(self, events: Sequence[AttemptEvent]) -> None:
        latest = list({e.id: e for e in events}.values())
        for start in range(0, len(latest), TRANSACTION_SIZE):
            chunk = latest[start : start + TRANSACTION_SIZE]
            operations = []
            for event in chunk:
                remembered = self._written.get(event.id)
                operation = self._operation(remembered, event)
                if operation is not None:
                    operations.append(operation)
            if not operations:
                continue
            answers = await self.access.transact("outcomes", operations)
            if answers is None:  # a condition failed: read, decide, write, one by one
                for event in chunk:
                    await self._record_attempt_read_first(event)
                continue
            for operation, answer in zip(operations, answers):
                self._remember(operation[1], answer.get("etag"))

    def _operation(self, current: tuple[str, dict[str, Any]] | None, event: AttemptEvent) -> Any:
        """The write for ``event`` given the record as last seen (ETag, entity), or
        None if it would not move the record forward.  No record seen: an insert."""
        if current is None:
            return ("create", self._apply(None, event))
        tag, entity = current
        if not moves_forward(entity.get("state"), int(entity.get("attempt") or 0), event):
            return None
        return ("update", self._apply(entity, event), _if_match(tag))

    async def _record_attempt_read_first(self, event: AttemptEvent) -> None:
        from .base import LedgerError

        for _ in range(8):
            found = (await self.access.lookup(self._tasks_pk, [event.id])).get(event.id)
            current = (etag(found), dict(found)) if found is not None else None
            operation = self._operation(current, event)
            if operation is None:
                if current is not None:
                    self._remember(current[1], current[0])
                return
            answers = await self.access.transact("outcome", [operation])
            if answers is not None:
                self._remember(operation[1], answers[0].get("etag"))
                return
        raise LedgerError(f"ledger outcome of task {event.id}: kept changing; giving up")

    def _remember(self, entity: dict[str, Any], tag: str | None) -> None:
        task_id = entity["id"]
        if tag is None or entity.get("state") in FINAL:
            self._written.pop(task_id, None)  # a final record is never written again
            return
        self._written[task_id] = (tag, entity)
        self._written.move_to_end(task_id)
        while len(self._written) > REMEMBERED_WRITES:
            self._written.popitem(last=False)

    def _apply(self, entity: dict[str, Any] | None, event: AttemptEvent) -> dict[str, Any]:
        """The record after ``event`` (the same fields the SQLite upsert sets)."""
        old = entity or {}
        started = event.started_at if event.started_at is not None else None
        if started is None:
            started = event.at if event.is_start else old.get("started_at")
        new: dict[str, Any] = {
            "PartitionKey": self._tasks_pk,
            "RowKey": row_key(event.id),
            "id": event.id,
            "state": event.state,
            "attempt": event.attempt,
            "interruptions": int(old.get("interruptions") or 0)
            + (event.state == TaskState.INTERRUPTED.value),
            "started_at": started,
            "finished_at": None if event.is_start else event.at,
            "worker_id": event.worker_id,
            "host": event.host,
            "duration": event.duration,
            "exit_code": event.exit_code,
            "reason": event.reason,
            "summary": event.summary,
            "result_note": event.result_note,
            "updated_at": self.clock(),
        }
        if event.result_json is not None:
            parts = [
                event.result_json[i : i + RESULT_CHUNK]
                for i in range(0, len(event.result_json), RESULT_CHUNK)
            ]
            new["result_parts"] = len(parts)
            for index, part in enumerate(parts):
                new[f"result_{index}"] = part
        return {k: v for k, v in new.items() if v is not None}

    async def heartbeat(self, worker: WorkerRecord) -> None:
        entity = {
            "PartitionKey": self._workers_pk,
            "RowKey": row_key(worker.worker_id),
            **{k: v for k, v in worker.as_dict().items() if k != "running"},
            "running": json.dumps(worker.running)[:30_000],
        }
        await self.access.transact("heartbeat", [("upsert", entity)])

    # ------------------------------------------------------------------ reads

    async def get(self, ids: Sequence[str]) -> dict[str, TaskRecord]:
        records, pushed = await asyncio.gather(
            self.access.lookup(self._tasks_pk, ids), self.access.lookup(self._pushed_pk, ids)
        )
        found: dict[str, TaskRecord] = {}
        for task_id in dict.fromkeys(ids):
            if task_id in records or task_id in pushed:
                found[task_id] = _record(task_id, records.get(task_id), pushed.get(task_id))
        return found

    async def succeeded_among(self, ids: Sequence[str]) -> set[str]:
        records = await self.access.lookup(self._tasks_pk, ids)
        return {i for i, e in records.items() if e.get("state") == TaskState.SUCCEEDED.value}

    async def tags_of(self, task_id: str) -> list[str]:
        query = f"PartitionKey eq '{quote(self._names_pk)}'"
        names = [e["tag"] async for e in self.access.scan("tags", query, ["tag"])]
        tags = []
        for tag in names[:50]:
            hits = await self.access.query(
                "tag membership",
                f"PartitionKey eq '{quote(self._tag_pk(tag))}' "
                f"and RowKey eq '{quote(row_key(task_id))}'",
                ["id"],
            )
            if hits:
                tags.append(tag)
        return tags

    async def _members(self, tag: str) -> AsyncIterator[list[str]]:
        query = f"PartitionKey eq '{quote(self._tag_pk(tag))}'"
        batch: list[str] = []
        async for member in self.access.scan("tag members", query, ["id"]):
            batch.append(member["id"])
            if len(batch) >= _MEMBER_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    async def iter_tag(self, tag: str, *, page_size: int = 1000) -> AsyncIterator[TaskRecord]:
        async for batch in self._members(tag):
            for record in (await self.get(batch)).values():
                yield record

    async def _everything(self) -> AsyncIterator[TaskRecord]:
        """Every task: the RowKey-ordered ``p~`` and ``t~`` streams merged."""
        pushed = self.access.scan("scan", f"PartitionKey eq '{quote(self._pushed_pk)}'")
        records = self.access.scan("scan", f"PartitionKey eq '{quote(self._tasks_pk)}'")
        p, t = await _next(pushed), await _next(records)
        while p is not None or t is not None:
            if t is None or (p is not None and p["RowKey"] < t["RowKey"]):
                assert p is not None
                yield _record(p["id"], None, p)
                p = await _next(pushed)
            elif p is None or t["RowKey"] < p["RowKey"]:
                yield _record(t["id"], t, None)
                t = await _next(records)
            else:
                yield _record(t["id"], t, p)
                p, t = await _next(pushed), await _next(records)

    async def _each(self, tag: str | None) -> AsyncIterator[TaskRecord]:
        if tag is None:
            async for record in self._everything():
                yield record
            return
        async for record in self.iter_tag(tag):
            yield record

    async def status(self, tag: str | None = None, *, window_minutes: float = 5.0) -> StatusSummary:
        since = self.clock() - window_minutes * 60
        counts: dict[str, int] = {}
        finished = members = 0
        if tag is not None:
            async for batch in self._members(tag):
                members += len(batch)
        async for record in self._each(tag):
            counts[record.state.value] = counts.get(record.state.value, 0) + 1
            if record.state.final and (record.finished_at or 0) >= since:
                finished += 1
        total = sum(counts.values())
        return StatusSummary(
            counts=counts,
            total=total,
            finished_last_minutes=finished,
            window_minutes=window_minutes,
            unknown=max(0, members - total) if tag is not None else 0,
        )

    async def tasks(
        self, *, tag: str | None = None, state: TaskState | None = None, limit: int = 50
    ) -> list[TaskRecord]:
        newest: list[tuple[float, str, TaskRecord]] = []
        async for record in self._each(tag):
            if state is not None and record.state is not state:
                continue
            changed = record.finished_at or record.started_at or record.pushed_at or 0.0
            item = (float(changed), record.id, record)
            if len(newest) < limit:
                heapq.heappush(newest, item)
            else:
                heapq.heappushpop(newest, item)
        return [r for _, _, r in sorted(newest, key=lambda x: -x[0])]

    async def failures(
        self, *, tag: str | None = None, limit: int = 20, examples: int = 3
    ) -> list[FailureGroup]:
        groups: dict[str, FailureGroup] = {}
        async for record in self._each(tag):
            if record.state not in (TaskState.FAILED, TaskState.DEAD_LETTERED):
                continue
            reason = record.reason or "unknown"
            group = groups.setdefault(reason, FailureGroup(reason, 0, []))
            group.count += 1
            if len(group.example_ids) < examples:
                group.example_ids.append(record.id)
            if group.example_summary is None:
                group.example_summary = record.summary
        return sorted(groups.values(), key=lambda g: -g.count)[:limit]

    async def durations(self, *, tag: str | None = None, limit: int = 10_000) -> list[float]:
        recent: list[tuple[float, float]] = []
        async for record in self._each(tag):
            if record.state is not TaskState.SUCCEEDED or record.duration is None:
                continue
            item = (float(record.finished_at or 0), float(record.duration))
            if len(recent) < limit:
                heapq.heappush(recent, item)
            else:
                heapq.heappushpop(recent, item)
        return [d for _, d in sorted(recent, reverse=True)]

    async def workers(self, *, include_stopped_seconds: float = 3600) -> list[WorkerRecord]:
        since = self.clock() - include_stopped_seconds
        query = f"PartitionKey eq '{quote(self._workers_pk)}'"
        out = []
        for e in await self.access.query("workers", query):
            if float(e.get("last_seen") or 0) < since:
                continue
            out.append(
                WorkerRecord(
                    worker_id=e.get("worker_id", e["RowKey"]),
                    host=e.get("host", ""),
                    pid=int(e.get("pid") or 0),
                    slots=int(e.get("slots") or 0),
                    queue=e.get("queue", ""),
                    started_at=float(e.get("started_at") or 0),
                    last_seen=float(e.get("last_seen") or 0),
                    running=json.loads(e.get("running") or "[]"),
                    tasks_done=int(e.get("tasks_done") or 0),
                    version=e.get("version", ""),
                    stopped=bool(e.get("stopped")),
                )
            )
        return sorted(out, key=lambda w: w.started_at)

    async def tags(self, *, limit: int = 50) -> list[str]:
        entities = await self.access.query("tags", f"PartitionKey eq '{quote(self._names_pk)}'")
        entities.sort(key=lambda e: -float(e.get("last_pushed_at") or 0))
        return [e["tag"] for e in entities[:limit]]

    # ------------------------------------------------------------------ retention

    async def prune(self, older_than_seconds: float, *, unfinished: bool = False) -> int:
        """Records (``t~``) of finished tasks not updated since the cut-off go with
        their push entity (``p~``).  With ``unfinished`` every old record does, and
        so does an old push entity whose task has no (newer) record (pushed, never
        started).  A tag membership that old goes once its task has neither entity
        left, and a tag's name once it has no members left."""
        cutoff = self.clock() - older_than_seconds
        finished = "" if unfinished else f" and ({_FINAL_FILTER})"
        old_records = await self._keys_older(self._tasks_pk, "updated_at", cutoff, finished)
        await self.access.delete(self._tasks_pk, [key for key, _ in old_records])
        await self.access.delete(self._pushed_pk, [key for key, _ in old_records])
        orphans: list[str] = []
        if unfinished:
            gone = {key for key, _ in old_records}
            old_pushes = [
                (key, task_id)
                for key, task_id in await self._keys_older(self._pushed_pk, "updated_at", cutoff)
                if key not in gone
            ]
            alive = await self.access.lookup(self._tasks_pk, [task_id for _, task_id in old_pushes])
            orphans = [key for key, task_id in old_pushes if task_id not in alive]
            await self.access.delete(self._pushed_pk, orphans)
        for entity in await self.access.query("tags", f"PartitionKey eq '{quote(self._names_pk)}'"):
            partition = self._tag_pk(entity["tag"])
            members = await self._keys_older(partition, "added_at", cutoff)
            kept = await self._still_recorded([task_id for _, task_id in members])
            await self.access.delete(partition, [k for k, i in members if i not in kept])
            if float(entity.get("last_pushed_at", 0.0)) < cutoff and not kept:
                # every member was added by then (at its push): none is left
                await self.access.delete(self._names_pk, [entity["RowKey"]])
        keys = await self._keys_older(self._workers_pk, "last_seen", cutoff)
        await self.access.delete(self._workers_pk, [key for key, _ in keys])
        return len(old_records) + len(orphans)

    async def _still_recorded(self, ids: list[str]) -> set[str]:
        """Those of ``ids`` that still have a record or a push entity."""
        pushed, records = await asyncio.gather(
            self.access.lookup(self._pushed_pk, ids), self.access.lookup(self._tasks_pk, ids)
        )
        return set(pushed) | set(records)

    async def _keys_older(
        self, partition: str, field: str, cutoff: float, also: str = ""
    ) -> list[tuple[str, str]]:
        """(RowKey, task ID) of the entities of ``partition`` whose ``field`` is before
        ``cutoff`` (and that match the filter clause ``also``)."""
        query = f"PartitionKey eq '{quote(partition)}' and {field} lt {cutoff!r}{also}"
        return [
            (e["RowKey"], e.get("id", ""))
            async for e in self.access.scan("prune", query, ["RowKey", "id"])
        ]

    async def last_pruned(self) -> float | None:
        query = f"PartitionKey eq '{quote(self._meta_pk)}' and RowKey eq 'prune'"
        entities = await self.access.query("prune marker", query)
        return float(entities[0]["at"]) if entities else None

    async def mark_pruned(self, at: float) -> None:
        marker = {"PartitionKey": self._meta_pk, "RowKey": "prune", "at": at}
        await self.access.transact("prune marker", [("upsert", marker)])


async def _next(stream: AsyncIterator[dict[str, Any]]) -> dict[str, Any] | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


def _record(
    task_id: str, entity: dict[str, Any] | None, pushed: dict[str, Any] | None
) -> TaskRecord:
    """A record from the worker-written entity (None: still queued) and the push entity."""
    pushed_at = pushed.get("pushed_at") if pushed is not None else None
    if entity is None:
        return TaskRecord(id=task_id, state=TaskState.QUEUED, pushed_at=pushed_at)
    result_text = None
    parts = int(entity.get("result_parts") or 0)
    if parts:
        result_text = "".join(entity.get(f"result_{i}", "") for i in range(parts))
    values = {name: entity.get(name) for name in _RECORD_FIELDS}
    return TaskRecord(
        id=task_id,
        state=TaskState(values["state"] or TaskState.QUEUED.value),
        attempt=int(values["attempt"] or 0),
        interruptions=int(values["interruptions"] or 0),
        pushed_at=pushed_at,
        started_at=values["started_at"],
        finished_at=values["finished_at"],
        worker_id=values["worker_id"],
        host=values["host"],
        duration=values["duration"],
        exit_code=values["exit_code"],
        reason=values["reason"],
        summary=values["summary"],
        result=decode_result(result_text),
        result_note=values["result_note"],
    )
