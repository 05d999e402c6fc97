"""The local backend's shortcuts on its hot paths keep their answers for the unusual case:
a missing queue on receive, an oversized body among a batch on push, a completion
committed by the next receive's transaction."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from ai4s_jobq.backends.base import (
    LockLostError,
    MessageTooLargeError,
    OutgoingMessage,
    QueueSettings,
    QueueUnavailableError,
)
from ai4s_jobq.backends.local import LocalBackend
from ai4s_jobq.broker_core import BrokerCore, LockLost, NewMessage, QueueNotFound, QueueProperties


async def test_receive_on_a_missing_queue_says_it_is_created_by_the_first_push(tmp_path):
    backend = LocalBackend(tmp_path / "q.sqlite3", "nothing-here")
    await backend.open()
    try:
        with pytest.raises(QueueUnavailableError, match="A push creates a queue"):
            await backend.receive(1, 0.01)
    finally:
        await backend.close()


async def test_an_oversized_body_fails_alone_and_the_rest_of_the_batch_is_pushed(tmp_path):
    backend = LocalBackend(tmp_path / "q.sqlite3", "q")
    await backend.open()
    try:
        await backend.ensure_queue(QueueSettings())
        limit = backend.core.get_queue("q").max_message_size
        messages = [
            OutgoingMessage("a", b"{}"),
            OutgoingMessage("big", b"x" * (limit + 1)),
            OutgoingMessage("b", b"{}"),
            OutgoingMessage("a", b"{}"),
        ]
        outcomes = await backend.push(messages)
        assert [o.message_id for o in outcomes] == ["a", "big", "b", "a"]
        assert [o.duplicate for o in outcomes] == [False, None, False, True]
        assert isinstance(outcomes[1].error, MessageTooLargeError)
        assert (await backend.counts()).active == 2
    finally:
        await backend.close()


def test_complete_and_receive_is_one_transaction(tmp_path):
    core = BrokerCore(tmp_path / "c.sqlite3")
    core.create_queue(QueueProperties(name="q"))
    core.send("q", [NewMessage(f"m{i}", b"{}") for i in range(3)])
    (first,) = core.receive("q", 1)
    outcomes, (second,) = core.complete_and_receive([first.lock_token, "stale"], "q", 1)
    assert outcomes[0] is None and isinstance(outcomes[1], LockLost)
    assert second.message_id == "m1"
    assert [m.message_id for m in core.peek("q", 10)] == ["m1", "m2"]
    # If the receive fails, the completions did not happen either.
    with pytest.raises(QueueNotFound):
        core.complete_and_receive([second.lock_token], "missing", 1)
    assert [m.message_id for m in core.peek("q", 10)] == ["m1", "m2"]
    core.complete(second.lock_token)
    assert [m.message_id for m in core.peek("q", 10)] == ["m2"]


async def test_the_last_completion_of_a_receive_is_committed_by_the_next_receive(tmp_path):
    backend = LocalBackend(tmp_path / "q.sqlite3", "q")
    await backend.open()
    try:
        await backend.ensure_queue(QueueSettings())
        await backend.push([OutgoingMessage(f"m{i}", b"{}") for i in range(2)])
        merged: list[list[str]] = []
        combined = backend.core.complete_and_receive

        def spy(tokens, *args, **kwargs):
            merged.append(list(tokens))
            return combined(tokens, *args, **kwargs)

        backend.core.complete_and_receive = spy  # type: ignore[method-assign]
        (first,) = await backend.receive(1, 0.1)
        completing = asyncio.ensure_future(backend.complete(first))
        await asyncio.sleep(0)  # complete() has queued it and now waits
        (second,) = await backend.receive(1, 0.1)
        await completing  # resolved by that receive's transaction
        assert merged == [[first.handle]]
        assert second.message_id == "m1"
        # With no receive after it, the last completion is committed on its own, soon.
        await asyncio.wait_for(backend.complete(second), 5)
        assert (await backend.counts()).active == 0
        # A stale lock is the caller's own LockLostError, through either path.
        with pytest.raises(LockLostError):
            await backend.complete(second)
    finally:
        await backend.close()


async def _fast_worker_history(backend: LocalBackend, count: int) -> None:
    """Receive and complete ``count`` messages one by one: the throughput of a worker
    draining no-op tasks, which is what makes the backend read ahead."""
    for _ in range(count):
        (message,) = await backend.receive(1, 0.1)
        await backend.complete(message)


async def test_a_fast_receiver_reads_ahead_and_releases_the_surplus_uncounted(tmp_path):
    path = tmp_path / "q.sqlite3"
    backend = LocalBackend(path, "q")
    await backend.open()
    try:
        await backend.ensure_queue(QueueSettings())
        await backend.push([OutgoingMessage(f"m{i}", b"{}") for i in range(300)])
        await _fast_worker_history(backend, 40)
        (taken,) = await backend.receive(1, 0.1)
        buffered = len(backend._read_ahead)
        assert buffered > 0  # locked ahead for this receiver...
        other = BrokerCore(path)
        try:
            locked = [m for m in other.peek("q", 300) if m.locked_until]
            assert len(locked) == buffered + 1  # ... invisible to the others meanwhile
        finally:
            other.close()
        await backend.complete(taken)
    finally:
        await backend.close()
    # Closing gave the unstarted ones back, without counting a delivery.
    core = BrokerCore(path)
    try:
        left = core.peek("q", 300)
        assert len(left) == 300 - 41
        assert not [m for m in left if m.locked_until or m.delivery_count]
    finally:
        core.close()


async def test_a_slow_receiver_does_not_read_ahead(tmp_path):
    backend = LocalBackend(tmp_path / "q.sqlite3", "q")
    await backend.open()
    try:
        await backend.ensure_queue(QueueSettings())
        await backend.push([OutgoingMessage(f"m{i}", b"{}") for i in range(10)])
        for _ in range(3):  # one message at a time, a few a second at most
            (message,) = await backend.receive(1, 0.1)
            await backend.complete(message)
            assert len(backend._read_ahead) == 0
    finally:
        await backend.close()


async def test_a_read_ahead_message_whose_lock_ran_low_is_renewed_before_it_is_handed_out(
    tmp_path,
):
    path = tmp_path / "q.sqlite3"
    backend = LocalBackend(path, "q")
    await backend.open()
    try:
        await backend.ensure_queue(QueueSettings(lock_duration=timedelta(seconds=30)))
        await backend.push([OutgoingMessage(f"m{i}", b"{}") for i in range(300)])
        await _fast_worker_history(backend, 40)
        await backend.receive(1, 0.1)
        assert len(backend._read_ahead)
        # Waiting in the buffer used up more than half the lock: renewed on hand-out.
        for message in backend._read_ahead._buffer:
            message.locked_until = time.time() + 5
        (handed,) = await backend.receive(1, 0.1)
        assert handed.locked_until is not None and handed.locked_until > time.time() + 25
    finally:
        await backend.close()


async def test_queue_file_connections_are_sized_for_large_queues(tmp_path):
    """Both connections to a queue file (the broker's and the ledger's) get the cache
    and checkpoint settings that keep a 100,000-task push fast (bench_ledger.py)."""
    from ai4s_jobq.broker_store import CACHE_KIB, WAL_CHECKPOINT_PAGES, WAL_KEEP_BYTES
    from ai4s_jobq.ledger.sqlite_store import SqliteLedger

    core = BrokerCore(tmp_path / "q.sqlite3")
    ledger = SqliteLedger(tmp_path / "q.sqlite3")
    await ledger.open()
    try:
        for conn in (core._conn(), ledger._conn):
            assert conn.execute("PRAGMA cache_size").fetchone()[0] == -CACHE_KIB
            assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_CHECKPOINT_PAGES
            assert conn.execute("PRAGMA journal_size_limit").fetchone()[0] == WAL_KEEP_BYTES
    finally:
        await ledger.close()
        core.close()
