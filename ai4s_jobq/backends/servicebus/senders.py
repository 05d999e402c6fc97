"""The push side's pool of Service Bus senders: up to ``size`` links, and a push never
waits for a new link when an existing one is free first.

Why a pool at all: a push of many batches keeps ``push_concurrency`` batches in
flight, so that one batch's round trip overlaps the next one's encoding.

Why the race: opening a sender is slow even on loopback.  Measured (azure-servicebus
7.15, pyamqp, against the emulator): a new sender takes ~0.48 s from
``get_queue_sender`` to a usable link, because the SDK's open loop reads one AMQP
frame per ``asyncio.sleep(0.05)`` step and the open needs about nine frames (open,
begin, two CBS attaches, flow, put-token, its reply, the sender's attach, flow).
The CPU cost is nil; it is pure waiting.  In that time an open link sends ~4,000
tasks, so a second batch that simply waited for its own new link finished later
than if it had queued behind the first (a 5,000-task ``push_many`` took 1.3x the
raw SDK's single-sender batch send; with one sender it took 0.87x).  So a taker
that finds no idle sender starts opening a new one in the background (while under
``size``) and takes whichever is ready first: a sender given back, or the new one.
The new link then stays in the pool for the next batch.  A link that fails to open
is put in the pool unopened; the push that takes it opens it again and reports the
error through its usual retry path, so failures surface where they did before.

``warm`` starts the first link's open before the first batch is built (``push_many``
calls ``Backend.prepare_push`` first thing), so building it (~0.1 s for 4,000 tasks)
overlaps part of the open's polling instead of coming before it.

Measured with ``bench/bench_servicebus.py --repeat 3`` (5,000 tasks): raw batch send
took 1.21x and 1.28x ``push_many``'s time (RTT 0 and 1 ms) before the pool, 0.78x and
0.75x after.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from azure.servicebus.aio import ServiceBusSender


class SenderPool:
    """Senders for one queue; ``take`` one, ``give_back`` it when the batch is sent."""

    def __init__(self, make_sender: Callable[[], ServiceBusSender], size: int):
        self._make_sender = make_sender
        self._size = max(1, size)
        self._idle: asyncio.Queue[ServiceBusSender] = asyncio.Queue()
        self._count = 0
        self._opening: set[asyncio.Task[None]] = set()
        self._waiting = 0
        #: senders whose background open was cancelled by ``drain``
        self._orphans: list[ServiceBusSender] = []

    def warm(self) -> None:
        """A push is about to start: open the first link in the background, so that
        the wait overlaps building the first batch (``Backend.prepare_push``)."""
        if self._count == 0:
            self._start_opening()

    async def take(self) -> ServiceBusSender:
        if self._count == 0:  # nothing to race against: open it in place
            self._count = 1
            return self._make_sender()
        # A new link only for a taker that no open in progress is already meant for.
        if self._idle.empty() and self._count < self._size and self._waiting >= len(self._opening):
            self._start_opening()
        self._waiting += 1
        try:
            return await self._idle.get()
        finally:
            self._waiting -= 1

    def _start_opening(self) -> None:
        self._count += 1
        opener = asyncio.create_task(self._open_in_background(self._make_sender()))
        self._opening.add(opener)
        opener.add_done_callback(self._opening.discard)

    def give_back(self, sender: ServiceBusSender) -> None:
        self._idle.put_nowait(sender)

    async def _open_in_background(self, sender: ServiceBusSender) -> None:
        try:
            # The public way to open a sender's link: a batch needs the link's size limit.
            await sender.create_message_batch()
        except Exception:  # noqa: BLE001 - never lost: a taker may be waiting for it
            pass  # the push that takes it opens it again and reports (see module doc)
        except asyncio.CancelledError:
            self._orphans.append(sender)
            raise
        self._idle.put_nowait(sender)

    async def drain(self) -> list[ServiceBusSender]:
        """Stop any background opens; every sender not taken, for the caller to close."""
        for opener in list(self._opening):
            opener.cancel()
        await asyncio.gather(*self._opening, return_exceptions=True)
        senders, self._orphans = self._orphans, []
        while not self._idle.empty():
            senders.append(self._idle.get_nowait())
        self._count = 0
        return senders
