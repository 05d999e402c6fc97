"""A push batch written from a thread of its own while ``push_many`` builds the next.

Why: on ``local://`` a pushed batch is two kinds of work of about the same size.
Building its tasks (normalising the arguments, canonical JSON, the MD5, the envelope)
is Python and holds the GIL; writing them (the broker's and the ledger's SQLite
statements) runs mostly inside SQLite, which ``sqlite3`` runs with the GIL released.
One after the other they add up; here the loop's thread builds batch N+1 while a
writer thread writes batch N, so on two cores much of the SQLite part hides behind the
Python part.  Measured (session 9, 2 cores, ``push_many`` of 100,000 small dicts with
the ledger, 5 alternating runs each): median 48,900/s before, 59,500/s with the
writer and sorted IDs (:mod:`ai4s_jobq.sqlite_bulk`).  The writer is now the slower
side (its CPU time is about twice the builder's): what it still does in Python --
message, result and outcome objects, JSON arrays -- is the next place to look.

How, and the rules that keep it correct:

* A backend offers a writer with :meth:`~ai4s_jobq.backends.base.Backend.push_writer`
  (a single thread: batches are written in order, and the backend keeps that thread's
  SQLite connection warm across calls).  Only backends whose ``push`` does blocking
  I/O on the calling thread and never suspends offer one; the ledger must say the same
  (:attr:`~ai4s_jobq.ledger.base.LedgerStore.never_suspends`), else ``push_many``
  sends on the event loop as before.
* The whole send of a batch -- the ledger's ``--skip-succeeded`` check, the broker's
  send, the ledger's records, the push span -- runs in the writer as one call:
  :func:`run_in_writer` drives its coroutine to the end without an event loop (the
  loop's thread is busy building; a step that waited for it would wait for the whole
  next batch).  A coroutine that does suspend is a programming error and raises.
* It runs in a copy of the caller's context (``contextvars``), so a push span has
  the pipeline's current span as its parent, as it would on the loop.
* The builder offers the GIL every :data:`OFFER_GIL_EVERY` tasks while a batch is being
  written (:func:`offer_gil`).  Without that, the writer, back from each SQLite
  statement, waits up to the interpreter's switch interval (5 ms) for the builder to
  let go -- several times per batch.  A first version without it (session 8) spent
  1.5x its CPU time in wall time and gained only 12%.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")

#: Tasks built between two offers of the GIL to the writer (about 0.4 ms of building):
#: the writer waits at most that long after a statement, and an offer nobody takes
#: costs well under a microsecond.
OFFER_GIL_EVERY = 64


async def run_in_writer(writer: Executor, start: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine ``start()`` makes to its end in ``writer``'s thread, in a copy
    of this context.  (Made there, not here: a batch that never reaches the writer
    leaves no coroutine behind that was never awaited.)"""
    context = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(writer, context.run, complete_inline, start)


def complete_inline(start: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """The result of the coroutine ``start()`` makes, which must finish without
    suspending; one that suspends (awaits real I/O) is closed and reported as the bug
    it is here."""
    coroutine = start()
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    name = getattr(coroutine, "__qualname__", coroutine)
    raise RuntimeError(
        f"{name} suspended in the push writer thread: a backend or ledger that awaits "
        "real I/O must not offer a push writer"
    )


def offer_gil() -> None:
    """Let a thread waiting for the GIL take it now (``sleep(0)`` releases it)."""
    time.sleep(0)
