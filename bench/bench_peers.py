"""The embedded ``local://`` queue against embedded peers: huey, persist-queue, litequeue.

    python bench/bench_peers.py            # full sizes (several minutes on 2 cores)
    python bench/bench_peers.py --quick    # small sizes, for iterating
    python bench/bench_peers.py --only push --only drain   # parts: push, drain, dedup

The peers are installed only in ``bench/.venv-peers`` (created on first use, from PyPI;
gitignored), never in the project's environment.  Ours runs from this checkout with the
interpreter that runs the benchmark.  Every measurement is a fresh process in a fresh
directory; systems alternate (A B C … A B C …) over the repetitions, so a burst of load
from elsewhere on the machine hits every system, and the figures are medians with the
min–max range.  Only the operation is timed (opening the queue included, interpreter
start-up and building the task list not).  The same task for everyone: a small dict,
``{"i": 17, "path": "/data/shard-00017.bin", "size": 1024}``.

What is measured:

* push 20k and 100k tasks into an empty queue;
* drain 20k no-op tasks (filled untimed first) with 1 and 8 consumers: ours with a worker
  of 1 / 8 slots running a sync no-op function (``jobq``, ``jobq-full``) and an async one
  (``jobq-async``); huey's ``SqliteHuey``
  consumer with as many worker threads; persist-queue and litequeue with as many threads,
  each looping get → ack (they ship no consumer);
* the same 1,000 tasks pushed twice: how many are queued.

What each system does differently, so the ratios are read honestly:

* **jobq** (``local://``): a Service-Bus-like queue: every task gets a deterministic ID
  (MD5 of its canonical JSON) checked against a 7-day duplicate-detection table, so a
  re-pushed task is dropped; a received task is *locked* (peek-lock with a lock token and
  expiry, renewed while it runs), and settled afterwards (complete / abandon for a retry /
  dead-letter after the last attempt, default 3 attempts); no result storage.  Push sends
  batches of 2,000 per transaction.  Durability: WAL with ``synchronous=NORMAL`` by default
  (``jobq-full``: ``JOBQ_LOCAL_DURABILITY=full``, ``synchronous=FULL``).
* **huey** (``SqliteHuey``): a task is pickled and inserted, one transaction per enqueue
  (no batch API); the consumer *deletes* it on dequeue (no lock: a task running when the
  consumer dies is lost unless it was retried explicitly); no dedup; retries only when
  asked (``retries=``); results stored (a ``None`` result is not).  WAL with SQLite's
  default ``synchronous`` (FULL: an fsync of the WAL per commit).
* **persist-queue** (``SQLiteAckQueue``): pickled items, one transaction per ``put``;
  ``get`` marks an item unacked, ``ack`` marks it acked (rows are kept); no lock expiry (an
  unacked item of a dead consumer stays unacked until ``resume_unack_tasks``); no dedup
  (``UniqueAckQ`` offers it, not measured); no retries.  WAL with SQLite's default
  ``synchronous`` (FULL).
* **litequeue**: string payloads, one autocommit ``INSERT`` per ``put``; ``pop`` locks a
  message (status + lock time, no expiry: ``list_locked`` lets the user find stale ones),
  ``done`` marks it done (rows kept until ``prune``); no dedup, no retries.  WAL with
  ``synchronous=NORMAL``, like jobq's default.

The ``synchronous`` setting each system ran with is read back from its connection and
printed, and so is each rate per CPU-second of the measuring process.  On a machine whose
cores are busy with other work, the scheduler gives a process that never sleeps (a worker
draining no-op async tasks) a smaller share of wall-clock time than one that waits on its
disk or threads, so read the wall-clock ratios next to the CPU ones.  The exit status is
0: goals are reported PASS/MISS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from dataclasses import dataclass, field
from pathlib import Path

from bytecode import ensure_bytecode

REPO = Path(__file__).resolve().parent.parent
PEERS_VENV = REPO / "bench" / ".venv-peers"
PEER_PACKAGES = ["huey==3.5.4", "persist-queue==1.1.0", "litequeue==0.9"]
SYNC_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}

OURS = ("jobq", "jobq-async", "jobq-full")
PEERS = ("huey", "persist-queue", "litequeue")
PUSH_GOAL = 2.0  # ours ÷ each peer
SYNC_DRAIN_GOAL = 2.0  # ours (sync tasks) ÷ huey
ASYNC_DRAIN_GOAL = 4.0  # ours (async tasks) ÷ huey


class Clock:
    """Wall-clock and CPU seconds (this process, all threads) of one measurement."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> dict:
        return {
            "seconds": time.perf_counter() - self.wall,
            "cpu": time.process_time() - self.cpu,
        }


