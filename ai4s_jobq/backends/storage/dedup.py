"""Application-side duplicate detection for Storage Queue: a ledger in Azure Table storage.

Storage Queue has no broker-side duplicate detection, so producers agree through
one table entity per (queue, task ID) in the same storage account:

* ``PartitionKey`` = queue name, ``RowKey`` = task ID (escaped if it holds
  characters Table storage forbids), ``state`` = ``pending`` | ``sent``,
  ``accepted_at`` = producer clock (epoch seconds) when the ID was claimed.

The order that never loses a task (see docs/storage-queue.md):

1. *claim*: insert a ``pending`` entity.  Insert is atomic in Table storage: of
   two racing producers exactly one wins, the other gets a conflict.
2. *send* the queue message (only the winner).
3. *mark sent*.  On a failed send the claim is *released* (deleted) so a retry
   can push the task again.

A producer that finds an existing entity:

* ``sent`` and younger than the window → the push is a duplicate.
* ``sent`` and older than the window → the window has passed: it takes the entity
  over with an ETag-conditional replace (again exactly one racer wins).
* ``pending`` → another producer is sending it right now; wait until it turns
  ``sent`` (duplicate) or disappears (claim again).  A ``pending`` entity older than
  ``pending_grace`` belongs to a producer that died between claim and mark-sent:
  take it over and send.  If that producer had in fact sent the message, the task
  is now in the queue twice — at least once, never lost.

Fresh IDs are claimed 100 at a time in one Table *transaction* (a batch of
inserts in one partition), so dedup costs about one extra round trip per 100
messages; a transaction that hits an existing ID falls back to one insert per ID.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables import TableTransactionError, UpdateMode

log = logging.getLogger("ai4s_jobq.storage")

LEDGER_TABLE = "jobqdedup"
TRANSACTION_SIZE = 100  # Table storage's limit on operations per transaction
PENDING = "pending"
SENT = "sent"

#: Table transactions are POSTs, which the SDK does not retry after a dropped
#: connection (e.g. the server closing an idle keep-alive socket).  Every ledger
#: operation is safe to repeat (claims carry a token, see ``_try_claim_one``).
_TRANSIENT = (ServiceRequestError, ServiceResponseError)
_ATTEMPTS = 4

_SAFE_ROW_KEY = re.compile(r"^[A-Za-z0-9._-]{1,512}$")


def row_key(task_id: str) -> str:
    """Task IDs are MD5 hex or user keys; Table RowKeys forbid ``/\\#?`` and control
    characters, so anything outside a safe alphabet is hex-encoded behind ``~``
    (which the safe alphabet never contains, so encoded keys cannot collide)."""
    if _SAFE_ROW_KEY.match(task_id):
        return task_id
    return "~" + task_id.encode("utf-8").hex()


@dataclass
class Claim:
    """The ledger's answer for one task ID."""

    task_id: str
    status: str  # "claimed" (send it), "duplicate" (drop it), "error"
    token: str | None = None  # the claim token written into the entity, when claimed
    error: BaseException | None = None


