"""The ``JobQ`` client: tasks in, tasks out, on any backend.

``JobQ`` turns tasks into messages (ID, envelope) and hands them to a
:class:`~ai4s_jobq.backends.base.Backend`.  It also carries the operations every
backend shares: counts, peek, clear, the dead-letter tools and the startup check.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from . import checker
from .arguments import check_count
from .backends.base import (
    Backend,
    BackendError,
    ConnectionFailedError,
    OutgoingMessage,
    PermanentBackendError,
    PushOutcome,
    QueueCounts,
    QueueSettings,
    ReceivedMessage,
)
from .durations import check_timeout, parse_duration
from .ids import ConfigError, TaskEncodingError, check_id_iterable, deterministic_ids_enabled
from .ledger.base import LedgerStore, StatusSummary, TaskRecord, check_tag
from .ledger.events import PushEntry
from .ledger.push import PushLedger
from .ledger.resolve import ledger_for, require
from .ledger.wait import ProgressCallback, WaitReport, wait_for_tasks
from .push_writer import OFFER_GIL_EVERY, offer_gil, run_in_writer
from .spec import CONNECTION_STRING_ENV, make_backend, parse_spec
from .task import MalformedTaskError, Task, make_task
from .telemetry.push import push_telemetry

log = logging.getLogger("ai4s_jobq")

DEFAULT_DEDUP_WINDOW = timedelta(days=7)
DEDUP_WINDOW_ENV = "JOBQ_DEDUP_WINDOW"
TaskInput = str | Mapping[str, Any] | Task


@dataclass
class PushResult:
    id: str
    duplicate: bool | None  # None where the backend cannot know


@dataclass
class PushFailure:
    index: int
    id: str | None
    error: str


@dataclass
class PushSummary:
    pushed: int = 0
    duplicates: int = 0
    unknown: int = 0  # accepted, but the backend cannot tell whether it was a duplicate
    failures: list[PushFailure] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.pushed + self.duplicates + self.unknown + len(self.failures)


@dataclass
class DeadLetteredTask:
    message_id: str
    task: Task | None
    reason: str | None
    description: str | None
    delivery_count: int
    raw: bytes = b""


class JobQ:
    """A queue of tasks.  Use :meth:`open`::

    async with JobQ.open("local://demo") as q:
        result = await q.push("echo hello")
    """

    def __init__(
        self,
        backend: Backend,
        *,
        dedup_window: timedelta | None = None,
        lock_duration: timedelta | None = None,
        deterministic: bool | None = None,
        ledger: LedgerStore | None = None,
    ):
        self.backend = backend
        #: the outcome ledger (None: this queue has none, e.g. Service Bus without --ledger)
        self.ledger = ledger
        self.configured_window = dedup_window
        self.settings = QueueSettings(
            dedup_window=dedup_window or DEFAULT_DEDUP_WINDOW,
            lock_duration=lock_duration or QueueSettings.lock_duration,
        )
        self.deterministic = deterministic

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        spec: str | None = None,
        *,
        connection_string: str | None = None,
        dedup_window: timedelta | str | int | None = None,
        lock_duration: timedelta | None = None,
        deterministic: bool | None = None,
        check: bool = True,
        create: bool = True,
        ledger: str | None = None,
    ) -> AsyncIterator[JobQ]:
        """Connect to the queue named by ``spec`` (see :mod:`ai4s_jobq.spec`), create it
        on first use, and log the startup checker's warnings.  ``ledger`` names the
        outcome ledger's Azure Table (``ACCOUNT[/TABLE]``, see :mod:`ai4s_jobq.ledger.resolve`)."""
        connection_string = connection_string or os.environ.get(CONNECTION_STRING_ENV) or None
        window = configured_dedup_window(dedup_window)
        backend = make_backend(
            parse_spec(spec, connection_string), connection_string, dedup_window=window
        )
        q = cls(
            backend,
            dedup_window=window,
            lock_duration=lock_duration,
            deterministic=deterministic,
            ledger=ledger_for(backend, ledger),
        )
        await backend.open()
        try:
            if create:
                await backend.ensure_queue(q.settings)
            if check:
                checker.log_findings(await q.check())
            yield q
        finally:
            try:
                if q.ledger is not None:
                    await q.ledger.close()
            finally:
                await backend.close()

    # ------------------------------------------------------------------ producing

    def make_task(self, task: TaskInput, **options: Any) -> Task:
        options.setdefault("deterministic", self.deterministic)
        return make_task(task, **options)

    async def push(
        self,
        task: TaskInput,
        *,
        num_retries: int | None = None,
        id: str | None = None,
        dedup_keys: Iterable[str] | None = None,
        deterministic: bool | None = None,
        env: Mapping[str, str] | None = None,
        tag: str | None = None,
    ) -> PushResult:
        """Push one task.  Raises on failure (e.g. ``MessageTooLargeError``).  ``tag``
        records the task's membership of a run in the ledger."""
        built = make_task(
            task,
            num_retries=num_retries,
            id=id,
            dedup_keys=dedup_keys,
            env=env,
            deterministic=self.deterministic if deterministic is None else deterministic,
        )
        ledger = self._push_ledger(tag, False)
        telemetry = push_telemetry(self.backend)  # None unless OpenTelemetry is configured
        if telemetry is not None:
            (outcome,) = await telemetry.push(lambda m: self._send(m, ledger), [built])
        else:
            message = OutgoingMessage(built.id, built.to_body())
            (outcome,) = await self._send([message], ledger)
        if outcome.error is not None:
            raise outcome.error
        return PushResult(built.id, outcome.duplicate)

    async def push_many(
        self,
        tasks: Iterable[TaskInput | Exception],
        *,
        num_retries: int | None = None,
        dedup_keys: Iterable[str] | None = None,
        deterministic: bool | None = None,
        env: Mapping[str, str] | None = None,
        batch_size: int | None = None,
        on_result: Callable[[int, str | None, PushOutcome | PushFailure], None] | None = None,
        tag: str | None = None,
        skip_succeeded: bool = False,
    ) -> PushSummary:
        """Push tasks from an iterable in batches, holding only a few batches in memory
        (a batch ends at the backend's ``push_batch_size`` tasks or ``push_batch_bytes``
        of bodies, whichever comes first).

        A task that cannot be built or sent is recorded in ``summary.failures`` with
        its index; the others are still pushed.  An ``Exception`` instance among
        ``tasks`` stands for an input the caller could not read: it is recorded as a
        failure at its index.  ``on_result(index, id, outcome)``
        is called for every task, in order.  ``tag`` records every accepted task
        (duplicates included) as a member of that run in the ledger; with
        ``skip_succeeded`` a task the ledger records as succeeded is not sent again
        (its outcome is a ``SkippedOutcome``, counted as a duplicate).
        """
        if isinstance(tasks, (str, bytes, Mapping)):
            # iterating it would push each character (or key) as a shell command
            raise TypeError(
                f"push_many takes an iterable of tasks, not one {type(tasks).__name__}; "
                "push() pushes a single task"
            )
        if batch_size is not None:
            check_count("batch_size", batch_size, 1)
        self.backend.prepare_push()
        size = batch_size or self.backend.push_batch_size
        keys = list(dedup_keys) if dedup_keys is not None else None
        det = self.deterministic if deterministic is None else deterministic
        if det is None:
            det = _deterministic_setting()
        summary = PushSummary()
        ledger = self._push_ledger(tag, skip_succeeded)
        # Each entry is (index, task) or (index, the error that prevented building it);
        # failures travel with their batch so results are reported in input order.
        Entry = tuple[int, Task | Exception]
        pending: list[tuple[list[Entry], asyncio.Future[list[PushOutcome]]]] = []

        telemetry = push_telemetry(self.backend)  # checked once: None when telemetry is off
        # A batch is written in the backend's writer thread while the next is built
        # (see ai4s_jobq.push_writer), when the backend and the ledger allow it.
        suspends = ledger is not None and not ledger.store.never_suspends
        writer = None if suspends else self.backend.push_writer()
        in_flight = 2 if writer is not None else self.backend.push_concurrency

        async def send(batch: list[Entry], bodies: list[bytes]) -> list[PushOutcome]:
            """``bodies``: those of the batch's tasks, in order (built as the tasks were,
            to size the batch)."""
            tasks = [t for _, t in batch if isinstance(t, Task)]
            if not tasks:
                return []
            start: Callable[[], Coroutine[Any, Any, list[PushOutcome]]]
            if telemetry is not None:  # it writes the trace context into each body
                start = functools.partial(telemetry.push, lambda m: self._send(m, ledger), tasks)
            else:
                messages = [OutgoingMessage(t.id, body) for t, body in zip(tasks, bodies)]
                start = functools.partial(self._send, messages, ledger)
            if writer is not None:
                return await run_in_writer(writer, start)
            return await start()

        def record(batch: list[Entry], outcomes: Sequence[PushOutcome]) -> None:
            sent = iter(outcomes)
            for index, built in batch:
                result: PushOutcome | PushFailure
                if isinstance(built, Exception):
                    result = PushFailure(index, None, str(built))
                else:
                    outcome = next(sent)
                    if isinstance(outcome.error, ConnectionFailedError):
                        raise outcome.error  # the same for every task: stop (see drain)
                    result = (
                        PushFailure(index, built.id, str(outcome.error))
                        if outcome.error is not None
                        else outcome
                    )
                if isinstance(result, PushFailure):
                    summary.failures.append(result)
                elif result.duplicate is True:
                    summary.duplicates += 1
                elif result.duplicate is False:
                    summary.pushed += 1
                else:
                    summary.unknown += 1
                if on_result is not None:
                    on_result(
                        index,
                        result.id if isinstance(result, PushFailure) else result.message_id,
                        result,
                    )

        async def drain(keep: int) -> None:
            while len(pending) > keep:
                batch, job = pending.pop(0)
                try:
                    outcomes = await job
                except ConnectionFailedError:
                    # A broker that cannot be reached or refuses the credentials fails
                    # every task alike: one clear error, not one rejection per task.
                    for _, later in pending:
                        later.cancel()
                    raise
                except Exception as exc:  # the whole batch failed (after the backend's retries)
                    outcomes = [
                        PushOutcome(t.id, None, exc) for _, t in batch if isinstance(t, Task)
                    ]
                record(batch, outcomes)

        batch: list[Entry] = []
        bodies: list[bytes] = []
        batch_bytes, max_bytes = 0, self.backend.push_batch_bytes
        for index, item in enumerate(tasks):
            if writer is not None and pending and not index % OFFER_GIL_EVERY:
                offer_gil()  # to the writer, back from an SQLite statement
            built: Task | Exception
            if isinstance(item, Exception):  # an input the caller could not read
                built = item
            else:
                try:
                    built = make_task(
                        item, num_retries=num_retries, dedup_keys=keys, deterministic=det, env=env
                    )
                    body = built.to_body()
                    bodies.append(body)
                    batch_bytes += len(body)
                except (TaskEncodingError, ValueError, TypeError) as exc:
                    built = exc
            batch.append((index, built))
            if len(batch) >= size or batch_bytes >= max_bytes:
                pending.append((batch, asyncio.ensure_future(send(batch, bodies))))
                batch, bodies, batch_bytes = [], [], 0
                await drain(in_flight - 1)
        if batch:
            pending.append((batch, asyncio.ensure_future(send(batch, bodies))))
        await drain(0)
        return summary

    def _push_ledger(self, tag: str | None, skip_succeeded: bool) -> PushLedger | None:
        """The ledger side of a push (None without a ledger); called before anything
        is sent, so a bad tag stops the push before its first task."""
        if tag is not None:
            check_tag(tag)
        if self.ledger is None:
            if skip_succeeded:
                require(None)  # raises: says which setting names a ledger
            if tag is not None:
                log.warning("this queue has no ledger: tag %r is not recorded", tag)
            return None
        return PushLedger(self.ledger, tag=tag, skip_succeeded=skip_succeeded)

    async def _send(
        self, messages: Sequence[OutgoingMessage], ledger: PushLedger | None
    ) -> list[PushOutcome]:
        """One batch to the backend; with a ledger, through it (one ledger write)."""
        if ledger is None:
            return await self.backend.push(messages)
        return await ledger.send(self.backend.push, messages)

    # ------------------------------------------------------------------ outcomes

    async def wait(
        self,
        ids: Iterable[str] | None = None,
        tag: str | None = None,
        timeout: float | None = None,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> WaitReport:
        """Block until every task named (by ``ids`` or ``tag``) is succeeded or
        dead-lettered, or ``timeout`` seconds passed.  See :mod:`ai4s_jobq.ledger.wait`."""
        return await wait_for_tasks(
            require(self.ledger), ids=ids, tag=tag, timeout=timeout, on_progress=on_progress
        )

    async def result(self, id: str) -> TaskRecord | None:
        """The ledger's record of one task (``.result`` is a Python task's return value;
        ``.tags`` the tags it was pushed under)."""
        store = require(self.ledger)
        record = (await store.get([id])).get(id)
        if record is not None:
            record.tags = await store.tags_of(id)
        return record

    async def status(self, tag: str | None = None) -> StatusSummary:
        """Counts by state over ``tag`` (or the whole ledger) and recent throughput."""
        return await require(self.ledger).status(tag)

    async def wait_drained(self, timeout: float | None = None, poll: float = 0.5) -> bool:
        """Wait until the queue has no active or scheduled messages (no ledger needed).
        True when drained, False on timeout."""
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        delay = 0.02
        while True:
            counts = await self.backend.counts()
            if counts.active == 0 and not counts.scheduled:
                return True
            now = asyncio.get_running_loop().time()
            if deadline is not None and now >= deadline:
                return False
            delay = min(poll, delay * 1.5)
            await asyncio.sleep(delay if deadline is None else min(delay, deadline - now))

    # ------------------------------------------------------------------ inspecting

    async def counts(self) -> QueueCounts:
        return await self.backend.counts()

    async def peek(
        self, max_count: int = 10, *, dead_letter: bool = False
    ) -> list[DeadLetteredTask]:
        check_count("max_count", max_count, 1)  # SQLite reads LIMIT -1 as "no limit"
        return [_describe(m) for m in await self.backend.peek(max_count, dead_letter=dead_letter)]

    async def clear(self, *, dead_letter: bool = False) -> int:
        return await self.backend.clear(dead_letter=dead_letter)

    async def check(self) -> list[checker.Finding]:
        try:
            info = await self.backend.dedup_info()
        except (PermanentBackendError, ConnectionFailedError):
            raise
        except BackendError as exc:
            return [checker.Finding("info", "unreadable", f"could not read queue settings: {exc}")]
        deterministic = (
            self.deterministic if self.deterministic is not None else deterministic_ids_enabled()
        )
        return checker.evaluate(
            info,
            self.backend.description,
            deterministic=deterministic,
            configured_window=self.configured_window,
        )

    # ------------------------------------------------------------------ dead letters

    async def dlq_list(self, max_count: int = 100) -> list[DeadLetteredTask]:
        return await self.peek(max_count, dead_letter=True)

    async def dlq_purge(self) -> int:
        return await self.clear(dead_letter=True)

    async def dlq_requeue(self, ids: Iterable[str] | None = None, *, max_wait: float = 1.0) -> int:
        """Move dead-lettered tasks back to the queue with a fresh delivery count.

        ``ids=None`` requeues all.  The new message's ID is derived from the task ID
        and the dead-lettered message's identity (``requeue_message_id``), so the
        queue's duplicate detection does not drop it, while re-running an
        interrupted requeue does not create two copies.
        """
        check_id_iterable(ids)
        wanted = set(ids) if ids is not None else None
        seen: set[str] = set()
        moved = 0
        while True:
            batch = await self.backend.receive(32, max_wait, dead_letter=True)
            if not batch:
                return moved
            fresh = [m for m in batch if _dlq_key(m) not in seen]
            for message in batch:
                seen.add(_dlq_key(message))
            for message in batch:
                if message not in fresh or not _selected(message, wanted):
                    await self.backend.abandon(message)
                    continue
                await self._requeue_one(message)
                moved += 1
            if not fresh:
                return moved

    async def _requeue_one(self, message: ReceivedMessage) -> None:
        task_known = True
        try:
            task = Task.from_body(message.body)
        except MalformedTaskError:
            body, task_id, task_known = message.body, message.message_id, False
        else:
            from .worker.attempts import fresh_body  # a fresh set of attempts

            body, task_id = fresh_body(task), task.id
        new_id = requeue_message_id(task_id, _dlq_key(message))
        (outcome,) = await self.backend.push([OutgoingMessage(new_id, body)])
        if outcome.error is not None:
            raise outcome.error
        await self.backend.complete(message)
        if self.ledger is not None and task_known:
            # A new generation: the dead-lettered record goes back to queued.
            await PushLedger(self.ledger).record([PushEntry(task_id, False)])


def _deterministic_setting() -> bool | None:
    """``JOBQ_DETERMINISTIC_IDS``, read once per ``push_many`` rather than once per
    task (an environment lookup is a measurable share of building a task).  None
    when the value is invalid: each task then reports the error, as before."""
    try:
        return deterministic_ids_enabled()
    except ConfigError:
        return None


def requeue_message_id(task_id: str, dlq_key: str) -> str:
    digest = hashlib.md5(f"{task_id}\0requeue\0{dlq_key}".encode(), usedforsecurity=False)
    return digest.hexdigest()


def _dlq_key(message: ReceivedMessage) -> str:
    if message.sequence_number is not None:
        return f"seq:{message.sequence_number}"
    return f"msg:{message.message_id}:{message.enqueued_time}"


def _selected(message: ReceivedMessage, wanted: set[str] | None) -> bool:
    if wanted is None:
        return True
    if message.message_id in wanted:
        return True
    try:
        return Task.from_body(message.body).id in wanted
    except MalformedTaskError:
        return False


def _describe(message: ReceivedMessage) -> DeadLetteredTask:
    try:
        task: Task | None = Task.from_body(message.body)
    except MalformedTaskError:
        task = None
    return DeadLetteredTask(
        message_id=message.message_id,
        task=task,
        reason=message.dead_letter_reason,
        description=message.dead_letter_description,
        delivery_count=message.delivery_count,
        raw=message.body,
    )


def configured_dedup_window(value: timedelta | str | int | None) -> timedelta | None:
    """An explicitly configured window (argument, else ``JOBQ_DEDUP_WINDOW``), or None."""
    if value is not None:
        return parse_duration(value)
    raw = os.environ.get(DEDUP_WINDOW_ENV) or None
    if raw is None:
        return None
    try:
        return parse_duration(raw)
    except ValueError as exc:  # say where the value came from
        raise ValueError(f"{DEDUP_WINDOW_ENV}: {exc}") from None
