"""A batch written as one JSON-array statement (ai4s_jobq.sqlite_bulk) stores exactly
what the row-by-row way stores, takes that way for what JSON text cannot carry, and is
really one statement (the speed it exists for)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ai4s_jobq import broker_model, sqlite_bulk
from ai4s_jobq.broker_core import BrokerCore, NewMessage, QueueProperties
from ai4s_jobq.ledger.events import AttemptEvent, PushEntry
from ai4s_jobq.ledger.sqlite_store import SqliteLedger
from ai4s_jobq.sqlite_bulk import json_rows, json_rows_supported, text_bodies

NOW = 1_000_000.0

# Bodies that must come back byte for byte: JSON escapes, non-ASCII, astral characters,
# control characters.  The last two cannot travel as JSON text (a NUL; not UTF-8).
TEXT_BODIES = [
    b'{"cmd": "echo \\"quoted\\" back\\\\slash"}',
    "{'caf\u00e9': '\u00fcber \u4e2d\u6587'}".encode(),
    "emoji \U0001f600 and tab\tnewline\nbell\x07 DEL\x7f".encode(),
    b"",
    b"[1, 2.5, null, true]",
]
BINARY_BODIES = [b"nul \x00 inside", b"\xff\xfe not utf-8"]


def new_core(path: Path, *, ttl: float | None = None) -> BrokerCore:
    core = BrokerCore(path, clock=lambda: NOW)
    core.create_queue(
        QueueProperties(
            "q",
            requires_duplicate_detection=True,
            duplicate_detection_window=600,
            default_message_ttl=ttl,
        )
    )
    return core


def stored(core: BrokerCore) -> list[tuple]:
    conn = core._conn()
    messages = conn.execute(
        "SELECT queue, sub, state, message_id, body, typeof(body), props, enqueued_at,"
        " visible_at, expires_at, qseq, delivery_count FROM messages ORDER BY qseq"
    ).fetchall()
    dedup = conn.execute("SELECT * FROM dedup ORDER BY message_id").fetchall()
    return messages + dedup


def batches() -> list[list[NewMessage]]:
    bodies = TEXT_BODIES + BINARY_BODIES
    return [
        [NewMessage(f"id-{i}", body) for i, body in enumerate(TEXT_BODIES)],
        # a repeat (dropped), a new text body and, in the same batch, binary ones
        [NewMessage("id-0", b"again"), NewMessage("id-new", b"new")]
        + [NewMessage(f"bin-{i}", body) for i, body in enumerate(BINARY_BODIES)],
        # a message with properties of its own, among plain ones
        [NewMessage("p", b"x", properties={"k": 1}), NewMessage("plain", b"y")],
        # a duplicate inside one batch
        [NewMessage("twice", b"1"), NewMessage("twice", b"2")],
    ] + [[NewMessage(f"one-{i}", body)] for i, body in enumerate(bodies)]


@pytest.mark.parametrize("ttl", [None, 3600.0])
def test_bulk_and_row_by_row_store_the_same(tmp_path, monkeypatch, ttl):
    assert json_rows_supported()
    bulk = new_core(tmp_path / "bulk.sqlite3", ttl=ttl)
    bulk_results = [bulk.send("q", batch) for batch in batches()]
    monkeypatch.setattr(broker_model, "json_rows_supported", lambda: False)
    monkeypatch.setattr(sqlite_bulk, "json_rows_supported", lambda: False)
    rows = new_core(tmp_path / "rows.sqlite3", ttl=ttl)
    row_results = [rows.send("q", batch) for batch in batches()]
    assert bulk_results == row_results
    assert stored(bulk) == stored(rows)
    received = {m.message_id: m.body for m in bulk.receive("q", 100)}
    assert received["id-1"] == TEXT_BODIES[1]
    assert received["id-2"] == TEXT_BODIES[2]
    assert received["bin-0"] == BINARY_BODIES[0]
    assert received["twice"] == b"1"
    assert all(type(body) is bytes for body in received.values())


def test_send_plain_stores_and_answers_what_send_does(tmp_path):
    """The local push path (IDs and bodies in, accepted flags out) against send()."""
    plain_batches = [[m for m in batch if broker_model.is_plain(m)] for batch in batches()]
    full = new_core(tmp_path / "send.sqlite3")
    lean = new_core(tmp_path / "plain.sqlite3")
    answers = []
    for batch in plain_batches:
        results = full.send("q", batch)
        accepted = lean.send_plain("q", [m.message_id for m in batch], [m.body for m in batch])
        assert accepted == [not r.duplicate for r in results]
        answers += accepted
    assert stored(lean) == stored(full)
    assert True in answers and False in answers  # new ones and duplicates both answered


def test_a_plain_batch_is_one_insert_statement(tmp_path):
    core = new_core(tmp_path / "q.sqlite3")
    statements: list[str] = []
    core._conn().set_trace_callback(statements.append)
    # 1,200 IDs: the row-by-row duplicate check takes them 500 at a time
    core.send("q", [NewMessage(f"m{i}", b'{"i": %d}' % i) for i in range(1_200)])
    inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT")]
    assert len([s for s in inserts if "INTO messages" in s]) == 1
    assert len([s for s in inserts if "INTO dedup" in s]) == 1
    # the duplicate check is one statement too, read back as one row
    checks = [s for s in statements if s.lstrip().upper().startswith("SELECT") and "dedup" in s]
    assert len(checks) == 1 and "json_group_array" in checks[0]
    assert core.counts("q").active == 1_200


def test_json_rows_refuses_what_utf8_cannot_encode():
    assert json_rows(["a", ["b", None, 1.5]]) == '["a",["b",null,1.5]]'
    assert json_rows(["lone \ud800 surrogate"]) is None
    assert text_bodies([b"ok", b"\x00"]) is None
    assert text_bodies([b"ok", b"\xc3"]) is None
    assert text_bodies(["\u00e9".encode()]) == ["\u00e9"]


async def ledger_rows(path: Path) -> list[tuple]:
    ledger = SqliteLedger(path, clock=lambda: NOW)
    # generation 1: two new, one duplicate, under a tag
    await ledger.record_pushes(
        [PushEntry("a", False), PushEntry("b", False), PushEntry("c", True)], "run"
    )
    await ledger.record_attempts([AttemptEvent("a", "succeeded", 1, NOW, started_at=NOW)])
    # "a" is pushed again as new (a new generation), "b" again as a duplicate (stays)
    await ledger.record_pushes([PushEntry("a", False), PushEntry("b", None)], "again")
    await ledger.record_pushes([PushEntry("d", False), PushEntry("d", False)])
    conn = sqlite3.connect(path)
    try:
        return [
            *conn.execute("SELECT * FROM ledger_tasks ORDER BY id"),
            *conn.execute("SELECT * FROM ledger_tags ORDER BY tag, id"),
        ]
    finally:
        conn.close()
        await ledger.close()


async def test_ledger_pushes_bulk_and_row_by_row_record_the_same(tmp_path, monkeypatch):
    bulk = await ledger_rows(tmp_path / "bulk.sqlite3")
    monkeypatch.setattr(sqlite_bulk, "json_rows_supported", lambda: False)
    rows = await ledger_rows(tmp_path / "rows.sqlite3")
    assert bulk == rows
    states = {row[0]: row[1] for row in bulk if len(row) > 3}
    assert states == {"a": "queued", "b": "queued", "c": "queued", "d": "queued"}
