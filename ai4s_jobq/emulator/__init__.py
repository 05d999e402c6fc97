"""A local Azure Service Bus emulator that the official ``azure-servicebus`` SDK
talks to over real AMQP 1.0 and HTTPS (see docs/emulator.md).

Importing this package needs the ``emulator`` extra (python-qpid-proton,
cryptography) only when a server is started; :mod:`.client` needs neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["EmulatorServer", "EmulatorProcess", "admin_client_kwargs"]

if TYPE_CHECKING:
    from .client import admin_client_kwargs
    from .process import EmulatorProcess
    from .server import EmulatorServer


def __getattr__(name: str) -> Any:
    if name == "EmulatorServer":
        from .server import EmulatorServer

        return EmulatorServer
    if name == "EmulatorProcess":
        from .process import EmulatorProcess

        return EmulatorProcess
    if name == "admin_client_kwargs":
        from .client import admin_client_kwargs

        return admin_client_kwargs
    raise AttributeError(name)
