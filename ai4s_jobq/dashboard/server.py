"""The ``jobq dashboard`` web server: aiohttp, server-rendered pages, no external assets.

Routes (``?q=N`` picks the N-th queue when several are watched):

* ``/`` — the page; ``/fragment`` — its ``<main>`` part, for the in-place refresh;
* ``/task/ID`` — one task's ledger record; ``/api/task/ID`` — the same as JSON;
* ``/api/snapshot`` — everything the page shows, as JSON;
* ``/static/…`` — the stylesheet and the small refresh script (shipped in the package);
* ``/healthz``.

Why aiohttp: it is already a dependency of the library (no new server stack), it serves
static files and runs the depth sampler in the same event loop as the queue clients.

Pages never wait for the ledger: a background gatherer per queue keeps a fresh
snapshot (every ``refresh_seconds`` while someone has looked in the last
:data:`VIEWER_IDLE_SECONDS`), and requests render the latest one — so a page costs
its rendering (milliseconds) however large the ledger, and many open tabs cost one
set of queries per refresh, not one per tab.  Gathering over a large ledger can take
seconds (``bench/bench_dashboard.py`` measures both); the gatherer then waits
:data:`GATHER_DUTY` times as long as the last gathering took before the next, so it
never keeps the ledger busy more than a fraction of the time.  Only the very first
request waits for the first snapshot.  A second background task samples the queue
counts every ``sample_seconds`` so the depth chart has history even when nobody is
looking.

The server has no authentication: it binds to 127.0.0.1 unless told otherwise (the CLI
requires ``--allow-remote`` for anything else and warns), and it sends a strict
Content-Security-Policy (only its own script and stylesheet run).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from ..durations import check_interval
from . import render
from .snapshot import QueueSnapshot, QueueSource, collect

log = logging.getLogger("ai4s_jobq.dashboard")

STATIC_DIR = Path(__file__).resolve().parent / "static"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


#: gather snapshots while a page, fragment or API request came this recently
VIEWER_IDLE_SECONDS = 120.0
#: wait at least this many times the last gathering's duration before the next
GATHER_DUTY = 4.0


@dataclass
class _Cached:
    snapshot: QueueSnapshot | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    last_viewed: float = 0.0
    gather_seconds: float = 0.0


class Dashboard:
    """The web application over a list of queue sources."""

    def __init__(
        self,
        sources: list[QueueSource],
        *,
        refresh_seconds: float = 5.0,
        sample_seconds: float = 5.0,
    ):
        if not sources:
            raise ValueError("the dashboard needs at least one queue")
        check_interval("refresh_seconds", refresh_seconds)
        check_interval("sample_seconds", sample_seconds)
        self.sources = sources
        self.refresh_seconds = refresh_seconds
        self.sample_seconds = sample_seconds
        self._cache = [_Cached() for _ in sources]
        self._background: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self.app = self._make_app()

    # ------------------------------------------------------------------ data

    async def snapshot(self, index: int) -> QueueSnapshot:
        """The latest snapshot of queue ``index`` (waits only for the first one)."""
        cached = self._cache[index]
        cached.last_viewed = time.monotonic()
        await cached.ready.wait()
        assert cached.snapshot is not None
        return cached.snapshot

    async def _gather_forever(self, index: int) -> None:
        cached = self._cache[index]
        while True:
            started = time.monotonic()
            try:
                cached.snapshot = await collect(self.sources[index])
            except Exception:  # collect reports failures in the snapshot; this is a bug
                log.exception("gathering a snapshot of %s failed", self.sources[index].name)
            if cached.snapshot is not None:
                cached.ready.set()
            cached.gather_seconds = time.monotonic() - started
            await asyncio.sleep(max(self.refresh_seconds, GATHER_DUTY * cached.gather_seconds))
            while time.monotonic() - cached.last_viewed > VIEWER_IDLE_SECONDS:
                await asyncio.sleep(0.5)  # nobody is looking: only the sampler runs

    async def _sample_forever(self) -> None:
        while True:
            for source in self.sources:
                try:
                    await source.read_counts()
                except Exception as exc:  # shown on the page by the next snapshot
                    log.debug("sampling %s failed: %s", source.name, exc)
            await asyncio.sleep(self.sample_seconds)

    # ------------------------------------------------------------------ HTTP

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[_security_headers])
        app.router.add_get("/", self._page)
        app.router.add_get("/fragment", self._fragment)
        app.router.add_get("/api/snapshot", self._api_snapshot)
        app.router.add_get("/task/{task_id}", self._task_page)
        app.router.add_get("/api/task/{task_id}", self._api_task)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_static("/static", STATIC_DIR)
        return app

    def _selected(self, request: web.Request) -> int:
        raw = request.query.get("q", "0")
        try:
            index = int(raw)
        except ValueError:
            index = -1
        if not 0 <= index < len(self.sources):
            raise web.HTTPNotFound(
                text=render.render_message(
                    "no such queue", f"There is no queue number {raw!s} on this dashboard."
                ),
                content_type="text/html",
            )
        return index

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    async def _page(self, request: web.Request) -> web.Response:
        index = self._selected(request)
        snap = await self.snapshot(index)
        html = render.render_page(self.names, index, snap, self.refresh_seconds)
        return web.Response(text=html, content_type="text/html")

    async def _fragment(self, request: web.Request) -> web.Response:
        index = self._selected(request)
        snap = await self.snapshot(index)
        html = render.render_main(self.names, index, snap, self.refresh_seconds)
        response = web.Response(text=html, content_type="text/html")
        response.headers["X-Snapshot-Time"] = render._when(snap.taken_at)
        return response

    async def _api_snapshot(self, request: web.Request) -> web.Response:
        snap = await self.snapshot(self._selected(request))
        return web.json_response(snap.as_dict(), dumps=_dumps)

    async def _record(self, request: web.Request):  # type: ignore[no-untyped-def]
        index = self._selected(request)
        task_id = request.match_info["task_id"]
        ledger = self.sources[index].ledger
        if ledger is None:
            return index, task_id, None, "this queue has no ledger"
        records = await ledger.get([task_id])
        return index, task_id, records.get(task_id), None

    async def _task_page(self, request: web.Request) -> web.Response:
        index, task_id, record, problem = await self._record(request)
        if problem:
            html = render.render_message("no ledger", f"Task {task_id}: {problem}.")
            return web.Response(text=html, content_type="text/html", status=404)
        html = render.render_task(self.sources[index].name, index, record, task_id)
        return web.Response(text=html, content_type="text/html", status=200 if record else 404)

    async def _api_task(self, request: web.Request) -> web.Response:
        _, task_id, record, problem = await self._record(request)
        if record is None:
            return web.json_response(
                {"id": task_id, "error": problem or "the ledger has no record of this task"},
                status=404,
            )
        return web.json_response(record.as_dict(), dumps=_dumps)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve on ``host:port`` (0 = a free port); returns the bound port."""
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self._background = [asyncio.create_task(self._sample_forever())] + [
            asyncio.create_task(self._gather_forever(i)) for i in range(len(self.sources))
        ]
        server = site._server  # aiohttp keeps the asyncio server private
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._background = []
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@web.middleware
async def _security_headers(request: web.Request, handler):  # type: ignore[no-untyped-def]
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if isinstance(response, web.HTTPException):
        raise response
    return response


def _dumps(data: object) -> str:
    return json.dumps(data, default=str)
