"""The ``$management`` request/response operations a Service Bus queue answers.

Each operation takes the decoded request body (an AMQP map) and returns a
:class:`MgmtReply`; the AMQP layer wraps it in a response message with
``statusCode`` / ``statusDescription`` / ``errorCondition`` application
properties, which is what ``azure.servicebus._common.mgmt_handlers`` reads.
Operation names and map keys follow ``azure/servicebus/_common/constants.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proton import Array, Data, symbol, timestamp

from ai4s_jobq.broker_core import (
    ACTIVE,
    BrokerError,
    InvalidOperation,
    LockLost,
    MessageTooLarge,
    NewMessage,
    QueueNotFound,
    StoredMessage,
)

from . import codec
from .hub import EmulatorContext

VENDOR = "com.microsoft:"
LOCK_LOST = symbol(VENDOR + "message-lock-lost")
ARGUMENT_ERROR = symbol(VENDOR + "argument-error")
NOT_FOUND = symbol("amqp:not-found")
NOT_IMPLEMENTED = symbol("amqp:not-implemented")
MESSAGE_NOT_FOUND = symbol(VENDOR + "message-not-found")
SIZE_EXCEEDED = symbol("amqp:link:message-size-exceeded")


@dataclass
class MgmtReply:
    status: int
    description: str = ""
    body: Any = None
    condition: symbol | None = None


class BadRequest(Exception):
    """The request is malformed; answered with 400 argument-error."""


@dataclass
class MgmtTarget:
    """The entity a ``$management`` link belongs to."""

    queue: str
    sub_queue: str = ACTIVE


def handle(ctx: EmulatorContext, target: MgmtTarget, operation: str, body: Any) -> MgmtReply:
    """Run one management operation; never raises for a client's mistake."""
    op = _OPERATIONS.get(operation)
    if op is None:
        return MgmtReply(
            501,
            f"operation {operation!r} is not supported by the emulator",
            condition=NOT_IMPLEMENTED,
        )
    if body is not None and not isinstance(body, dict):
        return MgmtReply(400, "the request body must be an AMQP map", condition=ARGUMENT_ERROR)
    try:
        return op(ctx, target, body or {})
    except LockLost as exc:
        return MgmtReply(410, str(exc), condition=LOCK_LOST)
    except QueueNotFound as exc:
        return MgmtReply(404, str(exc), condition=NOT_FOUND)
    except MessageTooLarge as exc:
        return MgmtReply(413, str(exc), condition=SIZE_EXCEEDED)
    except (BadRequest, InvalidOperation, codec.MalformedMessage, codec.HeaderTooLarge) as exc:
        return MgmtReply(400, str(exc), condition=ARGUMENT_ERROR)
    except BrokerError as exc:
        return MgmtReply(500, str(exc), condition=symbol("amqp:internal-error"))


def _elements(value: Any, name: str) -> list:
    if isinstance(value, Array):
        return list(value.elements)
    if isinstance(value, (list, tuple)):
        return list(value)
    raise BadRequest(f"{name!r} must be an array")


def _lock_tokens(body: dict) -> list[str]:
    tokens = []
    for item in _elements(body.get("lock-tokens"), "lock-tokens"):
        try:
            tokens.append(str(item if isinstance(item, uuid.UUID) else uuid.UUID(str(item))))
        except ValueError:
            raise BadRequest("lock-tokens must be UUIDs") from None
    return tokens


def _renew_lock(ctx: EmulatorContext, target: MgmtTarget, body: dict) -> MgmtReply:
    expirations = [
        timestamp(int(ctx.core.renew_lock(token) * 1000)) for token in _lock_tokens(body)
    ]
    return MgmtReply(200, "OK", {"expirations": Array(None, Data.TIMESTAMP, *expirations)})


def _encoded_for_client(message: StoredMessage, *, peek: bool) -> bytes:
    state = {"active": 0, "deferred": 1, "scheduled": 2}.get(message.state, 0)
    info = codec.DeliveryInfo(
        sequence_number=message.sequence_number,
        enqueued_time=message.enqueued_time,
        # The count rises when a lock ends without completion (abandon, expiry), so
        # a peek during the first lock shows 0, and a receive shows earlier attempts.
        delivery_count=max(message.delivery_count - (1 if message.lock_token else 0), 0)
        if peek
        else max(message.delivery_count - 1, 0),
        locked_until=None if peek else message.locked_until,
        message_state=state if peek else None,
        dead_letter_reason=message.dead_letter_reason,
        dead_letter_description=message.dead_letter_description,
        extra_properties=message.properties,
        time_to_live=message.time_to_live,
    )
    return codec.render_for_delivery(message.body, info)


