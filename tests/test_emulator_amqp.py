"""The emulator through the official azure-servicebus SDK (sync), over real AMQP.

Durations are short (1-3 s locks and windows) where the behaviour under test *is*
the passage of time; nothing else sleeps.
"""

from __future__ import annotations

import datetime
import socket
import time

import pytest
from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)
from azure.servicebus.exceptions import (
    MessageLockLostError,
    ServiceBusAuthenticationError,
    ServiceBusError,
)

pytestmark = pytest.mark.timeout(60)


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture
def sb(sb_emulator_shared):
    return sb_emulator_shared


def _client(sb) -> ServiceBusClient:
    return ServiceBusClient.from_connection_string(sb.connection_string)


def _receive_all(client, queue, expected, *, sub_queue=None, wait=5.0, **kwargs):
    """Receive until ``expected`` messages arrived or ``wait`` seconds passed."""
    got = []
    deadline = time.monotonic() + wait
    with client.get_queue_receiver(queue, sub_queue=sub_queue, **kwargs) as receiver:
        while len(got) < expected and time.monotonic() < deadline:
            got += receiver.receive_messages(
                max_message_count=expected - len(got),
                max_wait_time=max(deadline - time.monotonic(), 0.1),
            )
            for message in got[-expected:]:
                if kwargs.get("receive_mode") != ServiceBusReceiveMode.RECEIVE_AND_DELETE:
                    receiver.complete_message(message)
    return got


def test_round_trip_carries_properties_and_broker_annotations(sb):
    queue = sb.create_queue(lock_duration=30)
    before = _utc_now()
    with _client(sb) as client:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages(
                ServiceBusMessage(
                    b"payload",
                    message_id="m-1",
                    application_properties={"attempt": 3, "kind": "x"},
                    content_type="application/json",
                    correlation_id="corr",
                    subject="subj",
                    time_to_live=datetime.timedelta(minutes=5),
                )
            )
        with client.get_queue_receiver(queue, max_wait_time=5) as receiver:
            [message] = receiver.receive_messages(max_message_count=1, max_wait_time=5)
            assert message.message_id == "m-1"
            assert b"".join(message.body) == b"payload"
            assert message.application_properties == {b"attempt": 3, b"kind": b"x"}
            assert message.content_type == "application/json"
            assert message.correlation_id == "corr"
            assert message.subject == "subj"
            assert message.time_to_live == datetime.timedelta(minutes=5)
            assert message.sequence_number >= 1
            assert before - datetime.timedelta(seconds=1) <= message.enqueued_time_utc <= _utc_now()
            lock_left = (message.locked_until_utc - _utc_now()).total_seconds()
            assert 25 < lock_left <= 31
            assert message.lock_token is not None
            assert message.delivery_count == 0  # Azure sends DeliveryCount - 1 on the wire
            receiver.complete_message(message)
            assert receiver.receive_messages(max_message_count=1, max_wait_time=0.5) == []


def test_batch_send_delivers_every_message_in_order(sb):
    queue = sb.create_queue()
    with _client(sb) as client:
        with client.get_queue_sender(queue) as sender:
            batch = sender.create_message_batch()
            for i in range(25):
                batch.add_message(ServiceBusMessage(f"body-{i}", message_id=f"id-{i}"))
            sender.send_messages(batch)
            sender.send_messages([ServiceBusMessage(f"list-{i}") for i in range(5)])
        got = _receive_all(client, queue, 30)
    assert [m.message_id for m in got[:25]] == [f"id-{i}" for i in range(25)]
    assert [str(m) for m in got[25:]] == [f"list-{i}" for i in range(5)]
    numbers = [m.sequence_number for m in got]
    assert numbers == sorted(numbers) and len(set(numbers)) == 30


