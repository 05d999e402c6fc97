"""Service Bus queue semantics of the SQLite broker core (used by the local
backend and the emulator).  A settable clock stands in for waiting."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from ai4s_jobq.broker_core import (
    DEAD_LETTER,
    BrokerCore,
    InvalidOperation,
    LockLost,
    MessageTooLarge,
    NewMessage,
    QueueProperties,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(tmp_path: Path, clock: Clock) -> BrokerCore:
    broker = BrokerCore(tmp_path / "q.sqlite3", clock=clock)
    broker.create_queue(
        QueueProperties(
            "q",
            lock_duration=30,
            requires_duplicate_detection=True,
            duplicate_detection_window=600,
            max_delivery_count=3,
        )
    )
    return broker


def send(core: BrokerCore, *ids: str) -> list[bool]:
    return [r.duplicate for r in core.send("q", [NewMessage(i, i.encode()) for i in ids])]


def test_duplicate_within_window_dropped_outside_accepted(core, clock):
    assert send(core, "a", "b", "a") == [False, False, True]
    clock.now += 599
    assert send(core, "a") == [True]
    clock.now += 2  # the first "a" was accepted 601 s ago: outside the window
    assert send(core, "a") == [False]
    assert core.counts("q").active == 3


def test_dedup_applies_after_the_message_was_consumed(core):
    send(core, "a")
    (msg,) = core.receive("q")
    core.complete(msg.lock_token)
    assert send(core, "a") == [True]


def test_queue_without_dedup_accepts_repeats(tmp_path, clock):
    broker = BrokerCore(tmp_path / "n.sqlite3", clock=clock)
    broker.create_queue(QueueProperties("q"))
    assert send(broker, "a", "a") == [False, False]


def test_peek_lock_and_lock_expiry(core, clock):
    send(core, "a")
    (first,) = core.receive("q", 5)
    assert first.delivery_count == 1 and first.locked_until == clock.now + 30
    assert core.receive("q", 5) == []  # locked: nobody else gets it
    clock.now += 31
    (again,) = core.receive("q", 5)
    assert again.delivery_count == 2 and again.lock_token != first.lock_token
    with pytest.raises(LockLost):
        core.complete(first.lock_token)  # the old lock is gone
    core.complete(again.lock_token)
    assert core.counts("q").active == 0


def test_renew_extends_the_lock(core, clock):
    send(core, "a")
    (msg,) = core.receive("q")
    clock.now += 20
    assert core.renew_lock(msg.lock_token) == clock.now + 30
    clock.now += 20  # 40 s after receive: alive only thanks to the renewal
    assert core.receive("q") == []
    core.complete(msg.lock_token)
    clock.now += 60
    with pytest.raises(LockLost):
        core.renew_lock(msg.lock_token)


def test_abandon_then_max_delivery_count_dead_letters(core):
    send(core, "a")
    for attempt in (1, 2, 3):
        (msg,) = core.receive("q")
        assert msg.delivery_count == attempt
        core.abandon(msg.lock_token)
    assert core.receive("q") == []
    counts = core.counts("q")
    assert (counts.active, counts.dead_letter) == (0, 1)
    (dead,) = core.peek("q", sub_queue=DEAD_LETTER)
    assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"


def test_lock_expiry_on_last_delivery_dead_letters(core, clock):
    send(core, "a")
    for _ in range(3):
        core.receive("q")
        clock.now += 31
    assert core.counts("q").dead_letter == 1


def test_dead_letter_with_reason_and_receive_from_dlq(core):
    send(core, "a")
    (msg,) = core.receive("q")
    core.dead_letter(msg.lock_token, "Boom", "exit code 3")
    (dead,) = core.receive("q", sub_queue=DEAD_LETTER)
    assert (dead.message_id, dead.dead_letter_reason, dead.dead_letter_description) == (
        "a",
        "Boom",
        "exit code 3",
    )
    core.complete(dead.lock_token)
    assert core.counts("q").dead_letter == 0


def test_ttl_and_scheduled_messages(core, clock):
    core.send(
        "q",
        [
            NewMessage("ttl", b"x", time_to_live=10),
            NewMessage("later", b"y", scheduled_enqueue_time=clock.now + 100),
        ],
    )
    counts = core.counts("q")
    assert (counts.active, counts.scheduled) == (1, 1)
    clock.now += 11
    assert core.counts("q").active == 0  # expired
    clock.now += 90
    (msg,) = core.receive("q")
    assert msg.message_id == "later"


def test_peek_does_not_lock(core):
    send(core, "a", "b")
    assert [m.message_id for m in core.peek("q", 10)] == ["a", "b"]
    assert len(core.receive("q", 10)) == 2


def test_receive_and_delete(core):
    send(core, "a")
    (msg,) = core.receive("q", receive_and_delete=True)
    assert msg.lock_token is None
    assert core.counts("q").active == 0


def test_oversize_batch_rejected_before_writing(core):
    big = NewMessage("big", b"x" * (256 * 1024 + 1))
    with pytest.raises(MessageTooLarge) as info:
        core.send("q", [NewMessage("ok", b"x"), big])
    assert info.value.index == 1
    assert core.counts("q").active == 0


def test_duplicate_detection_cannot_be_toggled(core):
    props = core.get_queue("q")
    props.requires_duplicate_detection = False
    with pytest.raises(InvalidOperation):
        core.update_queue(props)
    props.requires_duplicate_detection = True
    props.duplicate_detection_window = 60
    assert core.update_queue(props).duplicate_detection_window == 60


def test_persists_across_reopen(tmp_path):
    path = tmp_path / "p.sqlite3"
    first = BrokerCore(path)
    first.create_queue(QueueProperties("q"))
    first.send("q", [NewMessage("a", b"body")])
    first.close()
    (msg,) = BrokerCore(path).receive("q")
    assert msg.body == b"body"


def _receive_all(path: str, out: multiprocessing.Queue, start) -> None:  # type: ignore[type-arg]
    core = BrokerCore(path)
    start.wait(60)  # all processes begin together, so they really compete
    got = [m.message_id for m in core.receive("q", 7)]
    # ... and none drains the rest before every other one has locked its first batch
    # (without this, a process that wins the file's lock early can take all of them
    # while the others sleep in SQLite's busy handler)
    start.wait(60)
    while True:
        batch = core.receive("q", 7)
        if not batch:
            break
        got.extend(m.message_id for m in batch)
    out.put(got)


def test_concurrent_processes_never_lock_the_same_message(tmp_path):
    path = tmp_path / "shared.sqlite3"
    core = BrokerCore(path)
    core.create_queue(QueueProperties("q", lock_duration=300))
    core.send("q", [NewMessage(str(i), b"x") for i in range(2000)])
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start = ctx.Barrier(4)
    procs = [ctx.Process(target=_receive_all, args=(str(path), out, start)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    everything = [mid for got in results for mid in got]
    assert len(everything) == 2000
    assert len(set(everything)) == 2000  # nobody got a message someone else held
    assert all(results)  # they really did compete
