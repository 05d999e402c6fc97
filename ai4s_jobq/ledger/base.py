"""The outcome ledger's vocabulary and the store interface every backend implements.

The queue forgets a task once it is completed; the ledger remembers what became of it.
One record per task ID holds its state, attempts, timestamps, the worker that ran it,
the error summary or the result.  Tags (``push --tag run-42``) group task IDs into
runs; membership is recorded for every pushed task, duplicates included.  Workers also
write heartbeats here, so ``jobq workers``, ``jobq status``, ``jobq top`` and the
dashboard read one place.

Why a separate store and not the queue: delivery stays the queue's job (it is the
source of truth for what still has to run); the ledger is written in batches beside it
and a ledger failure never fails a push or a task.  Each backend has one store
implementation (SQLite in the local queue's file, an Azure Table for Storage Queue and
Service Bus); :mod:`.wait` and the CLI work over this interface only.

This module is the contract between the writers (push, the worker hook) and the
readers (wait, status, tasks, result, workers, top, dashboard).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .events import AttemptEvent, PushRecord


class TaskState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # an attempt failed; the task will be retried
    DEAD_LETTERED = "dead_lettered"
    INTERRUPTED = "interrupted"  # stopped by shutdown/preemption/time limit; will run again

    @property
    def final(self) -> bool:
        return self in (TaskState.SUCCEEDED, TaskState.DEAD_LETTERED)


FINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.DEAD_LETTERED})

#: a Python task's JSON result larger than this is recorded as too large (the task
#: still succeeds)
MAX_RESULT_BYTES = 32 * 1024
#: records older than this are pruned (``jobq ledger prune``, and on a schedule)
DEFAULT_RETENTION_DAYS = 30
#: a worker whose last heartbeat is older than this is shown as stale
DEFAULT_HEARTBEAT_SECONDS = 15.0
#: the longest tag: its Azure Table partition key (the tag hex-encoded when it has
#: characters Table keys forbid, behind the queue's name) must stay under 1 KiB
MAX_TAG_CHARS = 100


def check_tag(tag: str) -> str:
    """``tag`` if it can name a run, else ValueError saying why.  An empty one usually
    comes from an unset shell variable (``--tag "$RUN"``): its tasks would quietly
    share one nameless run."""
    if not tag:
        raise ValueError("a tag needs a name: got an empty string (is the variable set?)")
    if len(tag) > MAX_TAG_CHARS:
        raise ValueError(f"a tag has at most {MAX_TAG_CHARS} characters, not {len(tag)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in tag):
        raise ValueError(f"a tag has no control characters: {tag!r}")
    return tag


class LedgerError(Exception):
    """The ledger cannot be read or written (not configured, unreachable, refused)."""


class LedgerNotConfigured(LedgerError):
    """This queue has no ledger (Service Bus without ``--ledger``/``JOBQ_LEDGER``)."""


@dataclass
class TaskRecord:
    """What the ledger knows of one task."""

    id: str
    state: TaskState
    attempt: int = 0  # attempts started
    interruptions: int = 0
    pushed_at: float | None = None  # wall-clock seconds (time.time())
    started_at: float | None = None  # of the last attempt
    finished_at: float | None = None
    worker_id: str | None = None
    host: str | None = None
    duration: float | None = None  # of the last attempt, seconds
    exit_code: int | None = None
    reason: str | None = None  # exception type / "NonZeroExit" / "Timeout" / ...
    summary: str | None = None  # the meaningful last lines of the error, redacted
    result: Any = None  # a Python task's JSON-serialisable return value
    result_note: str | None = None  # e.g. "result too large (40000 bytes)"
    tags: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items()}
        data["state"] = self.state.value
        return data


@dataclass
class WorkerRecord:
    """A worker's last heartbeat."""

    worker_id: str
    host: str
    pid: int
    slots: int
    queue: str
    started_at: float
    last_seen: float
    running: list[str] = field(default_factory=list)  # task IDs
    tasks_done: int = 0
    version: str = ""
    stopped: bool = False  # the final heartbeat on exit

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def is_stale(self, now: float, heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS) -> bool:
        """No heartbeat for three intervals (and no final one): the worker is gone
        without saying so (killed, host lost)."""
        return not self.stopped and now - self.last_seen > 3 * heartbeat_seconds


@dataclass
class StatusSummary:
    """Counts by state (over a tag, or the whole ledger) and recent throughput."""

    counts: dict[str, int]  # TaskState value -> number of tasks
    total: int
    finished_last_minutes: int  # tasks reaching a final state in the last `window` minutes
    window_minutes: float
    unknown: int = 0  # IDs named by the caller that the ledger has never seen

    @property
    def rate_per_second(self) -> float:
        return self.finished_last_minutes / (self.window_minutes * 60) if self.window_minutes else 0

    @property
    def remaining(self) -> int:
        done = sum(self.counts.get(s.value, 0) for s in FINAL_STATES)
        return self.total - done

    def eta_seconds(self) -> float | None:
        rate = self.rate_per_second
        return self.remaining / rate if rate > 0 else None


