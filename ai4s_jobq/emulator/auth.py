"""Shared Access Signature checks, as Service Bus does them.

A SAS token is ``SharedAccessSignature sr=<uri>&sig=<b64 hmac>&se=<expiry>&skn=<key name>``
where ``sig = base64(HMAC-SHA256(key, quote_plus(sr) + "\\n" + se))``.  The
emulator accepts a token when the key name is its key name, the signature
matches its key, it has not expired, and its resource covers the entity being
accessed.  Messages produced here never contain the token or the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, quote_plus, urlparse

DEFAULT_KEY_NAME = "RootManageSharedAccessKey"


class AuthError(Exception):
    """The token does not grant access; the message is safe to show to the client."""


def new_key() -> str:
    """A random 32-byte key, base64-encoded like the keys Azure generates."""
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def sign(resource: str, key_name: str, key: str, expiry: int) -> str:
    """Build a SAS token (used by tests and by the benchmark)."""
    encoded = quote_plus(resource)
    digest = hmac.new(key.encode(), f"{encoded}\n{expiry}".encode(), hashlib.sha256).digest()
    sig = quote_plus(base64.b64encode(digest).decode())
    return f"SharedAccessSignature sr={encoded}&sig={sig}&se={expiry}&skn={quote_plus(key_name)}"


def _resource_key(uri: str) -> str:
    """Normalise ``sb://host/queue`` / ``https://host:443/queue`` to ``host/queue``
    (lower case, no scheme, no trailing slash); the port is dropped because the
    SDK signs the audience without it on some paths and with it on others."""
    if "://" not in uri:
        uri = "sb://" + uri
    parsed = urlparse(uri)
    host = (parsed.hostname or "").lower()
    path = parsed.path.strip("/").lower()
    return f"{host}/{path}" if path else host


@dataclass
class SasAuthority:
    key_name: str
    key: str

    def check(self, token: str | bytes, resource: str, *, now: float | None = None) -> None:
        """Raise :class:`AuthError` unless ``token`` grants access to ``resource``."""
        if isinstance(token, (bytes, bytearray, memoryview)):
            token = bytes(token).decode("utf-8", "replace")
        prefix = "SharedAccessSignature "
        if not token.startswith(prefix):
            raise AuthError("the token is not a SharedAccessSignature")
        fields = parse_qs(token[len(prefix) :], keep_blank_values=True)
        try:
            sr = fields["sr"][0]
            sig = fields["sig"][0]
            se = fields["se"][0]
            skn = fields.get("skn", [""])[0]
        except (KeyError, IndexError):
            raise AuthError("the SharedAccessSignature is missing sr, sig or se") from None
        if skn != self.key_name:
            raise AuthError("unknown SharedAccessKeyName")
        try:
            expiry = int(se)
        except ValueError:
            raise AuthError("the SharedAccessSignature has an invalid expiry") from None
        if expiry < (time.time() if now is None else now):
            raise AuthError("the SharedAccessSignature has expired")
        expected = hmac.new(
            self.key.encode(), f"{quote_plus(sr)}\n{se}".encode(), hashlib.sha256
        ).digest()
        try:
            given = base64.b64decode(sig, validate=False)
        except ValueError:
            given = b""
        if not hmac.compare_digest(expected, given):
            raise AuthError("the SharedAccessSignature signature does not match the key")
        granted = _resource_key(sr)
        wanted = _resource_key(resource)
        if "/" not in granted:
            granted_host, granted_path = granted, ""
        else:
            granted_host, granted_path = granted.split("/", 1)
        wanted_host, _, wanted_path = wanted.partition("/")
        if granted_host and wanted_host and granted_host != wanted_host:
            raise AuthError("the SharedAccessSignature is for another namespace")
        if granted_path and not (
            wanted_path == granted_path or wanted_path.startswith(granted_path + "/")
        ):
            raise AuthError("the SharedAccessSignature does not cover this entity")

    def covers(self, granted_audiences: set[str], entity: str) -> bool:
        """True if one of the audiences accepted on a connection covers ``entity``
        (a queue name)."""
        wanted = entity.strip("/").lower()
        for audience in granted_audiences:
            path = _resource_key(audience).partition("/")[2]
            if not path or wanted == path or wanted.startswith(path + "/"):
                return True
        return False
