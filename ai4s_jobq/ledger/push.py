"""The ledger on the push path: tags, ``--skip-succeeded``, and one write per batch.

``JobQ.push_many`` hands each batch's send to :meth:`PushLedger.send`, which

1. with ``skip_succeeded``, asks the ledger which IDs already succeeded and leaves
   them out of the send (reported as duplicates with a :class:`SkippedOutcome`);
2. sends the rest through the backend;
3. records every accepted ID (new, duplicate, skipped) and its tag membership in one
   store call.

A ledger failure never fails a push the broker accepted: it is logged once, the
ledger is left alone for the rest of that push (an unreachable account would otherwise
cost its retries on every batch), and the push goes on.  What is then missing: the
``queued`` records and tag memberships of the batches from there on (their workers
still record the outcomes).  Skipping is best effort the same way: if the ledger cannot be
read, the batch is sent in full and the broker's duplicate detection still applies.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from ..backends.base import OutgoingMessage, PushOutcome
from ..redact import redact
from .base import LedgerStore
from .events import PushRecord

log = logging.getLogger("ai4s_jobq.ledger")

SKIPPED_REASON = "succeeded in the ledger (--skip-succeeded)"


@dataclass
class SkippedOutcome(PushOutcome):
    """Not sent: the ledger says this task already succeeded."""

    reason: str = SKIPPED_REASON


class PushLedger:
    """The ledger side of one ``push``/``push_many`` call."""

    def __init__(self, store: LedgerStore, *, tag: str | None = None, skip_succeeded: bool = False):
        self.store = store
        self.tag = tag
        self.skip_succeeded = skip_succeeded
        self._broken = False

    async def send(
        self,
        push: Callable[[Sequence[OutgoingMessage]], Awaitable[list[PushOutcome]]],
        messages: Sequence[OutgoingMessage],
    ) -> list[PushOutcome]:
        if self._broken:
            return list(await push(messages))
        skipped = await self._succeeded(messages) if self.skip_succeeded else set()
        outcomes: list[PushOutcome]
        if skipped:
            to_send = [m for m in messages if m.message_id not in skipped]
            sent = iter(await push(to_send) if to_send else [])
            outcomes = [
                SkippedOutcome(m.message_id, True) if m.message_id in skipped else next(sent)
                for m in messages
            ]
        else:  # the usual case: everything is sent
            outcomes = list(await push(messages))
        # The outcomes are the records (a skipped task's says duplicate=True).
        await self.record([o for o in outcomes if o.error is None])
        return outcomes

    async def record(self, entries: list[PushRecord]) -> None:
        """Record accepted IDs under this push's tag; a failure is logged, not raised."""
        try:
            await self.store.record_pushes(entries, self.tag)
        except Exception as exc:  # noqa: BLE001 - the broker accepted the push
            self._warn(exc, f"{len(entries)} pushed task(s) are not recorded")

    async def _succeeded(self, messages: Sequence[OutgoingMessage]) -> set[str]:
        try:
            return await self.store.succeeded_among([m.message_id for m in messages])
        except Exception as exc:  # noqa: BLE001
            self._warn(exc, "--skip-succeeded cannot check this batch; it is pushed in full")
            return set()

    def _warn(self, exc: BaseException, consequence: str) -> None:
        if self._broken:
            return
        self._broken = True
        log.warning(
            "ledger (%s) unavailable: %s: %s; the push goes on without it; %s",
            self.store.description,
            type(exc).__name__,
            redact(str(exc))[:300],
            consequence,
        )
