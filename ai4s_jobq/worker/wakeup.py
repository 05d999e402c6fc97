"""A flag the worker loop waits on with a timeout, cheaper than ``asyncio.Event``.

The receive loop waits for "a slot freed" once per task or so.  With
``asyncio.wait_for(event.wait(), timeout)`` every wait creates an asyncio task and a
timer and takes several loop iterations to resolve; at thousands of no-op tasks a
second that was a measurable share of the worker's CPU (``bench/bench_peers.py``,
one slot).  Here a wait is one future and one timer handle.
"""

from __future__ import annotations

import asyncio


class Wakeup:
    """``set`` / ``clear`` / ``is_set`` like :class:`asyncio.Event`; ``wait(timeout)``
    returns when set or when ``timeout`` seconds have passed, whichever is first."""

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self, timeout: float) -> None:
        if self._set:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(max(0.0, timeout), _resolve, waiter)
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if not waiter.done():  # cancelled from outside
                waiter.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
