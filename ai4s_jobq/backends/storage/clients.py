"""The SDK clients (queue service, table service) and the REST endpoints for one
storage account, from a connection string or, without one, for Azure AD
(``DefaultAzureCredential``, endpoints overridable by ``JOBQ_STORAGE_*``, see
:mod:`.endpoint`).  Kept apart from the backend so that how jobq connects (retry
policies, credentials, endpoint overrides) reads in one place."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from azure.storage.queue._shared.policies_async import ExponentialRetry

from .endpoint import StorageEndpointOverride
from .rest import Endpoints, parse_connection_string


@dataclass
class AccountClients:
    service: Any  # azure.storage.queue.aio.QueueServiceClient
    tables: Any  # azure.data.tables.aio.TableServiceClient
    credential: Any  # the Azure AD credential, None with a connection string
    endpoints: Endpoints | None  # for the REST fast path; None: the SDK serves all
    tls: ssl.SSLContext | None


def account_clients(connection_string: str | None, account_arg: str | None) -> AccountClients:
    from azure.data.tables.aio import TableServiceClient
    from azure.storage.queue.aio import QueueServiceClient

    credential: Any = None
    tls: ssl.SSLContext | None = None

    # The SDK default backs off 15 s and more: too slow to tell a user about a typo.
    retry: dict[str, Any] = {
        "retry_policy": ExponentialRetry(
            initial_backoff=0.5,  # type: ignore[arg-type]
            increment_base=2,
            retry_total=3,
            retry_connect=1,  # a refused connection is a wrong endpoint, not a blip
            random_jitter_range=0.5,  # type: ignore[arg-type]
        )
    }
    table_retry: dict[str, Any] = {
        "retry_total": 3,
        "retry_connect": 1,
        "retry_backoff_factor": 0.5,
    }
    if connection_string:
        service = QueueServiceClient.from_connection_string(connection_string, **retry)
        tables = TableServiceClient.from_connection_string(connection_string, **table_retry)
        endpoints = parse_connection_string(connection_string)
    else:
        from azure.identity.aio import DefaultAzureCredential

        # Azure AD: the public endpoints unless JOBQ_STORAGE_*_ENDPOINT / _CA say
        # otherwise (Azurite, a gateway, a sovereign cloud; see .endpoint).
        override = StorageEndpointOverride.from_env()
        account = str(account_arg)
        credential = DefaultAzureCredential()
        service = QueueServiceClient(
            override.queue_url(account),
            credential=credential,
            **retry,
            **override.sdk_kwargs(),
        )
        tables = TableServiceClient(
            override.table_url(account),
            credential=credential,
            **table_retry,
            **override.sdk_kwargs(),
        )
        endpoints, tls = override.rest_endpoints(account), override.ssl_context()
    return AccountClients(service, tables, credential, endpoints, tls)