def test_duplicate_detection_inside_and_outside_the_window(sb):
    queue = sb.create_queue(
        requires_duplicate_detection=True, duplicate_detection_history_time_window=2
    )
    with _client(sb) as client:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages(ServiceBusMessage("first", message_id="same"))
            sender.send_messages(ServiceBusMessage("second", message_id="same"))  # dropped
            batch = sender.create_message_batch()
            batch.add_message(ServiceBusMessage("third", message_id="same"))  # dropped
            batch.add_message(ServiceBusMessage("other", message_id="other"))
            sender.send_messages(batch)
            time.sleep(2.3)  # the window elapses: the id is accepted again
            sender.send_messages(ServiceBusMessage("fourth", message_id="same"))
        got = _receive_all(client, queue, 3)
        assert [str(m) for m in got] == ["first", "other", "fourth"]
        with client.get_queue_receiver(queue) as receiver:
            assert receiver.receive_messages(max_wait_time=0.5) == []


def test_renew_lock_extends_it_beyond_the_lock_duration(sb):
    queue = sb.create_queue(lock_duration=2)
    with _client(sb) as client:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages(ServiceBusMessage("x"))
        # the competing receiver is attached up front so that its receive below
        # happens at a known time (opening a link takes a few hundred ms)
        with (
            client.get_queue_receiver(queue) as receiver,
            client.get_queue_receiver(queue) as other,
        ):
            [message] = receiver.receive_messages(max_wait_time=5)
            first_until = message.locked_until_utc
            time.sleep(1.2)
            renewed = receiver.renew_message_lock(message)
            assert renewed > first_until
            assert abs((renewed - _utc_now()).total_seconds() - 2) < 0.5
            time.sleep(1.2)  # past the original lock, within the renewed one
            assert _utc_now() > first_until
            assert other.receive_messages(max_wait_time=0.3) == []
            receiver.complete_message(message)


def test_abandon_then_redelivery_counts_the_delivery(sb):
    queue = sb.create_queue()
    with _client(sb) as client:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages(ServiceBusMessage("x", message_id="abandoned"))
        with client.get_queue_receiver(queue) as receiver:
            [first] = receiver.receive_messages(max_wait_time=5)
            assert first.delivery_count == 0
            receiver.abandon_message(first)
            [again] = receiver.receive_messages(max_wait_time=5)
            assert again.message_id == "abandoned"
            assert again.sequence_number == first.sequence_number
            # Service Bus's DeliveryCount is now 2; Azure puts DeliveryCount - 1 in the
            # AMQP header and the Python SDK returns the header value as-is, so it shows 1.
            assert again.delivery_count == 1
            assert sb.server.core.peek(queue)[0].delivery_count == 2
            receiver.complete_message(again)


