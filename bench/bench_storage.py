"""Storage Queue benchmark: jobq vs the original ai4s-jobq 3.13.1 vs the raw SDK, on one Azurite.

    python bench/bench_storage.py [--push-tasks 5000] [--drain-tasks 2000] [--slots 8]

What it does, in one run, against the repository's pinned Azurite (``npm ci`` if
needed):

1. push N shell tasks read from a file: ``jobq push FILE`` (dedup ledger on, the
   default) and ``ai4s-jobq ACCOUNT/QUEUE push < FILE``, each as a whole CLI process;
   and the raw-SDK ceiling: a process that sends the same number of messages with
   azure-storage-queue (aio), 32 sends in flight -- also timed as a whole process,
   so interpreter start-up counts the same for all three.
2. drain M ``true`` shell tasks with S slots: ``jobq worker -n S --idle-timeout 0.1s``
   (exit once the queue is empty, as ``ai4s-jobq worker`` does on its first empty receive)
   and ``ai4s-jobq ACCOUNT/QUEUE worker -n S`` (which exits when the queue is empty).

All steps run on the same Azurite (pinned binary, in-memory), drains first.  Two
Azurite traits shape the procedure:

* it scans every message it holds on each queue operation, so a step's queues
  are deleted when the step ends (leftovers would slow the next step);
* every 60 s it garbage-collects the storage of deleted messages, and that pass
  is quadratic in their number: ~15,000 deleted messages stall it for minutes,
  and whichever tool is running then times out.  So after deleting a step's
  queues the benchmark waits for a collection pass to finish (Azurite idle after
  its next 60 s tick) before the next step starts.  Deletes made *during* a step
  are collected during it, as they would be on a fresh Azurite.

Even so, Azurite is fastest on its first drain (measured: 13.9 s, then 18.4 s and
16.2 s for the same jobq drain, each after a collection pass).  So the drains run
counterbalanced, ai4s-jobq / jobq / jobq / ai4s-jobq, each on a fresh queue, and
the ratio compares the means: ai4s-jobq gets the fresh Azurite, and neither gets
a systematic later-is-slower drift.  Pushes run ai4s-jobq first too.  The Azurite
process's CPU seconds are printed per step: on 2 cores, Azurite is most of the
cost of a drain.

ai4s-jobq 3.13.1 is installed only in ``bench/.venv-ai4s`` (created here on first
use, from PyPI; gitignored), never in the project's environment.  Both CLIs read the
connection string from ``JOBQ_CONNECTION_STRING``.  Results are printed and written
to ``bench/results/storage.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bytecode import ensure_bytecode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from azurite_fixtures import ACCOUNT, start_azurite, stop_azurite  # noqa: E402

ORIGINAL = "ai4s-jobq==3.13.1"
ORIGINAL_VENV = ROOT / "bench" / ".venv-ai4s"
RESULTS = ROOT / "bench" / "results" / "storage.json"

RAW_SENDER = r"""
import asyncio, sys, time
from azure.storage.queue.aio import QueueClient

async def main(connection_string, queue, count, template):
    async with QueueClient.from_connection_string(connection_string, queue) as client:
        limit = asyncio.Semaphore(32)

        async def send(n):
            async with limit:
                await client.send_message(template.replace("{N}", str(n)), time_to_live=-1)

        started = time.perf_counter()
        await asyncio.gather(*(send(n) for n in range(count)))
        print(time.perf_counter() - started)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