def _peek(ctx: EmulatorContext, target: MgmtTarget, body: dict) -> MgmtReply:
    start = int(body.get("from-sequence-number") or 0)
    count = int(body.get("message-count") or 1)
    if count < 1:
        raise BadRequest("message-count must be at least 1")
    found = ctx.core.peek(
        target.queue, count, from_sequence_number=start, sub_queue=target.sub_queue
    )
    if not found:
        return MgmtReply(204, "No messages")
    return MgmtReply(
        200, "OK", {"messages": [{"message": _encoded_for_client(m, peek=True)} for m in found]}
    )


def new_message_from_parsed(parsed: codec.ParsedMessage) -> NewMessage:
    """Turn one client-encoded message into what the broker core stores; raises
    :class:`codec.HeaderTooLarge` for properties over Azure's limits."""
    codec.check_header_size(parsed)
    body = codec.strip_for_storage(parsed)
    message_id = parsed.message_id
    if not message_id:  # the service assigns one, as Azure does
        message_id = uuid.uuid4().hex
        body = codec.assign_message_id(body, message_id)
    return NewMessage(
        message_id=message_id,
        body=body,
        time_to_live=parsed.time_to_live,
        scheduled_enqueue_time=parsed.scheduled_enqueue_time,
    )


def new_message_from_bytes(payload: bytes) -> NewMessage:
    return new_message_from_parsed(codec.parse_message(payload))


def _schedule(ctx: EmulatorContext, target: MgmtTarget, body: dict) -> MgmtReply:
    items = body.get("messages")
    if not isinstance(items, (list, tuple)):
        raise BadRequest("'messages' must be a list")
    messages = []
    for item in items:
        if not isinstance(item, dict) or "message" not in item:
            raise BadRequest("each scheduled message needs a 'message'")
        messages.append(new_message_from_bytes(bytes(item["message"])))
    results = ctx.core.send(target.queue, messages)
    numbers = [int(r.sequence_number or 0) for r in results]
    return MgmtReply(200, "OK", {"sequence-numbers": Array(None, Data.LONG, *numbers)})


def _cancel_scheduled(ctx: EmulatorContext, target: MgmtTarget, body: dict) -> MgmtReply:
    numbers = [int(n) for n in _elements(body.get("sequence-numbers"), "sequence-numbers")]
    ctx.core.cancel_scheduled(target.queue, numbers)
    return MgmtReply(200, "OK")


def _update_disposition(ctx: EmulatorContext, target: MgmtTarget, body: dict) -> MgmtReply:
    status = body.get("disposition-status")
    tokens = _lock_tokens(body)
    modify = body.get("properties-to-modify") or None
    if isinstance(modify, dict):
        modify = {str(k): v for k, v in modify.items() if isinstance(v, (str, int, float, bool))}
    for token in tokens:
        if status == "completed":
            ctx.core.complete(token)
        elif status == "abandoned":
            ctx.core.abandon(token, modify)
        elif status == "defered":
            ctx.core.defer(token, modify)
        elif status == "suspended":
            ctx.core.dead_letter(
                token,
                reason=body.get("deadletter-reason") or None,
                description=body.get("deadletter-description") or None,
                properties_to_modify=modify,
            )
        else:
            raise BadRequest(f"unknown disposition-status {status!r}")
    return MgmtReply(200, "OK")


def _receive_by_sequence_number(ctx: EmulatorContext, target: MgmtTarget, body: dict) -> MgmtReply:
    numbers = [int(n) for n in _elements(body.get("sequence-numbers"), "sequence-numbers")]
    receive_and_delete = int(body.get("receiver-settle-mode") or 0) == 0
    found = ctx.core.receive_deferred(target.queue, numbers, sub_queue=target.sub_queue)
    if not found:
        return MgmtReply(
            404, "no deferred message with those sequence numbers", condition=MESSAGE_NOT_FOUND
        )
    items: list[dict[str, Any]] = []
    for message in found:
        encoded = _encoded_for_client(message, peek=False)
        token = message.lock_token
        assert token is not None  # receive_deferred locks every message it returns
        if receive_and_delete:
            ctx.core.complete(token)
            items.append({"message": encoded})
        else:
            items.append({"message": encoded, "lock-token": uuid.UUID(token)})
    return MgmtReply(200, "OK", {"messages": items})


_OPERATIONS: dict[str, Callable[[EmulatorContext, MgmtTarget, dict], MgmtReply]] = {
    VENDOR + "renew-lock": _renew_lock,
    VENDOR + "peek-message": _peek,
    VENDOR + "schedule-message": _schedule,
    VENDOR + "cancel-scheduled-message": _cancel_scheduled,
    VENDOR + "update-disposition": _update_disposition,
    VENDOR + "receive-by-sequence-number": _receive_by_sequence_number,
}
