"""How hard the embedded ``local://`` queue flushes its commits: ``JOBQ_LOCAL_DURABILITY``.

The local broker keeps its queues in one SQLite file in WAL (write-ahead log) mode.  Each
push batch, receive and settle is one transaction.  What a committed transaction survives
depends on SQLite's ``synchronous`` setting, which this module chooses:

``normal`` (the default; ``PRAGMA synchronous=NORMAL``)
    A commit appends to the WAL file without waiting for the disk; SQLite fsyncs the WAL
    only before copying it into the database file (a checkpoint), and the database file
    after.  So:

    * a crash of the process (kill -9, OOM killer, a segfault, a worker killed by its
      scheduler) loses nothing: a commit is in the operating system's page cache as soon
      as it returns, and the next process reads it from there;
    * a power loss or operating-system crash may roll back the transactions committed
      since the last checkpoint (jobq checkpoints when the WAL reaches 10,000 pages,
      ~40 MiB, see ``broker_store.size_for_large_queues``; SQLite's default is 1,000)
      that the OS had not yet written out on its own (Linux writes dirty pages out
      within about 30 s by default).  The file is
      never corrupted: it opens in the state of an earlier commit.  For a queue this
      means a recent push may be missing (push it again: its ID makes that safe), a
      completed task may come back (it runs again: tasks should be idempotent anyway,
      as any at-least-once queue requires), or a recent receive is forgotten (the
      delivery count of that attempt is not kept).

``full`` (``PRAGMA synchronous=FULL``)
    Every commit also fsyncs the WAL before it returns, so a push that returned, or a
    settle, survives a power loss too -- provided the disk honours fsync (most do;
    some consumer drives and virtual disks with write caching do not).  The price is
    one fsync per transaction: small for pushes (a transaction per batch of 2,000),
    large for workers draining short tasks (a transaction per receive and per group of
    settles).  ``bench/bench_peers.py`` measures both against the peers.

The variable is read when a local backend is made (``JobQ.open``, any ``jobq`` command),
so every process sharing a queue file should set it the same way; the setting applies to
that process's connections only.  A value other than ``normal`` or ``full`` is a
configuration error, raised before the queue is opened.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..ids import ConfigError

DURABILITY_ENV = "JOBQ_LOCAL_DURABILITY"
DEFAULT_DURABILITY = "normal"
#: Each setting's SQLite ``synchronous`` value (as ``PRAGMA synchronous`` reads it back: 1, 2).
SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}


def local_durability(environ: Mapping[str, str] | None = None) -> str:
    """``JOBQ_LOCAL_DURABILITY``, lower-cased: ``normal`` (also when unset or empty) or ``full``."""
    env = os.environ if environ is None else environ
    value = env.get(DURABILITY_ENV, "")
    level = value.strip().lower() or DEFAULT_DURABILITY
    if level not in SYNCHRONOUS:
        raise ConfigError(
            f"{DURABILITY_ENV}={value!r} is not a durability level; use 'normal' (the default: "
            "survives a process crash) or 'full' (flush every commit: survives a power loss)"
        )
    return level
