"""The file behind a ``local://`` queue: is it there, is it whole, may we write it.

The local backend keeps each queue in ``NAME.sqlite3`` under the local data
directory.  Three things must never happen to a user's file:

* a typo in a read-only command (``size``, ``peek``, ``dlq list``) silently
  creates a new, empty queue: :func:`missing_queue_error` says the queue does not
  exist and lists the ones that do;
* a damaged file (not SQLite, truncated, corrupt pages) is taken for an empty
  queue, or retried forever by a worker: :func:`check_queue_file` looks at the
  header at open (cheap, so every command fails at once), and
  :func:`translate_sqlite_errors` turns damage found later into
  :class:`QueueFileDamagedError`, which the worker does not retry;
* a file we may only read (``chmod 444``, a read-only directory) breaks read-only
  commands: :func:`may_write` tells the backend to open it read-only
  (:class:`ReadOnlyCore`).

A new queue file is created beside its final name and linked into place
(:func:`create_atomically`), so no other process ever sees a half-made file
(which would be indistinguishable from a truncated one).
"""

from __future__ import annotations

import os
import sqlite3
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import broker_core
from .base import PermanentBackendError, QueueUnavailableError

SUFFIX = ".sqlite3"
_SQLITE_MAGIC = b"SQLite format 3\x00"
_HEADER_SIZE = 100


class QueueFileDamagedError(PermanentBackendError, QueueUnavailableError):
    """The queue file is not a usable SQLite database; retrying cannot help."""


class LocalQueueNotFoundError(QueueUnavailableError):
    """No such local queue (file)."""


def damaged(path: Path, why: str) -> QueueFileDamagedError:
    return QueueFileDamagedError(
        f"local queue file {path} is damaged ({why}); jobq will not touch it. Move it "
        "aside (and restore a backup if you have one); the next push creates a new queue"
    )


def queues_in(directory: Path) -> list[str]:
    """Names of the local queues (files) in ``directory``."""
    try:
        return sorted(p.name[: -len(SUFFIX)] for p in directory.glob(f"*{SUFFIX}") if p.is_file())
    except OSError:
        return []


def missing_queue_error(name: str, path: Path) -> LocalQueueNotFoundError:
    existing = queues_in(path.parent)
    listed = (
        "local queues there: " + ", ".join(f"local://{q}" for q in existing)
        if existing
        else "there are no local queues there yet"
    )
    return LocalQueueNotFoundError(
        f"local queue {name!r} does not exist (no file {path}); {listed}. "
        "A push creates a queue; check the name (--queue / JOBQ_QUEUE) and JOBQ_LOCAL_DIR"
    )


def check_queue_file(path: Path) -> None:
    """Raise :class:`QueueFileDamagedError` unless ``path`` starts like a whole SQLite
    database: the magic string, and at least as many bytes as its header says."""
    try:
        with open(path, "rb") as file:
            header = file.read(_HEADER_SIZE)
            size = os.fstat(file.fileno()).st_size
    except PermissionError:
        raise QueueUnavailableError(f"local queue file {path}: permission denied") from None
    if len(header) < _HEADER_SIZE:
        raise damaged(path, f"{size} bytes, shorter than a SQLite header")
    if not header.startswith(_SQLITE_MAGIC):
        raise damaged(path, "not a SQLite database")
    (page_size,) = struct.unpack(">H", header[16:18])
    page_size = 65536 if page_size == 1 else page_size
    (pages, valid_for) = struct.unpack(">I", header[28:32])[0], header[92:96]
    if valid_for == header[24:28] and size < pages * page_size:
        # A checkpoint in another process may be writing page 1 before the pages
        # after it: let SQLite decide, on a consistent snapshot.
        _quick_check(path)


def _quick_check(path: Path) -> None:
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        try:
            (result,) = conn.execute("PRAGMA quick_check(1)").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise damaged(path, str(exc)) from None
    if result != "ok":
        raise damaged(path, f"truncated or corrupt: {result}")


def may_write(path: Path) -> bool:
    """Whether we may write the file and create its journal files beside it."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


class ReadOnlyCore(broker_core.BrokerCore):
    """A broker core over a file we may only read."""

    def __init__(self, path: Path):
        super().__init__(path, read_only=True)

    def _connect(self) -> sqlite3.Connection:
        return connect_read_only(Path(self.path))


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that only reads ``path`` (the broker's, and the ledger's in the
    same file).  ``mode=ro`` still needs the WAL's shared-memory file, which a
    read-only directory may not let SQLite create; then ``immutable=1`` reads the
    file as it is (no one may write it, so it does not change under us)."""
    uri = path.resolve().as_uri()
    for flags in ("mode=ro", "immutable=1"):
        conn = sqlite3.connect(
            f"{uri}?{flags}",
            uri=True,
            timeout=60.0,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError:
            conn.close()
            if flags == "immutable=1":
                raise
    raise AssertionError("unreachable")


def create_atomically(path: Path) -> None:
    """Create an empty queue store at ``path`` unless one appears there first."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QueueUnavailableError(
            f"cannot create the local queue directory {path.parent} ({exc.strerror}); "
            "check JOBQ_LOCAL_DIR"
        ) from None
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.new")
    try:
        broker_core.BrokerCore(temporary).close()
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
    finally:
        for leftover in (temporary, Path(f"{temporary}-wal"), Path(f"{temporary}-shm")):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass


@contextmanager
def translate_sqlite_errors(path: Path) -> Iterator[None]:
    """SQLite errors about the file itself become clear errors naming it."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if "readonly" in text or "read-only" in text:
            raise QueueUnavailableError(
                f"local queue file {path} is read-only: this command needs to write it "
                "(read-only commands such as size, peek and dlq list work)"
            ) from None
        if "unable to open" in text or "disk I/O" in text:
            raise QueueUnavailableError(f"local queue file {path}: {text}") from None
        raise
    except sqlite3.DatabaseError as exc:  # "malformed", "not a database", ...
        raise damaged(path, str(exc)) from None
