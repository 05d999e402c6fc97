"""Which node an AMQP link addresses, decided once at attach time.

Service Bus clients attach to ``$cbs`` (claims-based auth), to
``QUEUE/$management`` (request/response operations), or to the queue itself or
its dead-letter sub-queue ``QUEUE/$DeadLetterQueue``; the address may carry the
scheme and host (``amqps://host:port/QUEUE``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ai4s_jobq.broker_core import ACTIVE, DEAD_LETTER

CBS_NODE = "$cbs"
MANAGEMENT_SUFFIX = "/$management"
DEAD_LETTER_SUFFIX = "/$deadletterqueue"


@dataclass
class LinkRole:
    """What a link is for, decided at attach time from its address."""

    kind: str  # "cbs", "mgmt", "queue"
    node: str  # normalised address (no scheme/host)
    queue: str = ""
    sub_queue: str = ACTIVE
    receive_and_delete: bool = False


def normalise_address(address: str | None) -> str:
    """``amqps://host:port/queue/$management`` -> ``queue/$management``."""
    address = address or ""
    if "://" in address:
        address = address.split("://", 1)[1]
        address = address.split("/", 1)[1] if "/" in address else ""
    return address.strip("/")


def classify(address: str | None) -> LinkRole:
    node = normalise_address(address)
    if node.lower() == CBS_NODE:
        return LinkRole("cbs", node)
    lowered = node.lower()
    if lowered.endswith(MANAGEMENT_SUFFIX):
        entity = node[: -len(MANAGEMENT_SUFFIX)]
        queue, sub = _split_sub_queue(entity)
        return LinkRole("mgmt", node, queue, sub)
    queue, sub = _split_sub_queue(node)
    return LinkRole("queue", node, queue, sub)


def _split_sub_queue(entity: str) -> tuple[str, str]:
    if entity.lower().endswith(DEAD_LETTER_SUFFIX):
        return entity[: -len(DEAD_LETTER_SUFFIX)], DEAD_LETTER
    return entity, ACTIVE