"""


def original_cli() -> Path:
    """``ai4s-jobq`` in its own venv, installed on first use."""
    cli = ORIGINAL_VENV / "bin" / "ai4s-jobq"
    if cli.exists():
        return cli
    print(f"installing {ORIGINAL} into {ORIGINAL_VENV} (once) ...", flush=True)
    venv.create(ORIGINAL_VENV, with_pip=True)
    subprocess.run([str(ORIGINAL_VENV / "bin" / "pip"), "install", "-q", ORIGINAL], check=True)
    return cli


def jobq_cli() -> list[str]:
    found = shutil.which("jobq", path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, "-m", "ai4s_jobq_cli.main"]


def timed(
    command: list[str], env: dict[str, str], *, stdin: Path | None = None, log: Path
) -> float:
    started = time.perf_counter()
    with open(log, "wb") as out, open(stdin or os.devnull, "rb") as source:
        result = subprocess.run(
            command, env=env, stdin=source, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"{command[0]} exited {result.returncode}:\n{tail}")
    return elapsed


async def queue_count(connection_string: str, queue: str) -> int:
    from azure.storage.queue.aio import QueueClient

    async with QueueClient.from_connection_string(connection_string, queue) as client:
        return (await client.get_queue_properties()).approximate_message_count or 0


def message_template() -> str:
    """What jobq puts in the queue for ``echo task N`` (same size for the raw sender)."""
    from ai4s_jobq.backends.storage.wire import encode_text
    from ai4s_jobq.task import make_task

    task = make_task("echo task 999999")
    return encode_text({"id": task.id}, task.to_body()).replace("999999", "{N}")


@contextmanager
def azurite_running(work: Path) -> Iterator[tuple[str, int]]:
    """One in-memory Azurite for the whole run: (connection string, pid)."""
    process, azurite, _ = start_azurite(work)
    try:
        yield azurite.connection_string, process.pid
    finally:
        stop_azurite(process)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (Linux ``/proc``), for the per-step report."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(
    pid: int, deleted_at: float, *, tick: float = 62.0, idle_for: float = 2.0, limit: float = 600.0
) -> float:
    """Wait until Azurite's garbage collection of a step's deleted messages is over:
    its 60 s timer has fired since ``deleted_at`` and it has been idle (< 5% CPU)
    for ``idle_for`` seconds.  Returns the seconds waited."""
    started = time.monotonic()
    time.sleep(max(0.0, deleted_at + tick - time.monotonic()))
    quiet_since, last = time.monotonic(), cpu_seconds(pid)
    while time.monotonic() - started < limit:
        time.sleep(0.5)
        now, cpu = time.monotonic(), cpu_seconds(pid)
        if cpu - last > 0.025:
            quiet_since = now
        elif now - quiet_since >= idle_for:
            break
        last = cpu
    return time.monotonic() - started


def delete_queues(connection_string: str, *names: str) -> None:
    """End of a step: drop its queues (and their ``-failed`` siblings)."""
    from azure.core.exceptions import ResourceNotFoundError
    from azure.storage.queue import QueueServiceClient

    service = QueueServiceClient.from_connection_string(connection_string)
    for name in names:
        for queue in (name, f"{name}-failed"):
            try:
                service.delete_queue(queue)
            except ResourceNotFoundError:
                pass


def bench(args: argparse.Namespace, work: Path) -> dict[str, float]:
    original = str(original_cli())
    jobq = jobq_cli()
    results: dict[str, float] = {}

    def env_for(connection_string: str) -> dict[str, str]:
        env = {**os.environ, "JOBQ_CONNECTION_STRING": connection_string}
        env.pop("JOBQ_QUEUE", None)
        return env

    push_file = work / "push.txt"
    push_file.write_text("".join(f"echo task {n}\n" for n in range(args.push_tasks)))
    drain_file = work / "drain.txt"
    drain_file.write_text("".join(f"true {n}\n" for n in range(args.drain_tasks)))

    with azurite_running(work) as (connection_string, pid):
        env = env_for(connection_string)

        def step(
            name: str, queue: str, measure: Callable[[], float], *, last: bool = False
        ) -> None:
            cpu = cpu_seconds(pid)
            results[f"{name}_s"] = measure()
            results[f"{name}_azurite_cpu_s"] = cpu_seconds(pid) - cpu
            results[f"{name}_left"] = asyncio.run(queue_count(connection_string, queue))
            print(f"  {name}: {results[f'{name}_s']:.2f} s", flush=True)
            delete_queues(connection_string, queue)
            if not last:
                waited = settle(pid, time.monotonic())
                print(f"  (waited {waited:.0f} s for Azurite's garbage collection)", flush=True)

        print(
            f"drain {args.drain_tasks} `true` tasks with {args.slots} slots "
            "(ai4s-jobq, jobq, jobq, ai4s-jobq)",
            flush=True,
        )

        def drain_ai4s(run: int) -> None:
            queue = f"bench-drain-ai4s{run}"
            timed(
                [original, f"{ACCOUNT}/{queue}", "push"],
                env,
                stdin=drain_file,
                log=work / f"fill-ai4s{run}.log",
            )
            step(
                f"drain_ai4s{run}",
                queue,
                lambda: timed(
                    [original, f"{ACCOUNT}/{queue}", "worker", "-n", str(args.slots)],
                    env,
                    log=work / f"drain-ai4s{run}.log",
                ),
            )

        def drain_jobq(run: int) -> None:
            queue = f"bench-drain-jobq{run}"
            timed(
                [*jobq, "--queue", f"{ACCOUNT}/{queue}", "push", str(drain_file), "--no-progress"],
                env,
                log=work / f"fill-jobq{run}.log",
            )
            step(
                f"drain_jobq{run}",
                queue,
                lambda: timed(
                    [
                        *jobq,
                        "--queue",
                        f"{ACCOUNT}/{queue}",
                        "--quiet",
                        "worker",
                        "-n",
                        str(args.slots),
                        "--idle-timeout",
                        "0.1s",
                    ],
                    env,
                    log=work / f"drain-jobq{run}.log",
                ),
            )

        drain_ai4s(1)
        drain_jobq(1)
        drain_jobq(2)
        drain_ai4s(2)
        for tool in ("ai4s", "jobq"):
            for suffix in ("s", "azurite_cpu_s", "left"):
                values = [results[f"drain_{tool}{run}_{suffix}"] for run in (1, 2)]
                results[f"drain_{tool}_{suffix}"] = (
                    sum(values) / 2 if suffix != "left" else sum(values)
                )

        print(f"push {args.push_tasks} shell tasks from a file", flush=True)
        raw_sends: list[float] = []

        def raw_push() -> float:
            from azure.storage.queue import QueueClient

            QueueClient.from_connection_string(connection_string, "bench-raw").create_queue()
            started = time.perf_counter()
            raw = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    RAW_SENDER,
                    connection_string,
                    "bench-raw",
                    str(args.push_tasks),
                    message_template(),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            raw_sends.append(float(raw.stdout.strip()))
            return time.perf_counter() - started

        step("push_raw_sdk_process", "bench-raw", raw_push)
        results["push_raw_sdk_sends_only_s"] = raw_sends[0]
        step(
            "push_ai4s",
            "bench-push-ai4s",
            lambda: timed(
                [original, f"{ACCOUNT}/bench-push-ai4s", "push"],
                env,
                stdin=push_file,
                log=work / "push-ai4s.log",
            ),
        )
        step(
            "push_jobq",
            "bench-push-jobq",
            lambda: timed(
                [
                    *jobq,
                    "--queue",
                    f"{ACCOUNT}/bench-push-jobq",
                    "-v",
                    "push",
                    str(push_file),
                    "--no-progress",
                ],
                env,
                log=work / "push-jobq.log",
            ),
            last=True,
        )
    return results


def report(args: argparse.Namespace, r: dict[str, float]) -> None:
    n, m = args.push_tasks, args.drain_tasks
    print()
    print(f"{'':44}{'wall s':>9}{'tasks/s':>10}{'Azurite CPU s':>15}")
    for label, key, count in [
        ("push: raw SDK ceiling (process)", "push_raw_sdk_process_s", n),
        ("push: raw SDK ceiling (sends only)", "push_raw_sdk_sends_only_s", n),
        ("push: jobq push (dedup ledger on)", "push_jobq_s", n),
        ("push: ai4s-jobq 3.13.1 push", "push_ai4s_s", n),
        (f"drain: ai4s-jobq worker -n {args.slots}, 1st", "drain_ai4s1_s", m),
        (f"drain: jobq worker -n {args.slots}, 1st", "drain_jobq1_s", m),
        (f"drain: jobq worker -n {args.slots}, 2nd", "drain_jobq2_s", m),
        (f"drain: ai4s-jobq worker -n {args.slots}, 2nd", "drain_ai4s2_s", m),
        (f"drain: jobq worker -n {args.slots}, mean", "drain_jobq_s", m),
        (f"drain: ai4s-jobq worker -n {args.slots}, mean", "drain_ai4s_s", m),
    ]:
        cpu = r.get(key[:-2] + "_azurite_cpu_s")
        cpu_text = f"{cpu:15.1f}" if cpu is not None else ""
        print(f"{label:44}{r[key]:9.2f}{count / r[key]:10.0f}{cpu_text}")
    print()
    ceiling = r["push_raw_sdk_process_s"] / r["push_jobq_s"]
    push_ratio = r["push_ai4s_s"] / r["push_jobq_s"]
    drain_ratio = r["drain_ai4s_s"] / r["drain_jobq_s"]
    print(f"push  jobq vs raw-SDK ceiling (process): {ceiling:.0%}  (goal >= 85%)")
    print(f"push  jobq vs ai4s-jobq:                 {push_ratio:.2f}x faster  (goal > 1x)")
    print(f"drain jobq vs ai4s-jobq (means):         {drain_ratio:.2f}x faster  (goal >= 5x)")
    print(
        f"messages in queue after push: jobq {r['push_jobq_left']:.0f}, ai4s-jobq "
        f"{r['push_ai4s_left']:.0f}; left after drain: jobq {r['drain_jobq_left']:.0f}, "
        f"ai4s-jobq {r['drain_ai4s_left']:.0f}"
    )


def main() -> None:
    ensure_bytecode()  # see bench/bytecode.py
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--push-tasks", type=int, default=5000)
    parser.add_argument("--drain-tasks", type=int, default=2000)
    parser.add_argument("--slots", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jobq-bench-storage-"))
    results = bench(args, work)
    report(args, results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"\nlogs in {work}; figures in {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
