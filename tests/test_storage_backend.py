"""StorageQueueBackend against a real Azurite: the Backend contract, the dead-letter
queue, malformed messages, the application-side dedup ledger and error messages."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from azure.data.tables.aio import TableClient
from azure.storage.queue.aio import QueueClient
from azurite_fixtures import OpenBackend

from ai4s_jobq.backends.base import (
    BackendError,
    LockLostError,
    MessageTooLargeError,
    OutgoingMessage,
    QueueSettings,
    QueueUnavailableError,
)
from ai4s_jobq.backends.storage.backend import StorageQueueBackend
from ai4s_jobq.backends.storage.dedup import LEDGER_TABLE, row_key
from ai4s_jobq.backends.storage.wire import MESSAGE_TEXT_LIMIT, decode_text, encode_text

ROOT = Path(__file__).resolve().parent.parent


def task(n: int, payload: str = "") -> OutgoingMessage:
    body = json.dumps({"v": 1, "id": f"task{n}", "args": {"cmd": f"echo {n}{payload}"}})
    return OutgoingMessage(f"task{n}", body.encode())


async def drain_ids(backend: StorageQueueBackend) -> list[str]:
    """Receive and complete everything; the message IDs in receive order."""
    ids: list[str] = []
    while batch := await backend.receive(32, 0.3):
        await asyncio.gather(*(backend.complete(m) for m in batch))
        ids.extend(m.message_id for m in batch)
    return ids


# ---------------------------------------------------------------------- framing (no I/O)


@pytest.mark.parametrize(
    "body",
    [
        b'{"v":1,"id":"x","args":{"cmd":"echo \\u00e9 \xc3\xa9"}}',
        b"plain text, not JSON",
        b"\xff\xfe\x00binary",
        b"ctrl \x01 char",
        b'{"a":\r\n1}',  # valid JSON, but XML would turn \r\n into \n
        "\ufffe".encode(),
        b"",
    ],
)
def test_frame_round_trips_any_body_byte_for_byte(body: bytes) -> None:
    text = encode_text({"id": "abc"}, body)
    json.loads(text)  # always valid JSON, so the portal shows it readably
    assert decode_text(text) == ({"id": "abc", **_enc(body)}, body)


def _enc(body: bytes) -> dict[str, str]:
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return {"enc": "base64"}
    if any(c in text for c in "\x01\r\ufffe"):
        return {"enc": "text"}
    try:
        json.loads(text)
        return {}
    except ValueError:
        return {"enc": "text"}


def test_foreign_text_decodes_as_raw_body() -> None:
    for text in [
        "hello",
        '{"jobq":{"id":"x"}',
        '{"jobq":1,"body":2}',
        '{"jobq":{"enc":"base64"},"body":"!!"}',
    ]:
        assert decode_text(text) == (None, text.encode())


def test_invalid_queue_name_is_a_clear_error(azurite) -> None:
    with pytest.raises(QueueUnavailableError, match="not a valid Storage Queue name"):
        StorageQueueBackend.from_spec(
            None, "Bad_Name", azurite.connection_string, dedup_window=None
        )


# ---------------------------------------------------------------------- contract


async def test_round_trip(open_backend: OpenBackend) -> None:
    async with open_backend() as backend:
        message = task(1)
        (outcome,) = await backend.push([message])
        assert outcome.ok and outcome.duplicate is False
        (received,) = await backend.receive(5, 2.0)
        assert received.message_id == "task1"
        assert received.body == message.body
        assert received.delivery_count == 1
        assert received.locked_until is not None and received.locked_until > time.time()
        await backend.complete(received)
        assert (await backend.counts()).active == 0
        assert await backend.receive(5, 0.2) == []


async def test_batch_receive_returns_up_to_32_and_never_more_than_asked(
    open_backend: OpenBackend,
) -> None:
    async with open_backend() as backend:
        outcomes = await backend.push([task(n) for n in range(40)])
        assert all(o.ok for o in outcomes)
        first = await backend.receive(100, 2.0)
        assert len(first) == 32
        second = await backend.receive(3, 2.0)
        assert len(second) == 3
        assert len({m.message_id for m in first + second}) == 35
        rest = await drain_ids(backend)
        assert len(rest) == 5


async def test_receive_waits_for_a_message_pushed_later(open_backend: OpenBackend) -> None:
    async with open_backend() as backend:

        async def push_soon() -> None:
            await asyncio.sleep(0.3)
            await backend.push([task(7)])

        pusher = asyncio.create_task(push_soon())
        received = await backend.receive(1, 5.0)
        await pusher
        assert [m.message_id for m in received] == ["task7"]


async def test_renew_keeps_a_long_task_invisible(open_backend: OpenBackend) -> None:
    async with open_backend(lock=2) as worker, open_backend(create=False) as other:
        await worker.push([task(1)])
        (message,) = await worker.receive(1, 2.0)
        deadline = time.monotonic() + 5  # 2.5 lock durations
        while time.monotonic() < deadline:
            await asyncio.sleep(worker.lock_renew_interval(message))
            await worker.renew(message)
            assert await other.receive(1, 0) == []
        await worker.complete(message)
        assert await other.receive(1, 0.5) == []


async def test_lost_pop_receipt_raises_lock_lost(open_backend: OpenBackend) -> None:
    async with open_backend(lock=1) as first, open_backend(create=False) as second:
        await first.push([task(1)])
        (stale,) = await first.receive(1, 2.0)
        # The lock *is* the visibility timeout: let it expire, then another receiver wins.
        taken = await second.receive(1, 5.0)
        assert [m.delivery_count for m in taken] == [2]
        with pytest.raises(LockLostError):
            await first.renew(stale)
        with pytest.raises(LockLostError):
            await first.complete(stale)
        await second.complete(taken[0])
        assert (await first.counts()).active == 0


async def test_abandon_makes_the_message_available_at_once(open_backend: OpenBackend) -> None:
    async with open_backend(lock=60) as backend:
        await backend.push([task(1)])
        (message,) = await backend.receive(1, 2.0)
        await backend.abandon(message)
        (again,) = await backend.receive(1, 1.0)
        assert again.message_id == "task1" and again.delivery_count == 2
        await backend.complete(again)


async def test_dead_letter_moves_to_failed_queue_with_reason(
    open_backend: OpenBackend, azurite, storage_queue_name: str
) -> None:
    async with open_backend() as backend:
        message = task(1)
        await backend.push([message])
        (received,) = await backend.receive(1, 2.0)
        await backend.dead_letter(received, "TaskFailed", "exit code 3\nstderr tail")
        counts = await backend.counts()
        assert (counts.active, counts.dead_letter) == (0, 1)
        (peeked,) = await backend.peek(10, dead_letter=True)
        assert peeked.message_id == "task1"
        assert peeked.body == message.body
        assert peeked.dead_letter_reason == "TaskFailed"
        assert peeked.dead_letter_description == "exit code 3\nstderr tail"
        assert peeked.delivery_count == 1
        # It really is the sibling queue QUEUE-failed, readable by any tool.
        async with QueueClient.from_connection_string(
            azurite.connection_string, f"{storage_queue_name}-failed"
        ) as raw:
            props = await raw.get_queue_properties()
            assert props.approximate_message_count == 1
        (locked,) = await backend.receive(1, 1.0, dead_letter=True)
        await backend.complete(locked)
        assert (await backend.counts()).dead_letter == 0


async def test_malformed_message_comes_out_of_receive_and_can_be_dead_lettered(
    open_backend: OpenBackend, azurite, storage_queue_name: str
) -> None:
    async with open_backend() as backend:
        async with QueueClient.from_connection_string(
            azurite.connection_string, storage_queue_name
        ) as raw:
            await raw.send_message("this is not a task {{{")
            await raw.send_message('{"jobq":{"id":"x","enc":"base64"},"body":"***"}')
        await backend.push([task(1)])
        received = await backend.receive(32, 2.0)
        assert len(received) == 3
        by_body = {m.body: m for m in received}
        bad = by_body[b"this is not a task {{{"]
        assert bad.delivery_count == 1 and bad.message_id  # the Azure message id
        assert b'{"jobq":{"id":"x","enc":"base64"},"body":"***"}' in by_body
        await backend.dead_letter(bad, "MalformedTask", "not JSON")
        (record,) = await backend.peek(5, dead_letter=True)
        assert record.body == b"this is not a task {{{"
        assert record.dead_letter_reason == "MalformedTask"


async def test_max_delivery_count_dead_letters_on_receive(open_backend: OpenBackend) -> None:
    async with open_backend(lock=30, max_delivery=2) as backend:
        await backend.push([task(1)])
        for expected in (1, 2):
            (message,) = await backend.receive(1, 2.0)
            assert message.delivery_count == expected
            await backend.abandon(message)
        assert await backend.receive(1, 0.3) == []
        (record,) = await backend.peek(5, dead_letter=True)
        assert record.dead_letter_reason == "MaxDeliveryCountExceeded"


async def test_oversize_task_fails_by_name_and_the_others_are_sent(
    open_backend: OpenBackend,
) -> None:
    async with open_backend() as backend:
        big = task(2, payload="x" * MESSAGE_TEXT_LIMIT)
        outcomes = await backend.push([task(1), big, task(3)])
        assert [o.ok for o in outcomes] == [True, False, True]
        error = outcomes[1].error
        assert isinstance(error, MessageTooLargeError)
        assert "task2" in str(error) and str(MESSAGE_TEXT_LIMIT) in str(error)
        assert sorted(await drain_ids(backend)) == ["task1", "task3"]


async def test_peek_counts_and_clear(open_backend: OpenBackend) -> None:
    async with open_backend() as backend:
        await backend.push([task(n) for n in range(5)])
        peeked = await backend.peek(3)
        assert len(peeked) == 3 and all(m.handle is None for m in peeked)
        assert (await backend.counts()).active == 5
        assert await backend.clear() == 5
        assert (await backend.counts()).active == 0


# ---------------------------------------------------------------------- dedup


async def test_dedup_drops_a_repeat_inside_the_window(open_backend: OpenBackend) -> None:
    async with open_backend() as backend:
        info = await backend.dedup_info()
        assert (info.duplicate_detection, info.window, info.mechanism) == (
            True,
            timedelta(days=7),
            "application ledger",
        )
        first = await backend.push([task(1), task(2)])
        again = await backend.push([task(1), task(3), task(3)])
        assert [o.duplicate for o in first] == [False, False]
        assert [o.duplicate for o in again] == [True, False, True]
        assert sorted(await drain_ids(backend)) == ["task1", "task2", "task3"]
        # Completed does not mean forgotten: the window counts from acceptance.
        assert [o.duplicate for o in await backend.push([task(1)])] == [True]


async def test_dedup_accepts_a_repeat_after_the_window(open_backend: OpenBackend) -> None:
    async with open_backend(window=timedelta(seconds=2)) as backend:
        assert [o.duplicate for o in await backend.push([task(1)])] == [False]
        assert [o.duplicate for o in await backend.push([task(1)])] == [True]
        await asyncio.sleep(2.2)  # the window expiring is the behaviour under test
        assert [o.duplicate for o in await backend.push([task(1)])] == [False]
        assert await drain_ids(backend) == ["task1", "task1"]


async def test_window_is_the_queues_not_the_producers(
    open_backend: OpenBackend, azurite, storage_queue_name
) -> None:
    async with open_backend(window=timedelta(hours=12)):
        pass
    other = StorageQueueBackend.from_spec(
        None, storage_queue_name, azurite.connection_string, dedup_window=timedelta(minutes=1)
    )
    async with other:
        await other.ensure_queue(QueueSettings(dedup_window=timedelta(minutes=1)))
        assert (await other.dedup_info()).window == timedelta(hours=12)


async def test_dedup_off_sends_every_copy(open_backend: OpenBackend) -> None:
    async with open_backend(window=None) as backend:
        info = await backend.dedup_info()
        assert info.duplicate_detection is False and info.mechanism == "none"
        outcomes = await backend.push([task(1), task(1)])
        assert [o.duplicate for o in outcomes] == [None, None]
        assert await drain_ids(backend) == ["task1", "task1"]


async def test_foreign_queue_reports_no_dedup_until_a_window_is_given(
    azurite, storage_queue_name
) -> None:
    async with QueueClient.from_connection_string(
        azurite.connection_string, storage_queue_name
    ) as raw:
        await raw.create_queue()
    plain = StorageQueueBackend.from_spec(
        None, storage_queue_name, azurite.connection_string, dedup_window=None
    )
    async with plain:
        await plain.ensure_queue(QueueSettings())
        info = await plain.dedup_info()
        assert info.duplicate_detection is False and "another tool" in (info.note or "")
    explicit = StorageQueueBackend.from_spec(
        None, storage_queue_name, azurite.connection_string, dedup_window=timedelta(hours=1)
    )
    async with explicit:
        await explicit.ensure_queue(QueueSettings(dedup_window=timedelta(hours=1)))
        assert (await explicit.dedup_info()).window == timedelta(hours=1)


async def _ledger_entity(azurite, queue: str, task_id: str, state: str, age: float) -> None:
    async with TableClient.from_connection_string(azurite.connection_string, LEDGER_TABLE) as table:
        await table.upsert_entity(
            {
                "PartitionKey": queue,
                "RowKey": row_key(task_id),
                "state": state,
                "accepted_at": time.time() - age,
                "producer": "test",
            }
        )


async def test_stale_pending_claim_is_taken_over_and_sent(
    open_backend: OpenBackend, azurite, storage_queue_name
) -> None:
    """A producer that died between claiming and sending must not lose the task."""
    async with open_backend() as backend:
        await _ledger_entity(azurite, storage_queue_name, "task1", "pending", age=3600)
        assert [o.duplicate for o in await backend.push([task(1)])] == [False]
        assert await drain_ids(backend) == ["task1"]


async def test_fresh_pending_claim_waits_for_its_owner(
    open_backend: OpenBackend, azurite, storage_queue_name
) -> None:
    async with open_backend() as backend:
        await _ledger_entity(azurite, storage_queue_name, "task1", "pending", age=0)

        async def owner_finishes() -> None:
            await asyncio.sleep(0.5)
            await _ledger_entity(azurite, storage_queue_name, "task1", "sent", age=0)

        owner = asyncio.create_task(owner_finishes())
        started = time.monotonic()
        outcomes = await backend.push([task(1)])
        await owner
        assert [o.duplicate for o in outcomes] == [True]
        assert time.monotonic() - started >= 0.4  # it waited rather than guessing
        assert await drain_ids(backend) == []


async def test_user_ids_with_forbidden_row_key_characters(open_backend: OpenBackend) -> None:
    async with open_backend() as backend:
        message = OutgoingMessage("a/b#c?d\\e", b'{"x":1}')
        assert [o.duplicate for o in await backend.push([message])] == [False]
        assert [o.duplicate for o in await backend.push([message])] == [True]
        assert row_key("a/b#c?d\\e") != row_key("~" + b"a/b#c?d\\e".hex())


PRODUCER = """
import asyncio, json, sys
from ai4s_jobq.backends.base import OutgoingMessage, QueueSettings
from ai4s_jobq.backends.storage.backend import StorageQueueBackend

