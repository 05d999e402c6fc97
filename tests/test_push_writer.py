"""push_many on ``local://`` writes each batch from the backend's writer thread while it
builds the next (ai4s_jobq.push_writer): same outcomes, in order, in the caller's
context; a ledger that awaits real I/O keeps the sends on the event loop; the thread
ends with the queue."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from ai4s_jobq import JobQ
from ai4s_jobq.ledger.sqlite_store import SqliteLedger
from ai4s_jobq.push_writer import complete_inline

WRITER_THREAD = "jobq-push"
caller_value: contextvars.ContextVar[str] = contextvars.ContextVar("caller_value", default="")


def sending_threads(q: JobQ) -> list[str]:
    """Names of the threads the broker core's sends run in (its listeners are called
    in the writer's thread after every send)."""
    names: list[str] = []
    q.backend.core.add_listener(lambda queue: names.append(threading.current_thread().name))
    return names


async def test_batches_are_written_by_the_writer_thread_with_every_outcome_in_order(local_dir):
    async with JobQ.open("local://w") as q:
        threads = sending_threads(q)
        tasks = [{"i": i % 250} for i in range(600)]  # repeats across in-flight batches
        reported: list[tuple[int, bool | None]] = []
        summary = await q.push_many(
            tasks,
            batch_size=50,
            on_result=lambda index, _id, outcome: reported.append((index, outcome.duplicate)),
        )
        assert (summary.pushed, summary.duplicates) == (250, 350)
        assert [index for index, _ in reported] == list(range(600))
        assert [dup for _, dup in reported] == [False] * 250 + [True] * 350
        assert threads and set(threads) == {f"{WRITER_THREAD}_0"}
        assert (await q.counts()).active == 250
        assert (await q.status()).counts["queued"] == 250  # the ledger recorded them too


async def test_the_writer_runs_in_the_callers_context(local_dir):
    async with JobQ.open("local://ctx") as q:
        seen: list[tuple[str, str]] = []
        push = q.backend.push

        async def spying_push(messages):  # a spy: the real push still runs
            seen.append((threading.current_thread().name, caller_value.get()))
            return await push(messages)

        q.backend.push = spying_push  # type: ignore[method-assign]
        caller_value.set("the pipeline's")
        await q.push_many([{"i": i} for i in range(30)], batch_size=10)
        assert seen == [(f"{WRITER_THREAD}_0", "the pipeline's")] * 3


class SuspendingLedger(SqliteLedger):
    """The SQLite ledger, but its push records await the event loop first, as a ledger
    over the network does."""

    never_suspends = False

    async def record_pushes(self, entries, tag=None):
        await asyncio.sleep(0)
        await super().record_pushes(entries, tag)


async def test_a_ledger_that_suspends_keeps_the_sends_on_the_event_loop(local_dir):
    async with JobQ.open("local://net") as q:
        assert q.ledger is not None
        q.ledger = SuspendingLedger(q.backend.path)
        threads = sending_threads(q)
        summary = await q.push_many([{"i": i} for i in range(120)], batch_size=50)
        assert summary.pushed == 120 and not summary.failures
        assert set(threads) == {threading.current_thread().name}
        assert (await q.status()).counts["queued"] == 120
        await q.ledger.close()


async def test_the_writer_thread_ends_with_the_queue(local_dir):
    async with JobQ.open("local://end") as q:
        await q.push_many([{"i": i} for i in range(10)])
        assert any(t.name.startswith(WRITER_THREAD) for t in threading.enumerate())
    assert not any(t.name.startswith(WRITER_THREAD) for t in threading.enumerate())


def test_a_coroutine_that_suspends_is_refused_and_closed():
    cleaned_up: list[bool] = []

    async def suspends() -> int:
        try:
            await asyncio.sleep(0)
            return 1
        finally:
            cleaned_up.append(True)

    async def returns() -> int:
        return 2

    with pytest.raises(RuntimeError, match="suspended in the push writer thread"):
        complete_inline(suspends)
    assert cleaned_up == [True]
    assert complete_inline(returns) == 2
