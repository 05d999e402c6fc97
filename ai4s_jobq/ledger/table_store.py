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
``t~SCOPE``                task ID (escaped)      the task record (state, attempt, ...)
``g~SCOPE~TAG``            task ID (escaped)      membership of a tag
``n~SCOPE``                tag (escaped)          a tag's first/last push times
``w~SCOPE``                worker ID              a worker's last heartbeat
=========================  =====================  =======================================

Writes go in entity-group transactions (at most 100 operations, one partition).  An
attempt event is applied by reading the records of a flush (14 IDs per query), deciding
with :func:`.events.moves_forward`, and writing with the read ETag as a condition: if
another worker changed a record in between, the transaction fails (HTTP 412) and that
chunk is redone one record at a time, re-reading each.  So a late write can never move a
record backwards.  A result (up to 32 KiB of JSON) is split over string properties of
16,000 characters, below Table storage's 64 KiB per property.

Reads that aggregate (status, tasks, failures) scan the partition: fine for the
thousands to hundreds of thousands of tasks a run holds, with constant memory; the
SQLite ledger is the one with sub-second status on 100,000 tasks.

Cost, measured on Azurite (``bench/bench_ledger.py``): each operation of a transaction
costs Azurite ~5-9 ms and a 14-ID lookup ~75 ms, so a worker's ledger (one lookup share
and one write per task) nearly doubles an Azurite drain of no-op tasks.  Real Table
storage is much cheaper per operation.  The way to fewer operations would be a journal:
one entity per flush holding many events, folded into the records by readers; not done.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from .base import (
    FailureGroup,
    LedgerError,
    LedgerStore,
    StatusSummary,
    TaskRecord,
    TaskState,
    WorkerRecord,
)
from .events import FINAL, AttemptEvent, PushEntry, decode_result, moves_forward

T = TypeVar("T")

