"""Azure AD (Entra ID) bearer tokens, as Service Bus accepts them -- emulated.

Real Service Bus accepts an Azure AD access token in two places: the AMQP CBS
``put-token`` (token type ``jwt``) and the management REST API
(``Authorization: Bearer <jwt>``).  It checks the token's signature against
Azure AD's signing keys, its lifetime and its audience, then the principal's
role assignments.

The emulator cannot know Azure AD's keys, so it trusts one symmetric key
instead: tokens must be HS256 JWTs signed with the emulator's *AAD trust key*
(``--aad-trust-key``; tests get such tokens from a fake managed-identity
endpoint).  Without a trust key every JWT is refused.  What is checked, as on
Azure: the signature, ``exp`` and ``nbf`` (with :data:`CLOCK_SKEW` leeway) and
``aud`` (the Service Bus resource, :data:`SERVICEBUS_AUDIENCES`).  There is no
RBAC: a valid token grants the whole namespace.

Error messages say what was wrong with a token, never what it contained.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .auth import AuthError

#: The audiences Azure AD issues for Service Bus.  The SDK asks for the scope
#: ``https://servicebus.azure.net//.default`` (resource with a trailing slash);
#: Azure AD itself writes the audience without it.
SERVICEBUS_AUDIENCES = frozenset(
    {
        "https://servicebus.azure.net",
        "https://servicebus.azure.net/",
        "https://servicebus.azure.net//",
    }
)
#: Leeway for ``exp`` / ``nbf`` (Azure tolerates a few minutes of clock skew).
CLOCK_SKEW = 300
NO_TRUST_KEY = (
    "Azure AD tokens are not accepted: the emulator has no AAD trust key "
    "(start it with --aad-trust-key KEY to accept tokens signed with KEY)"
)


def _b64url_decode(part: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise AuthError("the Azure AD token is not a well-formed JWT") from None


def _json_part(part: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64url_decode(part))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AuthError("the Azure AD token is not a well-formed JWT") from None
    if not isinstance(value, dict):
        raise AuthError("the Azure AD token is not a well-formed JWT")
    return value


def _audiences(claims: dict[str, Any]) -> list[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    if isinstance(aud, list):
        return [a for a in aud if isinstance(a, str)]
    return []


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AuthError(f"the Azure AD token's {name!r} claim is not a number")
    return float(value)


@dataclass
class JwtAuthority:
    """Checks Azure AD-style bearer tokens against one trusted HMAC key.

    ``trust_key`` is used as its UTF-8 bytes (like the SAS key); empty means no
    JWT is accepted.  :attr:`accepted` counts accepted tokens per plane
    (``"amqp"``, ``"https"``), so tests can see which path used a token."""

    trust_key: str = ""
    audiences: frozenset[str] = SERVICEBUS_AUDIENCES
    accepted: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def enabled(self) -> bool:
        return bool(self.trust_key)

    def check(self, token: str, *, plane: str, now: float | None = None) -> dict[str, Any]:
        """The token's claims if it is valid; :class:`AuthError` otherwise."""
        if not self.enabled:
            raise AuthError(NO_TRUST_KEY)
        parts = token.strip().split(".")
        if len(parts) != 3 or not all(parts[:2]):
            raise AuthError("the Azure AD token is not a well-formed JWT")
        header, claims = _json_part(parts[0]), _json_part(parts[1])
        if header.get("alg") != "HS256":
            raise AuthError(
                "the Azure AD token is not signed with the emulator's algorithm "
                "(HS256 with the AAD trust key)"
            )
        expected = hmac.new(
            self.trust_key.encode("utf-8"), f"{parts[0]}.{parts[1]}".encode("ascii"), hashlib.sha256
        ).digest()
        if not hmac.compare_digest(expected, _b64url_decode(parts[2])):
            raise AuthError(
                "the Azure AD token's signature does not match the emulator's AAD trust key"
            )
        current = time.time() if now is None else now
        expires = _number(claims, "exp")
        if expires is None:
            raise AuthError("the Azure AD token has no expiry ('exp' claim)")
        if expires + CLOCK_SKEW < current:
            raise AuthError("the Azure AD token has expired")
        not_before = _number(claims, "nbf")
        if not_before is not None and not_before - CLOCK_SKEW > current:
            raise AuthError("the Azure AD token is not valid yet ('nbf' is in the future)")
        if not any(a in self.audiences for a in _audiences(claims)):
            raise AuthError(
                "the Azure AD token's audience is not Service Bus "
                "(expected https://servicebus.azure.net)"
            )
        with self._lock:
            self.accepted[plane] += 1
        return claims
