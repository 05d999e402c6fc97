"""Receiving from Storage Queue: the backoff between polls of an empty queue.

Storage Queue's receive reads ahead with :class:`..read_ahead.ReadAhead` (up to 32 per
call, about one second of recent throughput).

Polling: Storage Queue has no long polling, so an idle receiver polls, and every
poll is a billed transaction.  ``PollBackoff`` doubles the pause after each empty
poll and keeps it across receive calls, so a worker that waits briefly and often
(a short ``--idle-timeout`` lets it notice idleness promptly) polls no more often
than one that waits long.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

FIRST_POLL_PAUSE = 0.05  # seconds after the first empty poll
LONGEST_POLL_PAUSE = 1.0  # the pause stops doubling here


@dataclass
class PollBackoff:
    """When the next poll of a queue may go out: at once after a poll that found
    messages; after an empty one, ``FIRST_POLL_PAUSE`` doubling to
    ``LONGEST_POLL_PAUSE``."""

    _pause: float = 0.0
    _next_at: float = 0.0

    def polled(self, found: bool, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._pause = (
            0.0 if found else min(LONGEST_POLL_PAUSE, max(FIRST_POLL_PAUSE, self._pause * 2))
        )
        self._next_at = now + self._pause

    def wait(self, now: float | None = None) -> float:
        """Seconds until the next poll may go out (0: now)."""
        now = time.monotonic() if now is None else now
        return max(0.0, self._next_at - now)
