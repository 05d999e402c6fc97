"""How a synchronous Python task is called without blocking the event loop.

The loop renews locks and settles messages while tasks run, so a sync function must run
off the loop's thread.  This module is the one place that decides how (today: the
default executor via :func:`asyncio.to_thread`), so the hop can be made cheaper without
touching the processors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any


async def run_sync(function: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
    """Call ``function(**kwargs)`` in a worker thread and return its result."""
    return await asyncio.to_thread(function, **kwargs)
