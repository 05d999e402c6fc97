"""A stand-in for the Application Insights ingestion endpoint on 127.0.0.1.

Azure Monitor cannot run here, so this small aiohttp app takes its place: the
Azure Monitor exporters POST JSON envelopes (gzip or not, one object or a list)
to ``<IngestionEndpoint>/v2.1/track``; it keeps them and answers as the service
does (``itemsReceived``/``itemsAccepted``).  Point a connection string's
``IngestionEndpoint`` at ``endpoint``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from typing import Any

from aiohttp import web


class AppInsightsReceiver:
    def __init__(self) -> None:
        self.envelopes: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def connection_string(self) -> str:
        return (
            "InstrumentationKey=00000000-0000-4000-8000-000000000000;"
            f"IngestionEndpoint=http://127.0.0.1:{self.port}/"
        )

    def items(self, base_type: str) -> list[dict[str, Any]]:
        """The ``data.baseData`` of every envelope of one type (RequestData, ...)."""
        with self._lock:
            return [
                e["data"]["baseData"]
                for e in self.envelopes
                if e.get("data", {}).get("baseType") == base_type
            ]

    def __enter__(self) -> AppInsightsReceiver:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("receiver did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self._track)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    async def _track(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip" or body[:2] == b"\x1f\x8b":
            body = gzip.decompress(body)
        text = body.decode("utf-8").strip()
        parsed: Any = (
            json.loads(text)
            if text.startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
        with self._lock:
            self.paths.append(request.path)
            self.envelopes.extend(parsed)
        count = len(parsed)
        return web.json_response({"itemsReceived": count, "itemsAccepted": count, "errors": []})
