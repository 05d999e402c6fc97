"""The Service Bus backend against the emulator, through the official SDK."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta

import pytest
import servicebus_support as support
from servicebus_support import (
    create_queue,
    jobq_sb,
    queue_properties,
    runtime_counts,
    spec,
)

from ai4s_jobq import JobQ
from ai4s_jobq.backends.base import (
    LockLostError,
    MessageTooLargeError,
    OutgoingMessage,
    QueueSettings,
)
from ai4s_jobq.backends.servicebus.admin import ServiceBusSettingsError
from ai4s_jobq.backends.servicebus.backend import ServiceBusBackend
from ai4s_jobq.jobq import requeue_message_id

sb_process, sb_cs, sb_queue = support.sb_process, support.sb_cs, support.sb_queue


async def test_created_queue_has_dedup_with_requested_window(sb_cs, sb_queue):
    async with JobQ.open(
        spec(sb_queue),
        connection_string=sb_cs,
        dedup_window="2h",
        lock_duration=timedelta(seconds=45),
    ) as q:
        assert q.backend.kind == "servicebus"
    props = await queue_properties(sb_cs, sb_queue)
    assert props.requires_duplicate_detection is True
    assert props.duplicate_detection_history_time_window == timedelta(hours=2)
    assert props.lock_duration == timedelta(seconds=45)
    assert props.max_delivery_count == QueueSettings.max_delivery_count


async def test_default_window_is_seven_days_and_existing_queue_is_left_alone(sb_cs, sb_queue):
    async with JobQ.open(spec(sb_queue), connection_string=sb_cs):
        pass
    async with JobQ.open(spec(sb_queue), connection_string=sb_cs, dedup_window="1h"):
        pass  # exists: not altered
    props = await queue_properties(sb_cs, sb_queue)
    assert props.duplicate_detection_history_time_window == timedelta(days=7)


@pytest.mark.parametrize(
    "window", [timedelta(seconds=19), timedelta(days=7, seconds=1), timedelta(days=30)]
)
async def test_window_outside_azure_limits_is_an_error_before_any_call(window):
    # An endpoint nobody listens on: a network call would fail differently (and slowly).
    cs = "Endpoint=sb://127.0.0.1:9;SharedAccessKeyName=k;SharedAccessKey=secretkey"
    backend = ServiceBusBackend.from_spec(None, "q", cs)
    await backend.open()
    try:
        started = time.monotonic()
        with pytest.raises(ServiceBusSettingsError, match="20s to 7d"):
            await backend.ensure_queue(QueueSettings(dedup_window=window))
        assert time.monotonic() - started < 1
    finally:
        await backend.close()


def test_cli_rejects_dedup_window_outside_limits(sb_cs, sb_queue):
    result = jobq_sb(sb_cs, sb_queue, "push", "--dedup-window", "30d", "-c", "echo hi")
    assert result.returncode != 0
    assert "outside what Azure Service Bus accepts" in result.stderr
    assert "Traceback" not in result.stderr
    assert "SharedAccessKey=" not in result.stderr
    assert asyncio.run(_exists(sb_cs, sb_queue)) is False


async def _exists(cs, name):
    from servicebus_support import admin

    async with admin(cs) as client:
        return name in [p.name async for p in client.list_queues()]


async def test_same_task_twice_is_one_message(sb_cs, sb_queue):
    async with JobQ.open(spec(sb_queue), connection_string=sb_cs) as q:
        first = await q.push({"x": 1})
        second = await q.push({"x": 1})
        assert first.id == second.id
        assert first.duplicate is None  # Service Bus does not tell the sender
        summary = await q.push_many([{"x": 1}, {"x": 2}, {"x": 2}])
        assert summary.unknown == 3 and not summary.failures
        assert (await q.counts()).active == 2
        assert sorted(t.task.args["x"] for t in await q.peek(10)) == [1, 2]


async def test_random_ids_push_twice(sb_cs, sb_queue, monkeypatch):
    monkeypatch.setenv("JOBQ_DETERMINISTIC_IDS", "false")
    async with JobQ.open(spec(sb_queue), connection_string=sb_cs) as q:
        a = await q.push({"x": 1})
        b = await q.push({"x": 1})
        assert a.id != b.id
        assert (await q.counts()).active == 2


async def test_push_many_fills_batches_and_isolates_an_oversize_task(sb_cs, sb_queue):
    async with JobQ.open(spec(sb_queue), connection_string=sb_cs) as q:
        tasks = [{"i": i, "pad": "p" * 300} for i in range(3000)]  # several 256 KB batches
        tasks.insert(1500, {"huge": "h" * 400_000})
        results = {}
        summary = await q.push_many(tasks, on_result=lambda i, tid, r: results.__setitem__(i, r))
        assert len(summary.failures) == 1
        failure = summary.failures[0]
        assert failure.index == 1500
        assert failure.id and failure.id in failure.error and "bytes" in failure.error
        assert (await q.counts()).active == 3000
        with pytest.raises(MessageTooLargeError) as info:
            await q.push({"huge": "h" * 400_000})
        assert info.value.message_id in str(info.value)


async def test_receive_renew_abandon_dead_letter_and_delivery_count(sb_cs, sb_queue):
    async with JobQ.open(spec(sb_queue), connection_string=sb_cs) as q:
        await q.push_many([{"n": n} for n in range(3)])
        backend = q.backend
        got = []
        while len(got) < 3:
            got += await backend.receive(3 - len(got), 2.0)
        assert all(m.delivery_count == 1 for m in got)
        assert all(m.sequence_number is not None for m in got)
        first = got[0]
        assert 250 < first.locked_until - time.time() <= 301
        before = first.locked_until
        await backend.renew(first)
        assert first.locked_until >= before
        await backend.complete(first)
        with pytest.raises(LockLostError):
            await backend.complete(first)
        await backend.abandon(got[1])
        await backend.dead_letter(got[2], "Reason", "the description")
        again = await backend.receive(1, 5.0)
        assert [m.message_id for m in again] == [got[1].message_id]
        assert again[0].delivery_count == 2
        await backend.complete(again[0])
        dead = await backend.receive(1, 5.0, dead_letter=True)
        assert dead[0].message_id == got[2].message_id
        assert (dead[0].dead_letter_reason, dead[0].dead_letter_description) == (
            "Reason",
            "the description",
        )
        await backend.abandon(dead[0])
        counts = await q.counts()
        assert (counts.active, counts.dead_letter, counts.scheduled) == (0, 1, 0)


async def test_peek_is_non_destructive_and_clear_empties(sb_cs, sb_queue):
    async with JobQ.open(spec(sb_queue), connection_string=sb_cs) as q:
        await q.push_many([{"n": n} for n in range(25)])
        first = await q.peek(20)
        assert [t.task.args["n"] for t in first] == list(range(20))
        assert all(t.delivery_count == 0 for t in first)
        assert len(await q.peek(100)) == 25
        assert (await q.counts()).active == 25
        assert await q.clear() == 25
        assert (await q.counts()).active == 0


async def test_dlq_list_requeue_purge(sb_cs, sb_queue):
    async with JobQ.open(spec(sb_queue), connection_string=sb_cs) as q:
        await q.push_many([{"n": n} for n in range(4)])
        received = []
        while len(received) < 4:
            received += await q.backend.receive(4 - len(received), 2.0)
        for m in received:
            await q.backend.dead_letter(m, "Boom", f"failed {m.message_id}")
        listed = await q.dlq_list()
        assert len(listed) == 4 and {t.reason for t in listed} == {"Boom"}
        by_n = {t.task.args["n"]: t for t in listed}
        target = by_n[0]
        assert await q.dlq_requeue([target.task.id]) == 1
        counts = await q.counts()
        assert (counts.active, counts.dead_letter) == (1, 3)
        (requeued,) = await q.peek(5)
        # A fresh MessageId, so duplicate detection does not drop the requeued task.
        assert requeued.message_id != target.task.id
        assert requeued.task.id == target.task.id
        assert requeued.message_id == requeue_message_id(
            target.task.id, f"seq:{target_seq(received, target)}"
        )
        assert await q.dlq_purge() == 3
        counts = await q.counts()
        assert (counts.active, counts.dead_letter) == (1, 0)


def target_seq(received, task):
    (message,) = [m for m in received if m.message_id == task.message_id]
    return message.sequence_number


def test_cli_size_peek_and_dlq_on_servicebus(sb_cs, sb_queue):
    push = jobq_sb(sb_cs, sb_queue, "push", "-c", "echo a", "-c", "echo b", "-c", "echo a")
    assert push.returncode == 0, push.stderr
    size = jobq_sb(sb_cs, sb_queue, "size", "--json")
    assert json.loads(size.stdout) == {"active": 2, "dead_letter": 0, "scheduled": 0}
    peek = jobq_sb(sb_cs, sb_queue, "peek", "--json")
    assert peek.returncode == 0 and "echo a" in peek.stdout and "echo b" in peek.stdout
    listed = jobq_sb(sb_cs, sb_queue, "dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    purge = jobq_sb(sb_cs, sb_queue, "dlq", "purge", "--yes")
    assert purge.returncode == 0 and "purged 0" in purge.stdout


async def test_queue_created_without_rights_or_with_wrong_key_does_not_crash_check(sb_cs, sb_queue):
    await create_queue(sb_cs, sb_queue, requires_duplicate_detection=True)
    wrong = sb_cs.replace("SharedAccessKey=", "SharedAccessKey=x")
    backend = ServiceBusBackend.from_spec(None, sb_queue, wrong)
    await backend.open()
    try:
        await backend.ensure_queue(QueueSettings())  # refused: logged, not raised
        info = await backend.dedup_info()
        assert info.duplicate_detection is None and info.note
        assert "x" + sb_cs.split("SharedAccessKey=")[1].split(";")[0] not in (info.note or "")
        (outcome,) = await backend.push([OutgoingMessage("m1", b"{}")])
        assert outcome.error is not None and "refused" in str(outcome.error)
        assert "SharedAccessKey=" not in str(outcome.error)
    finally:
        await backend.close()
    assert (await runtime_counts(sb_cs, sb_queue)) == (0, 0)
