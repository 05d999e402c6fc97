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

import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

from proton import Data, Described, symbol, timestamp, uint, ulong

from . import amqp_scan

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
_BROKER_ANNOTATIONS = {
    SEQUENCE_NUMBER,
    ENQUEUED_TIME,
    LOCKED_UNTIL,
    MESSAGE_STATE,
    symbol("x-opt-lock-token"),
    symbol("x-opt-enqueue-sequence-number"),
}


class MalformedMessage(ValueError):
    """The bytes are not a well-formed AMQP message."""


_UNDECODED = object()


class Section:
    """One described section: its code, its bytes as sent, and its value, which is
    decoded (by proton) only when somebody asks for it."""

    __slots__ = ("code", "raw", "_value", "_value_at", "_fields")

    def __init__(
        self,
        code: int,
        raw: bytes,
        value: Any = _UNDECODED,
        value_at: int = 0,
        fields: list[tuple[int, int]] | None = None,
    ):
        self.code = code
        self.raw = raw
        self._value = value
        self._value_at = value_at  # offset of the value in raw; 0: not scanned
        self._fields = fields  # bounds in raw of a list value's elements (scanned only)

    @property
    def value(self) -> Any:
        if self._value is _UNDECODED:
            self._value = _decode_section(self.raw)[1]
        return self._value

    def is_map(self) -> bool:
        """Whether the section's value is a map, preferably without decoding it."""
        if self._value_at:
            return self.raw[self._value_at] in (0xC1, 0xD1)
        return isinstance(self.value, dict)

    def list_fields(self) -> list[bytes] | None:
        """The encoded elements of a list-valued section (header, properties), or
        None when the scanner cannot tell (the caller then uses :attr:`value`)."""
        if self._fields is None:
            return None
        return [self.raw[a:b] for a, b in self._fields]


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
        if props is None:
            return None
        fields = props.list_fields()
        if fields is not None:
            try:
                return _message_id_text(_scalar(fields[0])) if fields else None
            except amqp_scan.ScanError:
                pass
        if not props.value:
            return None
        return _message_id_text(props.value[0])

    @property
    def time_to_live(self) -> float | None:
        """Header ttl in seconds (the SDK writes milliseconds)."""
        header = self.get(HEADER)
        if header is None:
            return None
        fields = header.list_fields()
        if fields is not None:
            try:
                ttl = _scalar(fields[2]) if len(fields) >= 3 else None
            except amqp_scan.ScanError:
                pass
            else:
                return int(ttl) / 1000.0 if ttl else None
        if len(header.value) < 3 or not header.value[2]:
            return None
        return int(header.value[2]) / 1000.0

    @property
    def annotations(self) -> dict:
        section = self.get(MESSAGE_ANNOTATIONS)
        return dict(section.value) if section is not None and section.value else {}

    @property
    def scheduled_enqueue_time(self) -> float | None:
        if self.get(MESSAGE_ANNOTATIONS) is None:
            return None
        value = self.annotations.get(SCHEDULED_ENQUEUE_TIME)
        if value is None:
            return None
        if hasattr(value, "timestamp"):  # a datetime
            return float(value.timestamp())
        return int(value) / 1000.0

    def data_bodies(self) -> list[bytes]:
        return [bytes(s.value) for s in self.sections if s.code == DATA]


def _message_id_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, memoryview)):
        return bytes(value).hex()
    return str(value)


def _scalar(encoded: bytes) -> Any:
    """Decode the few primitive encodings MessageId and TTL come in, to the types
    proton would give (``str(ulong(5))`` is ``"ulong(5)"``, and MessageId keeps
    that); anything else is a :class:`~.amqp_scan.ScanError` (the caller asks
    proton instead)."""
    code = encoded[0]
    if code == 0x40:
        return None
    if code in (0x43, 0x52, 0x70):  # uint0, smalluint, uint
        return uint(int.from_bytes(encoded[1:], "big"))
    if code in (0x44, 0x53, 0x80):  # ulong0, smallulong, ulong
        return ulong(int.from_bytes(encoded[1:], "big"))
    if code == 0xA1:
        return encoded[2:].decode()
    if code == 0xB1:
        return encoded[5:].decode()
    if code == 0xA3:
        return symbol(encoded[2:].decode("ascii"))
    if code == 0xB3:
        return symbol(encoded[5:].decode("ascii"))
    if code == 0xA0:
        return encoded[2:]
    if code == 0xB0:
        return encoded[5:]
    if code == 0x98:
        return uuid.UUID(bytes=encoded[1:])
    raise amqp_scan.ScanError(f"no fast decoding for 0x{code:02x}")


