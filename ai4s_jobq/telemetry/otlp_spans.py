"""OTLP/HTTP span export with a hand-written protobuf encoder.

Why this exists: OpenTelemetry's own OTLP exporter turns each span into protobuf
objects attribute by attribute and hashes the span's ``Resource`` (a JSON dump of
all its attributes) once per span.  For a worker's task span (a dozen attributes)
that cost 113 us per span on the development VM (``encode_spans`` of 512 spans,
opentelemetry-exporter-otlp-proto-common 1.45) -- as much as a whole no-op task, and
on the worker's process, so it halved the drain rate of short tasks with telemetry
on.  :func:`encode_spans` writes the same ``ExportTraceServiceRequest`` straight to
protobuf wire format: the resource and instrumentation scope are encoded once per
batch (grouped by identity, not by hashing), and a key/value pair that repeats
(``messaging.system``, the queue name, the worker ID ...) is encoded once and
reused.  A worker's task spans (:class:`~.task_span.TaskSpan`) take a shorter way
still: their fields are read directly, what every span of a worker shares (name,
kind, the worker's attributes) is one cached block, and the unique task and message
IDs need only their bytes: 25,300 CPU instructions per span (callgrind, 2,048 unique
spans; 31,100 before the IDs and times were packed by ``struct`` and the ID
attributes' headers cached).  Measured: see
``bench/bench_telemetry.py`` and docs/monitoring.md.

It is hand-written for speed, so it is tested for equality: the test suite encodes
spans of every shape (attributes of each type, nested arrays and maps, events,
links, status, remote and local parents, several resources and scopes) with both
this module and the SDK's encoder, parses both with ``opentelemetry-proto`` and
compares the messages.

:class:`SpanExporter` is the SDK's ``OTLPSpanExporter`` (same ``OTEL_EXPORTER_OTLP_*``
settings: endpoint, headers, timeout, compression, certificates; same HTTP client and
retries) with only the encoding replaced.  It reaches the SDK's HTTP client through a
private attribute; when an SDK version lacks it, or our encoder fails on a span, it
falls back to the SDK's own ``export`` -- slower, never wrong.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanKind
from opentelemetry.trace.span import DEFAULT_TRACE_STATE as _NO_TRACE_STATE

from .task_span import _UNSET, ENCODED_GROUPS, TaskSpan

log = logging.getLogger("ai4s_jobq.telemetry")

_pack_double = struct.Struct("<d").pack
_pack_fixed64 = struct.Struct("<Q").pack
_pack_fixed32 = struct.Struct("<I").pack
# A task span's head: trace_id and span_id fields (tags 0x0a, 0x12; IDs big-endian),
# its start and end times (tags 0x39, 0x41; fixed64, little-endian), a parent's ID.
_IDS = struct.Struct(">HQQHQ")
_TIMES = struct.Struct("<BQBQ")
_PARENT = struct.Struct(">HQ")
_LOW64 = 2**64 - 1

# OTLP's SpanKind numbers (0 is "unspecified").
_KIND = {
    SpanKind.INTERNAL: 1,
    SpanKind.SERVER: 2,
    SpanKind.CLIENT: 3,
    SpanKind.PRODUCER: 4,
    SpanKind.CONSUMER: 5,
}
# Span.flags bits: "the context says whether the parent is remote", "it is".
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_SMALL = [bytes((n,)) for n in range(128)]
_KV_CACHE_LIMIT = 4096
_FIXED_CACHE_LIMIT = 64  # an entry per worker (hook) in the process


def _varint(value: int) -> bytes:
    if value < 128:
        return _SMALL[value]
    out = bytearray()
    while value > 127:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return tag + _varint(len(payload)) + payload


def _text(value: str) -> bytes:
    return value.encode("utf-8", "replace")


def _any_value(value: Any) -> bytes:
    """An ``AnyValue`` message (its fields form a oneof: a zero value is still written)."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", _text(value))
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"{value} does not fit an int64")
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _pack_double(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(v)) for v in value))
    if isinstance(value, Mapping):
        return _field(
            b"\x32", b"".join(_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items())
        )
    raise TypeError(f"invalid attribute type {type(value).__name__}")


def _key_value(key: str, value: Any) -> bytes:
    return _field(b"\x0a", _text(key)) + _field(b"\x12", _any_value(value))


