"""The Service Bus push side's sender pool, with real SDK senders on the emulator.

A push that finds no idle sender must not wait for a new link when a busy one is
given back first (opening a link takes ~0.5 s of the SDK's polling: see
``ai4s_jobq/backends/servicebus/senders.py``)."""

from __future__ import annotations

import asyncio

import servicebus_support as support
from azure.servicebus import ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient
from servicebus_support import create_queue, runtime_counts

from ai4s_jobq.backends.servicebus.closing import close_all
from ai4s_jobq.backends.servicebus.senders import SenderPool

sb_process, sb_cs, sb_queue = support.sb_process, support.sb_cs, support.sb_queue


async def test_a_sender_given_back_beats_the_new_link_and_the_new_link_joins_the_pool(
    sb_cs, sb_queue
):
    await create_queue(sb_cs, sb_queue)
    async with ServiceBusClient.from_connection_string(sb_cs) as client:
        pool = SenderPool(lambda: client.get_queue_sender(sb_queue), size=2)
        first = await pool.take()
        await first.send_messages(ServiceBusMessage(b"one"))
        second_take = asyncio.create_task(pool.take())
        await asyncio.sleep(0)  # one loop turn: the taker finds no idle sender
        assert not second_take.done()
        pool.give_back(first)
        assert await second_take is first  # not the link still opening
        # The link opened in the background joins the pool: the next take gets it.
        third = await pool.take()
        assert third is not first
        await third.send_messages(ServiceBusMessage(b"two"))
        pool.give_back(first)
        pool.give_back(third)
        senders = await pool.drain()
        assert {id(s) for s in senders} == {id(first), id(third)}
        await close_all(senders)
    assert await runtime_counts(sb_cs, sb_queue) == (2, 0)


async def test_drain_stops_a_background_open_and_returns_its_sender(sb_cs, sb_queue):
    await create_queue(sb_cs, sb_queue)
    async with ServiceBusClient.from_connection_string(sb_cs) as client:
        pool = SenderPool(lambda: client.get_queue_sender(sb_queue), size=2)
        first = await pool.take()
        waiting = asyncio.create_task(pool.take())
        await asyncio.sleep(0)  # the taker starts the opener ...
        await asyncio.sleep(0)  # ... which now waits on the SDK's open
        waiting.cancel()
        senders = await pool.drain()  # the open is cut short; its sender comes back
        assert len(senders) == 1
        assert senders[0] is not first  # still taken: its holder closes it
        await close_all([first, *senders])


async def test_warm_opens_the_first_link_before_the_first_take(sb_cs, sb_queue):
    await create_queue(sb_cs, sb_queue)
    async with ServiceBusClient.from_connection_string(sb_cs) as client:
        made = []

        def make_sender():
            made.append(client.get_queue_sender(sb_queue))
            return made[-1]

        pool = SenderPool(make_sender, size=2)
        pool.warm()
        pool.warm()  # one link is enough for the first batch
        assert len(made) == 1
        sender = await pool.take()  # waits for the open under way, opens no other
        assert made == [sender]
        await sender.send_messages(ServiceBusMessage(b"one"))
        pool.give_back(sender)
        await close_all(await pool.drain())
    assert await runtime_counts(sb_cs, sb_queue) == (1, 0)


async def test_a_link_that_fails_to_open_in_the_background_still_reaches_the_taker(sb_cs):
    """No queue of that name: the background open fails, yet the waiting taker gets the
    sender (and its own open reports the error) instead of waiting for ever."""
    async with ServiceBusClient.from_connection_string(sb_cs) as client:
        pool = SenderPool(lambda: client.get_queue_sender("no-such-queue"), size=1)
        pool.warm()
        sender = await asyncio.wait_for(pool.take(), timeout=60)
        pool.give_back(sender)
        await close_all(await pool.drain())
