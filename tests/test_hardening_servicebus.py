"""Service Bus (our emulator, driven through the official SDK) under hostile
conditions: bodies sent with the raw SDK that are no task -- data bodies no decoder
survives, AMQP value and sequence bodies --, read-only commands on a missing queue,
a wrong key and a closed port."""

from __future__ import annotations

import socket
import time

import pytest
import servicebus_support as support
from azure.servicebus import ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient
from azure.servicebus.amqp import AmqpAnnotatedMessage
from conftest import jobq_cli
from servicebus_support import admin, spec
from test_hardening_inputs import HOSTILE_BODIES
from test_hardening_local import drain_hostile

from ai4s_jobq import JobQ

sb_process, sb_cs, sb_queue = support.sb_process, support.sb_cs, support.sb_queue

DATA_BODIES = {k: v for k, v in HOSTILE_BODIES.items() if k != "empty"}
# Bodies another AMQP client may send: not data sections at all.  bytes([300]) of a
# sequence of ints made the receive itself fail before (a ValueError, not the
# TypeError the backend expected), so the message came back forever.


def _raw(message_id: str, **body: object) -> AmqpAnnotatedMessage:
    properties = {"message_id": message_id}
    return AmqpAnnotatedMessage(properties=properties, **body)  # type: ignore[arg-type]


OTHER_BODIES = {
    "value int": _raw("value int", value_body=5),
    "value map": _raw("value map", value_body={"id": "x", "args": {}}),
    "value string": _raw("value string", value_body="not a task"),
    "sequence of big ints": _raw("sequence of big ints", sequence_body=[[300, 400]]),
    "sequence of strings": _raw("sequence of strings", sequence_body=[["a", "b"]]),
}


async def test_hostile_bodies_are_dead_lettered(sb_cs, sb_queue, tmp_path):
    async with JobQ.open(spec(sb_queue), connection_string=sb_cs) as q:
        async with ServiceBusClient.from_connection_string(sb_cs) as client:
            async with client.get_queue_sender(sb_queue) as sender:
                for name, body in DATA_BODIES.items():
                    await sender.send_messages(ServiceBusMessage(body, message_id=name))
                for message in OTHER_BODIES.values():
                    await sender.send_messages(message)
        total = len(DATA_BODIES) + len(OTHER_BODIES)
        peeked = await q.peek(100)  # shown raw, not a failure
        assert len(peeked) == total, " ".join(repr(p.message_id) for p in peeked)
        assert all(p.task is None for p in peeked)
        await drain_hostile(q, tmp_path / "log", {**DATA_BODIES, **OTHER_BODIES})


async def _queue_names(cs: str) -> set[str]:
    async with admin(cs) as client:
        return {q.name async for q in client.list_queues()}


@pytest.mark.parametrize("command", [("size",), ("peek",), ("dlq", "list"), ("check",)])
async def test_read_only_commands_create_no_queue(sb_cs, sb_queue, command):
    before = await _queue_names(sb_cs)
    result = jobq_cli("--queue", spec(sb_queue), *command, env={"JOBQ_CONNECTION_STRING": sb_cs})
    assert "Traceback" not in result.stderr
    if command == ("check",):
        assert result.returncode == 0 and "does not exist" in result.stdout
    else:
        assert result.returncode == 4 and "does not exist" in result.stderr, result.stderr
    assert await _queue_names(sb_cs) == before


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fails_fast(cs: str, queue: str, command: tuple[str, ...], hint: str) -> None:
    started = time.monotonic()
    result = jobq_cli(
        "--queue", spec(queue), *command, env={"JOBQ_CONNECTION_STRING": cs}, timeout=60
    )
    took = time.monotonic() - started
    assert result.returncode == 4, (command, result.stdout, result.stderr)
    assert hint in result.stderr, (command, result.stderr)
    assert "line 1" not in result.stderr and "Traceback" not in result.stderr
    assert took < 15, (command, took)


@pytest.mark.parametrize(
    "command", [("push", "-c", "true"), ("size",), ("peek",), ("check",)], ids=" ".join
)
def test_wrong_key_is_a_configuration_error_at_once(sb_cs, sb_queue, command):
    parts = dict(p.split("=", 1) for p in sb_cs.split(";") if "=" in p)
    wrong = sb_cs.replace(parts["SharedAccessKey"], "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3Jvbmc=")
    _fails_fast(wrong, sb_queue, command, "Unauthorized" if command == ("size",) else "refused")


@pytest.mark.parametrize(
    "command", [("push", "-c", "true"), ("size",), ("peek",), ("check",)], ids=" ".join
)
def test_closed_port_is_a_configuration_error_at_once(sb_cs, sb_queue, command):
    parts = dict(p.split("=", 1) for p in sb_cs.split(";") if "=" in p)
    host_port = parts["Endpoint"][len("sb://") :].rstrip("/")
    closed = sb_cs.replace(host_port, f"127.0.0.1:{_closed_port()}")
    _fails_fast(closed, sb_queue, command, "connect")
