"""How sync Python tasks leave the event loop (``ai4s_jobq/worker/sync_calls.py``).

What must hold however the hop is implemented: the loop keeps running while a sync
function blocks, the task's context (``current_task()``) is visible inside it, every slot's
sync task runs at once, outcomes (results, exceptions) come back to the right caller, and a
cancelled caller does not break the pool.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.worker.context import current_task
from ai4s_jobq.worker.processors import CallableProcessor
from ai4s_jobq.worker.sync_calls import run_sync


async def wait_until(predicate, timeout: float = 10.0) -> None:
    """Give the loop turns until ``predicate()`` holds (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_the_loop_keeps_running_while_a_sync_function_blocks():
    started, release = threading.Event(), threading.Event()
    released_by_loop = []

    def blocker() -> str:
        started.set()
        # If the function ran on the loop's thread, only this timeout would free it.
        release.wait(timeout=10)
        return "done"

    call = asyncio.ensure_future(run_sync(blocker, {}))
    await wait_until(started.is_set)  # the loop still gets turns while blocker blocks
    released_by_loop.append(True)
    release.set()
    assert await call == "done"
    assert released_by_loop == [True]


async def test_every_slot_runs_its_sync_task_at_once():
    """More concurrent calls than the default executor's ``min(32, cpus + 4)`` threads
    (6 on 2 cores): all must be inside their function together."""
    count = 12
    barrier = threading.Barrier(count, timeout=10)

    def meet(n: int) -> int:
        barrier.wait()  # BrokenBarrierError unless all `count` calls run concurrently
        return n

    results = await asyncio.gather(*(run_sync(meet, {"n": n}) for n in range(count)))
    assert results == list(range(count))


async def test_results_and_exceptions_reach_their_own_caller():
    def square(x: int) -> int:
        if x == 3:
            raise ValueError("three is not allowed")
        return x * x

    outcomes = await asyncio.gather(
        *(run_sync(square, {"x": x}) for x in range(6)), return_exceptions=True
    )
    assert outcomes[:3] == [0, 1, 4] and outcomes[4:] == [16, 25]
    assert isinstance(outcomes[3], ValueError) and "three" in str(outcomes[3])


async def test_a_cancelled_caller_does_not_break_the_pool():
    started, release = threading.Event(), threading.Event()

    def blocker() -> str:
        started.set()
        release.wait(timeout=10)
        return "late"

    call = asyncio.ensure_future(run_sync(blocker, {}))
    await wait_until(started.is_set)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    release.set()  # the function ends after its caller left: its outcome is dropped
    assert await run_sync(lambda: "next", {}) == "next"


async def test_context_variables_are_visible_in_the_thread():
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("from the caller")
    assert await run_sync(var.get, {}) == "from the caller"


seen: list[tuple[str | None, int | None, str]] = []


def record_context(n: int) -> None:
    context = current_task()
    seen.append(
        (
            context.task_id if context else None,
            context.attempt if context else None,
            threading.current_thread().name,
        )
    )


async def test_a_sync_task_sees_its_own_current_task_in_a_worker(local_dir):
    seen.clear()
    async with JobQ.open("local://ctx") as q:
        pushed = [await q.push({"n": n}) for n in range(4)]
        worker = Worker(
            q.backend,
            CallableProcessor(record_context),
            WorkerPolicy(slots=4, idle_timeout=0.3),
        )
        stats = await worker.run()
    assert stats.succeeded == 4
    assert sorted(task_id for task_id, _, _ in seen) == sorted(p.id for p in pushed)
    assert {attempt for _, attempt, _ in seen} == {1}
    assert all(name != threading.main_thread().name for _, _, name in seen)


async def test_idle_threads_exit_and_a_later_call_starts_a_new_one(monkeypatch):
    from ai4s_jobq.worker import sync_calls

    pool = sync_calls._Pool()
    monkeypatch.setattr(sync_calls, "_pool", pool)
    monkeypatch.setattr(sync_calls, "IDLE_SECONDS", 0.05)
    threads = [await run_sync(threading.current_thread, {}) for _ in range(5)]
    # Serial calls are served by one thread: it is idle before its caller hears back.
    assert pool.started == 1 and len(set(threads)) == 1
    await wait_until(lambda: pool.idle == 0 and not threads[0].is_alive())
    assert await run_sync(lambda: "again", {}) == "again"
    assert pool.started == 2
