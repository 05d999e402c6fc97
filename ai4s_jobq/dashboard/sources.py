"""Opening the queues (and their ledgers) that the dashboard and ``jobq top`` watch.

One place decides how a view gets from queue specs to :class:`~.snapshot.QueueSource`
objects, so the two commands cannot drift apart.  Queues are opened without creating
them and without the startup checker (a view must not change what it watches), and
one ``counts()`` is read up front so that a wrong name or credential fails the command
at once with a clear error instead of a page full of errors.  Each queue's ledger is
the one :func:`ai4s_jobq.ledger.resolve.ledger_for` picks (``JobQ.ledger``); a ledger
that cannot be reached is not fatal: the views show the error beside the counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from ..jobq import JobQ
from ..ledger.recorder import heartbeat_seconds_from_env
from ..ledger.resolve import NO_LEDGER_HELP
from .snapshot import QueueSource, bounded

NO_LEDGER_NOTE = (
    "This queue has no ledger, so only queue counts are shown (depth, net drain rate, "
    "dead-letter list): " + NO_LEDGER_HELP
)


@contextlib.asynccontextmanager
async def open_sources(
    specs: Sequence[str | None],
    connection_string: str | None = None,
    *,
    ledger: str | None = None,
) -> AsyncIterator[list[QueueSource]]:
    """Open every queue in ``specs`` (None = the default queue) for watching;
    ``ledger`` is the ``--ledger ACCOUNT[/TABLE]`` setting (Service Bus)."""
    heartbeat = heartbeat_seconds_from_env()
    async with contextlib.AsyncExitStack() as stack:
        sources = []
        for spec in specs or [None]:
            q = await stack.enter_async_context(
                JobQ.open(
                    spec,
                    connection_string=connection_string,
                    check=False,
                    create=False,
                    ledger=ledger,
                )
            )
            await bounded(q.counts())
            note = None if q.ledger is not None else NO_LEDGER_NOTE
            sources.append(
                QueueSource(q.backend.description, q, q.ledger, note, heartbeat_seconds=heartbeat)
            )
        yield sources
