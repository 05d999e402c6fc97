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
* **a lane per worker, when the worker looks ahead** (:class:`Lane`): admits at most
  ``width`` (= slots) calls at once; further calls wait in it in order, and a pool
  thread that finishes a call starts the lane's next waiting call itself, so a slot's
  next short task does not wait for a round trip through the event loop (two
  hand-offs of the GIL, each a thread wake-up: most of a no-op task's cost).  The
  worker learns when a waiting call really begins (``on_start``, on the loop's
  thread, batched with the outcomes), so its hooks see the true start.  A waiting
  call can be withdrawn (it never runs); a call cancelled after a thread took it but
  before it began is skipped.  See :mod:`.lookahead` for when the worker uses it.
* the call runs in a copy of the caller's context, so context variables (the worker's
  ``current_task()``) are visible inside the function, as with ``to_thread``.

A sync function cannot be interrupted: if the awaiting task is cancelled the function runs
to its end in its thread and its outcome is dropped.  Measured with
``bench/bench_peers.py`` (drain of no-op sync tasks); see docs/performance.md.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ai4s_jobq.worker")

IDLE_SECONDS = 30.0

# A lane call's states (plain calls stay ADMITTED until they end).
WAITING, ADMITTED, RUNNING, DONE, WITHDRAWN, ABANDONED = range(6)


class NotStarted(Exception):
    """A call withdrawn from its lane before it began: the task never ran."""


class _Call:
    __slots__ = (
        "context",
        "function",
        "kwargs",
        "future",
        "inbox",
        "lane",
        "on_start",
        "state",
        "reported",
        "since",
    )

    def __init__(
        self,
        function: Callable[..., Any],
        kwargs: Mapping[str, Any],
        future: asyncio.Future[Any],
        inbox: _Inbox,
        lane: Lane | None = None,
        on_start: Callable[[float], None] | None = None,
    ):
        self.context = contextvars.copy_context()
        self.function = function
        self.kwargs = kwargs
        self.future = future
        self.inbox = inbox
        self.lane = lane
        self.on_start = on_start
        self.state = ADMITTED
        self.reported = False  # on_start was called
        self.since = 0.0  # time.monotonic() when it began to wait in its lane

    def report_start(self, at: float) -> None:
        """On the loop's thread: tell the caller (once) that the call began."""
        if self.reported or self.on_start is None:
            return
        self.reported = True
        try:
            self.on_start(at)
        except Exception:  # the worker's bookkeeping; never lose the outcome
            log.exception("a sync call's start could not be recorded")


