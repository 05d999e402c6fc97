"""How a worker stops: signals, preemption notices, the grace period, and the exit code.

A mixin of :class:`~ai4s_jobq.worker.loop.Worker`, apart so that :mod:`.loop` reads as
the receive loop and one message's life; these methods run when intake stops and
decide what happens to the tasks still running or waiting in a slot's lane.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import TYPE_CHECKING

from .preemption import EvictionNotice, grace_for
from .settings import ExitCode

if TYPE_CHECKING:
    from .running import Running
    from .settings import WorkerPolicy, WorkerStats
    from .wakeup import Wakeup

log = logging.getLogger("ai4s_jobq.worker")


class Stopping:
    """The worker's stopping half (see the module docstring)."""

    policy: WorkerPolicy
    stats: WorkerStats
    _running: set[Running]
    _slot_freed: Wakeup
    _signal: int | None
    _stop: str | None
    _kill_at: float | None
    _notice: EvictionNotice | None

    if TYPE_CHECKING:

        async def _wait_for(self, event: Wakeup, timeout: float) -> None: ...

    def _withdraw_waiting(self) -> None:
        """Stopping: looked-ahead messages that have not begun go back unchanged."""
        for running in list(self._running):
            if running.run is None and running.working:
                running.stop()

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._signal is None:
            self._signal = signum
            self._stop = self._stop or f"signal {name}"
            # Also after --time-limit fired: running tasks get the grace period, no more.
            self._kill_at = time.monotonic() + self.policy.grace_period
            log.warning(
                "received %s: no new tasks; running tasks get %.0fs to finish",
                name,
                self.policy.grace_period,
            )
        else:
            log.warning("second signal: cancelling running tasks now")
            self._cancel_running("Shutdown")
        self._slot_freed.set()

    def _on_preemption(self, notice: EvictionNotice) -> None:
        """An eviction notice: stop intake, SIGTERM running tasks now so they can
        checkpoint, kill them when the (deadline-bounded) grace ends, and put their
        messages back at once."""
        self._notice = notice
        grace = grace_for(notice, self.policy.grace_period)
        left = notice.seconds_left()
        log.warning(
            "%s notice (event %s, %s): no new tasks; stopping %d running task(s) with "
            "%.0fs to checkpoint",
            notice.event_type,
            notice.event_id,
            "due now" if left is None else f"due in {left:.0f}s",
            len([r for r in self._running if not r.settling]),
            grace,
        )
        self._stop = f"preempted ({notice.event_type})"
        self._cancel_running("Preempted", grace)
        self._slot_freed.set()

    async def _finish_running(self) -> None:
        """Wait for running tasks (and settles); once ``_kill_at`` passes (set by a
        signal, even after the time limit stopped intake), cancel what still runs."""
        cancelled = False
        while self._running:
            self._slot_freed.clear()
            wait = 3600.0
            if self._kill_at is not None and not cancelled:
                left = self._kill_at - time.monotonic()
                if left <= 0:
                    log.warning("grace period over: cancelling running task(s)")
                    self._cancel_running("Shutdown")
                    cancelled = True
                else:
                    wait = left
            await self._wait_for(self._slot_freed, wait)

    def _cancel_running(self, reason: str, grace: float | None = None) -> None:
        """Cancel running tasks; each processor stops its work (the shell processor
        sends SIGTERM, then SIGKILL after ``grace`` or its own default)."""
        for running in list(self._running):
            if running.working:
                running.interrupted = running.interrupted or reason
                if running.context is not None and grace is not None:
                    running.context.stop.grace = grace
                running.stop()

    def _exit_code(self) -> int:
        if self.stats.exit_code == ExitCode.CONFIGURATION:
            return ExitCode.CONFIGURATION
        if self._signal is not None:
            return 128 + self._signal
        if self.stats.stop_reason == "too many consecutive failures":
            return ExitCode.TOO_MANY_FAILURES
        if self.policy.max_tasks == 1 and self.stats.failed + self.stats.malformed > 0:
            return ExitCode.TASK_FAILED
        return ExitCode.OK
