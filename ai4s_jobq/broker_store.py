"""The SQLite file under the broker core: one connection per thread, write
transactions, the schema, and change listeners.

Split from :mod:`ai4s_jobq.broker_core` so that module reads as queue semantics only;
:class:`~ai4s_jobq.broker_core.BrokerCore` is a :class:`SqliteStore`.  Every state change
runs in a ``BEGIN IMMEDIATE`` transaction (WAL mode), so processes and threads sharing
a file never interleave writes.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .broker_model import SCHEMA, SEQUENCE_INDEXES

# Measured with bench/bench_ledger.py (push_many of 100,000 tasks, ledger on): the
# settings below took it from about 10,900 to 12,500-14,000 tasks/s.
CACHE_KIB = 65_536
WAL_CHECKPOINT_PAGES = 10_000
WAL_KEEP_BYTES = 64 * 1024 * 1024


def size_for_large_queues(conn: sqlite3.Connection) -> None:
    """Cache and checkpoint settings for a file that holds a large queue.

    Task IDs are MD5s, so the dedup index and the ledger's task table take inserts all
    over their B-trees: with SQLite's 2 MiB default cache, a queue of 100,000 tasks
    re-reads index pages on every batch.  The cache is a ceiling, filled only as pages
    are used.  And a checkpoint (copying the WAL into the file, with a sync each side of
    it at ``synchronous=NORMAL``) every 1,000 WAL pages, SQLite's default, meant one or
    more per pushed batch; every 10,000 pages (40 MiB of WAL) it is about one in ten.
    The WAL file is cut back to 64 MiB after a checkpoint.  What this changes for
    durability: nothing for a process crash, nor at ``synchronous=FULL`` (every commit
    is synced); at ``NORMAL`` a power loss can roll back the commits since the last
    checkpoint that the OS had not yet written out itself -- now up to ~40 MiB of WAL
    rather than ~4 MiB (see :mod:`ai4s_jobq.backends.durability`)."""
    conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_KEEP_BYTES}")


class SqliteStore:
    """One SQLite file (``":memory:"`` for a private in-memory store) and its connections."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        read_only: bool = False,
        synchronous: str = "NORMAL",
    ):
        """``read_only``: an existing store we only read (a subclass connects read-only):
        no schema is created and ``counts`` skips its lock-expiry sweep.
        ``synchronous`` is SQLite's setting for every connection: ``NORMAL`` (a
        commit survives a process crash) or ``FULL`` (also a power loss); see
        :mod:`ai4s_jobq.backends.durability`."""
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = str(path)
        self.clock = clock
        self.read_only = read_only
        self.synchronous = synchronous
        self._local = threading.local()
        self._memory_conn: sqlite3.Connection | None = None
        self._memory_lock = threading.RLock()
        self._listeners: list[Callable[[str], None]] = []
        if read_only:
            return
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with self._write() as conn:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
            if "qseq" not in columns:  # a file from before per-queue sequence numbers
                conn.execute("ALTER TABLE messages ADD COLUMN qseq INTEGER")
                conn.execute("UPDATE messages SET qseq = seq")
            for statement in SEQUENCE_INDEXES.split(";"):
                if statement.strip():
                    conn.execute(statement)

    def _conn(self) -> sqlite3.Connection:
        if self.path == ":memory:":
            if self._memory_conn is None:
                self._memory_conn = self._connect()
            return self._memory_conn
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=60.0, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA busy_timeout = 60000")
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
            size_for_large_queues(conn)
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        return conn

    class _Txn:
        """A write transaction; inside another one on the same connection it joins it
        (the outer one commits or rolls back), so operations compose into one commit."""

        def __init__(self, core: SqliteStore, conn: sqlite3.Connection):
            self.core = core
            self.conn = conn
            self.joined = False

        def __enter__(self) -> sqlite3.Connection:
            self.core._memory_lock.acquire()
            self.joined = self.conn.in_transaction
            if self.joined:
                return self.conn
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.core._memory_lock.release()
                raise
            return self.conn

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            try:
                if self.joined:
                    pass
                elif exc_type is None:
                    self.conn.execute("COMMIT")
                else:
                    self.conn.execute("ROLLBACK")
            finally:
                self.core._memory_lock.release()

    def _write(self, conn: sqlite3.Connection | None = None) -> SqliteStore._Txn:
        return SqliteStore._Txn(self, conn or self._conn())

    def add_listener(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(queue_name)`` (in the writer's thread) when messages may have
        become receivable in this process: after a send, abandon or lock release."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[str], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _notify(self, queue: str) -> None:
        for callback in list(self._listeners):
            try:
                callback(queue)
            except Exception:  # a listener must never break the broker
                pass

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        if self._memory_conn is not None:
            self._memory_conn.close()
            self._memory_conn = None
