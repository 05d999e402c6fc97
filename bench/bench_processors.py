"""Benchmark of the processors: draining no-op Python tasks from ``local://``.

Run from the repository root::

    python bench/bench_processors.py           # 8,000 tasks per drain, 9 rounds
    python bench/bench_processors.py --quick   # 1,500 tasks, 2 rounds

What is measured: first the processors alone (median CPU microseconds per call over
alternating rounds, no queue: the steadiest figure on a busy machine), then a worker
draining a freshly filled queue with 8 slots:

1. In-process, the processor ``jobq worker --proc module:function`` builds
   (``CallableProcessor``), against a copy of the processor as it was before the
   lifecycle / GPU / isolation work (``BaselineCallable`` below): goal within 5%.
   Sync and async no-ops.
2. A ``module:Class`` processor (``InstanceProcessor``) against the same baseline.
3. ``--isolation process`` (a pool of 8 forkserver processes; their start-up is not
   timed): goal at least 1,500 tasks/s, and the ratio to in-process.

Rounds run the variants in alternating order (A B C, C B A, ...); a drain ratio is the
median over the rounds of that round's ratio, so load from other processes on the
machine hits both sides alike (the rates printed are each variant's best round).  The
"within 5%" goal is also judged on the call overhead: the extra CPU per call against
the CPU a whole drained task costs, the steadiest figure.  The exit status is always
0; goals are reported as PASS/MISS.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bytecode import ensure_bytecode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # measure this checkout, not an installed copy
sys.path.insert(0, str(REPO / "bench"))  # the pool processes import the no-ops from here

from ai4s_jobq import broker_core as core  # noqa: E402
from ai4s_jobq.backends.base import QueueSettings  # noqa: E402
from ai4s_jobq.backends.local import LocalBackend  # noqa: E402
from ai4s_jobq.task import Task, make_task  # noqa: E402
from ai4s_jobq.worker.build import ProcessorOptions, build_processor  # noqa: E402
from ai4s_jobq.worker.loop import Worker, WorkerPolicy  # noqa: E402
from ai4s_jobq.worker.processors import TaskFailed, started  # noqa: E402
from ai4s_jobq.worker.sync_calls import run_sync  # noqa: E402

SLOTS = 8
INPROCESS_TOLERANCE = 0.05
ISOLATION_GOAL = 1_500  # tasks/s at 8 slots


class BaselineCallable:
    """The in-process processor before this work, for the within-5% comparison."""

    def __init__(self, function: Callable[..., Any]):
        self.function = function
        self.is_async = inspect.iscoroutinefunction(function)

    async def __call__(self, task: Task) -> Any:
        try:
            if self.is_async:
                return await self.function(**task.args)
            return await run_sync(self.function, task.args)
        except (asyncio.CancelledError, TaskFailed):
            raise
        except Exception as exc:
            raise TaskFailed(type(exc).__name__, str(exc)) from exc


def fill(root: Path, name: str, n: int) -> Path:
    settings = QueueSettings()
    path = root / f"{name}.sqlite3"
    broker = core.BrokerCore(path)
    broker.create_queue(
        core.QueueProperties(
            name=name,
            lock_duration=settings.lock_duration.total_seconds(),
            requires_duplicate_detection=settings.duplicate_detection,
            duplicate_detection_window=settings.dedup_window.total_seconds(),
            max_delivery_count=settings.max_delivery_count,
        )
    )
    tasks = [make_task({"i": i}) for i in range(n)]
    messages = [core.NewMessage(t.id, t.to_body()) for t in tasks]
    for start in range(0, n, 500):
        broker.send(name, messages[start : start + 500])
    broker.close()
    return path


def pool_cpu_seconds(processor: Any) -> float:
    """CPU time used so far by a process pool's processes (from /proc; they are the
    fork server's children, so ``RUSAGE_CHILDREN`` does not see them)."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for slot in getattr(processor, "slots", []):
        if slot.child is None:
            continue
        try:
            fields = Path(f"/proc/{slot.child.process.pid}/stat").read_text().rsplit(")", 1)[1]
        except OSError:
            continue
        utime, stime = fields.split()[11:13]
        total += (int(utime) + int(stime)) / ticks
    return total


