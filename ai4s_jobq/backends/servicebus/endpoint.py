"""Reaching a Service Bus namespace through another address (gateway, private
endpoint, local emulator) when authenticating with Azure AD.

``sb://NAMESPACE/QUEUE`` with ``DefaultAzureCredential`` connects to the
namespace's own host.  Two environment variables change *where* the clients
connect without changing *what* they talk to (the namespace stays the AMQP host
name, the entity addresses and the token's context):

``JOBQ_SERVICEBUS_ENDPOINT=sb://HOST[:PORT]``
    Connect to ``HOST:PORT``.  The data plane gets it as the SDK's public
    ``custom_endpoint_address`` with ``transport_type=Amqp`` (AMQP over TLS;
    port 5671 if none is given), the management plane as its namespace address
    ``HOST[:PORT]`` (HTTPS; 443 if none is given).  ``wss://HOST[:PORT]``
    selects AMQP over WebSockets instead (the SDK's default for a custom
    endpoint; port 443), for gateways that only pass HTTPS.  The local emulator
    serves AMQPS and HTTPS on one port, so ``sb://127.0.0.1:PORT``.

``JOBQ_SERVICEBUS_CA=/path/to/ca.pem``
    Trust this CA bundle (instead of the system's) for both planes: the SDKs'
    ``connection_verify``.  For a gateway with a private CA, or the emulator's
    CA (``jobq emulator`` prints its path).

Both apply only without a connection string: a connection string names its
own endpoint (and, for the emulator, its CA is found from that endpoint); the
connection-string helpers live here too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from azure.servicebus import TransportType

from ..base import QueueUnavailableError, ca_bundle_from_env

log = logging.getLogger("ai4s_jobq.servicebus")

ENDPOINT_ENV = "JOBQ_SERVICEBUS_ENDPOINT"
CA_ENV = "JOBQ_SERVICEBUS_CA"


@dataclass(frozen=True)
class EndpointOverride:
    """Where to connect instead of the namespace's host, and which CA to trust."""

    host: str | None = None
    port: int | None = None
    ca_bundle: str | None = None
    websocket: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EndpointOverride:
        env = os.environ if environ is None else environ
        host, port, websocket = _parse_endpoint(env.get(ENDPOINT_ENV, "").strip())
        ca_bundle = ca_bundle_from_env(env, CA_ENV)
        return cls(host, port, ca_bundle, websocket)

    def _tls(self) -> dict[str, Any]:
        return {"connection_verify": self.ca_bundle} if self.ca_bundle else {}

    def client_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``ServiceBusClient(namespace, credential, ...)``."""
        kwargs = self._tls()
        if self.host:
            scheme = "wss" if self.websocket else "sb"
            port = f":{self.port}" if self.port else ""
            kwargs["custom_endpoint_address"] = f"{scheme}://{self.host}{port}"
            kwargs["transport_type"] = (
                TransportType.AmqpOverWebsocket if self.websocket else TransportType.Amqp
            )
        return kwargs

    def admin_namespace(self, namespace: str) -> str:
        """The address ``ServiceBusAdministrationClient`` is given (it builds
        ``https://<this>``)."""
        if not self.host:
            return namespace
        return f"{self.host}:{self.port}" if self.port else self.host

    def admin_kwargs(self) -> dict[str, Any]:
        return self._tls()


def _parse_endpoint(value: str) -> tuple[str | None, int | None, bool]:
    """(host, port, websocket) of ``sb://``/``amqps://`` (AMQP over TLS) or ``wss://``."""
    if not value:
        return None, None, False
    parsed = urlparse(value if "://" in value else f"sb://{value}")
    try:
        port = parsed.port
    except ValueError:
        raise QueueUnavailableError(f"{ENDPOINT_ENV}={value}: invalid port") from None
    scheme = parsed.scheme.lower()
    if scheme not in ("sb", "amqps", "wss") or not parsed.hostname or parsed.path.strip("/"):
        raise QueueUnavailableError(
            f"{ENDPOINT_ENV}={value}: expected sb://HOST[:PORT] (or wss://HOST[:PORT])"
        )
    host = parsed.hostname
    return (f"[{host}]" if ":" in host else host), port, scheme == "wss"


# ---------------------------------------------------------------------- connection strings


def parse_connection_string(connection_string: str) -> dict[str, str]:
    settings: dict[str, str] = {}
    for part in connection_string.strip().split(";"):
        if "=" in part:
            key, value = part.split("=", 1)
            settings[key.strip().lower()] = value.strip()
    return settings


def endpoint_host(connection_string: str) -> str:
    endpoint = parse_connection_string(connection_string).get("endpoint", "")
    host = endpoint.split("://", 1)[-1].strip("/")
    if not host:
        raise QueueUnavailableError("the Service Bus connection string has no Endpoint")
    return host


def without_entity_path(connection_string: str) -> str:
    """The spec's QUEUE names the queue, so drop an EntityPath the string may carry."""
    parts = [
        p
        for p in connection_string.strip().split(";")
        if p.strip() and not p.strip().lower().startswith("entitypath=")
    ]
    return ";".join(parts)


def emulator_admin_kwargs(connection_string: str) -> dict[str, Any]:
    """How the admin client trusts the local emulator's certificate (nothing for Azure)."""
    try:
        from ...emulator.client import admin_client_kwargs
    except ImportError:  # pragma: no cover - the emulator package is part of ai4s_jobq
        return {}
    try:
        return admin_client_kwargs(connection_string)
    except FileNotFoundError as exc:
        log.warning("%s", exc)
        return {}
