"""What every front end of one emulator instance shares: the broker core, the token
authorities (SAS and Azure AD) and the wake-up hub that tells connection threads a
queue may have new messages (so receivers wait on an event, not on a polling loop)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ai4s_jobq.broker_core import BrokerCore

from .auth import SasAuthority
from .jwt_auth import JwtAuthority

SAS_PREFIX = "SharedAccessSignature "


class WakeHub:
    """Fan-out of the broker core's "queue X may have messages" notifications."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: set[Callable[[str], None]] = set()

    def subscribe(self, callback: Callable[[str], None]) -> None:
        with self._lock:
            self._subscribers.add(callback)

    def unsubscribe(self, callback: Callable[[str], None]) -> None:
        with self._lock:
            self._subscribers.discard(callback)

    def notify(self, queue: str) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(queue)
            except Exception:  # a dying connection must not break senders
                pass


@dataclass
class EmulatorContext:
    core: BrokerCore
    authority: SasAuthority
    #: Azure AD bearer tokens; refuses every JWT unless given a trust key
    aad: JwtAuthority = field(default_factory=JwtAuthority)
    hub: WakeHub = field(default_factory=WakeHub)
    #: Smallest duplicate-detection window / lock duration the management API
    #: accepts, in seconds.  Azure's minimum window is 20 s; the emulator accepts
    #: shorter ones so tests can cross a window quickly.
    min_duration: float = 0.1

    def __post_init__(self) -> None:
        self.core.add_listener(self.hub.notify)

    def check_cbs_token(self, token: str | bytes, resource: str) -> None:
        """A CBS ``put-token``: a SAS token for ``resource`` or an Azure AD JWT.
        Raises :class:`~.auth.AuthError`.

        Told apart by content, not by the put-token's ``type``: the SDK declares
        SAS tokens as ``jwt`` too on some paths, and Service Bus accepts that."""
        text = _text(token)
        if text.startswith(SAS_PREFIX):
            self.authority.check(text, resource)
        else:
            self.aad.check(text, plane="amqp")

    def check_authorization_header(self, header: str, resource: str) -> None:
        """An HTTP ``Authorization`` header: ``Bearer <jwt>`` or a SAS token."""
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            self.aad.check(credentials, plane="https")
        else:
            self.authority.check(header, resource)


def _text(token: str | bytes) -> str:
    if isinstance(token, (bytes, bytearray, memoryview)):
        return bytes(token).decode("utf-8", "replace")
    return str(token)
