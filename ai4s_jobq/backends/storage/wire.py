"""Storage Queue wire details: the message frame, dead-letter records, the queue
metadata jobq keeps its settings in, and error text.

Message text (what the portal shows) is one JSON object, framed so the body
comes back byte for byte without re-serializing it::

    {"jobq":{"id":"<task id>"},"body":<the task envelope JSON as is>}

Bodies that are not JSON, or hold characters XML cannot carry (or ``\\r``, which
XML parsers normalise), travel as a JSON string (``"enc":"text"``); bytes that
are not UTF-8 as base64 (``"enc":"base64"``).  Text that does not parse as this
frame (put there by another tool) is still delivered, raw, so the worker can
dead-letter it.  Dead-letter records in ``QUEUE-failed`` use the same frame with
``reason``, ``description``, ``delivery_count`` and ``dead_lettered_at`` in the
header.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

from ..base import (
    BackendError,
    ConnectionFailedError,
    CredentialsRefusedError,
    QueueSettings,
    QueueUnavailableError,
    ReceivedMessage,
)
from .dedup import LedgerError
from .rest import RestError, auth_reason

log = logging.getLogger("ai4s_jobq.storage")

MESSAGE_TEXT_LIMIT = 64 * 1024  # bytes of message text (UTF-8), Azure's limit
_DESCRIPTION_LIMIT = 4096
_XML_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\r\x0e-\x1f\ufffe\uffff]")
_FRAME_PREFIX = '{"jobq":'
_BODY_KEY = ',"body":'
_DECODER = json.JSONDecoder()

META_DEDUP_WINDOW = "jobq_dedup_window_seconds"
META_VISIBILITY = "jobq_visibility_timeout_seconds"
META_MAX_DELIVERY = "jobq_max_delivery_count"
DEFAULT_VISIBILITY = 300  # seconds, for queues created by other tools
DEFAULT_MAX_DELIVERY = 2000


@dataclass
class QueueConfig:
    """What jobq keeps in the queue's metadata, so every producer and worker agree."""

    exists: bool
    dedup_window: timedelta | None  # None: no dedup
    visibility_timeout: int
    max_delivery_count: int
    jobq_metadata: bool

    @classmethod
    def missing(cls) -> QueueConfig:
        return cls(False, None, DEFAULT_VISIBILITY, DEFAULT_MAX_DELIVERY, False)

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> QueueConfig:
        seconds = _int(meta.get(META_DEDUP_WINDOW), 0)
        return cls(
            exists=True,
            dedup_window=timedelta(seconds=seconds) if seconds > 0 else None,
            visibility_timeout=max(1, _int(meta.get(META_VISIBILITY), DEFAULT_VISIBILITY)),
            max_delivery_count=max(1, _int(meta.get(META_MAX_DELIVERY), DEFAULT_MAX_DELIVERY)),
            jobq_metadata=cls.has_jobq_metadata(meta),
        )

    @staticmethod
    def metadata_for(settings: QueueSettings) -> dict[str, str]:
        window = settings.dedup_window if settings.duplicate_detection else timedelta(0)
        return {
            META_DEDUP_WINDOW: str(int(window.total_seconds())),
            META_VISIBILITY: str(max(1, int(settings.lock_duration.total_seconds()))),
            META_MAX_DELIVERY: str(settings.max_delivery_count),
        }

    @staticmethod
    def has_jobq_metadata(meta: dict[str, str]) -> bool:
        return META_DEDUP_WINDOW in meta


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def encode_text(header: dict[str, Any], body: bytes) -> str:
    """The queue message text for ``body`` with ``header`` (see module docstring)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        unsafe = bool(_XML_UNSAFE.search(text))
        try:
            if unsafe:
                raise ValueError("not XML-safe as is")
            json.loads(text)
            payload = text
        except (ValueError, RecursionError):  # framed as a string, whatever it holds
            header = {**header, "enc": "text"}
            payload = json.dumps(text, ensure_ascii=unsafe)
    else:
        header = {**header, "enc": "base64"}
        payload = json.dumps(base64.b64encode(body).decode("ascii"))
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    return f"{_FRAME_PREFIX}{head}{_BODY_KEY}{payload}}}"


def decode_text(text: str) -> tuple[dict[str, Any] | None, bytes]:
    """``(header, body)``; ``(None, raw text bytes)`` for text that is not our frame."""
    raw = text.encode("utf-8", "surrogatepass")
    if not text.startswith(_FRAME_PREFIX) or not text.endswith("}"):
        return None, raw
    try:
        header, end = _DECODER.raw_decode(text, len(_FRAME_PREFIX))
    except (ValueError, RecursionError):  # foreign text, however hostile, is kept raw
        return None, raw
    if not isinstance(header, dict) or text[end : end + len(_BODY_KEY)] != _BODY_KEY:
        return None, raw
    payload = text[end + len(_BODY_KEY) : -1]
    encoding = header.get("enc")
    if encoding is None:
        return header, payload.encode("utf-8")
    try:
        value = json.loads(payload)
        if encoding == "text" and isinstance(value, str):
            return header, value.encode("utf-8")
        if encoding == "base64" and isinstance(value, str):
            return header, base64.b64decode(value, validate=True)
    except (ValueError, RecursionError):
        pass
    return None, raw


def text_size(text: str) -> int:
    return len(text.encode("utf-8"))


# ---------------------------------------------------------------------- errors


def account_of(connection_string: str | None, account: str | None) -> str:
    if connection_string:
        for part in connection_string.split(";"):
            key, _, value = part.partition("=")
            if key.strip().lower() == "accountname":
                return value.strip()
        return "(from connection string)"
    return account or "?"


@contextmanager
def translate_errors(what: str, account: str) -> Iterator[None]:
    """Turn SDK errors into :class:`BackendError` with an actionable message.

    Only the status and Azure error code are kept: SDK messages can echo request
    URLs (with SAS tokens), so they never reach our errors or logs.
    """
    try:
        yield
    except BackendError:
        raise
    except ClientAuthenticationError as exc:
        raise credentials_refused(
            what, account, error_code(exc) or type(exc).__name__, auth_failure_reason(exc)
        ) from None
    except ServiceRequestError as exc:
        raise ConnectionFailedError(
            f"{what}: cannot reach storage account {account!r} ({type(exc).__name__}). "
            "Check the account name or the endpoints in the connection string, and the network."
        ) from None
    except ServiceResponseError as exc:
        raise BackendError(
            f"{what}: storage account {account!r} did not answer in time "
            f"({type(exc).__name__}); the request may or may not have been applied"
        ) from None
    except ResourceNotFoundError as exc:
        raise QueueUnavailableError(
            f"{what}: not found on storage account {account!r} "
            f"({error_code(exc) or 'NotFound'}); push once to create the queue"
        ) from None
    except HttpResponseError as exc:
        raise BackendError(
            f"{what}: storage account {account!r} answered {exc.status_code} "
            f"{error_code(exc)}".rstrip()
        ) from None


def credentials_refused(what: str, account: str, code: str, reason: str = "") -> BackendError:
    return CredentialsRefusedError(
        f"{what}: storage account {account!r} refused the credentials ({code}"
        f"{': ' + reason if reason else ''}). "
        "Check the account key or SAS in the connection string (JOBQ_CONNECTION_STRING / "
        "--conn-str), or, with ACCOUNT/QUEUE, your Azure login (`az login`) and that it has "
        "the 'Storage Queue Data Contributor' (and, for dedup, 'Storage Table Data "
        "Contributor') role."
    )


def auth_failure_reason(exc: BaseException) -> str:
    """The service's plain-words reason for refusing credentials (see
    :func:`~.rest.auth_reason`), from an SDK error's response body."""
    response = getattr(exc, "response", None)
    try:
        body = response.text() if response is not None else ""
    except Exception:  # noqa: BLE001 - no body, no reason
        return ""
    return auth_reason(body or "")


