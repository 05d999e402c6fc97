"""One picture of a queue at one moment: what the dashboard page and ``jobq top`` show.

Both views render the same :class:`QueueSnapshot`, gathered by :func:`collect` from the
queue's counts (every backend) and its ledger (when the queue has one).  Keeping the
gathering here means the page, the terminal view and the JSON API can never disagree
about a number, and the rendering code stays free of I/O.

Queue depth *over time* is not something a broker remembers, so the process that shows
it samples it: :class:`DepthHistory` is a bounded ring of samples that the dashboard
server fills from a background task and ``jobq top`` fills on each refresh.

Throughput and ETA come from the ledger (tasks reaching a final state in the last few
minutes, over the tasks not yet final).  Without a ledger they come from the sampled
depth alone: the net rate at which the active count fell, which is what counts alone
can tell (pushes during the window make it an under-estimate; the views say so).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ..ledger.base import (
    DEFAULT_HEARTBEAT_SECONDS,
    FailureGroup,
    LedgerError,
    LedgerStore,
    StatusSummary,
    TaskState,
    WorkerRecord,
)
from ..redact import redact

if TYPE_CHECKING:
    from ..jobq import JobQ

#: how many tags get a row in "outcomes per tag"
TAG_ROWS = 12
#: how many dead-lettered messages the views list
DEAD_LETTER_ROWS = 50
#: samples of queue depth kept (at the default 5 s interval: one hour)
HISTORY_SAMPLES = 720
#: the window the throughput is measured over
RATE_WINDOW_MINUTES = 5.0
#: how long one source may take before the view shows it as unavailable
SOURCE_TIMEOUT = 10.0

STATE_ORDER = [s.value for s in TaskState]
T = TypeVar("T")


@dataclass
class DepthSample:
    at: float
    active: int
    dead_letter: int
    scheduled: int | None = None


class DepthHistory:
    """The last :data:`HISTORY_SAMPLES` queue counts, oldest first."""

    def __init__(self, maxlen: int = HISTORY_SAMPLES):
        self.samples: deque[DepthSample] = deque(maxlen=maxlen)

    def add(self, sample: DepthSample) -> None:
        self.samples.append(sample)

    def __len__(self) -> int:
        return len(self.samples)

    def drain_rate(self, window_seconds: float, now: float) -> float | None:
        """Net tasks/s by which the active count fell over the window (None without
        two samples in it; 0 when it did not fall)."""
        recent = [s for s in self.samples if s.at >= now - window_seconds]
        if len(recent) < 2 or recent[-1].at <= recent[0].at:
            return None
        fell = recent[0].active - recent[-1].active
        return max(fell, 0) / (recent[-1].at - recent[0].at)


@dataclass
class TagOutcome:
    tag: str
    counts: dict[str, int]
    total: int


@dataclass
class DurationStats:
    """A runtime histogram and its quantiles (seconds)."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float
    bins: list[tuple[float, float, int]]  # (low, high, count)
    log_scale: bool

    @classmethod
    def of(cls, durations: Sequence[float], bins: int = 20) -> DurationStats | None:
        values = sorted(d for d in durations if d is not None and d >= 0)
        if not values:
            return None

        def quantile(q: float) -> float:
            return values[min(len(values) - 1, int(q * len(values)))]

        low, high = values[0], values[-1]
        # Runtimes are often skewed (a few stragglers): when the spread is wide and the
        # median sits near the bottom, log-spaced bins keep the bulk readable.
        median = quantile(0.5)
        log_scale = low > 0 and high / low > 50 and median - low < (high - low) / 10
        if high <= low:
            edges = [low, low + max(low * 0.01, 0.001)]
        elif log_scale:
            a, b = math.log10(low), math.log10(high)
            edges = [10 ** (a + (b - a) * i / bins) for i in range(bins + 1)]
        else:
            edges = [low + (high - low) * i / bins for i in range(bins + 1)]
        counts = [0] * (len(edges) - 1)
        last = len(counts) - 1
        if log_scale:
            a, b = math.log10(low), math.log10(high)
            for v in values:
                counts[min(last, int((math.log10(v) - a) / (b - a) * len(counts)))] += 1
        else:
            width = (edges[-1] - edges[0]) or 1.0
            for v in values:
                counts[min(last, int((v - edges[0]) / width * len(counts)))] += 1
        return cls(
            count=len(values),
            p50=quantile(0.5),
            p90=quantile(0.9),
            p99=quantile(0.99),
            max=high,
            bins=[(edges[i], edges[i + 1], c) for i, c in enumerate(counts)],
            log_scale=log_scale,
        )


