"""Benchmark of the dashboard page: server time with 100,000 ledger records.

Run from the repository root::

    python bench/bench_dashboard.py             # 100,000 records
    python bench/bench_dashboard.py --records 20000 --repeat 5

A local queue gets a real SQLite ledger filled through the store's write API with
``--records`` tasks over 10 tags (78% succeeded with spread-out runtimes, 8% dead-
lettered under 6 reasons, 4% failed and retrying, 3% running, the rest queued) and 40
worker heartbeats (some stale); the queue itself holds 2,000 active and 50 dead-
lettered messages.  Then:

* **page** — ``GET /`` over HTTP on 127.0.0.1, the way the server answers it: from the
  latest snapshot its background gatherer keeps (pages never wait for the ledger).
  Goal: median server time < 200 ms.
* **fresh snapshot** — one gathering (queue counts, dead-letter list, ledger status,
  per-tag status, failures, durations, workers) plus rendering, as the gatherer does
  every refresh; with each ledger call timed alone.  Reported, no goal: it bounds how
  fresh the page can be and how busy the gatherer keeps the ledger (it waits
  ``GATHER_DUTY`` times a gathering's duration between gatherings).
* baselines measured in the same run, so load from other processes affects both:
  the same page over an **empty** ledger, and one bare ``ledger.status()`` over all
  records (what ``jobq status`` pays).

Prints medians, the page's ratio to each baseline, and PASS/MISS.  Exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # measure this checkout, not an installed copy

import aiohttp  # noqa: E402

from ai4s_jobq import JobQ  # noqa: E402
from ai4s_jobq.dashboard.render import render_page  # noqa: E402
from ai4s_jobq.dashboard.server import GATHER_DUTY, Dashboard  # noqa: E402
from ai4s_jobq.dashboard.snapshot import QueueSource, collect  # noqa: E402
from ai4s_jobq.ledger.base import LedgerStore, WorkerRecord  # noqa: E402
from ai4s_jobq.ledger.events import AttemptEvent, PushEntry  # noqa: E402

PAGE_GOAL_SECONDS = 0.200
REASONS = ["NonZeroExit", "Timeout", "MemoryError", "ValueError", "FileNotFoundError", "Killed"]


async def fill_ledger(store: LedgerStore, records: int, rng: random.Random) -> None:
    now = time.time()
    batch = 5000
    for start in range(0, records, batch):
        ids = [uuid.uuid4().hex for _ in range(min(batch, records - start))]
        tag = f"run-{start * 10 // records}"
        await store.record_pushes([PushEntry(i, False) for i in ids], tag)
        events = []
        for task_id in ids:
            roll = rng.random()
            at = now - rng.uniform(0, 3600)
            duration = rng.lognormvariate(1.5, 1.0)
            if roll < 0.78:
                events.append(
                    AttemptEvent(
                        task_id,
                        "succeeded",
                        1,
                        at,
                        started_at=at - duration,
                        duration=duration,
                        worker_id="w",
                        host="h",
                        exit_code=0,
                    )
                )
            elif roll < 0.86:
                reason = rng.choice(REASONS)
                events.append(
                    AttemptEvent(
                        task_id,
                        "dead_lettered",
                        3,
                        at,
                        started_at=at - duration,
                        duration=duration,
                        reason=reason,
                        exit_code=1,
                        summary=f"{reason}: something went wrong in step {rng.randint(1, 9)}",
                    )
                )
            elif roll < 0.90:
                events.append(
                    AttemptEvent(
                        task_id,
                        "failed",
                        1,
                        at,
                        started_at=at - duration,
                        duration=duration,
                        reason=rng.choice(REASONS),
                        exit_code=1,
                        summary="transient failure",
                    )
                )
            elif roll < 0.93:
                events.append(AttemptEvent(task_id, "running", 1, at, started_at=at))
        await store.record_attempts(events)
    for n in range(40):
        seen = now - (5 if n < 30 else 600)
        await store.heartbeat(
            WorkerRecord(
                f"worker{n:03d}",
                f"node{n % 8}",
                1000 + n,
                4,
                "local://bench",
                now - 3600,
                seen,
                running=[],
                tasks_done=rng.randint(100, 3000),
                version="bench",
            )
        )


async def fill_queue(q: JobQ, active: int, dead: int) -> None:
    await q.push_many(f"echo bench {i}" for i in range(active + dead))
    received = await q.backend.receive(dead, 5.0)
    for message in received[:dead]:
        await q.backend.dead_letter(message, "NonZeroExit", "exit code 1")


async def timed(fn: Callable[[], Awaitable[object]], repeat: int) -> list[float]:
    await fn()  # warm: templates compiled, SQLite pages cached
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - started)
    return times


async def measure_page(source: QueueSource, repeat: int) -> list[float]:
    """HTTP GET / round trips against a running dashboard."""
    board = Dashboard([source], refresh_seconds=1.0, sample_seconds=3600)
    port = await board.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http:

            async def get_page() -> None:
                async with http.get(f"http://127.0.0.1:{port}/") as response:
                    assert response.status == 200
                    await response.read()

            return await timed(get_page, repeat)
    finally:
        await board.stop()


async def measure_fresh(source: QueueSource, repeat: int) -> list[float]:
    async def gather_and_render() -> None:
        render_page([source.name], 0, await collect(source), 5.0)

    return await timed(gather_and_render, repeat)


async def ledger_calls(ledger: LedgerStore) -> dict[str, float]:
    tags = await ledger.tags(limit=12)
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "status()": ledger.status,
        f"status(tag) x{len(tags)}": lambda: asyncio.gather(*(ledger.status(t) for t in tags)),
        "failures()": ledger.failures,
        "durations()": ledger.durations,
        "workers()": ledger.workers,
    }
    return {name: statistics.median(await timed(fn, 2)) for name, fn in calls.items()}


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:7.1f} ms (min {min(values) * 1000:.1f})"


async def main(records: int, repeat: int) -> None:
    rng = random.Random(42)
    root = Path(tempfile.mkdtemp(prefix="jobq-bench-dashboard-"))
    os.environ["JOBQ_LOCAL_DIR"] = str(root)
    os.environ.pop("JOBQ_LEDGER", None)
    try:
        async with (
            JobQ.open("local://full", check=False) as full,
            JobQ.open("local://empty", check=False) as empty,
        ):
            assert full.ledger is not None and empty.ledger is not None
            started = time.perf_counter()
            await fill_ledger(full.ledger, records, rng)
            await fill_queue(full, 2000, 50)
            await fill_queue(empty, 2000, 50)
            print(f"filled {records:,} ledger records in {time.perf_counter() - started:.1f} s")
            full_source = QueueSource("full", full, full.ledger)
            empty_source = QueueSource("empty", empty, empty.ledger)
            snap = await collect(full_source)
            assert snap.status is not None, snap.ledger_error
            assert snap.status.total == records + 2050  # the queue's own pushes are recorded
            assert snap.failures and snap.durations and snap.tag_outcomes

            status_times = await timed(lambda: full.ledger.status(), repeat)  # type: ignore[union-attr]
            empty_http = await measure_page(empty_source, repeat)
            page_http = await measure_page(full_source, repeat)
            fresh = await measure_fresh(full_source, max(3, repeat // 3))
            calls = await ledger_calls(full.ledger)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    page = statistics.median(page_http)
    print("\nmedians (after one warm-up):")
    print(f"  baseline: page over an empty ledger, GET /  {ms(empty_http)}")
    print(f"  baseline: ledger.status() over {records:,}     {ms(status_times)}")
    print(f"  page over {records:,} records, GET /      {ms(page_http)}")
    print(f"  ratio page / empty-ledger page: {page / statistics.median(empty_http):.2f}x")
    print(f"  ratio page / one status():      {page / statistics.median(status_times):.2f}x")
    print(f"\n  fresh snapshot + render over {records:,} records: {ms(fresh)}")
    for name, seconds in calls.items():
        print(f"    of which ledger {name:18} {seconds * 1000:7.1f} ms")
    verdict = "PASS" if page < PAGE_GOAL_SECONDS else "MISS"
    print(
        f"\n{verdict}  page server time {page * 1000:.1f} ms "
        f"(goal < {PAGE_GOAL_SECONDS * 1000:.0f} ms)"
    )
    print(
        f"INFO  a fresh snapshot takes {statistics.median(fresh):.2f} s; the gatherer "
        f"refreshes at most every {GATHER_DUTY:g}x that"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.records, args.repeat))
