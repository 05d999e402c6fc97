"""Task functions used by the worker tests (``--proc sample_tasks:NAME``)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path


def record(log: str, name: str, seconds: float = 0.0) -> None:
    """Append start/end lines (with the worker's pid) to ``log``."""
    with open(log, "a") as f:
        f.write(f"start {name} {os.getpid()} {time.time()}\n")
    time.sleep(seconds)
    with open(log, "a") as f:
        f.write(f"end {name} {os.getpid()} {time.time()}\n")


async def async_record(log: str, name: str, seconds: float = 0.0) -> None:
    with open(log, "a") as f:
        f.write(f"start {name} {os.getpid()} {time.time()}\n")
    await asyncio.sleep(seconds)
    with open(log, "a") as f:
        f.write(f"end {name} {os.getpid()} {time.time()}\n")


def fail(message: str = "boom") -> None:
    raise RuntimeError(message)


def noop(**_: object) -> None:
    return None


def touch_then_sleep(marker: str, seconds: float) -> None:
    Path(marker).write_text("started")
    time.sleep(seconds)


def hang_first_time(marker: str, log: str) -> None:
    """First attempt: mark and hang (to be killed); later attempts: succeed."""
    with open(log, "a") as f:
        f.write(f"attempt {os.getpid()}\n")
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        time.sleep(600)


def legacy_record(path: str, value: object, **rest: object) -> None:
    """Append one JSON line per call (a Python task queued by ai4s-jobq)."""
    import json

    from ai4s_jobq import current_task

    context = current_task()
    line = {"value": value, "rest": rest, "id": context and context.task_id}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def fail_first(log: str, marker: str) -> None:
    """Record ``attempt interruptions`` (from current_task()); fail while ``marker`` is
    absent (creating it), succeed after."""
    from ai4s_jobq import current_task

    context = current_task()
    assert context is not None
    with open(log, "a") as f:
        f.write(f"{context.attempt} {context.interruptions}\n")
    if not os.path.exists(marker):
        Path(marker).write_text("failed once")
        raise RuntimeError("first attempt fails")


def raise_permanent(message: str = "input is corrupt") -> None:
    from ai4s_jobq import PermanentError

    raise PermanentError(message)


def import_missing() -> None:
    import ai4s_jobq_module_that_does_not_exist  # noqa: F401


def exit_task(how: str) -> None:
    """Leave in a way that must not take the worker with it."""
    import sys

    if how == "sys.exit":
        sys.exit(3)
    if how == "KeyboardInterrupt":
        raise KeyboardInterrupt
    if how == "SystemExit":
        raise SystemExit("bye")
    if how == "GeneratorExit":
        raise GeneratorExit
    if how == "close-stdout":
        sys.stdout.close()
        return


def print_env(log: str, names: list[str]) -> None:
    with open(log, "w") as f:
        for name in names:
            f.write(f"{name}={os.environ.get(name, '<unset>')}\n")


def dispatch_exit_or_record(**args: object) -> None:
    if "how" in args:
        exit_task(str(args["how"]))
    else:
        record(str(args["log"]), str(args["name"]))


def frozen_objects() -> int:
    """How many objects the garbage collector leaves alone (``gc.freeze``)."""
    import gc

    return gc.get_freeze_count()
