"""Which ledger a queue has: one place that maps a backend to its store.

* ``local://`` — :class:`~.sqlite_store.SqliteLedger` in the queue's own SQLite file.
* Storage Queue — :class:`~.table_store.TableLedger` in the same account, table
  ``jobqledger`` (the account's credentials and endpoints, as the queue's).
* Service Bus — a Table only when one is named: ``--ledger ACCOUNT[/TABLE]`` or
  ``JOBQ_LEDGER``, authenticated with DefaultAzureCredential, or with
  ``JOBQ_LEDGER_CONNECTION_STRING`` (whose account wins, as for queues).  Without one
  the queue has no ledger and the commands that need it say so
  (:data:`NO_LEDGER_HELP`).

Building a store does no I/O: an unreachable ledger shows up on first use, where the
push path warns and goes on and the read commands exit with a connection error.
"""

from __future__ import annotations

import os
import re

from ..backends.base import Backend
from .base import LedgerNotConfigured, LedgerStore

LEDGER_ENV = "JOBQ_LEDGER"
LEDGER_CONNECTION_STRING_ENV = "JOBQ_LEDGER_CONNECTION_STRING"
DEFAULT_TABLE = "jobqledger"
OFF = "off"  # --ledger off / JOBQ_LEDGER=off: no ledger (e.g. to measure without one)
NO_LEDGER_HELP = (
    "this Service Bus queue has no ledger: name an Azure Table for it with "
    "--ledger ACCOUNT[/TABLE] or JOBQ_LEDGER (Azure AD), or JOBQ_LEDGER_CONNECTION_STRING. "
    "Without a ledger, `jobq wait --drained` still works; wait on IDs or tags, status, "
    "tasks, result, workers and push --skip-succeeded need one."
)
_TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]{2,62}$")


def ledger_for(backend: Backend, ledger: str | None = None) -> LedgerStore | None:
    """The ledger store of ``backend`` (not opened), or None when it has none.
    ``ledger`` is ``ACCOUNT[/TABLE]`` (else ``JOBQ_LEDGER``); it is required for
    Service Bus and, for Storage Queue, moves the ledger to another account/table;
    ``off`` turns the ledger off for any backend."""
    spec = (ledger or os.environ.get(LEDGER_ENV) or "").strip() or None
    if spec is not None and spec.lower() == OFF:
        return None
    connection_string = os.environ.get(LEDGER_CONNECTION_STRING_ENV, "").strip() or None
    if backend.kind == "local" and spec is None:
        from ..backends.durability import SYNCHRONOUS
        from ..backends.local import LocalBackend
        from .sqlite_store import SqliteLedger

        assert isinstance(backend, LocalBackend)
        return SqliteLedger(
            backend.path,
            synchronous=SYNCHRONOUS[backend.durability],
            queue_name=backend.queue_name,
        )
    if backend.kind == "storage" and spec is None and connection_string is None:
        from .table_store import TableLedger

        return TableLedger.for_storage_backend(backend, DEFAULT_TABLE)
    if spec is None and connection_string is None:
        return None
    account, table = parse_ledger_spec(spec)
    from .table_store import TableLedger

    return TableLedger.for_account(
        account, table, scope=backend.queue_name, connection_string=connection_string
    )


def parse_ledger_spec(spec: str | None) -> tuple[str | None, str]:
    """``ACCOUNT[/TABLE]`` → (account, table); None → (None, default table)."""
    if spec is None:
        return None, DEFAULT_TABLE
    account, _, table = spec.partition("/")
    table = table or DEFAULT_TABLE
    if not account or "/" in table or not _TABLE_NAME.match(table):
        raise LedgerNotConfigured(
            f"--ledger {spec!r}: expected ACCOUNT[/TABLE], TABLE being 3-63 letters and "
            "digits starting with a letter"
        )
    return account, table


def require(store: LedgerStore | None) -> LedgerStore:
    if store is None:
        raise LedgerNotConfigured(NO_LEDGER_HELP)
    return store