def _status(status: Any) -> bytes:
    body = b""
    if status.description:
        body = _field(b"\x12", _text(status.description))
    if status.status_code.value:
        body += b"\x18" + _varint(status.status_code.value)
    return _field(b"\x7a", body)


def _flags(parent: Any) -> bytes:
    flags = _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)
    return b"\x85\x01" + _pack_fixed32(flags)


_UNSET_STATUS = _status(_UNSET)
_FLAGS = b"\x85\x01" + _pack_fixed32(_HAS_IS_REMOTE)
_REMOTE_PARENT_FLAGS = b"\x85\x01" + _pack_fixed32(_HAS_IS_REMOTE | _IS_REMOTE)


class _Encoder:
    """One batch's encoder, over the process's caches: repeated key/value pairs,
    the unchanging part of each worker's task spans, the headers of ID attributes."""

    def __init__(self) -> None:
        self.cache = _shared_cache
        self.fixed = _unchanging
        self.text_headers = _text_headers

    def text_header(self, key: str, size: int) -> bytes:
        """What precedes a text value of ``size`` bytes in an attribute of a span
        (``_field(b"\\x4a", _key_value(key, value))`` less the value's bytes): the
        same for every task ID of one length, so it is made once."""
        if len(self.text_headers) >= _KV_CACHE_LIMIT:
            self.text_headers.clear()
        key_field = _field(b"\x0a", _text(key))
        any_value = b"\x0a" + _varint(size)  # AnyValue.string_value, its length
        pair = key_field + b"\x12" + _varint(len(any_value) + size) + any_value
        header = b"\x4a" + _varint(len(pair) + size) + pair
        self.text_headers[(key, size)] = header
        return header

    def attributes(self, tag: bytes, attributes: Mapping[str, Any] | None) -> list[bytes]:
        """Encoded attributes; a pair seen before comes from the cache."""
        if not attributes:
            return []
        cache = self.cache
        out = []
        for key, value in attributes.items():
            kind = type(value)
            if kind is str or kind is int or kind is bool or kind is float:
                cache_key = (key, kind, value)
                encoded = cache.get(cache_key)
                if encoded is None:
                    try:
                        encoded = _field(tag, _key_value(key, value))
                    except (TypeError, ValueError) as exc:
                        log.warning("telemetry: not exporting attribute %s: %s", key, exc)
                        continue
                    if len(cache) >= _KV_CACHE_LIMIT:
                        cache.clear()
                    cache[cache_key] = encoded
                out.append(encoded)
                continue
            try:
                out.append(_field(tag, _key_value(key, value)))
            except (TypeError, ValueError) as exc:
                log.warning("telemetry: not exporting attribute %s: %s", key, exc)
        return out

    def span(self, span: Any) -> bytes:
        context = span.context
        parts = [
            b"\x0a\x10" + context.trace_id.to_bytes(16, "big"),
            b"\x12\x08" + context.span_id.to_bytes(8, "big"),
        ]
        trace_state = context.trace_state
        if trace_state:
            header = ",".join(f"{k}={v}" for k, v in trace_state.items())
            parts.append(_field(b"\x1a", _text(header)))
        parent = span.parent
        if parent is not None:
            parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
        parts.append(_field(b"\x2a", _text(span.name)))
        parts.append(b"\x30" + _SMALL[_KIND[span.kind]])
        if span.start_time:
            parts.append(b"\x39" + _pack_fixed64(span.start_time))
        if span.end_time:
            parts.append(b"\x41" + _pack_fixed64(span.end_time))
        parts += self.attributes(b"\x4a", span.attributes)
        if span.dropped_attributes:
            parts.append(b"\x50" + _varint(span.dropped_attributes))
        for event in span.events:
            parts.append(_field(b"\x5a", self.event(event)))
        if span.dropped_events:
            parts.append(b"\x60" + _varint(span.dropped_events))
        for link in span.links:
            parts.append(_field(b"\x6a", self.link(link)))
        if span.dropped_links:
            parts.append(b"\x70" + _varint(span.dropped_links))
        status = span.status
        if status is not None:
            parts.append(_status(status))
        parts.append(_flags(parent))
        return b"".join(parts)

    def task_span(self, span: TaskSpan) -> bytes:
        """The ``spans`` field (tag and length included) that ``_field(b"\\x12",
        self.span(span))`` writes for a :class:`~.task_span.TaskSpan`, read from its
        fields (the class is ours) rather than through ``ReadableSpan``'s dozen
        properties, its unchanging part (name, kind, the worker's fixed attributes)
        encoded once per worker: the worker makes one per task, so this is the
        common case.  Fields are written in another order than :meth:`span` writes
        them, which protobuf allows (the attributes keep theirs)."""
        attributes = span._attributes
        if span._events or span._links or type(attributes) is not dict or not span._end_time:
            return _field(b"\x12", self.span(span))  # a task's code added to it
        # A SpanContext is a tuple: (trace_id, span_id, is_remote, flags, state, valid);
        # indexing it skips a Python-level property per field.
        context: Any = span._context
        parent: Any = span._parent
        trace_id = context[0]
        parts = [
            _IDS.pack(0x0A10, trace_id >> 64, trace_id & _LOW64, 0x1208, context[1]),
            self.unchanging(span),
            _TIMES.pack(0x39, span._start_time, 0x41, span._end_time),
        ]
        trace_state = context[4]
        if trace_state is not _NO_TRACE_STATE and trace_state:
            state_text = ",".join(f"{k}={v}" for k, v in trace_state.items())
            parts.append(_field(b"\x1a", _text(state_text)))
        if parent is not None:
            parts.append(_PARENT.pack(0x2208, parent[1]))
        cache, headers = self.cache, self.text_headers
        for key, value in attributes.items():
            kind = type(value)
            if kind is str and len(value) > 16:  # an ID: unique to the span, not cached
                text = value.encode("utf-8", "replace")
                header = headers.get((key, len(text)))
                if header is None:
                    header = self.text_header(key, len(text))
                parts.append(header)
                parts.append(text)
                continue
            encoded = cache.get((key, kind, value))
            if encoded is None:
                parts += self.attributes(b"\x4a", {key: value})
            else:
                parts.append(encoded)
        status = span._status
        parts.append(_UNSET_STATUS if status is _UNSET else _status(status))
        parts.append(_REMOTE_PARENT_FLAGS if parent is not None and parent[2] else _FLAGS)
        body = b"".join(parts)
        size = len(body)
        if 127 < size < 16384:  # a two-byte length, as a task span's mostly is
            return bytes((0x12, (size & 0x7F) | 0x80, size >> 7)) + body
        return _field(b"\x12", body)

    def unchanging(self, span: TaskSpan) -> bytes:
        """Name, kind and fixed attributes of a worker's task spans, encoded once."""
        fixed = span._fixed
        key = (id(fixed), span._name, id(span._kind))
        entry = self.fixed.get(key)
        if entry is None or entry[0] is not fixed or entry[1] is not span._kind:
            if len(self.fixed) >= _FIXED_CACHE_LIMIT:
                self.fixed.clear()
            encoded = _field(b"\x2a", _text(span._name)) + b"\x30" + _SMALL[_KIND[span._kind]]
            if fixed:
                encoded += b"".join(self.attributes(b"\x4a", fixed))
            entry = self.fixed[key] = (fixed, span._kind, encoded)
        return entry[2]

    def event(self, event: Any) -> bytes:
        parts = [b"\x09" + _pack_fixed64(event.timestamp), _field(b"\x12", _text(event.name))]
        parts += self.attributes(b"\x1a", event.attributes)
        if event.dropped_attributes:
            parts.append(b"\x20" + _varint(event.dropped_attributes))
        return b"".join(parts)

    def link(self, link: Any) -> bytes:
        context = link.context
        parts = [
            b"\x0a\x10" + context.trace_id.to_bytes(16, "big"),
            b"\x12\x08" + context.span_id.to_bytes(8, "big"),
        ]
        parts += self.attributes(b"\x22", link.attributes)
        if link.dropped_attributes:
            parts.append(b"\x28" + _varint(link.dropped_attributes))
        flags = _HAS_IS_REMOTE | (_IS_REMOTE if context.is_remote else 0)
        parts.append(b"\x35" + _pack_fixed32(flags))
        return b"".join(parts)

    def scope(self, scope: Any) -> bytes:
        if scope is None:
            return b""
        parts = []
        if scope.name:
            parts.append(_field(b"\x0a", _text(scope.name)))
        if scope.version:
            parts.append(_field(b"\x12", _text(scope.version)))
        parts += self.attributes(b"\x1a", getattr(scope, "attributes", None))
        return b"".join(parts)


