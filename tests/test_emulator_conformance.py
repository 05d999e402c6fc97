"""Conformance: documented Azure Service Bus behaviour, driven through the official SDK.

One test per behaviour the emulator must share with Azure (issue: emulator fidelity).
Each names the documented rule it checks; docs/emulator.md lists what still differs.
"""

from __future__ import annotations

import datetime
import time
import uuid

import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError
from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSubQueue
from azure.servicebus.exceptions import ServiceBusError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sb(sb_emulator_shared):
    return sb_emulator_shared


def _client(sb) -> ServiceBusClient:
    return ServiceBusClient.from_connection_string(sb.connection_string)


def _wait_until(condition, timeout: float = 10.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


# ---------------------------------------------------------------- queue names


@pytest.mark.parametrize("name", ["jobs.v2", "jobs-v2", "jobs_v2", "team/jobs", "a/b.c-d_e", "9q"])
def test_queue_names_allow_letters_digits_period_hyphen_underscore_and_inner_slash(sb, name):
    name = f"{name}{uuid.uuid4().hex[:6]}"
    sb.create_queue(name)
    with _client(sb) as client, client.get_queue_sender(name) as sender:
        sender.send_messages(ServiceBusMessage("x"))
    with sb.admin() as admin:
        assert admin.get_queue_runtime_properties(name).active_message_count == 1


@pytest.mark.parametrize(
    "name", ["-jobs", "jobs-", "a//b", "jo bs", "jo#bs", "jo?bs", "jo*bs", "x" * 261]
)
def test_queue_names_outside_the_rules_are_refused(sb, name):
    with pytest.raises(HttpResponseError) as refused:
        sb.create_queue(name)
    assert refused.value.status_code == 400


def test_queue_names_are_case_insensitive(sb):
    name = f"CaseQ{uuid.uuid4().hex[:6]}"
    sb.create_queue(name)
    with pytest.raises(ResourceExistsError):
        sb.create_queue(name.lower())
    with _client(sb) as client, client.get_queue_sender(name.upper()) as sender:
        sender.send_messages(ServiceBusMessage("x"))
    with sb.admin() as admin:
        assert admin.get_queue(name.lower()).name.lower() == name.lower()
        assert admin.get_queue_runtime_properties(name).active_message_count == 1


# ---------------------------------------------------------------- sequence numbers


def test_sequence_numbers_are_per_queue_and_gap_free(sb):
    first, second = sb.create_queue(), sb.create_queue(requires_duplicate_detection=True)
    with _client(sb) as client:
        with client.get_queue_sender(first) as a, client.get_queue_sender(second) as b:
            a.send_messages([ServiceBusMessage(str(i)) for i in range(3)])
            b.send_messages(ServiceBusMessage("dup", message_id="same"))
            b.send_messages(ServiceBusMessage("dup", message_id="same"))  # dropped
            b.send_messages(ServiceBusMessage("other", message_id="other"))
            a.send_messages([ServiceBusMessage(str(i)) for i in range(3, 5)])
        with client.get_queue_receiver(first) as r1, client.get_queue_receiver(second) as r2:
            assert [m.sequence_number for m in r1.peek_messages(10)] == [1, 2, 3, 4, 5]
            assert [m.sequence_number for m in r2.peek_messages(10)] == [1, 2]


def test_a_scheduled_message_gets_a_new_sequence_number_when_it_activates(sb):
    name = sb.create_queue()
    with _client(sb) as client:
        with client.get_queue_sender(name) as sender:
            when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)
            (scheduled_seq,) = sender.schedule_messages(ServiceBusMessage("later"), when)
            sender.send_messages(ServiceBusMessage("now"))
        with client.get_queue_receiver(name, max_wait_time=5) as receiver:
            got: list = []
            _wait_until(
                lambda: got.extend(receiver.receive_messages(5, max_wait_time=1)) or len(got) >= 2
            )
            by_body = {str(m): m for m in got}
            assert by_body["now"].sequence_number == scheduled_seq + 1
            later = by_body["later"]
            assert later.sequence_number > by_body["now"].sequence_number
            # appended as if enqueued at activation
            assert later.enqueued_time_utc >= when - datetime.timedelta(milliseconds=50)
            for message in got:
                receiver.complete_message(message)


# ---------------------------------------------------------------- delivery count


