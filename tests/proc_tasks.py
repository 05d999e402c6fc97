"""Task code for the processor tests (``--proc proc_tasks:NAME``): lifecycle classes,
crashes, sleeps and GPU recorders.  Classes take no constructor arguments, so where
they write is given by the ``PROC_TASKS_LOG`` environment variable."""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from pathlib import Path

from ai4s_jobq.worker.context import current_task


def _log(line: str) -> None:
    with open(os.environ["PROC_TASKS_LOG"], "a") as f:
        f.write(line + "\n")


class Counting:
    """Records setup/teardown (with the pid) and each call."""

    def setup(self) -> None:
        _log(f"setup {os.getpid()}")
        self.ready = True

    def teardown(self) -> None:
        _log(f"teardown {os.getpid()}")

    def __call__(self, i: int) -> int:
        assert self.ready
        _log(f"call {os.getpid()} {i}")
        return i * 2


class AsyncCounting:
    async def setup(self) -> None:
        await asyncio.sleep(0)
        _log(f"setup {os.getpid()}")

    async def teardown(self) -> None:
        _log(f"teardown {os.getpid()}")

    async def __call__(self, i: int) -> int:
        await asyncio.sleep(0)
        return i + 1


class FailingSetup:
    def setup(self) -> None:
        raise RuntimeError("no model file")

    def __call__(self) -> None:
        pass


def sleep_sync(seconds: float, marker: str | None = None) -> None:
    if marker:
        Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)


def exit_hard(code: int = 1) -> None:
    os._exit(code)


def segfault() -> None:
    ctypes.string_at(0)


def fail_value(text: str = "bad input 42") -> None:
    raise ValueError(text)


def noop(**_: object) -> None:
    return None


def whoami(i: int) -> dict[str, object]:
    context = current_task()
    return {
        "pid": os.getpid(),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpus": list(context.gpus) if context else None,
        "task_id": context.task_id if context else None,
    }


async def gpu_interval(i: int, seconds: float = 0.0) -> None:
    """Append ``gpus start end`` for the overlap check."""
    context = current_task()
    assert context is not None
    start = time.monotonic()
    await asyncio.sleep(seconds)
    _log(f"{','.join(context.gpus)} {start} {time.monotonic()}")


def checkpoint_on_sigterm(checkpoint: str, marker: str) -> None:
    import signal
    import sys

    def save(signum: int, frame: object) -> None:
        Path(checkpoint).write_text("saved")
        sys.exit(0)

    signal.signal(signal.SIGTERM, save)
    Path(marker).write_text(str(os.getpid()))
    time.sleep(60)


def kill_self(signum: int = 9) -> None:
    """What the kernel's OOM killer does to a process."""
    os.kill(os.getpid(), signum)


def echo(payload: str, repeat: int = 1) -> str:
    return payload * repeat


def ignore_sigterm(marker: str) -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(marker).write_text(str(os.getpid()))
    time.sleep(60)


def fork_then_exit(marker: str) -> None:
    """Crash while a forked grandchild (holding the pool's pipes) lives on."""
    pid = os.fork()
    if pid == 0:
        Path(marker).write_text(str(os.getpid()))
        time.sleep(60)
        os._exit(0)
    while not Path(marker).exists():
        time.sleep(0.01)
    os._exit(1)
