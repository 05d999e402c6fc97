"""Pytest plugin: the local Service Bus emulator on a free 127.0.0.1 port.

* ``sb_emulator``: a fresh in-process emulator (background threads) per test, with
  its own data directory; ``.restart()`` stops it and starts it again on the same
  port with the same data dir and key.
* ``sb_emulator_shared``: one in-process emulator for a whole test module (tests
  make their own uniquely named queues), which keeps the suite fast.
* ``sb_emulator_process``: the emulator as a child process (``kill()`` is SIGKILL).
* ``sb_emulator_aad``: like ``sb_emulator``, also accepting Azure AD tokens signed
  with ``handle.aad_trust_key`` (give it to a fake token endpoint, see
  ``aad_support``).

Each yields an :class:`EmulatorHandle` with ``connection_string``, ``host``,
``port``, ``ca_path``, ``data_dir``, ``stop()``, ``restart()`` and helpers to make
queues through the real ``ServiceBusAdministrationClient``.
"""

from __future__ import annotations

import datetime
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("proton")

from azure.servicebus.management import ServiceBusAdministrationClient  # noqa: E402

from ai4s_jobq.emulator.client import admin_client_kwargs  # noqa: E402
from ai4s_jobq.emulator.process import EmulatorProcess  # noqa: E402
from ai4s_jobq.emulator.server import EmulatorServer  # noqa: E402


@dataclass
class EmulatorHandle:
    data_dir: Path
    server: EmulatorServer | None = None
    process: EmulatorProcess | None = None
    aad_trust_key: str | None = None

    @property
    def connection_string(self) -> str:
        if self.server is not None:
            return self.server.connection_string
        assert self.process is not None and self.process.connection_string
        return self.process.connection_string

    @property
    def host(self) -> str:
        return self.server.host if self.server is not None else self.process.host  # type: ignore[union-attr]

    @property
    def port(self) -> int:
        return self.server.port if self.server is not None else self.process.port  # type: ignore[union-attr]

    @property
    def ca_path(self) -> Path:
        from ai4s_jobq.emulator.client import ca_path_for

        return ca_path_for(self.host, self.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.process is not None:
            self.process.stop()

    def kill(self) -> None:
        assert self.process is not None, "kill() needs the subprocess emulator"
        self.process.kill()

    def restart(self) -> None:
        if self.process is not None:
            self.process.restart()
            return
        assert self.server is not None
        port = self.server.port
        self.server.stop()
        self.server = EmulatorServer(
            self.data_dir, port=port, aad_trust_key=self.aad_trust_key
        ).start()

    # ------------------------------------------------------------------ helpers

    def admin(self) -> ServiceBusAdministrationClient:
        return ServiceBusAdministrationClient.from_connection_string(
            self.connection_string, **admin_client_kwargs(self.connection_string)
        )

    def create_queue(self, name: str | None = None, **settings: Any) -> str:
        """Create a queue through the admin client; durations may be given in seconds."""
        name = name or f"q-{uuid.uuid4().hex[:10]}"
        for key in (
            "lock_duration",
            "duplicate_detection_history_time_window",
            "default_message_time_to_live",
        ):
            if isinstance(settings.get(key), (int, float)):
                settings[key] = datetime.timedelta(seconds=settings[key])
        with self.admin() as admin:
            admin.create_queue(name, **settings)
        return name


@contextmanager
def running_emulator(data_dir: Path, aad_trust_key: str | None = None) -> Iterator[EmulatorHandle]:
    """An in-process emulator on a free 127.0.0.1 port, stopped when the block ends."""
    handle = EmulatorHandle(data_dir, aad_trust_key=aad_trust_key)
    handle.server = EmulatorServer(data_dir, port=0, aad_trust_key=aad_trust_key).start()
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def sb_emulator(tmp_path: Path) -> Iterator[EmulatorHandle]:
    with running_emulator(tmp_path / "sb-emulator") as handle:
        yield handle


@pytest.fixture
def sb_emulator_aad(tmp_path: Path) -> Iterator[EmulatorHandle]:
    """Also trusts Azure AD tokens signed with its (random) ``aad_trust_key``."""
    with running_emulator(tmp_path / "sb-emulator", secrets.token_urlsafe(32)) as handle:
        yield handle


@pytest.fixture(scope="module")
def sb_emulator_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorHandle]:
    with running_emulator(tmp_path_factory.mktemp("sb-emulator")) as handle:
        yield handle


@pytest.fixture
def sb_emulator_process(tmp_path: Path) -> Iterator[EmulatorHandle]:
    handle = EmulatorHandle(tmp_path / "sb-emulator")
    handle.process = EmulatorProcess(handle.data_dir).start()
    try:
        yield handle
    finally:
        if handle.process is not None:
            handle.process.stop()