def parse_message(payload: bytes) -> ParsedMessage:
    """Split an encoded AMQP message into its sections.

    The scanner finds the section boundaries and checks the encoding without
    decoding values (the expensive part); whatever it cannot vouch for goes
    through proton's decoder, section by section, as before."""
    try:
        bounds = amqp_scan.section_bounds(payload)
    except amqp_scan.ScanError:
        return _parse_with_proton(payload)
    except Exception:  # IndexError and the like on garbage: let proton judge it
        return _parse_with_proton(payload)
    if not bounds:
        raise MalformedMessage("empty message")
    parsed = ParsedMessage()
    for code, start, value_at, stop, fields in bounds:
        if not HEADER <= code <= FOOTER:
            raise MalformedMessage(f"unknown message section 0x{code:x}")
        value: Any = _UNDECODED
        if code == DATA:
            body = amqp_scan.binary_value(payload, value_at, stop)
            if body is not None:
                value = body
        if fields is not None:
            fields = [(a - start, b - start) for a, b in fields]
        parsed.sections.append(
            Section(code, bytes(payload[start:stop]), value, value_at - start, fields)
        )
    return parsed


def _parse_with_proton(payload: bytes) -> ParsedMessage:
    """Section splitting by proton's decoder: decodes every section."""
    offset = 0
    parsed = ParsedMessage()
    view = memoryview(payload)
    while offset < len(payload):
        consumed, value, code = _decode_at(bytes(view[offset:]), offset)
        parsed.sections.append(Section(code, bytes(view[offset : offset + consumed]), value))
        offset += consumed
    if not parsed.sections:
        raise MalformedMessage("empty message")
    return parsed


def _decode_section(raw: bytes) -> tuple[int, Any]:
    consumed, value, code = _decode_at(raw, 0)
    return code, value


def _decode_at(data_bytes: bytes, offset: int) -> tuple[int, Any, int]:
    """Decode the described section at the start of ``data_bytes``: (bytes
    consumed, materialised value, section code)."""
    data = Data()
    try:
        consumed = data.decode(data_bytes)
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
    return consumed, _materialize(obj.value), code


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
    if not bodies or any(
        s.code not in (PROPERTIES, MESSAGE_ANNOTATIONS, DATA) for s in parsed.sections
    ):
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


#: Azure's limits on a message's header: 32 KB for one property, 64 KB in all
MAX_PROPERTY_BYTES = 32 * 1024
MAX_HEADER_BYTES = 64 * 1024


class HeaderTooLarge(ValueError):
    """A message's properties exceed Azure's header limits."""


def check_header_size(parsed: ParsedMessage) -> None:
    """Refuse a message whose application properties break Azure's limits: each
    property at most 32 KB, the header (system and application properties) at
    most 64 KB in all."""
    app = parsed.get(APPLICATION_PROPERTIES)
    if app is None:
        return
    props = parsed.get(PROPERTIES)
    total = len(app.raw) + (len(props.raw) if props is not None else 0)
    if total > MAX_HEADER_BYTES:
        raise HeaderTooLarge(
            f"the message header is {total} bytes; at most {MAX_HEADER_BYTES} are allowed"
        )
    if len(app.raw) <= MAX_PROPERTY_BYTES or not isinstance(app.value, dict):
        return
    for key, value in app.value.items():
        size = _encoded_size(key) + _encoded_size(value)
        if size > MAX_PROPERTY_BYTES:
            raise HeaderTooLarge(
                f"property {str(key)[:64]!r} is {size} bytes; at most {MAX_PROPERTY_BYTES} "
                "are allowed per property"
            )


def _encoded_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    return 8


def assign_message_id(stored: bytes, message_id: str) -> bytes:
    """``stored`` with ``message_id`` as its MessageId: Azure gives one to a message
    its sender sent without."""
    parsed = parse_message(stored)
    props = parsed.get(PROPERTIES)
    fields: list[Any] = list(props.value) if props is not None and props.value else []
    fields = fields or [None]
    fields[0] = message_id
    section = _encode_section(PROPERTIES, fields)
    out: list[bytes] = []
    for existing in parsed.sections:
        if existing.code == PROPERTIES:
            continue
        if section and existing.code > PROPERTIES:
            out.append(section)
            section = b""
        out.append(existing.raw)
    out.append(section)
    return b"".join(out)


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
    #: the time to live the broker applied (the header's ttl), seconds
    time_to_live: float | None = None


def render_for_delivery(stored: bytes, info: DeliveryInfo) -> bytes:
    """Rebuild a stored message with the broker's header and annotations."""
    parsed = parse_message(stored)
    out = [
        _header_section(parsed.get(HEADER), info.delivery_count, info.time_to_live),
        _annotations_section(parsed.get(MESSAGE_ANNOTATIONS), info),
    ]

    app_section = parsed.get(APPLICATION_PROPERTIES)
    rewrite_app = (
        bool(info.extra_properties)
        or info.dead_letter_reason is not None
        or info.dead_letter_description is not None
    )
    app_props: dict[str, Any] = {}
    if rewrite_app or (app_section is not None and not app_section.is_map()):
        # (a section that is not a map is decoded anyway: dict() then fails as it
        # always did on such a message)
        if app_section is not None and app_section.value:
            app_props = dict(app_section.value)
        app_props.update(info.extra_properties or {})
        if info.dead_letter_reason is not None:
            app_props[DEAD_LETTER_REASON] = info.dead_letter_reason
        if info.dead_letter_description is not None:
            app_props[DEAD_LETTER_DESCRIPTION] = info.dead_letter_description

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