async def main(connection_string, queue, count):
    backend = StorageQueueBackend.from_spec(None, queue, connection_string, dedup_window=None)
    async with backend:
        await backend.ensure_queue(QueueSettings())
        messages = [OutgoingMessage(f"task{n}", json.dumps({"n": n}).encode())
                    for n in range(count)]
        outcomes = await backend.push(messages)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok][:3]
    print(json.dumps(sum(o.duplicate is False for o in outcomes)))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


@pytest.mark.slow
async def test_16_racing_producers_push_exactly_one_message_per_task(
    azurite, storage_queue_name, open_backend: OpenBackend
) -> None:
    producers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            PRODUCER,
            azurite.connection_string,
            storage_queue_name,
            "500",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(16)
    ]
    results = [await p.communicate() for p in producers]
    for process, (_, err) in zip(producers, results):
        assert process.returncode == 0, err.decode()[-2000:]
    accepted = [json.loads(out) for out, _ in results]
    assert sum(accepted) == 500  # each task accepted by exactly one producer
    async with open_backend(create=False) as backend:
        ids = await drain_ids(backend)
    assert len(ids) == 500 and len(set(ids)) == 500


# ---------------------------------------------------------------------- errors


async def test_wrong_account_key_is_a_clear_error_without_the_key(
    azurite, storage_queue_name, caplog: pytest.LogCaptureFixture
) -> None:
    wrong_key = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXk=" * 2
    caplog.set_level(logging.DEBUG)
    backend = StorageQueueBackend.from_spec(
        None, storage_queue_name, azurite.connection_string_with_key(wrong_key), dedup_window=None
    )
    async with backend:
        with pytest.raises(BackendError) as caught:
            await backend.ensure_queue(QueueSettings())
    message = str(caught.value)
    assert "refused the credentials" in message and "devstoreaccount1" in message
    assert "account key" in message
    for text in (
        message,
        repr(caught.value),
        str(caught.value.__cause__),
        str(caught.value.__context__),
        caplog.text,
    ):
        assert wrong_key not in text and wrong_key[:20] not in text