_shared_cache: dict[tuple[str, type, Any], bytes] = {}
# (id of fixed attributes, name, id of kind) -> (fixed, kind, their encoding)
_unchanging: dict[tuple[int, str, int], tuple[Any, SpanKind, bytes]] = {}
_text_headers: dict[tuple[str, int], bytes] = {}  # see _Encoder.text_header


def encode_spans(spans: Sequence[Any]) -> bytes:
    """The serialized ``ExportTraceServiceRequest`` for ``spans`` (SDK ``ReadableSpan``)."""
    encoder = _Encoder()
    # resource -> scope -> encoded spans, grouped by identity: the spans of one
    # tracer share its resource and scope objects.
    groups: dict[int, tuple[Any, dict[int, tuple[Any, list[bytes]]]]] = {}
    last_key: Any = None
    last: list[bytes] = []
    for span in spans:
        key: Any
        if type(span) is tuple:  # a task span encoded when it ended (see .task_span)
            group, encoded = span
            key = ENCODED_GROUPS[group]
            if key is not last_key:
                resource, scope = key.provider.resource, key.scope
        elif type(span) is TaskSpan:
            encoded = encoder.task_span(span)
            key = span._spans  # all its spans share one resource and one scope
            if key is not last_key:
                resource, scope = span._resource, span._instrumentation_scope
        else:
            encoded = _field(b"\x12", encoder.span(span))
            resource, scope = span.resource, span.instrumentation_scope
            key = (id(resource), id(scope))
        if key is not last_key and key != last_key:  # look up only on a change
            by_scope = groups.get(id(resource))
            if by_scope is None:
                by_scope = groups[id(resource)] = (resource, {})
            entry = by_scope[1].get(id(scope))
            if entry is None:
                entry = by_scope[1][id(scope)] = (scope, [])
            last_key, last = key, entry[1]
        last.append(encoded)
    out = []
    for resource, scopes in groups.values():
        resource_attributes = encoder.attributes(b"\x0a", resource.attributes)
        resource_spans = [_field(b"\x0a", b"".join(resource_attributes))]
        for scope, encoded_spans in scopes.values():
            scope_spans = [_field(b"\x0a", encoder.scope(scope)), *encoded_spans]
            if scope is not None and scope.schema_url:
                scope_spans.append(_field(b"\x1a", _text(scope.schema_url)))
            resource_spans.append(_field(b"\x12", b"".join(scope_spans)))
        if resource.schema_url:
            resource_spans.append(_field(b"\x1a", _text(resource.schema_url)))
        out.append(_field(b"\x0a", b"".join(resource_spans)))
    return b"".join(out)


