"""What runs a task: a shell command or a Python callable.

A processor is an async callable ``(task) -> None`` that raises
:class:`TaskFailed` when the task did not succeed.  Cancellation (lost lock,
shutdown) must stop the work: the shell processor kills the command's whole
process group.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from ..redact import redact
from ..task import Task
from .context import current_task
from .permanent import PERMANENT_REASON, is_permanent
from .sync_calls import run_sync
from .task_env import task_environment

log = logging.getLogger("ai4s_jobq.task")

Processor = Callable[[Task], Awaitable[Any]]  # returns a Python task's result

STDERR_TAIL_LINES = 20
STDERR_TAIL_CHARS = 2000
KILL_GRACE_SECONDS = 5.0


class TaskFailed(Exception):
    """The task ran and failed; ``description`` says how (exit code, stderr tail)."""

    def __init__(
        self,
        reason: str,
        description: str,
        *,
        exit_code: int | None = None,
        permanent: bool = False,
    ):
        super().__init__(f"{reason}: {description}")
        self.reason = reason
        self.description = description
        self.exit_code = exit_code
        self.permanent = permanent  # retrying cannot help: dead-letter at once


class ShellProcessor:
    """Runs ``args["cmd"]`` with ``/bin/sh -c`` in its own process group.

    ``args["env"]`` adds environment variables; ``args["cwd"]`` sets the working
    directory.  Output lines go to the ``ai4s_jobq.task`` logger tagged with the
    task ID; the tail of stderr is kept for the dead-letter description.
    """

    def __init__(self, *, kill_grace: float = KILL_GRACE_SECONDS, pass_env: tuple[str, ...] = ()):
        self.kill_grace = kill_grace
        self.pass_env = pass_env  # credential variables the task may still see

    async def __call__(self, task: Task) -> None:
        cmd = task.args.get("cmd")
        if not isinstance(cmd, str) or not cmd:
            raise TaskFailed(
                PERMANENT_REASON, "a shell task needs a 'cmd' string argument", permanent=True
            )
        env = task_environment(self.pass_env)
        extra_env = task.args.get("env") or {}
        if not isinstance(extra_env, dict):
            raise TaskFailed(
                PERMANENT_REASON, "a shell task's 'env' must be an object", permanent=True
            )
        env.update({str(k): str(v) for k, v in extra_env.items()})
        context = current_task()
        env.update(context.env() if context is not None else {"JOBQ_TASK_ID": task.id})
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=task.args.get("cwd") or None,
            start_new_session=True,  # its own process group, so we can kill all of it
        )
        tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        assert proc.stdout is not None and proc.stderr is not None
        readers = [
            asyncio.ensure_future(_stream(proc.stdout, task.id, logging.INFO, None)),
            asyncio.ensure_future(_stream(proc.stderr, task.id, logging.WARNING, tail)),
        ]
        try:
            code = await proc.wait()
            await asyncio.gather(*readers)
        except asyncio.CancelledError:
            await self._kill(proc)
            for reader in readers:
                reader.cancel()
            raise
        if code != 0:
            stderr_tail = "\n".join(tail)[-STDERR_TAIL_CHARS:]
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            raise TaskFailed(
                "NonZeroExit",
                how + (f"; stderr tail:\n{stderr_tail}" if stderr_tail else ""),
                exit_code=code,
            )

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM the group, then SIGKILL it if it has not gone within the grace (the
        loop's, e.g. bounded by a preemption deadline, else our own)."""
        context = current_task()
        grace = self.kill_grace
        if context is not None and context.stop.grace is not None:
            grace = context.stop.grace
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            if wait is None:
                break
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), wait)
                return
            except asyncio.TimeoutError:
                continue
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:
            log.error("process group %s did not die after SIGKILL", proc.pid)


async def _stream(
    stream: asyncio.StreamReader, task_id: str, level: int, tail: collections.deque[str] | None
) -> None:
    while True:
        line = await stream.readline()
        if not line:
            return
        text = redact(line.decode("utf-8", "replace").rstrip("\n"))
        if tail is not None:
            tail.append(text)
        log.log(level, "[%s] %s", task_id, text)


class CallableProcessor:
    """Calls a Python function with the task's arguments as keyword arguments.

    Async functions are awaited; sync ones run in a thread so lock renewal keeps
    going (a sync function cannot be interrupted: on cancellation the worker stops
    waiting for it and does not settle the message).
    """

    def __init__(self, function: Callable[..., Any]):
        self.function = function
        self.is_async = inspect.iscoroutinefunction(function)

    async def __call__(self, task: Task) -> Any:
        try:
            if self.is_async:
                result = await self.function(**task.args)
            else:
                result = await run_sync(self.function, task.args)
        except (asyncio.CancelledError, TaskFailed):
            raise
        except BaseException as exc:
            # A task's own error -- even sys.exit(), KeyboardInterrupt, GeneratorExit --
            # is a failed task, not a dead worker.
            _restore_std_streams()
            if is_permanent(exc):
                raise TaskFailed(PERMANENT_REASON, _exception_text(exc), permanent=True) from None
            raise TaskFailed(type(exc).__name__, _exception_text(exc)) from None
        if _restore_std_streams():
            raise TaskFailed("ClosedStream", "the task closed the worker's stdout or stderr")
        return result


def _restore_std_streams() -> bool:
    """Reopen stdout/stderr if an in-process task closed (or removed) them, so the
    worker can still log and print; True if it had to."""
    restored = False
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if stream is None or stream.closed:
            setattr(sys, name, open(fd, "w", closefd=False, encoding="utf-8", errors="replace"))
            restored = True
    if restored:
        # Handlers created with the old stream (e.g. logging.StreamHandler) follow.
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(
                handler.stream, "closed", False
            ):
                handler.setStream(sys.stderr)
    return restored


def _exception_text(exc: BaseException) -> str:
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return redact(text)[-STDERR_TAIL_CHARS:]


def load_callable(reference: str) -> Callable[..., Any]:
    """Import ``module:function`` (or ``module.function``), looking in the working
    directory too."""
    module_name, sep, attr = reference.partition(":")
    if not sep:
        module_name, _, attr = reference.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{reference!r} is not module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        # Like `python -m`, find the user's modules in the working directory; a
        # console script otherwise only sees its own bin directory.
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise ValueError(f"{reference!r} is not callable")
    return target


def make_processor(reference: str | None, *, pass_env: tuple[str, ...] = ()) -> Processor:
    """``None`` or ``"shell"`` runs shell tasks; anything else is ``module:function``.
    ``pass_env``: credential variables shell tasks may still inherit."""
    if reference in (None, "", "shell"):
        return ShellProcessor(pass_env=pass_env)
    return CallableProcessor(load_callable(reference))


def install_signal_handlers(
    loop: asyncio.AbstractEventLoop, on_signal: Callable[[int], None]
) -> Callable[[], None]:
    """Route SIGTERM/SIGINT to ``on_signal``; returns a function that restores them."""
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass

    def restore() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return restore
