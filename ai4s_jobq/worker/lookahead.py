"""Looking ahead: while a worker's sync Python tasks are short, each slot holds one
more message, waiting in the slot's lane, so the slot's thread goes from one task to
the next without a round trip through the event loop.

Why: a sync task runs in a thread so that the event loop keeps renewing locks.  Handing
each task to the thread and its outcome back costs two hand-offs of the GIL, and on a
small VM each is a thread wake-up of 50-100 us.  Measured with ``bench/bench_peers.py``
(20,000 no-op tasks, one slot): 1,929 tasks/s before (1.14x huey's consumer), 5,576/s
looking ahead (2.41x huey); async tasks, which need no thread, ran at 7,039/s.

What it must not change, and how it does not:

* **at most ``slots`` tasks run at once** -- the lane (``sync_calls.Lane``) admits
  ``slots`` calls; a look-ahead message waits in it, not in a thread;
* **a task starts when it starts** -- the hooks (ledger, telemetry, the log line) are
  told when the thread begins the call, not when the message arrived, so a waiting
  message is ``queued``, never ``running``;
* **a message never waits long behind a long task** -- look-ahead is on only while the
  recent tasks (a moving average) ran under ``SHORT_TASK_SECONDS``; a message that still
  waited ``WAIT_LIMIT_SECONDS`` is withdrawn and put back on the queue unchanged (no
  attempt, no interruption counted) for another worker;
* **stopping is as before** -- a waiting message of a worker that is shutting down or
  preempted never runs and goes back unchanged; what already runs is interrupted as
  ever.  Its lock is kept while it waits.

A hook that must act inside the task's own context (telemetry makes the task's span
current there, so the task's own spans nest under it) does so in ``task_entered``,
which the loop calls in that context before the call is handed to the lane; its
``task_started`` then only learns the true start.  (Until session 10 such a hook turned
look-ahead off for the whole worker: with OTLP export on, a one-slot drain of no-op
sync tasks ran at 44% of its rate with telemetry off.)

Only a processor that reports its calls' start (``reports_start``: the in-process
``--proc`` processors with a sync function) is looked ahead for; wrappers (GPU slots,
``--task-timeout``), process isolation, shell and async tasks never are.
"""

from __future__ import annotations

from typing import Any

from .sync_calls import Lane

#: Look ahead only while tasks run (on average) shorter than this.
SHORT_TASK_SECONDS = 0.05
#: A look-ahead message that waited this long goes back to the queue.
WAIT_LIMIT_SECONDS = 1.0
#: Messages waiting per slot while looking ahead (measured: see the module docstring).
DEPTH = 3
_WEIGHT = 0.2  # of the newest duration in the moving average


class LookAhead:
    """The worker's look-ahead state: the lane (made on first use) and the moving
    average of its tasks' run times."""

    def __init__(self, slots: int, *, stop_after_failures: bool = False):
        self.slots = slots
        # A worker that stops after N failures in a row must not start a waiting task
        # before it has counted the failure just seen: the lane then holds on failure.
        self.stop_after_failures = stop_after_failures
        self.lane: Lane | None = None
        self.average: float | None = None  # seconds; None until a task ran

    def lane_for(self, processor: Any) -> Lane | None:
        """The lane if ``processor`` reports its calls' start
        (checked per task: an ``InstanceProcessor`` knows only once started whether its
        call is sync)."""
        if not getattr(processor, "reports_start", False):
            return None
        if self.lane is None:
            self.lane = Lane(self.slots, hold_on_failure=self.stop_after_failures)
        return self.lane

    def extra_slots(self) -> int:
        """Messages the worker may hold beyond ``slots`` now."""
        if self.lane is None or self.average is None or self.average >= SHORT_TASK_SECONDS:
            return 0
        return self.slots * DEPTH

    def waited_too_long(self) -> None:
        """A looked-ahead call was withdrawn: a long task holds its slot; stop
        looking ahead until short tasks bring the average down again."""
        self.average = max(self.average or 0.0, WAIT_LIMIT_SECONDS)

    def ran(self, seconds: float) -> None:
        average = self.average
        self.average = seconds if average is None else average + _WEIGHT * (seconds - average)