@dataclass
class FailureGroup:
    """Failed/dead-lettered tasks grouped by reason, for the dashboard and ``status``."""

    reason: str
    count: int
    example_ids: list[str]
    example_summary: str | None = None


class LedgerStore(abc.ABC):
    """One queue's ledger.  Writes are batched by the caller (see the worker hook);
    reads are what wait/status/tasks/result/workers/top/dashboard need."""

    #: True when every method does its I/O on the calling thread and never suspends
    #: (SQLite): ``push_many`` may then record a batch from the backend's push writer
    #: thread (see :mod:`ai4s_jobq.push_writer`).
    never_suspends: bool = False

    async def open(self) -> None:  # noqa: B027 - optional
        pass

    async def close(self) -> None:  # noqa: B027 - optional
        pass

    async def __aenter__(self) -> LedgerStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ reads

    @abc.abstractmethod
    async def get(self, ids: Sequence[str]) -> dict[str, TaskRecord]:
        """The records of ``ids`` that exist (unknown IDs are absent)."""

    @abc.abstractmethod
    def iter_tag(self, tag: str, *, page_size: int = 1000) -> AsyncIterator[TaskRecord]:
        """Every record tagged ``tag``, streamed in pages (constant memory)."""

    @abc.abstractmethod
    async def status(self, tag: str | None = None, *, window_minutes: float = 5.0) -> StatusSummary:
        """Counts by state over ``tag`` (or everything); must answer in well under a
        second for 100,000 records on local."""

    @abc.abstractmethod
    async def tasks(
        self, *, tag: str | None = None, state: TaskState | None = None, limit: int = 50
    ) -> list[TaskRecord]:
        """The most recently changed records, filtered."""

    @abc.abstractmethod
    async def failures(
        self, *, tag: str | None = None, limit: int = 20, examples: int = 3
    ) -> list[FailureGroup]:
        """Failed and dead-lettered tasks grouped by reason, largest group first."""

    @abc.abstractmethod
    async def durations(self, *, tag: str | None = None, limit: int = 10_000) -> list[float]:
        """Durations of recent succeeded attempts (for a runtime histogram)."""

    @abc.abstractmethod
    async def workers(self, *, include_stopped_seconds: float = 3600) -> list[WorkerRecord]:
        """Workers by their heartbeats, including those stopped or stale within the window."""

    @abc.abstractmethod
    async def tags(self, *, limit: int = 50) -> list[str]:
        """Known tags, most recent first."""

    @abc.abstractmethod
    async def prune(self, older_than_seconds: float, *, unfinished: bool = False) -> int:
        """Delete the records of finished tasks (succeeded, dead-lettered) not updated
        for that long, with their tag memberships, and heartbeats as old; returns how
        many task records went.  A task not finished (queued, running, failed or
        interrupted, to be retried) keeps its record and memberships however old: a run
        that outlasts the retention must not lose its waiting tasks from ``status`` and
        ``wait --tag``.  ``unfinished``: delete those too (for tasks that will never
        finish, such as those of a cleared queue)."""

    # ------------------------------------------------------------------ writes
    # Writers batch: one call carries a push batch or a worker's flush.  See
    # :mod:`.events` for what each write means and the forward-only rule.

    @abc.abstractmethod
    async def record_pushes(self, entries: Sequence[PushRecord], tag: str | None = None) -> None:
        """Record pushed task IDs (new ones become ``queued``; a final record pushed
        again as new starts a new generation) and their membership of ``tag``."""

    @abc.abstractmethod
    async def record_attempts(self, events: Sequence[AttemptEvent]) -> None:
        """Apply attempt starts/ends, each only if it moves its record forward."""

    @abc.abstractmethod
    async def heartbeat(self, worker: WorkerRecord) -> None:
        """Write (replace) a worker's heartbeat."""

    async def succeeded_among(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are recorded as succeeded (``push --skip-succeeded``)."""
        records = await self.get(ids)
        return {i for i, r in records.items() if r.state is TaskState.SUCCEEDED}

    async def tags_of(self, task_id: str) -> list[str]:
        """The tags a task was pushed under (for one task's page, ``jobq result``)."""
        return []

    async def last_pruned(self) -> float | None:
        """When a prune last started on this ledger (wall clock), if recorded."""
        return None

    async def mark_pruned(self, at: float) -> None:  # noqa: B027 - optional
        """Record that a prune starts now (so other workers skip theirs)."""

    @property
    def description(self) -> str:
        """Where the ledger lives, for messages (never a secret)."""
        return type(self).__name__

    @staticmethod
    def known_states(values: Iterable[str]) -> list[TaskState]:
        return [TaskState(v) for v in values]
