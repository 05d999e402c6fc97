"""Run the emulator as a child process (``python -m ai4s_jobq.emulator``).

Tests that must kill the broker hard (``kill()`` sends SIGKILL) or restart it use
this form.  The data directory keeps the SAS key and the port, so ``restart()``
comes back on the same port with the same key and the same connection string,
and messages survive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from . import client
from .client import AAD_TRUST_KEY_ENV

STARTUP_TIMEOUT = 30.0


class EmulatorStartError(RuntimeError):
    pass


class EmulatorProcess:
    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        host: str = "127.0.0.1",
        aad_trust_key: str | None = None,
    ):
        self.data_dir = Path(data_dir)
        #: passed through the environment, not argv, so it is not in process listings
        self.aad_trust_key = aad_trust_key
        self.host = host
        self.port = port or 0  # 0: let the child pick a free port on the first start
        self.connection_string: str | None = None
        self._proc: subprocess.Popen[str] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> EmulatorProcess:
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "emulator.log", "a")  # noqa: SIM115 - owned by the child
        cmd = [
            sys.executable,
            "-m",
            "ai4s_jobq.emulator",
            "--data",
            str(self.data_dir),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--log-level",
            "INFO",
        ]
        env = dict(os.environ)
        env.pop(AAD_TRUST_KEY_ENV, None)
        if self.aad_trust_key is not None:
            env[AAD_TRUST_KEY_ENV] = self.aad_trust_key
        self._proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        log.close()
        line = self._first_line(self._proc, STARTUP_TIMEOUT)
        if not line.startswith("Endpoint="):
            self.kill()
            raise EmulatorStartError(
                f"the emulator did not start (see {self.data_dir / 'emulator.log'})"
            )
        self.connection_string = line.strip()
        self.host, self.port = client.emulator_endpoint(self.connection_string)
        return self

    @staticmethod
    def _first_line(proc: subprocess.Popen[str], timeout: float) -> str:
        result: list[str] = []
        reader = threading.Thread(
            target=lambda: result.append(proc.stdout.readline() if proc.stdout else ""),
            daemon=True,
        )
        reader.start()
        reader.join(timeout)
        return result[0] if result else ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (SIGKILL if it does not exit in ``timeout``)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._close()

    def kill(self) -> None:
        """SIGKILL: the broker dies without any chance to clean up."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close()

    def restart(self) -> EmulatorProcess:
        self.stop()
        return self.start()

    def _close(self) -> None:
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()
        self._proc = None

    # ------------------------------------------------------------------ info

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def ca_path(self) -> Path:
        return client.ca_path_for(self.host, self.port)

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
