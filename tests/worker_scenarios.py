"""Worker scenarios every backend must pass, written once and run by each backend's
test module against its real broker (local SQLite, the emulator, Azurite)."""

from __future__ import annotations

from pathlib import Path

import sample_tasks

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.backends.base import OutgoingMessage
from ai4s_jobq.worker.attempts import RunCounters
from ai4s_jobq.worker.loop import ExitCode
from ai4s_jobq.worker.processors import CallableProcessor, ShellProcessor


async def success_retry_then_dead_letter(q: JobQ, policy: WorkerPolicy) -> None:
    """One task succeeds; one fails three times (num_retries=2) and is dead-lettered
    with the exit code and the tail of its stderr."""
    await q.push("echo fine")
    bad = await q.push("echo 'something broke' >&2; exit 3", num_retries=2)
    stats = await Worker(q.backend, ShellProcessor(), policy).run()
    assert (stats.succeeded, stats.failed, stats.dead_lettered) == (1, 3, 1)
    assert stats.exit_code == ExitCode.OK
    counts = await q.counts()
    assert (counts.active, counts.dead_letter) == (0, 1)
    (dead,) = await q.dlq_list()
    assert dead.task is not None and dead.task.id == bad.id
    assert RunCounters.of(dead.task).attempt == 3  # counted in the envelope, not by the broker
    assert dead.reason == "NonZeroExit"
    assert "exit code 3" in (dead.description or "")
    assert "something broke" in (dead.description or "")


async def malformed_messages_dead_lettered(q: JobQ, policy: WorkerPolicy, log: Path) -> None:
    """Two messages that are not tasks are dead-lettered as MalformedTask with what is
    wrong; the task behind them still runs."""
    await q.backend.push(
        [OutgoingMessage("junk-1", b"\xff\xfe not json"), OutgoingMessage("junk-2", b'{"id": "x"}')]
    )
    await q.push({"log": str(log), "name": "after"})
    stats = await Worker(q.backend, CallableProcessor(sample_tasks.record), policy).run()
    assert (stats.malformed, stats.succeeded) == (2, 1)
    assert "end after" in log.read_text()
    reasons = {d.message_id: (d.reason, d.description or "") for d in await q.dlq_list()}
    assert reasons["junk-1"][0] == "MalformedTask" and "UTF-8" in reasons["junk-1"][1]
    assert "'args'" in reasons["junk-2"][1]


async def drain_recorded(q: JobQ, log: Path, names: list[str]) -> None:
    """Run a worker over ``async_record`` tasks named ``names`` (already pushed): all
    succeed, the queue ends empty, and each ran to its end exactly once."""
    stats = await Worker(
        q.backend, CallableProcessor(sample_tasks.async_record), WorkerPolicy(idle_timeout=0.5)
    ).run()
    assert (stats.succeeded, stats.failed) == (len(names), 0)
    counts = await q.counts()
    assert (counts.active, counts.dead_letter) == (0, 0)
    ends = sorted(
        line.split()[1] for line in log.read_text().splitlines() if line.startswith("end")
    )
    assert ends == sorted(names)


def checkpointing_task(directory: Path) -> str:
    """A shell task that, on SIGTERM, writes a checkpoint and exits; run again with a
    checkpoint present it records what its environment says and succeeds."""
    d = str(directory)
    return (
        f"if [ -f {d}/ckpt ]; then "
        'echo "attempt=$JOBQ_ATTEMPT interruptions=$JOBQ_INTERRUPTIONS"'
        f" > {d}/resumed; exit 0; fi; "
        f"trap 'echo saved > {d}/ckpt; exit 143' TERM; "
        f"touch {d}/started; sleep 60 & wait"
    )