async def drain(root: Path, name: str, n: int, processor: Any) -> tuple[float, float]:
    """Wall-clock and CPU rates (tasks per second of this process's CPU plus the pool
    processes' CPU: as if everything ran on one core) for one worker draining ``n``
    no-ops (processor already started).  On a busy machine the CPU rate is the
    steadier figure."""
    path = fill(root, name, n)
    backend = LocalBackend(path, name)
    await backend.open()
    try:
        policy = WorkerPolicy(slots=SLOTS, idle_timeout=30, max_tasks=n)
        worker = Worker(backend, processor, policy)
        cpu, pool_cpu = time.process_time(), pool_cpu_seconds(processor)
        began = time.perf_counter()
        stats = await worker.run()
        rate = n / (time.perf_counter() - began)
        cpu = time.process_time() - cpu
        pool_cpu = pool_cpu_seconds(processor) - pool_cpu
    finally:
        await backend.close()
    assert stats.succeeded == n, stats
    if pool_cpu:
        print(
            f"    worker process {1e6 * cpu / n:.0f} us cpu/task, "
            f"pool processes {1e6 * pool_cpu / n:.0f} us cpu/task",
            flush=True,
        )
    return rate, n / max(cpu + pool_cpu, 1e-9)


async def run(n: int, rounds: int, root: Path) -> tuple[list[tuple[str, str, str, str]], float]:
    import bench_noops

    variants: dict[str, Callable[[], Any]] = {
        "baseline sync": lambda: BaselineCallable(bench_noops.noop_sync),
        "in-process sync": lambda: (
            build_processor(ProcessorOptions(proc="bench_noops:noop_sync"), SLOTS).processor
        ),
        "baseline async": lambda: BaselineCallable(bench_noops.noop_async),
        "in-process async": lambda: (
            build_processor(ProcessorOptions(proc="bench_noops:noop_async"), SLOTS).processor
        ),
        "in-process class": lambda: (
            build_processor(ProcessorOptions(proc="bench_noops:NoopClass"), SLOTS).processor
        ),
        "isolation process": lambda: (
            build_processor(
                ProcessorOptions(proc="bench_noops:noop_sync", isolation="process"), SLOTS
            ).processor
        ),
    }
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}
    rates: dict[str, list[float]] = {label: [] for label in variants}
    cpu_rates: dict[str, list[float]] = {label: [] for label in variants}
    for round_no in range(rounds):
        order = list(variants.items())
        if round_no % 2:  # A B C, C B A, ...: no variant always runs first or last
            order.reverse()
        for label, make in order:
            processor = make()
            async with started(processor):
                rate, cpu_rate = await drain(
                    root, f"{label.replace(' ', '-')}-{round_no}", n, processor
                )
            best[label] = max(best.get(label, 0.0), rate)
            best_cpu[label] = max(best_cpu.get(label, 0.0), cpu_rate)
            rates[label].append(rate)
            cpu_rates[label].append(cpu_rate)
            print(
                f"  round {round_no + 1}: {label:<18} {rate:>8,.0f} tasks/s "
                f"(cpu {cpu_rate:,.0f}/s)",
                flush=True,
            )

    def verdict(ok: bool, cpu_ok: bool) -> str:
        if ok:
            return "PASS"
        return "MISS (PASS on cpu rate)" if cpu_ok else "MISS"

    def within(label: str, baseline: str) -> tuple[str, str, str, str]:
        # The median of the rounds' ratios: each round's pair ran back to back, so load
        # from elsewhere hits both; a best-of-rounds ratio swung by tens of percent.
        ratio = statistics.median(a / b for a, b in zip(rates[label], rates[baseline]))
        cpu_ratio = statistics.median(a / b for a, b in zip(cpu_rates[label], cpu_rates[baseline]))
        ok = ratio >= 1 - INPROCESS_TOLERANCE
        return (
            label,
            f"{best[label]:,.0f}/s",
            f"{ratio:.1%} of {baseline} (cpu: {cpu_ratio:.1%})",
            f">= 95%: {verdict(ok, cpu_ratio >= 1 - INPROCESS_TOLERANCE)}",
        )

    iso, iso_cpu = best["isolation process"], best_cpu["isolation process"]
    drain_task_us = 1e6 / best_cpu["baseline async"]  # the cheapest whole task
    print(f"  a drained no-op task costs {drain_task_us:.0f} us of cpu (baseline async)")
    return [
        within("in-process sync", "baseline sync"),
        within("in-process async", "baseline async"),
        within("in-process class", "baseline sync"),
        (
            "isolation process",
            f"{iso:,.0f}/s",
            f"{iso / best['in-process sync']:.1%} of in-process sync (cpu {iso_cpu:,.0f}/s)",
            f">= {ISOLATION_GOAL:,}/s: {verdict(iso >= ISOLATION_GOAL, iso_cpu >= ISOLATION_GOAL)}",
        ),
    ], drain_task_us


