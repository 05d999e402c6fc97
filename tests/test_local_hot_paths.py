"""The local backend's shortcuts on its hot paths keep their answers for the unusual case:
a missing queue on receive, an oversized body among a batch on push, a completion
committed by the next receive's transaction."""

from __future__ import annotations

import asyncio

import pytest

from ai4s_jobq.backends.base import (
    LockLostError,
    MessageTooLargeError,
    OutgoingMessage,
    QueueSettings,
    QueueUnavailableError,
)
from ai4s_jobq.backends.local import LocalBackend
from ai4s_jobq.broker_core import BrokerCore, LockLost, NewMessage, QueueNotFound, QueueProperties


async def test_receive_on_a_missing_queue_says_it_is_created_by_the_first_push(tmp_path):
    backend = LocalBackend(tmp_path / "q.sqlite3", "nothing-here")
    await backend.open()
    try:
        with pytest.raises(QueueUnavailableError, match="A push creates a queue"):
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


def test_complete_and_receive_is_one_transaction(tmp_path):
    core = BrokerCore(tmp_path / "c.sqlite3")
    core.create_queue(QueueProperties(name="q"))
    core.send("q", [NewMessage(f"m{i}", b"{}") for i in range(3)])
    (first,) = core.receive("q", 1)
    outcomes, (second,) = core.complete_and_receive([first.lock_token, "stale"], "q", 1)
    assert outcomes[0] is None and isinstance(outcomes[1], LockLost)
    assert second.message_id == "m1"
    assert [m.message_id for m in core.peek("q", 10)] == ["m1", "m2"]
    # If the receive fails, the completions did not happen either.
    with pytest.raises(QueueNotFound):
        core.complete_and_receive([second.lock_token], "missing", 1)
    assert [m.message_id for m in core.peek("q", 10)] == ["m1", "m2"]
    core.complete(second.lock_token)
    assert [m.message_id for m in core.peek("q", 10)] == ["m2"]


async def test_the_last_completion_of_a_receive_is_committed_by_the_next_receive(tmp_path):
    backend = LocalBackend(tmp_path / "q.sqlite3", "q")
    await backend.open()
    try:
        await backend.ensure_queue(QueueSettings())
        await backend.push([OutgoingMessage(f"m{i}", b"{}") for i in range(2)])
        merged: list[list[str]] = []
        combined = backend.core.complete_and_receive

        def spy(tokens, *args, **kwargs):
            merged.append(list(tokens))
            return combined(tokens, *args, **kwargs)

        backend.core.complete_and_receive = spy  # type: ignore[method-assign]
        (first,) = await backend.receive(1, 0.1)
        completing = asyncio.ensure_future(backend.complete(first))
        await asyncio.sleep(0)  # complete() has queued it and now waits
        (second,) = await backend.receive(1, 0.1)
        await completing  # resolved by that receive's transaction
        assert merged == [[first.handle]]
        assert second.message_id == "m1"
        # With no receive after it, the last completion is committed on its own, soon.
        await asyncio.wait_for(backend.complete(second), 5)
        assert (await backend.counts()).active == 0
        # A stale lock is the caller's own LockLostError, through either path.
        with pytest.raises(LockLostError):
            await backend.complete(second)
    finally:
        await backend.close()