def test_dead_letter_with_reason_then_receive_from_the_dlq(sb):
    queue = sb.create_queue()
    with _client(sb) as client:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages(
                ServiceBusMessage("poison", message_id="p1", application_properties={"k": "v"})
            )
        with client.get_queue_receiver(queue) as receiver:
            [message] = receiver.receive_messages(max_wait_time=5)
            receiver.dead_letter_message(
                message, reason="BadInput", error_description="field x is missing"
            )
            assert receiver.receive_messages(max_wait_time=0.3) == []
        with client.get_queue_receiver(queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            [dead] = dlq.receive_messages(max_wait_time=5)
            assert dead.message_id == "p1"
            assert dead.dead_letter_reason == "BadInput"
            assert dead.dead_letter_error_description == "field x is missing"
            assert dead.application_properties[b"k"] == b"v"
            dlq.complete_message(dead)
    assert sb.server.core.counts(queue).dead_letter == 0


def test_lock_expiry_redelivers_and_the_old_lock_is_lost(sb):
    queue = sb.create_queue(lock_duration=1)
    with _client(sb) as client:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages(ServiceBusMessage("x", message_id="expiring"))
        with client.get_queue_receiver(queue) as first_receiver:
            [held] = first_receiver.receive_messages(max_wait_time=5)
            started = time.monotonic()
            with client.get_queue_receiver(queue) as second_receiver:
                [again] = second_receiver.receive_messages(max_wait_time=5)
                assert time.monotonic() - started >= 0.8  # not before the lock expired
                assert again.message_id == "expiring"
                assert again.delivery_count == 1
                with pytest.raises(MessageLockLostError):
                    first_receiver.complete_message(held)
                second_receiver.complete_message(again)


def test_max_delivery_count_moves_the_message_to_the_dlq(sb):
    queue = sb.create_queue(max_delivery_count=2)
    with _client(sb) as client:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages(ServiceBusMessage("x", message_id="doomed"))
        with client.get_queue_receiver(queue) as receiver:
            for _ in range(2):
                [message] = receiver.receive_messages(max_wait_time=5)
                receiver.abandon_message(message)
            assert receiver.receive_messages(max_wait_time=0.3) == []
        with client.get_queue_receiver(queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            [dead] = dlq.receive_messages(max_wait_time=5)
            assert dead.message_id == "doomed"
            assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"
            dlq.complete_message(dead)


def test_peek_does_not_lock_and_starts_from_a_sequence_number(sb):
    queue = sb.create_queue()
    with _client(sb) as client:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages([ServiceBusMessage(f"m{i}", message_id=f"m{i}") for i in range(4)])
        with client.get_queue_receiver(queue) as receiver:
            peeked = receiver.peek_messages(max_message_count=10)
            assert [m.message_id for m in peeked] == ["m0", "m1", "m2", "m3"]
            later = receiver.peek_messages(
                max_message_count=10, sequence_number=peeked[2].sequence_number
            )
            assert [m.message_id for m in later] == ["m2", "m3"]
            with pytest.raises(ValueError):
                receiver.complete_message(peeked[0])  # peeked messages carry no lock
        assert len(_receive_all(client, queue, 4)) == 4  # peeking locked nothing


def test_scheduled_message_appears_on_time_and_can_be_cancelled(sb):
    queue = sb.create_queue()
    with _client(sb) as client:
        # both links open before the clock starts: opening one takes a few hundred ms
        with client.get_queue_sender(queue) as sender, client.get_queue_receiver(queue) as receiver:
            due = _utc_now() + datetime.timedelta(seconds=3)  # slack for a loaded machine
            [kept] = sender.schedule_messages(ServiceBusMessage("later", message_id="s1"), due)
            [cancelled] = sender.schedule_messages(ServiceBusMessage("never"), due)
            assert kept != cancelled
            sender.cancel_scheduled_messages(cancelled)
            counts = sb.server.core.counts(queue)
            assert (counts.active, counts.scheduled) == (0, 1)
            assert receiver.receive_messages(max_wait_time=0.3) == []
            [message] = receiver.receive_messages(max_wait_time=5)
            assert _utc_now() >= due - datetime.timedelta(milliseconds=5)
            assert message.message_id == "s1"
            # activated as if enqueued at its time: a number after every one given out
            assert message.sequence_number > max(kept, cancelled)
            assert message.scheduled_enqueue_time_utc is not None
            receiver.complete_message(message)
            assert receiver.receive_messages(max_wait_time=0.3) == []


def test_receive_and_delete_removes_on_delivery(sb):
    queue = sb.create_queue()
    with _client(sb) as client:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages([ServiceBusMessage(f"r{i}") for i in range(3)])
        with client.get_queue_receiver(
            queue, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE
        ) as receiver:
            got = receiver.receive_messages(max_message_count=3, max_wait_time=5)
            while len(got) < 3:
                got += receiver.receive_messages(max_message_count=3, max_wait_time=5)
    assert sorted(str(m) for m in got) == ["r0", "r1", "r2"]
    assert sb.server.core.counts(queue).total == 0


def test_defer_then_receive_deferred_and_settle_through_management(sb):
    queue = sb.create_queue()
    with _client(sb) as client:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages(ServiceBusMessage("later", message_id="d1"))
        with client.get_queue_receiver(queue) as receiver:
            [message] = receiver.receive_messages(max_wait_time=5)
            number = message.sequence_number
            receiver.defer_message(message)
            assert receiver.receive_messages(max_wait_time=0.3) == []
            [deferred] = receiver.receive_deferred_messages([number])
            assert deferred.message_id == "d1"
            receiver.complete_message(deferred)  # update-disposition on $management
    assert sb.server.core.counts(queue).total == 0


def test_prefetch_is_honoured(sb):
    queue = sb.create_queue()
    with _client(sb) as client:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages([ServiceBusMessage(f"p{i}") for i in range(10)])
        with client.get_queue_receiver(queue, prefetch_count=5) as receiver:
            first = receiver.receive_messages(max_message_count=1, max_wait_time=5)
            assert len(first) == 1
            locked = sum(1 for m in sb.server.core.peek(queue, 20) if m.lock_token)
            assert 1 <= locked <= 6  # the prefetch credit bounds what the broker locked
            receiver.complete_message(first[0])
        # closing the receiver released what was prefetched but never handed out
        assert sum(1 for m in sb.server.core.peek(queue, 20) if m.lock_token) == 0
        assert len(_receive_all(client, queue, 9)) == 9


def test_wrong_sas_key_is_rejected(sb):
    queue = sb.create_queue()
    key = sb.server.settings.key
    wrong = sb.connection_string.replace(key, ("B" if key[0] != "B" else "C") + key[1:])
    with ServiceBusClient.from_connection_string(wrong, retry_total=0) as client:
        with pytest.raises(ServiceBusAuthenticationError):
            with client.get_queue_sender(queue) as sender:
                sender.send_messages(ServiceBusMessage("x"))
    assert sb.server.core.counts(queue).total == 0


def test_unknown_queue_raises_entity_not_found(sb):
    from azure.servicebus.exceptions import MessagingEntityNotFoundError

    with ServiceBusClient.from_connection_string(sb.connection_string, retry_total=0) as client:
        with pytest.raises(MessagingEntityNotFoundError):
            with client.get_queue_sender("no-such-queue") as sender:
                sender.send_messages(ServiceBusMessage("x"))
        with pytest.raises(MessagingEntityNotFoundError):
            with client.get_queue_receiver("no-such-queue") as receiver:
                receiver.receive_messages(max_wait_time=1)


def test_garbage_and_unknown_operations_only_affect_that_client(sb):
    queue = sb.create_queue()
    # a raw client that speaks the AMQP header and then garbage gets disconnected
    with socket.create_connection((sb.host, sb.port), timeout=5) as raw:
        raw.sendall(b"AMQP\x00\x01\x00\x00" + b"\xff" * 64)
        raw.settimeout(5)
        received = b""
        while True:
            chunk = raw.recv(4096)
            if not chunk:
                break
            received += chunk
        assert received.startswith(b"AMQP")  # it answered, then closed the connection
    # an unknown $management operation is an error for that request only
    from azure.servicebus._common import mgmt_handlers

    with _client(sb) as client:
        with client.get_queue_receiver(queue) as receiver:
            with pytest.raises(ServiceBusError):
                receiver._mgmt_request_response(  # noqa: SLF001 - the SDK's own request path
                    b"com.microsoft:no-such-operation", {}, mgmt_handlers.default
                )
            assert receiver.peek_messages(max_message_count=1) == []
        with client.get_queue_sender(queue) as sender:
            sender.send_messages(ServiceBusMessage("still serving"))
        [message] = _receive_all(client, queue, 1)
        assert str(message) == "still serving"


def test_restart_with_the_same_data_dir_keeps_messages(sb_emulator):
    queue = sb_emulator.create_queue(
        requires_duplicate_detection=True, duplicate_detection_history_time_window=300
    )
    connection_string = sb_emulator.connection_string
    with ServiceBusClient.from_connection_string(connection_string) as client:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages([ServiceBusMessage(f"k{i}", message_id=f"k{i}") for i in range(3)])
    sb_emulator.restart()
    assert sb_emulator.connection_string == connection_string  # same port, same key
    with ServiceBusClient.from_connection_string(connection_string) as client:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages(ServiceBusMessage("dup", message_id="k0"))  # still a duplicate
        got = _receive_all(client, queue, 3)
    assert sorted(str(m) for m in got) == ["k0", "k1", "k2"]
