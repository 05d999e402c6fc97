"""Opening the queues (and their ledgers) that the dashboard and ``jobq top`` watch.

One place decides how a view gets from queue specs to :class:`~.snapshot.QueueSource`
objects, so the two commands cannot drift apart.  Queues are opened without creating
them and without the startup checker (a view must not change what it watches), and
one ``counts()`` is read up front so that a wrong name or credential fails the command
at once with a clear error instead of a page full of errors.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from ..jobq import JobQ
from ..ledger.base import LedgerError, LedgerStore
from .snapshot import QueueSource, bounded

NO_LEDGER_NOTE = (
    "This queue has no ledger: only queue counts are shown (depth, net drain rate, "
    "dead-letter list). Outcomes, failures, runtimes and workers need a ledger."
)


async def open_ledger(q: JobQ) -> tuple[LedgerStore | None, str | None]:
    """The queue's ledger and None, or None and why there is none."""
    opener = getattr(q, "ledger", None)
    if opener is None:
        return None, NO_LEDGER_NOTE
    try:
        store = opener() if callable(opener) else opener
        if asyncio.iscoroutine(store):
            store = await store
    except LedgerError as exc:
        return None, f"{NO_LEDGER_NOTE} ({exc})"
    if store is None:
        return None, NO_LEDGER_NOTE
    return store, None


@contextlib.asynccontextmanager
async def open_sources(
    specs: Sequence[str | None], connection_string: str | None = None
) -> AsyncIterator[list[QueueSource]]:
    """Open every queue in ``specs`` (None = the default queue) for watching."""
    async with contextlib.AsyncExitStack() as stack:
        sources = []
        for spec in specs or [None]:
            q = await stack.enter_async_context(
                JobQ.open(spec, connection_string=connection_string, check=False, create=False)
            )
            await bounded(q.counts())
            ledger, note = await open_ledger(q)
            if ledger is not None:
                await stack.enter_async_context(ledger)
            sources.append(QueueSource(q.backend.description, q, ledger, note))
        yield sources