@dataclass
class DeadLetterRow:
    task_id: str
    reason: str | None
    description: str | None
    delivery_count: int
    what: str  # the command or the arguments, shortened


@dataclass
class WorkerRow:
    record: WorkerRecord
    state: str  # "alive", "stale" or "stopped"
    seen_ago: float


@dataclass
class QueueSnapshot:
    """Everything one view shows about one queue."""

    name: str
    taken_at: float
    active: int | None = None
    dead_letter: int | None = None
    scheduled: int | None = None
    counts_error: str | None = None
    history: list[DepthSample] = field(default_factory=list)
    has_ledger: bool = False
    ledger_error: str | None = None
    status: StatusSummary | None = None
    tag_outcomes: list[TagOutcome] = field(default_factory=list)
    failures: list[FailureGroup] = field(default_factory=list)
    durations: DurationStats | None = None
    workers: list[WorkerRow] = field(default_factory=list)
    dead_letters: list[DeadLetterRow] = field(default_factory=list)
    dead_letters_error: str | None = None
    rate_per_second: float | None = None
    rate_source: str = ""  # "ledger" or "queue depth"
    eta_seconds: float | None = None

    def count(self, state: TaskState) -> int:
        return self.status.counts.get(state.value, 0) if self.status else 0

    @property
    def workers_alive(self) -> int:
        return sum(1 for w in self.workers if w.state == "alive")

    @property
    def workers_stale(self) -> int:
        return sum(1 for w in self.workers if w.state == "stale")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (``/api/snapshot``, ``jobq top --once --json``)."""
        status = self.status
        return {
            "queue": self.name,
            "taken_at": self.taken_at,
            "counts": {
                "active": self.active,
                "dead_letter": self.dead_letter,
                "scheduled": self.scheduled,
                "error": self.counts_error,
            },
            "history": [s.__dict__ for s in self.history],
            "ledger": {
                "configured": self.has_ledger,
                "error": self.ledger_error,
                "states": dict(status.counts) if status else None,
                "total": status.total if status else None,
                "remaining": status.remaining if status else None,
            },
            "rate_per_second": self.rate_per_second,
            "rate_source": self.rate_source,
            "eta_seconds": self.eta_seconds,
            "tags": [t.__dict__ for t in self.tag_outcomes],
            "failures": [f.__dict__ for f in self.failures],
            "durations": None
            if self.durations is None
            else {
                k: v
                for k, v in self.durations.__dict__.items()
                if k in ("count", "p50", "p90", "p99", "max", "log_scale")
            }
            | {"bins": [list(b) for b in self.durations.bins]},
            "workers": [w.record.as_dict() | {"state": w.state} for w in self.workers],
            "dead_letters": [d.__dict__ for d in self.dead_letters],
            "dead_letters_error": self.dead_letters_error,
        }


@dataclass
class QueueSource:
    """A queue to watch: its name for display, the open queue, and its ledger (or
    None when the queue has none, e.g. Service Bus without ``--ledger``)."""

    name: str
    queue: JobQ
    ledger: LedgerStore | None = None
    ledger_note: str | None = None  # why there is no ledger, shown instead of its panels
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS  # the workers' interval
    history: DepthHistory = field(default_factory=DepthHistory)

    async def read_counts(self) -> DepthSample:
        """Read the counts once and remember them (raises what the backend raises)."""
        counts = await bounded(self.queue.counts())
        sample = DepthSample(time.time(), counts.active, counts.dead_letter, counts.scheduled)
        self.history.add(sample)
        return sample


async def bounded(awaitable: Awaitable[T], timeout: float = SOURCE_TIMEOUT) -> T:
    """``awaitable`` with a time limit.  Unlike ``asyncio.wait_for`` on Python 3.10/3.11,
    a cancellation that arrives just as the awaitable finishes is never swallowed (the
    dashboard's sampler must stop when told to)."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise asyncio.TimeoutError
    return task.result()


def worker_state(
    record: WorkerRecord, now: float, heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
) -> str:
    """ "stopped" (said goodbye), "stale" (silent for three heartbeats: killed or host
    lost) or "alive"."""
    if record.stopped:
        return "stopped"
    return "stale" if record.is_stale(now, heartbeat_seconds) else "alive"


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {SOURCE_TIMEOUT:g} s"
    text = str(exc).strip()
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


async def collect(source: QueueSource, *, tag_rows: int = TAG_ROWS) -> QueueSnapshot:
    """Gather a snapshot (reading the counts adds a depth sample).  Each part that fails
    is reported in the snapshot (the view shows the rest), never raised: a dashboard
    must outlive a flaky connection."""
    now = time.time()
    snap = QueueSnapshot(name=source.name, taken_at=now)

    async def counts_part() -> None:
        try:
            latest = await source.read_counts()
        except Exception as exc:
            snap.counts_error = _error_text(exc)
            return
        snap.active, snap.dead_letter, snap.scheduled = (
            latest.active,
            latest.dead_letter,
            latest.scheduled,
        )

    async def dead_letter_part() -> None:
        try:
            items = await bounded(source.queue.dlq_list(DEAD_LETTER_ROWS))
        except Exception as exc:
            snap.dead_letters_error = _error_text(exc)
            return
        snap.dead_letters = [_dead_letter_row(item) for item in items]

    async def ledger_part() -> None:
        ledger = source.ledger
        if ledger is None:
            snap.ledger_error = source.ledger_note
            return
        snap.has_ledger = True
        try:
            await bounded(_read_ledger(source, snap, now, tag_rows))
        except (LedgerError, Exception) as exc:
            snap.ledger_error = _error_text(exc)

    await asyncio.gather(counts_part(), dead_letter_part(), ledger_part())
    snap.history = list(source.history.samples)
    _rates(snap, source.history, now)
    return snap


async def _read_ledger(source: QueueSource, snap: QueueSnapshot, now: float, rows: int) -> None:
    ledger = source.ledger
    assert ledger is not None
    status, failures, durations, workers, tags = await asyncio.gather(
        ledger.status(window_minutes=RATE_WINDOW_MINUTES),
        ledger.failures(limit=20, examples=3),
        ledger.durations(limit=10_000),
        ledger.workers(),
        ledger.tags(limit=rows),
    )
    snap.status = status
    snap.failures = failures
    snap.durations = DurationStats.of(durations)
    snap.workers = sorted(
        (
            WorkerRow(
                w, worker_state(w, now, source.heartbeat_seconds), max(0.0, now - w.last_seen)
            )
            for w in workers
        ),
        key=lambda row: (("alive", "stale", "stopped").index(row.state), row.record.worker_id),
    )
    per_tag = await asyncio.gather(*(ledger.status(tag) for tag in tags))
    snap.tag_outcomes = [TagOutcome(t, dict(s.counts), s.total) for t, s in zip(tags, per_tag)]


def _rates(snap: QueueSnapshot, history: DepthHistory, now: float) -> None:
    if snap.status is not None:
        snap.rate_per_second = snap.status.rate_per_second
        snap.rate_source = "ledger"
        snap.eta_seconds = snap.status.eta_seconds() if snap.status.remaining else 0.0
        return
    rate = history.drain_rate(RATE_WINDOW_MINUTES * 60, now)
    if rate is None:
        return
    snap.rate_per_second = rate
    snap.rate_source = "queue depth"
    if snap.active is not None:
        snap.eta_seconds = snap.active / rate if rate > 0 else (0.0 if not snap.active else None)


def _dead_letter_row(item: Any) -> DeadLetterRow:
    task = item.task
    if task is not None:
        args = task.args
        what = str(args.get("cmd")) if isinstance(args, dict) and "cmd" in args else repr(args)
        task_id = task.id
    else:
        what = "(not a task) " + item.raw[:60].decode("utf-8", "replace")
        task_id = item.message_id
    return DeadLetterRow(
        task_id=task_id,
        reason=item.reason,
        description=redact(item.description) if item.description else None,
        delivery_count=item.delivery_count,
        what=redact(what[:200]),
    )


def format_duration(seconds: float | None) -> str:
    """Short human form: 0.42 s, 12 s, 3 m 05 s, 2 h 10 m, 3 d 4 h; '—' for None."""
    if seconds is None or math.isnan(seconds):
        return "—"
    if seconds < 10:
        return f"{seconds:.2f} s" if seconds < 1 else f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} m {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} m"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def format_rate(per_second: float | None) -> str:
    if per_second is None:
        return "—"
    if per_second >= 1:
        return f"{per_second:,.1f}/s"
    return f"{per_second * 60:,.1f}/min"
