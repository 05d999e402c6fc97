"""Looking ahead for short sync tasks (``ai4s_jobq/worker/lookahead.py``): a slot
holds more messages than it runs, yet runs one task at a time, reports each task's
true start, and gives back -- unchanged -- what it holds when a long task blocks the
slot or the worker stops.  Real local queues, real worker, real threads."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time

import pytest

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.worker import loop as loop_module
from ai4s_jobq.worker.context import current_task
from ai4s_jobq.worker.hooks import TaskRun, WorkerHook
from ai4s_jobq.worker.processors import CallableProcessor


async def wait_until(predicate, timeout: float = 10.0) -> None:
    """Give the loop turns until ``predicate()`` holds (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


class Starts(WorkerHook):
    def __init__(self) -> None:
        self.at: dict[str, float] = {}

    def task_started(self, run: TaskRun) -> None:
        self.at[run.task.id] = run.started_at


async def test_one_slot_looks_ahead_yet_runs_one_task_at_a_time_from_its_true_start(local_dir):
    spans: list[tuple[str, float, float]] = []  # task id, entered, left (wall clock)
    inside = [0, 0]  # running now, most at once
    lock = threading.Lock()

    def work(n: int) -> None:
        entered = time.time()
        with lock:
            inside[0] += 1
            inside[1] = max(inside)
        with lock:
            inside[0] -= 1
        context = current_task()
        assert context is not None
        spans.append((context.task_id, entered, time.time()))

    starts = Starts()
    async with JobQ.open("local://ahead") as q:
        await q.push_many({"n": n} for n in range(300))
        worker = Worker(
            q.backend,
            CallableProcessor(work),
            WorkerPolicy(slots=1, idle_timeout=0.3),
            hooks=[starts],
        )
        stats = await worker.run()
    assert stats.succeeded == 300
    lane = worker._look_ahead.lane
    assert lane is not None and lane.waited > 0  # messages did wait in the slot's lane
    assert inside[1] == 1
    spans.sort(key=lambda span: span[1])
    for (_, _, previous_left), (task_id, entered, _) in zip(spans, spans[1:]):
        # Reported as started when its thread began it: after the previous task
        # ended, not when its message arrived.
        assert previous_left <= starts.at[task_id] <= entered


class LongAfterShort:
    """A queue of 30 short tasks, then ``long`` (blocks until ``release``), then
    ``a0``-``a2``, which a one-slot worker looks ahead for and holds behind ``long``.
    ``ran[name]`` records who ran each task and with which counters."""

    def __init__(self) -> None:
        self.ran: dict[str, list[tuple[str, int, int]]] = {}
        self.started, self.release = threading.Event(), threading.Event()

    async def push(self, q: JobQ) -> None:
        await q.push_many([{"name": f"s{i}"} for i in range(30)])
        await q.push({"name": "long", "block": True})
        await q.push_many([{"name": f"a{i}"} for i in range(3)])

    def work(self, name: str, block: bool = False) -> None:
        self.record("A", name)
        if block:
            self.started.set()
            self.release.wait(10)

    def record(self, who: str, name: str) -> None:
        context = current_task()
        assert context is not None
        self.ran.setdefault(name, []).append((who, context.attempt, context.interruptions))

    def worker(self, q: JobQ, grace_period: float = 30.0) -> Worker:
        return Worker(
            q.backend,
            CallableProcessor(self.work),
            WorkerPolicy(slots=1, idle_timeout=0.3, grace_period=grace_period),
        )


async def test_a_message_behind_a_long_task_goes_back_unchanged_to_another_worker(
    local_dir, monkeypatch, caplog
):
    monkeypatch.setattr(loop_module, "WAIT_LIMIT_SECONDS", 0.2)
    caplog.set_level(logging.DEBUG, logger="ai4s_jobq.worker")
    tasks = LongAfterShort()

    async def on_b(name: str, block: bool = False) -> None:
        tasks.record("B", name)

    def put_back() -> int:
        return sum("never started here" in r.getMessage() for r in caplog.records)

    async with JobQ.open("local://hostage") as q:
        await tasks.push(q)
        running_a = asyncio.ensure_future(tasks.worker(q).run())
        try:
            await wait_until(tasks.started.is_set)
            await wait_until(lambda: put_back() == 3)  # the three held behind "long"
            async with JobQ.open("local://hostage") as other_node:
                stats_b = await Worker(
                    other_node.backend,
                    CallableProcessor(on_b),
                    WorkerPolicy(slots=1, idle_timeout=0.3),
                ).run()
        finally:
            tasks.release.set()
        stats_a = await running_a
    assert stats_b.succeeded == 3
    assert stats_a.succeeded == 31 and stats_a.interrupted == 0
    for name in ("a0", "a1", "a2"):
        assert tasks.ran[name] == [("B", 1, 0)]  # once, elsewhere, no attempt or interruption
    assert tasks.ran["long"] == [("A", 1, 0)]


async def test_stopping_gives_back_what_waits_and_interrupts_only_what_runs(local_dir, monkeypatch):
    monkeypatch.setattr(loop_module, "WAIT_LIMIT_SECONDS", 60.0)
    tasks = LongAfterShort()
    async with JobQ.open("local://stopping") as q:
        await tasks.push(q)
        worker = tasks.worker(q, grace_period=60)
        running = asyncio.ensure_future(worker.run())
        await wait_until(tasks.started.is_set)
        lane = worker._look_ahead.lane
        assert lane is not None
        await wait_until(lambda: len(lane.waiting) == 3)
        worker._on_signal(signal.SIGTERM)  # as the signal handler does
        await wait_until(lambda: len(lane.waiting) == 0)
        tasks.release.set()  # "long" ends within its grace period
        stats = await running
        assert stats.succeeded == 31
        assert stats.interrupted == 0
        assert (await q.counts()).active == 3
        again = await tasks.worker(q).run()
    assert again.succeeded == 3
    for name in ("a0", "a1", "a2"):
        assert tasks.ran[name] == [("A", 1, 0)]  # ran once, after the restart, counters unchanged


@pytest.mark.parametrize("limit", [None, 1000])
async def test_failures_among_looked_ahead_tasks_neither_stall_nor_stop_the_lane(local_dir, limit):
    """Every third task fails.  With ``--max-consecutive-failures`` set the lane holds
    after each failure until the worker has counted it, then goes on."""

    def work(n: int) -> None:
        if n % 3 == 0:
            raise ValueError(n)

    async with JobQ.open("local://failing") as q:
        await q.push_many(({"n": n} for n in range(120)), num_retries=0)
        worker = Worker(
            q.backend,
            CallableProcessor(work),
            WorkerPolicy(slots=2, idle_timeout=0.3, max_consecutive_failures=limit),
        )
        stats = await worker.run()
    assert (stats.succeeded, stats.dead_lettered) == (80, 40)
    lane = worker._look_ahead.lane
    assert lane is not None and lane.waited > 0 and not lane.held


async def test_with_telemetry_on_a_slot_still_looks_ahead_and_each_task_sees_its_span(local_dir):
    """The telemetry hook makes the span current in ``task_entered`` (in the task's own
    context, before the call waits in the lane), so it no longer turns look-ahead off
    (a one-slot drain of no-op sync tasks ran at 44% with OTLP on); the span still
    starts when the thread begins the call.  The SDK's in-memory exporter records."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ai4s_jobq.telemetry.task_span import TaskTracerProvider
    from ai4s_jobq.telemetry.worker_hook import TelemetryHook

    memory = InMemorySpanExporter()
    provider = TaskTracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    seen: dict[str, tuple[int, int, int]] = {}  # task id: current span id, entered, left (ns)

    def work(n: int) -> None:
        entered = time.time_ns()
        span_id = trace.get_current_span().get_span_context().span_id
        context = current_task()
        assert context is not None
        seen[context.task_id] = (span_id, entered, time.time_ns())

    async with JobQ.open("local://ahead-telemetry") as q:
        await q.push_many({"n": n} for n in range(200))
        worker = Worker(
            q.backend,
            CallableProcessor(work),
            WorkerPolicy(slots=1, idle_timeout=0.3),
            hooks=[TelemetryHook(depth_interval=0, tracer_provider=provider)],
        )
        stats = await worker.run()
    provider.shutdown()
    assert stats.succeeded == 200
    lane = worker._look_ahead.lane
    assert lane is not None and lane.waited > 0  # looked ahead, telemetry on
    spans = {s.attributes["jobq.task.id"]: s for s in memory.get_finished_spans()}
    assert set(spans) == set(seen)
    in_order = sorted(seen.items(), key=lambda item: item[1][1])
    for (_, (_, _, previous_left)), (task_id, (span_id, entered, _)) in zip(in_order, in_order[1:]):
        span = spans[task_id]
        assert span.context.span_id == span_id  # current for the task's own code
        # Started when its thread began the call, not when it was looked ahead for.
        assert previous_left <= span.start_time <= entered