class _Inbox:
    """Outcomes (and, for lane calls, starts) waiting to be handed to one event loop,
    and whether a wake-up for them is already on its way."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        # (call, result, error, False) for an outcome; (call, wall time, None, True)
        # for a lane call's start
        self.events: list[tuple[_Call, Any, BaseException | None, bool]] = []
        self.wakeup_pending = False

    def deliver(self, call: _Call, result: Any, error: BaseException | None) -> None:
        """Called in a pool thread."""
        self._add((call, result, error, False))

    def started(self, call: _Call, at: float) -> None:
        """Called in a pool thread when a lane call begins."""
        self._add((call, at, None, True))

    def _add(self, event: tuple[_Call, Any, BaseException | None, bool]) -> None:
        with self.lock:
            self.events.append(event)
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
            events, self.events = self.events, []
            self.wakeup_pending = False
        for call, value, error, is_start in events:
            future = call.future
            if future.done():  # cancelled while it waited or ran
                continue
            if is_start:
                call.report_start(value)
            else:
                future.set_result((value, error))


class Lane:
    """At most ``width`` calls at once, the rest waiting in order (see the module
    docstring).  Calls come from one event loop; pool threads take the next."""

    def __init__(self, width: int, *, hold_on_failure: bool = False):
        self.width = max(1, width)
        self.hold_on_failure = hold_on_failure
        self.lock = threading.Lock()
        self.admitted = 0  # calls given to a thread and not yet ended (or abandoned)
        self.waiting: deque[_Call] = deque()
        # With ``hold_on_failure``, after a call fails nothing more is admitted until
        # the caller says so (``resume``): it may want to stop
        # (``--max-consecutive-failures``).
        self.held = False
        self.waited = 0  # calls that had to wait (for the tests and benchmarks)
        self.watchdog: asyncio.TimerHandle | None = None  # see watch()

    def submit(self, call: _Call) -> bool:
        """Admit ``call`` or queue it; True if it had to wait."""
        with self.lock:
            if self.admitted < self.width and not self.held:
                self.admitted += 1
                call.state = ADMITTED
            else:
                call.state = WAITING
                call.since = time.monotonic()
                self.waiting.append(call)
                self.waited += 1
                return True
        _pool.submit(call)
        return False

    def resume(self) -> None:
        """Admit waiting calls again after a failure held the lane."""
        admitted = []
        with self.lock:
            self.held = False
            while self.waiting and self.admitted < self.width:
                call = self.waiting.popleft()
                call.state = ADMITTED
                self.admitted += 1
                admitted.append(call)
        for call in admitted:
            _pool.submit(call)

    def begin(self, call: _Call) -> bool:
        """In the thread, before running: False if it was abandoned meanwhile."""
        with self.lock:
            if call.state != ADMITTED:
                return False
            call.state = RUNNING
            return True

    def next_after(self, call: _Call, failed: bool) -> _Call | None:
        """In the thread, after ``call`` ended: the next waiting call, now admitted,
        for this thread to run, or None (and the admission is given back)."""
        with self.lock:
            if call.state == ABANDONED:  # its admission was handed on already
                return None
            call.state = DONE
            if failed and self.hold_on_failure:
                self.held = True
            if self.waiting and not self.held:
                following = self.waiting.popleft()
                following.state = ADMITTED
                return following
            self.admitted -= 1
            return None

    def watch(self, loop: asyncio.AbstractEventLoop, limit: float) -> None:
        """Withdraw calls that waited ``limit`` seconds (``NotStarted``).  One timer
        per lane, for its oldest waiting call, rather than one per call: a timer per
        task was a measurable share of a no-op task."""
        if self.watchdog is None:
            self.watchdog = loop.call_later(limit, self._expire, loop, limit)

    def _expire(self, loop: asyncio.AbstractEventLoop, limit: float) -> None:
        self.watchdog = None
        now = time.monotonic()
        expired = []
        with self.lock:
            while self.waiting and now - self.waiting[0].since >= limit:
                call = self.waiting.popleft()
                call.state = WITHDRAWN
                expired.append(call)
            oldest = self.waiting[0].since if self.waiting else None
        for call in expired:
            if not call.future.done():
                call.future.set_result((None, NotStarted("waited too long for a free slot")))
        if oldest is not None:
            self.watchdog = loop.call_later(oldest + limit - now, self._expire, loop, limit)

    def withdraw(self, call: _Call) -> bool:
        """Take a waiting call back (it will never run); False if it was admitted."""
        with self.lock:
            if call.state != WAITING:
                return False
            self.waiting.remove(call)
            call.state = WITHDRAWN
            return True

    def abandon(self, call: _Call) -> bool:
        """The caller stopped waiting for an admitted call: if it has not begun it
        never will; either way its admission goes to the next waiting call now (a
        sync function cannot be stopped, so it may still run to its end).  True if
        it had begun."""
        following = None
        with self.lock:
            began = call.state == RUNNING
            if call.state not in (ADMITTED, RUNNING):
                return False
            call.state = ABANDONED
            if self.waiting and not self.held:
                following = self.waiting.popleft()
                following.state = ADMITTED
            else:
                self.admitted -= 1
        if following is not None:
            _pool.submit(following)
        return began


@dataclass
class Admission:
    """The worker's request that this task's sync call go through ``lane``, and be
    told (on the loop's thread, with the wall time) when the call begins."""

    lane: Lane
    on_start: Callable[[float], None]
    wait_limit: float  # withdraw the call (NotStarted) if it waited this long


#: Set by the worker around a processor call: the first :func:`run_sync` within goes
#: through the admission's lane.
current_admission: contextvars.ContextVar[Admission | None] = contextvars.ContextVar(
    "ai4s_jobq_sync_admission", default=None
)


class _Pool:
    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = 0  # threads waiting for a job (or about to)
        self.started = 0

    def submit(self, call: _Call) -> None:
        with self.lock:
            if self.idle:
                self.idle -= 1
            else:
                self.started += 1
                threading.Thread(
                    target=self._serve, name=f"jobq-sync-{self.started}", daemon=True
                ).start()
            self.jobs.put(call)

    def _serve(self) -> None:
        while True:
            try:
                call: _Call | None = self.jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self.lock:
                    if self.jobs.empty():  # puts happen under the lock: none is in progress
                        self.idle -= 1
                        return
                continue
            while call is not None:  # a lane's next call runs on in this thread
                call = self._run(call)

    def _run(self, call: _Call) -> _Call | None:
        lane = call.lane
        if lane is not None:
            if not lane.begin(call):  # abandoned before it began: never run it
                with self.lock:
                    self.idle += 1
                return None
            call.inbox.started(call, time.time())
        result: Any = None
        error: BaseException | None = None
        try:
            result = call.context.run(call.function, **call.kwargs)
        except BaseException as exc:  # handed to the awaiting task, as to_thread does
            error = exc
        following = lane.next_after(call, error is not None) if lane is not None else None
        if following is None:
            # Idle before the caller hears of the outcome: its next call (a slot's
            # next task) then finds this thread instead of starting another one.
            with self.lock:
                self.idle += 1
        call.inbox.deliver(call, result, error)
        # Do not pin the task's objects while waiting for the next job.
        call.context = call.function = call.kwargs = None  # type: ignore[assignment]
        return following


_pool = _Pool()
_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox] = weakref.WeakKeyDictionary()


