"""Worker scenarios every backend must pass, written once and run by each backend's
test module against its real broker (local SQLite, the emulator, Azurite)."""

from __future__ import annotations

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.processors import ShellProcessor
from ai4s_jobq.worker import ExitCode


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
    assert dead.delivery_count == 3
    assert dead.reason == "NonZeroExit"
    assert "exit code 3" in (dead.description or "")
    assert "something broke" in (dead.description or "")
