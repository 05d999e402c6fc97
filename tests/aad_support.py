"""A MOCK of Azure AD for tests: a fake managed-identity token endpoint.

Why a mock: the brief says "mock only what cannot run here (Azure AD token
endpoints)".  Everything else in the auth tests is real: ``DefaultAzureCredential``
(``azure.identity`` and ``azure.identity.aio``), the Azure SDK clients, the wire
protocols, and the emulator that checks the tokens.  Only the place where a real
machine would get a token from Azure AD -- the managed-identity endpoint of App
Service / Azure Functions -- is replaced by this local HTTP server.

The protocol is the one ``ManagedIdentityCredential`` speaks when the App Service
variables are set (``IDENTITY_ENDPOINT`` + ``IDENTITY_HEADER``; sync through
``msal.ManagedIdentityClient``, aio through ``AsyncManagedIdentityClient``)::

    GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=<resource>
    X-IDENTITY-HEADER: {IDENTITY_HEADER}

    200 {"access_token": "<jwt>", "expires_on": "<unix seconds>",
         "resource": "<resource>", "token_type": "Bearer", "client_id": "..."}

The resource is the scope without ``/.default`` (Service Bus asks for
``https://servicebus.azure.net//.default``, so the resource ends in ``/``).

Tokens are HS256 JWTs signed with :attr:`FakeTokenEndpoint.signing_key`, so a
server under test can verify them with that shared key.  :attr:`mode` makes the
endpoint misbehave on purpose: ``"wrong_key"`` signs with another key,
``"expired"`` mints a JWT whose ``exp`` is in the past while the response still
says it is valid (so the client sends it and the *server* must refuse it),
``"wrong_audience"`` mints it for :data:`WRONG_AUDIENCE` instead of the resource
asked for (a token meant for another service; Azurite checks audiences but not
signatures, so this is how it refuses a token).

Use :func:`use_managed_identity` (or the ``aad_endpoint`` fixture in the test
modules) to point ``DefaultAzureCredential`` at the fake: it sets the two App
Service variables and removes every variable that would make an earlier
credential in the chain (environment, workload identity) or another managed
identity flavour (IMDS, Cloud Shell, Service Fabric, Arc) take over.  With the
managed identity credential succeeding, the chain never reaches the developer
credentials (Azure CLI, PowerShell, azd), so production code can keep calling
plain ``DefaultAzureCredential()``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlparse

import pytest

#: The API version ``AppServiceCredential`` sends (sync via MSAL and aio alike).
APP_SERVICE_API_VERSION = "2019-08-01"
#: Header carrying the secret from ``IDENTITY_HEADER``.
IDENTITY_HEADER_NAME = "X-IDENTITY-HEADER"
#: Path the fake serves tokens on (any path would do; this one reads well in logs).
TOKEN_PATH = "/msi/token"
#: What Service Bus asks for: scope ``https://servicebus.azure.net//.default``.
SERVICEBUS_RESOURCE = "https://servicebus.azure.net/"
#: What the Storage SDKs (and jobq's REST path) ask for: ``https://storage.azure.com/.default``.
STORAGE_RESOURCE = "https://storage.azure.com"
#: The audience of ``"wrong_audience"`` tokens (Azure Resource Manager's).
WRONG_AUDIENCE = "https://management.azure.com/"
FAKE_TENANT = "72f988bf-0000-4000-8000-00000000fa4e"

#: Variables that would let some other credential of ``DefaultAzureCredential``
#: (or another managed-identity source) answer before / instead of the fake.
CREDENTIAL_ENV_VARS = (
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    "AZURE_CLIENT_SEND_CERTIFICATE_CHAIN",
    "AZURE_USERNAME",
    "AZURE_PASSWORD",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
    "AZURE_TOKEN_CREDENTIALS",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "AZURE_REGIONAL_AUTHORITY_NAME",
    "AZURE_KUBERNETES_TOKEN_PROXY",
    "AZURE_KUBERNETES_SNI_NAME",
    "AZURE_KUBERNETES_CA_FILE",
    "AZURE_KUBERNETES_CA_DATA",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
)

TokenMode = Literal["valid", "wrong_key", "expired", "wrong_audience"]


# ---------------------------------------------------------------------- JWT


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def encode_jwt(claims: Mapping[str, Any], key: bytes) -> str:
    """A compact HS256 JWT (header.payload.signature, base64url without padding)."""
    header = {"alg": "HS256", "typ": "JWT"}
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode("utf-8"))
        for part in (header, dict(claims))
    )
    signature = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{_b64url(signature)}"


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, NOT verified (for assertions in tests only)."""
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


# ---------------------------------------------------------------------- the endpoint


@dataclass
class TokenRequest:
    """One request the fake received (never the token it answered with)."""

    resource: str
    api_version: str
    header_ok: bool
    status: int


