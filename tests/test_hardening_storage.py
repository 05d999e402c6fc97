"""Storage Queue (real Azurite) under hostile conditions: message texts sent with the
raw SDK that are no task (or no jobq frame), read-only commands on a missing queue,
a wrong account key and a closed port."""

from __future__ import annotations

import socket
import time

import pytest
from azure.storage.queue.aio import QueueClient, QueueServiceClient
from conftest import jobq_cli
from test_hardening_local import drain_hostile

from ai4s_jobq import JobQ

DEPTH = 5000  # past the JSON decoder's recursion limit, within Storage's 64 KiB

# Texts as another client could send them: each must be dead-lettered, none may
# make a receive fail (a framed one with a hostile header included).
HOSTILE_TEXTS = {
    "deep nesting": '{"id":"x","args":{"a":' + "[" * DEPTH + "]" * DEPTH + "}}",
    "huge integer": '{"id":"x","args":{"n":' + "9" * 5000 + "}}",
    "not JSON": "definitely not a task",
    "a JSON list": "[1, 2, 3]",
    "args not an object": '{"id": "x", "args": [1]}',
    "frame, deep header": '{"jobq":' + "[" * DEPTH + "]" * DEPTH + ',"body":{}}',
    "frame, huge-integer header": '{"jobq":{"id":"x","unstarted":' + "9" * 5000 + '},"body":1}',
    "frame, bad base64": '{"jobq":{"id":"x","enc":"base64"},"body":"!!not base64!!"}',
    "frame, deep body": '{"jobq":{"id":"x"},"body":' + "[" * DEPTH + "]" * DEPTH + "}",
    "frame, odd header values": '{"jobq":{"id":[1],"reason":5,"description":{}},"body":{}}',
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("JOBQ_QUEUE", "JOBQ_DEDUP_WINDOW", "JOBQ_CONNECTION_STRING"):
        monkeypatch.delenv(name, raising=False)


async def test_hostile_texts_are_dead_lettered(azurite, storage_queue_name, tmp_path):
    spec = f"devstoreaccount1/{storage_queue_name}"
    async with JobQ.open(spec, connection_string=azurite.connection_string) as q:
        async with QueueClient.from_connection_string(
            azurite.connection_string, storage_queue_name
        ) as raw:
            for text in HOSTILE_TEXTS.values():
                await raw.send_message(text)
        peeked = await q.peek(32)  # shown raw, not a failure
        assert len(peeked) == len(HOSTILE_TEXTS) and all(p.task is None for p in peeked)
        await drain_hostile(q, tmp_path / "log", HOSTILE_TEXTS)


async def _queue_names(connection_string: str) -> set[str]:
    async with QueueServiceClient.from_connection_string(connection_string) as service:
        return {q.name async for q in service.list_queues()}


@pytest.mark.parametrize("command", [("size",), ("peek",), ("dlq", "list"), ("check",)])
async def test_read_only_commands_create_no_queue(azurite, storage_queue_name, command):
    before = await _queue_names(azurite.connection_string)
    result = jobq_cli(
        "--queue",
        f"devstoreaccount1/{storage_queue_name}",
        *command,
        env={"JOBQ_CONNECTION_STRING": azurite.connection_string},
    )
    # Storage reports a missing queue as empty (as it does a missing -failed queue);
    # what matters is that reading did not create it (it did, before).
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    if command == ("check",):
        assert "does not exist" in result.stdout
    assert await _queue_names(azurite.connection_string) == before


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def _fails_fast(connection_string: str, queue: str, command: tuple[str, ...], hint: str) -> None:
    started = time.monotonic()
    result = jobq_cli(
        "--queue",
        f"devstoreaccount1/{queue}",
        *command,
        env={"JOBQ_CONNECTION_STRING": connection_string},
        timeout=60,
    )
    took = time.monotonic() - started
    assert result.returncode == 4, (command, result.stdout, result.stderr)
    assert hint in result.stderr, (command, result.stderr)
    assert "line 1" not in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one message
    assert took < 15, (command, took)


COMMANDS = [("push", "-c", "true"), ("size",), ("peek",), ("dlq", "list"), ("check",)]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_wrong_key_is_a_configuration_error_at_once(azurite, storage_queue_name, command):
    wrong = azurite.connection_string_with_key("V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3Jvbmc=")
    _fails_fast(wrong, storage_queue_name, command, "refused the credentials")


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_closed_port_is_a_configuration_error_at_once(azurite, storage_queue_name, command):
    port = _closed_port()
    closed = azurite.connection_string.replace(str(azurite.queue_port), str(port)).replace(
        str(azurite.table_port), str(port)
    )
    _fails_fast(closed, storage_queue_name, command, "cannot reach")
