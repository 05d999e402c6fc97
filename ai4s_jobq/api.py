"""Synchronous entry points for pipelines: ``push`` and ``push_many``.

Each call opens the queue, pushes and closes it.  Inside an event loop use
``JobQ`` instead (these functions refuse to nest event loops).

``push_many(...).wait(timeout=None)`` waits for the tasks that push accepted
(duplicates included) and returns a :class:`~ai4s_jobq.ledger.wait.WaitReport`.  The
rule for memory: with ``tag=`` the result holds no IDs and waits on the tag (which
also covers earlier pushes under the same tag); without a tag it keeps every accepted
ID (about 100 bytes each), so give huge pushes a tag.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from .backends.base import PushOutcome
from .jobq import JobQ, PushFailure, PushResult, PushSummary, TaskInput
from .ledger.base import check_tag
from .ledger.wait import WaitReport


@dataclass
class PushManyResult(PushSummary):
    """A :class:`PushSummary` that can wait for the tasks it pushed."""

    tag: str | None = None
    ids: list[str] | None = None  # accepted IDs when there is no tag
    queue: str | None = None
    connection_string: str | None = field(default=None, repr=False)
    ledger: str | None = None

    def wait(self, timeout: float | None = None) -> WaitReport:
        """Block until every pushed task is succeeded or dead-lettered (or
        ``timeout`` seconds); ``report.exit_code`` is 0 when all succeeded."""

        async def main() -> WaitReport:
            async with JobQ.open(
                self.queue,
                connection_string=self.connection_string,
                ledger=self.ledger,
                check=False,
                create=False,
            ) as q:
                if self.tag is not None:
                    return await q.wait(tag=self.tag, timeout=timeout)
                return await q.wait(ids=self.ids or [], timeout=timeout)

        return _run(main())  # type: ignore[no-any-return]


def _run(coro: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise RuntimeError(
        "ai4s_jobq.push/push_many cannot run inside an event loop; "
        "use `async with JobQ.open(...) as q: await q.push(...)`"
    )


def push(
    task: TaskInput,
    *,
    queue: str | None = None,
    connection_string: str | None = None,
    num_retries: int | None = None,
    id: str | None = None,
    dedup_keys: Iterable[str] | None = None,
    deterministic: bool | None = None,
    dedup_window: timedelta | str | int | None = None,
    env: Mapping[str, str] | None = None,
    tag: str | None = None,
    ledger: str | None = None,
) -> PushResult:
    """Push one task (a shell command string or a dict of arguments)."""
    if tag is not None:
        check_tag(tag)  # before the queue is opened (or made)

    async def main() -> PushResult:
        async with JobQ.open(
            queue, connection_string=connection_string, dedup_window=dedup_window, ledger=ledger
        ) as q:
            return await q.push(
                task,
                num_retries=num_retries,
                id=id,
                dedup_keys=dedup_keys,
                deterministic=deterministic,
                env=env,
                tag=tag,
            )

    return _run(main())  # type: ignore[no-any-return]


def push_many(
    tasks: Iterable[TaskInput],
    *,
    queue: str | None = None,
    connection_string: str | None = None,
    num_retries: int | None = None,
    dedup_keys: Iterable[str] | None = None,
    deterministic: bool | None = None,
    dedup_window: timedelta | str | int | None = None,
    env: Mapping[str, str] | None = None,
    batch_size: int | None = None,
    on_result: Callable[[int, str | None, PushOutcome | PushFailure], None] | None = None,
    tag: str | None = None,
    skip_succeeded: bool = False,
    ledger: str | None = None,
) -> PushManyResult:
    """Push many tasks, streaming from ``tasks`` in batches.  Memory is constant only
    with a tag: without one, every accepted ID is kept for ``.wait()`` (see the module
    docstring).  ``tag`` records the tasks as members of a run; ``skip_succeeded``
    leaves out tasks the ledger records as succeeded."""
    if tag is not None:
        check_tag(tag)  # before the queue is opened (or made)
    ids: list[str] | None = None if tag is not None else []

    def collect(index: int, task_id: str | None, outcome: PushOutcome | PushFailure) -> None:
        if ids is not None and task_id is not None and not isinstance(outcome, PushFailure):
            ids.append(task_id)
        if on_result is not None:
            on_result(index, task_id, outcome)

    async def main() -> PushSummary:
        async with JobQ.open(
            queue, connection_string=connection_string, dedup_window=dedup_window, ledger=ledger
        ) as q:
            return await q.push_many(
                tasks,
                num_retries=num_retries,
                dedup_keys=dedup_keys,
                deterministic=deterministic,
                env=env,
                batch_size=batch_size,
                on_result=collect,
                tag=tag,
                skip_succeeded=skip_succeeded,
            )

    summary: PushSummary = _run(main())
    return PushManyResult(
        **summary.__dict__,
        tag=tag,
        ids=ids,
        queue=queue,
        connection_string=connection_string,
        ledger=ledger,
    )