def test_a_peek_during_the_first_lock_shows_delivery_count_zero(sb):
    name = sb.create_queue()
    with _client(sb) as client:
        with client.get_queue_sender(name) as sender:
            sender.send_messages(ServiceBusMessage("x"))
        with client.get_queue_receiver(name, max_wait_time=5) as receiver:
            (message,) = receiver.receive_messages(1)
            assert message.delivery_count == 0  # the AMQP header: earlier attempts
            # (the SDK peeks on from the last received number unless told where to start)
            (peeked,) = receiver.peek_messages(1, sequence_number=1)
            assert peeked.delivery_count == 0
            receiver.abandon_message(message)
            (peeked,) = receiver.peek_messages(1, sequence_number=1)
            assert peeked.delivery_count == 1


# ---------------------------------------------------------------- time to live


def test_the_queue_default_ttl_is_a_ceiling_on_message_ttl(sb):
    name = sb.create_queue(default_message_time_to_live=60)
    with _client(sb) as client:
        with client.get_queue_sender(name) as sender:
            sender.send_messages(ServiceBusMessage("long", time_to_live=datetime.timedelta(days=1)))
            sender.send_messages(
                ServiceBusMessage("short", time_to_live=datetime.timedelta(seconds=30))
            )
        with client.get_queue_receiver(name) as receiver:
            peeked = {str(m): m for m in receiver.peek_messages(2)}
    assert peeked["long"].time_to_live == datetime.timedelta(seconds=60)
    assert peeked["short"].time_to_live == datetime.timedelta(seconds=30)
    long = peeked["long"]
    assert long.expires_at_utc - long.enqueued_time_utc == datetime.timedelta(seconds=60)


def _dead_letter_count(sb, name: str) -> int:
    with sb.admin() as admin:  # reading the counts also applies expiry, as a receive does
        return admin.get_queue_runtime_properties(name).dead_letter_message_count


