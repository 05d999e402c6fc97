"""The broker core's vocabulary: errors, queue and message records, the SQLite
schema, the row conversions and the two statements that write a sent batch.  Split
from :mod:`ai4s_jobq.broker_core` so the operations there read on their own; import
these names from either module."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .sqlite_bulk import json_rows, json_rows_supported, text_bodies

ACTIVE = ""
DEAD_LETTER = "deadletter"

READY_STATE = 0
DEFERRED_STATE = 2

MAX_DELIVERY_COUNT_REASON = "MaxDeliveryCountExceeded"
TTL_EXPIRED_REASON = "TTLExpiredException"
# The descriptions Azure writes beside those reasons (DeadLetterErrorDescription).
TTL_EXPIRED_DESCRIPTION = "The message expired and was dead lettered."


def max_delivery_count_description(max_delivery_count: int) -> str:
    return f"Message could not be consumed after {max_delivery_count} delivery attempts."


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
    # Stored and reported as Azure does; not enforced (see docs/emulator.md).
    max_size_in_megabytes: int = 1024
    enable_batched_operations: bool = True
    auto_delete_on_idle: float | None = None  # None: never
    user_metadata: str | None = None
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
    row_id: int = 0  # the store's identity of the row (not the sequence number)

    @property
    def time_to_live(self) -> float | None:
        """Seconds from (scheduled) enqueue to expiry: the message's own time to live
        capped by the queue's default, as the broker applied it."""
        return None if self.expires_at is None else self.expires_at - self.scheduled_enqueue_time


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
    dl_description TEXT,
    qseq INTEGER
);
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
CREATE TABLE IF NOT EXISTS sequences (
    queue TEXT PRIMARY KEY,
    last INTEGER NOT NULL
) WITHOUT ROWID;
"""

# Created after SCHEMA (and after adding ``qseq`` to a file made before it existed).
# ``qseq`` is the queue's own, gap-free sequence number (Azure numbers each entity
# separately); ``seq`` stays the row's identity.  Receivers take messages in ``qseq``
# order, so a scheduled message that activates (and gets a new number) goes last.
SEQUENCE_INDEXES = """
CREATE INDEX IF NOT EXISTS messages_by_queue_qseq ON messages(queue, sub, state, qseq);
CREATE INDEX IF NOT EXISTS messages_by_qseq ON messages(queue, qseq);
CREATE INDEX IF NOT EXISTS messages_scheduled ON messages(queue, visible_at)
    WHERE visible_at > enqueued_at;
DROP INDEX IF EXISTS messages_by_queue;
"""

COLUMNS = (
    "seq, message_id, body, props, enqueued_at, visible_at, expires_at, delivery_count,"
    " lock_token, locked_until, sub, state, dl_reason, dl_description, qseq"
)


def message_row(queue: str, props: QueueProperties, message: NewMessage, now: float) -> tuple:
    """The ``messages`` columns of a newly sent message (without ``qseq``).  The
    queue's default time to live is a ceiling on the message's, as on Azure."""
    ttl = message.time_to_live or props.default_message_ttl
    if ttl and props.default_message_ttl:
        ttl = min(ttl, props.default_message_ttl)
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


# Accepted message IDs, for duplicate detection: ?3 is the queue (see
# ai4s_jobq.sqlite_bulk.for_each_id).
REMEMBER_IDS = (
    "INSERT OR REPLACE INTO dedup(queue, message_id, accepted_at) SELECT ?3, {id}, ?1 {source}"
)
_INSERT_PLAIN = (
    "INSERT INTO messages(queue, sub, state, message_id, body, props,"
    " enqueued_at, visible_at, expires_at, qseq)"
    " SELECT ?1, ?2, ?3, json_extract(value, '$[0]'), CAST(json_extract(value, '$[1]') AS BLOB),"
    " NULL, ?4, ?4, ?5, ?6 + key FROM json_each(?7)"
)


def is_plain(message: NewMessage) -> bool:
    """No properties, time to live or schedule of its own: an ID and a body, as every
    task ``jobq`` pushes."""
    return not (message.properties or message.time_to_live or message.scheduled_enqueue_time)


def insert_plain(
    conn: sqlite3.Connection,
    props: QueueProperties,
    ids: Sequence[str],
    bodies: Sequence[bytes],
    now: float,
    first_seq: int,
) -> bool:
    """Insert plain messages (see :func:`is_plain`), given as their IDs and bodies, in
    one statement if every body is text; False (nothing written) otherwise.  Their
    columns then match :func:`message_row`'s."""
    if not ids or not json_rows_supported():
        return False
    texts = text_bodies(bodies)
    if texts is None:
        return False
    encoded = json_rows(list(zip(ids, texts)))
    if encoded is None:
        return False
    ttl = props.default_message_ttl
    expires_at = now + ttl if ttl else None
    conn.execute(
        _INSERT_PLAIN, (props.name, ACTIVE, READY_STATE, now, expires_at, first_seq, encoded)
    )
    return True


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
        qseq,
    ) = row
    if state == DEFERRED_STATE:
        state_name = "deferred"
    elif visible_at > now:
        state_name = "scheduled"
    else:
        state_name = "active"
    return StoredMessage(
        sequence_number=qseq if qseq is not None else seq,
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
        row_id=seq,
    )
