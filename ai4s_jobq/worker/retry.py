"""How long a failed task waits before its next attempt: the retry-delay policy.

A failing task retried at once fails again for the same transient reason (a busy
service, a node still warming up) and burns its attempts in seconds; a fleet of
workers retrying at once hammers what is already struggling.  So a failed attempt
is put back *delayed*, by each broker's own mechanism (a scheduled message on Service
Bus and local, the visibility timeout on Storage Queue; see
``Backend.reschedule``), and the delay grows exponentially with jitter.

The policy is a small value object parsed from the ``--retry-delay`` option:

* ``exp`` (the default) -- ``exp:10s:10m:2``: 10 s after the first failure, doubling,
  capped at 10 minutes; each delay is drawn from [75 %, 100 %] of that value, so
  workers that failed together do not come back together, and the cap holds;
* ``exp:BASE[:CAP[:FACTOR]]`` -- the same with other numbers;
* ``D`` (e.g. ``30s``, ``2m``) -- the same fixed delay each time, no jitter;
* ``0`` -- retry at once.

Interruptions (preemption, shutdown, time limit) are not failures and are put
back at once, whatever the policy says.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ..durations import MAX_DURATION, DurationError, parse_duration

#: The fraction of a delay that jitter may take away (never adds: the cap holds).
JITTER = 0.25
DEFAULT_SPEC = "exp:10s:10m:2"


@dataclass(frozen=True)
class RetryDelay:
    base: float = 10.0  # seconds before the second attempt
    factor: float = 2.0  # growth per further failure (1 = fixed delay)
    cap: float = 600.0  # never longer than this
    jitter: float = JITTER  # fraction of the delay drawn at random (taken off)

    def __post_init__(self) -> None:
        """A nan or infinite delay reached the broker's reschedule as an error (the
        task's retry lost); a factor below 1 shrank the delays."""
        longest = MAX_DURATION.total_seconds()
        if not (0 <= self.base <= self.cap <= longest):  # false for nan too
            raise ValueError(
                f"retry delay base and cap must be 0 <= base <= cap <= {longest:g} seconds, "
                f"not base={self.base} cap={self.cap}"
            )
        if not 1 <= self.factor < math.inf:
            raise ValueError(f"retry delay factor must be >= 1, not {self.factor}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"retry delay jitter must be from 0 to 1, not {self.jitter}")

    @classmethod
    def immediate(cls) -> RetryDelay:
        return cls(base=0.0, factor=1.0, cap=0.0, jitter=0.0)

    @classmethod
    def fixed(cls, seconds: float) -> RetryDelay:
        return cls(base=seconds, factor=1.0, cap=seconds, jitter=0.0)

    @classmethod
    def parse(cls, spec: str) -> RetryDelay:
        """Parse a ``--retry-delay`` value (see the module docstring); raises
        ``ValueError`` with a message that says what is accepted."""
        text = spec.strip().lower()
        try:
            if text in ("0", "0s", "none"):
                return cls.immediate()
            if text == "exp" or text.startswith("exp:"):
                parts = text.split(":")[1:]
                defaults = DEFAULT_SPEC.split(":")[1:]
                if len(parts) > len(defaults):
                    raise ValueError("too many parts")
                base, cap, factor = parts + defaults[len(parts) :]
                base_seconds, cap_seconds = _seconds(base), _seconds(cap)
                if float(factor) < 1 or cap_seconds < base_seconds:
                    raise ValueError("the factor must be >= 1 and the cap >= the base")
                return cls(base=base_seconds, cap=cap_seconds, factor=float(factor))
            return cls.fixed(_seconds(text))
        except (ValueError, DurationError) as exc:
            raise ValueError(
                f"--retry-delay {spec!r}: {exc}. Use 0, a duration (30s, 2m) or "
                "exp[:BASE[:CAP[:FACTOR]]] (default exp:10s:10m:2)"
            ) from None

    def seconds(self, failures: int, *, rng: random.Random | None = None) -> float:
        """The delay after the ``failures``-th failed attempt (1 for the first)."""
        if failures < 1 or self.cap <= 0:
            return 0.0
        # Bound the exponent: a float power of a large count overflows.
        delay = min(self.cap, self.base * self.factor ** min(failures - 1, 64))
        if self.jitter:
            delay *= 1 - self.jitter * (rng or random).random()
        return delay

    def describe(self) -> str:
        if self.cap <= 0:
            return "immediate"
        if self.factor == 1:
            return f"fixed {self.base:g}s"
        return f"exponential from {self.base:g}s, x{self.factor:g}, cap {self.cap:g}s, jitter"


def _seconds(text: str) -> float:
    if text.strip() in ("0", "0s"):
        return 0.0
    return parse_duration(text, bare_unit="s").total_seconds()