def _header_section(header: Section | None, delivery_count: int, ttl: float | None) -> bytes:
    """The client's header with the broker's delivery count and applied time to live.
    Cached: a sender's messages share one header, and re-encoding it through proton
    costs more than the rest of a delivery."""
    ttl_ms = None if ttl is None else max(int(round(ttl * 1000)), 0)
    key = (header.raw if header is not None else None, delivery_count, ttl_ms)
    encoded = _HEADER_CACHE.get(key)
    if encoded is None:
        header_fields: list[Any] = list(header.value) if header is not None and header.value else []
        header_fields += [None] * (5 - len(header_fields))
        header_fields[4] = _uint(delivery_count)
        if ttl_ms is not None and ttl_ms < 2**32:
            header_fields[2] = _uint(ttl_ms)
        encoded = _remember(_HEADER_CACHE, key, _encode_section(HEADER, header_fields))
    return encoded


def _annotations_section(section: Section | None, info: DeliveryInfo) -> bytes:
    """The stored message annotations plus the broker's.  The stored part is
    re-encoded once per distinct section (cached); the broker's entries are
    appended in proton's encoding, so the bytes equal encoding the merged map."""
    stored = _stored_annotations(section)
    if stored is None:  # unusual map (e.g. it names a broker annotation): the slow way
        annotations = dict(section.value) if section is not None and section.value else {}
        annotations.update(_broker_annotations(info))
        return _encode_section(MESSAGE_ANNOTATIONS, annotations)
    entries, count = stored
    parts = [entries]
    for key, value in _broker_annotations(info).items():
        parts.append(_SYMBOL_BYTES[key])
        parts.append(
            _long_bytes(value)
            if key != ENQUEUED_TIME and key != LOCKED_UNTIL
            else b"\x83" + _I64.pack(value)
        )
        count += 2
    body = b"".join(parts)
    return _MAP_SECTION_PREFIX + _U32.pack(len(body) + 4) + _U32.pack(count) + body


def _broker_annotations(info: DeliveryInfo) -> dict[symbol, Any]:
    """The annotations the broker adds, in the order it adds them."""
    added: dict[symbol, Any] = {
        SEQUENCE_NUMBER: int(info.sequence_number),
        ENQUEUED_TIME: timestamp(int(info.enqueued_time * 1000)),
    }
    if info.locked_until is not None:
        added[LOCKED_UNTIL] = timestamp(int(info.locked_until * 1000))
    if info.message_state is not None:
        added[MESSAGE_STATE] = int(info.message_state)
    return added


def _stored_annotations(section: Section | None) -> tuple[bytes, int] | None:
    """(encoded entries, element count) of a stored annotations section as proton
    re-encodes it, or None if it cannot simply be extended with the broker's."""
    key = section.raw if section is not None else None
    cached = _ANNOTATIONS_CACHE.get(key, _UNDECODED)
    if cached is not _UNDECODED:
        return cached  # type: ignore[return-value]
    value = section.value if section is not None else None
    result = None
    if not value or isinstance(value, dict):
        annotations = dict(value) if value else {}
        encoded = _encode_section(MESSAGE_ANNOTATIONS, annotations)
        if encoded.startswith(_MAP_SECTION_PREFIX) and not any(
            key in annotations for key in _SYMBOL_BYTES
        ):
            result = encoded[len(_MAP_SECTION_PREFIX) + 8 :], 2 * len(annotations)
    return _remember(_ANNOTATIONS_CACHE, key, result)


def _remember(cache: dict, key: Any, value: Any) -> Any:
    """Store in a small cache, emptied when full (entries are cheap to recompute;
    bounded so a stream of distinct headers cannot grow it without end)."""
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[key] = value
    return value


def _long_bytes(value: int) -> bytes:
    """A signed long as proton encodes it (smalllong when it fits a byte)."""
    if -128 <= value <= 127:
        return b"\x55" + _I8.pack(value)
    return b"\x81" + _I64.pack(value)


_CACHE_SIZE = 512
_HEADER_CACHE: dict[tuple[bytes | None, int, int | None], bytes] = {}
_ANNOTATIONS_CACHE: dict[bytes | None, tuple[bytes, int] | None] = {}
_MAP_SECTION_PREFIX = b"\x00\x53\x72\xd1"
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_I8 = struct.Struct(">b")
_SYMBOL_BYTES = {
    key: b"\xa3" + bytes([len(key)]) + key.encode("ascii")
    for key in (SEQUENCE_NUMBER, ENQUEUED_TIME, LOCKED_UNTIL, MESSAGE_STATE)
}


def _uint(value: int) -> Any:
    return uint(max(0, int(value)))


def _encode_section(code: int, value: Any) -> bytes:
    data = Data()
    data.put_object(Described(ulong(code), value))
    return data.encode()


def lock_token_to_tag(lock_token: str) -> bytes:
    """The delivery tag for a lock token: the SDK reads ``UUID(bytes_le=tag)``."""
    return uuid.UUID(lock_token).bytes_le
