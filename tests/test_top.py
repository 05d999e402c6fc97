"""``jobq top``: the frame rendered from a real queue's snapshot, ``--once`` (text and
JSON), and the live view in a real pseudo-terminal that quits on ``q`` and on Ctrl-C.
The queue is drained by a real worker recording into its real SQLite ledger."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import ROOT, jobq_cli
from dashboard_support import (
    DEAD_LETTERED,
    FAILURE_TEXT,
    QUEUED,
    SUCCEEDED,
    KnownOutcomes,
    make_known_outcomes,
)
from rich.console import Console

from ai4s_jobq import JobQ
from ai4s_jobq.dashboard.snapshot import QueueSource, collect
from ai4s_jobq.dashboard.top import render_top, sparkline


@pytest.fixture
async def known(local_dir: Path) -> AsyncIterator[KnownOutcomes]:
    async with JobQ.open("local://dash", check=False) as q:
        yield await make_known_outcomes(q)


def frame_text(renderable: object, width: int = 150) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(renderable)
    return console.export_text()


async def test_frame_shows_the_essentials(known: KnownOutcomes):
    await collect(known.source)  # a second depth sample for the sparkline
    text = frame_text(render_top(await collect(known.source)))
    assert f"active {QUEUED}" in text and f"dead-letter {DEAD_LETTERED}" in text
    assert "throughput" in text and "(ledger)" in text and "ETA" in text
    all_row = next(line for line in text.splitlines() if "all tasks" in line)
    assert all_row.replace("│", " ").split()[2:] == [
        str(QUEUED + SUCCEEDED + DEAD_LETTERED),
        str(QUEUED),
        "0",
        str(SUCCEEDED),
        "0",
        str(DEAD_LETTERED),
        "0",
    ]
    assert "run-1" in text and "run-2" in text
    assert "NonZeroExit" in text and FAILURE_TEXT in text
    assert "stopped" in text  # the worker said goodbye
    assert "n=4 median" in text
    assert "dead-letter queue: NonZeroExit ×2" in text
    assert "depth " in text and "q quit" in text


async def test_frame_without_ledger(known: KnownOutcomes):
    source = QueueSource("sb://ns/q", known.source.queue, None, "This queue has no ledger")
    text = frame_text(render_top(await collect(source)))
    assert f"active {QUEUED}" in text and "This queue has no ledger" in text
    assert "Outcomes" not in text and "Workers" not in text


def test_sparkline():
    assert sparkline([0, 1, 2, 4]) == "▁▂▄█"
    assert sparkline([]) == ""
    assert len(sparkline(range(100), width=10)) == 10


async def test_once_text_and_json(known: KnownOutcomes):
    text = jobq_cli("top", "--queue", "local://dash", "--once", timeout=60, check=True)
    assert f"active {QUEUED}" in text.stdout and "NonZeroExit" in text.stdout
    data = jobq_cli("top", "-q", "local://dash", "--once", "--json", timeout=60, check=True)
    (snap,) = json.loads(data.stdout)
    assert snap["counts"]["active"] == QUEUED
    assert snap["ledger"]["states"]["succeeded"] == SUCCEEDED
    assert snap["failures"][0]["reason"] == "NonZeroExit"
    usage = jobq_cli("top", "--json", timeout=60)
    assert usage.returncode == 2 and "--once" in usage.stderr


def test_missing_queue_fails_fast(local_dir: Path):
    result = jobq_cli("top", "--queue", "local://nothing-here", "--once", timeout=60)
    assert result.returncode == 4 and "does not exist" in result.stderr


ANSI = re.compile(rb"\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>78])")


class PtyRun:
    """``jobq top`` on a real pseudo-terminal (its controlling terminal, so Ctrl-C
    typed into it is a SIGINT, as in a real terminal)."""

    def __init__(self, *args: str):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 150, 0, 0))

        def controlling_tty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.process = subprocess.Popen(
            [sys.executable, "-m", "ai4s_jobq_cli", "top", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=ROOT,
            env={**os.environ, "TERM": "xterm-256color"},
            start_new_session=True,
            preexec_fn=controlling_tty,
        )
        os.close(slave)
        self.output = b""

    def read_until(self, needle: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                raise AssertionError(f"{needle!r} not seen; output so far: {self.text()[-2000:]!r}")
            ready, _, _ = select.select([self.master], [], [], min(remaining, 0.5))
            if ready:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:
                    break

    def text(self) -> bytes:
        """The output without terminal escape sequences (colours, cursor moves)."""
        return ANSI.sub(b"", self.output)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:
                    pass
        return self.process.wait(timeout=1)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


@pytest.mark.slow
@pytest.mark.parametrize("key", [b"q", b"\x03"], ids=["q", "ctrl-c"])
async def test_live_view_quits_on_key(known: KnownOutcomes, key: bytes):
    run = PtyRun("--queue", "local://dash", "--interval", "0.3")
    try:
        run.read_until(b"NonZeroExit")
        # It refreshes: a task pushed now shows up as one more active message.
        await known.source.queue.push("echo pushed while watching")
        run.read_until(f"active {QUEUED + 1}".encode())
        lflag = termios.tcgetattr(run.master)[3]
        assert not lflag & termios.ICANON  # keys are read one by one while it runs
        run.type(key)
        assert run.wait() == 0
        assert b"Traceback" not in run.output
        lflag = termios.tcgetattr(run.master)[3]
        assert lflag & termios.ICANON and lflag & termios.ECHO  # the terminal is restored
    finally:
        run.close()


@pytest.mark.slow
def test_live_view_quits_on_sigterm(known: KnownOutcomes):
    run = PtyRun("--queue", "local://dash", "--interval", "0.3")
    try:
        run.read_until(b"jobq top")
        run.process.send_signal(signal.SIGTERM)
        assert run.wait() == 0
    finally:
        run.close()


async def test_frame_names_every_watched_queue(known: KnownOutcomes):
    snap = await collect(known.source)
    names = ["local://a [x]", snap.name]
    text = frame_text(render_top(snap, names=names, selected=1), width=250)
    assert "1:local://a [x]" in text and f"2:{snap.name}" in text
    assert "1-9 queue" in text
