"""Atom XML (de)serialisation of queue descriptions, as the Service Bus management
REST API and ``ServiceBusAdministrationClient`` exchange them.

Element names and namespaces follow the SDK's generated models
(``azure/servicebus/management/_generated/models/_models.py``: QueueDescription,
QueueDescriptionEntry, QueueDescriptionFeed, MessageCountDetails,
ServiceBusManagementError).  Durations are ISO 8601 (``PT1M``); Azure's
"forever" is .NET ``TimeSpan.MaxValue``.
"""

from __future__ import annotations

import datetime
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ai4s_jobq.broker_core import QueueCounts, QueueProperties

ATOM = "http://www.w3.org/2005/Atom"
SB = "http://schemas.microsoft.com/netservices/2010/10/servicebus/connect"
SB_COUNTS = "http://schemas.microsoft.com/netservices/2011/06/servicebus"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
FOREVER = "P10675199DT2H48M5.4775807S"
FOREVER_SECONDS = 10675199 * 86400.0  # anything this long means "no expiry"

ET.register_namespace("", ATOM)
ET.register_namespace("i", XSI)
ET.register_namespace("d2p1", SB_COUNTS)


class AtomError(ValueError):
    """The request body is not a queue description we understand."""


_DURATION = re.compile(
    r"^P(?:(?P<days>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)


def parse_duration(text: str) -> float:
    match = _DURATION.match(text.strip())
    if not match or text.strip() in ("P", "PT"):
        raise AtomError(f"{text!r} is not an ISO 8601 duration")
    parts = {k: float(v) if v else 0.0 for k, v in match.groupdict().items()}
    return parts["days"] * 86400 + parts["hours"] * 3600 + parts["minutes"] * 60 + parts["seconds"]


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds >= FOREVER_SECONDS:
        return FOREVER
    total = round(seconds, 3)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    out = "P"
    if days:
        out += f"{int(days)}D"
    out += "T"
    if hours:
        out += f"{int(hours)}H"
    if minutes:
        out += f"{int(minutes)}M"
    if secs or out.endswith("T"):
        out += f"{secs:g}S"
    return out


def _iso(ts: float) -> str:
    moment = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass
class QueueRequest:
    """The settings a PUT body carries (None: not given, keep the default/current)."""

    lock_duration: float | None = None
    requires_duplicate_detection: bool | None = None
    duplicate_detection_window: float | None = None
    max_delivery_count: int | None = None
    default_message_ttl: float | None = None
    ttl_given: bool = False
    dead_lettering_on_message_expiration: bool | None = None
    max_message_size_kb: int | None = None
    requires_session: bool = False
    enable_partitioning: bool = False
    max_size_in_megabytes: int | None = None
    enable_batched_operations: bool | None = None
    auto_delete_on_idle: float | None = None
    auto_delete_given: bool = False
    user_metadata: str | None = None
    user_metadata_given: bool = False

    def apply(self, base: QueueProperties) -> QueueProperties:
        """``base`` with every setting this request gives."""
        from dataclasses import replace

        changes: dict = {}
        if self.lock_duration is not None:
            changes["lock_duration"] = self.lock_duration
        if self.requires_duplicate_detection is not None:
            changes["requires_duplicate_detection"] = self.requires_duplicate_detection
        if self.duplicate_detection_window is not None:
            changes["duplicate_detection_window"] = self.duplicate_detection_window
        if self.max_delivery_count is not None:
            changes["max_delivery_count"] = self.max_delivery_count
        if self.ttl_given:
            changes["default_message_ttl"] = self.default_message_ttl
        if self.dead_lettering_on_message_expiration is not None:
            changes["dead_lettering_on_message_expiration"] = (
                self.dead_lettering_on_message_expiration
            )
        if self.max_message_size_kb is not None:
            changes["max_message_size"] = self.max_message_size_kb * 1024
        if self.max_size_in_megabytes is not None:
            changes["max_size_in_megabytes"] = self.max_size_in_megabytes
        if self.enable_batched_operations is not None:
            changes["enable_batched_operations"] = self.enable_batched_operations
        if self.auto_delete_given:
            changes["auto_delete_on_idle"] = self.auto_delete_on_idle
        if self.user_metadata_given:
            changes["user_metadata"] = self.user_metadata
        return replace(base, **changes)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false"):
        raise AtomError(f"{text!r} is not a boolean")
    return value == "true"


def _without_namespaces(body: bytes) -> bytes:
    """Drop namespace declarations and prefixes.  The SDK's XML workaround policy
    strips the ``ns1:`` prefix and so sends ``<entry xmlns="...Atom"
    xmlns="...connect">``, a duplicate attribute that a strict parser rejects;
    Azure accepts it, so the emulator matches elements by local name."""
    body = re.sub(rb'\sxmlns(?::[\w.-]+)?\s*=\s*("[^"]*"|\'[^\']*\')', b"", body)
    body = re.sub(rb"<(/?)[\w.-]+:", rb"<\1", body)
    return re.sub(rb"(\s)[\w.-]+:([\w.-]+\s*=)", rb"\1\2", body)


def parse_queue_request(body: bytes) -> QueueRequest:
    try:
        root = ET.fromstring(_without_namespaces(body))
    except ET.ParseError as exc:
        raise AtomError(f"the request body is not well-formed XML: {exc}") from None
    description = root.find("content/QueueDescription")
    if root.tag != "entry" or description is None:
        raise AtomError("the request body has no entry/content/QueueDescription")
    request = QueueRequest()

    def text(name: str) -> str | None:
        element = description.find(name)
        if element is None or element.text is None or not element.text.strip():
            return None
        return element.text

    try:
        if (v := text("LockDuration")) is not None:
            request.lock_duration = parse_duration(v)
        if (v := text("RequiresDuplicateDetection")) is not None:
            request.requires_duplicate_detection = _bool(v)
        if (v := text("DuplicateDetectionHistoryTimeWindow")) is not None:
            request.duplicate_detection_window = parse_duration(v)
        if (v := text("MaxDeliveryCount")) is not None:
            request.max_delivery_count = int(v)
        if (v := text("DefaultMessageTimeToLive")) is not None:
            ttl = parse_duration(v)
            request.default_message_ttl = None if ttl >= FOREVER_SECONDS else ttl
            request.ttl_given = True
        if (v := text("DeadLetteringOnMessageExpiration")) is not None:
            request.dead_lettering_on_message_expiration = _bool(v)
        if (v := text("MaxMessageSizeInKilobytes")) is not None:
            request.max_message_size_kb = int(v)
        if (v := text("RequiresSession")) is not None:
            request.requires_session = _bool(v)
        if (v := text("EnablePartitioning")) is not None:
            request.enable_partitioning = _bool(v)
        if (v := text("MaxSizeInMegabytes")) is not None:
            request.max_size_in_megabytes = int(v)
        if (v := text("EnableBatchedOperations")) is not None:
            request.enable_batched_operations = _bool(v)
        if (v := text("AutoDeleteOnIdle")) is not None:
            idle = parse_duration(v)
            request.auto_delete_on_idle = None if idle >= FOREVER_SECONDS else idle
            request.auto_delete_given = True
        if (element := description.find("UserMetadata")) is not None:
            request.user_metadata = element.text or None
            request.user_metadata_given = True
    except ValueError as exc:
        raise AtomError(str(exc)) from None
    return request


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrib)
    if text is not None:
        element.text = text
    return element