async def call_overhead(rounds: int = 15, calls: int = 2_000) -> dict[str, tuple[float, float]]:
    """The processors alone (no queue, no worker): median microseconds per call over
    short alternating rounds, the steadiest comparison on a busy machine."""
    import bench_noops

    pairs = {
        "call async": (
            BaselineCallable(bench_noops.noop_async),
            build_processor(ProcessorOptions(proc="bench_noops:noop_async")).processor,
        ),
        "call sync": (
            BaselineCallable(bench_noops.noop_sync),
            build_processor(ProcessorOptions(proc="bench_noops:noop_sync")).processor,
        ),
        "call class (sync __call__)": (
            BaselineCallable(bench_noops.noop_sync),
            build_processor(ProcessorOptions(proc="bench_noops:NoopClass")).processor,
        ),
    }
    task = make_task({"i": 1})
    rows: dict[str, tuple[float, float]] = {}
    for label, (baseline, new) in pairs.items():
        async with started(new):
            times: dict[str, list[float]] = {"baseline": [], "new": []}
            for _ in range(rounds):
                for name, processor in (("baseline", baseline), ("new", new)):
                    began = time.process_time()
                    for _ in range(calls):
                        await processor(task)
                    times[name].append((time.process_time() - began) / calls * 1e6)
        base, mine = statistics.median(times["baseline"]), statistics.median(times["new"])
        rows[label] = (mine, base)
        print(f"  {label:<26} {mine:6.1f} us/call (baseline {base:.1f})", flush=True)
    return rows


def overhead_rows(
    calls: dict[str, tuple[float, float]], drain_task_us: float
) -> list[tuple[str, str, str, str]]:
    """Judge each processor's extra CPU per call against what a whole drained task
    costs (receive, run, settle): that is what "within 5% of now" is about; a ratio of
    two one-microsecond figures would only measure noise."""
    rows = []
    for label, (mine, base) in calls.items():
        extra = mine - base
        share = extra / drain_task_us
        rows.append(
            (
                label,
                f"{mine:.1f} us cpu",
                f"baseline {base:.1f} us; extra {extra:+.1f} us = {share:+.1%} of a task",
                f"<= 5%: {'PASS' if share <= INPROCESS_TOLERANCE else 'MISS'}",
            )
        )
    return rows


def main() -> None:
    ensure_bytecode()  # see bench/bytecode.py
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks and rounds")
    parser.add_argument("-n", type=int, help="tasks per drain")
    parser.add_argument("--rounds", type=int)
    options = parser.parse_args()
    n = options.n or (1_500 if options.quick else 8_000)
    rounds = options.rounds or (2 if options.quick else 9)
    root = Path(tempfile.mkdtemp(prefix="jobq-bench-proc-"))
    try:
        print(f"draining {n:,} no-op tasks with {SLOTS} slots, {rounds} round(s):")
        print("processor call overhead (no queue):")
        calls = asyncio.run(call_overhead())
        rows, drain_task_us = asyncio.run(run(n, rounds, root))
        rows = overhead_rows(calls, drain_task_us) + rows
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    width = max(len(r[0]) for r in rows)
    for label, value, ratio, goal in rows:
        print(f"{label:<{width}}  {value:>10}  {ratio:<45} {goal}")


if __name__ == "__main__":
    main()
