"""HTTPS management front end: the Service Bus management REST API for queues.

Serves what ``ServiceBusAdministrationClient`` (sync and aio) sends:

* ``PUT /{queue}`` create (409 if it exists) or, with ``If-Match``, update
  (404 if missing; toggling duplicate detection is a 400, as on Azure);
* ``GET /{queue}`` the entry with runtime counts (404 if missing);
* ``DELETE /{queue}``;
* ``GET /$Resources/queues?$skip=&$top=`` the feed of queues, paged.

Every request must carry ``Authorization: SharedAccessSignature ...`` signed
with the emulator's key or ``Authorization: Bearer <Azure AD JWT>`` valid for
the emulator's AAD trust key (401 otherwise, see :mod:`.jwt_auth`).  Errors are
Atom ``<Error>`` bodies the SDK turns into ``HttpResponseError`` subclasses.
The connection is already TLS-wrapped when it reaches
:func:`serve_https_connection`.
"""

from __future__ import annotations

import logging
import socket
import ssl
from http.server import BaseHTTPRequestHandler
from socketserver import BaseServer
from typing import cast
from urllib.parse import parse_qs, unquote, urlparse

from ai4s_jobq.broker_core import (
    BrokerError,
    InvalidOperation,
    QueueCounts,
    QueueExists,
    QueueNotFound,
    QueueProperties,
)
from ai4s_jobq.queue_names import QueueNameError, validate_queue_name

from . import atom
from .auth import AuthError
from .hub import EmulatorContext

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 120.0
MAX_BODY = 1024 * 1024


class _ServerStub:
    """What ``BaseHTTPRequestHandler`` expects of its ``server`` argument."""

    def __init__(self, ctx: EmulatorContext):
        self.ctx = ctx


def serve_https_connection(sock: socket.socket, peer: str, ctx: EmulatorContext) -> None:
    """HTTP/1.1 requests until the client goes away.  ``sock`` is already TLS
    (see :mod:`.tls_io`), possibly with bytes the sniffer read put back in front."""
    try:
        sock.settimeout(IDLE_TIMEOUT)
        # the handler only reads ``server.ctx``; the stdlib stub asks for a BaseServer
        ManagementHandler(sock, (peer, 0), cast(BaseServer, _ServerStub(ctx)))
    except (OSError, ssl.SSLError):
        pass


class ManagementHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ai4s-jobq-servicebus-emulator"

    # ------------------------------------------------------------------ plumbing

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("%s %s", self.client_address[0], format % args)

    @property
    def ctx(self) -> EmulatorContext:
        return self.server.ctx  # type: ignore[attr-defined]

    def _base_url(self) -> str:
        host = self.headers.get("Host") or "localhost"
        return f"https://{host}"

    def _send(
        self, status: int, body: bytes = b"", content_type: str = "application/atom+xml"
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, detail: str) -> None:
        self._send(status, atom.error_xml(status, detail), "application/xml")

    def _read_body(self) -> bytes | None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        self._body_consumed = True
        if length < 0 or length > MAX_BODY:
            self.close_connection = True  # the body cannot be skipped: end the connection
            self._error(400, "invalid Content-Length")
            return None
        return self.rfile.read(length) if length else b""

    def _discard_unread_body(self) -> None:
        """Skip the body of a request answered without reading it (a 401, say), so
        that it is not parsed as the next request on this keep-alive connection."""
        if getattr(self, "_body_consumed", True):
            return
        self._body_consumed = True
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
        elif length:
            self.rfile.read(length)

    def _authorised(self, path: str) -> bool:
        token = self.headers.get("Authorization") or ""
        host = self.headers.get("Host") or "localhost"
        try:
            self.ctx.check_authorization_header(token, f"https://{host}/{path}")
        except AuthError as exc:
            self._error(401, f"Unauthorized: {exc}")
            return False
        return True

    def _route(self) -> tuple[str, dict[str, list[str]]] | None:
        parsed = urlparse(self.path)
        path = unquote(parsed.path).strip("/")
        if not path:
            self._error(404, "no entity in the request path")
            return None
        return path, parse_qs(parsed.query)

    def _dispatch(self, method: str) -> None:
        self._body_consumed = False
        try:
            routed = self._route()
            if routed is None:
                return
            path, query = routed
            if not self._authorised(path):
                return
            if path.lower() == "$resources/queues" and method == "GET":
                self._list_queues(query)
            elif path.startswith("$") or "/$" in path or "/subscriptions/" in path.lower():
                self._error(400, f"the emulator serves queues only, not {path!r}")
            elif method == "GET":
                self._get_queue(path)
            elif method == "PUT":
                self._put_queue(path)
            elif method == "DELETE":
                self._delete_queue(path)
            else:
                self._error(405, f"{method} is not supported")
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception:
            log.exception("management request %s %s failed", method, self.path)
            self._error(500, "the emulator failed on this request")
        finally:
            self._discard_unread_body()

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_POST(self) -> None:  # noqa: N802
        self._read_body()
        self._error(405, "POST is not supported")

    # ------------------------------------------------------------------ operations

    def _get_queue(self, name: str) -> None:
        core = self.ctx.core
        name = core.resolve_queue_name(name) or name
        try:
            props = core.get_queue(name)
            counts = core.counts(name)
        except QueueNotFound:
            self._error(404, f"The messaging entity '{name}' could not be found.")
            return
        self._send(200, atom.entry_xml(self._base_url(), props, counts))

    def _put_queue(self, name: str) -> None:
        body = self._read_body()
        if body is None:
            return
        try:
            request = atom.parse_queue_request(body)
        except atom.AtomError as exc:
            self._error(400, str(exc))
            return
        if request.requires_session:
            self._error(400, "the emulator does not support session-enabled queues")
            return
        core = self.ctx.core
        updating = self.headers.get("If-Match") is not None
        try:
            validate_queue_name("servicebus", name)
        except QueueNameError as exc:
            self._error(400, str(exc))
            return
        if updating:
            name = core.resolve_queue_name(name) or name
        try:
            if updating:
                current = core.get_queue(name)
                wanted = request.apply(current)
                self._check_limits(wanted)
                result = core.update_queue(wanted)
                status = 200
            else:
                wanted = request.apply(QueueProperties(name=name))
                self._check_limits(wanted)
                result = core.create_queue(wanted)
                status = 201
        except QueueNotFound:
            self._error(404, f"The messaging entity '{name}' could not be found.")
            return
        except QueueExists:
            self._error(409, f"The messaging entity '{name}' already exists.")
            return
        except InvalidOperation as exc:
            self._error(400, str(exc))
            return
        except BrokerError as exc:
            self._error(400, str(exc))
            return
        self._send(status, atom.entry_xml(self._base_url(), result, core.counts(name)))

    def _check_limits(self, props: QueueProperties) -> None:
        """Azure's bounds, except that short durations are allowed (down to
        ``ctx.min_duration``) so tests can cross a dedup window or a lock quickly."""
        floor = self.ctx.min_duration
        if props.lock_duration < floor or props.lock_duration > 300:
            raise InvalidOperation(f"LockDuration must be between {floor} seconds and 5 minutes")
        if props.duplicate_detection_window < floor or props.duplicate_detection_window > 7 * 86400:
            raise InvalidOperation(
                f"DuplicateDetectionHistoryTimeWindow must be between {floor} seconds and 7 days"
            )
        if props.max_delivery_count < 1:
            raise InvalidOperation("MaxDeliveryCount must be at least 1")
        if props.max_size_in_megabytes not in (1024, 2048, 3072, 4096, 5120):
            raise InvalidOperation("MaxSizeInMegabytes must be one of 1024, 2048, 3072, 4096, 5120")
        if props.auto_delete_on_idle is not None and props.auto_delete_on_idle < 300:
            raise InvalidOperation("AutoDeleteOnIdle must be at least 5 minutes")

    def _delete_queue(self, name: str) -> None:
        name = self.ctx.core.resolve_queue_name(name) or name
        try:
            self.ctx.core.delete_queue(name)
        except QueueNotFound:
            self._error(404, f"The messaging entity '{name}' could not be found.")
            return
        self._send(200)

    def _list_queues(self, query: dict[str, list[str]]) -> None:
        try:
            skip = int(query.get("$skip", ["0"])[0])
            top = int(query.get("$top", ["100"])[0])
        except ValueError:
            self._error(400, "$skip and $top must be integers")
            return
        core = self.ctx.core
        queues = core.list_queues()
        page = queues[skip : skip + max(top, 0)]
        items: list[tuple[QueueProperties, QueueCounts | None]] = []
        for props in page:
            try:
                items.append((props, core.counts(props.name)))
            except QueueNotFound:  # deleted meanwhile
                continue
        next_link = None
        base = self._base_url()
        if skip + top < len(queues):
            next_link = (
                f"{base}/$Resources/queues?$skip={skip + top}&$top={top}&api-version=2021-05"
            )
        self._send(200, atom.feed_xml(base, items, next_link))
