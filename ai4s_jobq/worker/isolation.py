"""``--isolation process``: Python tasks run in a pool of worker processes, one per slot.

Why: in-process, a synchronous task runs in a thread that nothing can stop, and a task
that crashes the interpreter (segfault in an extension, ``os._exit``, the OOM killer)
takes the whole worker, and every task it holds, with it.  In a pool process a task
can be stopped (lock lost, shutdown, ``--task-timeout``: SIGTERM to the process group,
SIGKILL after a short grace) and a crash fails that one task; the pool starts a new
process for the slot.  The price: arguments and results are pickled, a task cannot
share in-memory state with the worker, and each process pays its own ``setup()``
(memory, start-up time).  The default stays in-process, which is cheaper per task.

Shape:

* The ``forkserver`` start method: the worker has Azure SDK and asyncio threads alive,
  and plain ``fork`` copies their locks in whatever state they are in.  The fork
  server preloads only this module (light), not the user's code.
* Each process imports ``--proc``, instantiates a class once and runs its ``setup()``
  once (``teardown()`` when the pool closes), pinned before that to its slot's GPUs
  (``CUDA_VISIBLE_DEVICES``), so a model loads onto the right device.  A process runs
  in its own session: the terminal's Ctrl-C reaches the worker, not the tasks, and a
  task's own subprocesses die with it.
* IPC, chosen for per-task cost: a pair of OS pipes per process carrying small pickled
  tuples, each framed by a 4-byte length (one ``write`` per message and usually one
  ``read``: ``multiprocessing.Connection`` reads header and body separately, and its
  ``poll()`` builds a selector per call); the parent reads replies from its event loop
  (``add_reader`` on the pipe and on the process sentinel, non-blocking, so a large
  reply never stalls the loop), no thread per process and no ``multiprocessing.Pool``
  machinery (its result handler thread and queues cost more per task, and it cannot
  kill one task's process).  ``bench/bench_processors.py`` measures it.
* Messages: parent → child ``("run", args, TaskContext)`` or ``("stop",)``; child →
  parent ``("ready",)``, ``("setup_failed", summary)``, ``("ok", result)`` or
  ``("error", reason, description, exit_code, exception)``.  The child's exception
  object travels when it pickles, so the worker sees its type (as ``__cause__``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import multiprocessing
import os
import pickle
import signal
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from ..task import Task
from .context import TaskContext, current_task, task_context
from .processors import (
    KILL_GRACE_SECONDS,
    ProcessorSetupError,
    TaskFailed,
    exception_failure,
    exception_summary,
    exit_text,
    kill_process_group,
    load_callable,
    split_reference,
)
from .task_env import task_environment

log = logging.getLogger("ai4s_jobq.worker")

TEARDOWN_TIMEOUT_SECONDS = 60.0
_PICKLE = pickle.HIGHEST_PROTOCOL

GpuGroup = tuple[str, ...]


_HEADER = struct.Struct("!I")  # each message: 4-byte big-endian length, then the pickle


def _send(fd: int, message: Any) -> None:
    """Write one framed message (a blocking write; the reader is always draining)."""
    payload = pickle.dumps(message, _PICKLE)
    _write_all(fd, _HEADER.pack(len(payload)) + payload)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _frames(buffer: bytearray) -> list[bytes]:
    """Cut the complete messages off the front of ``buffer``."""
    frames = []
    while len(buffer) >= _HEADER.size:
        (size,) = _HEADER.unpack_from(buffer)
        end = _HEADER.size + size
        if len(buffer) < end:
            break
        frames.append(bytes(buffer[_HEADER.size : end]))
        del buffer[:end]
    return frames


def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


class ProcessDied(Exception):
    """The pool process ended while it held a task (or during its setup)."""

    def __init__(self, exitcode: int | None):
        self.exitcode = exitcode
        how = exit_text(exitcode) if exitcode is not None else "ended"
        if exitcode == -signal.SIGKILL:
            how += " (SIGKILL: the kernel's out-of-memory killer, or a kill -9)"
        super().__init__(f"pool process died: {how}")


@dataclass(eq=False)
class _Child:
    process: BaseProcess
    replies: Connection  # read end of the child's reply pipe
    requests: Connection  # write end of the child's request pipe
    exited: asyncio.Future[None]
    pending: asyncio.Future[Any] | None = None
    watching_pipe: bool = True
    inbox: bytearray = field(default_factory=bytearray)  # reply bytes not yet a message


@dataclass(eq=False)
class _Slot:
    index: int
    gpus: GpuGroup
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    child: _Child | None = None
    spawning: asyncio.Future[_Child] | None = None


class ProcessPool:
    """A processor that runs ``module:function`` or ``module:Class`` in pool processes.

    ``gpu_groups`` (one per slot) pins each process to its GPUs; a task is then run
    by the process whose group is the task's ``TaskContext.gpus`` (set by
    :class:`~ai4s_jobq.worker.gpus.GpuSlots`).  Without GPUs any idle process runs it.
    """

    def __init__(
        self,
        reference: str,
        slots: int,
        gpu_groups: Sequence[GpuGroup] = (),
        *,
        kill_grace: float = KILL_GRACE_SECONDS,
        pass_env: tuple[str, ...] = (),
    ):
        if gpu_groups and len(gpu_groups) != slots:
            raise ValueError(f"{slots} slots but {len(gpu_groups)} GPU groups")
        _check_importable(reference)
        self.reference = reference
        self.kill_grace = kill_grace
        self.pass_env = pass_env  # credential variables tasks may still inherit
        self.slots = [_Slot(i, tuple(gpu_groups[i]) if gpu_groups else ()) for i in range(slots)]
        self._by_gpus = {slot.gpus: slot for slot in self.slots if slot.gpus}
        self._idle: asyncio.Queue[_Slot] | None = None
        self._mp = _context()
        self.started_processes = 0  # how many processes were started (tests, logs)
        self._live: set[_Child] = set()  # processes whose exit has not been seen yet

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._idle is not None:
            return
        self._idle = asyncio.Queue()
        results = await asyncio.gather(
            *(self._spawn(slot) for slot in self.slots), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()
            raise errors[0]
        for slot in self.slots:
            self._idle.put_nowait(slot)
        log.info("process pool: %d process(es) ready for %s", len(self.slots), self.reference)

    async def close(self) -> None:
        """Ask idle processes to run ``teardown()`` and exit; kill what does not."""
        self._idle = None  # no more replacements
        spawning = [s.spawning for s in self.slots if s.spawning and not s.spawning.done()]
        for future in spawning:
            future.cancel()
        await asyncio.gather(*spawning, return_exceptions=True)
        children = [slot.child for slot in self.slots if slot.child is not None]
        for slot in self.slots:
            slot.child = None
        await asyncio.gather(*(self._stop_gracefully(child) for child in children))
        for child in list(self._live):  # anything left (a process between states)
            child.process.kill()
            await asyncio.shield(child.exited)

    async def _stop_gracefully(self, child: _Child) -> None:
        if not child.exited.done():
            try:
                _send(child.requests.fileno(), ("stop",))
                await asyncio.wait_for(asyncio.shield(child.exited), TEARDOWN_TIMEOUT_SECONDS)
            except (OSError, asyncio.TimeoutError):
                await self._kill(child)

    # ------------------------------------------------------------------ one task

    async def __call__(self, task: Task) -> Any:
        if self._idle is None:
            await self.start()
        context = current_task() or TaskContext(task.id)
        slot = await self._take_slot(context)
        try:
            async with slot.lock:
                child = await self._ready_child(slot)
                return await self._run(slot, child, task.args, context)
        finally:
            if not self._by_gpus and self._idle is not None:
                self._idle.put_nowait(slot)

    async def _take_slot(self, context: TaskContext) -> _Slot:
        if self._by_gpus:
            try:
                return self._by_gpus[context.gpus]
            except KeyError:
                raise RuntimeError(f"no pool process owns GPUs {context.gpus}") from None
        assert self._idle is not None
        return await self._idle.get()

    async def _ready_child(self, slot: _Slot) -> _Child:
        if slot.child is not None and not slot.child.exited.done():
            return slot.child
        if slot.spawning is None or slot.spawning.done():
            slot.spawning = asyncio.ensure_future(self._spawn(slot))
        try:
            return await asyncio.shield(slot.spawning)
        except ProcessorSetupError as exc:
            raise TaskFailed("SetupFailed", f"SetupFailed: {exc}") from exc

    async def _run(
        self, slot: _Slot, child: _Child, args: dict[str, Any], context: TaskContext
    ) -> Any:
        reply = asyncio.get_running_loop().create_future()
        try:
            payload = pickle.dumps(("run", args, context), _PICKLE)
        except Exception as exc:  # arguments that do not pickle (JSON ones always do)
            raise exception_failure(exc) from exc
        child.pending = reply
        try:
            _write_all(child.requests.fileno(), _HEADER.pack(len(payload)) + payload)
        except OSError:
            pass  # the process is gone: its sentinel reports how
        try:
            message = await reply
        except asyncio.CancelledError:
            # Lock lost, shutdown or --task-timeout: stop the task by ending its process.
            await self._kill(child)
            self._replace(slot, child)
            raise
        except ProcessDied as died:
            _kill_leftovers(child)
            self._replace(slot, child)
            raise TaskFailed("ProcessDied", f"ProcessDied: {died}") from None
        if message[0] == "ok":
            return message[1]
        _, reason, description, exit_code, original = message
        raise TaskFailed(reason, description, exit_code=exit_code) from original

    # ------------------------------------------------------------------ processes

    async def _spawn(self, slot: _Slot) -> _Child:
        loop = asyncio.get_running_loop()
        # Two one-way OS pipes: cheaper per message than a duplex socket pair.
        request_in, request_out = self._mp.Pipe(duplex=False)
        reply_in, reply_out = self._mp.Pipe(duplex=False)
        # The fork server's environment is the worker's when the server started;
        # each process gets the worker's environment as it is now (less its credentials,
        # see task_env), plus its GPUs.
        env = task_environment(self.pass_env)
        if slot.gpus:
            env["JOBQ_GPUS"] = env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.gpus)
        process = self._mp.Process(
            target=child_main,
            args=(request_in, reply_out, self.reference, env),
            name=f"jobq-slot-{slot.index}",
        )
        starting = asyncio.ensure_future(asyncio.to_thread(process.start))
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:  # closing: the process may start all the same
            await starting
            process.kill()
            await asyncio.to_thread(process.join, 10)
            raise
        finally:
            request_in.close()
            reply_out.close()
        self.started_processes += 1
        child = _Child(process, reply_in, request_out, loop.create_future())
        self._live.add(child)
        child.pending = loop.create_future()
        os.set_blocking(reply_in.fileno(), False)
        loop.add_reader(reply_in.fileno(), self._on_readable, child)
        loop.add_reader(process.sentinel, self._on_exit, child)
        try:
            message = await child.pending
        except ProcessDied as died:
            raise ProcessorSetupError(f"{self.reference}: {died} during setup") from None
        except asyncio.CancelledError:
            process.kill()  # during setup it may not lead its own process group yet
            await asyncio.shield(child.exited)
            raise
        if message[0] != "ready":
            await asyncio.shield(child.exited)
            raise ProcessorSetupError(f"{self.reference} in a pool process: {message[1]}")
        slot.child = child
        return child

    def _replace(self, slot: _Slot, child: _Child) -> None:
        """Start a new process for the slot in the background; its next task waits."""
        if slot.child is child:
            slot.child = None
        if self._idle is not None:
            slot.spawning = asyncio.ensure_future(self._spawn(slot))
            slot.spawning.add_done_callback(_log_spawn_failure)

    def _on_readable(self, child: _Child) -> bool:
        """Read what the pipe holds (one ``read``, usually one whole reply) and hand
        each complete reply to the task waiting for it.  False when nothing came."""
        try:
            data = os.read(child.replies.fileno(), 1 << 16)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._stop_watching_pipe(child)  # EOF: the sentinel says how it ended
            return False
        child.inbox += data
        for frame in _frames(child.inbox):
            reply, child.pending = child.pending, None
            if reply is None or reply.done():
                continue
            try:
                reply.set_result(pickle.loads(frame))
            except Exception as exc:  # a result that does not unpickle here
                reply.set_exception(exception_failure(exc))
        return True

    def _on_exit(self, child: _Child) -> None:
        if child.watching_pipe:
            os.set_blocking(child.replies.fileno(), False)
            # Replies written just before exiting; stop at an empty pipe (a process
            # the task forked may still hold the write end, so EOF may not come).
            while child.watching_pipe and self._on_readable(child):
                pass
        self._stop_watching_pipe(child)
        asyncio.get_running_loop().remove_reader(child.process.sentinel)
        child.process.join(0)
        self._live.discard(child)
        if not child.exited.done():
            child.exited.set_result(None)
        child.replies.close()
        child.requests.close()
        reply, child.pending = child.pending, None
        if reply is not None and not reply.done():
            reply.set_exception(ProcessDied(child.process.exitcode))

    def _stop_watching_pipe(self, child: _Child) -> None:
        if child.watching_pipe:
            child.watching_pipe = False
            asyncio.get_running_loop().remove_reader(child.replies.fileno())

    async def _kill(self, child: _Child) -> None:
        if child.exited.done():
            return
        pid = child.process.pid
        assert pid is not None
        await kill_process_group(pid, lambda: child.exited, self.kill_grace)


def _kill_leftovers(child: _Child) -> None:
    """A crashed process's own children (its process group) go with it."""
    try:
        if child.process.pid is not None:
            os.killpg(child.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _log_spawn_failure(future: asyncio.Future[_Child]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("process pool: could not start a new process: %s", future.exception())


def _check_importable(reference: str) -> None:
    """Fail fast on a misspelt module, without importing the user's code (and its
    heavy dependencies) into the worker process itself."""
    module_name, _ = split_reference(reference)
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    if found is None:
        raise ValueError(f"cannot import {module_name!r}: no module named {module_name!r}")


# ---------------------------------------------------------------------- the child side


def child_main(
    requests: Connection, replies: Connection, reference: str, env: dict[str, str]
) -> None:
    """A pool process: set up once, then run tasks until told to stop or orphaned."""
    os.setsid()
    os.environ.clear()
    os.environ.update(env)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)
    runner = _ChildRunner()
    out = replies.fileno()
    try:
        call, teardown = runner.load(reference)
    except BaseException as exc:
        _send(out, ("setup_failed", exception_summary(exc)))
        return
    _send(out, ("ready",))
    inbox = open(requests.fileno(), "rb", buffering=1 << 16, closefd=False)
    try:
        while True:
            try:
                header = inbox.read(_HEADER.size)
                (size,) = _HEADER.unpack(header)
                message = pickle.loads(inbox.read(size))
            except (OSError, struct.error, EOFError):
                return  # the worker is gone (EOF: a short header)
            if message[0] != "run":
                return
            reply = runner.run(call, message[1], message[2])
            try:
                _write_all(out, _HEADER.pack(len(reply)) + reply)
            except OSError:
                return  # the worker is gone
    finally:
        if teardown is not None:
            try:
                runner.call(teardown, {})
            except BaseException as exc:
                print(f"teardown() failed: {exception_summary(exc)}", file=sys.stderr)


class _ChildRunner:
    """Calls sync functions directly (so a task may install signal handlers) and
    async ones on one event loop kept for the process's life."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def load(self, reference: str) -> tuple[Callable[..., Any], Callable[..., Any] | None]:
        target = load_callable(reference)
        if not inspect.isclass(target):
            return target, None
        instance: Any = target()
        setup = getattr(instance, "setup", None)
        if setup is not None:
            self.call(setup, {})
        return instance.__call__, getattr(instance, "teardown", None)

    def call(self, function: Callable[..., Any], args: dict[str, Any]) -> Any:
        result = function(**args)
        if inspect.isawaitable(result):
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(_await(result))
        return result

    def run(self, call: Callable[..., Any], args: dict[str, Any], context: TaskContext) -> bytes:
        os.environ.update(context.env())
        try:
            with task_context(context):
                return pickle.dumps(("ok", self.call(call, args)), _PICKLE)
        except BaseException as exc:
            return _error_reply(exc)


def _error_reply(exc: BaseException) -> bytes:
    failure = exc if isinstance(exc, TaskFailed) else exception_failure(exc)
    reply = ("error", failure.reason, failure.description, failure.exit_code)
    # The exception object itself travels only for our own and built-in types: a
    # user's class would have to be imported into the worker process to unpickle.
    module = type(exc).__module__
    if module == "builtins" or module.split(".")[0] == "ai4s_jobq":
        try:
            data = pickle.dumps((*reply, exc), _PICKLE)
            pickle.loads(data)  # some exceptions pickle but do not unpickle
            return data
        except Exception:
            pass
    return pickle.dumps((*reply, None), _PICKLE)


async def _await(awaitable: Any) -> Any:
    return await awaitable
