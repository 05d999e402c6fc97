"""Read-ahead: receive a batch, hand it out as slots free, sized by recent throughput.

Why: a receive is a broker round trip (an HTTP call on Storage Queue, a SQLite write
transaction on ``local://``) whose cost hardly depends on how many messages it returns.
A worker whose slots free one or two at a time would otherwise pay a round trip per
task.  Receiving a batch and keeping the surplus here turns ~2,000 receives into ~70
for 2,000 short tasks.

Why it is adaptive: a buffered message is locked (invisible) but not running.
Holding it is harmless when it starts within a moment, and unfair when tasks are
long: other workers would sit idle while this one hoards.  So the surplus fetched
ahead is this worker's recent throughput times ``horizon`` (the backend chooses it:
about one second of work on Storage Queue): many extra for no-op tasks, none for
tasks that take minutes.

Honesty about locks: a message's lock starts when it is received, not when it is
handed out.  ``stale`` tells the backend which buffered messages have used up half
their lock so it renews them before handing them out; the worker's lock renewal then
runs from the message's real ``locked_until``.  Messages still buffered when the
backend closes are given back by the backend without counting a delivery.

Refill in the background (for backends whose receive is I/O): a fast worker whose
buffer is down to half of what it should hold starts the next receive while its
tasks run.  Waiting for it instead stalls every free slot for a round trip -- on
Azurite, behind the deletes queued before it -- once per batch; that cost a
2,000-task drain more than a second.  Slow workers (fewer than ``REFILL_MIN``
messages a second) never refill ahead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .base import LockLostError, ReceivedMessage

log = logging.getLogger(__name__)

READ_AHEAD_HORIZON = 1.0  # seconds of recent throughput worth fetching ahead
RATE_WINDOW = 2.0  # seconds over which throughput is measured
REFILL_MIN = 8  # messages a second (of recent throughput) before refilling ahead


@dataclass
class ReadAhead:
    """The buffer of received-but-not-started messages and the throughput it is
    sized by, and the background refill in flight.  The backend does the I/O."""

    limit: int  # at most this many per receive call (Storage Queue: 32)
    horizon: float = READ_AHEAD_HORIZON
    window: float = RATE_WINDOW
    _buffer: deque[ReceivedMessage] = field(default_factory=deque)
    _finished: deque[float] = field(default_factory=deque)
    _refill: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._buffer)

    def finished(self, now: float | None = None) -> None:
        """A message this worker received was settled (completed, abandoned, ...)."""
        now = time.monotonic() if now is None else now
        self._finished.append(now)
        self._forget_before(now - self.window)

    def rate(self, now: float | None = None) -> float:
        """Messages settled per second over the last ``window`` seconds."""
        now = time.monotonic() if now is None else now
        self._forget_before(now - self.window)
        return len(self._finished) / self.window

    def fetch_count(self, wanted: int, now: float | None = None) -> int:
        """How many to ask the queue for when the caller can start ``wanted``."""
        ahead = int(self.rate(now) * self.horizon)
        return max(1, min(self.limit, wanted + ahead))

    def refill_count(self, now: float | None = None) -> int:
        """How many to fetch in the background now (0: no refill): about one second
        of throughput, once the buffer holds less than half of that and no refill
        is in flight."""
        if self._refill is not None:
            return 0
        ahead = min(self.limit, int(self.rate(now) * self.horizon))
        if ahead < REFILL_MIN or len(self._buffer) >= ahead // 2:
            return 0
        return ahead

    def start_refill(self, fetch: Awaitable[list[ReceivedMessage]]) -> None:
        """Run ``fetch`` in the background and buffer what it returns.  A failure is
        only logged: the next receive that needs messages polls and reports it."""

        async def refill() -> None:
            try:
                self.keep(await fetch)
            except Exception as exc:  # noqa: BLE001 - see docstring
                log.info(
                    "background receive failed (%s); the next receive retries", type(exc).__name__
                )
            finally:
                self._refill = None

        self._refill = asyncio.ensure_future(refill())

    async def refilled(self) -> bool:
        """Wait for the refill in flight, if any (True if there was one).  A caller
        cancelled meanwhile does not cancel the refill: its messages still land in
        the buffer, so close can release them."""
        refill = self._refill
        if refill is None:
            return False
        await asyncio.wait([refill])
        return True

    def take(self, count: int) -> list[ReceivedMessage]:
        taken: list[ReceivedMessage] = []
        while self._buffer and len(taken) < count:
            taken.append(self._buffer.popleft())
        return taken

    def keep(self, messages: list[ReceivedMessage]) -> None:
        self._buffer.extend(messages)

    def drain(self) -> list[ReceivedMessage]:
        """Everything buffered (to release it when the backend closes)."""
        messages = list(self._buffer)
        self._buffer.clear()
        return messages

    async def take_fresh(
        self,
        count: int,
        lock_seconds: float,
        renew: Callable[[ReceivedMessage], Awaitable[None]],
    ) -> list[ReceivedMessage]:
        """Up to ``count`` buffered messages, ready to hand out: one that used up half
        its lock (``lock_seconds`` long) waiting is renewed with ``renew`` first, one
        whose lock is already gone (``LockLostError``: another receiver has it) is
        dropped."""
        fresh = []
        for message in self.take(count):
            if self.stale(message, lock_seconds):
                try:
                    await renew(message)
                except LockLostError:
                    log.info(
                        "read-ahead message %s: lock expired while buffered; another "
                        "receiver has it",
                        message.message_id,
                    )
                    continue
            fresh.append(message)
        return fresh

    @staticmethod
    def stale(
        message: ReceivedMessage, visibility_timeout: float, now: float | None = None
    ) -> bool:
        """True when less than half of the message's lock is left."""
        if message.locked_until is None:
            return False
        now = time.time() if now is None else now
        return message.locked_until - now < visibility_timeout / 2

    def _forget_before(self, cutoff: float) -> None:
        while self._finished and self._finished[0] < cutoff:
            self._finished.popleft()
