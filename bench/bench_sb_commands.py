"""Fixed cost of short ``jobq`` commands on Service Bus (the emulator, loopback).

    python bench/bench_sb_commands.py [--repeat R]

Starts its own emulator as a subprocess and times whole ``jobq`` processes, as a
user runs them (interpreter start, imports, connecting, the work, closing):

* ``push -c CMD`` of one task, ``size``, ``peek``, ``dlq list`` (goal: each
  ≤ 0.5 s, the median over R runs), and for information ``clear --yes`` of one
  message and ``dlq requeue --all`` of one dead letter;

and, in the same run and interleaved with them (so load from other processes
hits both sides alike), two baselines:

* ``python -c pass``: the interpreter alone;
* the raw SDK in one process: import ``azure.servicebus.aio``, open a sender,
  send one message, close (the least a push through the SDK can cost).

Each command's row prints its median, min-max, and the ratio to the raw SDK's
one-message process.  The goal is absolute (seconds), so the load average is
printed too: on a loaded machine every row grows, the ratios much less.  The
exit status is always 0: a benchmark, not a test.

What bounds an AMQP command here (measured, see docs/servicebus.md): the SDK
opens a link by reading one frame per 50 ms poll of its open loop, and opening
a connection + CBS + link takes about nine frames, so each sender or receiver
costs ~0.45 s to open however fast the broker answers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from azure.servicebus.aio.management import ServiceBusAdministrationClient

from ai4s_jobq.emulator.client import admin_client_kwargs
from ai4s_jobq.emulator.process import EmulatorProcess

ROOT = Path(__file__).resolve().parent.parent
GOAL_SECONDS = 0.5
GOALS = ("push 1 task", "size", "peek", "dlq list")

RAW_SEND = """
import asyncio, os, sys
from azure.servicebus import ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient

async def main():
    async with ServiceBusClient.from_connection_string(os.environ["JOBQ_CONNECTION_STRING"]) as c:
        async with c.get_queue_sender(sys.argv[1]) as sender:
            await sender.send_messages(ServiceBusMessage(b"raw", message_id=sys.argv[2]))

asyncio.run(main())
"""


def jobq_command() -> list[str]:
    found = shutil.which("jobq", path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, "-m", "ai4s_jobq_cli"]


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return elapsed


async def new_queue(cs: str) -> str:
    name = f"cmd-{uuid.uuid4().hex[:8]}"
    async with ServiceBusAdministrationClient.from_connection_string(
        cs, **admin_client_kwargs(cs)
    ) as admin:
        await admin.create_queue(name, requires_duplicate_detection=True, max_delivery_count=1)
    return name


def dead_letter_one(env: dict[str, str], jobq: list[str], tag: str) -> None:
    """A task that fails on its only attempt ends up in the dead-letter queue."""
    timed([*jobq, "push", "--num-retries", "0", "-c", f"exit 3 # {tag}"], env)
    timed([*jobq, "worker", "--idle-timeout", "0.5s"], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command (median)")
    args = parser.parse_args()
    jobq = jobq_command()
    with tempfile.TemporaryDirectory() as tmp, EmulatorProcess(Path(tmp) / "emulator") as em:
        cs = em.connection_string
        assert cs is not None
        queue = asyncio.run(new_queue(cs))
        env = {**os.environ, "JOBQ_CONNECTION_STRING": cs, "JOBQ_QUEUE": f"sb://bench/{queue}"}
        timed([*jobq, "push", "-c", "echo warm-up"], env)  # first run: .pyc files, queue
        rows: dict[str, list[float]] = {}

        def run(label: str, argv: list[str]) -> None:
            rows.setdefault(label, []).append(timed(argv, env))

        for i in range(args.repeat):  # interleaved, so load changes hit every row alike
            run("python -c pass", [sys.executable, "-c", "pass"])
            run("raw SDK: send 1 message", [sys.executable, "-c", RAW_SEND, queue, f"raw-{i}"])
            run("push 1 task", [*jobq, "push", "-c", f"echo {i}"])
            run("size", [*jobq, "size"])
            run("peek", [*jobq, "peek"])
            dead_letter_one(env, jobq, f"dl-{i}")
            run("dlq list", [*jobq, "dlq", "list"])
            run("dlq requeue --all (1)", [*jobq, "dlq", "requeue", "--all"])
            run("clear --yes", [*jobq, "clear", "--yes"])
    raw = statistics.median(rows["raw SDK: send 1 message"])
    load = os.getloadavg()
    print(
        f"whole-process wall time, {args.repeat} interleaved runs each, emulator on loopback; "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print(f"  {'command':28} {'median':>7}  {'min-max':>11}  {'÷ raw SDK send':>14}")
    for label, values in rows.items():
        med = statistics.median(values)
        goal = ""
        if label in GOALS:
            verdict = "PASS" if med <= GOAL_SECONDS else "MISS"
            goal = f"  [{verdict} <= {GOAL_SECONDS:.1f}s]"
        print(
            f"  {label:28} {med:6.2f}s  {min(values):4.2f}-{max(values):4.2f}s  "
            f"{med / raw:13.2f}x{goal}"
        )


if __name__ == "__main__":
    main()