async def preempted_mid_task(q: JobQ, imds, directory: Path, **policy_args) -> None:
    """A Preempt notice (from the fake IMDS) while a task runs: intake stops (the second
    task is not started), the task gets SIGTERM and writes its checkpoint, its message
    comes back at once (the next worker gets it long before the lock would expire),
    no retry was used and the task sees JOBQ_INTERRUPTIONS=1 on its next run."""
    import asyncio
    import time

    from ai4s_jobq.worker.preemption import PreemptionPolicy
    from ai4s_jobq.worker.retry import RetryDelay

    await q.push(checkpointing_task(directory), num_retries=0)
    await q.push(f"touch {directory}/second")
    policy = WorkerPolicy(
        idle_timeout=0,
        grace_period=20,
        retry_delay=RetryDelay.fixed(300),  # a used retry would not come back in this test
        preemption=PreemptionPolicy(mode="imds", endpoint=imds.endpoint, interval=0.1),
        **policy_args,
    )
    worker = asyncio.ensure_future(Worker(q.backend, ShellProcessor(), policy).run())
    deadline = time.monotonic() + 30
    while not (directory / "started").exists():
        assert time.monotonic() < deadline and not worker.done(), "the task never started"
        await asyncio.sleep(0.02)
    imds.schedule("Preempt", in_seconds=30)
    stats = await asyncio.wait_for(worker, 20)
    assert stats.stop_reason == "preempted (Preempt)"
    assert (stats.interrupted, stats.failed, stats.succeeded) == (1, 0, 0)
    assert (directory / "ckpt").read_text().strip() == "saved"
    assert not (directory / "second").exists()  # intake stopped at the notice
    assert imds.acks == []  # not told to acknowledge
    # The message is back at once: a worker whose idle timeout is far shorter than the
    # lock (5 minutes) gets it, on its first attempt, with one interruption recorded.
    again = await Worker(
        q.backend, ShellProcessor(), WorkerPolicy(idle_timeout=2, retry_delay=RetryDelay())
    ).run()
    assert (again.succeeded, again.failed) == (2, 0)
    assert (directory / "resumed").read_text().split() == ["attempt=1", "interruptions=1"]
    counts = await q.counts()
    assert (counts.active, counts.dead_letter) == (0, 0)


def crash_mid_reschedule(spec: str, env: dict[str, str], log: Path, marker: Path) -> None:
    """Kill a worker between sending a delayed retry and completing the original (a
    real process exit), then drain with a fresh worker: the task ran exactly twice
    (attempt 1, then attempt 2 from the copy), the original's redelivery was put back
    as the same copy (dropped by duplicate detection) -- never lost, never doubled."""
    import asyncio
    import subprocess
    import sys

    from conftest import ROOT

    crashed = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "crash_mid_reschedule.py"), spec],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert crashed.returncode == 9, crashed.stderr
    assert log.read_text().splitlines() == ["1 0"], (log.read_text(), crashed.stderr[-3000:])

    async def drain() -> None:
        from ai4s_jobq.worker.retry import RetryDelay

        cs = env.get("JOBQ_CONNECTION_STRING")
        async with JobQ.open(spec, connection_string=cs, check=False) as q:
            # idle timeout past the original's lock (3 s): its redelivery is seen too
            policy = WorkerPolicy(idle_timeout=6, retry_delay=RetryDelay.fixed(1))
            stats = await Worker(
                q.backend, CallableProcessor(sample_tasks.fail_first), policy
            ).run()
            # The original's redelivery is one interruption; on Service Bus the dying
            # worker's receiver may also have been handed the copy (prefetch) before its
            # connection was seen to close: one more, honestly counted.
            assert (stats.succeeded, stats.failed) == (1, 0)
            assert stats.interrupted in (1, 2)
            counts = await q.counts()
            assert (counts.active, counts.dead_letter, counts.scheduled or 0) == (0, 0, 0)

    asyncio.run(drain())
    runs = log.read_text().splitlines()
    assert len(runs) == 2, runs  # never doubled: the copy ran once, the original never again
    assert runs[0] == "1 0" and runs[1].split()[0] == "2"  # the retry kept its attempt