def error_code(exc: BaseException) -> str:
    """Azure's error code as plain text (the SDK gives an enum or a string)."""
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or "")


def means_lock_lost(status: int | None, code: str) -> bool:
    """404: the message is gone; 400 PopReceiptMismatch: someone else received it."""
    return status == 404 or code == "PopReceiptMismatch"


def is_lock_lost(exc: HttpResponseError) -> bool:
    return means_lock_lost(exc.status_code, error_code(exc))


def rest_error(exc: RestError, what: str, account: str) -> BackendError:
    """The same messages as :func:`_translate`, for the fast REST path."""
    if exc.status in (401, 403):
        return credentials_refused(what, account, exc.code or "AuthenticationFailed", exc.reason)
    if exc.status == 0:
        return ConnectionFailedError(
            f"{what}: cannot reach storage account {account!r} ({exc.code}). "
            "Check the account name or the endpoints in the connection string, and the network."
        )
    if exc.status == 404:
        return QueueUnavailableError(
            f"{what}: not found on storage account {account!r} ({exc.code or 'NotFound'}); "
            "push once to create the queue"
        )
    return BackendError(
        f"{what}: storage account {account!r} answered {exc.status} {exc.code}".rstrip()
    )


def is_account_error(exc: BackendError) -> bool:
    """Errors about the account rather than the message: abort the whole push."""
    return isinstance(exc, ConnectionFailedError)


