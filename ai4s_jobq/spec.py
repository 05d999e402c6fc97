"""Queue specs: which backend serves a queue, and how to reach it.

* ``local://NAME`` — the embedded SQLite broker, a file under the local data
  directory (``JOBQ_LOCAL_DIR``, default ``$XDG_DATA_HOME/ai4s_jobq``).
* ``sb://NAMESPACE/QUEUE`` — Azure Service Bus.  ``NAMESPACE`` without a dot
  means ``NAMESPACE.servicebus.windows.net``.  With a connection string the
  connection string's endpoint wins and only ``QUEUE`` is taken from the spec.
* ``ACCOUNT/QUEUE`` — Azure Storage Queue (``https://ACCOUNT.queue.core.windows.net``);
  with a connection string, its account wins.
* ``QUEUE`` alone with a connection string: the backend the connection string
  points at (``Endpoint=sb://`` → Service Bus, otherwise Storage).
* nothing at all: ``local://default``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from .backends.base import Backend, QueueUnavailableError
from .queue_names import QueueNameError, validate_queue_name

QUEUE_ENV = "JOBQ_QUEUE"
CONNECTION_STRING_ENV = "JOBQ_CONNECTION_STRING"
LOCAL_DIR_ENV = "JOBQ_LOCAL_DIR"
DEFAULT_SPEC = "local://default"


class SpecError(ValueError):
    pass


@dataclass(frozen=True)
class QueueSpec:
    kind: str  # "local", "servicebus", "storage"
    queue: str
    namespace: str | None = None  # Service Bus namespace (FQDN) or storage account

    def __str__(self) -> str:
        if self.kind == "local":
            return f"local://{self.queue}"
        if self.kind == "servicebus":
            return f"sb://{self.namespace or '?'}/{self.queue}"
        return f"{self.namespace or '?'}/{self.queue}"


def local_dir() -> Path:
    """Where local queues live, as an absolute path: a relative ``JOBQ_LOCAL_DIR`` is
    taken from the current directory and shown so in every message (a worker started
    elsewhere sees another queue; the path it prints says so).  A relative
    ``XDG_DATA_HOME`` is ignored, as the XDG Base Directory specification says."""
    configured = os.environ.get(LOCAL_DIR_ENV)
    if configured:
        return Path(configured).expanduser().absolute()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = xdg if xdg and os.path.isabs(xdg) else os.path.join(Path.home(), ".local", "share")
    return Path(base) / "ai4s_jobq"


def parse_spec(spec: str | None, connection_string: str | None = None) -> QueueSpec:
    """The backend and queue ``spec`` names, its queue name checked against the
    backend's rules (:mod:`ai4s_jobq.queue_names`) before anything is contacted."""
    if spec is not None and not isinstance(spec, str):  # e.g. a Path, or a number
        raise SpecError(
            f"a queue spec is a string such as local://NAME or sb://NAMESPACE/QUEUE, "
            f"not a {type(spec).__name__}"
        )
    parsed = _parse(spec, connection_string)
    try:
        validate_queue_name(parsed.kind, parsed.queue)
    except QueueNameError as exc:
        raise SpecError(f"queue {str(parsed)!r}: {exc}") from None
    return parsed


def _parse(spec: str | None, connection_string: str | None) -> QueueSpec:
    text = (spec or "").strip() or os.environ.get(QUEUE_ENV, "").strip() or DEFAULT_SPEC
    if text.startswith("local://"):
        return QueueSpec("local", text[len("local://") :])
    if text.startswith("sb://"):
        # A Service Bus queue name may hold '/' (path segments): all after the
        # namespace is the queue.
        namespace, _, queue = text[len("sb://") :].rstrip("/").partition("/")
        if not namespace or not queue:
            raise SpecError(f"{text!r}: expected sb://NAMESPACE/QUEUE")
        fqdn = namespace if "." in namespace else f"{namespace}.servicebus.windows.net"
        return QueueSpec("servicebus", queue, fqdn)
    if "://" in text:
        raise SpecError(
            f"{text!r}: unknown scheme; use local://NAME, sb://NAMESPACE/QUEUE or ACCOUNT/QUEUE"
        )
    account, slash, queue = text.partition("/")
    if slash:
        if not account or not queue or "/" in queue:
            raise SpecError(f"{text!r}: expected ACCOUNT/QUEUE")
        return QueueSpec("storage", queue, account)
    if connection_string:
        kind = "servicebus" if "endpoint=sb://" in connection_string.lower() else "storage"
        return QueueSpec(kind, text)
    raise SpecError(
        f"{text!r} names no backend: use local://{text}, sb://NAMESPACE/{text} or "
        f"ACCOUNT/{text} (or give a connection string)"
    )


def make_backend(
    spec: QueueSpec,
    connection_string: str | None = None,
    *,
    dedup_window: timedelta | None = None,
) -> Backend:
    """Instantiate (not open) the backend for ``spec``."""
    if spec.kind == "local":
        from .backends.local import LocalBackend

        return LocalBackend(local_dir() / f"{spec.queue}.sqlite3", spec.queue)
    if spec.kind == "servicebus":
        try:
            from .backends.servicebus.backend import ServiceBusBackend
        except ImportError as exc:
            raise QueueUnavailableError(
                f"the Service Bus backend is not available yet ({exc})"
            ) from None
        return ServiceBusBackend.from_spec(spec.namespace, spec.queue, connection_string)
    try:
        from .backends.storage.backend import StorageQueueBackend
    except ImportError as exc:
        raise QueueUnavailableError(
            f"the Storage Queue backend is not available yet ({exc})"
        ) from None
    return StorageQueueBackend.from_spec(
        spec.namespace, spec.queue, connection_string, dedup_window=dedup_window
    )
