"""What a worker is told (:class:`WorkerPolicy`), what it counts (:class:`WorkerStats`)
and how it exits (:class:`ExitCode`): the loop's vocabulary, kept beside it so
:mod:`.loop` reads as the loop alone.  Importable from :mod:`.loop` as before."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from enum import IntEnum

from ..arguments import check_count, check_seconds
from .preemption import PreemptionPolicy
from .retry import RetryDelay


class ExitCode(IntEnum):
    OK = 0  # idle timeout, time limit or task limit reached
    TASK_FAILED = 1  # `jobq pull`: the one task failed
    TOO_MANY_FAILURES = 3  # --max-consecutive-failures reached
    CONFIGURATION = 4  # credentials refused or queue missing: retrying will not help
    SIGINT = 128 + signal.SIGINT
    SIGTERM = 128 + signal.SIGTERM


@dataclass
class WorkerPolicy:
    slots: int = 1
    idle_timeout: float = 5.0  # seconds with an empty queue and nothing running; 0 = never
    time_limit: float | None = None  # stop taking tasks after this many seconds
    max_consecutive_failures: int | None = None
    grace_period: float = 30.0  # on SIGTERM/SIGINT, before running tasks are killed
    max_tasks: int | None = None  # `jobq pull` is max_tasks=1
    retry_delay: RetryDelay = field(default_factory=RetryDelay)  # back-off between attempts
    max_interruptions: int = 10  # then dead-lettered as TooManyInterruptions
    preemption: PreemptionPolicy = field(default_factory=lambda: PreemptionPolicy(mode="off"))

    def __post_init__(self) -> None:
        """Refuse what the loop cannot run: ``slots=0`` waited for ever for a free slot,
        a negative ``idle_timeout`` spun the event loop at full CPU (deaf to SIGTERM),
        and a nan one never came."""
        check_count("WorkerPolicy.slots", self.slots, 1)
        check_seconds("WorkerPolicy.idle_timeout", self.idle_timeout)
        check_seconds("WorkerPolicy.grace_period", self.grace_period)
        if self.time_limit is not None:
            check_seconds("WorkerPolicy.time_limit", self.time_limit)
        if self.max_consecutive_failures is not None:
            check_count("WorkerPolicy.max_consecutive_failures", self.max_consecutive_failures, 0)
        if self.max_tasks is not None:
            check_count("WorkerPolicy.max_tasks", self.max_tasks, 1)
        check_count("WorkerPolicy.max_interruptions", self.max_interruptions, 0)


@dataclass
class WorkerStats:
    succeeded: int = 0
    failed: int = 0  # attempts that failed (retried or dead-lettered)
    dead_lettered: int = 0
    malformed: int = 0
    lost_locks: int = 0
    interrupted: int = 0
    rescheduled: int = 0  # retries put back with a delay
    consecutive_failures: int = 0
    stop_reason: str = ""
    exit_code: int = 0
