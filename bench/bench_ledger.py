"""Benchmark of the outcome ledger: what it costs the hot paths, and how wait/status scale.

Run from the repository root::

    python bench/bench_ledger.py            # full sizes (a few minutes)
    python bench/bench_ledger.py --quick    # smaller sizes
    python bench/bench_ledger.py --only push --only drain --only wait --only azurite

Every figure is printed next to a baseline measured in the same run (the same work
with the ledger off, ``ledger="off"``), so load from other processes affects both:

1. ``push_many`` of distinct shell tasks to a local queue: ledger off / on / on with a
   tag.  Goals: >= 15,000 tasks/s with the ledger and >= 60% of the rate without.
2. Draining no-op Python tasks at 8 slots with the worker, without and with the
   :class:`~ai4s_jobq.ledger.recorder.LedgerRecorder` hook.  Goal: >= 5,000/s with it.
3. Waiting on a tag of 100,000 tasks (a local ledger filled directly): ``status`` time
   (goal < 1 s) and the peak Python allocation of ``JobQ.wait(tag=...)`` against the
   same wait on a tag of a tenth the size (goal: constant memory, i.e. the larger
   wait's peak is within 1.5x + 256 KiB of the smaller one's).
4. Draining no-op tasks from a Storage Queue on Azurite (started here, as the tests
   do), ledger off / on / on / off on fresh queues (counterbalanced: Azurite slows as
   it ages).  Goal: the mean time with the ledger within 1.5x the mean without.

Rates are wall clock (what the goals are judged on) with the CPU rate of this process
beside them: on a machine busier than its core count, compare the CPU rates.  Exit
status 0 always: PASS/MISS per goal is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
import uuid
from dataclasses import dataclass
from pathlib import Path

from bytecode import ensure_bytecode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # measure this checkout, not an installed copy
sys.path.insert(0, str(REPO / "tests"))

from ai4s_jobq import JobQ, Worker, WorkerPolicy  # noqa: E402
from ai4s_jobq.ledger.events import AttemptEvent, PushEntry  # noqa: E402
from ai4s_jobq.ledger.recorder import LedgerRecorder  # noqa: E402
from ai4s_jobq.ledger.sqlite_store import SqliteLedger  # noqa: E402
from ai4s_jobq.worker.processors import CallableProcessor  # noqa: E402

PUSH_GOAL = 15_000
PUSH_RATIO_GOAL = 0.60
DRAIN_GOAL = 5_000
STATUS_GOAL_SECONDS = 1.0
AZURITE_RATIO_GOAL = 1.5
SLOTS = 8


@dataclass
class Sizes:
    push: int
    drain: int
    wait: int
    azurite: int


FULL = Sizes(push=100_000, drain=20_000, wait=100_000, azurite=400)
QUICK = Sizes(push=30_000, drain=6_000, wait=100_000, azurite=200)


@dataclass
class Row:
    name: str
    value: str
    baseline: str
    goal: str = ""
    verdict: str = ""


def verdict(ok: bool, cpu_ok: bool | None = None) -> str:
    if ok:
        return "PASS"
    return "MISS (PASS on cpu rate)" if cpu_ok else "MISS"


class Timer:
    def __init__(self, count: int):
        self.count = count

    def __enter__(self) -> Timer:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.rate = self.count / self.seconds
        self.cpu_rate = self.count / max(time.process_time() - self._cpu, 1e-9)

    def rates(self) -> str:
        return f"{self.rate:,.0f}/s (cpu {self.cpu_rate:,.0f}/s)"


# ---------------------------------------------------------------------------- 1. push


def bench_push(n: int) -> list[Row]:
    import ai4s_jobq

    def run(name: str, ledger: str | None, tag: str | None) -> Timer:
        tasks = (f"echo {name} {i}" for i in range(n))
        with Timer(n) as timer:
            summary = ai4s_jobq.push_many(tasks, queue=f"local://{name}", ledger=ledger, tag=tag)
        assert summary.pushed == n, summary
        return timer

    # off / on / tag / off: the baseline is the mean of the two runs around the others
    off1 = run("push-off-1", "off", None)
    on = run("push-on", None, None)
    tagged = run("push-tag", None, "run")
    off2 = run("push-off-2", "off", None)
    base_rate = (off1.rate + off2.rate) / 2
    base_cpu = (off1.cpu_rate + off2.cpu_rate) / 2
    rows = []
    for label, timer in (("ledger", on), ("ledger + tag", tagged)):
        ratio, cpu_ratio = timer.rate / base_rate, timer.cpu_rate / base_cpu
        rows.append(
            Row(
                f"push_many {n:,} new tasks, {label}",
                timer.rates(),
                f"ledger off {base_rate:,.0f}/s (cpu {base_cpu:,.0f}/s): {100 * ratio:.0f}% "
                f"(cpu {100 * cpu_ratio:.0f}%)",
                f">= {PUSH_GOAL:,}/s and >= {100 * PUSH_RATIO_GOAL:.0f}%",
                verdict(
                    timer.rate >= PUSH_GOAL and ratio >= PUSH_RATIO_GOAL,
                    timer.cpu_rate >= PUSH_GOAL and cpu_ratio >= PUSH_RATIO_GOAL,
                ),
            )
        )
    return rows


# ---------------------------------------------------------------------------- 2. drain


async def noop(**_: object) -> None:
    return None


def bench_drain(root: Path, n: int) -> list[Row]:
    async def run(name: str, with_ledger: bool) -> Timer:
        async with JobQ.open(f"local://{name}", check=False) as q:
            summary = await q.push_many({"i": i} for i in range(n))
            assert summary.pushed == n
            hooks = [LedgerRecorder(q.ledger)] if with_ledger and q.ledger else []
            policy = WorkerPolicy(slots=SLOTS, idle_timeout=30, max_tasks=n)
            worker = Worker(q.backend, CallableProcessor(noop), policy, hooks=hooks)
            with Timer(n) as timer:
                stats = await worker.run()
            assert stats.succeeded == n, stats
            if with_ledger:
                assert q.ledger is not None
                assert (await q.ledger.status()).counts.get("succeeded") == n
        return timer

    off1 = asyncio.run(run("drain-off-1", False))
    on = asyncio.run(run("drain-on", True))
    off2 = asyncio.run(run("drain-off-2", False))
    base_rate = (off1.rate + off2.rate) / 2
    base_cpu = (off1.cpu_rate + off2.cpu_rate) / 2
    return [
        Row(
            f"drain {n:,} no-ops, {SLOTS} slots, ledger",
            on.rates(),
            f"no ledger {base_rate:,.0f}/s (cpu {base_cpu:,.0f}/s): "
            f"{100 * on.rate / base_rate:.0f}% (cpu {100 * on.cpu_rate / base_cpu:.0f}%)",
            f">= {DRAIN_GOAL:,}/s",
            verdict(on.rate >= DRAIN_GOAL, on.cpu_rate >= DRAIN_GOAL),
        )
    ]


# ---------------------------------------------------------------------------- 3. wait/status


async def fill_tag(store: SqliteLedger, tag: str, n: int) -> None:
    """``n`` tasks under ``tag``, all succeeded (written as pushes and outcomes)."""
    now = time.time()
    for start in range(0, n, 5000):
        ids = [uuid.uuid4().hex for _ in range(min(5000, n - start))]
        await store.record_pushes([PushEntry(i, False) for i in ids], tag)
        await store.record_attempts(
            [AttemptEvent(i, "succeeded", 1, now, started_at=now, duration=0.01) for i in ids]
        )


def bench_wait(root: Path, n: int) -> list[Row]:
    small = max(n // 10, 1000)

    async def run() -> list[Row]:
        async with JobQ.open("local://wait", check=False) as q:
            assert isinstance(q.ledger, SqliteLedger)
            await fill_tag(q.ledger, "big", n)
            await fill_tag(q.ledger, "small", small)
            status_times = []
            for _ in range(3):
                started = time.perf_counter()
                summary = await q.status("big")
                status_times.append(time.perf_counter() - started)
            assert summary.total == n
            peaks = {}
            for tag in ("small", "big"):
                tracemalloc.start()
                report = await q.wait(tag=tag, timeout=60)
                peaks[tag] = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                assert report.exit_code == 0 and report.succeeded == (n if tag == "big" else small)
        best = min(status_times)
        limit = 1.5 * peaks["small"] + 256 * 1024
        return [
            Row(
                f"status of a {n:,}-task tag (local)",
                f"{best * 1000:.0f} ms (best of 3)",
                f"runs: {', '.join(f'{t * 1000:.0f}' for t in status_times)} ms",
                f"< {STATUS_GOAL_SECONDS:.0f} s",
                verdict(best < STATUS_GOAL_SECONDS),
            ),
            Row(
                f"wait on a {n:,}-task tag: peak Python memory",
                f"{peaks['big'] / 1024:,.0f} KiB",
                f"a {small:,}-task tag: {peaks['small'] / 1024:,.0f} KiB",
                "constant (<= 1.5x + 256 KiB)",
                verdict(peaks["big"] <= limit),
            ),
        ]

    return asyncio.run(run())


# ---------------------------------------------------------------------------- 4. azurite


def bench_azurite(root: Path, n: int) -> list[Row]:
    from azurite_fixtures import start_azurite, stop_azurite

    process, azurite, _ = start_azurite(root)
    try:

        async def run(ledger: str | None) -> float:
            spec = f"devstoreaccount1/b{uuid.uuid4().hex[:12]}"
            async with JobQ.open(
                spec, connection_string=azurite.connection_string, ledger=ledger, check=False
            ) as q:
                summary = await q.push_many({"i": i} for i in range(n))
                assert summary.pushed == n, summary
                hooks = [LedgerRecorder(q.ledger)] if q.ledger is not None else []
                policy = WorkerPolicy(slots=SLOTS, idle_timeout=30, max_tasks=n)
                worker = Worker(q.backend, CallableProcessor(noop), policy, hooks=hooks)
                started = time.perf_counter()
                stats = await worker.run()
                seconds = time.perf_counter() - started
                assert stats.succeeded == n, stats
                await q.backend._queue.delete_queue()  # type: ignore[attr-defined]
            return seconds

        order = ["off", None, None, "off"]
        times = [asyncio.run(run(ledger)) for ledger in order]
    finally:
        stop_azurite(process)
    off = (times[0] + times[3]) / 2
    on = (times[1] + times[2]) / 2
    return [
        Row(
            f"Azurite drain of {n} no-ops, {SLOTS} slots, ledger",
            f"{on:.2f} s (runs {times[1]:.2f}, {times[2]:.2f})",
            f"ledger off {off:.2f} s (runs {times[0]:.2f}, {times[3]:.2f}): {on / off:.2f}x",
            f"<= {AZURITE_RATIO_GOAL}x",
            verdict(on <= AZURITE_RATIO_GOAL * off),
        )
    ]


# ---------------------------------------------------------------------------- report


def print_table(rows: list[Row]) -> None:
    headers = Row("measurement", "result", "baseline (same run)", "goal", "")
    fields = ("name", "value", "baseline", "goal", "verdict")
    widths = [max(len(getattr(r, f)) for r in [headers, *rows]) for f in fields]
    for i, row in enumerate([headers, *rows]):
        cells = [getattr(row, f) for f in fields]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main() -> int:
    ensure_bytecode()  # see bench/bytecode.py
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument(
        "--only", choices=("push", "drain", "wait", "azurite"), action="append", default=None
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    parts = args.only or ["push", "drain", "wait", "azurite"]
    root = Path(tempfile.mkdtemp(prefix="jobq-bench-ledger-"))
    os.environ["JOBQ_LOCAL_DIR"] = str(root)
    os.environ.pop("JOBQ_LEDGER", None)
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    print(
        f"load average {load:.1f} on {cores} core(s)"
        + (": busy machine, compare the cpu rates" if load > cores else ""),
        flush=True,
    )
    rows: list[Row] = []
    try:
        if "push" in parts:
            print(f"push: {sizes.push:,} tasks per run ...", flush=True)
            rows += bench_push(sizes.push)
        if "drain" in parts:
            print(f"drain: {sizes.drain:,} tasks per run ...", flush=True)
            rows += bench_drain(root, sizes.drain)
        if "wait" in parts:
            print(f"wait/status: a {sizes.wait:,}-task tag ...", flush=True)
            rows += bench_wait(root, sizes.wait)
        if "azurite" in parts:
            print(f"azurite: {sizes.azurite} tasks per drain ...", flush=True)
            rows += bench_azurite(root, sizes.azurite)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
