"""Helpers for the Service Bus backend tests: an emulator per test session (a real
child process on a free 127.0.0.1 port, spoken to through the official SDK), unique
queue names, and admin-client shortcuts."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from ai4s_jobq.emulator.client import admin_client_kwargs
from ai4s_jobq.emulator.process import EmulatorProcess

_names = itertools.count()


@pytest.fixture(scope="session")
def sb_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    emulator = EmulatorProcess(tmp_path_factory.mktemp("sb-emulator")).start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def sb_cs(sb_process: EmulatorProcess, monkeypatch: pytest.MonkeyPatch) -> str:
    """The session emulator's connection string; the jobq env is cleared."""
    for name in (
        "JOBQ_QUEUE",
        "JOBQ_CONNECTION_STRING",
        "JOBQ_DETERMINISTIC_IDS",
        "JOBQ_DEDUP_WINDOW",
    ):
        monkeypatch.delenv(name, raising=False)
    assert sb_process.connection_string
    return sb_process.connection_string


@pytest.fixture
def sb_queue() -> str:
    """A queue name no other test uses."""
    return f"q{next(_names)}-{uuid.uuid4().hex[:8]}"


def spec(queue: str) -> str:
    # The connection string's endpoint wins: the namespace part is deliberately bogus.
    return f"sb://anything/{queue}"


def admin(cs: str) -> Any:
    from azure.servicebus.aio.management import ServiceBusAdministrationClient

    return ServiceBusAdministrationClient.from_connection_string(cs, **admin_client_kwargs(cs))


async def create_queue(cs: str, name: str, **kwargs: Any) -> None:
    async with admin(cs) as client:
        await client.create_queue(name, **kwargs)


async def queue_properties(cs: str, name: str) -> Any:
    async with admin(cs) as client:
        return await client.get_queue(name)


async def runtime_counts(cs: str, name: str) -> tuple[int, int]:
    async with admin(cs) as client:
        props = await client.get_queue_runtime_properties(name)
    return props.active_message_count, props.dead_letter_message_count


def run_counts(cs: str, name: str) -> tuple[int, int]:
    return asyncio.run(runtime_counts(cs, name))


def short_lock_queue(cs: str, name: str, lock_seconds: float, **kwargs: Any) -> None:
    """Azure's minimum lock is 5 s and jobq refuses less; tests create shorter locks
    directly with the admin client to keep lock-expiry tests quick."""
    asyncio.run(
        create_queue(
            cs,
            name,
            requires_duplicate_detection=True,
            duplicate_detection_history_time_window=timedelta(hours=1),
            lock_duration=timedelta(seconds=lock_seconds),
            max_delivery_count=100,
            **kwargs,
        )
    )


def sb_env(cs: str, queue: str, **extra: str) -> dict[str, str]:
    tests_dir = str(Path(__file__).resolve().parent)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("JOBQ_") or k == "JOBQ_LOCAL_DIR"
    }
    env.update(
        {
            "JOBQ_CONNECTION_STRING": cs,
            "JOBQ_QUEUE": spec(queue),
            "PYTHONPATH": os.pathsep.join([tests_dir, str(ROOT)]),
        }
    )
    env.update(extra)
    return env


def jobq_sb(
    cs: str, queue: str, *args: str, input: str | None = None, timeout: float = 120, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ai4s_jobq_cli", *args],
        input=input,
        capture_output=True,
        text=True,
        env=sb_env(cs, queue, **extra),
        timeout=timeout,
        cwd=ROOT,
    )


def start_worker(cs: str, queue: str, *args: str, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ai4s_jobq_cli", "worker", *args],
        env=sb_env(cs, queue, **extra),
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
