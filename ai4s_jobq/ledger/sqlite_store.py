"""The ledger of a ``local://`` queue: tables in the queue's own SQLite file.

Why the same file: the queue and its ledger travel together (copy or delete one file),
and every process that can reach the queue can reach its ledger.  The broker core
(:mod:`ai4s_jobq.broker_core`) owns the ``messages``/``queues`` tables; this module
owns the ``ledger_*`` tables and never touches the broker's.  The writes are separate
transactions from the broker's (one per push batch, one per worker flush): sharing the
broker's transaction would mean threading ledger rows through the broker core's send
path, for no gain in what a reader can observe — the queue stays the source of truth
for delivery either way.

Forward-only state (see :func:`.events.moves_forward`) is the ``WHERE`` clause of one
guarded upsert, applied with ``executemany`` to a whole flush in one transaction: a
late write from a worker that lost its lock cannot move a record backwards, whatever
order the flushes of racing workers commit in.

Calls run inline on the event loop's thread, like the local backend's broker calls
(each is one short transaction).  Measured (``bench/bench_ledger.py``, a no-op drain at
8 slots): with the calls in a worker thread, the worker's own broker transactions kept
finding the file's write lock held by the ledger's and waited in SQLite's sleeping busy
handler, costing ~25% of the drain's CPU rate; inline, the two simply take turns and
the ledger costs ~5%.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..backends.local_file import (
    connect_read_only,
    may_write,
    missing_queue_error,
    translate_sqlite_errors,
)
from ..broker_store import size_for_large_queues
from ..sqlite_bulk import for_each_id
from .base import (
    FailureGroup,
    LedgerError,
    LedgerStore,
    StatusSummary,
    TaskRecord,
    TaskState,
    WorkerRecord,
)
from .events import FINAL, AttemptEvent, PushRecord, decode_result

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_tasks (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    interruptions INTEGER NOT NULL DEFAULT 0,
    pushed_at REAL,
    started_at REAL,
    finished_at REAL,
    worker_id TEXT,
    host TEXT,
    duration REAL,
    exit_code INTEGER,
    reason TEXT,
    summary TEXT,
    result TEXT,
    result_note TEXT,
    updated_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger_tags (
    tag TEXT NOT NULL,
    id TEXT NOT NULL,
    added_at REAL NOT NULL,
    PRIMARY KEY (tag, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger_tag_names (
    tag TEXT PRIMARY KEY,
    first_pushed_at REAL NOT NULL,
    last_pushed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_meta (key TEXT PRIMARY KEY, value REAL);
CREATE TABLE IF NOT EXISTS ledger_workers (
    worker_id TEXT PRIMARY KEY,
    host TEXT, pid INTEGER, slots INTEGER, queue TEXT,
    started_at REAL, last_seen REAL NOT NULL,
    running TEXT, tasks_done INTEGER, version TEXT, stopped INTEGER
)
"""

_COLUMNS = (
    "id, state, attempt, interruptions, pushed_at, started_at, finished_at, worker_id, host, "
    "duration, exit_code, reason, summary, result, result_note"
)
_TASK_COLUMNS = ", ".join(f"t.{c.strip()}" for c in _COLUMNS.split(","))
_FINAL_SQL = "(" + ", ".join(f"'{state}'" for state in FINAL) + ")"

