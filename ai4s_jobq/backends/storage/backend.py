"""Azure Storage Queue backend (``ACCOUNT/QUEUE``), on the official aio SDK.

Storage Queue is the cheap backend: at-least-once delivery with a visibility
timeout as the lock, no sessions, no duplicate detection, no dead-letter queue.
This module maps the :class:`~ai4s_jobq.backends.base.Backend` contract onto it:

* lock = visibility timeout; the settlement handle is (Azure message id, pop
  receipt); ``renew`` extends the visibility and gets a new pop receipt; a lost
  pop receipt (another worker received the message) raises ``LockLostError``.
* delivery count = the message's ``dequeue_count``, less the receptions that
  never ran (read-ahead released unstarted at close; counted in the header as
  ``unstarted``, so a worker shutting down does not cost a task an attempt).
* receive reads ahead (:mod:`.prefetch`): up to 32 per call, sized by
  the worker's recent throughput, refilled in the background for fast workers.
* dead-letter queue = a sibling queue ``QUEUE-failed``; each record carries the
  reason, description and delivery count in its header.
* duplicate detection = the Table ledger in :mod:`.dedup`, on when the
  queue's metadata ``jobq_dedup_window_seconds`` is > 0 (set when jobq creates it).

The message frame, dead-letter records, queue metadata and error texts are in
:mod:`.wire`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)

from ...queue_names import STORAGE_DLQ_SUFFIX, QueueNameError, validate_queue_name
from ..base import (
    Backend,
    BackendError,
    DedupInfo,
    LockLostError,
    MessageTooLargeError,
    OutgoingMessage,
    PushOutcome,
    QueueCounts,
    QueueSettings,
    QueueUnavailableError,
    ReceivedMessage,
)
from ..read_ahead import ReadAhead
from .clients import account_clients
from .dedup import LEDGER_TABLE, DedupLedger, ensure_ledger_table, first_occurrences
from .prefetch import PollBackoff
from .rest import RestError, StorageRest
from .wire import (
    MESSAGE_TEXT_LIMIT,
    Lease,
    QueueConfig,
    account_of,
    as_backend_error,
    dead_letter_text,
    encode_text,
    is_account_error,
    is_lock_lost,
    lost_lock,
    means_lock_lost,
    rest_error,
    text_size,
    to_received,
    translate_errors,
    unstarted_text,
)

log = logging.getLogger("ai4s_jobq.storage")

DLQ_SUFFIX = STORAGE_DLQ_SUFFIX
SEND_CONCURRENCY = 32  # sends in flight per backend
RECEIVE_BATCH = 32  # Storage Queue's maximum per receive call
MAX_VISIBILITY_SECONDS = 7 * 24 * 3600 - 1  # Azure's limit for a visibility timeout


# ---------------------------------------------------------------------- backend


class StorageQueueBackend(Backend):
    kind = "storage"
    max_message_size = MESSAGE_TEXT_LIMIT
    push_batch_size = 500
    push_concurrency = 3

    def __init__(
        self,
        queue_name: str,
        *,
        connection_string: str | None = None,
        account: str | None = None,
        dedup_window: timedelta | None = None,
    ):
        try:
            validate_queue_name("storage", queue_name)
        except QueueNameError as exc:
            raise QueueUnavailableError(f"not a valid Storage Queue name: {exc}") from None
        if not connection_string and not account:
            raise QueueUnavailableError(
                "a Storage Queue needs ACCOUNT/QUEUE or a connection string "
                "(JOBQ_CONNECTION_STRING / --conn-str)"
            )
        super().__init__(queue_name)
        self.connection_string = connection_string
        self.account = account_of(connection_string, account)
        self._account_arg = account
        self.requested_dedup_window = dedup_window
        self.dlq_name = queue_name + DLQ_SUFFIX
        self._credential: Any = None
        self._service: Any = None
        self._tables: Any = None
        self._queue: Any = None
        self._dlq: Any = None
        self._config: QueueConfig | None = None
        self._ledger: DedupLedger | None = None
        self._rest: StorageRest | None = None  # the fast path for sends and ledger batches
        self._send_limit = asyncio.Semaphore(SEND_CONCURRENCY)
        self._read_ahead = ReadAhead(RECEIVE_BATCH)
        self._polls = {False: PollBackoff(), True: PollBackoff()}  # by dead_letter

    @classmethod
    def from_spec(
        cls,
        account: str | None,
        queue: str,
        connection_string: str | None,
        *,
        dedup_window: timedelta | None,
    ) -> StorageQueueBackend:
        """``ACCOUNT/QUEUE`` (Azure AD via DefaultAzureCredential) or a connection
        string, which wins when given (its account is used, not ``account``)."""
        return cls(
            queue, connection_string=connection_string, account=account, dedup_window=dedup_window
        )

    @property
    def description(self) -> str:
        return f"storage:{self.account}/{self.queue_name}"

    # -------------------------------------------------------------- connection

    async def open(self) -> None:
        clients = account_clients(self.connection_string, self._account_arg)
        self._service, self._tables = clients.service, clients.tables
        self._credential = clients.credential
        endpoints, tls = clients.endpoints, clients.tls
        self._queue = self._service.get_queue_client(self.queue_name)
        self._dlq = self._service.get_queue_client(self.dlq_name)
        if endpoints is not None:
            self._rest = await StorageRest(endpoints, self._credential, tls=tls).__aenter__()

    async def close(self) -> None:
        await self._read_ahead.refilled()  # its messages are released with the rest
        if self._queue is not None and len(self._read_ahead):
            await self._release_unstarted(self._read_ahead.drain())
        if self._rest is not None:
            await self._rest.__aexit__(None, None, None)
            self._rest = None
        for client in (self._queue, self._dlq, self._service, self._tables, self._credential):
            if client is not None:
                try:
                    await client.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
        self._queue = self._dlq = self._service = self._tables = self._credential = None

    def _translate(self, what: str) -> Any:
        return translate_errors(what, self.account)

    # -------------------------------------------------------------- queue settings

    async def ensure_queue(self, settings: QueueSettings) -> None:
        """Create the queue (and ``-failed``, and the ledger table) with jobq's settings
        in its metadata.  An existing queue keeps its settings, with one exception: a
        queue created by another tool (no jobq metadata) gets the ledger turned on when
        a dedup window was given explicitly (``--dedup-window``)."""
        metadata = QueueConfig.metadata_for(settings)
        with self._translate(f"creating queue {self.queue_name}"):
            try:
                await self._queue.create_queue(metadata=metadata)
            except ResourceExistsError:
                await self._adopt_foreign_queue(metadata)
            try:
                await self._dlq.create_queue()
            except ResourceExistsError:
                pass
        self._config = None
        config = await self._read_config()
        if config.dedup_window:
            with self._translate(f"creating dedup ledger table {LEDGER_TABLE}"):
                await ensure_ledger_table(self._tables)

    async def _adopt_foreign_queue(self, metadata: dict[str, str]) -> None:
        props = await self._queue.get_queue_properties()
        existing = dict(props.metadata or {})
        if QueueConfig.has_jobq_metadata(existing) or self.requested_dedup_window is None:
            return
        log.info(
            "queue %s has no jobq settings; turning on the dedup ledger (window %s)",
            self.queue_name,
            QueueConfig.from_metadata(metadata).dedup_window,
        )
        await self._queue.set_queue_metadata(metadata={**metadata, **existing})

    async def _read_config(self) -> QueueConfig:
        if self._config is not None:
            return self._config
        with self._translate(f"reading queue {self.queue_name}"):
            try:
                props = await self._queue.get_queue_properties()
            except ResourceNotFoundError:
                return QueueConfig.missing()
        self._config = QueueConfig.from_metadata(props.metadata or {})
        return self._config

    async def _dedup_ledger(self) -> DedupLedger | None:
        config = await self._read_config()
        if config.dedup_window is None:
            return None
        if self._ledger is None:
            self._ledger = DedupLedger(
                self._tables.get_table_client(LEDGER_TABLE),
                self.queue_name,
                config.dedup_window,
                batch=self._rest.table_batch if self._rest is not None else None,
            )
        return self._ledger

    async def dedup_info(self) -> DedupInfo:
        config = await self._read_config()
        if not config.exists:
            return DedupInfo(self.kind, False, None, None, "none")
        if config.dedup_window is None:
            note = (
                "created by another tool (no jobq metadata)"
                if not config.jobq_metadata
                else "created with dedup off"
            )
            return DedupInfo(self.kind, True, False, None, "none", note=note)
        return DedupInfo(
            self.kind,
            True,
            True,
            config.dedup_window,
            "application ledger",
            note=f"Azure Table {LEDGER_TABLE!r} in account {self.account!r}",
        )

    def extra_info(self) -> dict[str, Any]:
        config = self._config
        return {
            "dead_letter_queue": self.dlq_name,
            "visibility_timeout_s": config.visibility_timeout if config else None,
            "dedup_ledger_table": LEDGER_TABLE,
        }

    # -------------------------------------------------------------- push

    async def push(self, messages: Sequence[OutgoingMessage]) -> list[PushOutcome]:
        outcomes: list[PushOutcome | None] = [None] * len(messages)
        ready: list[tuple[int, str, str]] = []  # (index, task id, message text)
        for index, message in enumerate(messages):
            text = encode_text({"id": message.message_id}, message.body)
            size = text_size(text)
            if size > MESSAGE_TEXT_LIMIT:
                error = MessageTooLargeError(message.message_id, size, MESSAGE_TEXT_LIMIT)
                outcomes[index] = PushOutcome(message.message_id, None, error)
            else:
                ready.append((index, message.message_id, text))
        ledger = await self._dedup_ledger()
        if ledger is None:
            await asyncio.gather(*(self._send(i, t, x, outcomes, None) for i, t, x in ready))
        else:
            # The same ID twice in one call: later copies go in a later round, where
            # they meet the first copy's ledger entry like any other duplicate.
            while ready:
                first, ready = first_occurrences(ready)
                await asyncio.gather(
                    *(
                        self._push_deduplicated(ledger, first[s : s + 100], outcomes)
                        for s in range(0, len(first), 100)
                    )
                )
        return [o for o in outcomes if o is not None]

    async def _push_deduplicated(
        self,
        ledger: DedupLedger,
        items: list[tuple[int, str, str]],
        outcomes: list[PushOutcome | None],
    ) -> None:
        started = time.time()
        with self._translate(f"dedup ledger for {self.queue_name}"):
            claims = await ledger.claim([task_id for _, task_id, _ in items])
        sends = []
        for (index, task_id, text), claim in zip(items, claims):
            if claim.status == "duplicate":
                outcomes[index] = PushOutcome(task_id, True)
            elif claim.status == "error":
                outcomes[index] = PushOutcome(
                    task_id,
                    None,
                    as_backend_error(claim.error, f"dedup ledger for task {task_id}", self.account),
                )
            else:
                sends.append(self._send(index, task_id, text, outcomes, False, claim))
        await asyncio.gather(*sends)
        sent = [
            task_id
            for index, task_id, _ in items
            if (o := outcomes[index]) is not None and o.ok and o.duplicate is False
        ]
        await ledger.mark_sent(sent, started)

    async def _send(
        self,
        index: int,
        task_id: str,
        text: str,
        outcomes: list[PushOutcome | None],
        duplicate: bool | None,
        claim: Any = None,
    ) -> None:
        try:
            async with self._send_limit:
                await self._send_text(task_id, text)
            outcomes[index] = PushOutcome(task_id, duplicate)
        except BackendError as exc:
            outcomes[index] = PushOutcome(task_id, None, exc)
            if claim is not None and self._ledger is not None:
                await self._ledger.release(claim)
            if not isinstance(exc, MessageTooLargeError) and is_account_error(exc):
                raise

    async def _send_text(self, task_id: str, text: str) -> None:
        what = f"sending task {task_id} to {self.queue_name}"
        if self._rest is not None:
            try:
                await self._rest.send_message(self.queue_name, text)
            except RestError as exc:
                if exc.status == 413 or exc.code in ("RequestBodyTooLarge", "MessageTooLarge"):
                    raise MessageTooLargeError(
                        task_id, text_size(text), MESSAGE_TEXT_LIMIT
                    ) from None
                raise rest_error(exc, what, self.account) from None
            return
        with self._translate(what):
            try:
                await self._queue.send_message(text, time_to_live=-1)
            except HttpResponseError as exc:
                if exc.status_code == 413:
                    raise MessageTooLargeError(
                        task_id, text_size(text), MESSAGE_TEXT_LIMIT
                    ) from None
                raise

    # -------------------------------------------------------------- receive & settle

    async def receive(
        self, max_count: int, max_wait: float, *, dead_letter: bool = False
    ) -> list[ReceivedMessage]:
        """Read-ahead first (waiting for a background refill in flight), then poll
        (Storage Queue has no long polling), pausing between empty polls as
        ``PollBackoff`` says, for up to ``max_wait``.  Returns at most ``max_count``;
        a surplus fetched ahead (see :mod:`.prefetch`) waits for the next
        call, and a fast worker's buffer is refilled in the background."""
        max_count = max(1, max_count)
        ahead = self._read_ahead
        ready = [] if dead_letter else await self._fresh(max_count)
        backoff = self._polls[dead_letter]
        deadline = time.monotonic() + max(0.0, max_wait)
        while len(ready) < max_count:
            if not dead_letter and await ahead.refilled():
                ready.extend(await self._fresh(max_count - len(ready)))
                continue
            pause = backoff.wait()
            if pause > 0:
                if ready:
                    break
                left = max(0.0, deadline - time.monotonic())
                await asyncio.sleep(min(pause, left))
                if pause > left:
                    break
            wanted = max_count - len(ready)
            count = min(wanted, RECEIVE_BATCH) if dead_letter else ahead.fetch_count(wanted)
            messages = await self._poll(count, dead_letter)
            ready.extend(messages[:wanted])
            ahead.keep(messages[wanted:])
            if ready or time.monotonic() >= deadline:
                break
        if not dead_letter and backoff.wait() == 0 and (count := ahead.refill_count()):
            ahead.start_refill(self._poll(count, False))
        return ready

    async def _poll(self, count: int, dead_letter: bool) -> list[ReceivedMessage]:
        messages = await self._receive_once(count, dead_letter)
        self._polls[dead_letter].polled(found=bool(messages))
        return messages

    async def _fresh(self, count: int) -> list[ReceivedMessage]:
        """Up to ``count`` read-ahead messages, renewed if they waited half their lock."""
        if not len(self._read_ahead):
            return []
        config = await self._read_config()
        return await self._read_ahead.take_fresh(count, config.visibility_timeout, self.renew)

    async def _release_unstarted(self, messages: list[ReceivedMessage]) -> None:
        """Make read-ahead messages visible again, recording in their header that
        this reception never ran them (see ``_to_received``).  Best effort: one that
        cannot be released reappears when its visibility timeout ends."""

        async def release(message: ReceivedMessage) -> None:
            lease = self._lease(message)
            content = unstarted_text(lease.header, message.body)
            try:
                async with lease.lock:
                    await self._queue.update_message(
                        lease.azure_id,
                        pop_receipt=lease.pop_receipt,
                        content=content,
                        visibility_timeout=0,
                    )
            except Exception as exc:  # noqa: BLE001 - best effort, see docstring
                log.info(
                    "could not release read-ahead message %s (%s); it reappears when "
                    "its visibility timeout ends",
                    message.message_id,
                    type(exc).__name__,
                )

        await asyncio.gather(*(release(message) for message in messages))

    async def _receive_once(self, count: int, dead_letter: bool) -> list[ReceivedMessage]:
        config = await self._read_config()
        client = self._dlq if dead_letter else self._queue
        name = self.dlq_name if dead_letter else self.queue_name
        received: list[ReceivedMessage] = []
        with self._translate(f"receiving from {name}"):
            pages = client.receive_messages(
                messages_per_page=count,
                max_messages=count,
                visibility_timeout=config.visibility_timeout,
            )
            async for item in pages:
                received.append(to_received(item, dead_letter, with_handle=True))
        if dead_letter:
            return received
        kept = []
        for message in received:
            if message.delivery_count > config.max_delivery_count:
                await self.dead_letter(
                    message, "MaxDeliveryCountExceeded", f"delivered {message.delivery_count} times"
                )
            else:
                kept.append(message)
        return kept

    def _lease(self, message: ReceivedMessage) -> Lease:
        if not isinstance(message.handle, Lease):
            raise BackendError(
                f"message {message.message_id} was not received from "
                f"{self.description} (peeked messages cannot be settled)"
            )
        return message.handle

    @contextmanager
    def _lock_errors(self, message: ReceivedMessage, what: str) -> Iterator[None]:
        """Errors of a call made with the message's pop receipt: the message gone or
        the receipt stale (someone else received it) is a lost lock; the rest are
        translated as usual."""
        try:
            with self._translate(what):
                try:
                    yield
                except HttpResponseError as exc:
                    if is_lock_lost(exc):
                        raise LockLostError(lost_lock(message)) from None
                    raise
        except QueueUnavailableError:
            raise LockLostError(lost_lock(message)) from None

    async def _update_visibility(self, message: ReceivedMessage, seconds: int) -> None:
        lease = self._lease(message)
        client = self._dlq if lease.dead_letter_queue else self._queue
        async with lease.lock:
            with self._lock_errors(message, f"updating message {message.message_id}"):
                updated = await client.update_message(
                    lease.azure_id, pop_receipt=lease.pop_receipt, visibility_timeout=seconds
                )
            lease.pop_receipt = updated.pop_receipt
            if updated.next_visible_on:
                message.locked_until = updated.next_visible_on.timestamp()

    async def renew(self, message: ReceivedMessage) -> None:
        config = await self._read_config()
        await self._update_visibility(message, config.visibility_timeout)

    async def abandon(self, message: ReceivedMessage) -> None:
        self._read_ahead.finished()
        await self._update_visibility(message, 0)

    reschedules_in_place = True

    async def reschedule(
        self, message: ReceivedMessage, replacement_id: str, body: bytes, delay: float
    ) -> None:
        """Replace the message's text and hide it for ``delay`` seconds in one
        ``update_message`` call: atomic, so a crash cannot lose or double it."""
        lease = self._lease(message)
        header = {**(lease.header or {}), "id": message.message_id}
        text = encode_text(header, body)
        self._read_ahead.finished()
        async with lease.lock:
            with self._lock_errors(message, f"rescheduling message {message.message_id}"):
                updated = await self._queue.update_message(
                    lease.azure_id,
                    pop_receipt=lease.pop_receipt,
                    content=text,
                    visibility_timeout=min(MAX_VISIBILITY_SECONDS, max(0, math.ceil(delay))),
                )
            lease.pop_receipt = updated.pop_receipt

    async def complete(self, message: ReceivedMessage) -> None:
        lease = self._lease(message)
        client = self._dlq if lease.dead_letter_queue else self._queue
        self._read_ahead.finished()
        async with lease.lock:
            if self._rest is not None:
                await self._delete_rest(message, lease)
                return
            with self._lock_errors(message, f"deleting message {message.message_id}"):
                await client.delete_message(lease.azure_id, lease.pop_receipt)

    async def _delete_rest(self, message: ReceivedMessage, lease: Lease) -> None:
        assert self._rest is not None
        queue = self.dlq_name if lease.dead_letter_queue else self.queue_name
        try:
            await self._rest.delete_message(queue, lease.azure_id, lease.pop_receipt)
        except RestError as exc:
            if means_lock_lost(exc.status, exc.code):
                raise LockLostError(lost_lock(message)) from None
            raise rest_error(exc, f"deleting message {message.message_id}", self.account) from None

    async def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        """Renew (proves we still hold the lock), copy to ``-failed``, then delete.
        A crash between copy and delete leaves the task in both queues, never in none."""
        await self.renew(message)
        text = dead_letter_text(message, reason, description)
        with self._translate(f"dead-lettering {message.message_id} to {self.dlq_name}"):
            await self._dlq.send_message(text, time_to_live=-1)
        await self.complete(message)

    # -------------------------------------------------------------- inspect

    async def peek(self, max_count: int, *, dead_letter: bool = False) -> list[ReceivedMessage]:
        """At most 32 (Storage Queue peeks only the front 32 messages)."""
        client = self._dlq if dead_letter else self._queue
        name = self.dlq_name if dead_letter else self.queue_name
        count = max(1, min(max_count, RECEIVE_BATCH))
        with self._translate(f"peeking {name}"):
            try:
                items = await client.peek_messages(max_messages=count)
            except ResourceNotFoundError:
                return []
        return [to_received(i, dead_letter, with_handle=False) for i in items]

    async def _approximate_count(self, client: Any, name: str) -> int:
        with self._translate(f"reading queue {name}"):
            try:
                props = await client.get_queue_properties()
            except ResourceNotFoundError:
                return 0
        return int(props.approximate_message_count or 0)

    async def counts(self) -> QueueCounts:
        """Approximate (Azure's count), and including messages currently locked."""
        active, dead = await asyncio.gather(
            self._approximate_count(self._queue, self.queue_name),
            self._approximate_count(self._dlq, self.dlq_name),
        )
        return QueueCounts(active=active, dead_letter=dead)

    async def clear(self, *, dead_letter: bool = False) -> int:
        """Returns Azure's approximate count from just before clearing."""
        client = self._dlq if dead_letter else self._queue
        name = self.dlq_name if dead_letter else self.queue_name
        count = await self._approximate_count(client, name)
        with self._translate(f"clearing {name}"):
            try:
                await client.clear_messages()
            except ResourceNotFoundError:
                return 0
        return count
