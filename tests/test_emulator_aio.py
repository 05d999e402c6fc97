"""The emulator through the azure-servicebus aio SDK (AMQP and management)."""

from __future__ import annotations

import datetime
import time

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.servicebus import ServiceBusMessage, ServiceBusSubQueue
from azure.servicebus.aio import ServiceBusClient
from azure.servicebus.aio.management import ServiceBusAdministrationClient
from azure.servicebus.exceptions import MessageLockLostError, ServiceBusAuthenticationError

from ai4s_jobq.emulator.client import admin_client_kwargs

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sb(sb_emulator_shared):
    return sb_emulator_shared


def _admin(cs: str) -> ServiceBusAdministrationClient:
    return ServiceBusAdministrationClient.from_connection_string(cs, **admin_client_kwargs(cs))


async def test_aio_admin_and_messaging_round_trip(sb):
    cs = sb.connection_string
    async with _admin(cs) as admin:
        created = await admin.create_queue(
            "aio-jobs",
            requires_duplicate_detection=True,
            duplicate_detection_history_time_window=datetime.timedelta(minutes=10),
            lock_duration=datetime.timedelta(seconds=30),
            max_delivery_count=4,
        )
        assert created.requires_duplicate_detection is True
        assert created.duplicate_detection_history_time_window == datetime.timedelta(minutes=10)
        assert created.max_delivery_count == 4
        with pytest.raises(ResourceExistsError):
            await admin.create_queue("aio-jobs")
    async with ServiceBusClient.from_connection_string(cs) as client:
        async with client.get_queue_sender("aio-jobs") as sender:
            await sender.send_messages(
                ServiceBusMessage("a", message_id="one", application_properties={"n": 1})
            )
            await sender.send_messages(ServiceBusMessage("again", message_id="one"))  # duplicate
            batch = await sender.create_message_batch()
            batch.add_message(ServiceBusMessage("b", message_id="two"))
            batch.add_message(ServiceBusMessage("c", message_id="three"))
            await sender.send_messages(batch)
        async with _admin(cs) as admin:
            runtime = await admin.get_queue_runtime_properties("aio-jobs")
            assert runtime.active_message_count == 3
        async with client.get_queue_receiver("aio-jobs") as receiver:
            got = []
            while len(got) < 3:
                got += await receiver.receive_messages(max_message_count=3, max_wait_time=5)
            assert [str(m) for m in got] == ["a", "b", "c"]
            assert got[0].application_properties == {b"n": 1}
            assert [m.delivery_count for m in got] == [0, 0, 0]
            await receiver.abandon_message(got[0])
            await receiver.dead_letter_message(got[1], reason="Nope", error_description="bad b")
            await receiver.complete_message(got[2])
            [again] = await receiver.receive_messages(max_wait_time=5)
            # core DeliveryCount 2; the wire header (what the SDK shows) is DeliveryCount - 1
            assert (again.message_id, again.delivery_count) == ("one", 1)
            renewed = await receiver.renew_message_lock(again)
            assert renewed > datetime.datetime.now(datetime.timezone.utc)
            await receiver.complete_message(again)
        async with client.get_queue_receiver(
            "aio-jobs", sub_queue=ServiceBusSubQueue.DEAD_LETTER
        ) as dlq:
            [dead] = await dlq.receive_messages(max_wait_time=5)
            assert (dead.message_id, dead.dead_letter_reason) == ("two", "Nope")
            assert dead.dead_letter_error_description == "bad b"
            await dlq.complete_message(dead)
    async with _admin(cs) as admin:
        runtime = await admin.get_queue_runtime_properties("aio-jobs")
        assert (runtime.active_message_count, runtime.dead_letter_message_count) == (0, 0)
        await admin.delete_queue("aio-jobs")
        with pytest.raises(ResourceNotFoundError):
            await admin.get_queue("aio-jobs")


async def test_aio_lock_expiry_and_scheduled_messages(sb):
    queue = sb.create_queue(lock_duration=1)
    async with ServiceBusClient.from_connection_string(sb.connection_string) as client:
        async with (
            client.get_queue_sender(queue) as sender,
            client.get_queue_receiver(queue) as receiver,
        ):
            due = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)
            [number] = await sender.schedule_messages(ServiceBusMessage("s", message_id="s"), due)
            assert await receiver.receive_messages(max_wait_time=0.3) == []
            [message] = await receiver.receive_messages(max_wait_time=5)
            assert message.sequence_number == number + 1  # a new number on activation
            started = time.monotonic()
            [redelivered] = await receiver.receive_messages(max_wait_time=5)  # lock expiry
            assert time.monotonic() - started >= 0.5
            assert redelivered.message_id == "s" and redelivered.delivery_count == 1
            with pytest.raises(MessageLockLostError):
                await receiver.complete_message(message)
            await receiver.complete_message(redelivered)


async def test_aio_update_toggling_duplicate_detection_is_rejected(sb):
    queue = sb.create_queue(requires_duplicate_detection=False)
    async with _admin(sb.connection_string) as admin:
        props = await admin.get_queue(queue)
        props.max_delivery_count = 7
        await admin.update_queue(props)
        assert (await admin.get_queue(queue)).max_delivery_count == 7
        props.requires_duplicate_detection = True
        with pytest.raises(HttpResponseError) as info:
            await admin.update_queue(props)
        assert info.value.status_code == 400
        assert "requires_duplicate_detection" in str(info.value)
        assert (await admin.get_queue(queue)).requires_duplicate_detection is False


async def test_aio_wrong_key_is_rejected(sb):
    queue = sb.create_queue()
    key = sb.server.settings.key
    wrong = sb.connection_string.replace(key, ("B" if key[0] != "B" else "C") + key[1:])
    async with _admin(wrong) as admin:
        with pytest.raises(ClientAuthenticationError):
            await admin.get_queue(queue)
    async with ServiceBusClient.from_connection_string(wrong, retry_total=0) as client:
        with pytest.raises(ServiceBusAuthenticationError):
            async with client.get_queue_sender(queue) as sender:
                await sender.send_messages(ServiceBusMessage("x"))
