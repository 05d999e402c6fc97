"""Many rows in one SQLite statement: a batch travels as one JSON array parameter.

Why: ``executemany`` binds every row's parameters from Python, one row at a time.  On
the push path that binding cost more than the insert itself: a 10-column ``messages``
row took about 8 µs of the 21 µs SQLite-level cost of a pushed task (100,000 tasks in
batches of 2,000).  Here a batch is one ``INSERT ... SELECT ... FROM json_each(?)``:
Python builds one string with the C ``json`` encoder and SQLite expands it in C.
Measured the same way, the ``messages`` insert went from 8.0 to 3.8 µs per task,
encoding included.  The dedup and ledger inserts gained little (their cost is the
random-key B-tree, not the binding), but share the code.  By CPU instructions
(callgrind), a ``push_many`` of 100,000 tasks with the ledger went from 166,700 to
139,400 per task.

On top of this, ``push_many`` writes each batch from a second thread while it builds
the next: see :mod:`ai4s_jobq.push_writer`.

:func:`for_each_id` is the one way a statement is run for every ID of a batch (the
broker's dedup IDs, the ledger's push records).  It hands SQLite the IDs sorted: MD5
keys in order walk each index's leaf pages once, in order, instead of jumping about
them (``push_many`` of 100,000 small tasks, 5 alternating runs, session 9: median
63,200/s sorted, 58,000/s unsorted; sorting inside SQLite with ``ORDER BY`` was
slower, 54,800/s).  :func:`ids_found` is the matching way to ask which IDs a table
already has.

What travels as JSON text must come back byte for byte:

* message bodies are opaque bytes; only a body that is valid UTF-8 without NUL
  characters (every task body ``jobq`` writes is canonical JSON) is sent as text and
  cast back to a BLOB, since SQLite's text functions are not defined past a NUL;
  a batch with any other body goes the ``executemany`` way;
* strings are written with ``ensure_ascii=False``, so SQLite never has to decode a
  ``\\u`` escape of a non-ASCII character (control characters, quotes and
  backslashes are still escaped, and SQLite decodes those exactly);
* ``json_extract(value, '$[i]')`` rather than ``->>``, which needs SQLite 3.38: the
  JSON functions are checked once per process and, if missing (an SQLite built
  without JSON1), every caller falls back to ``executemany``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
from collections.abc import Sequence
from typing import Any

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@functools.cache
def json_rows_supported() -> bool:
    """Whether this process's SQLite library has the JSON functions (checked once:
    every connection of a process uses the same library)."""
    try:
        with contextlib.closing(sqlite3.connect(":memory:")) as conn:
            row = conn.execute("SELECT json_extract(value, '$[0]') FROM json_each('[[\"a\"]]')")
            return bool(row.fetchone() == ("a",))
    except sqlite3.Error:
        return False


def json_rows(rows: Sequence[Any]) -> str | None:
    """``rows`` (strings, numbers, None, or lists of them) as one JSON array, or None
    when a string cannot be encoded as UTF-8 (a lone surrogate): the caller then binds
    the rows one by one, and gets the driver's own error for the bad one."""
    text = _encode(rows)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text


def text_bodies(bodies: Sequence[bytes]) -> list[str] | None:
    """Each body as text if every one is NUL-free UTF-8 (what survives the round trip
    through a JSON string exactly), else None."""
    if b"\0" in b"".join(bodies):  # one C scan, not one test per body
        return None
    try:
        return [body.decode("utf-8") for body in bodies]
    except UnicodeDecodeError:
        return None


def for_each_id(
    conn: sqlite3.Connection, statement: str, ids: Sequence[str], now: float, *extra: Any
) -> None:
    """Run ``statement`` for every ID (in sorted order, see the module docstring): in
    one step with the IDs as a JSON array, else one row at a time.  ``statement``
    takes ``now`` as ``?1``, the ID where ``{id}`` is (followed by ``{source}``, the
    table it comes from) and ``extra`` as ``?3``, ...
    A ``WHERE`` after ``{source}`` is allowed (SQLite needs ``WHERE true`` there
    before an upsert clause)."""
    if not ids:
        return
    in_order = sorted(ids)
    encoded = json_rows(in_order) if json_rows_supported() else None
    if encoded is not None:
        sql = statement.format(id="value", source="FROM json_each(?2)")
        conn.execute(sql, (now, encoded, *extra))
    else:
        sql = statement.format(id="?2", source="")
        conn.executemany(sql, [(now, one_id, *extra) for one_id in in_order])


def ids_found(conn: sqlite3.Connection, query: str, ids: list[str], *extra: Any) -> set[str] | None:
    """The IDs that ``query`` selects from the JSON array ``?1`` of ``ids`` (``extra`` are
    ``?2``, ...), read back as one JSON array: one row, not a row per ID (each row
    fetched is a step that releases and retakes the GIL, which a thread building tasks
    meanwhile turns into a hand-off).  None when the IDs cannot travel as JSON: the
    caller then binds them itself."""
    encoded = json_rows(ids) if json_rows_supported() else None
    if encoded is None:
        return None
    (found,) = conn.execute(f"SELECT json_group_array(value) FROM ({query})", (encoded, *extra))
    return set(json.loads(found[0]))
