"""The push API (sync and async) against the real local backend."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

import ai4s_jobq
from ai4s_jobq import JobQ
from ai4s_jobq.backends.base import MessageTooLargeError
from ai4s_jobq.task import Task


def test_push_reports_duplicates(local_dir):
    first = ai4s_jobq.push("echo hi", queue="local://t")
    second = ai4s_jobq.push("echo hi", queue="local://t")
    third = ai4s_jobq.push({"cmd": "echo hi", "env": {"A": "1"}}, queue="local://t")
    assert first.id == second.id != third.id
    assert (first.duplicate, second.duplicate, third.duplicate) == (False, True, False)


def test_default_queue_is_local_default(local_dir):
    ai4s_jobq.push("echo default")
    assert (local_dir / "default.sqlite3").exists()


def test_random_ids_push_twice(local_dir, monkeypatch):
    monkeypatch.setenv("JOBQ_DETERMINISTIC_IDS", "no")
    a = ai4s_jobq.push("echo hi", queue="local://t")
    b = ai4s_jobq.push("echo hi", queue="local://t")
    assert a.id != b.id and not a.duplicate and not b.duplicate


def test_explicit_id_and_dedup_keys(local_dir):
    assert not ai4s_jobq.push({"x": 1}, id="job-1", queue="local://t").duplicate
    assert ai4s_jobq.push({"x": 2}, id="job-1", queue="local://t").duplicate
    a = ai4s_jobq.push({"url": "u", "note": 1}, dedup_keys=["url"], queue="local://t")
    b = ai4s_jobq.push({"url": "u", "note": 2}, dedup_keys=["url"], queue="local://t")
    assert (a.duplicate, b.duplicate) == (False, True)


def test_dedup_window_expiry(local_dir):
    ai4s_jobq.push("echo w", queue="local://w", dedup_window="1s")
    assert ai4s_jobq.push("echo w", queue="local://w").duplicate
    time.sleep(1.1)  # the window itself is what is being tested
    assert ai4s_jobq.push("echo w", queue="local://w").duplicate is False


def test_push_many_streams_and_reports_failures(local_dir):
    produced = []

    def tasks():
        for i in range(2500):
            produced.append(i)
            yield {"i": i % 2000} if i != 7 else {"bad": float("inf")}

    results = []
    summary = ai4s_jobq.push_many(
        tasks(),
        queue="local://many",
        batch_size=100,
        on_result=lambda index, task_id, outcome: results.append(index),
    )
    # {"i": 7} is first pushed at index 2007, so 2000 distinct tasks get in.
    assert summary.pushed == 2000 and summary.duplicates == 499
    assert [(f.index, f.id) for f in summary.failures] == [(7, None)]
    assert "args.bad" in summary.failures[0].error
    assert results == list(range(2500))  # every input reported, in order


def test_push_many_is_lazy(local_dir):
    """Tasks are pulled from the iterable batch by batch, not all up front."""
    pulled = 0

    def tasks():
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield {"i": i}

    seen_when_first_result = []

    def on_result(index, task_id, outcome):
        if index == 0:
            seen_when_first_result.append(pulled)

    ai4s_jobq.push_many(tasks(), queue="local://lazy", batch_size=500, on_result=on_result)
    assert seen_when_first_result[0] <= 1000


async def test_push_many_ends_a_batch_at_the_byte_limit(local_dir):
    """Large tasks make smaller batches: memory is bounded by bytes, not only by count."""
    async with JobQ.open("local://bytes") as q:
        sizes: list[int] = []
        push = q.backend.push

        async def counting_push(messages):  # a spy: the real push still runs
            sizes.append(len(messages))
            return await push(messages)

        q.backend.push = counting_push  # type: ignore[method-assign]
        q.backend.push_batch_bytes = 3_000
        tasks = [{"i": i, "pad": "x" * 1_000} for i in range(10)] + [{"small": i} for i in range(4)]
        summary = await q.push_many(tasks)
        assert summary.pushed == 14
        # three ~1 KB bodies reach 3,000 bytes; the small ones then share one batch
        assert sizes == [3, 3, 3, 5]
        assert (await q.counts()).active == 14


def test_oversize_task_is_a_clear_error_and_others_still_pushed(local_dir):
    summary = ai4s_jobq.push_many(
        [{"x": "a"}, {"x": "y" * 300_000}, {"x": "b"}], queue="local://big"
    )
    assert summary.pushed == 2
    (failure,) = summary.failures
    assert failure.index == 1 and "bytes" in failure.error and failure.id in failure.error
    with pytest.raises(MessageTooLargeError):
        ai4s_jobq.push({"x": "y" * 300_000}, queue="local://big")


async def test_async_client(local_dir):
    async with JobQ.open("local://a") as q:
        result = await q.push({"n": 1}, num_retries=4)
        assert result.duplicate is False
        (peeked,) = await q.peek()
        assert peeked.task == Task(result.id, {"n": 1}, 4)
        assert (await q.counts()).active == 1
        assert await q.clear() == 1


async def test_sync_push_refuses_inside_event_loop(local_dir):
    with pytest.raises(RuntimeError, match="JobQ.open"):
        ai4s_jobq.push("echo x")
    await asyncio.sleep(0)


@pytest.mark.parametrize("batch_size", [-5, True, 2.5])
async def test_push_many_refuses_a_batch_size_that_is_not_a_positive_integer(local_dir, batch_size):
    async with JobQ.open("local://sizes") as q:
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            await q.push_many([{"a": 1}], batch_size=batch_size)
        assert (await q.counts()).active == 0  # refused before anything was sent


@pytest.mark.parametrize("max_count", [0, -1, True])
async def test_peek_refuses_a_count_that_is_not_positive(local_dir, max_count):
    """SQLite reads LIMIT -1 as no limit: peek(-1) listed the whole queue."""
    async with JobQ.open("local://peeks") as q:
        await q.push_many([{"a": i} for i in range(3)])
        with pytest.raises(ValueError, match="max_count must be a positive integer"):
            await q.peek(max_count)
        assert len(await q.peek(2)) == 2


async def test_one_id_given_as_a_string_is_a_type_error(local_dir):
    """wait(ids="9bfe...") waited on 32 unknown one-character IDs."""
    async with JobQ.open("local://waits") as q:
        pushed = await q.push({"a": 1})
        with pytest.raises(TypeError, match="for one ID, pass"):
            await q.wait(ids=pushed.id, timeout=0)
        assert (await q.wait(ids=[pushed.id], timeout=0)).total == 1
        with pytest.raises(TypeError, match="for one ID, pass"):
            await q.dlq_requeue(pushed.id)  # requeued nothing: no dead letter is 'a'


@pytest.mark.parametrize("timeout", [math.nan, -1.0])
async def test_waits_refuse_a_negative_or_nan_timeout(local_dir, timeout):
    """A nan deadline is never reached: the wait would have blocked for ever."""
    async with JobQ.open("local://waits") as q:
        await q.push({"a": 1})
        with pytest.raises(ValueError, match="timeout must be None or a number"):
            await q.wait(ids=["x"], timeout=timeout)
        with pytest.raises(ValueError, match="timeout must be None or a number"):
            await q.wait_drained(timeout)
        assert await q.wait_drained(0) is False  # 0 still means "look once"


@pytest.mark.parametrize("env", [{"": "x"}, {"A=B": "x"}, {"A\0": "x"}, {"A": "x\0y"}])
def test_push_refuses_an_env_a_process_cannot_have(local_dir, env):
    """Queued, such a task failed every attempt ("illegal environment variable name")."""
    with pytest.raises(ValueError, match="env: "):
        ai4s_jobq.push("true", env=env)
    assert ai4s_jobq.push("true", env={"A": "x"}).duplicate is False


@pytest.mark.parametrize("tasks", ["echo hi", b"echo hi", {"cmd": "echo hi"}])
def test_push_many_of_one_task_is_a_type_error_not_one_task_per_character(local_dir, tasks):
    """push_many("echo hi") pushed seven shell tasks: "e", "c", "h", ..."""
    with pytest.raises(TypeError, match="push_many takes an iterable of tasks"):
        ai4s_jobq.push_many(tasks)
    assert ai4s_jobq.push_many(["echo hi"]).pushed == 1
