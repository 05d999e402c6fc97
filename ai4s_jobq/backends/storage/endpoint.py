"""Reaching a storage account through another address (Azurite, a gateway, a
sovereign cloud) when authenticating with Azure AD.

``ACCOUNT/QUEUE`` with ``DefaultAzureCredential`` talks to
``https://ACCOUNT.queue.core.windows.net`` (and ``.table.`` for the dedup
ledger).  Three environment variables change *where* the clients connect, the
same way ``JOBQ_SERVICEBUS_ENDPOINT`` / ``JOBQ_SERVICEBUS_CA`` do for Service Bus
(:mod:`..servicebus.endpoint`); the token is still requested for
``https://storage.azure.com`` (the audience Azure AD issues for every storage
account, in every cloud, and the one Azurite accepts):

``JOBQ_STORAGE_QUEUE_ENDPOINT=https://HOST[:PORT][/PATH]`` and ``JOBQ_STORAGE_TABLE_ENDPOINT=...``
    The account's Queue and Table service URLs, what a connection string's
    ``QueueEndpoint=`` / ``TableEndpoint=`` would say.  ``{account}`` in a value is
    replaced by the spec's ACCOUNT, so one setting serves every account:
    ``https://{account}.queue.core.chinacloudapi.cn`` for a sovereign cloud,
    ``https://127.0.0.1:10001/{account}`` for Azurite (path-style URLs: the
    account is the first path segment).  Both or neither: half an override would
    send the dedup ledger (or the queue) to the public endpoint of an account that
    may not even exist there.  ``https`` only: the requests carry a bearer token,
    which must never travel in clear text (azure-core refuses it too).

``JOBQ_STORAGE_CA=/path/to/ca.pem``
    Trust this CA bundle instead of the system's: the SDK clients'
    ``connection_verify`` and the SSL context of the signed-REST fast path
    (:mod:`.rest`).  Separate from ``JOBQ_SERVICEBUS_CA`` on purpose: one
    process can talk to both backends (``jobq migrate``), each behind its own
    gateway, and each backend's settings stay self-contained.

All three apply only without a connection string: a connection string names its
own endpoints, as it does for Service Bus.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..base import QueueUnavailableError, ca_bundle_from_env
from .rest import Endpoints

QUEUE_ENDPOINT_ENV = "JOBQ_STORAGE_QUEUE_ENDPOINT"
TABLE_ENDPOINT_ENV = "JOBQ_STORAGE_TABLE_ENDPOINT"
CA_ENV = "JOBQ_STORAGE_CA"
ACCOUNT_PLACEHOLDER = "{account}"


@dataclass(frozen=True)
class StorageEndpointOverride:
    """The service URLs (templates with ``{account}``) and the CA bundle to use
    instead of the public endpoints and the system's trust store."""

    queue_endpoint: str | None = None
    table_endpoint: str | None = None
    ca_bundle: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StorageEndpointOverride:
        env = os.environ if environ is None else environ
        queue = _parse_endpoint(QUEUE_ENDPOINT_ENV, env.get(QUEUE_ENDPOINT_ENV, "").strip())
        table = _parse_endpoint(TABLE_ENDPOINT_ENV, env.get(TABLE_ENDPOINT_ENV, "").strip())
        if (queue is None) != (table is None):
            given, missing = (
                (QUEUE_ENDPOINT_ENV, TABLE_ENDPOINT_ENV)
                if queue
                else (TABLE_ENDPOINT_ENV, QUEUE_ENDPOINT_ENV)
            )
            raise QueueUnavailableError(
                f"{given} is set but {missing} is not: set both (the dedup ledger lives in "
                "the Table service of the same account), or neither"
            )
        ca_bundle = ca_bundle_from_env(env, CA_ENV)
        return cls(queue, table, ca_bundle)

    def queue_url(self, account: str) -> str:
        """What ``QueueServiceClient`` is given for ``account``."""
        if self.queue_endpoint is None:
            return f"https://{account}.queue.core.windows.net"
        return self.queue_endpoint.replace(ACCOUNT_PLACEHOLDER, account)

    def table_url(self, account: str) -> str:
        """What ``TableServiceClient`` is given for ``account``."""
        if self.table_endpoint is None:
            return f"https://{account}.table.core.windows.net"
        return self.table_endpoint.replace(ACCOUNT_PLACEHOLDER, account)

    def rest_endpoints(self, account: str) -> Endpoints:
        """The same URLs for :class:`~.rest.StorageRest` (no key, no SAS: it
        signs with the bearer token of the credential it is given)."""
        return Endpoints(account, self.queue_url(account), self.table_url(account))

    def sdk_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the SDK clients (public azure-core option)."""
        return {"connection_verify": self.ca_bundle} if self.ca_bundle else {}

    def ssl_context(self) -> ssl.SSLContext | None:
        """For aiohttp (the REST fast path): trusts only :attr:`ca_bundle`, like
        ``connection_verify=<file>`` does for the SDK; None keeps the default."""
        if self.ca_bundle is None:
            return None
        return ssl.create_default_context(cafile=self.ca_bundle)


def _parse_endpoint(name: str, value: str) -> str | None:
    """``value`` checked (``https://HOST[:PORT][/PATH]``) without a trailing slash."""
    if not value:
        return None
    parsed = urlsplit(value.replace(ACCOUNT_PLACEHOLDER, "account"))
    if parsed.query or parsed.fragment or "@" in parsed.netloc:
        # Not echoed: whatever is there (a SAS, a password) may be a secret.
        raise QueueUnavailableError(
            f"{name}: expected https://HOST[:PORT][/PATH], without user info, query string "
            "or fragment (the credential is Azure AD's; a SAS needs a connection string)"
        )
    try:
        parsed.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise QueueUnavailableError(f"{name}={value}: invalid port") from None
    if parsed.scheme.lower() != "https" or not parsed.hostname:
        raise QueueUnavailableError(
            f"{name}={value}: expected https://HOST[:PORT][/PATH] (https: the requests carry "
            "an Azure AD bearer token)"
        )
    return value.rstrip("/")