class DedupLedger:
    """The claim/mark/release protocol over one Table, for one queue."""

    def __init__(
        self,
        table: Any,  # azure.data.tables.aio.TableClient
        queue_name: str,
        window: timedelta,
        *,
        pending_grace: float = 60.0,
        concurrency: int = 32,
        batch: Callable[[str, list[tuple[str, dict[str, Any]]]], Awaitable[list[int]]]
        | None = None,
    ):
        self.table = table
        self.queue_name = queue_name
        self.window = window.total_seconds()
        self.pending_grace = pending_grace
        self._limit = asyncio.Semaphore(concurrency)
        self._producer = f"{socket.gethostname()}:{os.getpid()}"
        #: fast ``$batch`` sender (``StorageRest.table_batch``); None: the SDK's
        self._batch = batch

    def _entity(
        self, task_id: str, state: str, accepted_at: float, token: str = ""
    ) -> dict[str, Any]:
        return {
            "PartitionKey": self.queue_name,
            "RowKey": row_key(task_id),
            "state": state,
            "accepted_at": accepted_at,
            "producer": self._producer,
            "claim": token,
        }

    async def _call(self, operation: Callable[[], Awaitable[Any]]) -> Any:
        """Run one Table request (bounded concurrency), repeating it after a dropped
        connection."""
        for attempt in range(_ATTEMPTS):
            try:
                async with self._limit:
                    return await operation()
            except _TRANSIENT:
                if attempt == _ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.1 * 3**attempt)

    # ------------------------------------------------------------------ claim

    async def claim(self, task_ids: Sequence[str]) -> list[Claim]:
        """Claim distinct IDs; one :class:`Claim` per ID, in order."""
        results: list[Claim] = []
        for start in range(0, len(task_ids), TRANSACTION_SIZE):
            results.extend(await self._claim_chunk(task_ids[start : start + TRANSACTION_SIZE]))
        return results

    async def _claim_chunk(self, task_ids: Sequence[str], *, look_up: bool = True) -> list[Claim]:
        now = time.time()
        token = uuid.uuid4().hex
        entities = [self._entity(t, PENDING, now, token) for t in task_ids]
        try:
            applied = await self._create_all(entities)
        except Exception as exc:  # noqa: BLE001 - reported per task by the caller
            return [Claim(t, "error", error=exc) for t in task_ids]
        if applied:
            return [Claim(t, "claimed", token=token) for t in task_ids]
        # At least one ID exists already; nothing of the transaction was written.
        if look_up and len(task_ids) > 1:
            return await self._claim_known(task_ids, now)
        return list(await asyncio.gather(*(self._claim_one(t, token) for t in task_ids)))

    async def _create_all(self, entities: list[dict[str, Any]]) -> bool:
        """Insert all entities in one transaction: True if applied, False if one of
        them exists (then none was written).  Other failures raise."""
        if self._batch is not None:
            operations = [("create", e) for e in entities]
            statuses = await self._batch(LEDGER_TABLE, operations)
            if statuses and all(200 <= code < 300 for code in statuses):
                return True
            if 409 in statuses:
                return False
            raise LedgerError(f"ledger transaction refused (HTTP {statuses})")
        operations = [("create", e) for e in entities]
        try:
            await self._call(lambda: self.table.submit_transaction(operations))
        except TableTransactionError as exc:
            if exc.status_code == 409 or _code(exc) == "EntityAlreadyExists":
                return False
            raise
        return True

    async def _claim_known(self, task_ids: Sequence[str], now: float) -> list[Claim]:
        """After a conflict: read the chunk's existing entries in a few queries, so a
        re-pushed file costs ~7 requests per 100 tasks instead of 200.  Recent ``sent``
        entries are duplicates; absent IDs are claimed in one transaction; the rest
        (pending, expired) go through the one-ID protocol."""
        try:
            existing = await self._look_up(task_ids)
        except Exception:  # noqa: BLE001 - the one-ID protocol copes on its own
            existing = {}
        claims: dict[str, Claim] = {}
        missing = [t for t in task_ids if row_key(t) not in existing]
        for task_id in task_ids:
            entity = existing.get(row_key(task_id))
            if (
                entity is not None
                and entity.get("state") == SENT
                and now - float(entity.get("accepted_at") or 0.0) < self.window
            ):
                claims[task_id] = Claim(task_id, "duplicate")
        if missing:
            for claim in await self._claim_chunk(missing, look_up=False):
                claims[claim.task_id] = claim
        token = uuid.uuid4().hex
        rest = [t for t in task_ids if t not in claims]
        for claim in await asyncio.gather(*(self._claim_one(t, token) for t in rest)):
            claims[claim.task_id] = claim
        return [claims[t] for t in task_ids]

    async def _look_up(self, task_ids: Sequence[str]) -> dict[str, Any]:
        """Existing entities by RowKey; 14 IDs per query (Table storage allows 15
        comparisons in a filter, one is the PartitionKey).  Keys need no quoting:
        queue names and ``row_key`` output never contain quotes."""
        keys = [row_key(t) for t in task_ids]

        async def query(group: list[str]) -> list[Any]:
            rows = " or ".join(f"RowKey eq '{k}'" for k in group)
            query_filter = f"PartitionKey eq '{self.queue_name}' and ({rows})"

            async def run() -> list[Any]:
                pages = self.table.query_entities(
                    query_filter, select=["RowKey", "state", "accepted_at"]
                )
                return [entity async for entity in pages]

            return await self._call(run)

        groups = [keys[i : i + 14] for i in range(0, len(keys), 14)]
        found: dict[str, Any] = {}
        for entities in await asyncio.gather(*(query(g) for g in groups)):
            for entity in entities:
                found[entity["RowKey"]] = entity
        return found

    async def _claim_one(self, task_id: str, token: str) -> Claim:
        delay = 0.02
        while True:
            try:
                return await self._try_claim_one(task_id, token)
            except _WaitForOwner:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            except Exception as exc:  # noqa: BLE001 - reported per task by the caller
                return Claim(task_id, "error", error=exc)

    async def _try_claim_one(self, task_id: str, token: str) -> Claim:
        """One round of the protocol; raises :class:`_WaitForOwner` to be retried.

        ``token`` identifies this claim attempt: if a create was applied but its
        answer lost (and so retried), the entity carries our token and is ours."""
        now = time.time()
        entity = self._entity(task_id, PENDING, now, token)
        try:
            await self._call(lambda: self.table.create_entity(entity))
            return Claim(task_id, "claimed", token=token)
        except ResourceExistsError:
            pass
        try:
            existing = await self._call(
                lambda: self.table.get_entity(self.queue_name, row_key(task_id))
            )
        except ResourceNotFoundError:
            raise _WaitForOwner() from None  # released in between: claim again
        if existing.get("state") == PENDING and existing.get("claim") == token:
            return Claim(task_id, "claimed", token=token)
        age = now - float(existing.get("accepted_at") or 0.0)
        state = existing.get("state")
        if state == SENT and age < self.window:
            return Claim(task_id, "duplicate")
        if state == PENDING and age < min(self.pending_grace, self.window):
            raise _WaitForOwner()  # another producer is sending it right now
        if state == PENDING:
            log.warning(
                "task %s: taking over a dedup claim left pending for %.0f s by %s "
                "(that producer probably died between claiming and sending); re-sending",
                task_id,
                age,
                existing.get("producer", "?"),
            )
        try:
            await self._call(
                lambda: self.table.update_entity(
                    entity,
                    mode=UpdateMode.REPLACE,
                    etag=existing.metadata["etag"],
                    match_condition=MatchConditions.IfNotModified,
                )
            )
        except (ResourceModifiedError, ResourceNotFoundError):
            raise _WaitForOwner() from None  # another producer got there first
        return Claim(task_id, "claimed", token=token)

    # ------------------------------------------------------------------ settle

    async def mark_sent(self, task_ids: Sequence[str], accepted_at: float) -> None:
        """Record that the messages are in the queue.  Upsert-merge, so it succeeds
        even if another producer took the claim over meanwhile (the task is sent
        either way).  A failure here only leaves ``pending`` entries behind, which
        a later push re-sends after ``pending_grace`` (logged, not raised)."""
        for start in range(0, len(task_ids), TRANSACTION_SIZE):
            chunk = task_ids[start : start + TRANSACTION_SIZE]
            entities = [self._entity(t, SENT, accepted_at) for t in chunk]
            try:
                if self._batch is not None:
                    statuses = await self._batch(
                        LEDGER_TABLE, [("upsert_merge", e) for e in entities]
                    )
                    if not statuses or any(not 200 <= code < 300 for code in statuses):
                        raise LedgerError(f"HTTP {statuses[:3]}")
                else:
                    operations = [("upsert", e, {"mode": UpdateMode.MERGE}) for e in entities]
                    await self._call(partial(self.table.submit_transaction, operations))
            except Exception as exc:  # noqa: BLE001
                log.warning(
                    "could not mark %d sent tasks in the dedup ledger (%s); a repeated push "
                    "of them after %.0f s will send them again",
                    len(chunk),
                    type(exc).__name__,
                    self.pending_grace,
                )

    async def release(self, claim: Claim) -> None:
        """Undo a claim whose message could not be sent, so a retry is not dropped.
        Only if the entity still carries this claim's token (not taken over since)."""
        key = row_key(claim.task_id)
        try:
            entity = await self._call(lambda: self.table.get_entity(self.queue_name, key))
            if entity.get("claim") != claim.token or entity.get("state") != PENDING:
                return
            await self._call(
                lambda: self.table.delete_entity(
                    self.queue_name,
                    key,
                    etag=entity.metadata["etag"],
                    match_condition=MatchConditions.IfNotModified,
                )
            )
        except (ResourceModifiedError, ResourceNotFoundError):
            pass  # taken over or gone: not ours to delete any more
        except Exception as exc:  # noqa: BLE001
            log.warning(
                "task %s: could not release its dedup claim (%s); a retry within "
                "%.0f s will wait for it",
                claim.task_id,
                type(exc).__name__,
                self.pending_grace,
            )


class LedgerError(Exception):
    """The ledger refused a request in an unexpected way (status codes only)."""


def _code(exc: BaseException) -> str:
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or "")


class _WaitForOwner(Exception):
    """Internal: the entity is owned by a producer still at work; ask again shortly."""


async def ensure_ledger_table(service: Any) -> None:
    """Create the ledger table once per account (idempotent)."""
    try:
        await service.create_table(LEDGER_TABLE)
    except ResourceExistsError:
        pass


def first_occurrences(
    items: list[tuple[int, str, str]],
) -> tuple[list[tuple[int, str, str]], list[tuple[int, str, str]]]:
    seen: set[str] = set()
    first: list[tuple[int, str, str]] = []
    later: list[tuple[int, str, str]] = []
    for item in items:
        (later if item[1] in seen else first).append(item)
        seen.add(item[1])
    return first, later
