"""One Azure Table, as the Table ledger (:mod:`.table_store`) uses it.

Connecting (lazily; the table is created by the first write, never by a read: a read
command with a mistyped ``--ledger`` table must not leave a new table in the account,
and a reader whose role may only read the table -- a dashboard's, say -- must not need
the right to create one), and the handful of request shapes
the ledger needs — a query, a streamed scan, an entity-group transaction, a lookup of
many RowKeys — each turning SDK errors into a :class:`~.base.LedgerError` that keeps
only the status and error code (SDK messages may echo URLs with SAS tokens).  Kept apart
from the store so the store reads as the ledger's layout and rules only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

from .base import LedgerError

T = TypeVar("T")

TRANSACTION_SIZE = 100  # Table storage's limit on operations per transaction
LOOKUP_GROUP = 14  # RowKey comparisons per filter (Table storage allows 15 in all)
CONCURRENCY = 8


def row_key(text: str) -> str:
    """A Table-safe key for a task ID, tag or queue name (see the dedup ledger's)."""
    from ..backends.storage.dedup import row_key as dedup_row_key

    return dedup_row_key(text)


def quote(value: str) -> str:
    return value.replace("'", "''")


def etag(entity: Any) -> str:
    """The ETag the SDK put on a read entity (a ``TableEntity``'s ``metadata``)."""
    return str(entity.metadata["etag"])


class TableAccess:
    """A lazily opened ``TableClient`` for one table, with error translation."""

    def __init__(
        self,
        service: Callable[[], Awaitable[Any]],
        table_name: str,
        where: str,
        close: Callable[[], Awaitable[None]] | None = None,
    ):
        self._service = service
        self.table_name = table_name
        self.where = where  # "ACCOUNT/TABLE", for messages
        self._close = close
        self._table: Any = None
        self._service_client: Any = None
        self._created = False  # by this process's first write (see the module docstring)
        self._opening: asyncio.Lock | None = None
        self._limit = asyncio.Semaphore(CONCURRENCY)

    async def open(self) -> None:
        if self._table is not None:
            return
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._table is not None:
                return

            async def connect() -> tuple[Any, Any]:
                service = await self._service()  # made once: the caller closes it
                return service, service.get_table_client(self.table_name)

            self._service_client, self._table = await self.call("opening", connect)

    async def _create(self) -> None:
        """Create the table (once per process) before the first write."""
        await self.open()
        if self._created:
            return
        from azure.core.exceptions import ResourceExistsError

        async def create() -> None:
            try:
                await self._service_client.create_table(self.table_name)
            except ResourceExistsError:
                pass

        await self.call("creating the table", create)
        self._created = True

    async def close(self) -> None:
        self._table = self._service_client = None
        self._created = False
        if self._close is not None:
            await self._close()

    async def call(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        from ..backends.base import BackendError
        from ..backends.storage.wire import translate_errors

        try:
            with translate_errors(f"ledger {what}", self.where):
                return await operation()
        except BackendError as exc:
            raise LedgerError(str(exc)) from None

    async def query(
        self, what: str, query_filter: str, select: list[str] | None = None
    ) -> list[dict[str, Any]]:
        await self.open()

        async def run() -> list[dict[str, Any]]:
            async with self._limit:
                pages = self._table.query_entities(query_filter, select=select)
                with _missing_table_is_empty():
                    return [entity async for entity in pages]
                return []

        return await self.call(what, run)

    async def scan(
        self, what: str, query_filter: str, select: list[str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream a large query page by page (constant memory), in RowKey order within
        a partition, as Table storage returns it."""
        await self.open()
        pager = self._table.query_entities(
            query_filter, select=select, results_per_page=1000
        ).by_page()
        while True:

            async def next_page() -> list[dict[str, Any]] | None:
                with _missing_table_is_empty():
                    try:
                        page = await pager.__anext__()
                    except StopAsyncIteration:
                        return None
                    return [entity async for entity in page]
                return None

            entities = await self.call(what, next_page)
            if entities is None:
                return
            for entity in entities:
                yield entity

    async def transact(self, what: str, operations: list[Any]) -> list[Any] | None:
        """Submit one transaction: each operation's response metadata (with its new
        ``etag``) if applied; None if a condition failed (409 exists / 412 changed /
        404 gone), when nothing was written.  Other failures raise LedgerError."""
        from azure.data.tables import TableTransactionError

        await self._create()

        async def run() -> list[Any] | None:
            try:
                return list(await self._table.submit_transaction(operations))
            except TableTransactionError as exc:
                if exc.status_code in (404, 409, 412):
                    return None
                raise

        return await self.call(what, run)

    async def lookup(self, partition: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Entities of ``partition`` for these task IDs (RowKey = ``row_key(id)``,
        property ``id``), keyed by task ID, with their ETags."""
        wanted = list(dict.fromkeys(ids))
        groups = [wanted[i : i + LOOKUP_GROUP] for i in range(0, len(wanted), LOOKUP_GROUP)]

        async def one(group: list[str]) -> list[dict[str, Any]]:
            rows = " or ".join(f"RowKey eq '{quote(row_key(i))}'" for i in group)
            return await self.query("lookup", f"PartitionKey eq '{quote(partition)}' and ({rows})")

        found: dict[str, dict[str, Any]] = {}
        for entities in await asyncio.gather(*(one(g) for g in groups)):
            for entity in entities:
                found[entity["id"]] = entity
        return found

    async def delete(self, partition: str, keys: Sequence[str]) -> None:
        """Delete these RowKeys of ``partition`` (one that vanished meanwhile is fine)."""
        for start in range(0, len(keys), TRANSACTION_SIZE):
            operations = [
                ("delete", {"PartitionKey": partition, "RowKey": key})
                for key in keys[start : start + TRANSACTION_SIZE]
            ]
            if await self.transact("delete", operations) is None:
                for operation in operations:
                    await self.transact("delete", [operation])


@contextlib.contextmanager
def _missing_table_is_empty() -> Iterator[None]:
    """A read of a table nobody has written yet finds nothing (Table storage says 404
    TableNotFound); the caller's code after the ``with`` block runs instead."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        yield
    except ResourceNotFoundError:
        pass


def storage_backend_access(backend: Any, table_name: str) -> TableAccess:
    """A table in a Storage Queue's own account, reached with the queue's credentials
    and endpoints (the backend's Table service client, once the backend is open)."""

    async def service() -> Any:
        tables = getattr(backend, "_tables", None)
        if tables is None:
            raise LedgerError("the Storage Queue backend is not open")
        return tables

    return TableAccess(service, table_name, f"{backend.account}/{table_name}")


def account_access(
    account: str | None, table_name: str, connection_string: str | None
) -> TableAccess:
    """A table named by ``--ledger ACCOUNT[/TABLE]``: Azure AD (DefaultAzureCredential,
    honouring ``JOBQ_STORAGE_TABLE_ENDPOINT``/``JOBQ_STORAGE_CA``), or a connection
    string, whose account wins."""
    clients: dict[str, Any] = {}

    async def service() -> Any:
        from azure.data.tables.aio import TableServiceClient

        retry: dict[str, Any] = {"retry_total": 3, "retry_backoff_factor": 0.5}
        if connection_string:
            clients["service"] = TableServiceClient.from_connection_string(
                connection_string, **retry
            )
        else:
            from azure.identity.aio import DefaultAzureCredential

            from ..backends.storage.endpoint import StorageEndpointOverride

            override = StorageEndpointOverride.from_env()
            clients["credential"] = DefaultAzureCredential()
            clients["service"] = TableServiceClient(
                override.table_url(str(account)),
                credential=clients["credential"],
                **retry,
                **override.sdk_kwargs(),
            )
        return clients["service"]

    async def close() -> None:
        for name in ("service", "credential"):
            if clients.get(name) is not None:
                try:
                    await clients.pop(name).close()
                except Exception:  # noqa: BLE001 - best effort
                    pass

    where = f"{account or 'connection string account'}/{table_name}"
    return TableAccess(service, table_name, where, close)