def queue_description(props: QueueProperties, counts: QueueCounts | None) -> ET.Element:
    qd = ET.Element(f"{{{SB}}}QueueDescription")
    s = lambda name, value: _sub(qd, f"{{{SB}}}{name}", value)  # noqa: E731
    s("LockDuration", format_duration(props.lock_duration))
    s("MaxSizeInMegabytes", str(props.max_size_in_megabytes))
    s("RequiresDuplicateDetection", str(props.requires_duplicate_detection).lower())
    s("RequiresSession", "false")
    s("DefaultMessageTimeToLive", format_duration(props.default_message_ttl))
    s("DeadLetteringOnMessageExpiration", str(props.dead_lettering_on_message_expiration).lower())
    s("DuplicateDetectionHistoryTimeWindow", format_duration(props.duplicate_detection_window))
    s("MaxDeliveryCount", str(props.max_delivery_count))
    s("EnableBatchedOperations", str(props.enable_batched_operations).lower())
    s("SizeInBytes", "0")
    s("MessageCount", str(counts.total if counts else 0))
    s("IsAnonymousAccessible", "false")
    s("AuthorizationRules", "")
    s("Status", "Active")
    s("CreatedAt", _iso(props.created_at))
    s("UpdatedAt", _iso(props.updated_at))
    s("AccessedAt", _iso(props.updated_at))
    s("SupportOrdering", "true")
    if props.user_metadata is not None:
        s("UserMetadata", props.user_metadata)
    details = _sub(qd, f"{{{SB}}}CountDetails")
    c = counts or QueueCounts(0, 0, 0, 0)
    for name, value in (
        ("ActiveMessageCount", c.active),
        ("DeadLetterMessageCount", c.dead_letter),
        ("ScheduledMessageCount", c.scheduled),
        ("TransferMessageCount", 0),
        ("TransferDeadLetterMessageCount", 0),
    ):
        _sub(details, f"{{{SB_COUNTS}}}{name}", str(value))
    s("AutoDeleteOnIdle", format_duration(props.auto_delete_on_idle))
    s("EnablePartitioning", "false")
    s("EntityAvailabilityStatus", "Available")
    s("EnableExpress", "false")
    s("MaxMessageSizeInKilobytes", str(props.max_message_size // 1024))
    return qd


def _entry(base_url: str, props: QueueProperties, counts: QueueCounts | None) -> ET.Element:
    entry = ET.Element(f"{{{ATOM}}}entry")
    url = f"{base_url}/{props.name}?api-version=2021-05"
    _sub(entry, f"{{{ATOM}}}id", url)
    _sub(entry, f"{{{ATOM}}}title", props.name, type="text")
    _sub(entry, f"{{{ATOM}}}published", _iso(props.created_at))
    _sub(entry, f"{{{ATOM}}}updated", _iso(props.updated_at))
    author = _sub(entry, f"{{{ATOM}}}author")
    _sub(author, f"{{{ATOM}}}name", base_url.split("//", 1)[-1])
    _sub(entry, f"{{{ATOM}}}link", rel="self", href=url)
    content = _sub(entry, f"{{{ATOM}}}content", type="application/xml")
    content.append(queue_description(props, counts))
    return entry


def entry_xml(base_url: str, props: QueueProperties, counts: QueueCounts | None) -> bytes:
    return ET.tostring(_entry(base_url, props, counts), encoding="utf-8", xml_declaration=True)


def feed_xml(
    base_url: str,
    items: list[tuple[QueueProperties, QueueCounts | None]],
    next_link: str | None,
) -> bytes:
    feed = ET.Element(f"{{{ATOM}}}feed")
    _sub(feed, f"{{{ATOM}}}title", "Queues", type="text")
    _sub(feed, f"{{{ATOM}}}id", f"{base_url}/$Resources/queues")
    _sub(feed, f"{{{ATOM}}}updated", _iso(datetime.datetime.now().timestamp()))
    _sub(feed, f"{{{ATOM}}}link", rel="self", href=f"{base_url}/$Resources/queues")
    if next_link:
        _sub(feed, f"{{{ATOM}}}link", rel="next", href=next_link)
    for props, counts in items:
        feed.append(_entry(base_url, props, counts))
    return ET.tostring(feed, encoding="utf-8", xml_declaration=True)


def error_xml(code: int, detail: str) -> bytes:
    error = ET.Element("Error")
    _sub(error, "Code", str(code))
    _sub(error, "Detail", detail)
    return ET.tostring(error, encoding="utf-8", xml_declaration=True)