async def test_unreachable_endpoint_is_a_clear_error(storage_queue_name) -> None:
    from azurite_fixtures import connection_string, free_port

    port = free_port()
    backend = StorageQueueBackend.from_spec(
        None, storage_queue_name, connection_string(port, port, port), dedup_window=None
    )
    async with backend:
        with pytest.raises(BackendError, match="cannot reach storage account"):
            await backend.counts()


# ---------------------------------------------------------------------- the fast REST path


async def test_xml_special_characters_survive_the_fast_send_path(open_backend: OpenBackend) -> None:
    async with open_backend() as backend:
        assert backend._rest is not None  # the signed-REST path is the one under test
        body = json.dumps({"cmd": "a < b && c > d; echo '\"x\"' \u00e9 \U0001f600"}).encode()
        messages = [
            OutgoingMessage("special", body),
            OutgoingMessage("crlf", b'{"a":\r\n1}'),
            OutgoingMessage("binary", b"\x00\xff"),
        ]
        assert all(o.ok for o in await backend.push(messages))
        received = {m.message_id: m.body for m in await backend.receive(32, 2.0)}
        assert received == {m.message_id: m.body for m in messages}


def test_connection_string_parsing() -> None:
    from ai4s_jobq.backends.storage.rest import parse_connection_string

    dev = parse_connection_string("UseDevelopmentStorage=true")
    assert dev is not None and dev.account == "devstoreaccount1"
    assert dev.queue_url == "http://127.0.0.1:10001/devstoreaccount1"
    cloud = parse_connection_string(
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;"
        "EndpointSuffix=core.windows.net"
    )
    assert cloud is not None
    assert (cloud.queue_url, cloud.table_url, cloud.key) == (
        "https://acct.queue.core.windows.net",
        "https://acct.table.core.windows.net",
        b"key",
    )
    sas = parse_connection_string(
        "QueueEndpoint=https://acct.queue.core.windows.net;"
        "TableEndpoint=https://acct.table.core.windows.net;SharedAccessSignature=?sv=1&sig=x"
    )
    assert sas is not None and sas.sas == "sv=1&sig=x" and sas.key is None
    assert parse_connection_string("AccountName=acct") is None  # no credential: SDK path


