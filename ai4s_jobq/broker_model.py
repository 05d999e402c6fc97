"""The broker core's vocabulary: errors, queue and message records, the SQLite
schema, and the row conversions.  Split from :mod:`ai4s_jobq.broker_core` so the
operations there read on their own; import these names from either module."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ACTIVE = ""
DEAD_LETTER = "deadletter"

READY_STATE = 0
DEFERRED_STATE = 2

MAX_DELIVERY_COUNT_REASON = "MaxDeliveryCountExceeded"
TTL_EXPIRED_REASON = "TTLExpiredException"


class BrokerError(Exception):
    """Base class for errors raised by the broker core."""


class QueueNotFound(BrokerError):
    pass


class QueueExists(BrokerError):
    pass


class LockLost(BrokerError):
    """The lock token is unknown or its lock has expired (Azure: MessageLockLost)."""


LOCK_LOST_TEXT = (
    "the lock supplied is invalid: it expired, or the message was already "
    "settled or received by another receiver"
)


class InvalidOperation(BrokerError):
    """A request Azure would refuse (e.g. toggling duplicate detection)."""


class MessageTooLarge(BrokerError):
    def __init__(self, index: int, size: int, limit: int):
        super().__init__(f"message {index} is {size} bytes; the queue accepts at most {limit}")
        self.index = index
        self.size = size
        self.limit = limit


@dataclass
class QueueProperties:
    """Settings of one queue; durations are seconds."""

    name: str
    lock_duration: float = 60.0
    requires_duplicate_detection: bool = False
    duplicate_detection_window: float = 600.0
    max_delivery_count: int = 10
    default_message_ttl: float | None = None
    dead_lettering_on_message_expiration: bool = False
    max_message_size: int = 256 * 1024
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass
class NewMessage:
    message_id: str
    body: bytes
    properties: dict[str, Any] = field(default_factory=dict)
    time_to_live: float | None = None
    scheduled_enqueue_time: float | None = None


@dataclass
class SendResult:
    duplicate: bool
    sequence_number: int | None  # None when dropped as a duplicate


@dataclass
class StoredMessage:
    """A message as read from the store (received, peeked or dead-lettered)."""

    sequence_number: int
    message_id: str
    body: bytes
    properties: dict[str, Any]
    enqueued_time: float
    scheduled_enqueue_time: float
    expires_at: float | None
    delivery_count: int
    lock_token: str | None
    locked_until: float | None
    sub_queue: str
    state: str  # "active", "scheduled", "deferred"
    dead_letter_reason: str | None
    dead_letter_description: str | None


@dataclass
class QueueCounts:
    active: int
    dead_letter: int
    scheduled: int
    deferred: int

    @property
    def total(self) -> int:
        return self.active + self.dead_letter + self.scheduled + self.deferred


SCHEMA = """
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY,
    props TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    sub TEXT NOT NULL,
    state INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    props TEXT,
    enqueued_at REAL NOT NULL,
    visible_at REAL NOT NULL,
    expires_at REAL,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    lock_token TEXT,
    locked_until REAL,
    dl_reason TEXT,
    dl_description TEXT
);
CREATE INDEX IF NOT EXISTS messages_by_queue ON messages(queue, sub, state, seq);
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_lock ON messages(lock_token)
    WHERE lock_token IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_locked ON messages(queue, locked_until)
    WHERE locked_until IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_expiring ON messages(queue, expires_at)
    WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS dedup (
    queue TEXT NOT NULL,
    message_id TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    PRIMARY KEY (queue, message_id)
) WITHOUT ROWID;
"""

COLUMNS = (
    "seq, message_id, body, props, enqueued_at, visible_at, expires_at, delivery_count,"
    " lock_token, locked_until, sub, state, dl_reason, dl_description"
)


def message_row(queue: str, props: QueueProperties, message: NewMessage, now: float) -> tuple:
    """The ``messages`` columns of a newly sent message."""
    ttl = message.time_to_live or props.default_message_ttl
    visible_at = message.scheduled_enqueue_time or now
    return (
        queue,
        ACTIVE,
        READY_STATE,
        message.message_id,
        message.body,
        json.dumps(message.properties) if message.properties else None,
        now,
        visible_at,
        visible_at + ttl if ttl else None,
    )


def validate_properties(props: QueueProperties) -> None:
    if not props.name or len(props.name) > 260:
        raise InvalidOperation("a queue name must have 1 to 260 characters")
    if props.lock_duration <= 0:
        raise InvalidOperation("lock_duration must be positive")
    if props.duplicate_detection_window <= 0:
        raise InvalidOperation("duplicate_detection_window must be positive")
    if props.max_delivery_count < 1:
        raise InvalidOperation("max_delivery_count must be at least 1")
    if props.default_message_ttl is not None and props.default_message_ttl <= 0:
        raise InvalidOperation("default_message_ttl must be positive")


def props_from_json(text: str) -> QueueProperties:
    data = json.loads(text)
    known = {f for f in QueueProperties.__dataclass_fields__}
    return QueueProperties(**{k: v for k, v in data.items() if k in known})


def merge_props(props_json: str | None, extra: dict[str, Any] | None) -> str | None:
    if not extra:
        return props_json
    props = json.loads(props_json) if props_json else {}
    props.update(extra)
    return json.dumps(props)


def row_to_message(row: tuple, now: float) -> StoredMessage:
    (
        seq,
        message_id,
        body,
        props,
        enqueued_at,
        visible_at,
        expires_at,
        delivery_count,
        lock_token,
        locked_until,
        sub,
        state,
        dl_reason,
        dl_description,
    ) = row
    if state == DEFERRED_STATE:
        state_name = "deferred"
    elif visible_at > now:
        state_name = "scheduled"
    else:
        state_name = "active"
    return StoredMessage(
        sequence_number=seq,
        message_id=message_id,
        body=bytes(body),
        properties=json.loads(props) if props else {},
        enqueued_time=enqueued_at,
        scheduled_enqueue_time=visible_at,
        expires_at=expires_at,
        delivery_count=delivery_count,
        lock_token=lock_token if locked_until is not None and locked_until > now else None,
        locked_until=locked_until,
        sub_queue=sub,
        state=state_name,
        dead_letter_reason=dl_reason,
        dead_letter_description=dl_description,
    )