def timed_threads(consume, slots: int, *, indexed: bool) -> dict:
    """Run ``consume`` (``consume(i)`` if ``indexed``) on ``slots`` threads; the timing
    of the whole run (the peers ship no consumer: this is theirs)."""
    import threading

    threads = [threading.Thread(target=consume, args=(i,) if indexed else ()) for i in range(slots)]
    clock = Clock()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clock.stop()


def payload(i: int) -> dict:
    return {"i": i, "path": f"/data/shard-{i:05d}.bin", "size": 1024}


# ============================================================================ children
# Each function below runs in a fresh process (``--child``) and returns a JSON-able dict.


def child_jobq(system: str, op: str, n: int, slots: int, root: Path) -> dict:
    sys.path.insert(0, str(REPO))
    os.environ["JOBQ_LOCAL_DIR"] = str(root)
    import asyncio

    import ai4s_jobq
    import ai4s_jobq.backends.local  # noqa: F401 - imported before the clock, as the peers are
    from ai4s_jobq import JobQ
    from ai4s_jobq.worker.loop import Worker, WorkerPolicy
    from ai4s_jobq.worker.processors import CallableProcessor

    spec = "local://bench"
    tasks = [payload(i) for i in range(n)]

    def synchronous() -> int:
        async def read() -> int:
            async with JobQ.open(spec, check=False) as q:
                return q.backend.core._conn().execute("PRAGMA synchronous").fetchone()[0]

        return asyncio.run(read())

    if op == "push":
        clock = Clock()
        summary = ai4s_jobq.push_many(tasks, queue=spec)
        timing = clock.stop()
        assert summary.pushed == n, summary
        return {**timing, "synchronous": synchronous()}
    if op == "dedup":
        ai4s_jobq.push_many(tasks, queue=spec)
        ai4s_jobq.push_many(tasks, queue=spec)

        async def count() -> int:
            async with JobQ.open(spec, check=False) as q:
                return (await q.counts()).active

        return {"queued": asyncio.run(count())}
    # drain
    ai4s_jobq.push_many(tasks, queue=spec)

    def noop_sync(**_: object) -> None:
        return None

    async def noop_async(**_: object) -> None:
        return None

    async def drain() -> dict:
        async with JobQ.open(spec, check=False) as q:
            function = noop_async if system == "jobq-async" else noop_sync
            policy = WorkerPolicy(slots=slots, idle_timeout=30, max_tasks=n)
            worker = Worker(q.backend, CallableProcessor(function), policy)
            clock = Clock()
            stats = await worker.run()
            timing = clock.stop()
            assert stats.succeeded == n, stats
            return timing

    return {**asyncio.run(drain()), "synchronous": synchronous()}


def child_huey(system: str, op: str, n: int, slots: int, root: Path) -> dict:
    import logging
    import threading

    from huey import SqliteHuey
    from huey.signals import SIGNAL_COMPLETE

    logging.getLogger("huey").setLevel(logging.ERROR)
    tasks = [payload(i) for i in range(n)]
    clock = Clock()
    huey = SqliteHuey("bench", filename=str(root / "huey.db"))

    @huey.task()
    def noop(task: dict) -> None:
        return None

    def synchronous() -> int:
        return huey.storage.conn.execute("PRAGMA synchronous").fetchone()[0]

    if op == "push":
        for task in tasks:
            noop(task)
        return {**clock.stop(), "synchronous": synchronous()}
    if op == "dedup":
        for task in tasks + tasks:
            noop(task)
        return {"queued": huey.pending_count()}
    for task in tasks:
        noop(task)
    done = threading.Event()
    lock = threading.Lock()
    completed = [0]

    @huey.signal(SIGNAL_COMPLETE)
    def on_complete(signal: object, task: object, *args: object, **kwargs: object) -> None:
        with lock:
            completed[0] += 1
            if completed[0] >= n:
                done.set()

    consumer = huey.create_consumer(workers=slots, worker_type="thread", periodic=False)
    clock = Clock()
    consumer.start()
    done.wait()
    timing = clock.stop()
    consumer.stop(graceful=True)
    return {**timing, "synchronous": synchronous()}


