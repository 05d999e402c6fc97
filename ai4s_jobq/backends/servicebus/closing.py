"""Closing SDK clients without waiting for their keep-alive coroutine.

Measured (azure-servicebus 7.15, pyamqp, against the emulator): ``close()`` on a
sender or receiver writes its detach, end and close frames within a few
milliseconds, then awaits the handler's keep-alive coroutine, which only looks
at its shutdown flag between ``asyncio.sleep(1)`` steps.  So every close took
0-1 s (0.5 s on average) after its last frame was out: a third of a short
``jobq`` command, and a full second for a command with two links.

:func:`close_all` starts the closes together and waits for them at most
:data:`CLOSE_GRACE`.  A close still running by then is left to finish in the
background (its task is referenced here, so it is not collected half way); at
the end of ``asyncio.run`` it is cancelled while it sleeps.  The broker has the
frames either way, and a connection that drops before them is handled by the
broker like any lost connection (locks it held expire; nothing is lost).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from .errors import _short

log = logging.getLogger("ai4s_jobq.servicebus")

#: how long a close may take before it is left to finish in the background
CLOSE_GRACE = 0.1

_background: set[asyncio.Future[None]] = set()


async def quiet_close(closable: Any) -> None:
    try:
        await closable.close()
    except Exception as exc:  # closing a broken link: nothing left to save
        log.debug("closing %s: %s", type(closable).__name__, _short(exc))


async def close_all(closables: Iterable[Any], grace: float = CLOSE_GRACE) -> None:
    """Close every non-None object in ``closables``; wait at most ``grace`` seconds."""
    closing = [asyncio.ensure_future(quiet_close(c)) for c in closables if c is not None]
    if not closing:
        return
    _, pending = await asyncio.wait(closing, timeout=grace)
    for future in pending:
        _background.add(future)
        future.add_done_callback(_background.discard)