async def test_sas_connection_string_works(azurite, storage_queue_name) -> None:
    from datetime import datetime, timezone

    from azure.storage.queue import (
        AccountSasPermissions,
        ResourceTypes,
        generate_account_sas,
    )
    from azurite_fixtures import ACCOUNT, ACCOUNT_KEY

    sas = generate_account_sas(
        ACCOUNT,
        ACCOUNT_KEY,
        ResourceTypes(service=True, container=True, object=True),
        AccountSasPermissions(
            read=True,
            write=True,
            delete=True,
            list=True,
            add=True,
            create=True,
            update=True,
            process=True,
        ),
        expiry=datetime.now(timezone.utc) + timedelta(hours=1),
    )
    connection = (
        f"QueueEndpoint=http://127.0.0.1:{azurite.queue_port}/{ACCOUNT};"
        f"TableEndpoint=http://127.0.0.1:{azurite.table_port}/{ACCOUNT};"
        f"SharedAccessSignature={sas}"
    )
    backend = StorageQueueBackend.from_spec(None, storage_queue_name, connection, dedup_window=None)
    async with backend:
        assert backend._rest is not None and backend._rest.endpoints.sas
        await backend.ensure_queue(QueueSettings(duplicate_detection=False))
        assert [o.ok for o in await backend.push([task(1)])] == [True]
        assert await drain_ids(backend) == ["task1"]


async def test_wrong_key_on_the_fast_path_is_a_clear_error(azurite, storage_queue_name) -> None:
    from ai4s_jobq.backends.storage.rest import (
        RestError,
        StorageRest,
        parse_connection_string,
    )
    from ai4s_jobq.backends.storage.wire import rest_error

    wrong_key = "QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5"
    endpoints = parse_connection_string(azurite.connection_string_with_key(wrong_key))
    assert endpoints is not None
    async with StorageRest(endpoints) as rest:
        with pytest.raises(RestError) as caught:
            await rest.send_message(storage_queue_name, "x")
    assert caught.value.status == 403
    error = rest_error(caught.value, "sending", "devstoreaccount1")
    assert "refused the credentials" in str(error)
    assert wrong_key not in str(error) and wrong_key not in str(caught.value)
