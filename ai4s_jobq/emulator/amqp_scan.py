"""Find AMQP value boundaries without decoding the values.

The emulator mostly moves message sections around as they are; it needs the
*value* of only a few fields (MessageId, the header's TTL).  Decoding a whole
section through proton's Python binding costs tens of microseconds per field,
which made section splitting the largest per-message cost of the emulator.  This
module walks the AMQP 1.0 type encoding by constructor and size instead, checking
structure (known constructors, sizes within bounds, element counts matching
sizes, UTF-8 strings and ASCII symbols) as it goes.

It is deliberately stricter than proton: anything it does not fully understand
(arrays, unusual descriptors, deep nesting) raises :class:`ScanError`, and the
caller falls back to proton's decoder, so what is accepted or rejected as
malformed does not change.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

#: Fixed-width constructors and their payload sizes (AMQP 1.0 part 1, 1.6).
_FIXED = {
    0x40: 0,
    0x41: 0,
    0x42: 0,
    0x43: 0,
    0x44: 0,
    0x45: 0,  # null, true, false, 0s, list0
    0x50: 1,
    0x51: 1,
    0x52: 1,
    0x53: 1,
    0x54: 1,
    0x55: 1,
    0x56: 1,
    0x60: 2,
    0x61: 2,
    0x70: 4,
    0x71: 4,
    0x72: 4,
    0x80: 8,
    0x81: 8,
    0x82: 8,
    0x83: 8,
    0x98: 16,
}  # char and the decimals are left to proton (a char can be out of range)
#: Fixed-width encodings needing no check of the value (boolean 0x56 does).
_PLAIN_FIXED = {code: width for code, width in _FIXED.items() if code != 0x56}
#: What a described value's descriptor may be: a ulong or a symbol.
_DESCRIPTORS = (0x44, 0x53, 0x80, 0xA3, 0xB3)
#: What a map key may be: primitives that proton decodes to hashable values
#: (binary decodes to a memoryview, which cannot be a dict key).
_MAP_KEYS = frozenset(_FIXED) | {0xA1, 0xB1, 0xA3, 0xB3}
_BINARY = (0xA0, 0xB0)
_STRING = (0xA1, 0xB1)
_SYMBOL = (0xA3, 0xB3)
_LIST = (0xC0, 0xD0)
_MAP = (0xC1, 0xD1)
_SMALL_ULONG = 0x53
_ULONG = 0x80
_MAX_DEPTH = 32

_U32 = struct.Struct(">I")


class ScanError(ValueError):
    """The scanner cannot vouch for these bytes; decode them with proton instead."""


def skip_value(buf: bytes, pos: int, depth: int = 0) -> int:
    """The offset just past the encoded value (with its constructor) at ``pos``."""
    if depth > _MAX_DEPTH:
        raise ScanError("nested too deeply")
    end = len(buf)
    if pos >= end:
        raise ScanError("truncated value")
    code = buf[pos]
    if code == 0x00:  # described: descriptor, then the (not itself described) value
        if pos + 1 >= end or buf[pos + 1] not in _DESCRIPTORS:
            raise ScanError("unusual descriptor")
        value_at = skip_value(buf, pos + 1, depth + 1)
        if value_at >= end or buf[value_at] == 0x00:
            raise ScanError("described value is missing or itself described")
        return skip_value(buf, value_at, depth + 1)
    width = _FIXED.get(code)
    if width is not None:
        if pos + 1 + width > end:
            raise ScanError("truncated fixed-width value")
        if code == 0x56 and buf[pos + 1] > 1:
            raise ScanError("boolean out of range")
        return pos + 1 + width
    start, stop = _sized(buf, pos, code & 0xF0 == 0xB0 or code & 0xF0 == 0xD0)
    if code in _BINARY:
        return stop
    if code in _STRING:
        _check_text(buf, start, stop, "utf-8")
        return stop
    if code in _SYMBOL:
        _check_text(buf, start, stop, "ascii")
        return stop
    if code in _LIST or code in _MAP:
        element_offsets(buf, start, stop, code, depth)
        return stop
    raise ScanError(f"constructor 0x{code:02x} not handled by the scanner")


def _sized(buf: bytes, pos: int, wide: bool) -> tuple[int, int]:
    """(start, stop) of a variable-width payload whose size field follows ``pos``."""
    if wide:
        if pos + 5 > len(buf):
            raise ScanError("truncated size")
        start = pos + 5
        stop = start + _U32.unpack_from(buf, pos + 1)[0]
    else:
        if pos + 2 > len(buf):
            raise ScanError("truncated size")
        start = pos + 2
        stop = start + buf[pos + 1]
    if stop > len(buf):
        raise ScanError("value runs past the end")
    return start, stop


def _check_text(buf: bytes, start: int, stop: int, encoding: str) -> None:
    try:
        buf[start:stop].decode(encoding)
    except UnicodeDecodeError:
        raise ScanError("text is not validly encoded") from None


def element_offsets(buf: bytes, start: int, stop: int, code: int, depth: int = 0) -> list[int]:
    """Start offsets of the elements of a list/map payload ``buf[start:stop]``; the
    elements must fill the payload exactly."""
    wide = code in (0xD0, 0xD1)
    count_width = 4 if wide else 1
    if stop - start < count_width:
        raise ScanError("compound too short for its count")
    count = _U32.unpack_from(buf, start)[0] if wide else buf[start]
    if code in _MAP and count % 2:
        raise ScanError("map with an odd number of elements")
    is_map = code in _MAP
    offsets = []
    pos = start + count_width
    fixed = _PLAIN_FIXED
    for index in range(count):
        if pos >= stop:
            raise ScanError("element runs past its compound")
        if is_map and not index % 2 and buf[pos] not in _MAP_KEYS:
            raise ScanError("map key proton would not decode to a hashable value")
        offsets.append(pos)
        width = fixed.get(buf[pos])  # inline fast path: most fields are null or fixed
        pos = pos + 1 + width if width is not None else skip_value(buf, pos, depth + 1)
        if pos > stop:
            raise ScanError("element runs past its compound")
    if pos != stop:
        raise ScanError("compound size does not match its elements")
    return offsets


class SectionBounds(NamedTuple):
    code: int  # the section's descriptor (0x70 header ... 0x78 footer)
    start: int  # where the section (its descriptor) starts
    value_at: int  # where its value starts
    stop: int  # just past its end
    #: for a list-valued section (header, properties): (start, end) of each field
    fields: list[tuple[int, int]] | None


def section_bounds(buf: bytes) -> list[SectionBounds]:
    """Split an encoded message into described sections.  Only the plain ulong
    descriptor forms are handled; anything else is a :class:`ScanError`."""
    sections = []
    pos = 0
    end = len(buf)
    while pos < end:
        if buf[pos] != 0x00 or pos + 2 > end:
            raise ScanError("not a described section")
        kind = buf[pos + 1]
        if kind == _SMALL_ULONG and pos + 3 <= end:
            code, value_at = buf[pos + 2], pos + 3
        elif kind == _ULONG and pos + 10 <= end:
            code, value_at = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
        else:
            raise ScanError("unusual section descriptor")
        if value_at >= end or buf[value_at] == 0x00:
            raise ScanError("section value missing or itself described")
        stop, fields = _section_value(buf, value_at)
        sections.append(SectionBounds(code, pos, value_at, stop, fields))
        pos = stop
    return sections


def _section_value(buf: bytes, value_at: int) -> tuple[int, list[tuple[int, int]] | None]:
    """End of a section's value and, for a list, its fields' bounds (kept so that
    reading MessageId or the TTL does not walk the list a second time)."""
    code = buf[value_at]
    if code == 0x45:
        return value_at + 1, []
    if code not in _LIST:
        return skip_value(buf, value_at), None
    start, stop = _sized(buf, value_at, code == 0xD0)
    offsets = element_offsets(buf, start, stop, code)
    return stop, list(zip(offsets, offsets[1:] + [stop]))


def binary_value(buf: bytes, value_at: int, stop: int) -> bytes | None:
    """The bytes of a binary value at ``value_at``, or None if it is not binary."""
    code = buf[value_at]
    if code == 0xA0:
        return bytes(buf[value_at + 2 : stop])
    if code == 0xB0:
        return bytes(buf[value_at + 5 : stop])
    return None
