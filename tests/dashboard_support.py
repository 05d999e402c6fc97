"""A local queue with known outcomes, for the dashboard and ``jobq top`` tests.

A real worker drains a real ``local://`` queue: four shell tasks succeed, two fail
with "disk full on /scratch" and are dead-lettered on their first attempt
(``num_retries=0``), and three more are pushed afterwards and stay queued.  The
worker's transitions and heartbeats go into a ledger through a worker hook; the
views then read that ledger and the queue's counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memory_ledger import MemoryLedger, MemoryLedgerHook

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.dashboard.snapshot import QueueSource
from ai4s_jobq.ledger.base import LedgerStore
from ai4s_jobq.worker.processors import ShellProcessor

FAILURE_TEXT = "disk full on /scratch"
SUCCEEDED, DEAD_LETTERED, QUEUED = 4, 2, 3


@dataclass
class KnownOutcomes:
    source: QueueSource
    ledger: LedgerStore
    succeeded_ids: list[str] = field(default_factory=list)
    failed_ids: list[str] = field(default_factory=list)
    queued_ids: list[str] = field(default_factory=list)


async def push_tagged(q: JobQ, ledger: MemoryLedger, tasks: list[dict], tag: str) -> list[str]:
    ids = []
    for task in tasks:
        ids.append((await q.push(**task)).id)
    ledger.record_push(ids, tag)
    return ids


async def make_known_outcomes(q: JobQ) -> KnownOutcomes:
    ledger = MemoryLedger()
    ok = [{"task": f"sleep 0.0{i}; echo ok {i}"} for i in range(SUCCEEDED)]
    bad = [
        {"task": f"echo '{FAILURE_TEXT} (task {i})' >&2; exit 3", "num_retries": 0}
        for i in range(DEAD_LETTERED)
    ]
    succeeded = await push_tagged(q, ledger, ok, "run-1")
    failed = await push_tagged(q, ledger, bad, "run-1")
    stats = await Worker(
        q.backend,
        ShellProcessor(),
        WorkerPolicy(slots=2, idle_timeout=0.3),
        hooks=[MemoryLedgerHook(ledger)],
    ).run()
    assert (stats.succeeded, stats.dead_lettered) == (SUCCEEDED, DEAD_LETTERED)
    queued = await push_tagged(q, ledger, [{"task": f"echo later {i}"} for i in range(3)], "run-2")
    source = QueueSource(q.backend.description, q, ledger)
    return KnownOutcomes(source, ledger, succeeded, failed, queued)
