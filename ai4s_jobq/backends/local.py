"""The embedded backend: one SQLite file per queue, served by the broker core.

It needs no server and no Azure, and has the same semantics as a Service Bus
queue (duplicate detection window, peek-lock, delivery count, dead-letter
queue), so what works here works there.  Several worker processes may share
the file.  Core calls are short SQLite transactions, made inline: a thread hop
would cost more than the call.

A receive is a write transaction whose cost hardly depends on how many messages
it locks, and so is a batch of completions.  So a fast worker reads ahead
(:mod:`.read_ahead`, about ``READ_AHEAD_HORIZON`` of its recent throughput, at
most ``READ_AHEAD_LIMIT``: a no-op task drain locks 64 at a time, a worker of
one-second tasks none ahead), and completions wait up to
``_COMPLETE_LINGER`` to share a transaction with each other or with the next
receive.  Measured with ``bench/bench_peers.py`` (with the worker's own hot-path
changes of the same commit): one slot draining no-op tasks went from 1,780 to 4,740
tasks/s (async; sync 1,140 to 2,140), see docs/performance.md.  Messages still read
ahead when the backend closes are released without counting a delivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from .. import broker_core
from .base import (
    Backend,
    DedupInfo,
    LockLostError,
    MessageTooLargeError,
    OutgoingMessage,
    PushOutcome,
    QueueCounts,
    QueueSettings,
    ReceivedMessage,
)
from .durability import DURABILITY_ENV, SYNCHRONOUS, local_durability
from .local_file import (
    LocalQueueNotFoundError,
    ReadOnlyCore,
    check_queue_file,
    create_atomically,
    may_write,
    missing_queue_error,
    translate_sqlite_errors,
)
from .read_ahead import ReadAhead

log = logging.getLogger("ai4s_jobq.local")

_POLL_MIN = 0.005
_POLL_MAX = 0.1
#: How long a completion waits for others (or the next receive) to share its
#: transaction (see ``complete``); short, because a caller awaits it.
_COMPLETE_LINGER = 0.002
#: Pending completions that are committed at once, without waiting for the linger.
_COMPLETE_BATCH = 64
#: Seconds of this worker's recent throughput worth locking ahead, and the most at once.
READ_AHEAD_HORIZON = 0.05
READ_AHEAD_LIMIT = 64


class LocalBackend(Backend):
    kind = "local"
    #: Larger than the default: each batch is one transaction, and the commit
    #: rewrites every page of the dedup and ledger indexes the batch touched (random
    #: MD5 keys touch most of them), so fewer, larger commits cost less per task.
    #: Measured (session 8, push_many of 100,000 small tasks with the ledger, three
    #: alternating rounds): 24,700-27,500/s at 2,000 per batch, 30,000-34,800/s at
    #: 5,000, 29,600-37,900/s at 10,000.  Memory decided against 10,000: ``jobq push``
    #: of 1,000,000 lines peaked at 57.7 MB RSS at 2,000, 92.1 MB at 5,000 and
    #: 134.6 MB at 10,000 (larger transactions hold more SQLite pages and tasks).  A
    #: batch holds the file's write lock for about 100 ms; a writer probing the file
    #: every 10 ms during a push waited at most 104-180 ms at 2,000 and 180 ms at
    #: 10,000 (SQLite's busy handler sleeps in steps of up to 100 ms either way).
    push_batch_size = 5_000

    def __init__(
        self, path: str | Path, queue_name: str = "default", *, durability: str | None = None
    ):
        """``durability``: ``normal`` or ``full``; None reads ``JOBQ_LOCAL_DURABILITY``
        (a bad value raises ``ConfigError`` here, before anything is opened)."""
        super().__init__(queue_name)
        self.path = Path(path)
        self.durability = local_durability(
            None if durability is None else {DURABILITY_ENV: durability}
        )
        self._core: broker_core.BrokerCore | None = None
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._completions: list[tuple[str, asyncio.Future[None]]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._read_ahead = ReadAhead(READ_AHEAD_LIMIT, horizon=READ_AHEAD_HORIZON)
        self._lock_duration = 60.0  # the queue's, as seen at the last receive
        self._writer: ThreadPoolExecutor | None = None  # see push_writer

    @property
    def description(self) -> str:
        return f"local://{self.queue_name} ({self.path})"

    @property
    def core(self) -> broker_core.BrokerCore:
        if self._core is None:
            if self._loop is None:
                raise RuntimeError("backend is not open")
            raise missing_queue_error(self.queue_name, self.path)
        return self._core

    async def open(self) -> None:
        """Open the queue's file if it exists (read-only if we may not write it); a
        missing file is created only by ``ensure_queue`` (see :mod:`.local_file`)."""
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        if self.path.exists():
            self._open_core()

    def _open_core(self) -> None:
        check_queue_file(self.path)
        with translate_sqlite_errors(self.path):
            core = (
                broker_core.BrokerCore(self.path, synchronous=SYNCHRONOUS[self.durability])
                if may_write(self.path)
                else ReadOnlyCore(self.path)
            )
        core.add_listener(self._on_available)
        self._core = core

    async def close(self) -> None:
        if self._completions:
            self._flush_completions()
        if self._core is not None and len(self._read_ahead):
            self._release_unstarted(self._read_ahead.drain())
        if self._writer is not None:
            writer, self._writer = self._writer, None
            if self._core is not None:  # the writer thread's own connection
                await asyncio.get_running_loop().run_in_executor(writer, self._core.close)
            writer.shutdown()
        if self._core is not None:
            self._core.remove_listener(self._on_available)
            self._core.close()
            self._core = None

    def push_writer(self) -> ThreadPoolExecutor:
        """One thread per backend, kept until ``close``: batches are written in order,
        and its SQLite connection (the broker core has one per thread) keeps its page
        cache from one ``push_many`` to the next."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="jobq-push")
        return self._writer

    def _on_available(self, queue: str) -> None:
        if self._loop is not None and self._wakeup is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wakeup.set)

    def _props(self) -> broker_core.QueueProperties:
        try:
            with translate_sqlite_errors(self.path):
                return self.core.get_queue(self.queue_name)
        except broker_core.QueueNotFound:
            raise missing_queue_error(self.queue_name, self.path) from None

    async def ensure_queue(self, settings: QueueSettings) -> None:
        if self._core is None:
            with translate_sqlite_errors(self.path):
                create_atomically(self.path)
            self._open_core()
        if self.core.read_only:
            self._props()  # exists: nothing to create (and nothing may be written)
            return
        with translate_sqlite_errors(self.path):
            self._create_queue(settings)

    def _create_queue(self, settings: QueueSettings) -> None:
        self.core.create_queue(
            broker_core.QueueProperties(
                name=self.queue_name,
                lock_duration=settings.lock_duration.total_seconds(),
                requires_duplicate_detection=settings.duplicate_detection,
                duplicate_detection_window=settings.dedup_window.total_seconds(),
                max_delivery_count=settings.max_delivery_count,
            ),
            exist_ok=True,
        )

    async def push(self, messages: Sequence[OutgoingMessage]) -> list[PushOutcome]:
        """Messages go to the core as ID and body only (``properties``, headers for
        brokers that have them, are not kept here); one over the size limit gets a
        :class:`MessageTooLargeError` outcome and the others are sent."""
        limit = self._props().max_message_size
        sendable = [m for m in messages if len(m.body) <= limit]  # usually all of them
        ids = [m.message_id for m in sendable]
        accepted = self._send_plain(ids, [m.body for m in sendable]) if sendable else []
        if len(sendable) == len(messages):  # the usual case: one outcome per ID
            return [PushOutcome(i, not new) for i, new in zip(ids, accepted)]
        fresh = iter(accepted)
        return [
            PushOutcome(m.message_id, not next(fresh))
            if len(m.body) <= limit
            else PushOutcome(m.message_id, None, _too_large(m, limit))
            for m in messages
        ]

    def _send_plain(self, ids: list[str], bodies: list[bytes]) -> list[bool]:
        with translate_sqlite_errors(self.path):
            return self.core.send_plain(self.queue_name, ids, bodies)

    async def receive(
        self, max_count: int, max_wait: float, *, dead_letter: bool = False
    ) -> list[ReceivedMessage]:
        """Hand out read-ahead messages first; otherwise lock a batch (committing the
        pending completions in the same transaction) and keep the surplus."""
        max_count = max(1, max_count)
        if not dead_letter and len(self._read_ahead):
            ready = await self._read_ahead.take_fresh(max_count, self._lock_duration, self.renew)
            if ready:
                return ready
        sub_queue = broker_core.DEAD_LETTER if dead_letter else broker_core.ACTIVE
        count = max_count if dead_letter else self._read_ahead.fetch_count(max_count)
        deadline = time.monotonic() + max_wait
        delay = _POLL_MIN
        assert self._wakeup is not None
        while True:
            self._wakeup.clear()
            with translate_sqlite_errors(self.path):
                try:  # (no look-up of the queue first: a worker receives once per task or two)
                    stored = self._receive_stored(count, sub_queue)
                except broker_core.QueueNotFound:
                    self._props()  # raises the backend's error, with what to do
                    raise
            if stored:
                received = [_to_received(m) for m in stored]
                if received[0].locked_until is not None:
                    self._lock_duration = received[0].locked_until - time.time()
                self._read_ahead.keep(received[max_count:])
                return received[:max_count]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            # Woken at once by a send in this process; other processes are polled.
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=min(delay, remaining))
            except asyncio.TimeoutError:
                delay = min(delay * 2, _POLL_MAX)

    def _release_unstarted(self, messages: list[ReceivedMessage]) -> None:
        """Give read-ahead messages back without counting a delivery (best effort: one
        that cannot be released comes back when its lock expires)."""
        for message in messages:
            try:
                with translate_sqlite_errors(self.path):
                    self.core.release(message.handle)
            except Exception as exc:  # noqa: BLE001 - see docstring
                log.info("could not release read-ahead message %s (%s)", message.message_id, exc)

    def _receive_stored(self, max_count: int, sub_queue: str) -> list[broker_core.StoredMessage]:
        """Receive, committing the pending completions in the same transaction."""
        batch = self._take_completions() if self._completions else []
        if not batch:
            return self.core.receive(self.queue_name, max_count, sub_queue=sub_queue)
        try:
            outcomes, stored = self.core.complete_and_receive(
                [token for token, _ in batch], self.queue_name, max_count, sub_queue=sub_queue
            )
        except Exception as exc:  # neither took effect: the completions' callers see why
            _resolve_completions(batch, [exc] * len(batch))
            raise
        _resolve_completions(batch, outcomes)
        return stored

    def _settle(self, action, message: ReceivedMessage, *args: object) -> None:
        self._read_ahead.finished()
        try:
            with translate_sqlite_errors(self.path):
                action(message.handle, *args)
        except broker_core.LockLost as exc:
            raise LockLostError(str(exc)) from None

    async def renew(self, message: ReceivedMessage) -> None:
        try:
            with translate_sqlite_errors(self.path):
                message.locked_until = self.core.renew_lock(message.handle)
        except broker_core.LockLost as exc:
            raise LockLostError(str(exc)) from None

    async def complete(self, message: ReceivedMessage) -> None:
        """Completions share a transaction: each waits up to ``_COMPLETE_LINGER`` for
        others (a batch of ``_COMPLETE_BATCH`` commits at once) or for the next
        receive, which commits them with its own.  Each caller still returns only
        once its message is completed, or gets its own ``LockLostError``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._read_ahead.finished()
        self._completions.append((message.handle, future))
        if len(self._completions) >= _COMPLETE_BATCH:
            self._flush_completions()
        elif self._flush_handle is None:
            self._flush_handle = loop.call_later(_COMPLETE_LINGER, self._flush_completions)
        await future

    def _take_completions(self) -> list[tuple[str, asyncio.Future[None]]]:
        """The pending completions, minus those whose caller was cancelled (as when
        ``complete`` ran inline, it never got its completion: its message stays locked)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batch = [(token, f) for token, f in self._completions if not f.cancelled()]
        self._completions = []
        return batch

    def _flush_completions(self) -> None:
        batch = self._take_completions()
        if not batch:
            return
        try:
            with translate_sqlite_errors(self.path):
                outcomes: Sequence[Exception | None] = self.core.complete_many(
                    [token for token, _ in batch]
                )
        except Exception as exc:  # the transaction failed: every caller sees why
            outcomes = [exc] * len(batch)
        _resolve_completions(batch, outcomes)

    async def abandon(self, message: ReceivedMessage) -> None:
        self._settle(self.core.abandon, message)

    async def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        self._settle(self.core.dead_letter, message, reason, description)

    async def send_scheduled(self, message: OutgoingMessage, delay: float) -> None:
        when = time.time() + delay if delay > 0 else None
        new = broker_core.NewMessage(message.message_id, message.body, scheduled_enqueue_time=when)
        self.core.send(self.queue_name, [new])

    async def peek(self, max_count: int, *, dead_letter: bool = False) -> list[ReceivedMessage]:
        self._props()
        sub_queue = broker_core.DEAD_LETTER if dead_letter else broker_core.ACTIVE
        with translate_sqlite_errors(self.path):
            stored = self.core.peek(self.queue_name, max_count, sub_queue=sub_queue)
        return [_to_received(m, with_handle=False) for m in stored]

    async def counts(self) -> QueueCounts:
        self._props()
        with translate_sqlite_errors(self.path):
            counts = self.core.counts(self.queue_name)
        return QueueCounts(counts.active, counts.dead_letter, counts.scheduled)

    async def clear(self, *, dead_letter: bool = False) -> int:
        self._props()
        sub_queue = broker_core.DEAD_LETTER if dead_letter else broker_core.ACTIVE
        with translate_sqlite_errors(self.path):
            return self.core.purge(self.queue_name, sub_queue=sub_queue)

    async def dedup_info(self) -> DedupInfo:
        try:
            props = self._props()
        except LocalQueueNotFoundError as exc:
            return DedupInfo(self.kind, False, None, None, "none", str(exc))
        return DedupInfo(
            backend=self.kind,
            queue_exists=True,
            duplicate_detection=props.requires_duplicate_detection,
            window=timedelta(seconds=props.duplicate_detection_window),
            mechanism="broker" if props.requires_duplicate_detection else "none",
        )


def _too_large(message: OutgoingMessage, limit: int) -> MessageTooLargeError:
    return MessageTooLargeError(message.message_id, len(message.body), limit)


def _resolve_completions(
    batch: list[tuple[str, asyncio.Future[None]]], outcomes: Sequence[Exception | None]
) -> None:
    for (_, future), error in zip(batch, outcomes):
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        elif isinstance(error, broker_core.LockLost):
            future.set_exception(LockLostError(str(error)))
        else:
            future.set_exception(error)


def _to_received(
    message: broker_core.StoredMessage, *, with_handle: bool = True
) -> ReceivedMessage:
    return ReceivedMessage(
        message_id=message.message_id,
        body=message.body,
        delivery_count=message.delivery_count,
        enqueued_time=message.enqueued_time,
        locked_until=message.locked_until,
        handle=message.lock_token if with_handle else None,
        dead_letter_reason=message.dead_letter_reason,
        dead_letter_description=message.dead_letter_description,
        sequence_number=message.sequence_number,
    )
