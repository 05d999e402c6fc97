"""Checks of the counts and seconds a program passes to the library.

Why a module: the CLI's option types bound what a user types, but a program calling
``JobQ.peek(-1)`` or ``WorkerPolicy(slots=0)`` bypasses them, and such values did harm
(a whole queue listed, a worker waiting for ever).  The library's entry points and
policy objects check their arguments with these two functions, so the rule and its
message are written once.  Bools are refused although they are ints: ``slots=True``
is a mistake, not one slot.
"""

from __future__ import annotations

import math


def check_count(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an integer of at least ``minimum``, else a ValueError naming
    ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {wanted}, not {value!r}")
    return value


def check_seconds(name: str, value: object) -> float:
    """``value`` if it is a finite number of seconds, 0 or more (not nan), else a
    ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be finite seconds >= 0, not {value!r}")
    return float(value)
