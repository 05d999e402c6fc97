"""What writers hand to a ledger store, and the one rule that orders them.

Two kinds of writes reach a store:

* :class:`PushEntry` — a producer pushed (or re-pushed) a task ID, optionally under a
  tag.  A push the broker accepted as new creates the record (``queued``) or, when the
  record is already final, starts a new *generation* (the task was pushed again after
  the dedup window, or requeued from the dead-letter queue).  A duplicate only adds
  the tag: its state comes from the earlier push.
* :class:`AttemptEvent` — a worker started or ended an attempt.

Events from different workers reach the store in any order (each worker batches its
writes), so the store applies an attempt event only if it moves the record *forward*:
see :func:`moves_forward`.  The SQLite store states the same rule as the ``WHERE``
clause of a guarded upsert; the Table store applies this function and writes with an
ETag condition.  Tests run the same cases against both.

Results and summaries are shaped here (:func:`encode_result`, :func:`summarize`) so
every store records them the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Protocol

from .base import MAX_RESULT_BYTES, TaskState

FINAL = (TaskState.SUCCEEDED.value, TaskState.DEAD_LETTERED.value)
#: states that a later event of the *same* attempt may still move forward from
_OPEN_SAME_ATTEMPT = {
    TaskState.RUNNING.value: (TaskState.QUEUED.value, TaskState.INTERRUPTED.value),
    # an attempt's end may land before its own start (different flushes): still forward
    "end": (TaskState.QUEUED.value, TaskState.RUNNING.value, TaskState.INTERRUPTED.value),
}

SUMMARY_LINES = 6
SUMMARY_CHARS = 1000


class PushRecord(Protocol):
    """What the ledger reads of one accepted push: a :class:`PushEntry`, or the push's
    own outcome (``PushOutcome``, whose ``id`` is its message ID): ``push_many`` hands
    the outcomes over as they are, not a copy of each (that copy was ~1 µs of a pushed
    task's ~14 µs in the ``local://`` writer thread)."""

    @property
    def id(self) -> str: ...

    @property
    def duplicate(self) -> bool | None: ...


@dataclass
class PushEntry:
    """One task ID a push accepted (``duplicate`` True: the broker dropped it as a
    duplicate; None: the backend cannot tell)."""

    id: str
    duplicate: bool | None


@dataclass
class AttemptEvent:
    """A worker's report about one attempt: ``state`` is ``running`` at the start,
    else the end state (``succeeded``, ``failed``, ``dead_lettered``, ``interrupted``)."""

    id: str
    state: str
    attempt: int
    at: float  # wall clock of the event (start or end)
    worker_id: str | None = None
    host: str | None = None
    started_at: float | None = None
    duration: float | None = None
    exit_code: int | None = None
    reason: str | None = None
    summary: str | None = None
    result_json: str | None = None  # the encoded result (see encode_result)
    result_note: str | None = None

    @property
    def is_start(self) -> bool:
        return self.state == TaskState.RUNNING.value


def moves_forward(current_state: str | None, current_attempt: int, event: AttemptEvent) -> bool:
    """Whether ``event`` may replace a record in ``current_state`` at
    ``current_attempt`` (None: no record yet).

    * A final record (succeeded, dead-lettered) never changes; only a new push starts
      a new generation.
    * A later attempt always moves forward.
    * Within one attempt: the start moves forward from queued/interrupted, the end from
      queued/running/interrupted — so a late ``running`` can never undo an end.
    """
    if current_state is None:
        return True
    if current_state in FINAL:
        return False
    if event.attempt > current_attempt:
        return True
    if event.attempt < current_attempt:
        return False
    key = TaskState.RUNNING.value if event.is_start else "end"
    return current_state in _OPEN_SAME_ATTEMPT[key]


def coalesce(events: list[AttemptEvent]) -> list[AttemptEvent]:
    """Keep, per task ID, the one event that moves furthest forward (a short task's
    start and end in one flush become one write).  Order of first appearance kept."""
    best: dict[str, AttemptEvent] = {}
    for event in events:
        kept = best.get(event.id)
        if kept is None:
            best[event.id] = event
            continue
        if moves_forward(kept.state, kept.attempt, event):
            best[event.id] = event
    return list(best.values())


def encode_result(value: Any) -> tuple[str | None, str | None]:
    """A Python task's return value as (JSON text, note).  None is no result.  A value
    that is not JSON-serialisable or larger than ``MAX_RESULT_BYTES`` is not stored; the
    note says why (the task still succeeded)."""
    if value is None:
        return None, None
    try:
        text = json.dumps(
            value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_refuse
        )
    except (TypeError, ValueError) as exc:
        return None, f"result not JSON-serialisable ({type(value).__name__}: {exc})"[:300]
    size = len(text.encode("utf-8"))
    if size > MAX_RESULT_BYTES:
        return None, f"result too large ({size} bytes; at most {MAX_RESULT_BYTES} are kept)"
    return text, None


def decode_result(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def summarize(text: str | None) -> str | None:
    """The meaningful last lines of an error description: the traceback header and
    blank lines go, the last ``SUMMARY_LINES`` lines stay (the exception line is the
    last), at most ``SUMMARY_CHARS`` characters."""
    if not text:
        return None
    lines = [
        line.rstrip()
        for line in text.splitlines()
        if line.strip() and line.strip() != "Traceback (most recent call last):"
    ]
    if not lines:
        return None
    kept = "\n".join(lines[-SUMMARY_LINES:])
    return kept if len(kept) <= SUMMARY_CHARS else "…" + kept[-(SUMMARY_CHARS - 1) :]


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
