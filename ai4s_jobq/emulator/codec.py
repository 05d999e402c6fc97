"""AMQP 1.0 message (de)composition for the emulator.

The emulator stores each message exactly as the client encoded it (minus the
delivery annotations, which are hop-by-hop) and rebuilds only the sections the
broker owns when it delivers it: the header (delivery count), the message
annotations (sequence number, enqueued time, locked-until, ...) and, for
dead-lettered messages, the application properties carrying the reason.  Every
other section (properties, body, footer) goes back to the client byte for byte,
so MessageId, content type, correlation id, subject, application properties and
the body round-trip without the emulator having to understand them.

proton's ``Data`` codec does the AMQP type encoding; this module only splits and
joins sections.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from proton import Data, Described, symbol, timestamp, ulong

HEADER = 0x70
DELIVERY_ANNOTATIONS = 0x71
MESSAGE_ANNOTATIONS = 0x72
PROPERTIES = 0x73
APPLICATION_PROPERTIES = 0x74
DATA = 0x75
AMQP_SEQUENCE = 0x76
AMQP_VALUE = 0x77
FOOTER = 0x78

SCHEDULED_ENQUEUE_TIME = symbol("x-opt-scheduled-enqueue-time")
SEQUENCE_NUMBER = symbol("x-opt-sequence-number")
ENQUEUED_TIME = symbol("x-opt-enqueued-time")
LOCKED_UNTIL = symbol("x-opt-locked-until")
MESSAGE_STATE = symbol("x-opt-message-state")
DEAD_LETTER_REASON = "DeadLetterReason"
DEAD_LETTER_DESCRIPTION = "DeadLetterErrorDescription"

#: Annotations only the broker may set; a client-supplied value is dropped on send.
_BROKER_ANNOTATIONS = {SEQUENCE_NUMBER, ENQUEUED_TIME, LOCKED_UNTIL, MESSAGE_STATE,
                       symbol("x-opt-lock-token"), symbol("x-opt-enqueue-sequence-number")}


class MalformedMessage(ValueError):
    """The bytes are not a well-formed AMQP message."""


@dataclass
class Section:
    code: int
    raw: bytes
    value: Any = None  # decoded value of the described section


@dataclass
class ParsedMessage:
    """A message split into sections, with the fields the broker needs pulled out."""

    sections: list[Section] = field(default_factory=list)

    def get(self, code: int) -> Section | None:
        for section in self.sections:
            if section.code == code:
                return section
        return None

    @property
    def message_id(self) -> str | None:
        props = self.get(PROPERTIES)
        if props is None or not props.value:
            return None
        value = props.value[0]
        if value is None:
            return None
        if isinstance(value, (bytes, memoryview)):
            return bytes(value).hex()
        return str(value)

    @property
    def time_to_live(self) -> float | None:
        """Header ttl in seconds (the SDK writes milliseconds)."""
        header = self.get(HEADER)
        if header is None or len(header.value) < 3 or not header.value[2]:
            return None
        return int(header.value[2]) / 1000.0

    @property
    def annotations(self) -> dict:
        section = self.get(MESSAGE_ANNOTATIONS)
        return dict(section.value) if section is not None and section.value else {}

    @property
    def scheduled_enqueue_time(self) -> float | None:
        value = self.annotations.get(SCHEDULED_ENQUEUE_TIME)
        if value is None:
            return None
        if hasattr(value, "timestamp"):  # a datetime
            return float(value.timestamp())
        return int(value) / 1000.0

    def data_bodies(self) -> list[bytes]:
        return [bytes(s.value) for s in self.sections if s.code == DATA]


def parse_message(payload: bytes) -> ParsedMessage:
    """Split an encoded AMQP message into its sections."""
    data = Data()
    offset = 0
    parsed = ParsedMessage()
    view = memoryview(payload)
    while offset < len(payload):
        data.clear()
        try:
            consumed = data.decode(bytes(view[offset:]))
        except Exception as exc:  # proton raises DataException on garbage
            raise MalformedMessage(f"undecodable AMQP section at byte {offset}") from exc
        if consumed <= 0:
            raise MalformedMessage(f"empty AMQP section at byte {offset}")
        data.rewind()
        data.next()
        obj = data.get_object()
        if not isinstance(obj, Described) or not isinstance(obj.descriptor, int):
            raise MalformedMessage(f"byte {offset} does not start a described message section")
        code = int(obj.descriptor)
        if not HEADER <= code <= FOOTER:
            raise MalformedMessage(f"unknown message section 0x{code:x}")
        value = _materialize(obj.value)
        parsed.sections.append(Section(code, bytes(view[offset : offset + consumed]), value))
        offset += consumed
    if not parsed.sections:
        raise MalformedMessage("empty message")
    return parsed


def _materialize(value: Any) -> Any:
    """Copy binary values out of proton's buffer: ``Data.get_binary`` returns a
    memoryview that dies with the next ``clear()``."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, list):
        return [_materialize(v) for v in value]
    if isinstance(value, dict):
        return type(value)((k, _materialize(v)) for k, v in value.items())
    return value