# The push statements take the batch's time as ?1, its IDs where ``{id}`` is and the
# tag as ?3 (see ai4s_jobq.sqlite_bulk.for_each_id).  ``WHERE true`` ends a SELECT
# before an upsert clause, as SQLite's grammar requires.
#
# A push accepted as new: create, or start a new generation of a final record.
_PUSH_NEW = f"""
INSERT INTO ledger_tasks (id, state, attempt, pushed_at, updated_at)
SELECT {{id}}, 'queued', 0, ?1, ?1 {{source}} WHERE true
ON CONFLICT (id) DO UPDATE SET
    state = 'queued', attempt = 0, interruptions = 0, pushed_at = excluded.pushed_at,
    started_at = NULL, finished_at = NULL, worker_id = NULL, host = NULL, duration = NULL,
    exit_code = NULL, reason = NULL, summary = NULL, result = NULL, result_note = NULL,
    updated_at = excluded.updated_at
WHERE state IN {_FINAL_SQL}
"""
# A duplicate (or a push the backend cannot classify): only create a missing record.
_PUSH_KNOWN = (
    "INSERT OR IGNORE INTO ledger_tasks (id, state, attempt, pushed_at, updated_at)"
    " SELECT {id}, 'queued', 0, ?1, ?1 {source}"
)
_PUSH_TAG = "INSERT OR IGNORE INTO ledger_tags (tag, id, added_at) SELECT ?3, {id}, ?1 {source}"
# An attempt event, applied only if it moves the record forward (events.moves_forward).
_ATTEMPT = f"""
INSERT INTO ledger_tasks (id, state, attempt, interruptions, started_at, finished_at,
    worker_id, host, duration, exit_code, reason, summary, result, result_note, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    state = excluded.state, attempt = excluded.attempt,
    interruptions = interruptions + excluded.interruptions,
    started_at = COALESCE(excluded.started_at, started_at),
    finished_at = excluded.finished_at, worker_id = excluded.worker_id, host = excluded.host,
    duration = excluded.duration, exit_code = excluded.exit_code, reason = excluded.reason,
    summary = excluded.summary, result = excluded.result, result_note = excluded.result_note,
    updated_at = excluded.updated_at
WHERE state NOT IN {_FINAL_SQL} AND (
    excluded.attempt > attempt
    OR (excluded.attempt = attempt AND (
        state IN ('queued', 'interrupted')
        OR (state = 'running' AND excluded.state <> 'running'))))
"""

_IN_CHUNK = 500  # ids per IN (...) list: well under SQLite's variable limit