class SpanExporter(OTLPSpanExporter):
    """``OTLPSpanExporter`` with :func:`encode_spans` (see the module docstring).  It
    also takes task spans already encoded (``encode_task_span``: see
    :mod:`.task_span`), which only it can send."""

    #: The ``spans`` field of one task span, for :class:`~.task_span.TaskSpan` to
    #: encode itself with when it ends.
    encode_task_span = staticmethod(_Encoder().task_span)

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        client = getattr(self, "_client", None)
        if getattr(self, "_shutdown", True) or not callable(getattr(client, "export", None)):
            return self._sdk_export(spans)
        try:
            data = encode_spans(spans)
        except Exception as exc:  # noqa: BLE001 -- the SDK's encoder may do better
            log.debug("telemetry: fast span encoding failed (%s); using the SDK's", exc)
            return self._sdk_export(spans)
        limit = getattr(self, "_max_request_size", 0)
        if limit and len(data) > limit:
            return self._sdk_export(spans)  # the SDK says why it drops the batch
        result = client.export(data)  # type: ignore[union-attr]
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE

    def _sdk_export(self, spans: Sequence[Any]) -> SpanExportResult:
        """The SDK's own export, for span objects.  Encoded ones, which it cannot
        read, are dropped with a warning: they reach here only when this exporter is
        shut down or has no HTTP client, or the batch is over the request size limit
        (which the SDK drops too)."""
        objects = [s for s in spans if type(s) is not tuple]
        if len(objects) < len(spans):
            log.warning("telemetry: %d encoded span(s) not exported", len(spans) - len(objects))
        return super().export(objects) if objects else SpanExportResult.FAILURE
