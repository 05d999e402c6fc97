"""How a client reaches the emulator from its connection string alone.

The emulator prints a connection string of the form::

    Endpoint=sb://127.0.0.1:PORT;SharedAccessKeyName=RootManageSharedAccessKey;
    SharedAccessKey=...;UseDevelopmentEmulator=true

* ``ServiceBusClient.from_connection_string(cs)`` needs nothing else: with
  ``UseDevelopmentEmulator=true`` the SDK speaks plain AMQP to ``PORT``.
* ``ServiceBusAdministrationClient.from_connection_string(cs)`` always uses
  ``https://127.0.0.1:PORT``.  The emulator serves AMQP and HTTPS on the same
  port (it tells them apart by the first byte a client sends) with a
  certificate from its own CA, so the admin client must be told to trust that
  CA: pass ``**admin_client_kwargs(cs)`` (``connection_verify=<ca.pem>``).

**The CA rule.**  On start the emulator copies its CA certificate to
``ca_path_for(host, port)`` = ``<state dir>/<host>_<port>/ca.pem`` where the
state dir is ``$AI4S_JOBQ_EMULATOR_STATE`` if set, else
``<tempdir>/ai4s_jobq-emulator-<uid>``.  Both sides derive the path from the
endpoint's host and port, so the connection string is all a client needs.
Connection strings without ``UseDevelopmentEmulator=true`` (real Azure) get no
extra arguments.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

STATE_DIR_ENV = "AI4S_JOBQ_EMULATOR_STATE"
#: The emulator's AAD trust key (see :mod:`.jwt_auth`), read by ``python -m
#: ai4s_jobq.emulator`` and ``jobq emulator`` (an environment variable keeps it
#: out of process listings).
AAD_TRUST_KEY_ENV = "AI4S_JOBQ_EMULATOR_AAD_TRUST_KEY"


class EmulatorCaMissing(FileNotFoundError):
    """The connection string names an emulator whose CA file is not on this machine."""


def _settings(connection_string: str) -> dict[str, str]:
    settings: dict[str, str] = {}
    for part in connection_string.strip().rstrip(";").split(";"):
        if "=" in part:
            key, value = part.split("=", 1)
            settings[key.strip().lower()] = value.strip()
    return settings


def is_emulator_connection_string(connection_string: str) -> bool:
    return _settings(connection_string).get("usedevelopmentemulator", "").lower() == "true"


def emulator_endpoint(connection_string: str) -> tuple[str, int]:
    """(host, port) of the endpoint in an emulator connection string."""
    endpoint = _settings(connection_string).get("endpoint", "")
    parsed = urlparse(endpoint if "://" in endpoint else "sb://" + endpoint)
    if not parsed.hostname:
        raise ValueError("the connection string has no Endpoint host")
    return parsed.hostname, parsed.port or 5672


def state_dir() -> Path:
    override = os.environ.get(STATE_DIR_ENV)
    if override:
        return Path(override)
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"ai4s_jobq-emulator-{uid}"


def ca_path_for(host: str, port: int) -> Path:
    """Where the emulator listening on ``host:port`` publishes its CA certificate."""
    safe_host = "".join(c if c.isalnum() or c in ".-" else "_" for c in host)
    return state_dir() / f"{safe_host}_{int(port)}" / "ca.pem"


def connection_string(host: str, port: int, key_name: str, key: str) -> str:
    return (
        f"Endpoint=sb://{host}:{port};SharedAccessKeyName={key_name};"
        f"SharedAccessKey={key};UseDevelopmentEmulator=true"
    )


def admin_client_kwargs(connection_string: str) -> dict[str, Any]:
    """Extra keyword arguments for ``ServiceBusAdministrationClient.from_connection_string``
    (sync or aio): ``{"connection_verify": "<ca.pem>"}`` for an emulator connection
    string, ``{}`` otherwise.  Raises :class:`EmulatorCaMissing` if the emulator's
    CA file is not where the emulator would have written it."""
    if not is_emulator_connection_string(connection_string):
        return {}
    host, port = emulator_endpoint(connection_string)
    path = ca_path_for(host, port)
    if not path.exists():
        raise EmulatorCaMissing(
            f"no CA certificate for the emulator at {host}:{port} (expected {path}); "
            "is the emulator running on this machine?"
        )
    return {"connection_verify": str(path)}
