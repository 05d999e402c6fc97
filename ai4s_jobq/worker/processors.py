"""What runs a task: a shell command or a Python callable (function or class).

A processor is an async callable ``(task) -> None`` that raises
:class:`TaskFailed` when the task did not succeed.  Cancellation (lost lock,
shutdown) must stop the work: the shell processor kills the command's whole
process group.

A processor may also have ``async start()`` / ``async close()``: the lifecycle.
:class:`InstanceProcessor` uses it to instantiate a ``--proc module:Class`` once and
run its optional ``setup()`` / ``teardown()``; the wrappers of :mod:`.build` (GPU
slots, timeouts, process isolation) forward it.  :func:`started` runs it around a
worker.  A processor used without ``start()`` starts itself on its first task, so a
plain ``Worker(backend, processor)`` works too (only ``teardown()`` is then skipped).

Failure text: ``TaskFailed.description`` starts with one line that says what went
wrong (``ValueError: bad input``, ``exit code 3: <last stderr line>``); the detail
(traceback tail, stderr tail) follows.  The loop logs that first line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import importlib
import inspect
import logging
import os
import signal
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any

from ..redact import redact
from ..task import Task, bad_env_name
from ..telemetry.context import child_process_env
from .context import current_task
from .permanent import PERMANENT_REASON, is_permanent
from .sync_calls import NotStarted, run_sync
from .task_env import task_environment

log = logging.getLogger("ai4s_jobq.task")

Processor = Callable[[Task], Awaitable[Any]]  # returns a Python task's result

STDERR_TAIL_LINES = 20
STDERR_TAIL_CHARS = 2000
KILL_GRACE_SECONDS = 5.0


class TaskFailed(Exception):
    """The task ran and failed.  ``reason`` is a short tag (``NonZeroExit``, the
    exception type, ``Timeout``); ``description`` starts with a one-line summary, then
    the detail (stderr or traceback tail)."""

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

    @property
    def summary(self) -> str:
        """The first line of the description (what a log line shows)."""
        return self.description.splitlines()[0] if self.description else self.reason


def exception_summary(exc: BaseException) -> str:
    """``Type: message`` (just ``Type`` when the message is empty), on one line."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def exception_failure(exc: BaseException) -> TaskFailed:
    """A task's exception as a failure: type and message first, traceback tail after."""
    tb = _skip_own_frames(exc.__traceback__)
    text = redact("".join(traceback.format_exception(type(exc), exc, tb)))
    return failure_from_parts(type(exc).__name__, redact(exception_summary(exc)), text)


_OWN_DIR = os.path.dirname(os.path.abspath(__file__))
_PLUMBING = (_OWN_DIR, os.path.dirname(asyncio.__file__))


def _skip_own_frames(tb: TracebackType | None) -> TracebackType | None:
    """Start the traceback at the task's code: leading frames of the worker, asyncio
    and the thread pool say nothing about the failure."""
    while tb is not None and tb.tb_next is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not (filename.startswith(_PLUMBING) or "concurrent/futures" in filename):
            break
        tb = tb.tb_next
    return tb


def failure_from_parts(reason: str, summary: str, detail: str) -> TaskFailed:
    """Compose the description: the summary line, then the (tail of the) detail."""
    detail = detail.strip("\n")
    if len(detail) > STDERR_TAIL_CHARS:
        detail = "..." + detail[-STDERR_TAIL_CHARS:]
    return TaskFailed(reason, summary + (f"\n\n{detail}" if detail else ""))


def exit_failure(code: int, stderr_lines: collections.deque[str] | list[str]) -> TaskFailed:
    """A non-zero exit: the code (or signal) and the last non-empty stderr line first,
    then the stderr tail."""
    how = exit_text(code)
    lines = [line for line in stderr_lines if line.strip()]
    summary = f"{how}: {lines[-1].strip()}" if lines else how
    tail = "\n".join(lines)[-STDERR_TAIL_CHARS:]
    description = summary + (f"\n\nstderr tail:\n{tail}" if tail else "")
    return TaskFailed("NonZeroExit", description, exit_code=code)


