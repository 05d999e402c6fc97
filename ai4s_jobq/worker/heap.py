"""A worker process's start-up objects, moved out of the garbage collector's way.

Why: before its first task, a ``jobq worker`` process has imported its task code, the
Azure SDKs and, with telemetry on, the OpenTelemetry SDK: tens of thousands of objects
that live as long as the process.  CPython's full collections traverse every one of
them each time (a few times per 20,000 no-op tasks).  Measured (session 10, 2 cores,
20,000 no-op tasks drained by a worker with OTLP export on, separate processes, three
pairs): full collections took 97-113 ms of the drain, about 5 us per task;
after :func:`freeze_startup_objects`, 1-2 ms (the collector's time in all: 7-9 us
per task before, 3 us after).  Without telemetry they took ~27 ms.

Only a process jobq owns calls it (``jobq worker``, just before its loop starts): a
library must not freeze its host program's heap.  What it costs: the objects alive at
that moment are never collected, which for start-up state (modules, clients,
configuration) they would not have been anyway; garbage is collected first.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Collect, then move every object tracked now to the permanent generation."""
    gc.collect()
    gc.freeze()
