"""The small async interface every queue backend implements.

A backend moves opaque message bodies; it knows nothing about tasks.  The
``JobQ`` layer turns tasks into :class:`OutgoingMessage` objects and back, so
each backend module only has to speak its broker's protocol.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any


class BackendError(Exception):
    """A backend failed in a way the user should read (a clear message, no secrets)."""


class LockLostError(BackendError):
    """The message's lock (lease, pop receipt) is gone: another worker may have it."""


class MessageTooLargeError(BackendError):
    def __init__(self, message_id: str, size: int, limit: int):
        super().__init__(
            f"task {message_id} is {size} bytes when serialized; this queue accepts at most "
            f"{limit} bytes per message. Store large inputs elsewhere (e.g. a blob) and pass "
            "a reference in the task."
        )
        self.message_id = message_id
        self.size = size
        self.limit = limit


class QueueUnavailableError(BackendError):
    """The queue cannot be reached (not found, not configured, not available yet)."""


class ConnectionFailedError(QueueUnavailableError):
    """The broker cannot be reached, or refused our credentials: a configuration
    problem, the same for every task, so commands stop on it (exit 4) instead of
    reporting each task as rejected."""


class CredentialsRefusedError(ConnectionFailedError):
    """The broker refused the credentials (wrong key, expired SAS, missing role):
    retrying will not help, so a worker stops at once (exit code 4), where it keeps
    retrying an unreachable broker (a network blip)."""


class PermanentBackendError(BackendError):
    """Retrying cannot help (e.g. a damaged local queue file): a worker stops on it
    instead of retrying forever."""


@dataclass
class QueueSettings:
    """What a backend needs to create a queue on first use."""

    dedup_window: timedelta = timedelta(days=7)
    lock_duration: timedelta = timedelta(minutes=5)
    max_delivery_count: int = 2000
    duplicate_detection: bool = True


@dataclass
class OutgoingMessage:
    message_id: str
    body: bytes
    #: string headers for a broker that has them (Service Bus application properties);
    #: the others ignore them, so nothing may be only here (e.g. the trace context)
    properties: dict[str, str] | None = None


@dataclass
class PushOutcome:
    message_id: str
    duplicate: bool | None  # None: the backend cannot know
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def id(self) -> str:
        """The task ID, as the ledger reads an accepted push (``ledger.events.PushRecord``)."""
        return self.message_id


@dataclass
class ReceivedMessage:
    """A locked message.  ``handle`` is the backend's own settlement handle."""

    message_id: str
    body: bytes
    delivery_count: int  # 1 on the first delivery
    enqueued_time: float | None
    locked_until: float | None
    handle: Any = field(repr=False, default=None)
    dead_letter_reason: str | None = None
    dead_letter_description: str | None = None
    sequence_number: int | None = None


@dataclass
class QueueCounts:
    active: int
    dead_letter: int
    scheduled: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return {"active": self.active, "dead_letter": self.dead_letter, "scheduled": self.scheduled}


@dataclass
class DedupInfo:
    """How the queue deduplicates, for the startup checker and ``jobq check``."""

    backend: str
    queue_exists: bool
    duplicate_detection: bool | None  # None: could not be read (e.g. missing rights)
    window: timedelta | None
    mechanism: str  # "broker", "application ledger", "none"
    note: str | None = None


