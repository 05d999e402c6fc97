"""A byte-transparent TCP delay line: gives a loopback benchmark a network round trip.

    python bench/latency_proxy.py --target 127.0.0.1:PORT --rtt-ms 1
    # prints "PORT <listening port>", then forwards until stdin closes or SIGTERM

Why: on loopback a request/response costs no round trip, so a benchmark there
measures CPU only and hides what batching saves against a real service (where every
``send_messages`` call waits one network round trip).  This machine has no
``tc netem``, so the delay is injected in user space, between the client and the
emulator.  It is byte-transparent: AMQP and the emulator's HTTPS management traffic
(same port) go through unchanged; TLS is not terminated.

How: every chunk read from one side is written to the other side at its arrival
time + RTT/2, in order.  Each direction is a FIFO of (due time, bytes) with at most
one timer armed (for its head), so chunks in flight overlap: the delay adds latency,
not a per-chunk cost, and throughput is not limited (a ``sleep`` per chunk would
serialise them: n chunks would take n x delay).  Protocols rather than streams, and
no copies beyond the kernel's, keep the proxy's CPU per chunk small.  When a side's
socket buffer fills, reading from the other side pauses (TCP backpressure passes
through).  Not modelled: the TCP handshake's own round trip (``connect`` returns at
once; the first bytes then pay the delay), bandwidth limits, jitter and loss.

Timer precision: asyncio's default selector (epoll) rounds each wait up to a whole
millisecond, which would turn a 0.5 ms one-way delay into up to 1 ms.  The proxy's
loop uses ``select()``, whose timeout has microsecond resolution (the proxy holds a
handful of sockets, far below select's descriptor limit).

:class:`LatencyProxy` runs the proxy as a child process, so its CPU does not compete
for the benchmark client's GIL; it exits when the parent closes its stdin (also when
the parent dies).
"""

from __future__ import annotations

import argparse
import asyncio
import selectors
import signal
import subprocess
import sys
from collections import deque
from typing import Any

_EOF = b""  # queued after the data: half-close the other side
_CLOSE = None  # queued after the data: close the other side


class _Stats:
    """What the delay line achieved: time from reading a chunk to writing it."""

    chunks = 0
    total = 0.0
    worst = 0.0


