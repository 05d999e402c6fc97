"""Shared fixtures.  Backend-specific fixtures live in their own plugin modules
(``emulator_fixtures``, ``azurite_fixtures``), loaded here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

pytest_plugins = [
    name
    for name in ("emulator_fixtures", "azurite_fixtures")
    if (Path(__file__).parent / f"{name}.py").exists()
]


@pytest.fixture
def local_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private JOBQ_LOCAL_DIR, so local:// queues never touch the user's data."""
    directory = tmp_path / "jobq-data"
    monkeypatch.setenv("JOBQ_LOCAL_DIR", str(directory))
    monkeypatch.delenv("JOBQ_QUEUE", raising=False)
    monkeypatch.delenv("JOBQ_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("JOBQ_DETERMINISTIC_IDS", raising=False)
    monkeypatch.delenv("JOBQ_DEDUP_WINDOW", raising=False)
    return directory


def jobq_cli(
    *args: str,
    input: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``jobq`` console entry point in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "ai4s_jobq_cli", *args],
        input=input,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"jobq {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture
def jobq():
    return jobq_cli


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it is truthy (an event we cannot await directly, such as
    a file written by another process); fail after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def worker_env(local_dir: Path) -> dict[str, str]:
    """Environment for subprocess workers that import ``sample_tasks``."""
    tests_dir = str(Path(__file__).resolve().parent)
    return {"JOBQ_LOCAL_DIR": str(local_dir), "PYTHONPATH": os.pathsep.join([tests_dir, str(ROOT)])}


def free_port_url() -> str:
    """An http:// address on 127.0.0.1 where nothing listens (connections are refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
