"""Storage Queue read-ahead: batch receives sized by throughput, honest locks, a
fast worker's buffer refilled in the background, and unstarted messages released
at close without costing an attempt; and the backoff between polls of an empty
queue, kept across receive calls.

The sizing, refill and backoff rules are tested without I/O; everything else against Azurite, with a
second backend on the same queue standing in for another worker.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from azure.storage.queue.aio import QueueClient
from azurite_fixtures import OpenBackend

from ai4s_jobq.backends.base import OutgoingMessage
from ai4s_jobq.backends.read_ahead import ReadAhead
from ai4s_jobq.backends.storage.prefetch import PollBackoff


def tasks(count: int) -> list[OutgoingMessage]:
    return [OutgoingMessage(f"t{n}", json.dumps({"args": {"n": n}}).encode()) for n in range(count)]


async def receive_all(backend, wait: float = 0.3) -> list:
    got = []
    while batch := await backend.receive(32, wait):
        got.extend(batch)
    return got


# ---------------------------------------------------------------------- sizing (no I/O)


def test_fetch_ahead_follows_recent_throughput() -> None:
    ahead = ReadAhead(limit=32, horizon=1.0, window=2.0)
    assert ahead.fetch_count(3, now=100.0) == 3  # no history: only what can start
    for n in range(20):
        ahead.finished(now=100.0 + n * 0.05)  # 20 settled within a second: 10/s
    assert ahead.fetch_count(3, now=101.0) == 3 + 10
    for n in range(200):
        ahead.finished(now=101.0 + n * 0.001)
    assert ahead.fetch_count(3, now=101.5) == 32  # never more than one receive call
    assert ahead.fetch_count(3, now=110.0) == 3  # throughput history expires


def test_stale_means_less_than_half_the_lock_left() -> None:
    from ai4s_jobq.backends.base import ReceivedMessage

    message = ReceivedMessage("m", b"", 1, None, locked_until=1000.0)
    assert not ReadAhead.stale(message, 60, now=960.0)  # 40 s of 60 left
    assert ReadAhead.stale(message, 60, now=975.0)  # 25 s left


def test_only_a_fast_worker_with_a_half_empty_buffer_refills() -> None:
    ahead = ReadAhead(limit=32, horizon=1.0, window=2.0)
    for n in range(10):
        ahead.finished(now=100.0 + n * 0.1)  # 5/s: slower than REFILL_MIN
    assert ahead.refill_count(now=101.0) == 0
    for n in range(30):
        ahead.finished(now=101.0 + n * 0.01)  # now 20/s: one second ahead is 20
    assert ahead.refill_count(now=101.5) == 20  # empty buffer
    ahead.keep([object()] * 10)  # type: ignore[list-item]
    assert ahead.refill_count(now=101.5) == 0  # half of 20 still buffered
    ahead.take(1)
    assert ahead.refill_count(now=101.5) == 20


def test_poll_backoff_doubles_after_empty_polls_and_resets_on_messages() -> None:
    polls = PollBackoff()
    assert polls.wait(now=0.0) == 0.0  # a fresh receiver polls at once
    polls.polled(found=False, now=10.0)
    assert polls.wait(now=10.0) == pytest.approx(0.05)
    pauses = []
    for _ in range(8):
        polls.polled(found=False, now=20.0)
        pauses.append(polls.wait(now=20.0))
    assert pauses == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0])
    polls.polled(found=True, now=30.0)
    assert polls.wait(now=30.0) == 0.0


# ---------------------------------------------------------------------- against Azurite


async def test_short_receives_on_an_empty_queue_share_one_backoff(
    open_backend: OpenBackend,
) -> None:
    """A worker with a short idle timeout receives with short waits, often; the
    pause between empty polls carries over from call to call, so it polls about
    as rarely as one long wait would (0, 0.05, 0.15, 0.35, 0.75 s, ...), not at
    the start of every call."""
    async with open_backend(window=None) as worker:
        polls = 0
        receive_once = worker._receive_once

        async def counting(count, dead_letter):
            nonlocal polls
            polls += 1
            return await receive_once(count, dead_letter)

        worker._receive_once = counting
        started = time.monotonic()
        calls = 0
        while time.monotonic() - started < 1.0:
            assert await worker.receive(8, 0.05) == []
            calls += 1
        assert calls >= 10
        assert 2 <= polls <= 7  # per call, it would be two polls each: >= 20


async def test_no_read_ahead_without_throughput(open_backend: OpenBackend) -> None:
    """A worker that has settled nothing yet locks only what it can start: the rest
    stay visible to other workers."""
    async with open_backend(window=None) as worker, open_backend(create=False) as other:
        await worker.push(tasks(5))
        assert len(await worker.receive(1, 1.0)) == 1
        assert len(await receive_all(other)) == 4


async def test_read_ahead_serves_later_receives_and_stays_bounded(
    open_backend: OpenBackend,
) -> None:
    async with open_backend(window=None) as worker, open_backend(create=False) as other:
        await worker.push(tasks(40))
        first = await worker.receive(10, 1.0)
        assert len(first) == 10
        await asyncio.gather(*(worker.complete(m) for m in first))  # ~10 in 2 s: 5/s
        expected_ahead = int(worker._read_ahead.rate() * 1.0)
        assert expected_ahead >= 1

        handed = await worker.receive(1, 1.0)
        assert len(handed) == 1
        assert len(worker._read_ahead) == expected_ahead  # locked, waiting here
        # the other worker sees everything except what this one holds
        others = await receive_all(other)
        assert len(others) == 40 - 10 - 1 - expected_ahead

        buffered = await worker.receive(32, 0.0)  # served from the buffer
        assert len(buffered) == expected_ahead
        await asyncio.gather(*(worker.complete(m) for m in handed + buffered + others))
        assert (await worker.counts()).active == 0


async def test_a_stale_buffered_message_is_renewed_before_hand_out(
    open_backend: OpenBackend,
) -> None:
    async with open_backend(window=None, lock=300) as worker:
        await worker.push(tasks(3))
        worker._read_ahead.finished()
        worker._read_ahead.finished()  # some throughput: read ahead
        first = await worker.receive(1, 1.0)
        assert len(worker._read_ahead) >= 1
        waiting = worker._read_ahead._buffer[0]
        waiting.locked_until = time.time() + 5  # as if it had waited 295 s

        (handed,) = await worker.receive(1, 0.0)
        assert handed is waiting
        assert handed.locked_until is not None and handed.locked_until > time.time() + 250
        await worker.complete(handed)  # the renewed pop receipt settles it
        await worker.complete(first[0])


async def test_a_buffered_message_whose_lock_is_gone_is_dropped(
    open_backend: OpenBackend, azurite, storage_queue_name: str
) -> None:
    async with open_backend(window=None) as worker, open_backend(create=False) as other:
        await worker.push(tasks(3))
        for _ in range(4):
            worker._read_ahead.finished()  # 2/s: two fetched ahead
        kept = await worker.receive(1, 1.0)
        assert len(worker._read_ahead) == 2
        lost, ok = worker._read_ahead._buffer
        # Its visibility ends early and another worker takes it: our receipt is stale.
        async with QueueClient.from_connection_string(
            azurite.connection_string, storage_queue_name
        ) as raw:
            await raw.update_message(
                lost.handle.azure_id, pop_receipt=lost.handle.pop_receipt, visibility_timeout=0
            )
        (stolen,) = await other.receive(1, 1.0)
        assert stolen.message_id == lost.message_id
        lost.locked_until = time.time()  # stale: the worker tries to renew it

        handed = await worker.receive(2, 0.0)
        assert [m.message_id for m in handed] == [ok.message_id]
        for message in (*kept, *handed):
            await worker.complete(message)
        await other.complete(stolen)


def fast_worker(worker, per_second: int = 20) -> None:
    """Throughput history as if the worker had settled ``per_second`` a second."""
    for _ in range(2 * per_second):
        worker._read_ahead.finished()


async def test_a_fast_worker_refills_its_buffer_in_the_background(
    open_backend: OpenBackend,
) -> None:
    async with open_backend(window=None) as worker:
        await worker.push(tasks(60))
        fast_worker(worker)
        first = await worker.receive(1, 1.0)  # fetches 1 + 20 ahead
        assert len(first) == 1 and len(worker._read_ahead) == 20
        assert worker._read_ahead._refill is None  # 20 buffered: no refill yet
        handed = await worker.receive(12, 0.0)  # from the buffer: 8 left, < half
        assert len(handed) == 12
        assert worker._read_ahead._refill is not None  # the next batch is on its way
        assert len(worker._read_ahead) == 8
        assert await worker._read_ahead.refilled()
        assert len(worker._read_ahead) == 8 + 20
        for message in (*first, *handed):
            await worker.complete(message)


async def test_close_waits_for_a_refill_in_flight_and_releases_its_messages(
    open_backend: OpenBackend, azurite, storage_queue_name: str
) -> None:
    async with open_backend(window=None) as worker:
        await worker.push(tasks(60))
        fast_worker(worker)
        started = [*await worker.receive(1, 1.0), *await worker.receive(12, 0.0)]
        assert worker._read_ahead._refill is not None
    # closed while the refill was in flight: its 20 were released with the other 8
    async with QueueClient.from_connection_string(
        azurite.connection_string, storage_queue_name
    ) as raw:
        for message in started:  # these 13 "ran"
            await raw.delete_message(message.handle.azure_id, message.handle.pop_receipt)

    async with open_backend(create=False) as other:
        again = await receive_all(other)
        assert len(again) == 60 - 13
        assert {m.delivery_count for m in again} == {1}


async def test_close_releases_unstarted_messages_without_costing_an_attempt(
    open_backend: OpenBackend, azurite, storage_queue_name: str
) -> None:
    async with open_backend(window=None) as worker:
        await worker.push(tasks(6))
        for _ in range(10):
            worker._read_ahead.finished()
        (started,) = await worker.receive(1, 1.0)
        assert len(worker._read_ahead) == 5
        await worker.complete(started)
    # closed: the five unstarted messages are visible again at once

    async with open_backend(create=False) as other:
        again = await receive_all(other)
        assert len(again) == 5
        assert {m.delivery_count for m in again} == {1}  # not charged for the read-ahead
        async with QueueClient.from_connection_string(
            azurite.connection_string, storage_queue_name
        ) as raw:
            for message in again:  # Azure itself did count the reception
                await raw.update_message(
                    message.handle.azure_id,
                    pop_receipt=message.handle.pop_receipt,
                    visibility_timeout=0,
                )
            peeked = [m async for m in raw.receive_messages(max_messages=32)]
        assert {m.dequeue_count for m in peeked} == {3}
        assert all('"unstarted":1' in m.content for m in peeked)
