"""Move a queue's messages into another queue without losing or duplicating any.

Azure cannot switch on duplicate detection for an existing queue, so the way to
get it is a new queue plus a move.  :func:`migrate` works for any two backends:

1. receive a batch from the source in peek-lock (the messages stay in the source);
2. push them to the destination with the **same MessageId** (and body);
3. complete them in the source only after the destination accepted them.

An interruption anywhere loses nothing: an uncompleted source message comes back
when its lock expires.  A re-run duplicates nothing: the messages pushed before
the interruption are dropped by the destination's duplicate detection, because
their MessageIds are the same (the re-run must happen within the destination's
dedup window).  That is why the destination must deduplicate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .backends.base import Backend, BackendError, LockLostError, OutgoingMessage

log = logging.getLogger("ai4s_jobq.migrate")


class MigrationError(BackendError):
    pass


@dataclass
class MigrationReport:
    source: str
    destination: str
    moved: int = 0
    #: messages the destination refused (left in the source), as (MessageId, error)
    failed: list[tuple[str, str]] = field(default_factory=list)
    #: messages pushed whose source lock was lost before completion: they come back
    #: to the source and a re-run drops them at the destination as duplicates
    lock_lost: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "destination": self.destination,
            "moved": self.moved,
            "failed": [{"id": i, "error": e} for i, e in self.failed],
            "lock_lost": self.lock_lost,
        }


async def check_destination(
    source: Backend, destination: Backend, *, require_dedup: bool = True
) -> None:
    if source.description == destination.description:
        raise MigrationError(f"source and destination are the same queue ({source.description})")
    info = await destination.dedup_info()
    if info.duplicate_detection is False and require_dedup:
        raise MigrationError(
            f"{destination.description} has no duplicate detection: a re-run after an "
            "interruption could duplicate messages. Migrate into a queue created by jobq "
            "(duplicate detection on), or pass --allow-no-dedup to accept that risk."
        )
    if info.duplicate_detection is None:
        log.warning(
            "cannot read %s's duplicate-detection setting (%s); re-running an "
            "interrupted migration is only safe if it deduplicates",
            destination.description,
            info.note or "unknown",
        )


async def migrate(
    source: Backend,
    destination: Backend,
    *,
    dead_letter: bool = False,
    batch_size: int = 100,
    idle_timeout: float = 5.0,
    limit: int | None = None,
    require_dedup: bool = True,
    on_batch: Callable[[MigrationReport], None] | None = None,
) -> MigrationReport:
    """Move messages from ``source`` (its dead-letter queue with ``dead_letter``) to
    ``destination`` until the source stays empty for ``idle_timeout`` seconds or
    ``limit`` messages were moved.  Both backends must be open."""
    await check_destination(source, destination, require_dedup=require_dedup)
    report = MigrationReport(
        source.description + (" (dead-letter)" if dead_letter else ""), destination.description
    )
    refused: set[str] = set()
    last_message = time.monotonic()
    while limit is None or report.moved < limit:
        idle_left = idle_timeout - (time.monotonic() - last_message)
        if idle_left <= 0:
            break
        want = batch_size if limit is None else min(batch_size, limit - report.moved)
        batch = await source.receive(want, min(1.0, idle_left), dead_letter=dead_letter)
        batch = [m for m in batch if m.message_id not in refused]  # left locked: no loop
        if not batch:
            continue
        last_message = time.monotonic()
        outcomes = await destination.push([OutgoingMessage(m.message_id, m.body) for m in batch])

        async def settle(message, outcome) -> None:  # type: ignore[no-untyped-def]
            if outcome.error is not None:
                # Left locked in the source (not abandoned: that would count a
                # delivery each time); it is back after the lock expires.
                refused.add(message.message_id)
                report.failed.append((message.message_id, str(outcome.error)))
                log.error("%s was not moved: %s", message.message_id, outcome.error)
                return
            try:
                await source.complete(message)
            except LockLostError:
                report.lock_lost += 1
                log.warning(
                    "%s: source lock lost after the push; it will come back to the "
                    "source and a re-run drops it as a duplicate",
                    message.message_id,
                )
                return
            report.moved += 1

        await asyncio.gather(*(settle(m, o) for m, o in zip(batch, outcomes)))
        if on_batch is not None:
            on_batch(report)
    return report
