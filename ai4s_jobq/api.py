"""Synchronous entry points for pipelines: ``push`` and ``push_many``.

Each call opens the queue, pushes and closes it.  Inside an event loop use
``JobQ`` instead (these functions refuse to nest event loops).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any

from .backends.base import PushOutcome
from .jobq import JobQ, PushFailure, PushResult, PushSummary, TaskInput


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
) -> PushResult:
    """Push one task (a shell command string or a dict of arguments)."""

    async def main() -> PushResult:
        async with JobQ.open(
            queue, connection_string=connection_string, dedup_window=dedup_window
        ) as q:
            return await q.push(
                task,
                num_retries=num_retries,
                id=id,
                dedup_keys=dedup_keys,
                deterministic=deterministic,
                env=env,
            )

    return _run(main())


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
) -> PushSummary:
    """Push many tasks, streaming from ``tasks`` in batches (constant memory)."""

    async def main() -> PushSummary:
        async with JobQ.open(
            queue, connection_string=connection_string, dedup_window=dedup_window
        ) as q:
            return await q.push_many(
                tasks,
                num_retries=num_retries,
                dedup_keys=dedup_keys,
                deterministic=deterministic,
                env=env,
                batch_size=batch_size,
                on_result=on_result,
            )

    return _run(main())