class _Side(asyncio.Protocol):
    """One socket of a proxied connection (the client's or the upstream's).

    ``outbox`` holds what the *other* side sent, as (arrival time, data), to be
    written to this socket once ``arrival + wait`` has passed; ``peer`` is the other
    side, and data received here is queued on the peer.  ``wait`` is the one-way
    delay less the loop's typical timer lateness (see :func:`calibrate`).
    """

    def __init__(self, wait: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.wait = wait
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.outbox: deque[tuple[float, bytes | None]] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.got_eof = self.sent_eof = self.closed = False

    # ------------------------------------------------------------------ delivery

    def deliver(self, data: bytes | None) -> None:
        """Queue ``data`` (bytes, ``_EOF`` or ``_CLOSE``) for this socket, due after the delay."""
        if self.closed:
            return
        now = self.loop.time()
        self.outbox.append((now, data))
        if self.timer is None and self.transport is not None:
            if self.wait <= 0:
                self._flush()
            else:
                self.timer = self.loop.call_at(now + self.wait, self._flush)

    def _flush(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None or self.closed:
            return
        now = self.loop.time()
        cutoff = now - self.wait
        outbox = self.outbox
        chunks: list[bytes] = []
        while outbox and outbox[0][0] <= cutoff:
            arrival, data = outbox.popleft()
            if data:
                chunks.append(data)
                held = now - arrival
                _Stats.chunks += 1
                _Stats.total += held
                if held > _Stats.worst:
                    _Stats.worst = held
                continue
            if chunks:
                transport.writelines(chunks)
                chunks = []
            if data is _CLOSE:
                self._close()
                return
            try:  # _EOF: pass the half-close on
                if transport.can_write_eof():
                    transport.write_eof()
            except OSError:  # this side is gone already
                self._close()
                return
            self.sent_eof = True
            if self.got_eof:
                self._close()
                return
        if chunks:
            transport.writelines(chunks)
        if outbox:
            self.timer = self.loop.call_at(outbox[0][0] + self.wait, self._flush)

    def _close(self) -> None:
        self.closed = True
        self.outbox.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.outbox and self.timer is None:  # data arrived before we were connected
            self.timer = self.loop.call_at(self.outbox[0][0], self._flush)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.deliver(data)

    def eof_received(self) -> bool:
        self.got_eof = True
        if self.peer is not None:
            self.peer.deliver(_EOF)
        if self.sent_eof:
            return False  # both directions are done: let the transport close
        return True  # keep our direction open until the peer's EOF arrives

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.outbox.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.peer is not None:
            self.peer.deliver(_CLOSE)

    # Backpressure: this socket's send buffer is full, stop reading what feeds it.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.closed:
            self.peer.transport.resume_reading()


class _Client(_Side):
    """The accepted socket: opens the upstream connection and pairs the two sides."""

    def __init__(self, wait: float, target: tuple[str, int]) -> None:
        super().__init__(wait)
        self.target = target

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        upstream = _Side(self.wait)
        upstream.peer, self.peer = self, upstream
        self.loop.create_task(self._connect(upstream))

    async def _connect(self, upstream: _Side) -> None:
        try:
            await self.loop.create_connection(lambda: upstream, *self.target)
        except OSError:
            upstream.closed = True
            if self.transport is not None:
                self.transport.abort()


def _fine_timer_slack() -> None:
    """Ask Linux for 1 µs timer slack instead of the default 50 µs (best effort)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, in ns
    except (OSError, AttributeError):
        pass


async def calibrate(delay: float, samples: int = 100) -> float:
    """The loop's median lateness for a timer of ``delay`` (capped at 1 ms).

    A timer fires some 50-150 µs late here (wake-up latency); the delay line starts
    its timers that much early, so the delay it achieves is close to the one asked
    for.  The achieved delay is measured anyway (``STATS`` at exit)."""
    loop = asyncio.get_running_loop()
    delay = min(delay, 0.001)
    late = []
    for _ in range(samples):
        start = loop.time()
        fired = loop.create_future()
        loop.call_at(start + delay, fired.set_result, None)
        await fired
        late.append(loop.time() - start - delay)
    late.sort()
    return max(0.0, late[len(late) // 2])


async def serve(
    target: tuple[str, int], rtt_ms: float, host: str = "127.0.0.1", port: int = 0
) -> None:
    """Listen on ``host:port`` (0: a free port), print ``PORT n`` and forward to ``target``
    with RTT/2 each way, until SIGTERM or stdin closes; then print ``STATS``."""
    loop = asyncio.get_running_loop()
    delay = rtt_ms / 2000.0
    wait = delay - await calibrate(delay) if delay > 0 else 0.0
    server = await loop.create_server(lambda: _Client(max(wait, 0.0), target), host, port)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    class _Stdin(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            stop.set()

    await loop.connect_read_pipe(_Stdin, sys.stdin)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()  # open connections die with the process
    mean = _Stats.total / _Stats.chunks if _Stats.chunks else 0.0
    print(
        f"STATS chunks={_Stats.chunks} mean_one_way_ms={mean * 1e3:.3f} "
        f"max_one_way_ms={_Stats.worst * 1e3:.3f} timer_early_ms={(delay - wait) * 1e3:.3f}",
        flush=True,
    )


def run(target: tuple[str, int], rtt_ms: float) -> None:
    _fine_timer_slack()
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        loop.run_until_complete(serve(target, rtt_ms))
    finally:
        loop.close()


class LatencyProxy:
    """The proxy as a child process::

    with LatencyProxy(host, port, rtt_ms) as proxy:
        ...  # connect to 127.0.0.1:proxy.port
    proxy.stats  # {"chunks": ..., "mean_one_way_ms": ..., ...}: what it achieved
    """

    def __init__(self, target_host: str, target_port: int, rtt_ms: float) -> None:
        self.target = (target_host, target_port)
        self.rtt_ms = rtt_ms
        self.port: int | None = None
        self.stats: dict[str, float] = {}
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> LatencyProxy:
        host, port = self.target
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "--target", f"{host}:{port}", "--rtt-ms", str(self.rtt_ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.startswith("PORT "):
            self.__exit__()
            raise RuntimeError(f"the latency proxy did not start (it printed {line!r})")
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:  # communicate() closes the proxy's stdin: its signal to stop
            out, _ = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        for line in out.splitlines():
            if line.startswith("STATS "):
                self.stats = {
                    k: float(v) for k, v in (item.split("=", 1) for item in line.split()[1:])
                }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument(
        "--rtt-ms",
        type=float,
        required=True,
        help="round trip added (each direction is delayed by half)",
    )
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    run((host or "127.0.0.1", int(port)), args.rtt_ms)


if __name__ == "__main__":
    main()
