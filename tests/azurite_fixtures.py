"""Pytest plugin: a real Azurite (Azure Storage emulator) for the Storage Queue tests.

Azurite is pinned in the repository's ``package.json``/``package-lock.json``.  On a
fresh machine the ``azurite`` fixture runs ``npm ci`` itself (once; it needs Node
and the npm registry), then starts queue + table + blob on free 127.0.0.1 ports
with in-memory persistence and stops it when the session ends.  So plain
``pytest`` works; nothing else has to be installed first.

``JOBQ_AZURITE_CONNECTION_STRING`` points the tests at an Azurite you run yourself
(see docs/storage-queue.md) instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from ai4s_jobq.backends.base import QueueSettings
from ai4s_jobq.backends.storage.backend import StorageQueueBackend

OpenBackend = Callable[..., AbstractAsyncContextManager[StorageQueueBackend]]

ROOT = Path(__file__).resolve().parent.parent
AZURITE_BIN = ROOT / "node_modules" / ".bin" / "azurite"
ACCOUNT = "devstoreaccount1"
# Azurite's fixed, publicly documented development key (not a secret).
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
EXTERNAL_ENV = "JOBQ_AZURITE_CONNECTION_STRING"


def connection_string(
    queue_port: int,
    table_port: int,
    blob_port: int,
    key: str = ACCOUNT_KEY,
    host: str = "127.0.0.1",
    scheme: str = "http",
) -> str:
    return (
        f"DefaultEndpointsProtocol={scheme};AccountName={ACCOUNT};AccountKey={key};"
        f"QueueEndpoint={scheme}://{host}:{queue_port}/{ACCOUNT};"
        f"TableEndpoint={scheme}://{host}:{table_port}/{ACCOUNT};"
        f"BlobEndpoint={scheme}://{host}:{blob_port}/{ACCOUNT};"
    )


@dataclass
class Azurite:
    connection_string: str
    queue_port: int
    table_port: int
    blob_port: int
    host: str = "127.0.0.1"
    scheme: str = "http"  # "https" when started with a certificate (OAuth)

    def connection_string_with_key(self, key: str) -> str:
        return connection_string(
            self.queue_port, self.table_port, self.blob_port, key, self.host, self.scheme
        )

    def service_url(self, service: str) -> str:
        """``https://127.0.0.1:PORT/devstoreaccount1`` (path-style) for "queue"/"table"."""
        port = {"queue": self.queue_port, "table": self.table_port, "blob": self.blob_port}
        return f"{self.scheme}://{self.host}:{port[service]}/{ACCOUNT}"


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: all held open until all are chosen.  (One at a
    time, the kernel may hand out a port it just took back: Azurite then found its
    queue and table services on the same port and exited, EADDRINUSE.)"""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def install_azurite() -> Path:
    """``npm ci`` from the pinned lock file unless node_modules already has Azurite."""
    if AZURITE_BIN.exists():
        return AZURITE_BIN
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail(
            "the Storage Queue tests need Node.js and npm to install Azurite "
            "(package.json pins it); install Node 18+ and rerun"
        )
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0 or not AZURITE_BIN.exists():
        pytest.fail(
            f"`npm ci` failed to install Azurite (exit {result.returncode}):\n"
            f"{result.stderr[-3000:]}"
        )
    return AZURITE_BIN


def _wait_for_ports(
    process: subprocess.Popen, ports: list[int], log: Path, timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        if process.poll() is not None:
            pytest.fail(f"Azurite exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(
                f"Azurite did not listen on {pending} within {timeout:.0f} s:\n"
                f"{log.read_text()[-3000:]}"
            )
        try:
            with socket.create_connection(("127.0.0.1", pending[0]), timeout=0.5):
                pending.pop(0)
        except OSError:
            time.sleep(0.1)


def start_azurite(
    workdir: Path, *, oauth_cert: tuple[Path, Path] | None = None, debug_log: Path | None = None
) -> tuple[subprocess.Popen, Azurite, Path]:
    """Start Azurite on free 127.0.0.1 ports, in memory.

    ``oauth_cert=(cert.pem, key.pem)`` serves HTTPS with that certificate and
    accepts Azure AD bearer tokens (``--oauth basic``: Azurite checks a token's
    lifetime, issuer and audience, not its signature; it allows bearer tokens
    only over HTTPS).  ``debug_log`` makes Azurite log every request there
    (headers included, so it holds tokens: keep it in a private temporary
    directory)."""
    binary = install_azurite()
    queue_port, table_port, blob_port = free_ports(3)
    log = workdir / "azurite.log"
    command = [
        str(binary),
        "--silent",
        "--inMemoryPersistence",
        "--skipApiVersionCheck",
        "--loose",
        "--disableTelemetry",  # no phoning home from tests (and CI has no internet)
        "--queueHost",
        "127.0.0.1",
        "--queuePort",
        str(queue_port),
        "--tableHost",
        "127.0.0.1",
        "--tablePort",
        str(table_port),
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(blob_port),
    ]
    if oauth_cert is not None:
        command += ["--oauth", "basic", "--cert", str(oauth_cert[0]), "--key", str(oauth_cert[1])]
    if debug_log is not None:
        command += ["--debug", str(debug_log)]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    _wait_for_ports(process, [queue_port, table_port, blob_port], log)
    scheme = "https" if oauth_cert is not None else "http"
    emulator = Azurite(
        connection_string(queue_port, table_port, blob_port, scheme=scheme),
        queue_port,
        table_port,
        blob_port,
        scheme=scheme,
    )
    return process, emulator, log


def stop_azurite(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()  # Azurite waits for idle keep-alive sockets; don't wait long
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _external(connection: str) -> Azurite:
    parts = dict(p.split("=", 1) for p in connection.split(";") if "=" in p)

    def port(key: str) -> int:
        return int(parts.get(key, "http://127.0.0.1:0/").split(":")[2].split("/")[0])

    return Azurite(connection, port("QueueEndpoint"), port("TableEndpoint"), port("BlobEndpoint"))


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """A running Azurite for the whole session."""
    external = os.environ.get(EXTERNAL_ENV)
    if external:
        yield _external(external)
        return
    workdir = Path(tempfile.mkdtemp(prefix="jobq-azurite-"))
    process, emulator, _ = start_azurite(workdir)
    try:
        yield emulator
    finally:
        stop_azurite(process)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def storage_queue_name() -> str:
    """A fresh, valid queue name per test (Azurite is shared by the session)."""
    return f"t{uuid.uuid4().hex[:20]}"


@pytest.fixture
def storage_env(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for subprocesses (``jobq`` CLI, workers) talking to Azurite."""
    monkeypatch.setenv("JOBQ_CONNECTION_STRING", azurite.connection_string)
    env = dict(os.environ)
    env["JOBQ_CONNECTION_STRING"] = azurite.connection_string
    env.setdefault("PYTHONPATH", str(ROOT))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture
def open_backend(azurite, storage_queue_name) -> OpenBackend:
    """``async with open_backend(lock=2, window=...) as b`` — the test's queue, created."""

    @asynccontextmanager
    async def opener(
        *,
        lock: float = 30,
        window: timedelta | None = timedelta(days=7),
        max_delivery: int = 2000,
        create: bool = True,
        connection_string: str | None = None,
    ) -> AsyncIterator[StorageQueueBackend]:
        backend = StorageQueueBackend.from_spec(
            None,
            storage_queue_name,
            connection_string or azurite.connection_string,
            dedup_window=None,
        )
        async with backend:
            if create:
                await backend.ensure_queue(
                    QueueSettings(
                        dedup_window=window or timedelta(0),
                        duplicate_detection=window is not None,
                        lock_duration=timedelta(seconds=lock),
                        max_delivery_count=max_delivery,
                    )
                )
            yield backend

    return opener