class Backend(abc.ABC):
    """One queue on one broker.  Methods are coroutines; ``open`` before use."""

    kind: str = "abstract"
    #: largest body a single message may have, in bytes
    max_message_size: int = 256 * 1024
    #: how many messages ``JobQ.push_many`` hands to one ``push`` call
    push_batch_size: int = 500
    #: ... or fewer, once their bodies add up to this many bytes: what bounds
    #: ``push_many``'s memory when tasks are large
    push_batch_bytes: int = 16 * 1024 * 1024
    #: how many ``push`` calls ``JobQ.push_many`` keeps in flight
    push_concurrency: int = 1

    def prepare_push(self) -> None:
        """A push is about to start: a backend whose link is slow to open may start
        opening it in the background now, so the wait overlaps building the first
        batch.  The default does nothing."""
        return None

    def push_writer(self) -> Executor | None:
        """A thread in which ``push`` may run to its end without the event loop, so
        that ``push_many`` writes one batch while it builds the next (see
        :mod:`ai4s_jobq.push_writer`); None (the default): pushes run on the loop.
        Only a backend whose ``push`` does blocking I/O and never suspends offers one."""
        return None

    def __init__(self, queue_name: str):
        self.queue_name = queue_name

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect.  Must not create the queue: ``ensure_queue`` does that."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass

    async def __aenter__(self) -> Backend:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def description(self) -> str:
        return f"{self.kind}:{self.queue_name}"

    @abc.abstractmethod
    async def ensure_queue(self, settings: QueueSettings) -> None:
        """Create the queue with ``settings`` if it does not exist (never alters one)."""

    @abc.abstractmethod
    async def push(self, messages: Sequence[OutgoingMessage]) -> list[PushOutcome]:
        """Send a batch; one outcome per message, in order.  An oversize message gets
        an outcome with a :class:`MessageTooLargeError`; the others are still sent."""

    @abc.abstractmethod
    async def receive(
        self, max_count: int, max_wait: float, *, dead_letter: bool = False
    ) -> list[ReceivedMessage]:
        """Lock up to ``max_count`` messages, waiting at most ``max_wait`` seconds for
        the first one.  An empty list means none arrived in time."""

    @abc.abstractmethod
    async def renew(self, message: ReceivedMessage) -> None:
        """Extend the lock; raise :class:`LockLostError` if it is gone."""

    @abc.abstractmethod
    async def complete(self, message: ReceivedMessage) -> None: ...

    @abc.abstractmethod
    async def abandon(self, message: ReceivedMessage) -> None:
        """Make the message receivable again at once."""

    @abc.abstractmethod
    async def dead_letter(
        self, message: ReceivedMessage, reason: str, description: str
    ) -> None: ...

    #: True where ``reschedule`` rewrites the same message, whose delivery count goes on
    #: (Storage Queue); False where it sends a new message (Service Bus, local).
    reschedules_in_place: bool = False

    async def reschedule(
        self, message: ReceivedMessage, replacement_id: str, body: bytes, delay: float
    ) -> None:
        """Put the locked ``message`` back as ``body``, receivable after ``delay``
        seconds (a retry back-off; 0 for an interruption).  By default: prove the lock
        is still held, send ``body`` as a new message with MessageId
        ``replacement_id`` (scheduled ``delay`` ahead), then complete the old one.
        ``replacement_id`` is deterministic (see :mod:`ai4s_jobq.worker.attempts`), so
        duplicate detection drops a second copy if a worker died between the two."""
        await self.renew(message)
        await self.send_scheduled(OutgoingMessage(replacement_id, body), delay)
        await self.complete(message)

    async def send_scheduled(self, message: OutgoingMessage, delay: float) -> None:
        """Send one message that becomes receivable ``delay`` seconds from now."""
        raise NotImplementedError(f"{type(self).__name__} cannot schedule messages")

    @abc.abstractmethod
    async def peek(self, max_count: int, *, dead_letter: bool = False) -> list[ReceivedMessage]:
        """Read messages without locking or removing them (no ``handle``)."""

    @abc.abstractmethod
    async def counts(self) -> QueueCounts: ...

    @abc.abstractmethod
    async def clear(self, *, dead_letter: bool = False) -> int:
        """Delete every message (of the dead-letter queue with ``dead_letter``)."""

    @abc.abstractmethod
    async def dedup_info(self) -> DedupInfo: ...

    #: seconds after which an unrenewed lock expires; the worker renews at a third
    def lock_renew_interval(self, message: ReceivedMessage) -> float:
        import time

        if message.locked_until is None:
            return 30.0
        return max(0.05, (message.locked_until - time.time()) / 3)

    def extra_info(self) -> dict[str, Any]:
        return {}


def ca_bundle_from_env(environ: Mapping[str, str], name: str) -> str | None:
    """The CA bundle file named by the environment variable ``name`` (for endpoint
    overrides of the Azure AD path), or None; a missing file is a configuration
    error, reported before any connection is tried."""
    path = environ.get(name, "").strip() or None
    if path is not None and not os.path.isfile(path):
        raise QueueUnavailableError(f"{name}={path}: no such file")
    return path