def test_deferred_messages_never_expire_into_the_dead_letter_queue(sb):
    name = sb.create_queue(
        default_message_time_to_live=2, dead_lettering_on_message_expiration=True
    )
    with _client(sb) as client:
        with client.get_queue_sender(name) as sender:
            sender.send_messages([ServiceBusMessage("deferred"), ServiceBusMessage("plain")])
        with client.get_queue_receiver(name, max_wait_time=5) as receiver:
            got: list = []
            _wait_until(
                lambda: got.extend(receiver.receive_messages(2, max_wait_time=1)) or len(got) >= 2
            )
            deferred = next(m for m in got if str(m) == "deferred")
            receiver.defer_message(deferred)
            receiver.abandon_message(next(m for m in got if str(m) == "plain"))
        # both expire at once; the plain one reaching the DLQ shows that time has passed
        assert _wait_until(lambda: _dead_letter_count(sb, name) >= 1)
        with client.get_queue_receiver(name, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            dead = [str(m) for m in dlq.peek_messages(10, sequence_number=1)]
        assert dead == ["plain"]
        with client.get_queue_receiver(name) as receiver:
            (again,) = receiver.receive_deferred_messages([deferred.sequence_number])
            assert str(again) == "deferred"


# ---------------------------------------------------------------- dead letters


def test_dead_letter_reasons_and_descriptions_are_written_as_azure_writes_them(sb):
    poison_queue = sb.create_queue(max_delivery_count=2)
    expiring_queue = sb.create_queue(
        default_message_time_to_live=1, dead_lettering_on_message_expiration=True
    )
    with _client(sb) as client:
        with client.get_queue_sender(poison_queue) as sender:
            sender.send_messages(ServiceBusMessage("poison"))
        with client.get_queue_receiver(poison_queue, max_wait_time=5) as receiver:
            for _ in range(2):
                (message,) = receiver.receive_messages(1, max_wait_time=5)
                receiver.abandon_message(message)
        with client.get_queue_sender(expiring_queue) as sender:
            sender.send_messages(ServiceBusMessage("expiring"))
        assert _wait_until(lambda: _dead_letter_count(sb, expiring_queue) == 1)
        dead = {}
        for name in (poison_queue, expiring_queue):
            with client.get_queue_receiver(name, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
                dead.update({str(m): m for m in dlq.peek_messages(10, sequence_number=1)})
    assert dead["poison"].dead_letter_reason == "MaxDeliveryCountExceeded"
    assert dead["poison"].dead_letter_error_description == (
        "Message could not be consumed after 2 delivery attempts."
    )
    assert dead["expiring"].dead_letter_reason == "TTLExpiredException"
    assert dead["expiring"].dead_letter_error_description == (
        "The message expired and was dead lettered."
    )


def test_a_dead_lettered_message_cannot_be_dead_lettered_again_and_keeps_its_reason(sb):
    name = sb.create_queue()
    with _client(sb) as client:
        with client.get_queue_sender(name) as sender:
            sender.send_messages(ServiceBusMessage("x"))
        with client.get_queue_receiver(name, max_wait_time=5) as receiver:
            (message,) = receiver.receive_messages(1)
            receiver.dead_letter_message(message, reason="First", error_description="one")
        with client.get_queue_receiver(
            name, sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=5
        ) as dlq:
            (dead,) = dlq.receive_messages(1)
            with pytest.raises(ServiceBusError):
                dlq.dead_letter_message(dead, reason="Second", error_description="two")
            (peeked,) = dlq.peek_messages(1, sequence_number=1)
    assert (peeked.dead_letter_reason, peeked.dead_letter_error_description) == ("First", "one")


# ---------------------------------------------------------------- queue properties


def test_queue_properties_round_trip(sb):
    name = f"props-{uuid.uuid4().hex[:8]}"
    with sb.admin() as admin:
        admin.create_queue(
            name,
            auto_delete_on_idle=datetime.timedelta(hours=3),
            enable_batched_operations=False,
            max_size_in_megabytes=2048,
            user_metadata="owner=jobq",
            default_message_time_to_live=datetime.timedelta(days=2),
            dead_lettering_on_message_expiration=True,
            max_delivery_count=7,
            lock_duration=datetime.timedelta(seconds=45),
        )
        queue = admin.get_queue(name)
        assert queue.auto_delete_on_idle == datetime.timedelta(hours=3)
        assert queue.enable_batched_operations is False
        assert queue.max_size_in_megabytes == 2048
        assert queue.user_metadata == "owner=jobq"
        assert queue.default_message_time_to_live == datetime.timedelta(days=2)
        assert queue.dead_lettering_on_message_expiration is True
        assert queue.max_delivery_count == 7
        assert queue.lock_duration == datetime.timedelta(seconds=45)
        queue.user_metadata = "owner=someone-else"
        queue.max_size_in_megabytes = 1024
        admin.update_queue(queue)
        again = admin.get_queue(name)
        assert (again.user_metadata, again.max_size_in_megabytes) == ("owner=someone-else", 1024)
        assert again.auto_delete_on_idle == datetime.timedelta(hours=3)


def test_queue_property_defaults_are_azures(sb):
    name = f"defaults-{uuid.uuid4().hex[:8]}"
    with sb.admin() as admin:
        admin.create_queue(name)
        queue = admin.get_queue(name)
    assert queue.max_delivery_count == 10
    assert queue.lock_duration == datetime.timedelta(minutes=1)
    assert queue.max_size_in_megabytes == 1024
    assert queue.enable_batched_operations is True
    assert queue.requires_duplicate_detection is False
    assert queue.duplicate_detection_history_time_window == datetime.timedelta(minutes=10)


# ---------------------------------------------------------------- size limits


def test_a_property_over_32_kb_is_refused(sb):
    name = sb.create_queue()
    with _client(sb) as client, client.get_queue_sender(name) as sender:
        with pytest.raises(ServiceBusError):
            sender.send_messages(
                ServiceBusMessage("x", application_properties={"big": "v" * (33 * 1024)})
            )
    with sb.admin() as admin:
        assert admin.get_queue_runtime_properties(name).active_message_count == 0


def test_properties_over_64_kb_in_total_are_refused(sb):
    name = sb.create_queue()
    props = {f"p{i}": "v" * (20 * 1024) for i in range(4)}  # each under 32 KB, 80 KB in all
    with _client(sb) as client, client.get_queue_sender(name) as sender:
        with pytest.raises(ServiceBusError):
            sender.send_messages(ServiceBusMessage("x", application_properties=props))
        sender.send_messages(
            ServiceBusMessage("ok", application_properties={"p": "v" * (30 * 1024)})
        )
    with sb.admin() as admin:
        assert admin.get_queue_runtime_properties(name).active_message_count == 1


# ---------------------------------------------------------------- message IDs


def test_the_service_assigns_a_message_id_when_the_sender_sets_none(sb):
    name = sb.create_queue()
    with _client(sb) as client:
        with client.get_queue_sender(name) as sender:
            sender.send_messages([ServiceBusMessage("a"), ServiceBusMessage("b")])
        with client.get_queue_receiver(name) as receiver:
            ids = [m.message_id for m in receiver.peek_messages(2)]
    assert all(isinstance(i, str) and i for i in ids), ids
    assert ids[0] != ids[1]
