"""The store contract, run against both real stores: SQLite (a local queue's file) and
an Azure Table (Azurite).  Forward-only state, generations, tags, results, heartbeats,
reads and prune must behave the same on both."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest

from ai4s_jobq.ledger.base import MAX_RESULT_BYTES, LedgerStore, TaskState, WorkerRecord
from ai4s_jobq.ledger.events import AttemptEvent, PushEntry, encode_result
from ai4s_jobq.ledger.sqlite_store import SqliteLedger
from ai4s_jobq.ledger.table_store import TableLedger


@pytest.fixture(params=["sqlite", "table"])
async def store(request, tmp_path) -> AsyncIterator[LedgerStore]:
    if request.param == "sqlite":

        def make() -> LedgerStore:
            return SqliteLedger(tmp_path / "q.sqlite3")

    else:
        azurite = request.getfixturevalue("azurite")
        table = f"t{uuid.uuid4().hex[:16]}"

        def make() -> LedgerStore:
            return TableLedger.for_account(
                None, table, scope="q", connection_string=azurite.connection_string
            )

    ledger = make()
    ledger.another = make  # type: ignore[attr-defined] - a second writer on the same ledger
    async with ledger:
        yield ledger


async def state_of(store: LedgerStore, task_id: str):
    return (await store.get([task_id]))[task_id]


@pytest.mark.parametrize(
    "late",
    [
        AttemptEvent("t", "running", 2, 0.0),  # the same attempt's start, delivered late
        AttemptEvent("t", "failed", 1, 0.0, reason="X"),  # an earlier attempt's end
        AttemptEvent("t", "running", 1, 0.0),  # a worker that lost its lock long ago
    ],
)
async def test_a_late_write_cannot_move_a_final_record_backwards(store, late):
    await store.record_pushes([PushEntry("t", False)])
    await store.record_attempts([AttemptEvent("t", "running", 2, 1.0)])
    await store.record_attempts([AttemptEvent("t", "succeeded", 2, 2.0, duration=1.0)])
    await store.record_attempts([late])
    record = await state_of(store, "t")
    assert (record.state, record.attempt, record.duration) == (TaskState.SUCCEEDED, 2, 1.0)


async def test_an_end_before_its_start_and_interruptions(store):
    await store.record_attempts([AttemptEvent("t", "failed", 1, 2.0, reason="Boom")])
    await store.record_attempts([AttemptEvent("t", "running", 1, 1.0)])
    assert (await state_of(store, "t")).state is TaskState.FAILED
    await store.record_attempts([AttemptEvent("t", "running", 2, 3.0)])
    assert (await state_of(store, "t")).state is TaskState.RUNNING
    # interrupted, then the same attempt runs again (an interruption is not a failure)
    await store.record_attempts([AttemptEvent("t", "interrupted", 2, 4.0)])
    await store.record_attempts([AttemptEvent("t", "running", 2, 5.0)])
    record = await state_of(store, "t")
    assert (record.state, record.attempt, record.interruptions) == (TaskState.RUNNING, 2, 1)


async def test_push_generations_and_tags(store):
    await store.record_pushes([PushEntry("a", False), PushEntry("b", False)], tag="run-1")
    await store.record_attempts([AttemptEvent("a", "succeeded", 1, 1.0, duration=0.5)])
    # run-2: "a" again as a duplicate (keeps its state), "c" new
    await store.record_pushes([PushEntry("a", True), PushEntry("c", False)], tag="run-2")
    run2 = {r.id: r.state for r in [r async for r in store.iter_tag("run-2")]}
    assert run2 == {"a": TaskState.SUCCEEDED, "c": TaskState.QUEUED}
    status = await store.status("run-2")
    assert status.counts == {"succeeded": 1, "queued": 1} and status.remaining == 1
    assert (await store.status()).total == 3
    assert await store.tags() == ["run-2", "run-1"]
    # "a" pushed as new again (after the window): a new generation
    await store.record_pushes([PushEntry("a", False)])
    record = await state_of(store, "a")
    assert (record.state, record.attempt, record.duration) == (TaskState.QUEUED, 0, None)
    assert sorted(await store.tags_of("a")) == ["run-1", "run-2"]
    # a push the backend cannot classify never resets a final record
    await store.record_attempts([AttemptEvent("b", "dead_lettered", 3, 1.0, reason="E")])
    await store.record_pushes([PushEntry("b", None)])
    assert (await state_of(store, "b")).state is TaskState.DEAD_LETTERED
    assert await store.succeeded_among(["a", "b", "c", "zz"]) == set()


async def test_results_and_reads(store):
    value = {"text": "é" * 12_000 + "a" * 5000, "n": [1, 2, 3]}  # > one Table property
    text, note = encode_result(value)
    assert note is None
    events = [
        AttemptEvent("ok", "succeeded", 1, time.time(), duration=2.0, result_json=text),
        AttemptEvent("bad", "dead_lettered", 2, time.time(), reason="ValueError", summary="v"),
        AttemptEvent("bad2", "failed", 1, time.time(), reason="ValueError", summary="w"),
        AttemptEvent("exit", "dead_lettered", 1, time.time(), reason="NonZeroExit", exit_code=3),
    ]
    await store.record_attempts(events)
    assert (await state_of(store, "ok")).result == value
    assert await store.succeeded_among(["ok", "bad"]) == {"ok"}
    groups = await store.failures()
    assert [(g.reason, g.count) for g in groups] == [("ValueError", 2), ("NonZeroExit", 1)]
    assert await store.durations() == [2.0]
    dead = await store.tasks(state=TaskState.DEAD_LETTERED)
    assert {r.id for r in dead} == {"bad", "exit"}
    assert (await state_of(store, "exit")).exit_code == 3
    too_big, note = encode_result("x" * MAX_RESULT_BYTES)
    assert too_big is None and "too large" in note


async def test_heartbeats_and_stale_workers(store):
    now = time.time()
    alive = WorkerRecord("w1", "h", 1, 4, "q", now - 60, now, running=["t1"], tasks_done=3)
    gone = WorkerRecord("w2", "h", 2, 1, "q", now - 120, now - 100)
    stopped = WorkerRecord("w3", "h", 3, 1, "q", now - 120, now - 100, stopped=True)
    for worker in (alive, gone, stopped):
        await store.heartbeat(worker)
    workers = {w.worker_id: w for w in await store.workers()}
    assert workers["w1"].running == ["t1"] and workers["w1"].tasks_done == 3
    assert [w for w in workers if workers[w].is_stale(now)] == ["w2"]
    assert workers["w3"].stopped
    assert [w.worker_id for w in await store.workers(include_stopped_seconds=50)] == ["w1"]


async def test_prune(store):
    now = [1_000_000.0]
    store.clock = lambda: now[0]  # type: ignore[attr-defined]
    await store.record_pushes([PushEntry("old", False)], tag="a")
    await store.record_attempts([AttemptEvent("old", "dead_lettered", 1, now[0], reason="X")])
    now[0] += 40 * 86400
    await store.record_pushes([PushEntry("new", False)], tag="b")
    assert await store.prune(30 * 86400) == 1
    assert set(await store.get(["old", "new"])) == {"new"}
    assert await store.tags() == ["b"]
    assert [r.id async for r in store.iter_tag("a")] == []


async def test_prune_keeps_what_has_not_finished(store):
    """A task still queued or running past the retention keeps its record and its tag
    membership (a long run's ``jobq wait --tag`` must not see it vanish and call the
    run done); only ``unfinished=True`` (say after ``jobq clear``) deletes those too."""
    now = [1_000_000.0]
    store.clock = lambda: now[0]  # type: ignore[attr-defined]
    ids = ["done", "waiting", "started"]
    await store.record_pushes([PushEntry(i, False) for i in ids], tag="run")
    await store.record_attempts(
        [
            AttemptEvent("done", "running", 1, now[0]),
            AttemptEvent("done", "succeeded", 1, now[0], duration=1.0),
            AttemptEvent("started", "running", 1, now[0]),
        ]
    )
    now[0] += 40 * 86400
    assert await store.prune(30 * 86400) == 1
    assert set(await store.get(ids)) == {"waiting", "started"}
    assert sorted([r.id async for r in store.iter_tag("run")]) == ["started", "waiting"]
    assert await store.tags() == ["run"]
    assert await store.prune(30 * 86400, unfinished=True) == 2
    assert await store.get(ids) == {}
    assert [r.id async for r in store.iter_tag("run")] == []
    assert await store.tags() == []


async def test_workers_prune_old_records_at_most_daily(store, monkeypatch):
    from ai4s_jobq.ledger.recorder import LedgerRecorder
    from ai4s_jobq.worker.hooks import WorkerIdentity

    monkeypatch.setenv("JOBQ_LEDGER_RETENTION", "30d")
    now = [time.time() - 40 * 86400]
    store.clock = lambda: now[0]  # type: ignore[attr-defined]
    await store.record_pushes([PushEntry("old", False)])
    await store.record_attempts([AttemptEvent("old", "succeeded", 1, now[0], duration=1.0)])
    now[0] = time.time()
    await store.mark_pruned(time.time() - 2 * 86400)  # the last prune was two days ago

    async def run_worker_hook() -> None:
        recorder = LedgerRecorder(store, prune_delay=0)
        await recorder.start(WorkerIdentity())
        assert recorder._pruner is not None
        await recorder._pruner
        await recorder.stop(WorkerIdentity(), None)

    await run_worker_hook()
    assert await store.get(["old"]) == {}
    assert time.time() - await store.last_pruned() < 60
    # a second worker the same day does not prune again
    now[0] = time.time() - 40 * 86400
    await store.record_pushes([PushEntry("old2", False)])
    await store.record_attempts([AttemptEvent("old2", "succeeded", 1, now[0], duration=1.0)])
    now[0] = time.time()
    await run_worker_hook()
    assert set(await store.get(["old2"])) == {"old2"}


async def test_two_writers_racing_on_one_task(store):
    """Writer A (a worker that lost its lock) started attempt 1 and reports late;
    writer B ran attempt 2 to success meanwhile.  A's stale write cannot undo B's."""
    other = store.another()
    async with other:
        await store.record_pushes([PushEntry("t", False)])
        await other.record_attempts([AttemptEvent("t", "running", 1, 1.0, worker_id="A")])
        await store.record_attempts([AttemptEvent("t", "running", 2, 2.0, worker_id="B")])
        await store.record_attempts(
            [AttemptEvent("t", "succeeded", 2, 3.0, worker_id="B", duration=1.0)]
        )
        await other.record_attempts([AttemptEvent("t", "failed", 1, 4.0, worker_id="A")])
        await other.record_attempts([AttemptEvent("t", "running", 2, 5.0, worker_id="A")])
        for reader in (store, other):
            record = await state_of(reader, "t")
            assert (record.state, record.worker_id) == (TaskState.SUCCEEDED, "B")
        # a long task's end after its own start (a separate flush) still lands
        await store.record_pushes([PushEntry("u", False)])
        await other.record_attempts([AttemptEvent("u", "running", 1, 1.0)])
        await other.record_attempts([AttemptEvent("u", "interrupted", 1, 2.0)])
        await other.record_attempts([AttemptEvent("u", "running", 1, 3.0)])
        await other.record_attempts([AttemptEvent("u", "dead_lettered", 1, 4.0, reason="E")])
        record = await state_of(store, "u")
        assert (record.state, record.interruptions) == (TaskState.DEAD_LETTERED, 1)


async def test_a_ledger_without_a_prune_marker_gets_one_and_keeps_its_records(store):
    from ai4s_jobq.ledger.recorder import LedgerRecorder
    from ai4s_jobq.worker.hooks import WorkerIdentity

    now = [time.time() - 40 * 86400]
    store.clock = lambda: now[0]  # type: ignore[attr-defined]
    await store.record_pushes([PushEntry("old", False)])
    now[0] = time.time()
    assert await store.last_pruned() is None
    recorder = LedgerRecorder(store, prune_delay=0)
    await recorder.start(WorkerIdentity())
    assert recorder._pruner is not None
    await recorder._pruner
    await recorder.stop(WorkerIdentity(), None)
    assert set(await store.get(["old"])) == {"old"}  # its first prune is a day later
    assert time.time() - await store.last_pruned() < 60
