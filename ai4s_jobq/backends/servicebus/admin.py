"""Service Bus management plane: create the queue, read its settings and counts.

Everything here goes through the official ``ServiceBusAdministrationClient``.
Reading settings is best effort: a principal without Manage rights can still
send and receive, so the startup checker reports "could not read" instead of
failing.

Why the *sync* client, run in a worker thread: ``import azure.servicebus``
already loads it (and ``requests``, its transport), while the aio client imports
aiohttp at module load, which measured as a third of a ``jobq`` command's
import time (see bench/bench_sb_commands.py).  The handful of management calls
a command makes gain nothing from aiohttp.  With Azure AD the sync client signs
its requests with the backend's one async credential (:class:`SyncTokenBridge`),
so there is one sign-in and one token cache, not two.

Opening a queue costs one request when it exists: ``create_queue`` reads the
queue first and keeps its properties, which the startup check then uses.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
)
from azure.servicebus.management import QueueProperties, ServiceBusAdministrationClient

from ...durations import format_duration
from ...redact import redact
from ..base import (
    BackendError,
    ConnectionFailedError,
    DedupInfo,
    QueueCounts,
    QueueSettings,
    QueueUnavailableError,
)

log = logging.getLogger("ai4s_jobq.servicebus")

#: Azure's limits for a queue's duplicate-detection history window
MIN_DEDUP_WINDOW = timedelta(seconds=20)
MAX_DEDUP_WINDOW = timedelta(days=7)
#: Azure's limits for a queue's lock duration
MIN_LOCK_DURATION = timedelta(seconds=5)
MAX_LOCK_DURATION = timedelta(minutes=5)
#: longest wait for a token the sync client asks the async credential for
TOKEN_TIMEOUT = 120.0

T = TypeVar("T")


class ServiceBusSettingsError(BackendError, ValueError):
    """A queue setting Azure Service Bus would reject (raised before any call)."""


def validate_settings(settings: QueueSettings) -> None:
    window = settings.dedup_window
    if not MIN_DEDUP_WINDOW <= window <= MAX_DEDUP_WINDOW:
        raise ServiceBusSettingsError(
            f"dedup window {format_duration(window)} is outside what Azure Service Bus accepts "
            f"({format_duration(MIN_DEDUP_WINDOW)} to {format_duration(MAX_DEDUP_WINDOW)}); "
            "pass e.g. --dedup-window 7d, 12h or 30m"
        )
    lock = settings.lock_duration
    if not MIN_LOCK_DURATION <= lock <= MAX_LOCK_DURATION:
        raise ServiceBusSettingsError(
            f"lock duration {format_duration(lock)} is outside what Azure Service Bus accepts "
            f"({format_duration(MIN_LOCK_DURATION)} to {format_duration(MAX_LOCK_DURATION)})"
        )
    if settings.max_delivery_count < 1:
        raise ServiceBusSettingsError("max delivery count must be at least 1")


def _is_denied(exc: BaseException) -> bool:
    if isinstance(exc, ClientAuthenticationError):
        return True
    return isinstance(exc, HttpResponseError) and getattr(exc, "status_code", None) in (401, 403)


def _short(exc: BaseException) -> str:
    text = redact(str(exc)).strip().splitlines()
    detail = _service_detail(exc)
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}" + (
        f" ({detail})" if detail else ""
    )


def _service_detail(exc: BaseException) -> str:
    """The service's reason from an error response body (``<Error><Detail>``):
    for a 401/403 the SDK raises before parsing it, and the status alone does not
    say whether the token was invalid, expired or lacked rights."""
    response = getattr(exc, "response", None)
    if response is None:
        return ""
    try:
        body = response.text()
    except Exception:  # body not loaded or not text: the status line has to do
        return ""
    match = re.search(r"<Detail>(.*?)</Detail>", body or "", re.DOTALL)
    return redact(html.unescape(match.group(1)).strip())[:300] if match else ""


class SyncTokenBridge:
    """A sync ``TokenCredential`` backed by an async one, for the sync management
    client.  ``get_token`` runs in the admin worker thread and waits for the
    credential on the event loop, which stays free meanwhile."""

    def __init__(self, credential: Any, loop: asyncio.AbstractEventLoop):
        self.credential = credential
        self.loop = loop

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        coroutine = self.credential.get_token(*scopes, **kwargs)
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(TOKEN_TIMEOUT)


class AdminPlane:
    """The management operations the backend needs, on one queue."""

    def __init__(self, client: ServiceBusAdministrationClient, queue_name: str, description: str):
        self.client = client
        self.queue_name = queue_name
        self.description = description
        #: the queue's lock duration once read or set (for the renewal period)
        self.lock_duration: timedelta | None = None
        #: the queue's properties as read or created by ``create_queue``
        self._properties: QueueProperties | None = None
        #: one request at a time: the client shares one HTTP session
        self._lock = asyncio.Lock()

    async def _call(self, operation: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        async with self._lock:
            return await asyncio.to_thread(operation, *args, **kwargs)

    async def close(self) -> None:
        await self._call(self.client.close)

    def unreachable(self, exc: BaseException) -> ConnectionFailedError:
        return ConnectionFailedError(
            f"cannot connect to the Service Bus namespace of {self.description} "
            f"({_short(exc)}); check the namespace / connection string endpoint and the network"
        )

    async def create_queue(self, settings: QueueSettings) -> None:
        """Create the queue if missing; never alters an existing one."""
        validate_settings(settings)
        kwargs: dict[str, Any] = {
            "requires_duplicate_detection": settings.duplicate_detection,
            "lock_duration": settings.lock_duration,
            "max_delivery_count": settings.max_delivery_count,
        }
        if settings.duplicate_detection:
            kwargs["duplicate_detection_history_time_window"] = settings.dedup_window
        try:
            self._properties = await self._call(self.client.get_queue, self.queue_name)
            log.debug("queue %s exists already; leaving its settings alone", self.description)
            return
        except ResourceNotFoundError:
            pass
        except ServiceRequestError as exc:
            raise self.unreachable(exc) from None
        except Exception as exc:  # no Manage rights, or management endpoint failed
            self._cannot_create(exc)
            return
        try:
            self._properties = await self._call(self.client.create_queue, self.queue_name, **kwargs)
        except ResourceExistsError:  # created by someone else since we looked
            log.debug("queue %s exists already; leaving its settings alone", self.description)
            return
        except ServiceRequestError as exc:
            raise self.unreachable(exc) from None
        except Exception as exc:
            self._cannot_create(exc)
            return
        self.lock_duration = settings.lock_duration
        log.info(
            "created %s with duplicate detection %s (window %s)",
            self.description,
            "on" if settings.duplicate_detection else "off",
            format_duration(settings.dedup_window),
        )

    def _cannot_create(self, exc: BaseException) -> None:
        if _is_denied(exc):
            log.info(
                "cannot create %s (no Manage rights?): %s; assuming it exists",
                self.description,
                _short(exc),
            )
        else:
            log.info("could not create %s (%s); assuming it exists", self.description, _short(exc))

    async def dedup_info(self) -> DedupInfo:
        """Best effort: never raises.  Uses the properties ``create_queue`` read."""
        props, self._properties = self._properties, None
        if props is None:
            try:
                props = await self._call(self.client.get_queue, self.queue_name)
            except ResourceNotFoundError:
                return DedupInfo(
                    "servicebus", False, None, None, "none", "the queue does not exist yet"
                )
            except ServiceRequestError as exc:
                raise self.unreachable(exc) from None
            except Exception as exc:
                if _is_denied(exc):
                    note = "no Manage rights to read the queue's properties"
                else:
                    note = f"the management endpoint failed ({_short(exc)})"
                log.debug("startup check of %s skipped: %s", self.description, note)
                return DedupInfo("servicebus", True, None, None, "broker", note)
        self.lock_duration = _as_timedelta(props.lock_duration)
        enabled = bool(props.requires_duplicate_detection)
        return DedupInfo(
            backend="servicebus",
            queue_exists=True,
            duplicate_detection=enabled,
            window=_as_timedelta(props.duplicate_detection_history_time_window),
            mechanism="broker" if enabled else "none",
        )

    async def counts(self) -> QueueCounts:
        try:
            props = await self._call(self.client.get_queue_runtime_properties, self.queue_name)
        except ResourceNotFoundError:
            raise QueueUnavailableError(f"queue {self.description} does not exist") from None
        except ServiceRequestError as exc:
            raise self.unreachable(exc) from None
        except Exception as exc:
            hint = " (counting needs Manage rights)" if _is_denied(exc) else ""
            raise BackendError(
                f"could not read the counts of {self.description}{hint}: {_short(exc)}"
            ) from None
        return QueueCounts(
            active=props.active_message_count or 0,
            dead_letter=props.dead_letter_message_count or 0,
            scheduled=props.scheduled_message_count or 0,
        )


def _as_timedelta(value: Any) -> timedelta | None:
    if value is None or isinstance(value, timedelta):
        return value
    # The SDK parses ISO 8601 durations to timedelta; keep a string fallback anyway.
    from isodate import parse_duration  # a dependency of azure-servicebus

    parsed = parse_duration(str(value))
    return parsed if isinstance(parsed, timedelta) else None
