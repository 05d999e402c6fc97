"""A local queue with known outcomes, for the dashboard and ``jobq top`` tests.

A real worker drains a real ``local://`` queue and records into the queue's real
SQLite ledger (``JobQ.ledger``, through the same ``ledger_hooks`` that ``jobq worker``
uses): four shell tasks succeed, two fail with "disk full on /scratch" and are
dead-lettered on their first attempt (``num_retries=0``), all tagged ``run-1``; three
more are pushed afterwards with tag ``run-2`` and stay queued.  The views then read
that ledger and the queue's counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.dashboard.snapshot import QueueSource
from ai4s_jobq.ledger.recorder import ledger_hooks
from ai4s_jobq.worker.processors import ShellProcessor

FAILURE_TEXT = "disk full on /scratch"
SUCCEEDED, DEAD_LETTERED, QUEUED = 4, 2, 3


@dataclass
class KnownOutcomes:
    source: QueueSource
    succeeded_ids: list[str] = field(default_factory=list)
    failed_ids: list[str] = field(default_factory=list)
    queued_ids: list[str] = field(default_factory=list)


async def run_worker(q: JobQ, slots: int = 2) -> None:
    """Drain ``q`` with a real worker that records into the queue's ledger."""
    policy = WorkerPolicy(slots=slots, idle_timeout=0.3)
    await Worker(q.backend, ShellProcessor(), policy, hooks=ledger_hooks(q)).run()


async def make_known_outcomes(q: JobQ) -> KnownOutcomes:
    assert q.ledger is not None, "a local queue always has its SQLite ledger"
    succeeded = [
        (await q.push(f"sleep 0.0{i}; echo ok {i}", tag="run-1")).id for i in range(SUCCEEDED)
    ]
    failed = [
        (
            await q.push(
                f"echo '{FAILURE_TEXT} (task {i})' >&2; exit 3", num_retries=0, tag="run-1"
            )
        ).id
        for i in range(DEAD_LETTERED)
    ]
    await run_worker(q)
    status = await q.ledger.status()
    assert status.counts == {"succeeded": SUCCEEDED, "dead_lettered": DEAD_LETTERED}, status
    queued = [(await q.push(f"echo later {i}", tag="run-2")).id for i in range(QUEUED)]
    source = QueueSource(q.backend.description, q, q.ledger)
    return KnownOutcomes(source, succeeded, failed, queued)
