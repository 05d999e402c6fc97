"""What time and sequence numbering do to a queue, inside the broker core's write
transactions: per-queue sequence numbers, scheduled messages that activate, expired
locks past the delivery limit and expired messages that move to the dead-letter queue.

Module functions over a connection (the caller holds the transaction), split from
:mod:`ai4s_jobq.broker_core` to keep that module to the operations a client calls.
"""

from __future__ import annotations

import sqlite3

from .broker_model import (
    ACTIVE,
    DEAD_LETTER,
    DEFERRED_STATE,
    MAX_DELIVERY_COUNT_REASON,
    READY_STATE,
    TTL_EXPIRED_DESCRIPTION,
    TTL_EXPIRED_REASON,
    QueueProperties,
    max_delivery_count_description,
)


def allocate(conn: sqlite3.Connection, queue: str, count: int) -> int:
    """Reserve ``count`` consecutive sequence numbers of ``queue``; returns the
    first.  Per queue and gap-free, as Azure numbers each entity; the caller's
    ``BEGIN IMMEDIATE`` transaction keeps other writers out."""
    row = conn.execute("SELECT last FROM sequences WHERE queue = ?", (queue,)).fetchone()
    if row is None:
        last = conn.execute(
            "SELECT COALESCE(MAX(qseq), 0) FROM messages WHERE queue = ?", (queue,)
        ).fetchone()[0]
        conn.execute("INSERT INTO sequences(queue, last) VALUES (?, ?)", (queue, last + count))
    else:
        last = row[0]
        conn.execute("UPDATE sequences SET last = ? WHERE queue = ?", (last + count, queue))
    return last + 1


def activate_scheduled(conn: sqlite3.Connection, queue: str, now: float) -> None:
    """Scheduled messages whose time has come join the queue as if sent now: a new
    sequence number (after every message already there) and that enqueued time,
    as Azure does when a scheduled message activates."""
    due = conn.execute(
        "SELECT seq FROM messages WHERE queue = ? AND visible_at > enqueued_at"
        " AND visible_at <= ? ORDER BY visible_at, qseq",
        (queue, now),
    ).fetchall()
    if not due:
        return
    first = allocate(conn, queue, len(due))
    conn.executemany(
        "UPDATE messages SET qseq = ?, enqueued_at = visible_at WHERE seq = ?",
        [(first + index, seq) for index, (seq,) in enumerate(due)],
    )


def move_to_dead_letter(
    conn: sqlite3.Connection, seq: int, reason: str | None, description: str | None
) -> None:
    conn.execute(
        "UPDATE messages SET sub = ?, state = ?, lock_token = NULL, locked_until = NULL,"
        " dl_reason = ?, dl_description = ? WHERE seq = ?",
        (DEAD_LETTER, READY_STATE, reason, description, seq),
    )


def sweep(conn: sqlite3.Connection, props: QueueProperties, now: float) -> None:
    """Apply what time has done: expired locks past the delivery limit go to the
    dead-letter queue, messages past their time to live expire (deferred ones never
    do: Azure keeps them until they are received by sequence number), scheduled
    messages whose time has come activate."""
    activate_scheduled(conn, props.name, now)
    conn.execute(
        "UPDATE messages SET sub = ?, lock_token = NULL, locked_until = NULL,"
        " dl_reason = ?, dl_description = ?"
        " WHERE queue = ? AND sub = ? AND locked_until IS NOT NULL AND locked_until <= ?"
        " AND delivery_count >= ?",
        (
            DEAD_LETTER,
            MAX_DELIVERY_COUNT_REASON,
            max_delivery_count_description(props.max_delivery_count),
            props.name,
            ACTIVE,
            now,
            props.max_delivery_count,
        ),
    )
    expired = (props.name, ACTIVE, now, now, DEFERRED_STATE)
    where = (
        " WHERE queue = ? AND sub = ? AND expires_at IS NOT NULL AND expires_at <= ?"
        " AND (locked_until IS NULL OR locked_until <= ?) AND state != ?"
    )
    if props.dead_lettering_on_message_expiration:
        conn.execute(
            "UPDATE messages SET sub = ?, lock_token = NULL, locked_until = NULL,"
            " dl_reason = ?, dl_description = ?" + where,
            (DEAD_LETTER, TTL_EXPIRED_REASON, TTL_EXPIRED_DESCRIPTION, *expired),
        )
    else:
        conn.execute("DELETE FROM messages" + where, expired)
