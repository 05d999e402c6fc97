"""Fixed cost of short ``jobq`` commands on Service Bus (the emulator, loopback).

    python bench/bench_sb_commands.py [--repeat R]

Starts its own emulator as a subprocess and times whole ``jobq`` processes, as a
user runs them (interpreter start, imports, connecting, the work, closing):

* ``push -c CMD`` of one task, ``size``, ``peek``, ``dlq list`` (goal: each
  ≤ 0.5 s, the median over R runs), and for information ``clear --yes`` of one
  message and ``dlq requeue --all`` of one dead letter;

and, in the same run and interleaved with them (so load from other processes
hits both sides alike), baselines:

* ``python -c pass``: the interpreter alone;
* the raw SDK in one process: import ``azure.servicebus.aio``, open a sender,
  send one message, close (the least a push through the SDK can cost);
* with ``--baseline DIR``, the same commands run by an older checkout of jobq
  (``git archive REV | tar -x -C DIR``), for "now ÷ baseline" per command.

Each row has the median wall time, its min-max, the median CPU time (user +
system, which load inflates far less than wall time: the rest is waiting on the
broker and on the SDK's polls), and the ratios.
The goal is absolute (seconds), so the load average is printed too: on a loaded
machine every wall time grows, the ratios and CPU times much less.  The
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
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from azure.servicebus.aio.management import ServiceBusAdministrationClient
from bytecode import ensure_bytecode

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


@dataclass
class Timing:
    wall: float
    cpu: float  # user + system of the process and its children


@dataclass
class Variant:
    """One jobq to time: this checkout, or ``--baseline`` (an older one)."""

    name: str
    jobq: list[str]
    cwd: Path


def timed(argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> Timing:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timing(elapsed, cpu)


async def new_queue(cs: str) -> str:
    name = f"cmd-{uuid.uuid4().hex[:8]}"
    async with ServiceBusAdministrationClient.from_connection_string(
        cs, **admin_client_kwargs(cs)
    ) as admin:
        await admin.create_queue(name, requires_duplicate_detection=True, max_delivery_count=1)
    return name


def dead_letter_one(env: dict[str, str], variant: Variant, tag: str) -> None:
    """A task that fails on its only attempt ends up in the dead-letter queue."""
    jobq = variant.jobq
    timed([*jobq, "push", "--num-retries", "0", "-c", f"exit 3 # {tag}"], env, variant.cwd)
    timed([*jobq, "worker", "--idle-timeout", "0.5s"], env, variant.cwd)


def baseline_variant(path: str) -> Variant:
    """``--baseline DIR``: a checkout whose ``ai4s_jobq`` and ``cli`` are run with this
    interpreter (from DIR, so DIR's packages win over the installed ones)."""
    root = Path(path).resolve()
    shim = root / "ai4s_jobq_cli"
    if not shim.exists():  # the CLI installs as ai4s_jobq_cli; a checkout has cli/
        shim.symlink_to(root / "cli")
    return Variant("baseline", [sys.executable, "-m", "ai4s_jobq_cli"], root)


def main() -> None:
    ensure_bytecode()  # see bench/bytecode.py
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command (median)")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also time the jobq of this checkout (e.g. `git archive REV | tar -x -C DIR`), "
        "interleaved, and print now ÷ baseline",
    )
    args = parser.parse_args()
    variants = [Variant("now", jobq_command(), ROOT)]
    if args.baseline:
        variants.append(baseline_variant(args.baseline))
    rows: dict[tuple[str, str], list[Timing]] = {}
    with tempfile.TemporaryDirectory() as tmp, EmulatorProcess(Path(tmp) / "emulator") as em:
        cs = em.connection_string
        assert cs is not None
        queues = {v.name: asyncio.run(new_queue(cs)) for v in variants}
        for i in range(args.repeat):  # interleaved, so load changes hit every row alike
            base_env = {**os.environ, "JOBQ_CONNECTION_STRING": cs}
            rows.setdefault(("-", "python -c pass"), []).append(
                timed([sys.executable, "-c", "pass"], base_env)
            )
            raw = [sys.executable, "-c", RAW_SEND, queues["now"], f"raw-{i}"]
            rows.setdefault(("-", "raw SDK: send 1 message"), []).append(timed(raw, base_env))
            for v in variants:
                env = {**base_env, "JOBQ_QUEUE": f"sb://bench/{queues[v.name]}"}
                if i == 0:  # first run: .pyc files, the queue's first message
                    timed([*v.jobq, "push", "-c", "echo warm-up"], env, v.cwd)

                def run(label: str, *argv: str, v: Variant = v, env: dict[str, str] = env) -> None:
                    rows.setdefault((v.name, label), []).append(timed([*v.jobq, *argv], env, v.cwd))

                run("push 1 task", "push", "-c", f"echo {i}")
                run("size", "size")
                run("peek", "peek")
                dead_letter_one(env, v, f"dl-{i}")
                run("dlq list", "dlq", "list")
                run("dlq requeue --all (1)", "dlq", "requeue", "--all")
                run("clear --yes", "clear", "--yes")
    report(rows, args.repeat, [v.name for v in variants])


def report(rows: dict[tuple[str, str], list[Timing]], repeat: int, names: list[str]) -> None:
    def med(key: tuple[str, str], what: str = "wall") -> float:
        return statistics.median(getattr(t, what) for t in rows[key])

    raw = med(("-", "raw SDK: send 1 message"))
    load = os.getloadavg()
    print(
        f"whole-process times, {repeat} interleaved runs each, emulator on loopback; "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print(
        f"  {'':9}{'command':24} {'wall':>6}  {'min-max':>11}  {'cpu':>5}  "
        f"{'÷ raw SDK':>9}  {'÷ baseline':>10}"
    )
    for (name, label), values in rows.items():
        wall = med((name, label))
        goal = ""
        if name == "now" and label in GOALS:
            verdict = "PASS" if wall <= GOAL_SECONDS else "MISS"
            goal = f"  [{verdict} <= {GOAL_SECONDS:.1f}s]"
        versus = ""
        if name == "now" and ("baseline", label) in rows:
            versus = f"{wall / med(('baseline', label)):9.2f}x"
        walls = [t.wall for t in values]
        print(
            f"  {name:9}{label:24} {wall:5.2f}s  {min(walls):4.2f}-{max(walls):5.2f}s  "
            f"{med((name, label), 'cpu'):4.2f}s  {wall / raw:8.2f}x  {versus:>10}{goal}"
        )


if __name__ == "__main__":
    main()
