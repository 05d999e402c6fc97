"""No-op task code for ``bench_processors.py`` (importable by pool processes)."""

from __future__ import annotations


def noop_sync(**_: object) -> None:
    return None


async def noop_async(**_: object) -> None:
    return None


class NoopClass:
    def setup(self) -> None:
        self.calls = 0

    def __call__(self, **_: object) -> None:
        self.calls += 1