def as_backend_error(exc: BaseException | None, what: str, account: str) -> BaseException:
    if exc is None or isinstance(exc, BackendError):
        return exc or BackendError(what)
    if isinstance(exc, RestError):
        return rest_error(exc, what, account)
    if isinstance(exc, LedgerError):
        return BackendError(f"{what}: {exc}")
    try:
        with translate_errors(what, account):
            raise exc
    except BackendError as translated:
        return translated
    except Exception:  # noqa: BLE001 - not an SDK error: keep only its type
        return BackendError(f"{what}: {type(exc).__name__}")


def dead_letter_text(message: ReceivedMessage, reason: str, description: str) -> str:
    """The ``-failed`` record: the body plus why.  The description is cut to fit the
    64 KiB limit; if even the reason does not fit, the body alone is kept (the body
    matters more than the explanation)."""
    header: dict[str, Any] = {
        "id": message.message_id,
        "reason": (reason or "")[:256],
        "description": (description or "")[-_DESCRIPTION_LIMIT:],
        "delivery_count": message.delivery_count,
        "dead_lettered_at": time.time(),
    }
    text = encode_text(header, message.body)
    while text_size(text) > MESSAGE_TEXT_LIMIT and header["description"]:
        header["description"] = header["description"][len(header["description"]) // 2 + 1 :]
        text = encode_text(header, message.body)
    if text_size(text) > MESSAGE_TEXT_LIMIT:
        log.warning(
            "dead-lettering %s without its reason (%s): the body fills the message",
            message.message_id,
            reason,
        )
        text = encode_text({"id": message.message_id}, message.body)
    return text


@dataclass
class Lease:
    """Settlement handle: the message's Azure id and current pop receipt.  The lock
    keeps a heartbeat and a settlement from using the same pop receipt at once."""

    azure_id: str
    pop_receipt: str
    dead_letter_queue: bool
    header: dict[str, Any] | None = None  # our frame's header; None for foreign text
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def to_received(item: Any, dead_letter: bool, *, with_handle: bool) -> ReceivedMessage:
    """A received (or peeked: ``with_handle=False``) SDK item as a ``ReceivedMessage``.
    The delivery count is Azure's ``dequeue_count`` less the receptions recorded as
    ``unstarted`` (read-ahead released without running, see :func:`unstarted_text`)."""
    frame, body = decode_text(item.content or "")
    header = frame or {}
    delivery = int(item.dequeue_count or 0)
    unstarted = header.get("unstarted")
    if isinstance(unstarted, int) and not dead_letter:
        delivery -= unstarted
    if dead_letter and isinstance(header.get("delivery_count"), int):
        delivery = header["delivery_count"]
    return ReceivedMessage(
        message_id=str(header.get("id") or item.id),
        body=body,
        delivery_count=max(delivery, 1) if with_handle else delivery,
        enqueued_time=item.inserted_on.timestamp() if item.inserted_on else None,
        locked_until=(
            item.next_visible_on.timestamp() if with_handle and item.next_visible_on else None
        ),
        handle=(Lease(item.id, item.pop_receipt, dead_letter, frame) if with_handle else None),
        dead_letter_reason=_text_or_none(header.get("reason")),
        dead_letter_description=_text_or_none(header.get("description")),
    )


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def unstarted_text(header: dict[str, Any] | None, body: bytes) -> str | None:
    """New message text recording one more reception that never ran the task, or
    None for foreign text (no header to record it in: it keeps its count)."""
    if header is None:
        return None
    previous = header.get("unstarted")
    count = previous if isinstance(previous, int) else 0
    return encode_text({**header, "unstarted": count + 1}, body)


def lost_lock(message: ReceivedMessage) -> str:
    return (
        f"lost the lock on message {message.message_id}: its visibility timeout "
        "expired and another receiver took it (or it was deleted)"
    )
