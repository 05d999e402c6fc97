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