TRANSACTION_SIZE = 100
LOOKUP_GROUP = 14  # RowKey comparisons per filter (Table storage allows 15 in all)
LOOKUP_CONCURRENCY = 8
RESULT_CHUNK = 16_000
_RECORD_FIELDS = (
    "state",
    "attempt",
    "interruptions",
    "pushed_at",
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


def _key(text: str) -> str:
    from ..backends.storage.dedup import row_key

    return row_key(text)


class TableLedger(LedgerStore):
    """A queue's ledger in one Azure Table (see the module docstring for the layout)."""

    def __init__(
        self,
        table_client: Callable[[], Awaitable[Any]],
        table_name: str,
        scope: str,
        *,
        where: str,
        close: Callable[[], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self._client_factory = table_client
        self.table_name = table_name
        self.scope = scope
        self._where = where
        self._close = close
        self.clock = clock
        self._table: Any = None
        self._opening: asyncio.Lock | None = None
        self._limit = asyncio.Semaphore(LOOKUP_CONCURRENCY)

    # ------------------------------------------------------------------ construction

    @classmethod
    def for_storage_backend(cls, backend: Any, table_name: str) -> TableLedger:
        """The ledger of a Storage Queue: a table in the queue's own account, reached
        with the queue's credentials and endpoints (the backend's Table client)."""

        async def client() -> Any:
            service = getattr(backend, "_tables", None)
            if service is None:
                raise LedgerError("the Storage Queue backend is not open")
            return service

        return cls(client, table_name, backend.queue_name, where=f"{backend.account}/{table_name}")

    @classmethod
    def for_account(
        cls,
        account: str | None,
        table_name: str,
        *,
        scope: str,
        connection_string: str | None = None,
    ) -> TableLedger:
        """A ledger table named by ``--ledger ACCOUNT[/TABLE]``: Azure AD
        (DefaultAzureCredential, honouring ``JOBQ_STORAGE_TABLE_ENDPOINT``/``_CA``), or
        a connection string, whose account wins."""
        state: dict[str, Any] = {}

        async def client() -> Any:
            from azure.data.tables.aio import TableServiceClient

            retry: dict[str, Any] = {"retry_total": 3, "retry_backoff_factor": 0.5}
            if connection_string:
                state["service"] = TableServiceClient.from_connection_string(
                    connection_string, **retry
                )
            else:
                from azure.identity.aio import DefaultAzureCredential

                from ..backends.storage.endpoint import StorageEndpointOverride

                override = StorageEndpointOverride.from_env()
                state["credential"] = DefaultAzureCredential()
                state["service"] = TableServiceClient(
                    override.table_url(str(account)),
                    credential=state["credential"],
                    **retry,
                    **override.sdk_kwargs(),
                )
            return state["service"]

        async def close() -> None:
            for name in ("service", "credential"):
                if state.get(name) is not None:
                    try:
                        await state.pop(name).close()
                    except Exception:  # noqa: BLE001 - best effort
                        pass

        where = f"{account or 'connection string account'}/{table_name}"
        return cls(client, table_name, scope, where=where, close=close)

    @property
    def description(self) -> str:
        return f"Azure Table ledger {self._where}"

    # ------------------------------------------------------------------ plumbing

    async def open(self) -> None:
        if self._table is not None:
            return
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._table is not None:
                return
            from azure.core.exceptions import ResourceExistsError

            async def create() -> Any:
                service = await self._client_factory()
                try:
                    await service.create_table(self.table_name)
                except ResourceExistsError:
                    pass
                return service.get_table_client(self.table_name)

            self._table = await self._call("opening", create)

    async def close(self) -> None:
        self._table = None
        if self._close is not None:
            await self._close()

    async def _call(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run a Table request, turning SDK errors into a :class:`LedgerError` that
        keeps only the status and code (SDK messages may echo URLs with SAS tokens)."""
        from ..backends.base import BackendError
        from ..backends.storage.wire import translate_errors

        try:
            with translate_errors(f"ledger {what}", self._where):
                return await operation()
        except BackendError as exc:
            raise LedgerError(str(exc)) from None

    async def _query(
        self, what: str, query_filter: str, select: list[str] | None = None
    ) -> list[dict[str, Any]]:
        await self.open()

        async def run() -> list[dict[str, Any]]:
            async with self._limit:
                pages = self._table.query_entities(query_filter, select=select)
                return [entity async for entity in pages]

        return await self._call(what, run)

    async def _scan(
        self, what: str, query_filter: str, select: list[str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream a large query page by page (constant memory)."""
        await self.open()
        pager = self._table.query_entities(
            query_filter, select=select, results_per_page=1000
        ).by_page()
        while True:

            async def next_page() -> list[dict[str, Any]] | None:
                try:
                    page = await pager.__anext__()
                except StopAsyncIteration:
                    return None
                return [entity async for entity in page]

            entities = await self._call(what, next_page)
            if entities is None:
                return
            for entity in entities:
                yield entity

    async def _transact(self, what: str, operations: list[Any]) -> bool:
        """Submit one transaction: True if applied, False if a condition failed
        (409 exists / 412 changed / 404 gone); other failures raise LedgerError."""
        from azure.data.tables import TableTransactionError

        await self.open()

        async def run() -> bool:
            try:
                await self._table.submit_transaction(operations)
            except TableTransactionError as exc:
                if exc.status_code in (404, 409, 412):
                    return False
                raise
            return True

        return await self._call(what, run)

    # ------------------------------------------------------------------ keys

    @property
    def _tasks_pk(self) -> str:
        return f"t~{_key(self.scope)}"

    def _tag_pk(self, tag: str) -> str:
        return f"g~{_key(self.scope)}~{_key(tag)}"

    @property
    def _names_pk(self) -> str:
        return f"n~{_key(self.scope)}"

    @property
    def _workers_pk(self) -> str:
        return f"w~{_key(self.scope)}"

    async def _records(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Existing task entities by task ID (with their ETags in ``metadata``)."""
        wanted = list(dict.fromkeys(ids))
        groups = [wanted[i : i + LOOKUP_GROUP] for i in range(0, len(wanted), LOOKUP_GROUP)]

        async def query(group: list[str]) -> list[dict[str, Any]]:
            rows = " or ".join(f"RowKey eq '{_quote(_key(i))}'" for i in group)
            return await self._query(
                "lookup", f"PartitionKey eq '{_quote(self._tasks_pk)}' and ({rows})"
            )

        found: dict[str, dict[str, Any]] = {}
        for entities in await asyncio.gather(*(query(g) for g in groups)):
            for entity in entities:
                found[entity["id"]] = entity
        return found

    # ------------------------------------------------------------------ writes

    async def record_pushes(self, entries: Sequence[PushEntry], tag: str | None = None) -> None:
        if not entries:
            return
        now = self.clock()
        unique = list({e.id: e for e in entries}.values())
        for start in range(0, len(unique), TRANSACTION_SIZE):
            chunk = unique[start : start + TRANSACTION_SIZE]
            creates = [("create", self._queued(e.id, now)) for e in chunk]
            if not await self._transact("push", creates):
                await self._record_known_pushes(chunk, now)
        if tag is not None:
            for start in range(0, len(unique), TRANSACTION_SIZE):
                members = [
                    (
                        "upsert",
                        {
                            "PartitionKey": self._tag_pk(tag),
                            "RowKey": _key(e.id),
                            "id": e.id,
                            "added_at": now,
                        },
                    )
                    for e in unique[start : start + TRANSACTION_SIZE]
                ]
                await self._transact("tag", members)
            await self._upsert_tag_name(tag, now)

    def _queued(self, task_id: str, now: float) -> dict[str, Any]:
        return {
            "PartitionKey": self._tasks_pk,
            "RowKey": _key(task_id),
            "id": task_id,
            "state": TaskState.QUEUED.value,
            "attempt": 0,
            "interruptions": 0,
            "pushed_at": now,
            "updated_at": now,
        }

    async def _record_known_pushes(self, chunk: Sequence[PushEntry], now: float) -> None:
        """Some IDs of the chunk exist: create the missing, reset final records that
        were pushed as new (a new generation), leave the rest."""
        from azure.core import MatchConditions
        from azure.data.tables import UpdateMode

        existing = await self._records([e.id for e in chunk])
        operations: list[Any] = []
        for entry in chunk:
            entity = existing.get(entry.id)
            if entity is None:
                operations.append(("create", self._queued(entry.id, now)))
            elif entry.duplicate is False and entity.get("state") in FINAL:
                operations.append(
                    (
                        "update",
                        self._queued(entry.id, now),
                        {
                            "mode": UpdateMode.REPLACE,
                            "etag": _etag(entity),
                            "match_condition": MatchConditions.IfNotModified,
                        },
                    )
                )
        if operations and not await self._transact("push", operations):
            # raced with a worker or another producer: one at a time, re-reading
            for entry in chunk:
                await self._record_known_pushes_one(entry, now)

    async def _record_known_pushes_one(self, entry: PushEntry, now: float) -> None:
        for _ in range(5):
            existing = (await self._records([entry.id])).get(entry.id)
            if existing is None:
                if await self._transact("push", [("create", self._queued(entry.id, now))]):
                    return
                continue
            if entry.duplicate is not False or existing.get("state") not in FINAL:
                return
            if await self._replace(existing, self._queued(entry.id, now)):
                return

    async def _replace(self, existing: dict[str, Any], entity: dict[str, Any]) -> bool:
        from azure.core import MatchConditions
        from azure.data.tables import UpdateMode

        options = {
            "mode": UpdateMode.REPLACE,
            "etag": _etag(existing),
            "match_condition": MatchConditions.IfNotModified,
        }
        return await self._transact("update", [("update", entity, options)])

    async def _upsert_tag_name(self, tag: str, now: float) -> None:
        from azure.data.tables import UpdateMode

        entity = {"PartitionKey": self._names_pk, "RowKey": _key(tag), "tag": tag}
        created = await self._transact(
            "tag name", [("create", {**entity, "first_pushed_at": now, "last_pushed_at": now})]
        )
        if not created:
            await self._transact(
                "tag name",
                [("upsert", {**entity, "last_pushed_at": now}, {"mode": UpdateMode.MERGE})],
            )

    async def record_attempts(self, events: Sequence[AttemptEvent]) -> None:
        latest = list({e.id: e for e in events}.values())
        for start in range(0, len(latest), TRANSACTION_SIZE):
            chunk = latest[start : start + TRANSACTION_SIZE]
            existing = await self._records([e.id for e in chunk])
            operations = []
            for event in chunk:
                operation = self._attempt_operation(existing.get(event.id), event)
                if operation is not None:
                    operations.append(operation)
            if operations and not await self._transact("outcomes", operations):
                for event in chunk:
                    await self._record_attempt_one(event)

    def _attempt_operation(self, entity: dict[str, Any] | None, event: AttemptEvent) -> Any:
        from azure.core import MatchConditions
        from azure.data.tables import UpdateMode

        state = entity.get("state") if entity is not None else None
        attempt = int(entity.get("attempt") or 0) if entity is not None else 0
        if not moves_forward(state, attempt, event):
            return None
        merged = self._apply(entity, event)
        if entity is None:
            return ("create", merged)
        options = {
            "mode": UpdateMode.REPLACE,
            "etag": _etag(entity),
            "match_condition": MatchConditions.IfNotModified,
        }
        return ("update", merged, options)

    async def _record_attempt_one(self, event: AttemptEvent) -> None:
        for _ in range(8):
            entity = (await self._records([event.id])).get(event.id)
            operation = self._attempt_operation(entity, event)
            if operation is None or await self._transact("outcome", [operation]):
                return
        raise LedgerError(f"ledger outcome of task {event.id}: kept changing; giving up")

    def _apply(self, entity: dict[str, Any] | None, event: AttemptEvent) -> dict[str, Any]:
        """The record after ``event`` (the same fields the SQLite upsert sets)."""
        old = dict(entity or {})
        new: dict[str, Any] = {
            "PartitionKey": self._tasks_pk,
            "RowKey": _key(event.id),
            "id": event.id,
            "pushed_at": old.get("pushed_at"),
            "state": event.state,
            "attempt": event.attempt,
            "interruptions": int(old.get("interruptions") or 0)
            + (event.state == TaskState.INTERRUPTED.value),
            "started_at": event.started_at
            if event.started_at is not None
            else (event.at if event.is_start else old.get("started_at")),
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
            "RowKey": _key(worker.worker_id),
            **{k: v for k, v in worker.as_dict().items() if k != "running"},
            "running": json.dumps(worker.running)[:30_000],
        }
        await self._transact("heartbeat", [("upsert", entity)])

    # ------------------------------------------------------------------ reads

    async def get(self, ids: Sequence[str]) -> dict[str, TaskRecord]:
        found = {i: _record(e) for i, e in (await self._records(ids)).items()}
        if len(found) == 1:  # one task's page (`jobq result`): its tags too
            for record in found.values():
                record.tags = await self._tags_of(record.id)
        return found

    async def _tags_of(self, task_id: str) -> list[str]:
        names = [
            e["tag"]
            async for e in self._scan(
                "tags", f"PartitionKey eq '{_quote(self._names_pk)}'", ["tag"]
            )
        ]
        tags = []
        for tag in names[:50]:
            hits = await self._query(
                "tag membership",
                f"PartitionKey eq '{_quote(self._tag_pk(tag))}' "
                f"and RowKey eq '{_quote(_key(task_id))}'",
                ["id"],
            )
            if hits:
                tags.append(tag)
        return tags

    async def iter_tag(self, tag: str, *, page_size: int = 1000) -> AsyncIterator[TaskRecord]:
        batch: list[str] = []
        async for member in self._scan(
            "tag members", f"PartitionKey eq '{_quote(self._tag_pk(tag))}'", ["id"]
        ):
            batch.append(member["id"])
            if len(batch) >= min(page_size, 200):
                for entity in (await self._records(batch)).values():
                    yield _record(entity)
                batch = []
        if batch:
            for entity in (await self._records(batch)).values():
                yield _record(entity)

    async def _each(
        self, tag: str | None, select: list[str] | None
    ) -> AsyncIterator[dict[str, Any]]:
        """Every task entity (of ``tag``), with at least the ``select``ed fields
        (None: all of them)."""
        if tag is None:
            fields = None if select is None else select + ["id"]
            query = f"PartitionKey eq '{_quote(self._tasks_pk)}'"
            async for entity in self._scan("scan", query, fields):
                yield entity
            return
        batch: list[str] = []
        async for member in self._scan(
            "tag members", f"PartitionKey eq '{_quote(self._tag_pk(tag))}'", ["id"]
        ):
            batch.append(member["id"])
            if len(batch) >= 200:
                for entity in (await self._records(batch)).values():
                    yield entity
                batch = []
        if batch:
            for entity in (await self._records(batch)).values():
                yield entity

    async def status(self, tag: str | None = None, *, window_minutes: float = 5.0) -> StatusSummary:
        since = self.clock() - window_minutes * 60
        counts: dict[str, int] = {}
        finished = members = 0
        async for entity in self._each(tag, ["state", "finished_at"]):
            state = entity.get("state", "queued")
            counts[state] = counts.get(state, 0) + 1
            if state in FINAL and float(entity.get("finished_at") or 0) >= since:
                finished += 1
        if tag is not None:
            async for _ in self._scan(
                "tag members", f"PartitionKey eq '{_quote(self._tag_pk(tag))}'", ["id"]
            ):
                members += 1
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
        newest: list[tuple[float, str, dict[str, Any]]] = []
        async for entity in self._each(tag, None):
            if state is not None and entity.get("state") != state.value:
                continue
            item = (float(entity.get("updated_at") or 0), entity["id"], entity)
            if len(newest) < limit:
                heapq.heappush(newest, item)
            else:
                heapq.heappushpop(newest, item)
        return [_record(e) for _, _, e in sorted(newest, key=lambda x: -x[0])]

    async def failures(
        self, *, tag: str | None = None, limit: int = 20, examples: int = 3
    ) -> list[FailureGroup]:
        groups: dict[str, FailureGroup] = {}
        async for entity in self._each(tag, ["state", "reason", "summary"]):
            if entity.get("state") not in (TaskState.FAILED.value, TaskState.DEAD_LETTERED.value):
                continue
            reason = entity.get("reason") or "unknown"
            group = groups.setdefault(reason, FailureGroup(reason, 0, []))
            group.count += 1
            if len(group.example_ids) < examples:
                group.example_ids.append(entity["id"])
            if group.example_summary is None:
                group.example_summary = entity.get("summary")
        return sorted(groups.values(), key=lambda g: -g.count)[:limit]

    async def durations(self, *, tag: str | None = None, limit: int = 10_000) -> list[float]:
        recent: list[tuple[float, float]] = []
        async for entity in self._each(tag, ["state", "duration", "finished_at"]):
            if entity.get("state") != TaskState.SUCCEEDED.value or entity.get("duration") is None:
                continue
            item = (float(entity.get("finished_at") or 0), float(entity["duration"]))
            if len(recent) < limit:
                heapq.heappush(recent, item)
            else:
                heapq.heappushpop(recent, item)
        return [d for _, d in sorted(recent, reverse=True)]

    async def workers(self, *, include_stopped_seconds: float = 3600) -> list[WorkerRecord]:
        since = self.clock() - include_stopped_seconds
        entities = await self._query("workers", f"PartitionKey eq '{_quote(self._workers_pk)}'")
        out = []
        for e in entities:
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
        entities = await self._query("tags", f"PartitionKey eq '{_quote(self._names_pk)}'")
        entities.sort(key=lambda e: -float(e.get("last_pushed_at") or 0))
        return [e["tag"] for e in entities[:limit]]

    async def prune(self, older_than_seconds: float) -> int:
        cutoff = self.clock() - older_than_seconds
        deleted = 0
        deleted += await self._delete_where(self._tasks_pk, "updated_at", cutoff)
        for entity in await self._query("tags", f"PartitionKey eq '{_quote(self._names_pk)}'"):
            await self._delete_where(self._tag_pk(entity["tag"]), "added_at", cutoff)
        await self._delete_where(self._names_pk, "last_pushed_at", cutoff)
        await self._delete_where(self._workers_pk, "last_seen", cutoff)
        return deleted

    async def last_pruned(self) -> float | None:
        entities = await self._query(
            "prune marker", f"PartitionKey eq '{_quote(self._meta_pk)}' and RowKey eq 'prune'"
        )
        return float(entities[0]["at"]) if entities else None

    async def mark_pruned(self, at: float) -> None:
        marker = {"PartitionKey": self._meta_pk, "RowKey": "prune", "at": at}
        await self._transact("prune marker", [("upsert", marker)])

    @property
    def _meta_pk(self) -> str:
        return f"m~{_key(self.scope)}"

    async def _delete_where(self, partition: str, field: str, cutoff: float) -> int:
        query = f"PartitionKey eq '{_quote(partition)}' and {field} lt {cutoff!r}"
        keys: list[str] = [e["RowKey"] async for e in self._scan("prune", query, ["RowKey"])]
        for start in range(0, len(keys), TRANSACTION_SIZE):
            operations = [
                ("delete", {"PartitionKey": partition, "RowKey": key})
                for key in keys[start : start + TRANSACTION_SIZE]
            ]
            if not await self._transact("prune", operations):
                for operation in operations:  # one vanished meanwhile: one by one
                    await self._transact("prune", [operation])
        return len(keys)


def _quote(value: str) -> str:
    return value.replace("'", "''")


def _record(entity: dict[str, Any]) -> TaskRecord:
    result_text = None
    parts = int(entity.get("result_parts") or 0)
    if parts:
        result_text = "".join(entity.get(f"result_{i}", "") for i in range(parts))
    values = {name: entity.get(name) for name in _RECORD_FIELDS}
    return TaskRecord(
        id=entity["id"],
        state=TaskState(values["state"] or TaskState.QUEUED.value),
        attempt=int(values["attempt"] or 0),
        interruptions=int(values["interruptions"] or 0),
        pushed_at=values["pushed_at"],
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


def _etag(entity: Any) -> str:
    """The ETag the SDK put on a read entity (a ``TableEntity``'s ``metadata``)."""
    return str(entity.metadata["etag"])