def exit_text(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"killed by signal {name}"
    return f"exit code {code}"


class ShellProcessor:
    """Runs ``args["cmd"]`` with ``/bin/sh -c`` in its own process group.

    ``args["env"]`` adds environment variables; ``args["cwd"]`` sets the working
    directory.  Output lines go to the ``ai4s_jobq.task`` logger tagged with the
    task ID; the tail of stderr is kept for the dead-letter description.  The
    command gets ``PYTHONUNBUFFERED=1`` (unless set already) so Python programs'
    output shows up as it is written.  With ``tty=True`` stdout is a pseudo-terminal,
    for programs that only line-buffer on a TTY; stderr stays a pipe (its tail is
    the failure's explanation).
    """

    def __init__(
        self,
        *,
        kill_grace: float = KILL_GRACE_SECONDS,
        tty: bool = False,
        pass_env: tuple[str, ...] = (),
    ):
        self.kill_grace = kill_grace
        self.tty = tty
        self.pass_env = pass_env  # credential variables the task may still see

    async def __call__(self, task: Task) -> None:
        cmd = task.args.get("cmd")
        if not isinstance(cmd, str) or not cmd:
            raise TaskFailed(
                PERMANENT_REASON, "a shell task needs a 'cmd' string argument", permanent=True
            )
        env = task_environment(self.pass_env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        extra_env = task.args.get("env") or {}
        if not isinstance(extra_env, dict):
            raise TaskFailed(
                PERMANENT_REASON, "a shell task's 'env' must be an object", permanent=True
            )
        problem = bad_env_name(extra_env, empty_ok=True)
        if problem is not None:  # the same on every attempt
            raise TaskFailed(PERMANENT_REASON, f"a shell task's env: {problem}", permanent=True)
        env.update({str(k): str(v) for k, v in extra_env.items()})
        context = current_task()
        env.update(context.env() if context is not None else {"JOBQ_TASK_ID": task.id})
        env.update(child_process_env())  # TRACEPARENT of the task's span, when telemetry is on
        tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        terminal = _open_pty() if self.tty else None
        try:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=terminal[1] if terminal else asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=task.args.get("cwd") or None,
                start_new_session=True,  # its own process group, so we can kill all of it
            )
        except BaseException:
            if terminal:
                os.close(terminal[0])
            raise
        finally:
            if terminal:
                os.close(terminal[1])  # the child holds its own copy
        assert proc.stderr is not None
        stdout_reader = (
            _stream_pty(terminal[0], task.id)
            if terminal
            else _stream(_not_none(proc.stdout), task.id, logging.INFO, None)
        )
        readers = [
            asyncio.ensure_future(stdout_reader),
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
            raise exit_failure(code, tail)

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM the group, then SIGKILL it if it has not gone within the grace (the
        loop's, e.g. bounded by a preemption deadline, else our own)."""
        context = current_task()
        grace = self.kill_grace
        if context is not None and context.stop.grace is not None:
            grace = context.stop.grace
        await kill_process_group(proc.pid, proc.wait, grace)


async def kill_process_group(pid: int, wait: Callable[[], Awaitable[Any]], grace: float) -> None:
    """SIGTERM the process group ``pid``, then SIGKILL it if ``wait()`` has not
    returned within ``grace`` seconds."""
    for sig, timeout in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        if timeout is None:
            break
        try:
            await asyncio.wait_for(asyncio.shield(wait()), timeout)
            return
        except asyncio.TimeoutError:
            continue
    try:
        await asyncio.wait_for(wait(), 5)
    except asyncio.TimeoutError:
        log.error("process group %s did not die after SIGKILL", pid)


def _not_none(stream: asyncio.StreamReader | None) -> asyncio.StreamReader:
    assert stream is not None
    return stream


def _open_pty() -> tuple[int, int]:
    """A pseudo-terminal (master, slave) that does not echo and keeps ``\\n``."""
    import pty
    import termios

    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST  # no "\\n" -> "\\r\\n" translation on output
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    return master, slave


async def _stream_pty(master: int, task_id: str) -> None:
    """Log the lines a command writes to its terminal; EIO means the terminal closed."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    pipe = os.fdopen(master, "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        await _stream(reader, task_id, logging.INFO, None)
    except OSError:  # EIO from the master once the last writer has gone
        pass
    finally:
        transport.close()


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
    going (a sync function cannot be interrupted in-process: on cancellation the
    worker stops waiting for it and does not settle the message, while the thread
    runs to its end; ``--isolation process`` is the way to stop it).
    """

    def __init__(self, function: Callable[..., Any]):
        self.function = function
        self.is_async = inspect.iscoroutinefunction(function)
        #: A sync call goes through ``run_sync``, which tells the worker when it
        #: begins: the worker may look ahead (see :mod:`.lookahead`).
        self.reports_start = not self.is_async

    async def __call__(self, task: Task) -> Any:
        try:
            if self.is_async:
                result = await self.function(**task.args)
            else:
                watch = _abandoned_threads.get()
                if watch is None:
                    result = await run_sync(self.function, task.args)
                else:
                    result = await _run_sync_watched(self.function, task.args, watch)
        except (asyncio.CancelledError, TaskFailed, NotStarted):
            raise
        except BaseException as exc:
            # A task's own error -- even sys.exit(), KeyboardInterrupt, GeneratorExit --
            # is a failed task, not a dead worker.
            _restore_std_streams()
            failure = exception_failure(exc)
            if is_permanent(exc):
                raise TaskFailed(PERMANENT_REASON, failure.description, permanent=True) from exc
            raise failure from exc
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


# Set by a wrapper that must know when a cancelled sync task's thread really ends (the
# GPU pool: a GPU is not handed on while an abandoned thread may still be using it).
_abandoned_threads: contextvars.ContextVar[list[asyncio.Future[Any]] | None] = (
    contextvars.ContextVar("ai4s_jobq_abandoned_threads", default=None)
)


@contextlib.contextmanager
def watch_abandoned_threads() -> Iterator[list[asyncio.Future[Any]]]:
    """Inside, a sync task whose await is cancelled leaves its still-running
    thread's future in the yielded list."""
    watch: list[asyncio.Future[Any]] = []
    token = _abandoned_threads.set(watch)
    try:
        yield watch
    finally:
        _abandoned_threads.reset(token)


async def _run_sync_watched(
    function: Callable[..., Any], kwargs: dict[str, Any], watch: list[asyncio.Future[Any]]
) -> Any:
    thread = asyncio.ensure_future(run_sync(function, kwargs))
    try:
        return await asyncio.shield(thread)
    except asyncio.CancelledError:
        if not thread.done():
            thread.add_done_callback(_consume_result)
            watch.append(thread)
        raise


def _consume_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: no "exception was never retrieved" noise


class InstanceProcessor:
    """``--proc module:Class``: the class is instantiated once per worker process, its
    optional ``setup()`` runs once before the first task and ``teardown()`` once at
    the end (each may be sync or async); every task calls the instance with the
    task's arguments as keyword arguments (its ``__call__`` may be sync or async)."""

    def __init__(self, cls: type):
        self.cls = cls
        self._instance: Any = None
        self._call: CallableProcessor | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            if self._call is not None:
                return
            name = getattr(self.cls, "__qualname__", repr(self.cls))
            try:
                instance = await asyncio.to_thread(self.cls)
                await call_hook(instance, "setup")
            except Exception as exc:
                raise ProcessorSetupError(f"{name}: {exception_summary(exc)}") from exc
            self._instance = instance
            self._call = CallableProcessor(instance.__call__)

    async def close(self) -> None:
        instance, self._instance, self._call = self._instance, None, None
        if instance is not None:
            await call_hook(instance, "teardown")

    @property
    def reports_start(self) -> bool:
        return self._call is not None and self._call.reports_start

    async def __call__(self, task: Task) -> Any:
        call = self._call
        if call is None:
            await self.start()
            call = self._call
            assert call is not None
        return await call(task)


class ProcessorSetupError(ValueError):
    """Instantiating a ``--proc`` class or its ``setup()`` failed (the worker cannot
    run any task: a configuration error, exit code 4)."""


async def call_hook(instance: Any, name: str) -> None:
    """Call ``instance.name()`` if it exists: awaited if async, in a thread if sync
    (so a slow model load does not stall the event loop)."""
    method = getattr(instance, name, None)
    if method is None:
        return
    if inspect.iscoroutinefunction(method):
        await method()
        return
    result = await asyncio.to_thread(method)
    if inspect.isawaitable(result):
        await result


class ProcessorWrapper:
    """A processor around another (GPU slots, timeouts): its lifecycle is the inner
    one's, so ``start()``/``close()`` pass through."""

    def __init__(self, inner: Processor):
        self.inner = inner

    async def start(self) -> None:
        start = getattr(self.inner, "start", None)
        if start is not None:
            await start()

    async def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            await close()


@contextlib.asynccontextmanager
async def started(processor: Processor) -> AsyncIterator[Processor]:
    """Run a processor's ``start()`` before and ``close()`` after the block, if it
    has them (``InstanceProcessor``, the wrappers of :mod:`.build`)."""
    start = getattr(processor, "start", None)
    if start is not None:
        await start()
    try:
        yield processor
    finally:
        close = getattr(processor, "close", None)
        if close is not None:
            await close()


def split_reference(reference: str) -> tuple[str, str]:
    """``module:name`` (or ``module.name``) as (module, name).  Like ``python -m``, the
    working directory joins ``sys.path``, so the user's modules are found (a console
    script otherwise only sees its own bin directory)."""
    module_name, sep, attr = reference.partition(":")
    if not sep:
        module_name, _, attr = reference.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{reference!r} is not module:function or module:Class")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return module_name, attr


def load_callable(reference: str) -> Callable[..., Any]:
    """Import ``module:function`` or ``module:Class`` (or ``module.name``), looking in
    the working directory too."""
    module_name, attr = split_reference(reference)
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


def python_processor(target: Callable[..., Any]) -> Processor:
    """A class gets a lifecycle (:class:`InstanceProcessor`); a function is called."""
    if inspect.isclass(target):
        return InstanceProcessor(target)
    return CallableProcessor(target)


def make_processor(
    reference: str | None, *, tty: bool = False, pass_env: tuple[str, ...] = ()
) -> Processor:
    """``None`` or ``"shell"`` runs shell tasks; anything else is ``module:function``
    or ``module:Class``.  ``pass_env``: credential variables shell tasks may still
    inherit.  (:func:`ai4s_jobq.worker.build.build_processor` adds GPU slots, timeouts
    and process isolation.)"""
    if reference in (None, "", "shell"):
        return ShellProcessor(tty=tty, pass_env=pass_env)
    return python_processor(load_callable(reference))


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
