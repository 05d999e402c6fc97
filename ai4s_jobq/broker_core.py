"""Service Bus queue semantics on SQLite.

This is the one implementation of queue behaviour in the project: the embedded
``local://`` backend calls it directly and the Service Bus emulator puts an AMQP
front end on it.  It is synchronous and safe to share between threads and
between processes (SQLite in WAL mode; every state change runs in a
``BEGIN IMMEDIATE`` transaction, so two receivers can never lock the same
message).

What it models, following Azure Service Bus queues:

* duplicate detection: a queue created with ``requires_duplicate_detection``
  drops a message whose ``message_id`` was accepted within
  ``duplicate_detection_window`` seconds (the sender still sees success);
* peek-lock: a received message is locked for ``lock_duration`` seconds under a
  fresh lock token; complete / abandon / dead-letter / renew need a live lock,
  and an expired lock makes the message receivable again;
* delivery count: incremented each time a message is locked (1 on the first
  delivery); once a message has been delivered ``max_delivery_count`` times and
  is abandoned or its lock expires, it moves to the dead-letter sub-queue with
  reason ``MaxDeliveryCountExceeded``;
* time to live, scheduled enqueue time, deferral, peek by sequence number.

Message bodies are opaque bytes; ``properties`` is a JSON-able dict the caller
may use for anything it wants carried along (the emulator keeps AMQP
annotations there).
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, replace
from typing import Any

from .broker_housekeeping import activate_scheduled, allocate, move_to_dead_letter, sweep
from .broker_model import (  # noqa: F401 - re-exported: the core's public names
    ACTIVE,
    COLUMNS,
    DEAD_LETTER,
    DEFERRED_STATE,
    LOCK_LOST_TEXT,
    MAX_DELIVERY_COUNT_REASON,
    READY_STATE,
    REMEMBER_IDS,
    SCHEMA,
    SEQUENCE_INDEXES,
    TTL_EXPIRED_DESCRIPTION,
    TTL_EXPIRED_REASON,
    BrokerError,
    InvalidOperation,
    LockLost,
    MessageTooLarge,
    NewMessage,
    QueueCounts,
    QueueExists,
    QueueNotFound,
    QueueProperties,
    SendResult,
    StoredMessage,
    insert_plain,
    is_plain,
    max_delivery_count_description,
    merge_props,
    message_row,
    props_from_json,
    row_to_message,
    validate_properties,
)
from .broker_store import SqliteStore
from .sqlite_bulk import for_each_id, ids_found

#: Which of the IDs in ``?1`` (a JSON array) queue ``?2`` accepted after time ``?3``.
_RECENTLY_ACCEPTED = (
    "SELECT value FROM json_each(?1) WHERE EXISTS (SELECT 1 FROM dedup"
    " WHERE queue = ?2 AND message_id = value AND accepted_at > ?3)"
)
#: Delete a message if ``lock_token`` (first parameter) still locks it at the
#: time given as the second.
_DELETE_LOCKED = "DELETE FROM messages WHERE lock_token = ? AND locked_until > ?"


class BrokerCore(SqliteStore):
    """A set of queues in one SQLite file (``":memory:"`` for a private in-memory store)."""

    # ------------------------------------------------------------------ queues

    def create_queue(self, props: QueueProperties, *, exist_ok: bool = False) -> QueueProperties:
        validate_properties(props)
        now = self.clock()
        with self._write() as conn:
            # Queue names are case-insensitive, as on Azure: "Jobs" and "jobs" are one queue.
            row = conn.execute(
                "SELECT props FROM queues WHERE name = ? COLLATE NOCASE", (props.name,)
            ).fetchone()
            if row is not None:
                if exist_ok:
                    return props_from_json(row[0])
                raise QueueExists(f"queue {props.name!r} already exists")
            created = replace(props, created_at=now, updated_at=now)
            conn.execute(
                "INSERT INTO queues(name, props) VALUES (?, ?)",
                (props.name, json.dumps(asdict(created))),
            )
        return created

    def get_queue(self, name: str) -> QueueProperties:
        row = self._conn().execute("SELECT props FROM queues WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise QueueNotFound(f"queue {name!r} does not exist")
        return props_from_json(row[0])

    def resolve_queue_name(self, name: str) -> str | None:
        """The stored spelling of queue ``name`` (matched case-insensitively), or None."""
        row = (
            self._conn()
            .execute("SELECT name FROM queues WHERE name = ? COLLATE NOCASE", (name,))
            .fetchone()
        )
        return row[0] if row is not None else None

    def queue_exists(self, name: str) -> bool:
        row = self._conn().execute("SELECT 1 FROM queues WHERE name = ?", (name,)).fetchone()
        return row is not None

    def list_queues(self) -> list[QueueProperties]:
        rows = self._conn().execute("SELECT props FROM queues ORDER BY name").fetchall()
        return [props_from_json(r[0]) for r in rows]

    def update_queue(self, props: QueueProperties) -> QueueProperties:
        """Change a queue's settings.  As on Azure, duplicate detection cannot be
        switched on or off once the queue exists."""
        validate_properties(props)
        with self._write() as conn:
            row = conn.execute("SELECT props FROM queues WHERE name = ?", (props.name,)).fetchone()
            if row is None:
                raise QueueNotFound(f"queue {props.name!r} does not exist")
            current = props_from_json(row[0])
            if current.requires_duplicate_detection != props.requires_duplicate_detection:
                raise InvalidOperation(
                    "requires_duplicate_detection cannot be changed on an existing queue; "
                    "create a new queue instead"
                )
            updated = replace(props, created_at=current.created_at, updated_at=self.clock())
            conn.execute(
                "UPDATE queues SET props = ? WHERE name = ?",
                (json.dumps(asdict(updated)), props.name),
            )
        return updated

    def delete_queue(self, name: str) -> None:
        with self._write() as conn:
            cur = conn.execute("DELETE FROM queues WHERE name = ?", (name,))
            if cur.rowcount == 0:
                raise QueueNotFound(f"queue {name!r} does not exist")
            conn.execute("DELETE FROM messages WHERE queue = ?", (name,))
            conn.execute("DELETE FROM dedup WHERE queue = ?", (name,))
            conn.execute("DELETE FROM sequences WHERE queue = ?", (name,))

    def counts(self, queue: str) -> QueueCounts:
        props = self.get_queue(queue)
        now = self.clock()
        if not self.read_only:
            with self._write() as conn:
                sweep(conn, props, now)
        conn = self._conn()
        active, scheduled, deferred, dead = conn.execute(
            "SELECT"
            " COALESCE(SUM(sub = ? AND state = ? AND visible_at <= ?), 0),"
            " COALESCE(SUM(sub = ? AND state = ? AND visible_at > ?), 0),"
            " COALESCE(SUM(sub = ? AND state = ?), 0),"
            " COALESCE(SUM(sub = ?), 0)"
            " FROM messages WHERE queue = ?",
            (
                ACTIVE,
                READY_STATE,
                now,
                ACTIVE,
                READY_STATE,
                now,
                ACTIVE,
                DEFERRED_STATE,
                DEAD_LETTER,
                queue,
            ),
        ).fetchone()
        return QueueCounts(active=active, dead_letter=dead, scheduled=scheduled, deferred=deferred)

    # ------------------------------------------------------------------ sending

    def send(self, queue: str, messages: Sequence[NewMessage]) -> list[SendResult]:
        """Enqueue ``messages`` atomically; duplicates (by ``message_id``, within the
        queue's window) are dropped and reported as such.  Raises
        :class:`MessageTooLarge` before writing anything if any body is over the limit."""
        ids = [m.message_id for m in messages]
        fresh, first_seq = self._send(queue, ids, [m.body for m in messages], messages)
        seqs = iter(range(first_seq, first_seq + sum(fresh)))
        return [
            SendResult(duplicate=False, sequence_number=next(seqs))
            if new
            else SendResult(duplicate=True, sequence_number=None)
            for new in fresh
        ]

    def send_plain(self, queue: str, ids: Sequence[str], bodies: Sequence[bytes]) -> list[bool]:
        """:meth:`send` of messages that are an ID and a body and nothing else (as every
        task pushed to ``local://``), given as two lists, answering only which were
        accepted (False: dropped as a duplicate).  Why: the local push path then makes
        no object per message on the way in or out of the core."""
        return self._send(queue, ids, bodies, None)[0]

    def _send(
        self,
        queue: str,
        ids: Sequence[str],
        bodies: Sequence[bytes],
        messages: Sequence[NewMessage] | None,
    ) -> tuple[list[bool], int]:
        """Which of the messages were accepted, and the first accepted one's sequence
        number.  ``messages``: the full messages, or None when they are plain."""
        props = self.get_queue(queue)
        for index, body in enumerate(bodies):
            if len(body) > props.max_message_size:
                raise MessageTooLarge(index, len(body), props.max_message_size)
        now = self.clock()
        with self._write() as conn:
            fresh = self._fresh(conn, props, ids, now)
            if all(fresh):
                kept_ids, kept_bodies, kept = ids, bodies, messages
            else:
                kept_ids = [i for i, new in zip(ids, fresh) if new]
                kept_bodies = [b for b, new in zip(bodies, fresh) if new]
                kept = None if messages is None else [m for m, new in zip(messages, fresh) if new]
            if props.requires_duplicate_detection:
                for_each_id(conn, REMEMBER_IDS, kept_ids, now, queue)
            first_seq = allocate(conn, queue, len(kept_ids)) if kept_ids else 0
            plain = kept is None or all(is_plain(m) for m in kept)
            if not (plain and insert_plain(conn, props, kept_ids, kept_bodies, now, first_seq)):
                if kept is None:
                    kept = [NewMessage(i, b) for i, b in zip(kept_ids, kept_bodies)]
                numbers = iter(range(first_seq, first_seq + len(kept)))
                rows = [(*message_row(queue, props, m, now), next(numbers)) for m in kept]
                self._insert_messages(conn, rows)
        if kept_ids:
            self._notify(queue)
        return fresh, first_seq

    def _fresh(
        self, conn: sqlite3.Connection, props: QueueProperties, ids: Sequence[str], now: float
    ) -> list[bool]:
        """For each ID, whether its message is accepted (False: a duplicate of one
        accepted within the window, or of an earlier one in this batch)."""
        if not props.requires_duplicate_detection:
            return [True] * len(ids)
        seen = self._recently_accepted(conn, props, ids, now)
        fresh = []
        for message_id in ids:
            fresh.append(message_id not in seen)
            seen.add(message_id)
        return fresh

    @staticmethod
    def _insert_messages(conn: sqlite3.Connection, rows: list[tuple]) -> None:
        """Insert with one ``executemany`` (a per-row ``execute`` costs more than the
        insert itself)."""
        if rows:
            conn.executemany(
                "INSERT INTO messages(queue, sub, state, message_id, body, props,"
                " enqueued_at, visible_at, expires_at, qseq)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def _recently_accepted(
        self, conn: sqlite3.Connection, props: QueueProperties, ids: Sequence[str], now: float
    ) -> set[str]:
        if not props.requires_duplicate_detection or not ids:
            return set()
        cutoff = now - props.duplicate_detection_window
        found = ids_found(conn, _RECENTLY_ACCEPTED, sorted(set(ids)), props.name, cutoff)
        if found is not None:
            return found
        found = set()
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT message_id FROM dedup WHERE queue = ? AND accepted_at > ?"
                f" AND message_id IN ({marks})",
                (props.name, cutoff, *chunk),
            )
            found.update(r[0] for r in rows)
        return found

    def prune_dedup_history(self, queue: str) -> int:
        """Forget message IDs older than the window (they no longer count anyway)."""
        props = self.get_queue(queue)
        with self._write() as conn:
            cur = conn.execute(
                "DELETE FROM dedup WHERE queue = ? AND accepted_at <= ?",
                (queue, self.clock() - props.duplicate_detection_window),
            )
        return cur.rowcount

    def cancel_scheduled(self, queue: str, sequence_numbers: Iterable[int]) -> int:
        now = self.clock()
        removed = 0
        with self._write() as conn:
            for seq in sequence_numbers:
                cur = conn.execute(
                    "DELETE FROM messages WHERE qseq = ? AND queue = ? AND sub = ?"
                    " AND visible_at > ?",
                    (seq, queue, ACTIVE, now),
                )
                removed += cur.rowcount
        return removed

    # ------------------------------------------------------------------ receiving

    def receive(
        self,
        queue: str,
        max_count: int = 1,
        *,
        sub_queue: str = ACTIVE,
        receive_and_delete: bool = False,
        lock_duration: float | None = None,
    ) -> list[StoredMessage]:
        """Lock (or, with ``receive_and_delete``, remove) up to ``max_count`` receivable
        messages.  Never blocks waiting for messages: callers poll or listen."""
        props = self.get_queue(queue)
        now = self.clock()
        until = now + (lock_duration if lock_duration is not None else props.lock_duration)
        with self._write() as conn:
            sweep(conn, props, now)
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM messages WHERE queue = ? AND sub = ? AND state = ?"
                " AND visible_at <= ? AND (locked_until IS NULL OR locked_until <= ?)"
                " ORDER BY qseq LIMIT ?",
                (queue, sub_queue, READY_STATE, now, now, max_count),
            ).fetchall()
            received = [row_to_message(row, now) for row in rows]
            for message in received:
                message.delivery_count += 1
                message.lock_token = None if receive_and_delete else str(uuid.uuid4())
                message.locked_until = None if receive_and_delete else until
            if receive_and_delete:
                conn.executemany(
                    "DELETE FROM messages WHERE seq = ?", [(m.row_id,) for m in received]
                )
            else:  # one executemany: a statement per message cost more than the update
                conn.executemany(
                    "UPDATE messages SET lock_token = ?, locked_until = ?, delivery_count = ?"
                    " WHERE seq = ?",
                    [(m.lock_token, until, m.delivery_count, m.row_id) for m in received],
                )
        return received

    def receive_deferred(
        self, queue: str, sequence_numbers: Sequence[int], *, sub_queue: str = ACTIVE
    ) -> list[StoredMessage]:
        props = self.get_queue(queue)
        now = self.clock()
        out: list[StoredMessage] = []
        with self._write() as conn:
            for seq in sequence_numbers:
                row = conn.execute(
                    f"SELECT {COLUMNS} FROM messages WHERE qseq = ? AND queue = ? AND sub = ?"
                    " AND state = ? AND (locked_until IS NULL OR locked_until <= ?)",
                    (seq, queue, sub_queue, DEFERRED_STATE, now),
                ).fetchone()
                if row is None:
                    continue
                message = row_to_message(row, now)
                message.delivery_count += 1
                message.lock_token = str(uuid.uuid4())
                message.locked_until = now + props.lock_duration
                conn.execute(
                    "UPDATE messages SET lock_token = ?, locked_until = ?, delivery_count = ?"
                    " WHERE seq = ?",
                    (
                        message.lock_token,
                        message.locked_until,
                        message.delivery_count,
                        message.row_id,
                    ),
                )
                out.append(message)
        return out

    def peek(
        self,
        queue: str,
        max_count: int = 1,
        *,
        from_sequence_number: int = 0,
        sub_queue: str = ACTIVE,
    ) -> list[StoredMessage]:
        """Read messages without locking them, in sequence order (locked, scheduled
        and deferred ones included, as Service Bus peeks them)."""
        self.get_queue(queue)
        now = self.clock()
        self._activate_for_reading(queue, now)
        rows = (
            self._conn()
            .execute(
                f"SELECT {COLUMNS} FROM messages WHERE queue = ? AND sub = ? AND qseq >= ?"
                " ORDER BY qseq LIMIT ?",
                (queue, sub_queue, from_sequence_number, max_count),
            )
            .fetchall()
        )
        return [row_to_message(row, now) for row in rows]

    def _activate_for_reading(self, queue: str, now: float) -> None:
        """Let a read see activated scheduled messages with their new numbers.  Only
        writes when one is due; on a file opened read-only it leaves them be."""
        due = (
            self._conn()
            .execute(
                "SELECT 1 FROM messages WHERE queue = ? AND visible_at > enqueued_at"
                " AND visible_at <= ? LIMIT 1",
                (queue, now),
            )
            .fetchone()
        )
        if due is None:
            return
        try:
            with self._write() as conn:
                activate_scheduled(conn, queue, now)
        except sqlite3.OperationalError:
            pass

    # ------------------------------------------------------------------ settling

    def _locked_row(self, conn: sqlite3.Connection, lock_token: str, now: float) -> tuple:
        row = conn.execute(
            "SELECT seq, queue, delivery_count, locked_until, props FROM messages"
            " WHERE lock_token = ?",
            (lock_token,),
        ).fetchone()
        if row is None or row[3] is None or row[3] <= now:
            raise LockLost(LOCK_LOST_TEXT)
        return row

    def renew_lock(self, lock_token: str) -> float:
        """Extend a live lock by the queue's lock duration; returns the new locked-until."""
        now = self.clock()
        with self._write() as conn:
            seq, queue, _, _, _ = self._locked_row(conn, lock_token, now)
            until = now + self.get_queue(queue).lock_duration
            conn.execute("UPDATE messages SET locked_until = ? WHERE seq = ?", (until, seq))
        return until

    def complete(self, lock_token: str) -> None:
        """Delete the message under a live lock.  One autocommitted ``DELETE`` that
        names the lock: atomic on its own, and a quarter of the statements of a
        ``BEGIN``/``SELECT``/``DELETE``/``COMMIT`` transaction (settling is
        the busiest write of a receiver)."""
        with self._memory_lock:  # (serialises threads sharing an in-memory store)
            cur = self._conn().execute(_DELETE_LOCKED, (lock_token, self.clock()))
        if cur.rowcount == 0:
            raise LockLost(LOCK_LOST_TEXT)

    def complete_many(self, lock_tokens: Sequence[str]) -> list[LockLost | None]:
        """Complete several messages in one transaction: one commit (the costly part
        of ``complete``) instead of one per message.  Each token succeeds or fails
        on its own, exactly as a separate ``complete`` would; the result holds the
        :class:`LockLost` of each token that failed, None for the others."""
        now = self.clock()
        outcomes: list[LockLost | None] = []
        with self._write() as conn:
            for token in lock_tokens:
                deleted = conn.execute(_DELETE_LOCKED, (token, now)).rowcount
                outcomes.append(None if deleted else LockLost(LOCK_LOST_TEXT))
        return outcomes

    def complete_and_receive(
        self, lock_tokens: Sequence[str], queue: str, max_count: int = 1, *, sub_queue: str = ACTIVE
    ) -> tuple[list[LockLost | None], list[StoredMessage]]:
        """``complete_many(lock_tokens)`` then ``receive(queue, max_count)`` in one
        transaction: a worker that finishes a task and takes the next pays one commit,
        not two.  If the transaction fails, neither took effect."""
        with self._write():
            outcomes = self.complete_many(lock_tokens)
            return outcomes, self.receive(queue, max_count, sub_queue=sub_queue)

    def abandon(self, lock_token: str, properties_to_modify: dict[str, Any] | None = None) -> None:
        """Release the lock so the message can be received again at once; after
        ``max_delivery_count`` deliveries it is dead-lettered instead."""
        now = self.clock()
        with self._write() as conn:
            seq, queue, delivery_count, _, props_json = self._locked_row(conn, lock_token, now)
            props = merge_props(props_json, properties_to_modify)
            conn.execute(
                "UPDATE messages SET lock_token = NULL, locked_until = NULL, props = ?"
                " WHERE seq = ?",
                (props, seq),
            )
            max_count = self.get_queue(queue).max_delivery_count
            if delivery_count >= max_count:
                move_to_dead_letter(
                    conn, seq, MAX_DELIVERY_COUNT_REASON, max_delivery_count_description(max_count)
                )
        self._notify(queue)

    def release(self, lock_token: str) -> None:
        """Give a lock back without counting a delivery (AMQP ``released``): the
        client never handed the message to the application, e.g. a prefetched
        message dropped when a receiver closes.  Silently ignores dead locks."""
        now = self.clock()
        with self._write() as conn:
            row = conn.execute(
                "SELECT seq, queue, locked_until FROM messages WHERE lock_token = ?",
                (lock_token,),
            ).fetchone()
            if row is None or row[2] is None or row[2] <= now:
                return
            conn.execute(
                "UPDATE messages SET lock_token = NULL, locked_until = NULL,"
                " delivery_count = MAX(delivery_count - 1, 0) WHERE seq = ?",
                (row[0],),
            )
        self._notify(row[1])

    def next_due_time(self, queue: str, *, sub_queue: str = ACTIVE) -> float | None:
        """The earliest future time at which a message of ``queue`` becomes
        receivable by the passage of time alone (a scheduled time arrives or a lock
        expires), or None.  Lets a server sleep until then instead of polling."""
        now = self.clock()
        row = (
            self._conn()
            .execute(
                "SELECT MIN(MAX(visible_at, COALESCE(locked_until, 0))) FROM messages"
                " WHERE queue = ? AND sub = ? AND state = ?"
                " AND (visible_at > ? OR locked_until > ?)",
                (queue, sub_queue, READY_STATE, now, now),
            )
            .fetchone()
        )
        return row[0] if row and row[0] is not None else None

    def dead_letter(
        self,
        lock_token: str,
        reason: str | None = None,
        description: str | None = None,
        properties_to_modify: dict[str, Any] | None = None,
    ) -> None:
        now = self.clock()
        with self._write() as conn:
            seq, _, _, _, props_json = self._locked_row(conn, lock_token, now)
            (sub,) = conn.execute("SELECT sub FROM messages WHERE seq = ?", (seq,)).fetchone()
            if sub == DEAD_LETTER:  # Azure keeps the first reason; the lock stays as it is
                raise InvalidOperation("a dead-lettered message cannot be dead-lettered again")
            props = merge_props(props_json, properties_to_modify)
            conn.execute("UPDATE messages SET props = ? WHERE seq = ?", (props, seq))
            move_to_dead_letter(conn, seq, reason, description)

    def defer(self, lock_token: str, properties_to_modify: dict[str, Any] | None = None) -> None:
        now = self.clock()
        with self._write() as conn:
            seq, _, _, _, props_json = self._locked_row(conn, lock_token, now)
            conn.execute(
                "UPDATE messages SET state = ?, lock_token = NULL, locked_until = NULL,"
                " props = ? WHERE seq = ?",
                (DEFERRED_STATE, merge_props(props_json, properties_to_modify), seq),
            )

    def purge(self, queue: str, *, sub_queue: str = ACTIVE) -> int:
        """Delete every message of a queue (or of its dead-letter sub-queue)."""
        self.get_queue(queue)
        with self._write() as conn:
            cur = conn.execute(
                "DELETE FROM messages WHERE queue = ? AND sub = ?", (queue, sub_queue)
            )
        return cur.rowcount