@dataclass
class FakeTokenEndpoint:
    """The fake managed-identity endpoint.  ``start()`` binds 127.0.0.1 on a free
    port and serves from a daemon thread; ``stop()`` (or leaving the ``with``
    block) shuts it down.  Thread-safe counters tell a test it was really used."""

    #: HMAC key of the tokens (ASCII, so a server can take it as text: :attr:`trust_key`)
    signing_key: bytes = field(default_factory=lambda: secrets.token_urlsafe(32).encode())
    identity_header: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    issuer: str = f"https://sts.windows.net/{FAKE_TENANT}/"
    object_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    client_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    lifetime: int = 3600
    mode: TokenMode = "valid"
    requests: list[TokenRequest] = field(default_factory=list)
    issued: list[str] = field(default_factory=list, repr=False)
    _server: ThreadingHTTPServer | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeTokenEndpoint:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-aad-endpoint", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> FakeTokenEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def trust_key(self) -> str:
        """:attr:`signing_key` as text (what a server's trust-key setting takes)."""
        return self.signing_key.decode("utf-8")

    @property
    def url(self) -> str:
        assert self._server is not None, "the fake token endpoint is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}{TOKEN_PATH}"

    # ------------------------------------------------------------------ what happened

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    @property
    def tokens_issued(self) -> int:
        with self._lock:
            return len(self.issued)

    def resources(self) -> set[str]:
        with self._lock:
            return {r.resource for r in self.requests}

    # ------------------------------------------------------------------ environment

    def env(self) -> dict[str, str]:
        """The variables a child process needs to use this endpoint (combine with
        :func:`scrubbed_environ` so nothing else in the chain answers first)."""
        return {
            "IDENTITY_ENDPOINT": self.url,
            "IDENTITY_HEADER": self.identity_header,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    # ------------------------------------------------------------------ minting

    def mint(self, resource: str, *, now: float | None = None) -> tuple[str, int]:
        """(JWT, expires_on the response advertises) for ``resource`` in :attr:`mode`."""
        now_s = int(time.time() if now is None else now)
        expires_on = now_s + self.lifetime
        claims = {
            "aud": resource,
            "iss": self.issuer,
            "iat": now_s,
            "nbf": now_s,
            "exp": expires_on,
            "oid": self.object_id,
            "sub": self.object_id,
            "tid": FAKE_TENANT,
            "appid": self.client_id,
            "idtyp": "app",
        }
        key = self.signing_key
        if self.mode == "wrong_key":
            key = hashlib.sha256(b"not the trusted key" + self.signing_key).digest()
        elif self.mode == "expired":
            # Expired at the server, but the response claims a valid lifetime: the
            # client caches and sends it, and the server must be the one to refuse.
            claims.update(iat=now_s - 7200, nbf=now_s - 7200, exp=now_s - 3600)
        elif self.mode == "wrong_audience":
            claims["aud"] = WRONG_AUDIENCE
        return encode_jwt(claims, key), expires_on

    def _answer(self, query: Mapping[str, list[str]], header: str | None) -> tuple[int, dict]:
        resource = (query.get("resource") or [""])[0]
        api_version = (query.get("api-version") or [""])[0]
        header_ok = header is not None and hmac.compare_digest(header, self.identity_header)
        if not header_ok:
            status, body = 401, {"statusCode": 401, "message": "missing or wrong X-IDENTITY-HEADER"}
        elif api_version != APP_SERVICE_API_VERSION or not resource:
            status, body = (
                400,
                {"statusCode": 400, "message": "api-version 2019-08-01 and resource are required"},
            )
        else:
            token, expires_on = self.mint(resource)
            status, body = (
                200,
                {
                    "access_token": token,
                    "expires_on": str(expires_on),
                    "resource": resource,
                    "token_type": "Bearer",
                    "client_id": self.client_id,
                },
            )
            with self._lock:
                self.issued.append(token)
        with self._lock:
            self.requests.append(TokenRequest(resource, api_version, header_ok, status))
        return status, body


def _handler_for(endpoint: FakeTokenEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            parsed = urlparse(self.path)
            if parsed.path != TOKEN_PATH:
                status, body = 404, {"statusCode": 404, "message": "not found"}
            else:
                status, body = endpoint._answer(
                    parse_qs(parsed.query), self.headers.get(IDENTITY_HEADER_NAME)
                )
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            """Silent: the default handler logs to stderr, which tests capture."""

    return Handler


# ---------------------------------------------------------------------- environment helpers


def use_managed_identity(monkeypatch: pytest.MonkeyPatch, endpoint: FakeTokenEndpoint) -> None:
    """Make ``DefaultAzureCredential`` in this process use ``endpoint`` and only it."""
    for name in CREDENTIAL_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in endpoint.env().items():
        monkeypatch.setenv(name, value)


def scrubbed_environ(base: Mapping[str, str], endpoint: FakeTokenEndpoint) -> dict[str, str]:
    """``base`` (e.g. ``os.environ``) for a child process: the credential variables
    removed and the fake endpoint's added."""
    env = {k: v for k, v in base.items() if k not in CREDENTIAL_ENV_VARS}
    env.update(endpoint.env())
    return env


@contextmanager
def fake_token_endpoint(**options: Any) -> Iterator[FakeTokenEndpoint]:
    """``with fake_token_endpoint() as aad: ...`` -- started, and stopped on exit."""
    endpoint = FakeTokenEndpoint(**options)
    with endpoint:
        yield endpoint


@pytest.fixture
def aad_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTokenEndpoint]:
    """A running fake endpoint that ``DefaultAzureCredential`` in this process uses.
    Import it into a test module (``from aad_support import aad_endpoint``)."""
    with fake_token_endpoint() as endpoint:
        use_managed_identity(monkeypatch, endpoint)
        yield endpoint


# ---------------------------------------------------------------------- shared assertions


def assert_no_token_in(text: str, endpoint: FakeTokenEndpoint) -> None:
    """No token this endpoint issued, nor any of its three parts, is in ``text``."""
    assert endpoint.issued, "the fake endpoint issued no token: nothing was checked"
    for token in endpoint.issued:
        for part in token.split("."):  # header, claims and signature separately too
            assert part not in text, "a token (or part of one) leaked into the output"


def assert_tokens_came_from(endpoint: FakeTokenEndpoint, resource: str) -> None:
    """Every token was asked for ``resource``, with the identity header, and issued."""
    assert endpoint.request_count > 0
    assert endpoint.resources() == {resource}
    assert all(r.header_ok and r.status == 200 for r in endpoint.requests)