class SqliteLedger(LedgerStore):
    """The ledger tables in ``path`` (the local queue's SQLite file)."""

    never_suspends = True  # one connection, used under a lock from any thread

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        synchronous: str = "NORMAL",
        queue_name: str | None = None,
    ):
        """``synchronous``: the queue's durability (``NORMAL`` or ``FULL``), so the
        ledger's records are flushed as hard as the queue's own commits.

        ``queue_name``: this is the ledger of that local queue, in the queue's file,
        and keeps the file's rules (:mod:`ai4s_jobq.backends.local_file`): it never
        creates the file (the queue's creation does, whole), so a ledger read with a
        mistyped name (``jobq status``, ``tasks``, ``wait`` ...) says the queue does
        not exist instead of leaving a new file that then lists as a queue; it only
        reads a file it may not write; and SQLite's complaints about the file itself
        come out as the backend's (damaged, read-only) errors.  Without it (a
        ledger file of its own) the file is created as needed."""
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self.clock = clock
        self.synchronous = synchronous
        self.queue_name = queue_name
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    @property
    def description(self) -> str:
        return f"SQLite ledger in {self.path}"

    # ------------------------------------------------------------------ plumbing

    async def open(self) -> None:
        if self._conn is None:
            self._open_sync()

    def _open_sync(self) -> None:
        try:
            with self._file_errors():
                self._conn = self._connect()
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the ledger in {self.path}: {exc}") from None

    def _connect(self) -> sqlite3.Connection:
        target, uri = str(self.path), False
        if self.queue_name is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.exists():
            raise missing_queue_error(self.queue_name, self.path)
        elif not may_write(self.path):
            return self._read_only()
        else:  # "rw": never create it, even if it went away since the check
            target, uri = f"{self.path.resolve().as_uri()}?mode=rw", True
        conn = sqlite3.connect(
            target, timeout=60.0, isolation_level=None, check_same_thread=False, uri=uri
        )
        try:
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            size_for_large_queues(conn)  # random (MD5) keys: see there
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        return conn

    def _read_only(self) -> sqlite3.Connection:
        """The queue's file, which we may only read: reads work, writes fail as the
        backend's would (read-only).  A file that has no ledger tables yet cannot get
        them."""
        conn = connect_read_only(self.path)
        found = conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'ledger_tasks'"
        ).fetchone()
        if not found[0]:
            conn.close()
            raise LedgerError(
                f"the queue file {self.path} is read-only and has no ledger yet (its tasks "
                "were pushed with the ledger off); a process that may write it makes one"
            )
        return conn

    def _file_errors(self) -> contextlib.AbstractContextManager[None]:
        if self.queue_name is None:
            return contextlib.nullcontext()
        return translate_sqlite_errors(self.path)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with self._lock:
                conn.close()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        await self.open()
        with self._lock:
            assert self._conn is not None, "ledger is closed"
            try:
                with self._file_errors():
                    return fn(self._conn)
            except sqlite3.Error as exc:
                raise LedgerError(f"ledger in {self.path}: {exc}") from None

    @staticmethod
    def _write(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            value = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return value

    # ------------------------------------------------------------------ writes

    async def record_pushes(self, entries: Sequence[PushRecord], tag: str | None = None) -> None:
        if not entries:
            return
        now = self.clock()
        new = [e.id for e in entries if e.duplicate is False]
        known = [e.id for e in entries if e.duplicate is not False]

        def write(conn: sqlite3.Connection) -> None:
            for_each_id(conn, _PUSH_NEW, new, now)
            for_each_id(conn, _PUSH_KNOWN, known, now)
            if tag is not None:
                for_each_id(conn, _PUSH_TAG, [e.id for e in entries], now, tag)
                conn.execute(
                    "INSERT INTO ledger_tag_names VALUES (?, ?, ?) ON CONFLICT (tag) "
                    "DO UPDATE SET last_pushed_at = excluded.last_pushed_at",
                    (tag, now, now),
                )

        await self._run(lambda conn: self._write(conn, write))

    async def record_attempts(self, events: Sequence[AttemptEvent]) -> None:
        if not events:
            return
        now = self.clock()
        rows = [
            (
                e.id,
                e.state,
                e.attempt,
                1 if e.state == TaskState.INTERRUPTED.value else 0,
                e.started_at if e.started_at is not None else (e.at if e.is_start else None),
                None if e.is_start else e.at,
                e.worker_id,
                e.host,
                e.duration,
                e.exit_code,
                e.reason,
                e.summary,
                e.result_json,
                e.result_note,
                now,
            )
            for e in events
        ]
        await self._run(lambda conn: self._write(conn, lambda c: c.executemany(_ATTEMPT, rows)))

    async def heartbeat(self, worker: WorkerRecord) -> None:
        row = (
            worker.worker_id,
            worker.host,
            worker.pid,
            worker.slots,
            worker.queue,
            worker.started_at,
            worker.last_seen,
            json.dumps(worker.running),
            worker.tasks_done,
            worker.version,
            int(worker.stopped),
        )
        await self._run(
            lambda conn: self._write(
                conn,
                lambda c: c.execute(
                    "INSERT OR REPLACE INTO ledger_workers VALUES (?,?,?,?,?,?,?,?,?,?,?)", row
                ),
            )
        )

    # ------------------------------------------------------------------ reads

    async def get(self, ids: Sequence[str]) -> dict[str, TaskRecord]:
        wanted = list(dict.fromkeys(ids))

        def read(conn: sqlite3.Connection) -> dict[str, TaskRecord]:
            found: dict[str, TaskRecord] = {}
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                for row in conn.execute(
                    f"SELECT {_COLUMNS} FROM ledger_tasks WHERE id IN ({marks})", chunk
                ):
                    found[row[0]] = _record(row)
            return found

        return await self._run(read)

    async def tags_of(self, task_id: str) -> list[str]:
        rows = await self._run(
            lambda conn: conn.execute(
                "SELECT tag FROM ledger_tags WHERE id = ? ORDER BY added_at", (task_id,)
            ).fetchall()
        )
        return [r[0] for r in rows]

    async def iter_tag(self, tag: str, *, page_size: int = 1000) -> AsyncIterator[TaskRecord]:
        sql = (
            f"SELECT g.id, {_TASK_COLUMNS} FROM ledger_tags g LEFT JOIN ledger_tasks t "
            "ON t.id = g.id WHERE g.tag = ? AND g.id > ? ORDER BY g.id LIMIT ?"
        )
        after = ""
        while True:
            params = (tag, after, page_size)

            def read(conn: sqlite3.Connection, params: tuple[Any, ...] = params) -> list[Any]:
                return conn.execute(sql, params).fetchall()

            page = await self._run(read)
            for row in page:
                if row[1] is not None:  # a member whose record was pruned: skipped
                    yield _record(row[1:])
            if len(page) < page_size:
                return
            after = page[-1][0]

    async def status(self, tag: str | None = None, *, window_minutes: float = 5.0) -> StatusSummary:
        since = self.clock() - window_minutes * 60
        finished = f"SUM(t.state IN {_FINAL_SQL} AND t.finished_at >= ?)"

        def read(conn: sqlite3.Connection) -> StatusSummary:
            if tag is None:
                rows = conn.execute(
                    f"SELECT t.state, COUNT(*), {finished} FROM ledger_tasks t GROUP BY t.state",
                    (since,),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT t.state, COUNT(*), {finished} FROM ledger_tags g "
                    "LEFT JOIN ledger_tasks t ON t.id = g.id WHERE g.tag = ? GROUP BY t.state",
                    (since, tag),
                ).fetchall()
            counts = {state: n for state, n, _ in rows if state is not None}
            unknown = sum(n for state, n, _ in rows if state is None)
            return StatusSummary(
                counts=counts,
                total=sum(counts.values()),
                finished_last_minutes=sum(int(f or 0) for _, _, f in rows),
                window_minutes=window_minutes,
                unknown=unknown,
            )

        return await self._run(read)

    async def tasks(
        self, *, tag: str | None = None, state: TaskState | None = None, limit: int = 50
    ) -> list[TaskRecord]:
        where, params = _filters(tag, [state.value] if state is not None else None)
        sql = (
            f"SELECT {_TASK_COLUMNS} FROM {_source(tag)} {where} ORDER BY t.updated_at DESC LIMIT ?"
        )
        rows = await self._run(lambda conn: conn.execute(sql, (*params, limit)).fetchall())
        return [_record(row) for row in rows]

    async def failures(
        self, *, tag: str | None = None, limit: int = 20, examples: int = 3
    ) -> list[FailureGroup]:
        where, params = _filters(tag, [TaskState.FAILED.value, TaskState.DEAD_LETTERED.value])

        def read(conn: sqlite3.Connection) -> list[FailureGroup]:
            groups = conn.execute(
                f"SELECT COALESCE(t.reason, 'unknown'), COUNT(*) FROM {_source(tag)} {where} "
                "GROUP BY 1 ORDER BY 2 DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
            out = []
            for reason, count in groups:
                rows = conn.execute(
                    f"SELECT t.id, t.summary FROM {_source(tag)} {where} "
                    "AND COALESCE(t.reason, 'unknown') = ? ORDER BY t.updated_at DESC LIMIT ?",
                    (*params, reason, examples),
                ).fetchall()
                summary = next((s for _, s in rows if s), None)
                out.append(FailureGroup(reason, count, [r[0] for r in rows], summary))
            return out

        return await self._run(read)

    async def durations(self, *, tag: str | None = None, limit: int = 10_000) -> list[float]:
        where, params = _filters(tag, [TaskState.SUCCEEDED.value])
        sql = (
            f"SELECT t.duration FROM {_source(tag)} {where} AND t.duration IS NOT NULL "
            "ORDER BY t.finished_at DESC LIMIT ?"
        )
        rows = await self._run(lambda conn: conn.execute(sql, (*params, limit)).fetchall())
        return [float(r[0]) for r in rows]

    async def workers(self, *, include_stopped_seconds: float = 3600) -> list[WorkerRecord]:
        since = self.clock() - include_stopped_seconds
        rows = await self._run(
            lambda conn: conn.execute(
                "SELECT * FROM ledger_workers WHERE last_seen >= ? ORDER BY started_at", (since,)
            ).fetchall()
        )
        return [
            WorkerRecord(
                worker_id=r[0],
                host=r[1] or "",
                pid=int(r[2] or 0),
                slots=int(r[3] or 0),
                queue=r[4] or "",
                started_at=float(r[5] or 0.0),
                last_seen=float(r[6]),
                running=json.loads(r[7] or "[]"),
                tasks_done=int(r[8] or 0),
                version=r[9] or "",
                stopped=bool(r[10]),
            )
            for r in rows
        ]

    async def tags(self, *, limit: int = 50) -> list[str]:
        rows = await self._run(
            lambda conn: conn.execute(
                "SELECT tag FROM ledger_tag_names ORDER BY last_pushed_at DESC LIMIT ?", (limit,)
            ).fetchall()
        )
        return [r[0] for r in rows]

    async def prune(self, older_than_seconds: float, *, unfinished: bool = False) -> int:
        cutoff = self.clock() - older_than_seconds
        finished = "" if unfinished else f" AND state IN {_FINAL_SQL}"

        def write(conn: sqlite3.Connection) -> int:
            deleted = conn.execute(
                f"DELETE FROM ledger_tasks WHERE updated_at < ?{finished}", (cutoff,)
            ).rowcount
            # a membership stays while its task has a record (one not finished, here)
            conn.execute(
                "DELETE FROM ledger_tags WHERE added_at < ? AND NOT EXISTS "
                "(SELECT 1 FROM ledger_tasks t WHERE t.id = ledger_tags.id)",
                (cutoff,),
            )
            conn.execute(
                "DELETE FROM ledger_tag_names WHERE last_pushed_at < ? AND NOT EXISTS "
                "(SELECT 1 FROM ledger_tags g WHERE g.tag = ledger_tag_names.tag)",
                (cutoff,),
            )
            conn.execute("DELETE FROM ledger_workers WHERE last_seen < ?", (cutoff,))
            return int(deleted)

        return await self._run(lambda conn: self._write(conn, write))

    async def last_pruned(self) -> float | None:
        rows = await self._run(
            lambda conn: conn.execute(
                "SELECT value FROM ledger_meta WHERE key = 'last_pruned'"
            ).fetchall()
        )
        return float(rows[0][0]) if rows else None

    async def mark_pruned(self, at: float) -> None:
        await self._run(
            lambda conn: self._write(
                conn,
                lambda c: c.execute(
                    "INSERT OR REPLACE INTO ledger_meta VALUES ('last_pruned', ?)", (at,)
                ),
            )
        )

    async def succeeded_among(self, ids: Sequence[str]) -> set[str]:
        wanted = list(dict.fromkeys(ids))

        def read(conn: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                found.update(
                    r[0]
                    for r in conn.execute(
                        "SELECT id FROM ledger_tasks WHERE state = 'succeeded' "
                        f"AND id IN ({marks})",
                        chunk,
                    )
                )
            return found

        return await self._run(read)


def _source(tag: str | None) -> str:
    if tag is None:
        return "ledger_tasks t"
    return "ledger_tags g JOIN ledger_tasks t ON t.id = g.id"


def _filters(tag: str | None, states: list[str] | None) -> tuple[str, tuple[Any, ...]]:
    clauses, params = ["1"], []
    if tag is not None:
        clauses.append("g.tag = ?")
        params.append(tag)
    if states:
        clauses.append(f"t.state IN ({','.join('?' * len(states))})")
        params.extend(states)
    return "WHERE " + " AND ".join(clauses), tuple(params)


def _record(row: Sequence[Any]) -> TaskRecord:
    return TaskRecord(
        id=row[0],
        state=TaskState(row[1]),
        attempt=int(row[2]),
        interruptions=int(row[3]),
        pushed_at=row[4],
        started_at=row[5],
        finished_at=row[6],
        worker_id=row[7],
        host=row[8],
        duration=row[9],
        exit_code=row[10],
        reason=row[11],
        summary=row[12],
        result=decode_result(row[13]),
        result_note=row[14],
    )
