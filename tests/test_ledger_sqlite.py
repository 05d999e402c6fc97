"""The local ledger (tables in the queue's SQLite file): pushes and tags, the worker
hook, forward-only state, results and summaries, wait, prune — all on real SQLite."""

from __future__ import annotations

import asyncio
import time

import sample_tasks

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.ledger.base import MAX_RESULT_BYTES, TaskState
from ai4s_jobq.ledger.push import SkippedOutcome
from ai4s_jobq.ledger.recorder import LedgerRecorder
from ai4s_jobq.worker.processors import CallableProcessor


def policy(**kwargs) -> WorkerPolicy:
    return WorkerPolicy(**{"idle_timeout": 0.3, **kwargs})


def big_result(size: int = MAX_RESULT_BYTES + 10) -> str:
    return "x" * size


def returns(value: object = None, **_: object) -> object:
    return value


async def sleep_then_return(seconds: float, name: str) -> str:
    await asyncio.sleep(seconds)
    return name


async def drain(q: JobQ, function, **policy_options) -> None:
    processor = CallableProcessor(function)
    recorder = LedgerRecorder(q.ledger, flush_interval=0.05)
    await Worker(q.backend, processor, policy(**policy_options), hooks=[recorder]).run()


async def test_push_records_queued_and_tags_include_duplicates(local_dir):
    async with JobQ.open("local://tags") as q:
        first = await q.push_many([{"n": i} for i in range(3)], tag="run-1")
        assert first.pushed == 3
        # run-2 repeats two tasks of run-1 (duplicates) and adds one
        second = await q.push_many([{"n": 1}, {"n": 2}, {"n": 3}], tag="run-2")
        assert (second.pushed, second.duplicates) == (1, 2)
        run2 = [r async for r in q.ledger.iter_tag("run-2")]
        assert len(run2) == 3 and {r.state for r in run2} == {TaskState.QUEUED}
        status = await q.status("run-2")
        assert status.total == 3 and status.counts == {"queued": 3}
        assert await q.ledger.tags() == ["run-2", "run-1"]
        shared = q.make_task({"n": 1}).id
        assert (await q.result(shared)).tags == ["run-1", "run-2"]
        await drain(q, returns)
        summary = await q.status("run-2")
        assert summary.counts == {"succeeded": 3} and summary.remaining == 0


async def test_worker_records_results_and_error_summaries(local_dir):
    def task(kind: str) -> object:
        if kind == "ok":
            return {"answer": 42}
        if kind == "big":
            return big_result()
        if kind == "odd":
            return object()
        raise ValueError(f"bad input {kind!r}: the real cause")

    async with JobQ.open("local://results") as q:
        ids = {}
        for kind in ("ok", "big", "odd", "boom"):
            ids[kind] = (await q.push({"kind": kind}, num_retries=1)).id
        await drain(q, task)
        records = await q.ledger.get(list(ids.values()))
    ok = records[ids["ok"]]
    assert ok.state is TaskState.SUCCEEDED and ok.result == {"answer": 42}
    assert ok.attempt == 1 and ok.duration is not None and ok.worker_id and ok.host
    assert ok.pushed_at <= ok.started_at <= ok.finished_at
    big = records[ids["big"]]
    assert big.state is TaskState.SUCCEEDED and big.result is None
    assert "too large" in big.result_note
    odd = records[ids["odd"]]
    assert odd.state is TaskState.SUCCEEDED and "not JSON-serialisable" in odd.result_note
    boom = records[ids["boom"]]
    assert boom.state is TaskState.DEAD_LETTERED and boom.attempt == 2
    assert boom.reason == "ValueError"
    assert "the real cause" in boom.summary
    assert "Traceback (most recent call last)" not in boom.summary


async def test_result_just_under_the_limit_round_trips(local_dir):
    value = big_result(MAX_RESULT_BYTES - 2)  # JSON adds the two quotes
    async with JobQ.open("local://limit") as q:
        pushed = await q.push({"value": value})
        await drain(q, returns)
        record = await q.result(pushed.id)
    assert record.result == value and record.result_note is None


async def test_two_recorders_racing_on_one_task(local_dir):
    """Worker A lost its lock on attempt 1 and reports late; worker B ran attempt 2 to
    success.  Whatever order their flushes commit in, the record ends succeeded."""
    async with JobQ.open("local://race") as q:
        task_id = (await q.push({"n": 1})).id
        stale = LedgerRecorder(q.ledger, flush_interval=3600)
        fresh = LedgerRecorder(q.ledger, flush_interval=3600)
        from ai4s_jobq.worker.hooks import TaskOutcome, TaskRun, WorkerIdentity

        task = q.make_task({"n": 1})
        await stale.start(WorkerIdentity(worker_id="stale"))
        await fresh.start(WorkerIdentity(worker_id="fresh"))
        stale.task_started(TaskRun(task, None, 1))  # type: ignore[arg-type]
        fresh.task_started(TaskRun(task, None, 2))  # type: ignore[arg-type]
        fresh.task_finished(TaskRun(task, None, 2), TaskOutcome("succeeded", 0.1, result=7))  # type: ignore[arg-type]
        stale.task_finished(TaskRun(task, None, 1), TaskOutcome("failed", 0.2, reason="Late"))  # type: ignore[arg-type]
        # both flush concurrently, repeatedly
        await asyncio.gather(fresh._flush(), stale._flush())
        stale.task_started(TaskRun(task, None, 2))  # type: ignore[arg-type]
        await stale._flush()
        record = await q.result(task_id)
        assert record.state is TaskState.SUCCEEDED and record.result == 7
        assert record.worker_id == "fresh"
        await asyncio.gather(stale.stop(WorkerIdentity(), None), fresh.stop(WorkerIdentity(), None))


