"""Start and stop the emulator: in-process (background threads) or as a subprocess.

One TCP port serves both protocols: a connection whose first byte is ``A``
(``AMQP`` protocol header, with or without SASL) goes to the AMQP front end, one
whose first byte is ``0x16`` (a TLS ClientHello) is wrapped in TLS and sniffed
again (:mod:`.tls_io`): AMQP over TLS -- what the SDK speaks with an Azure AD
credential -- goes to the AMQP front end, anything else to the HTTPS management
front end.  That way the single endpoint of the connection string works for
``ServiceBusClient`` and ``ServiceBusAdministrationClient``, with SAS or AAD.

The data directory holds everything that must survive a restart: the SQLite
store, ``emulator.json`` (SAS key name, key, AAD trust key and the last port)
and the TLS CA.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sqlite3
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

from ai4s_jobq.broker_core import BrokerCore

from . import client, tls
from .amqp import AmqpConnection
from .auth import DEFAULT_KEY_NAME, SasAuthority, new_key
from .hub import EmulatorContext
from .jwt_auth import JwtAuthority
from .management import serve_https_connection
from .tls_io import PrefixedSocket, TlsAmqpConnection, accept_tls

log = logging.getLogger(__name__)

DEFAULT_PORT = 5672
SNIFF_TIMEOUT = 10.0
TLS_RECORD_HANDSHAKE = 0x16


@dataclass
class EmulatorSettings:
    """Persisted in ``<data dir>/emulator.json``."""

    key_name: str = DEFAULT_KEY_NAME
    key: str = ""
    port: int = 0
    #: HMAC key Azure AD tokens must be signed with (see :mod:`.jwt_auth`);
    #: empty: Azure AD tokens are refused
    aad_trust_key: str = ""


class EmulatorDataError(ValueError):
    """The data directory's settings or message store is damaged; says which file
    and what to do (the emulator will not overwrite it)."""


def load_settings(data_dir: Path) -> EmulatorSettings:
    path = data_dir / "emulator.json"
    if not path.exists():
        return EmulatorSettings()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        known = EmulatorSettings.__dataclass_fields__
        settings = EmulatorSettings(**{k: v for k, v in raw.items() if k in known})
        for name in ("key_name", "key", "aad_trust_key"):
            if not isinstance(getattr(settings, name), str):
                raise ValueError(f"{name} is not a string")
        if not isinstance(settings.port, int) or not 0 <= settings.port <= 65535:
            raise ValueError("port is not a port number")
    except ValueError as exc:  # JSON and UnicodeDecodeError are ValueErrors too
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise EmulatorDataError(
            f"the emulator's settings file {path} is damaged ({why}); fix it, or move it "
            "aside to start with a new SAS key (clients then need the new connection string)"
        ) from None
    return settings


def save_settings(data_dir: Path, settings: EmulatorSettings) -> None:
    path = data_dir / "emulator.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(settings), f)
    os.replace(tmp, path)


class EmulatorServer:
    """The emulator in this process.  ``start()`` returns once the port accepts
    connections; ``stop()`` closes the listener and every client connection."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        key: str | None = None,
        key_name: str | None = None,
        aad_trust_key: str | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.settings = load_settings(self.data_dir)
        if key:
            self.settings.key = key
        if key_name:
            self.settings.key_name = key_name
        if aad_trust_key is not None:
            self.settings.aad_trust_key = aad_trust_key
        if not self.settings.key:
            self.settings.key = new_key()
        self.host = host
        # None: the port of the last run with this data dir (so clients keep working
        # across restarts), else any free port
        self._requested_port = port if port is not None else self.settings.port
        self.port = 0
        self.core: BrokerCore | None = None
        self.ctx: EmulatorContext | None = None
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: set[AmqpConnection] = set()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._ssl_context: ssl.SSLContext | None = None
        self.ca_path: Path | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def connection_string(self) -> str:
        return client.connection_string(
            self.host, self.port, self.settings.key_name, self.settings.key
        )

    def start(self) -> EmulatorServer:
        store = self.data_dir / "broker.sqlite3"
        try:
            self.core = BrokerCore(store)
        except sqlite3.DatabaseError as exc:
            raise EmulatorDataError(
                f"the emulator's message store {store} is damaged ({exc}); move it aside "
                "to start with an empty namespace (its queues and messages are in it)"
            ) from None
        self.ctx = EmulatorContext(
            core=self.core,
            authority=SasAuthority(self.settings.key_name, self.settings.key),
            aad=JwtAuthority(self.settings.aad_trust_key),
        )
        listener = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self._requested_port))
        listener.listen(128)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self.settings.port = self.port
        save_settings(self.data_dir, self.settings)
        files = tls.ensure_tls_files(self.data_dir / "tls", self.host)
        self._ssl_context = files.server_context()
        self.ca_path = client.ca_path_for(self.host, self.port)
        self.ca_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files.ca_cert, self.ca_path)
        self._stopped.clear()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"emulator-accept-{self.port}", daemon=True
        )
        self._accept_thread.start()
        log.info("Service Bus emulator listening on %s:%d", self.host, self.port)
        return self

    def stop(self) -> None:
        if self._listener is None:
            return
        self._stopped.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        with self._lock:
            connections = list(self._connections)
            sockets = list(self._sockets)
        for connection in connections:
            connection.stop()
        for sock in sockets:
            try:
                # the plain socket's shutdown, also for TLS sockets (whose own one
                # would tear down the TLS state under the thread still using it)
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
        self._listener = None
        if self.core is not None:
            self.core.close()

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self) -> None:
        """Block until :meth:`stop` is called (from a signal handler, say)."""
        self._stopped.wait()

    # ------------------------------------------------------------------ connections

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopped.is_set():
            try:
                sock, address = self._listener.accept()
            except OSError:
                if self._stopped.is_set():
                    return
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = f"{address[0]}:{address[1]}"
            threading.Thread(
                target=self._serve_client,
                args=(sock, peer),
                name=f"emulator-{peer}",
                daemon=True,
            ).start()

    @contextmanager
    def _tracked(self, sock: socket.socket) -> Iterator[None]:
        """Register ``sock`` so ``stop()`` can close it; close it when the block ends."""
        with self._lock:
            self._sockets.add(sock)
        try:
            yield
        finally:
            with self._lock:
                self._sockets.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    def _serve_client(self, sock: socket.socket, peer: str) -> None:
        with self._tracked(sock):
            try:
                self._sniff_and_serve(sock, peer)
            except Exception:
                log.exception("connection from %s failed", peer)

    def _sniff_and_serve(self, sock: socket.socket, peer: str) -> None:
        sock.settimeout(SNIFF_TIMEOUT)
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except OSError:
            return
        if not first:
            return
        if first[0] == TLS_RECORD_HANDSHAKE:
            assert self._ssl_context is not None
            self._serve_tls(sock, peer, self._ssl_context)
        elif first == b"A":
            sock.settimeout(None)
            assert self.ctx is not None
            self._serve_amqp(AmqpConnection(sock, self.ctx, peer))
        else:
            sock.sendall(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )

    def _serve_tls(self, sock: socket.socket, peer: str, context: ssl.SSLContext) -> None:
        accepted = accept_tls(sock, context, peer, SNIFF_TIMEOUT)
        if accepted is None:
            return
        tls_sock, first = accepted
        assert self.ctx is not None
        with self._tracked(tls_sock):
            if first == b"A":
                tls_sock.settimeout(None)
                self._serve_amqp(TlsAmqpConnection(tls_sock, self.ctx, peer, first))
            else:
                # the handler only uses the socket API PrefixedSocket forwards
                serve_https_connection(
                    cast(socket.socket, PrefixedSocket(tls_sock, first)), peer, self.ctx
                )

    def _serve_amqp(self, connection: AmqpConnection) -> None:
        with self._lock:
            self._connections.add(connection)
        try:
            if not self._stopped.is_set():
                connection.serve()
        finally:
            with self._lock:
                self._connections.discard(connection)