async def run_sync(function: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
    """Call ``function(**kwargs)`` in a pool thread, in a copy of the current context,
    and return its result (or raise its exception).  With a ``current_admission``,
    through its lane (raises :class:`NotStarted` if withdrawn before it began)."""
    loop = asyncio.get_running_loop()
    inbox = _inboxes.get(loop)
    if inbox is None:
        inbox = _inboxes[loop] = _Inbox(loop)
    future: asyncio.Future[Any] = loop.create_future()
    admission = current_admission.get()
    if admission is None:
        _pool.submit(_Call(function, kwargs, future, inbox))
        result, error = await future
    else:
        current_admission.set(None)  # one call per admission
        result, error = await _through_lane(
            admission,
            _Call(function, kwargs, future, inbox, admission.lane, admission.on_start),
            loop,
        )
    if error is not None:
        # Raised here rather than set on the future: asyncio *throws* a future's
        # exception into the awaiting task's outermost coroutine, and a thrown
        # GeneratorExit closes every coroutine in between instead of reaching the
        # processor's handler.
        raise error
    return result


async def _through_lane(
    admission: Admission, call: _Call, loop: asyncio.AbstractEventLoop
) -> tuple[Any, BaseException | None]:
    lane = admission.lane
    if lane.submit(call):  # it waits: do not let it wait behind a long task for ever
        lane.watch(loop, admission.wait_limit)
    try:
        return await call.future  # type: ignore[no-any-return]
    except asyncio.CancelledError:
        if not lane.withdraw(call) and lane.abandon(call):
            # It had begun and runs on in its thread: the caller must know it started
            # (its start may not have reached the loop yet).
            call.report_start(time.time())
        raise