async def test_two_real_workers_drain_one_queue_with_consistent_records(local_dir):
    async with JobQ.open("local://two") as q:
        await q.push_many([{"value": i} for i in range(200)], tag="two")
        await asyncio.gather(drain(q, returns, slots=4), drain(q, returns, slots=4))
        summary = await q.status("two")
        records = [r async for r in q.ledger.iter_tag("two", page_size=64)]
    assert summary.counts == {"succeeded": 200}
    assert len(records) == 200 and all(r.attempt == 1 for r in records)
    assert sorted(r.result for r in records) == list(range(200))
    assert len({r.worker_id for r in records}) == 2


async def test_wait_returns_when_the_last_task_finishes(local_dir):
    async with JobQ.open("local://wait") as q:
        ids = [(await q.push({"seconds": s, "name": str(s)})).id for s in (0.1, 0.4)]
        worker = asyncio.ensure_future(drain(q, sleep_then_return, slots=2))
        report = await q.wait(ids=ids, timeout=30)
        finished = max(r.finished_at for r in report.records.values())
        await worker
    assert report.exit_code == 0 and report.succeeded == 2
    assert time.time() - finished < 5  # returned at the end, not at the timeout


async def test_wait_exit_codes_dead_lettered_timeout_unknown(local_dir):
    async with JobQ.open("local://codes") as q:
        bad = (await q.push({"message": "no"}, num_retries=0)).id
        slow = (await q.push({"seconds": 30, "name": "slow"})).id
        await drain(q, sample_tasks.fail, max_tasks=1)
        failed = await q.wait(ids=[bad], timeout=10)
        assert failed.exit_code == 1 and failed.dead_lettered_ids == [bad]
        timed_out = await q.wait(ids=[slow], timeout=0.2)
        assert timed_out.exit_code == 124 and timed_out.remaining == 1
        unknown = await q.wait(ids=["0" * 32], timeout=10)
        assert unknown.exit_code == 1 and unknown.unknown == ["0" * 32]


async def test_skip_succeeded_after_the_dedup_window(local_dir):
    async with JobQ.open("local://skip", dedup_window="1s") as q:
        first = await q.push_many([{"value": 1}, {"value": 2}])
        assert first.pushed == 2
        await drain(q, returns)
        # the window passes: the broker would accept both again
        await asyncio.sleep(1.1)
        outcomes = []
        again = await q.push_many(
            [{"value": 1}, {"value": 3}],
            skip_succeeded=True,
            on_result=lambda i, task_id, o: outcomes.append(o),
        )
        assert (again.pushed, again.duplicates) == (1, 1)
        assert isinstance(outcomes[0], SkippedOutcome) and "succeeded" in outcomes[0].reason
        assert (await q.counts()).active == 1


async def test_repush_after_the_window_starts_a_new_generation(local_dir):
    async with JobQ.open("local://gen", dedup_window="1s") as q:
        task_id = (await q.push({"message": "x"}, num_retries=0)).id
        await drain(q, sample_tasks.fail)
        assert (await q.result(task_id)).state is TaskState.DEAD_LETTERED
        await asyncio.sleep(1.1)
        assert (await q.push({"message": "x"})).duplicate is False
        record = await q.result(task_id)
        assert (record.state, record.attempt, record.reason) == (TaskState.QUEUED, 0, None)


async def test_requeue_from_the_dead_letter_queue_resets_the_record(local_dir):
    async with JobQ.open("local://requeue") as q:
        task_id = (await q.push({"message": "x"}, num_retries=0)).id
        await drain(q, sample_tasks.fail)
        assert await q.dlq_requeue() == 1
        assert (await q.result(task_id)).state is TaskState.QUEUED
        await drain(q, returns)
        assert (await q.result(task_id)).state is TaskState.SUCCEEDED


async def test_a_task_whose_worker_died_too_often_ends_dead_lettered(local_dir):
    """The killed worker's record says running; its lost delivery counts as an
    interruption, and past ``max_interruptions`` the loop dead-letters the task without
    running it: the record follows (it does not stay running)."""
    from ai4s_jobq.ledger.events import AttemptEvent

    async with JobQ.open("local://died") as q:
        task_id = (await q.push({"value": 1}, num_retries=0)).id
        (message,) = await q.backend.receive(1, 1.0)
        await q.ledger.record_attempts([AttemptEvent(task_id, "running", 1, time.time())])
        await q.backend.abandon(message)  # as if its lock had expired
        await drain(q, returns, max_interruptions=0)
        record = await q.result(task_id)
    assert (record.state, record.reason) == (TaskState.DEAD_LETTERED, "TooManyInterruptions")
    assert "interrupted 1 times" in record.summary
