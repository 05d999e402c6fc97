"""The local backend's shortcuts on its hot paths keep their answers for the unusual case:
a missing queue on receive, an oversized body among a batch on push."""

from __future__ import annotations

import pytest

from ai4s_jobq.backends.base import (
    MessageTooLargeError,
    OutgoingMessage,
    QueueSettings,
    QueueUnavailableError,
)
from ai4s_jobq.backends.local import LocalBackend


async def test_receive_on_a_missing_queue_says_it_is_created_by_the_first_push(tmp_path):
    backend = LocalBackend(tmp_path / "q.sqlite3", "nothing-here")
    await backend.open()
    try:
        with pytest.raises(QueueUnavailableError, match="created by the first push"):
            await backend.receive(1, 0.01)
    finally:
        await backend.close()


async def test_an_oversized_body_fails_alone_and_the_rest_of_the_batch_is_pushed(tmp_path):
    backend = LocalBackend(tmp_path / "q.sqlite3", "q")
    await backend.open()
    try:
        await backend.ensure_queue(QueueSettings())
        limit = backend.core.get_queue("q").max_message_size
        messages = [
            OutgoingMessage("a", b"{}"),
            OutgoingMessage("big", b"x" * (limit + 1)),
            OutgoingMessage("b", b"{}"),
            OutgoingMessage("a", b"{}"),
        ]
        outcomes = await backend.push(messages)
        assert [o.message_id for o in outcomes] == ["a", "big", "b", "a"]
        assert [o.duplicate for o in outcomes] == [False, None, False, True]
        assert isinstance(outcomes[1].error, MessageTooLargeError)
        assert (await backend.counts()).active == 2
    finally:
        await backend.close()
