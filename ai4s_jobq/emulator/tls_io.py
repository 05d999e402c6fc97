"""TLS connections on the emulator's single port: AMQPS and HTTPS.

A client that starts with a TLS ClientHello is either the admin client (HTTPS)
or a data-plane client using a credential: with ``DefaultAzureCredential`` the
SDK always speaks AMQP over TLS (AMQPS), as it does to Azure.  After the
handshake the emulator sniffs again, on the decrypted stream: ``A`` (the
``AMQP`` protocol header) goes to the AMQP front end, anything else is HTTP.

TLS sockets cannot peek, so the sniffed byte is handed on: to the AMQP
transport as its first input, or put back in front of the HTTP handler's reads.
"""

from __future__ import annotations

import io
import logging
import socket
import ssl
from typing import Any

from .amqp import AmqpConnection
from .hub import EmulatorContext

log = logging.getLogger(__name__)

#: Stop reading a TLS connection into the backlog beyond this (the AMQP engine
#: takes at most a frame at a time; the rest waits in the kernel).
MAX_BACKLOG = 1024 * 1024
READ_SIZE = 64 * 1024


def accept_tls(
    sock: socket.socket, context: ssl.SSLContext, peer: str, timeout: float
) -> tuple[ssl.SSLSocket, bytes] | None:
    """Handshake and read the first decrypted byte: ``(tls socket, byte)``, or None
    if the handshake failed or the client said nothing within ``timeout``."""
    sock.settimeout(timeout)
    try:
        tls = context.wrap_socket(sock, server_side=True)
    except (ssl.SSLError, OSError) as exc:
        log.info("TLS handshake with %s failed: %s", peer, exc)
        return None
    try:
        first = tls.recv(1)
    except (ssl.SSLError, OSError) as exc:
        log.info("TLS connection from %s sent nothing: %s", peer, exc)
        first = b""
    if not first:
        _close(tls)
        return None
    return tls, first


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


class _PrefixedReader(io.RawIOBase):
    """Raw reads of a socket with some bytes already read put back in front."""

    def __init__(self, sock: socket.socket, prefix: bytes):
        self._sock = sock
        self._prefix = bytearray(prefix)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._prefix:
            count = min(len(view), len(self._prefix))
            view[:count] = self._prefix[:count]
            del self._prefix[:count]
            return count
        return self._sock.recv_into(view)


class PrefixedSocket:
    """What ``BaseHTTPRequestHandler`` needs of a socket, for a TLS socket whose
    first bytes the sniffer already read: ``makefile("rb")`` replays them."""

    def __init__(self, sock: ssl.SSLSocket, prefix: bytes):
        self._sock = sock
        self._prefix = prefix

    def makefile(self, mode: str = "r", buffering: int = -1, **kwargs: Any) -> Any:
        if "r" in mode:
            raw = _PrefixedReader(self._sock, self._prefix)
            self._prefix = b""
            return io.BufferedReader(raw, buffering if buffering > 0 else io.DEFAULT_BUFFER_SIZE)
        sock: Any = self._sock  # mode is a plain str here; the stub wants literals
        return sock.makefile(mode, buffering, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class TlsAmqpConnection(AmqpConnection):
    """:class:`AmqpConnection` over a TLS socket.

    A non-blocking TLS socket reports "no data yet" as ``SSLWantReadError``
    (not ``BlockingIOError``), and one ``recv`` returns at most one TLS record
    while more decrypted bytes may sit inside the TLS layer where ``select``
    cannot see them.  So each read drains the socket into a backlog, and the
    backlog is fed to the AMQP transport as it has room."""

    def __init__(self, sock: ssl.SSLSocket, ctx: EmulatorContext, peer: str, prefix: bytes):
        super().__init__(sock, ctx, peer)
        self._backlog = bytearray(prefix)

    def _read_input(self) -> bool:
        end_of_stream = self._drain()
        return self._push_backlog() and not end_of_stream

    def _drain(self) -> bool:
        """Read what the socket has (up to :data:`MAX_BACKLOG`); True at end of stream."""
        while len(self._backlog) < MAX_BACKLOG:
            try:
                data = self.sock.recv(READ_SIZE)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return False
            except OSError:
                return True
            if not data:
                return True
            self._backlog += data
        return False

    def _tls_pending(self) -> bool:
        """Decrypted bytes inside the TLS layer, invisible to ``select``."""
        return isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0

    def _push_backlog(self) -> bool:
        """Feed the transport what it has room for; False once it takes no more input."""
        while self._backlog:
            capacity = self.transport.capacity()
            if capacity < 0:  # the transport takes no more input: nothing to keep
                self._backlog.clear()
                return False
            if capacity == 0:
                break
            count = min(capacity, len(self._backlog))
            self.transport.push(bytes(self._backlog[:count]))
            del self._backlog[:count]
        return True

    def _process_events(self) -> None:
        if self._tls_pending() and len(self._backlog) < MAX_BACKLOG:
            self._drain()  # an end of stream shows up again at the next select
        self._push_backlog()
        super()._process_events()

    def _next_timeout(self) -> tuple[float, float | None]:
        timeout, timer_due = super()._next_timeout()
        if self._backlog or self._tls_pending():
            return 0.0, timer_due
        return timeout, timer_due
