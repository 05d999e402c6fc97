"""How a synchronous Python task is called without blocking the event loop.

The loop renews locks and settles messages while tasks run, so a sync function must run
off the loop's thread.  This module is the one place that decides how, so the processors
only ever call :func:`run_sync`.

Why not :func:`asyncio.to_thread`: for a no-op task its per-call machinery (a
``concurrent.futures`` future chained to an asyncio future, the executor's work item and
thread-count check, one loop wake-up per call) was most of the cost of running the task,
and the default executor has ``min(32, cpus + 4)`` threads, so on a 2-core machine only
6 of 8 slots' sync tasks could run at once.  Here instead:

* **a thread per running call**: idle threads wait on one shared ``SimpleQueue`` (a C
  queue: one lock, no condition variable); a call takes an idle thread or starts a new
  one, so as many sync tasks run at once as slots ask for.  Threads idle for
  ``IDLE_SECONDS`` exit.  They are daemon threads: a sync function that never returns
  (after its task was cancelled) cannot keep the process alive.
* **batched wake-ups**: a finished call appends its outcome to its loop's inbox and wakes
  the loop only if no wake-up is already pending, so slots that finish together cost one
  loop wake-up, not one each.
* the call runs in a copy of the caller's context, so context variables (the worker's
  ``current_task()``) are visible inside the function, as with ``to_thread``.

A sync function cannot be interrupted: if the awaiting task is cancelled the function runs
to its end in its thread and its outcome is dropped.  Measured with
``bench/bench_peers.py`` (drain of no-op sync tasks); see docs/performance.md.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

IDLE_SECONDS = 30.0

_Job = tuple[
    contextvars.Context, Callable[..., Any], Mapping[str, Any], "asyncio.Future[Any]", "_Inbox"
]


class _Inbox:
    """Outcomes waiting to be handed to one event loop's futures, and whether a
    wake-up for them is already on its way."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self.wakeup_pending = False

    def deliver(
        self, future: asyncio.Future[Any], result: Any, error: BaseException | None
    ) -> None:
        """Called in a pool thread."""
        with self.lock:
            self.outcomes.append((future, result, error))
            if self.wakeup_pending:
                return
            self.wakeup_pending = True
        try:
            self.loop.call_soon_threadsafe(self.flush)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def flush(self) -> None:
        """Called in the loop's thread."""
        with self.lock:
            outcomes, self.outcomes = self.outcomes, []
            self.wakeup_pending = False
        for future, result, error in outcomes:
            if not future.done():  # (else: cancelled while the function ran)
                future.set_result((result, error))


class _Pool:
    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = 0  # threads waiting for a job (or about to)
        self.started = 0

    def submit(self, job: _Job) -> None:
        with self.lock:
            if self.idle:
                self.idle -= 1
            else:
                self.started += 1
                threading.Thread(
                    target=self._serve, name=f"jobq-sync-{self.started}", daemon=True
                ).start()
            self.jobs.put(job)

    def _serve(self) -> None:
        while True:
            try:
                context, function, kwargs, future, inbox = self.jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self.lock:
                    if self.jobs.empty():  # puts happen under the lock: none is in progress
                        self.idle -= 1
                        return
                continue
            result: Any = None
            error: BaseException | None = None
            try:
                result = context.run(function, **kwargs)
            except BaseException as exc:  # handed to the awaiting task, as to_thread does
                error = exc
            # Idle before the caller hears of the outcome: its next call (a slot's next
            # task) then finds this thread instead of starting another one.
            with self.lock:
                self.idle += 1
            inbox.deliver(future, result, error)
            # Do not pin the task's objects while waiting for the next job.
            del context, function, kwargs, future, inbox, result, error


_pool = _Pool()
_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox] = weakref.WeakKeyDictionary()


async def run_sync(function: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
    """Call ``function(**kwargs)`` in a pool thread, in a copy of the current context,
    and return its result (or raise its exception)."""
    loop = asyncio.get_running_loop()
    inbox = _inboxes.get(loop)
    if inbox is None:
        inbox = _inboxes[loop] = _Inbox(loop)
    future: asyncio.Future[Any] = loop.create_future()
    _pool.submit((contextvars.copy_context(), function, kwargs, future, inbox))
    result, error = await future
    if error is not None:
        # Raised here rather than set on the future: asyncio *throws* a future's
        # exception into the awaiting task's outermost coroutine, and a thrown
        # GeneratorExit closes every coroutine in between instead of reaching the
        # processor's handler.
        raise error
    return result
