"""Reading an input file line by line with a bound on one line's length.

Why: a user's input file may have no newline at all (a JSON array dumped on one
line, ``/dev/zero``), and iterating a file object holds a whole line in memory,
however long.  ``jobq push`` (tasks) and ``jobq wait --from`` (the IDs ``push --json``
printed) read through :func:`numbered_lines` instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

#: The longest line read as a task: Service Bus Premium's largest message (100 MB),
#: more than any broker takes.  Without a bound, a file with no newline (a JSON
#: array dumped on one line, ``/dev/zero``) was read whole into memory.
MAX_LINE_CHARS = 100 * 1024 * 1024
_SKIP_CHUNK = 1024 * 1024


def numbered_lines(stream: Any, limit: int = MAX_LINE_CHARS) -> Iterator[tuple[int, str | None]]:
    """``(number, line)`` for each line of ``stream``, holding at most ``limit``
    characters of one: a longer line is skipped to its end in 1 MiB steps and given
    as ``(number, None)``, so the lines after it are still read."""
    number = 0
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        number += 1
        if len(line) <= limit or line.endswith("\n"):
            yield number, line
            continue
        while True:
            rest = stream.readline(_SKIP_CHUNK)
            if not rest or rest.endswith("\n"):
                break
        yield number, None