def child_persist_queue(system: str, op: str, n: int, slots: int, root: Path) -> dict:

    from persistqueue import Empty, SQLiteAckQueue

    tasks = [payload(i) for i in range(n)]
    clock = Clock()
    q = SQLiteAckQueue(str(root / "pq"), multithreading=True)

    def synchronous() -> int:
        return q._putter.execute("PRAGMA synchronous").fetchone()[0]

    if op == "push":
        for task in tasks:
            q.put(task)
        return {**clock.stop(), "synchronous": synchronous()}
    if op == "dedup":
        for task in tasks + tasks:
            q.put(task)
        return {"queued": q.qsize()}
    for task in tasks:
        q.put(task)

    def consume() -> None:
        while True:
            try:
                item = q.get(block=False, raw=True)
            except Empty:
                return
            q.ack(id=item["pqid"])

    timing = timed_threads(consume, slots, indexed=False)
    assert q.acked_count() == n, q.acked_count()
    return {**timing, "synchronous": synchronous()}


def child_litequeue(system: str, op: str, n: int, slots: int, root: Path) -> dict:

    from litequeue import LiteQueue

    path = str(root / "litequeue.db")
    tasks = [payload(i) for i in range(n)]
    clock = Clock()
    q = LiteQueue(path)

    def synchronous() -> int:
        return q.conn.execute("PRAGMA synchronous").fetchone()[0]

    if op == "push":
        for task in tasks:
            q.put(json.dumps(task))
        return {**clock.stop(), "synchronous": synchronous()}
    if op == "dedup":
        for task in tasks + tasks:
            q.put(json.dumps(task))
        return {"queued": q.qsize()}
    for task in tasks:
        q.put(json.dumps(task))
    done = [0] * slots

    def consume(index: int) -> None:
        mine = LiteQueue(path)  # a connection per thread: litequeue's transactions need it
        while True:
            message = mine.pop()
            if message is None:
                return
            json.loads(message.data)
            mine.done(message.message_id)
            done[index] += 1

    timing = timed_threads(consume, slots, indexed=True)
    assert sum(done) == n, done
    return {**timing, "synchronous": synchronous()}


CHILDREN = {
    "jobq": child_jobq,
    "jobq-async": child_jobq,
    "jobq-full": child_jobq,
    "huey": child_huey,
    "persist-queue": child_persist_queue,
    "litequeue": child_litequeue,
}


def run_child_main(spec: str) -> int:
    job = json.loads(spec)
    result = CHILDREN[job["system"]](
        job["system"], job["op"], job["n"], job["slots"], Path(job["root"])
    )
    print(json.dumps(result))
    return 0


# ============================================================================ parent


