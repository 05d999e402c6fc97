"""The worker loop against the real local backend (in-process)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import sample_tasks
import worker_scenarios

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.worker.loop import SETTLES_IN_FLIGHT, ExitCode
from ai4s_jobq.worker.processors import CallableProcessor
from ai4s_jobq.worker.retry import RetryDelay


def policy(**kwargs) -> WorkerPolicy:
    return WorkerPolicy(**{"idle_timeout": 0.3, "retry_delay": RetryDelay.immediate(), **kwargs})


async def test_success_and_retry_then_dead_letter_with_reason(local_dir):
    async with JobQ.open("local://w") as q:
        await worker_scenarios.success_retry_then_dead_letter(q, policy(slots=2))


async def test_zero_retries_dead_letters_after_one_attempt(local_dir):
    async with JobQ.open("local://w0") as q:
        await q.push({"message": "nope"}, num_retries=0)
        stats = await Worker(q.backend, CallableProcessor(sample_tasks.fail), policy()).run()
        assert (stats.failed, stats.dead_lettered) == (1, 1)
        (dead,) = await q.dlq_list()
        assert dead.reason == "RuntimeError" and "nope" in dead.description


async def test_malformed_message_dead_lettered_and_worker_continues(local_dir, tmp_path):
    log = tmp_path / "log"
    async with JobQ.open("local://m") as q:
        await worker_scenarios.malformed_messages_dead_lettered(q, policy(), log)


async def test_lock_is_renewed_while_a_long_task_runs(local_dir, tmp_path):
    log = tmp_path / "log"
    async with JobQ.open("local://renew", lock_duration=timedelta(seconds=1)) as q:
        await q.push({"log": str(log), "name": "long", "seconds": 3.0})
        # A second worker polls the same queue the whole time: it must never get the task.
        first = Worker(q.backend, CallableProcessor(sample_tasks.async_record), policy())
        rival = Worker(
            q.backend, CallableProcessor(sample_tasks.async_record), policy(idle_timeout=4.0)
        )
        stats = await asyncio.gather(first.run(), rival.run())
    assert sum(s.succeeded for s in stats) == 1
    assert log.read_text().count("start long") == 1


async def test_lost_lock_cancels_the_task_without_settling(local_dir, tmp_path):
    log = tmp_path / "log"
    async with JobQ.open("local://lost", lock_duration=timedelta(seconds=0.5)) as q:
        await q.push({"log": str(log), "name": "t", "seconds": 5.0})
        worker = Worker(q.backend, CallableProcessor(sample_tasks.async_record), policy())
        # Renew too late on purpose: the lock expires and a thief takes the message.
        worker.backend.lock_renew_interval = lambda message: 1.5  # type: ignore[method-assign]
        run = asyncio.ensure_future(worker.run())
        stolen = []
        while not stolen:
            await asyncio.sleep(0.1)
            stolen = q.backend.core.receive("lost", lock_duration=60)
        stats = await run
        assert stats.lost_locks == 1 and stats.succeeded == 0
        assert "end t" not in log.read_text()  # the task was cancelled
        q.backend.core.complete(stolen[0].lock_token)  # the thief still owns it


async def test_max_consecutive_failures_stops_with_code_3(local_dir):
    async with JobQ.open("local://f") as q:
        for i in range(5):
            await q.push({"message": str(i)}, num_retries=0)
        stats = await Worker(
            q.backend, CallableProcessor(sample_tasks.fail), policy(max_consecutive_failures=2)
        ).run()
        assert stats.exit_code == ExitCode.TOO_MANY_FAILURES == 3
        assert stats.failed == 2
        assert (await q.counts()).active == 3


async def test_time_limit_stops_taking_tasks(local_dir, tmp_path):
    log = tmp_path / "log"
    async with JobQ.open("local://tl") as q:
        for i in range(4):
            await q.push({"log": str(log), "name": str(i), "seconds": 0.4})
        stats = await Worker(
            q.backend, CallableProcessor(sample_tasks.async_record), policy(time_limit=0.2)
        ).run()
        assert stats.stop_reason == "time limit" and stats.succeeded == 1
        assert (await q.counts()).active == 3


async def test_pull_runs_exactly_one(local_dir):
    async with JobQ.open("local://p") as q:
        await q.push({"x": 1})
        await q.push({"x": 2})
        stats = await Worker(
            q.backend, CallableProcessor(sample_tasks.noop), policy(max_tasks=1)
        ).run()
        assert stats.succeeded == 1 and stats.exit_code == 0
        assert (await q.counts()).active == 1


async def test_async_and_sync_callables(local_dir, tmp_path: Path):
    log = tmp_path / "log"
    async with JobQ.open("local://c") as q:
        await q.push({"log": str(log), "name": "a"})
        await Worker(q.backend, CallableProcessor(sample_tasks.async_record), policy()).run()
        await q.push({"log": str(log), "name": "s"})
        await Worker(q.backend, CallableProcessor(sample_tasks.record), policy()).run()
    assert "end a" in log.read_text() and "end s" in log.read_text()


async def test_a_slot_takes_the_next_task_while_the_last_one_settles(local_dir):
    """One slot; the first task's complete is held at the broker: the second task
    still starts, and the worker waits for the held settle before it stops."""
    async with JobQ.open("local://settle") as q:
        await q.push_many([{"n": 1}, {"n": 2}])
        started: list[int] = []
        release = asyncio.Event()
        second_started = asyncio.Event()
        complete = q.backend.complete
        held: list[str] = []

        async def slow_complete(message):
            if not held:
                held.append(message.message_id)
                await release.wait()
            await complete(message)

        async def run(n: int) -> None:
            started.append(n)
            if len(started) == 2:
                second_started.set()

        q.backend.complete = slow_complete  # type: ignore[method-assign]
        worker = asyncio.ensure_future(
            Worker(q.backend, CallableProcessor(run), policy(slots=1)).run()
        )
        await asyncio.wait_for(second_started.wait(), 10)
        assert held and not worker.done()  # the first settle is still in flight
        release.set()
        stats = await asyncio.wait_for(worker, 10)
        assert stats.succeeded == 2
        assert (await q.counts()).active == 0


async def test_settles_in_flight_are_bounded(local_dir):
    """When the broker stops answering settles, a worker takes at most
    ``max(slots, SETTLES_IN_FLIGHT)`` messages beyond its running tasks, not the
    whole queue."""
    bound = SETTLES_IN_FLIGHT + 1  # settling beyond the slot, plus the (finished) one in it
    async with JobQ.open("local://bounded") as q:
        await q.push_many([{"n": n} for n in range(bound + 30)])
        release = asyncio.Event()
        complete = q.backend.complete
        calls: list[str] = []
        all_held = asyncio.Event()

        async def stuck_complete(message):
            calls.append(message.message_id)
            if len(calls) == bound:
                all_held.set()
            await release.wait()
            await complete(message)

        ran: list[int] = []

        async def run(n: int) -> None:
            ran.append(n)

        q.backend.complete = stuck_complete  # type: ignore[method-assign]
        worker = asyncio.ensure_future(
            Worker(q.backend, CallableProcessor(run), policy(slots=1)).run()
        )
        await asyncio.wait_for(all_held.wait(), 10)
        for _ in range(20):  # let the loop run: nothing more may start
            await asyncio.sleep(0)
        assert len(ran) == bound
        release.set()
        stats = await asyncio.wait_for(worker, 10)
        assert stats.succeeded == bound + 30


async def test_with_an_idle_timeout_no_receive_waits_longer_than_it(local_dir):
    """Receives issued while the last task runs, and while only its settle is in
    flight, wait at most the idle timeout: a full receive wait there kept polling
    an empty queue after the task ended, so ``--idle-timeout 0.1s`` overshot by
    about a second on Storage Queue."""
    async with JobQ.open("local://idle-tail") as q:
        await q.push_many([{"n": 1}])
        phase = {"name": "before"}
        seen = {"running": asyncio.Event(), "settling": asyncio.Event()}
        complete, receive = q.backend.complete, q.backend.receive
        waits: dict[str, list[float]] = {"running": [], "settling": []}

        async def run(n: int) -> None:
            phase["name"] = "running"
            await seen["running"].wait()

        async def held_complete(message):
            phase["name"] = "settling"
            await seen["settling"].wait()
            await complete(message)

        async def recording_receive(max_count, max_wait, **kwargs):
            if phase["name"] in waits:
                waits[phase["name"]].append(max_wait)
                seen[phase["name"]].set()  # the phase ends while this receive waits
            return await receive(max_count, max_wait, **kwargs)

        q.backend.complete = held_complete  # type: ignore[method-assign]
        q.backend.receive = recording_receive  # type: ignore[method-assign]
        idle = 0.3
        stats = await asyncio.wait_for(
            Worker(q.backend, CallableProcessor(run), policy(slots=2, idle_timeout=idle)).run(), 10
        )
        assert stats.succeeded == 1 and stats.stop_reason == "idle timeout"
        assert waits["running"] and max(waits["running"]) <= idle
        assert waits["settling"] and max(waits["settling"]) <= idle
