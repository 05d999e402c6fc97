"""Benchmark of the Service Bus backend against the local emulator.

    python bench/bench_servicebus.py [--messages N] [--drain N]

Starts its own emulator as a subprocess (client and broker do not share a GIL) and
measures, in the same run and on the same emulator, each on a fresh queue with
duplicate detection on:

1. the raw SDK sending one message per ``send_messages`` call (on a sample);
2. the raw SDK's batch send (``ServiceBusMessageBatch`` filled to the size limit);
3. ``JobQ.push_many`` of N distinct tasks (task IDs, envelopes, batches);
4. ``jobq push FILE`` of N tasks in a subprocess: wall time (interpreter start,
   connecting and closing included) and the push time the command reports;
5. draining no-op Python tasks with the worker (``Worker`` + ``CallableProcessor``)
   vs. the raw SDK's receive + complete loop.

Raw SDK messages carry bodies of the same size as the task envelopes.  Goals (from
the issue): push ≥ 10× one-by-one, and within 1.3× of raw batch send.  The exit
status is always 0: a benchmark, not a test; goals are reported as PASS/MISS.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from azure.servicebus import ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient
from azure.servicebus.aio.management import ServiceBusAdministrationClient

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.emulator.client import admin_client_kwargs
from ai4s_jobq.emulator.process import EmulatorProcess
from ai4s_jobq.processors import CallableProcessor
from ai4s_jobq.task import make_task

ROOT = Path(__file__).resolve().parent.parent


def task_text(i: int, prefix: str) -> str:
    return f"python run.py --input shard-{prefix}-{i:07d}.parquet --out results/{i:07d}"


def body_like_task(i: int, prefix: str) -> bytes:
    return make_task(task_text(i, prefix), deterministic=False).to_body()


async def new_queue(cs: str) -> str:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    async with ServiceBusAdministrationClient.from_connection_string(
            cs, **admin_client_kwargs(cs)) as admin:
        await admin.create_queue(name, requires_duplicate_detection=True)
    return name


async def raw_one_by_one(cs: str, count: int) -> float:
    queue = await new_queue(cs)
    async with ServiceBusClient.from_connection_string(cs) as client, \
            client.get_queue_sender(queue) as sender:
        await sender.send_messages(ServiceBusMessage(b"warm-up"))
        start = time.perf_counter()
        for i in range(count):
            await sender.send_messages(ServiceBusMessage(body_like_task(i, "one"),
                                                         message_id=uuid.uuid4().hex))
        return time.perf_counter() - start


async def raw_batches(cs: str, count: int) -> float:
    queue = await new_queue(cs)
    async with ServiceBusClient.from_connection_string(cs) as client, \
            client.get_queue_sender(queue) as sender:
        await sender.send_messages(ServiceBusMessage(b"warm-up"))
        start = time.perf_counter()
        batch = await sender.create_message_batch()
        for i in range(count):
            message = ServiceBusMessage(body_like_task(i, "raw"), message_id=uuid.uuid4().hex)
            try:
                batch.add_message(message)
            except ValueError:  # full: send it and start the next
                await sender.send_messages(batch)
                batch = await sender.create_message_batch()
                batch.add_message(message)
        await sender.send_messages(batch)
        return time.perf_counter() - start


async def jobq_push_many(cs: str, count: int) -> float:
    queue = await new_queue(cs)
    async with JobQ.open(f"sb://bench/{queue}", connection_string=cs) as q:
        await q.push("echo warm-up")
        start = time.perf_counter()
        summary = await q.push_many(task_text(i, "many") for i in range(count))
        elapsed = time.perf_counter() - start
        assert not summary.failures, summary.failures[:3]
        assert (await q.counts()).active == count + 1
    return elapsed


def jobq_push_cli(cs: str, count: int, workdir: Path) -> tuple[float, float]:
    queue = asyncio.run(new_queue(cs))
    env = {**os.environ, "JOBQ_CONNECTION_STRING": cs, "JOBQ_QUEUE": f"sb://bench/{queue}"}
    lines = workdir / "tasks.txt"
    lines.write_text("".join(task_text(i, "cli") + "\n" for i in range(count)))

    def push(*args: str) -> tuple[float, float]:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "cli", "push", *args], env=env, cwd=ROOT,
                              check=True, capture_output=True, text=True)
        wall = time.perf_counter() - start
        # the CLI's own summary: "... in 1.23s to sb://..." (the push itself)
        reported = re.search(r" in ([0-9.]+)s to ", done.stderr)
        return wall, float(reported.group(1)) if reported else wall

    push("-c", "echo warm-up")
    return push(str(lines))


async def raw_drain(cs: str, count: int) -> float:
    queue = await new_queue(cs)
    async with ServiceBusClient.from_connection_string(cs) as client:
        async with client.get_queue_sender(queue) as sender:
            batch = await sender.create_message_batch()
            for i in range(count):
                message = ServiceBusMessage(body_like_task(i, "drain"))
                try:
                    batch.add_message(message)
                except ValueError:
                    await sender.send_messages(batch)
                    batch = await sender.create_message_batch()
                    batch.add_message(message)
            await sender.send_messages(batch)
        done = 0
        async with client.get_queue_receiver(queue, prefetch_count=100) as receiver:
            start = time.perf_counter()
            while done < count:
                messages = await receiver.receive_messages(
                    max_message_count=min(100, count - done), max_wait_time=5)
                if not messages:
                    raise SystemExit(f"raw drain: only {done} of {count} messages")
                await asyncio.gather(*(receiver.complete_message(m) for m in messages))
                done += len(messages)
            return time.perf_counter() - start


def noop(**_: object) -> None:
    return None


async def worker_drain(cs: str, count: int, slots: int) -> float:
    queue = await new_queue(cs)
    async with JobQ.open(f"sb://bench/{queue}", connection_string=cs) as q:
        await q.push_many({"i": i, "slots": slots} for i in range(count))
        policy = WorkerPolicy(slots=slots, idle_timeout=1.0)
        start = time.perf_counter()
        stats = await Worker(q.backend, CallableProcessor(noop), policy).run()
        elapsed = time.perf_counter() - start - policy.idle_timeout  # the idle wait at the end
        assert stats.succeeded == count, stats
        assert (await q.counts()).active == 0
    return elapsed


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000, help="tasks to push")
    parser.add_argument("--single", type=int, default=500,
                        help="messages for the one-by-one sample")
    parser.add_argument("--drain", type=int, default=2000, help="tasks to drain")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    n = args.messages
    with tempfile.TemporaryDirectory() as tmp, EmulatorProcess(Path(tmp) / "emulator") as em:
        cs = em.connection_string
        assert cs is not None
        single = args.single / asyncio.run(raw_one_by_one(cs, args.single))
        raw = n / asyncio.run(raw_batches(cs, n))
        many = n / asyncio.run(jobq_push_many(cs, n))
        cli_wall, cli_push = jobq_push_cli(cs, n, Path(tmp))
        cli = n / cli_wall
        cli_net = n / cli_push
        raw_recv = args.drain / asyncio.run(raw_drain(cs, args.drain))
        drains = {slots: args.drain / asyncio.run(worker_drain(cs, args.drain, slots))
                  for slots in (1, 8, 32)}

    print(f"push, {n} tasks (one-by-one: {args.single}), msgs/s:")
    print(f"  raw SDK one-by-one send   : {single:8.0f}")
    print(f"  raw SDK batch send        : {raw:8.0f}")
    print(f"  JobQ.push_many            : {many:8.0f}   {many / single:5.1f}x one-by-one "
          f"[{verdict(many / single >= 10)} >= 10x]   raw batch is {raw / many:4.2f}x "
          f"[{verdict(raw / many <= 1.3)} <= 1.3x]")
    print(f"  jobq push FILE (wall)     : {cli:8.0f}   {cli / single:5.1f}x one-by-one   "
          f"raw batch is {raw / cli:4.2f}x  (includes {cli_wall - cli_push:.2f}s of process "
          "start, connect and close)")
    print(f"  jobq push FILE (push)     : {cli_net:8.0f}   {cli_net / single:5.1f}x one-by-one "
          f"[{verdict(cli_net / single >= 10)} >= 10x]   raw batch is {raw / cli_net:4.2f}x "
          f"[{verdict(raw / cli_net <= 1.3)} <= 1.3x]")
    print(f"drain of no-op tasks, {args.drain} tasks, msgs/s:")
    print(f"  raw SDK receive+complete (prefetch 100): {raw_recv:8.0f}")
    for slots, rate in drains.items():
        print(f"  worker, {slots:2d} slot(s)                   : {rate:8.0f}   "
              f"({rate / raw_recv:4.2f}x raw)")


if __name__ == "__main__":
    main()