def peers_python() -> Path:
    """The peers' interpreter, installing them on first use."""
    python = PEERS_VENV / "bin" / "python"
    marker = PEERS_VENV / ".installed"
    if marker.exists() and marker.read_text() == " ".join(PEER_PACKAGES):
        return python
    print(f"installing {', '.join(PEER_PACKAGES)} into {PEERS_VENV} (once) ...", flush=True)
    venv.create(PEERS_VENV, with_pip=True, clear=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    marker.write_text(" ".join(PEER_PACKAGES))
    return python


@dataclass(frozen=True)
class Case:
    op: str  # push, drain, dedup
    n: int
    slots: int = 1

    @property
    def label(self) -> str:
        if self.op == "push":
            return f"push {self.n:,}"
        if self.op == "drain":
            return f"drain {self.n:,}, {self.slots} consumer(s)"
        return f"same {self.n:,} pushed twice"


@dataclass
class Samples:
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    synchronous: int | None = None
    queued: int | None = None
    failures: list[str] = field(default_factory=list)  # a peer's runs that raised


def run_one(system: str, case: Case, python: Path) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"jobq-peers-{system}-"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("JOBQ_LOCAL_DURABILITY", None)
    if system == "jobq-full":
        env["JOBQ_LOCAL_DURABILITY"] = "full"
    job = {
        "system": system,
        "op": case.op,
        "n": case.n,
        "slots": case.slots,
        "root": str(root),
    }
    try:
        out = subprocess.run(
            [str(python), __file__, "--child", json.dumps(job)],
            capture_output=True,
            text=True,
            cwd=root,
            env=env,
            timeout=1800,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if out.returncode != 0:
        if system in PEERS:  # e.g. litequeue's "database is locked" with 8 threads
            lines = [line for line in out.stderr.splitlines() if line.strip()]
            return {"failed": lines[-1] if lines else f"exit code {out.returncode}"}
        raise SystemExit(f"{system} {case.label} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(cases: list[tuple[Case, list[str]]], reps: int) -> dict[tuple[Case, str], Samples]:
    """Each case: every system once per repetition, in rotating order (ABC, BCA, CAB…)."""
    ours_python = Path(sys.executable)
    peer_python = peers_python()
    results: dict[tuple[Case, str], Samples] = {}
    for case, systems in cases:
        print(f"{case.label} ...", end="", flush=True)
        for rep in range(1 if case.op == "dedup" else reps):  # a count: once is enough
            shift = rep % len(systems)
            for system in systems[shift:] + systems[:shift]:
                python = ours_python if system.startswith("jobq") else peer_python
                result = run_one(system, case, python)
                samples = results.setdefault((case, system), Samples())
                if "failed" in result:
                    samples.failures.append(result["failed"])
                    print("x", end="", flush=True)
                    continue
                if "seconds" in result:
                    samples.seconds.append(result["seconds"])
                    samples.cpu.append(result["cpu"])
                samples.synchronous = result.get("synchronous", samples.synchronous)
                samples.queued = result.get("queued", samples.queued)
                print(".", end="", flush=True)
        print(flush=True)
    return results


def rate(case: Case, samples: Samples) -> float:
    return case.n / statistics.median(samples.seconds)


def cpu_rate(case: Case, samples: Samples) -> float:
    """Tasks per CPU-second of the process: what load elsewhere on the machine distorts
    least.  Time spent waiting for the disk (fsync) is not CPU time, so this favours
    the systems that flush every commit; the goals are judged on the wall clock."""
    return case.n / max(statistics.median(samples.cpu), 1e-9)


def rate_range(case: Case, samples: Samples) -> str:
    return f"{case.n / max(samples.seconds):,.0f}–{case.n / min(samples.seconds):,.0f}"


def report(
    results: dict[tuple[Case, str], Samples], sizes: Sizes, reps: int
) -> list[tuple[str, str]]:
    """Print a table per case; returns the goals as (text, PASS/MISS)."""
    goals: list[tuple[str, str]] = []
    by_case: dict[Case, dict[str, Samples]] = {}
    for (case, system), samples in results.items():
        if samples.failures:
            print(
                f"\n{system}, {case.label}: {len(samples.failures)} run(s) failed "
                f"({samples.failures[-1][:200]}); the others count"
            )
        if case.op != "dedup" and not samples.seconds:
            continue  # every run failed: no rate to compare with
        by_case.setdefault(case, {})[system] = samples
    for case, systems in by_case.items():
        if case.op == "dedup":
            continue
        print(f"\n{case.label}: tasks/s, median of {reps} (min–max); cpu: tasks per CPU-second")
        for system, samples in systems.items():
            sync = SYNC_NAMES.get(samples.synchronous or -1, "?")
            ratios = ""
            if system in OURS:
                ours = rate(case, samples)
                parts = [f"{ours / rate(case, systems[p]):.2f}× {p}" for p in PEERS if p in systems]
                ratios = "ours ÷ peer: " + ", ".join(parts)
            print(
                f"  {system:<14} {rate(case, samples):>9,.0f}/s  ({rate_range(case, samples):>15})"
                f"  cpu {cpu_rate(case, samples):>7,.0f}/s  synchronous={sync:<6}  {ratios}"
            )
        goals += case_goals(case, systems)
    dedup = [(case, systems) for case, systems in by_case.items() if case.op == "dedup"]
    for case, systems in dedup:
        print(f"\n{case.label}: tasks queued")
        for system, samples in systems.items():
            print(f"  {system:<14} {samples.queued:>6,}")
        ours = systems["jobq"].queued
        goals.append(
            (f"dedup: the same {case.n:,} pushed twice → {ours:,} queued", verdict(ours == case.n))
        )
    return goals


def case_goals(case: Case, systems: dict[str, Samples]) -> list[tuple[str, str]]:
    if "jobq" not in systems:
        return []
    ours = rate(case, systems["jobq"])
    if case.op == "push":
        worst = min(ours / rate(case, systems[p]) for p in PEERS if p in systems)
        return [(f"{case.label}: ≥ {PUSH_GOAL}× every peer ({worst:.2f}×)", verdict(worst >= 2))]
    goals = []
    if case.op == "drain" and "huey" in systems:
        huey = rate(case, systems["huey"])
        ratio = ours / huey
        goals.append(
            (
                f"{case.label}, sync tasks: ≥ {SYNC_DRAIN_GOAL}× huey ({ratio:.2f}×)",
                verdict(ratio >= SYNC_DRAIN_GOAL),
            )
        )
        if "jobq-async" in systems:
            # The ≥ 4× lead of async tasks is the one measured at 8 consumers; with one
            # consumer the sync goal applies to them too.
            goal = ASYNC_DRAIN_GOAL if case.slots > 1 else SYNC_DRAIN_GOAL
            ratio = rate(case, systems["jobq-async"]) / huey
            goals.append(
                (
                    f"{case.label}, async tasks: ≥ {goal}× huey ({ratio:.2f}×)",
                    verdict(ratio >= goal),
                )
            )
    return goals


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


@dataclass(frozen=True)
class Sizes:
    pushes: tuple[int, ...]
    drain: int
    dedup: int = 1_000


FULL = Sizes(pushes=(20_000, 100_000), drain=20_000)
QUICK = Sizes(pushes=(5_000,), drain=3_000)


def plan(
    sizes: Sizes, parts: list[str], drain_peers: tuple[str, ...]
) -> list[tuple[Case, list[str]]]:
    cases: list[tuple[Case, list[str]]] = []
    if "push" in parts:
        cases += [(Case("push", n), ["jobq", "jobq-full", *PEERS]) for n in sizes.pushes]
    if "drain" in parts:
        for slots in (1, 8):
            cases.append((Case("drain", sizes.drain, slots), [*OURS, *drain_peers]))
    if "dedup" in parts:
        cases.append((Case("dedup", sizes.dedup), ["jobq", *PEERS]))
    return cases


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (5 min {five:.1f}) on {os.cpu_count()} core(s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument(
        "--only", choices=("push", "drain", "dedup"), action="append", help="repeatable"
    )
    parser.add_argument(
        "--drain-peers",
        default=",".join(PEERS),
        help="peers in the drain runs (default: all; huey alone is much faster to run)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child_main(args.child)
    ensure_bytecode()  # see bench/bytecode.py
    sizes = QUICK if args.quick else FULL
    parts = args.only or ["push", "drain", "dedup"]
    print(load_line(), flush=True)
    drain_peers = tuple(p for p in args.drain_peers.split(",") if p)
    unknown = set(drain_peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")
    results = measure(plan(sizes, parts, drain_peers), args.reps)
    goals = report(results, sizes, args.reps)
    print(f"\n{load_line()} (at the end)")
    print("\ngoals:")
    for text, result in goals:
        print(f"  {result:<4}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
