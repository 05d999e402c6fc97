"""Attempts and interruptions, counted honestly on every broker: the ``run`` counters.

A task has ``num_retries + 1`` attempts; an *interruption* (preemption, SIGTERM/SIGINT,
``--time-limit``, a node that vanished mid-task) must not use one up.  A broker's
delivery count cannot tell the two apart -- Service Bus raises it on every abandon and
on every lost lock alike, Storage Queue's ``dequeue_count`` on every receive -- so the
worker never relies on it for attempts.  Instead the task envelope carries its own
counters under the ``run`` key::

    {"v": 1, "id": ..., "args": ..., "run": {"attempt": 2, "interruptions": 1,
                                             "seen": 0, "copy": 3, "root": "<msg id>"}}

* ``attempt`` -- which attempt the next run is (1 + failed attempts so far);
* ``interruptions`` -- runs that ended without a verdict (counted separately, limited
  by ``--max-interruptions``, then dead-lettered ``TooManyInterruptions``);
* ``seen`` -- the broker's delivery count when this envelope was written.  Any
  delivery beyond ``seen + 1`` ended without the worker settling it: the worker died
  or lost its lock (a lost node).  Those are counted as interruptions;
* ``copy`` and ``root`` -- see below.

A task that failed or was interrupted is put back with updated counters by
``Backend.reschedule``:

* Service Bus and local: a *new message* (scheduled for the retry delay) is sent, then
  the old one completed.  The new message's MessageId is ``ROOT~N`` (``root`` is the
  first message's id, ``N`` the ``copy`` number), the same whichever worker makes copy
  ``N`` of the same message.  So if a worker dies between the send and the complete,
  the old message comes back, the next worker re-sends the same ``ROOT~N`` -- which
  the queue's duplicate detection drops -- and completes the old one: the retry is
  neither lost nor doubled.  (On a queue created without duplicate detection that
  narrow window can leave two copies; ``jobq check`` warns about such queues.)
* Storage Queue: the message's text and visibility timeout are replaced in one call
  (``update_message``), which is atomic; ``seen`` absorbs the ``dequeue_count``.

A message that arrives with unaccounted deliveries is not run: it is put back at once
with those deliveries added to ``interruptions`` (one extra hop, only after a crash),
which is what makes the crash-between-send-and-complete case above converge.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

from ..task import Task

RUN_KEY = "run"
#: Service Bus's MessageId limit
MAX_MESSAGE_ID = 128


@dataclass(frozen=True)
class RunCounters:
    attempt: int = 1
    interruptions: int = 0
    seen: int = 0
    copy: int = 0
    root: str = ""

    @classmethod
    def of(cls, task: Task) -> RunCounters:
        """The counters a task's envelope carries (defaults for a fresh task; a value
        of the wrong type counts as absent rather than failing the task)."""
        raw = task.extra.get(RUN_KEY)
        if not isinstance(raw, dict):
            return _FRESH  # the common case: on the hot path, no allocation

        def count(name: str, default: int) -> int:
            value = raw.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
            return default

        root = raw.get("root")
        return cls(
            attempt=max(1, count("attempt", 1)),
            interruptions=count("interruptions", 0),
            seen=count("seen", 0),
            copy=count("copy", 0),
            root=root if isinstance(root, str) else "",
        )

    def lost_deliveries(self, delivery_count: int) -> int:
        """Deliveries of this message that ended without being settled (a worker that
        died or lost its lock): each is an interruption."""
        return max(0, delivery_count - 1 - self.seen)

    def failed(self) -> RunCounters:
        return replace(self, attempt=self.attempt + 1)

    def interrupted(self, times: int = 1) -> RunCounters:
        return replace(self, interruptions=self.interruptions + times)

    def as_dict(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "interruptions": self.interruptions,
            "seen": self.seen,
            "copy": self.copy,
            "root": self.root,
        }


_FRESH = RunCounters()


@dataclass(frozen=True)
class Rescheduled:
    """What ``Backend.reschedule`` is given: the new body and, for brokers that send a
    new message, its deterministic MessageId."""

    message_id: str
    body: bytes


def next_copy(
    task: Task, counters: RunCounters, message_id: str, delivery_count: int, *, in_place: bool
) -> Rescheduled:
    """The message that replaces the current one (``message_id``, delivered
    ``delivery_count`` times) with ``counters``.  ``in_place``: the broker rewrites the
    same message, whose delivery count goes on (Storage Queue)."""
    root = counters.root or _root_id(message_id)
    copy = counters.copy + 1
    new = replace(counters, seen=delivery_count if in_place else 0, copy=copy, root=root)
    body = replace(task, extra={**task.extra, RUN_KEY: new.as_dict()}).to_body()
    return Rescheduled(f"{root}~{copy}", body)


def fresh_body(task: Task) -> bytes:
    """The task's envelope without run counters: a fresh set of attempts (``dlq
    requeue``)."""
    if RUN_KEY not in task.extra:
        return task.to_body()
    extra = {k: v for k, v in task.extra.items() if k != RUN_KEY}
    return replace(task, extra=extra).to_body()


def _root_id(message_id: str) -> str:
    """The chain's root MessageId, short enough for ``~N`` to fit Service Bus's limit."""
    if len(message_id) <= MAX_MESSAGE_ID - 12:
        return message_id
    return hashlib.md5(message_id.encode(), usedforsecurity=False).hexdigest()