def split_batch(parsed: ParsedMessage) -> list[ParsedMessage] | None:
    """If ``parsed`` is a Service Bus batch envelope, return the messages inside it.

    The SDK sends a batch as one transfer with message format 0x80013700 whose body
    is one data section per encoded message.  proton does not expose the message
    format of an incoming transfer, so the envelope is recognised by shape: no
    header, no application properties, and every data section decodes as a
    complete AMQP message.  An ordinary message whose body happens to be exactly
    an encoded AMQP message with no header would be misread; the SDK never
    produces one (every ServiceBusMessage it sends carries a header or a plain
    body)."""
    if parsed.get(HEADER) is not None or parsed.get(APPLICATION_PROPERTIES) is not None:
        return None
    bodies = parsed.data_bodies()
    if not bodies or any(s.code not in (PROPERTIES, MESSAGE_ANNOTATIONS, DATA)
                         for s in parsed.sections):
        return None
    inner: list[ParsedMessage] = []
    for body in bodies:
        if len(body) < 3 or body[0] != 0x00:
            return None
        try:
            inner.append(parse_message(body))
        except MalformedMessage:
            return None
    return inner


def strip_for_storage(parsed: ParsedMessage) -> bytes:
    """The bytes the broker stores: delivery annotations and broker-owned
    annotations removed, everything else as the client sent it."""
    parts: list[bytes] = []
    for section in parsed.sections:
        if section.code == DELIVERY_ANNOTATIONS:
            continue
        if section.code == MESSAGE_ANNOTATIONS and section.value:
            kept = {k: v for k, v in section.value.items() if k not in _BROKER_ANNOTATIONS}
            if kept != section.value:
                if kept:
                    parts.append(_encode_section(MESSAGE_ANNOTATIONS, kept))
                continue
        parts.append(section.raw)
    return b"".join(parts)


@dataclass
class DeliveryInfo:
    """What the broker adds to a stored message when it hands it to a client."""

    sequence_number: int
    enqueued_time: float
    delivery_count: int  # the value for the AMQP header field
    locked_until: float | None = None
    message_state: int | None = None  # peeked messages: 0 active, 1 deferred, 2 scheduled
    dead_letter_reason: str | None = None
    dead_letter_description: str | None = None
    #: application properties changed by abandon/defer/dead-letter "properties to modify"
    extra_properties: dict[str, Any] | None = None


def render_for_delivery(stored: bytes, info: DeliveryInfo) -> bytes:
    """Rebuild a stored message with the broker's header and annotations."""
    parsed = parse_message(stored)
    header = parsed.get(HEADER)
    header_fields: list[Any] = list(header.value) if header is not None and header.value else []
    header_fields += [None] * (5 - len(header_fields))
    header_fields[4] = _uint(info.delivery_count)

    annotations = parsed.annotations
    annotations[SEQUENCE_NUMBER] = int(info.sequence_number)
    annotations[ENQUEUED_TIME] = timestamp(int(info.enqueued_time * 1000))
    if info.locked_until is not None:
        annotations[LOCKED_UNTIL] = timestamp(int(info.locked_until * 1000))
    if info.message_state is not None:
        annotations[MESSAGE_STATE] = int(info.message_state)

    app_section = parsed.get(APPLICATION_PROPERTIES)
    app_props = dict(app_section.value) if app_section is not None and app_section.value else {}
    rewrite_app = False
    if info.extra_properties:
        app_props.update(info.extra_properties)
        rewrite_app = True
    if info.dead_letter_reason is not None:
        app_props[DEAD_LETTER_REASON] = info.dead_letter_reason
        rewrite_app = True
    if info.dead_letter_description is not None:
        app_props[DEAD_LETTER_DESCRIPTION] = info.dead_letter_description
        rewrite_app = True

    out = [_encode_section(HEADER, header_fields),
           _encode_section(MESSAGE_ANNOTATIONS, annotations)]
    for section in parsed.sections:
        if section.code in (HEADER, DELIVERY_ANNOTATIONS, MESSAGE_ANNOTATIONS):
            continue
        if section.code == APPLICATION_PROPERTIES and rewrite_app:
            continue
        if section.code > APPLICATION_PROPERTIES and rewrite_app:
            out.append(_encode_section(APPLICATION_PROPERTIES, app_props))
            rewrite_app = False
        out.append(section.raw)
    if rewrite_app:
        out.append(_encode_section(APPLICATION_PROPERTIES, app_props))
    return b"".join(out)


def _uint(value: int) -> Any:
    from proton import uint

    return uint(max(0, int(value)))


def _encode_section(code: int, value: Any) -> bytes:
    data = Data()
    data.put_object(Described(ulong(code), value))
    return data.encode()


def lock_token_to_tag(lock_token: str) -> bytes:
    """The delivery tag for a lock token: the SDK reads ``UUID(bytes_le=tag)``."""
    return uuid.UUID(lock_token).bytes_le

