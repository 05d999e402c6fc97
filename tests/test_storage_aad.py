"""Storage Queue with Azure AD: ``ACCOUNT/QUEUE``, no connection string,
``DefaultAzureCredential`` -- the production auth path -- against Azurite.

Real: ``DefaultAzureCredential`` (azure.identity.aio), the azure-storage-queue and
azure-data-tables SDKs, jobq's signed-REST fast path (aiohttp with
``Authorization: Bearer``), ``JobQ.open`` / ``StorageQueueBackend.open``, the
``jobq`` CLI, and Azurite checking every token (HTTPS, ``--oauth basic``).
MOCKED: only Azure AD's token endpoint, which cannot run here --
``aad_support.FakeTokenEndpoint`` plays the App Service managed-identity endpoint.

Users write ``devstoreaccount1/QUEUE``; ``JOBQ_STORAGE_QUEUE_ENDPOINT`` /
``JOBQ_STORAGE_TABLE_ENDPOINT`` / ``JOBQ_STORAGE_CA`` route the SDK clients and the
REST path to Azurite on 127.0.0.1 (see ``ai4s_jobq.backends.storage.endpoint``).

What Azurite 3.37.0 checks, read in ``node_modules/azurite/dist/src``
(``queue/authentication/QueueTokenAuthenticator.js``, its twin
``table/authentication/TableTokenAuthenticator.js``, ``common/utils/constants.js``,
``queue/utils/constants.js``, ``table/utils/constants.js``):

* the token authenticator is only installed with ``--oauth basic``, and a Bearer
  header over plain HTTP is refused, so this Azurite serves HTTPS (``--cert`` /
  ``--key``; a CA + server certificate from ``ai4s_jobq.emulator.tls``);
* "basic" does not verify the signature; it needs ``iat``/``nbf``/``exp`` and
  refuses ``now > exp`` ("Lifetime validation failed. The token is expired.");
* ``iss`` must start with ``https://sts.windows.net/`` (or the German, Chinese or
  PPE STS), which the fake's default issuer does;
* ``aud`` must be ``https://storage.azure.com[/]``, the storage app id
  ``e406a681-f3d4-42a8-90b6-c2b029497af1``, or
  ``https://ACCOUNT.queue|table.core.(windows.net|chinacloudapi.cn|usgovcloudapi.net|cloudapi.de)[/]``
  with ACCOUNT equal to the request's ("Invalid token audience." otherwise);
* the Table service has the same authenticator, so the dedup ledger runs on the
  token too (tested with the default 7-day window);
* refusals are 403 ``AuthenticationFailed`` with an ``AuthenticationErrorDetail``.

The Azurite here logs every request (``--debug``) to a private temporary file: it
is how the tests see, from the server's side, which requests carried which token
and whether Azurite accepted it.  That file holds tokens (Azurite logs headers);
nothing from it is ever printed, and it is deleted with the module's Azurite.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import worker_scenarios
from aad_support import (
    STORAGE_RESOURCE,
    FakeTokenEndpoint,
    assert_no_token_in,
    assert_tokens_came_from,
    fake_token_endpoint,
    jwt_claims,
    scrubbed_environ,
    use_managed_identity,
)
from azurite_fixtures import ACCOUNT, Azurite, start_azurite, stop_azurite
from conftest import ROOT

from ai4s_jobq import JobQ
from ai4s_jobq.backends.base import ConnectionFailedError
from ai4s_jobq.backends.storage.dedup import LEDGER_TABLE

pytest.importorskip("azure.identity")

TOKEN_OK = "Validation against token authentication successfully."


@dataclass
class OAuthAzurite:
    azurite: Azurite
    ca_path: Path
    debug_log: Path


@pytest.fixture(scope="module")
def oauth_azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OAuthAzurite]:
    """A dedicated Azurite for this module: HTTPS with a throwaway CA, ``--oauth
    basic``, in memory, free 127.0.0.1 ports; stopped (and its files removed) at the
    end."""
    from ai4s_jobq.emulator.tls import ensure_tls_files

    workdir = tmp_path_factory.mktemp("azurite-oauth")
    tls = ensure_tls_files(workdir / "tls", "127.0.0.1")
    debug_log = workdir / "debug.log"
    process, azurite, _ = start_azurite(
        workdir, oauth_cert=(tls.server_cert, tls.server_key), debug_log=debug_log
    )
    try:
        yield OAuthAzurite(azurite, tls.ca_cert, debug_log)
    finally:
        stop_azurite(process)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def aad(
    oauth_azurite: OAuthAzurite, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeTokenEndpoint]:
    """The fake token endpoint, which this process's DefaultAzureCredential uses; the
    endpoint override points ``devstoreaccount1`` at the HTTPS Azurite.  No
    connection string anywhere."""
    for name in ("JOBQ_QUEUE", "JOBQ_CONNECTION_STRING", "JOBQ_DEDUP_WINDOW"):
        monkeypatch.delenv(name, raising=False)
    azurite = oauth_azurite.azurite
    monkeypatch.setenv("JOBQ_DETERMINISTIC_IDS", "true")
    # one with the {account} placeholder, one spelled out: both forms are in use
    monkeypatch.setenv(
        "JOBQ_STORAGE_QUEUE_ENDPOINT", azurite.service_url("queue").replace(ACCOUNT, "{account}")
    )
    monkeypatch.setenv("JOBQ_STORAGE_TABLE_ENDPOINT", azurite.service_url("table"))
    monkeypatch.setenv("JOBQ_STORAGE_CA", str(oauth_azurite.ca_path))
    with fake_token_endpoint() as endpoint:
        use_managed_identity(monkeypatch, endpoint)
        yield endpoint


def queue_name() -> str:
    return f"aad-{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def with_account_key(oauth_azurite: OAuthAzurite) -> AsyncIterator[tuple]:
    """(QueueServiceClient, TableServiceClient) signed with Azurite's public dev key:
    the test's own view of the account, independent of the token path under test."""
    from azure.data.tables.aio import TableServiceClient
    from azure.storage.queue.aio import QueueServiceClient

    cs, ca = oauth_azurite.azurite.connection_string, str(oauth_azurite.ca_path)
    async with (
        QueueServiceClient.from_connection_string(cs, connection_verify=ca) as queues,
        TableServiceClient.from_connection_string(cs, connection_verify=ca) as tables,
    ):
        yield queues, tables


# ---------------------------------------------------------------------- Azurite's view


@dataclass
class SeenRequest:
    """One request as Azurite's debug log records it (the token itself is not kept)."""

    context: str
    service: str  # "queue" | "table"
    method: str
    path: str
    user_agent: str | None
    bearer_claims: dict
    verdict: str | None = None  # Azurite's token check: TOKEN_OK or its refusal


_REQUEST = re.compile(
    r"^\S+ (\S+) info: (Queue|Table)StorageContextMiddleware: "
    r"RequestMethod=(\S+) RequestURL=\S+?://[^/]+(\S*) RequestHeaders:"
)
_VERDICT = re.compile(
    r"^\S+ (\S+) \w+: (?:Queue|Table)TokenAuthenticator:"
    r"authenticateBasic\(\) (.*)$"
)
# the refusal's reason, in the error body Azurite logs (XML for queue, JSON for table)
_REFUSAL = re.compile(
    r"^\S+ (\S+) error: ErrorMiddleware: Set HTTP body: .*?"
    r"AuthenticationErrorDetail[>\\\":\s]+([^<\\\"]+)"
)


def seen_requests(debug_log: Path, endpoint: FakeTokenEndpoint) -> list[SeenRequest]:
    """The requests that carried a token from ``endpoint``, with Azurite's verdict."""
    issued = set(endpoint.issued)
    requests: dict[str, SeenRequest] = {}
    verdicts: dict[str, str] = {}
    for line in debug_log.read_text(errors="replace").splitlines():
        if (match := _REQUEST.match(line)) is not None:
            context, service, method, path = match.groups()
            try:
                headers, _ = json.JSONDecoder().raw_decode(line, match.end())
            except ValueError:
                continue  # a line still being written: complete at the next read
            auth = headers.get("authorization", "")
            token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
            if token is not None and token in issued:
                requests[context] = SeenRequest(
                    context,
                    service.lower(),
                    method,
                    path,
                    headers.get("user-agent"),
                    jwt_claims(token),
                )
        elif (match := _VERDICT.match(line)) is not None:
            verdicts[match.group(1)] = match.group(2).strip()
        elif (match := _REFUSAL.match(line)) is not None:
            verdicts.setdefault(match.group(1), match.group(2).strip())
    for context, request in requests.items():
        request.verdict = verdicts.get(context)
    return list(requests.values())


def azurite_saw(
    debug_log: Path, endpoint: FakeTokenEndpoint, enough, timeout: float = 10.0
) -> list[SeenRequest]:
    """Azurite writes its log asynchronously: re-read it until every request seen has
    its verdict and ``enough(requests)`` holds (an event we cannot await), then
    return what it saw (the caller's asserts then say what is missing)."""
    deadline = time.monotonic() + timeout
    while True:
        requests = seen_requests(debug_log, endpoint)
        done = requests and all(r.verdict for r in requests) and enough(requests)
        if done or time.monotonic() > deadline:
            return requests
        time.sleep(0.05)


# ---------------------------------------------------------------------- it works


async def test_push_dedup_and_worker_drain_with_default_azure_credential(
    aad, oauth_azurite, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    from azure.identity.aio import DefaultAzureCredential

    queue, log = queue_name(), tmp_path / "log"
    caplog.set_level(logging.DEBUG)  # the SDKs' HTTP logging included
    async with JobQ.open(f"{ACCOUNT}/{queue}") as q:
        backend = q.backend
        assert backend.connection_string is None
        assert isinstance(backend._credential, DefaultAzureCredential)
        first = await q.push({"log": str(log), "name": "a"})
        again = await q.push({"log": str(log), "name": "a"})  # same task, same ID
        for name in ("b", "c"):
            await q.push({"log": str(log), "name": name})
        assert (first.duplicate, again.duplicate) == (False, True)
        assert again.id == first.id
        assert (await q.counts()).active == 3

        # the account's own view (account key): three messages, one ledger entry each
        async with with_account_key(oauth_azurite) as (queues, tables):
            props = await queues.get_queue_client(queue).get_queue_properties()
            assert props.metadata["jobq_dedup_window_seconds"] == str(7 * 86400)
            peeked = await queues.get_queue_client(queue).peek_messages(max_messages=32)
            assert len(peeked) == 3
            ledger = tables.get_table_client(LEDGER_TABLE)
            entries = [e async for e in ledger.query_entities(f"PartitionKey eq '{queue}'")]
            assert len(entries) == 3

        await worker_scenarios.drain_recorded(q, log, ["a", "b", "c"])
    # the token really came from the (fake) managed-identity endpoint, for storage
    assert_tokens_came_from(aad, STORAGE_RESOURCE)
    # ... and Azurite accepted it on both services (queue + the ledger's table)
    seen = azurite_saw(
        oauth_azurite.debug_log, aad, lambda rs: {r.service for r in rs} == {"queue", "table"}
    )
    assert {r.service for r in seen} == {"queue", "table"}
    assert all(r.verdict == TOKEN_OK for r in seen), {
        (r.method, r.path, r.verdict) for r in seen if r.verdict != TOKEN_OK
    }
    assert_no_token_in(caplog.text, aad)


async def test_check_reads_queue_settings_with_the_token(aad, oauth_azurite):
    queue = queue_name()
    async with with_account_key(oauth_azurite) as (queues, _):
        # one day: not jobq's default, so only the queue's real metadata can say it
        await queues.get_queue_client(queue).create_queue(
            metadata={"jobq_dedup_window_seconds": "86400"}
        )

    async with JobQ.open(f"{ACCOUNT}/{queue}", check=False, create=False) as q:
        findings = await q.check()
    assert [(f.code, f.level) for f in findings] == [("consistent", "ok")], findings
    assert "deduplicates over 1d (application ledger)" in findings[0].message
    assert aad.resources() == {STORAGE_RESOURCE}

    # the CLI, in its own process with its own DefaultAzureCredential
    env = scrubbed_environ(os.environ, aad)
    result = subprocess.run(
        [sys.executable, "-m", "ai4s_jobq_cli", "--queue", f"{ACCOUNT}/{queue}", "check", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["consistent"] is True
    assert "over 1d" in report["findings"][0]["message"]
    assert_no_token_in(result.stdout + result.stderr, aad)

    aad.mode = "wrong_audience"  # a new JobQ gets a new credential, hence a new token
    # A refused credential is a configuration error, not an unreadable setting: check
    # raises it (the CLI exits 4) rather than reporting the queue as unverifiable.
    async with JobQ.open(f"{ACCOUNT}/{queue}", check=False, create=False) as q:
        with pytest.raises(ConnectionFailedError) as refused:
            await q.check()
    assert "refused the credentials (AuthenticationFailed: Invalid token audience.)" in str(
        refused.value
    ), refused.value
    assert_no_token_in(str(refused.value), aad)


async def test_push_and_complete_go_through_the_rest_path_with_the_bearer_token(aad, oauth_azurite):
    """The fast path (storage_rest.StorageRest: Put Message, the ledger's $batch,
    Delete Message) signs with the token: seen from Azurite's side, those requests
    carried a storage-audience token from the fake endpoint, were not the SDK's
    (the SDK always sends ``User-Agent: azsdk-python-...``; the REST path sends
    none) and passed Azurite's token check."""
    queue = queue_name()
    async with JobQ.open(f"{ACCOUNT}/{queue}") as q:
        for n in range(3):
            await q.push({"cmd": f"echo {n}"})
        received = await q.backend.receive(3, 5.0)
        assert len(received) == 3
        for message in received:
            await q.backend.complete(message)
        assert (await q.counts()).active == 0

    messages = f"/{ACCOUNT}/{queue}/messages"

    def rest(requests: list[SeenRequest]) -> dict[str, list[SeenRequest]]:
        kinds: dict[str, list[SeenRequest]] = {"put": [], "batch": [], "delete": []}
        for r in requests:
            if r.verdict is None or r.user_agent is not None:
                continue
            if r.method == "POST" and r.path.startswith(messages + "?"):
                kinds["put"].append(r)
            elif r.method == "POST" and r.path == f"/{ACCOUNT}/$batch":
                kinds["batch"].append(r)
            elif r.method == "DELETE" and r.path.startswith(messages + "/"):
                kinds["delete"].append(r)
        return kinds

    seen = azurite_saw(
        oauth_azurite.debug_log,
        aad,
        lambda rs: (
            (k := rest(rs))
            and len(k["put"]) == 3
            and len(k["delete"]) == 3
            and len(k["batch"]) >= 2
        ),
    )  # claim + mark sent
    kinds = rest(seen)
    assert (len(kinds["put"]), len(kinds["delete"])) == (3, 3), kinds
    assert len(kinds["batch"]) >= 2, kinds
    for request in kinds["put"] + kinds["delete"] + kinds["batch"]:
        assert request.verdict == TOKEN_OK, (request.method, request.path, request.verdict)
        assert request.bearer_claims["aud"] == STORAGE_RESOURCE
    # and the SDK part (receive) carried the same kind of token, with its User-Agent
    sdk = [r for r in seen if r.user_agent is not None]
    assert sdk and all(r.user_agent.startswith("azsdk-python-") for r in sdk)


# ---------------------------------------------------------------------- refused tokens


@pytest.mark.parametrize(
    ("mode", "detail"),
    [
        ("expired", "Lifetime validation failed. The token is expired."),
        ("wrong_audience", "Invalid token audience."),
    ],
)
async def test_refused_token_cli_exits_4_with_actionable_message(
    aad, oauth_azurite, caplog: pytest.LogCaptureFixture, mode: str, detail: str
):
    aad.mode = mode
    queue = queue_name()
    env = scrubbed_environ(os.environ, aad)
    with caplog.at_level(logging.DEBUG):
        result = subprocess.run(
            [sys.executable, "-m", "ai4s_jobq_cli", "-v", "--queue", f"{ACCOUNT}/{queue}", "size"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    assert result.returncode == 4, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: "), error
    assert (
        f"storage account '{ACCOUNT}' refused the credentials (AuthenticationFailed: "
        f"{detail})" in error
    ), error  # the service's own reason, word for word
    assert "your Azure login" in error and "Storage Queue Data Contributor" in error, error
    assert "Traceback" not in result.stderr
    assert aad.request_count > 0 and aad.resources() == {STORAGE_RESOURCE}
    assert_no_token_in(result.stdout + result.stderr + caplog.text, aad)
    # Azurite refused it for the reason this test is about (not, say, TLS) ...
    seen = azurite_saw(oauth_azurite.debug_log, aad, lambda rs: True)
    assert seen and all(r.verdict == detail for r in seen), {r.verdict for r in seen}
    # ... and nothing was created with it
    async with with_account_key(oauth_azurite) as (queues, _):
        names = [props.name async for props in queues.list_queues(name_starts_with=queue)]
    assert names == []


async def test_endpoint_override_needs_both_services(aad, monkeypatch: pytest.MonkeyPatch):
    """Half an override is a configuration error, reported before any request."""
    from ai4s_jobq.backends.base import QueueUnavailableError

    monkeypatch.delenv("JOBQ_STORAGE_TABLE_ENDPOINT")
    with pytest.raises(QueueUnavailableError, match="JOBQ_STORAGE_TABLE_ENDPOINT is not"):
        async with JobQ.open(f"{ACCOUNT}/{queue_name()}"):
            pass
    assert aad.request_count == 0


def test_endpoint_override_parsing():
    from ai4s_jobq.backends.base import QueueUnavailableError
    from ai4s_jobq.backends.storage.endpoint import StorageEndpointOverride

    default = StorageEndpointOverride.from_env({})
    assert default.queue_url("acct") == "https://acct.queue.core.windows.net"
    assert default.table_url("acct") == "https://acct.table.core.windows.net"
    assert default.sdk_kwargs() == {} and default.ssl_context() is None

    china = StorageEndpointOverride.from_env(
        {
            "JOBQ_STORAGE_QUEUE_ENDPOINT": "https://{account}.queue.core.chinacloudapi.cn/",
            "JOBQ_STORAGE_TABLE_ENDPOINT": "https://{account}.table.core.chinacloudapi.cn",
        }
    )
    assert china.queue_url("acct") == "https://acct.queue.core.chinacloudapi.cn"
    assert china.rest_endpoints("acct").table_url == "https://acct.table.core.chinacloudapi.cn"

    for bad, message in [
        ("http://127.0.0.1:10001/{account}", "expected https://"),
        ("https://127.0.0.1:port/x", "invalid port"),
        ("https://h/x?sig=s3cret", "without user info, query string"),
        ("https://user:s3cret@h/x", "without user info, query string"),
    ]:
        with pytest.raises(QueueUnavailableError, match=re.escape(message)) as refused:
            StorageEndpointOverride.from_env(
                {"JOBQ_STORAGE_QUEUE_ENDPOINT": bad, "JOBQ_STORAGE_TABLE_ENDPOINT": "https://t"}
            )
        assert "s3cret" not in str(refused.value)
    with pytest.raises(QueueUnavailableError, match="JOBQ_STORAGE_CA=/nonexistent.pem"):
        StorageEndpointOverride.from_env({"JOBQ_STORAGE_CA": "/nonexistent.pem"})


def test_only_plain_word_reasons_reach_the_error():
    """Azure's AuthenticationErrorDetail for a Shared Key failure carries the request's
    signature and the string it signed: that must never be shown; a token's
    "expired" reason is plain words and is."""
    from ai4s_jobq.backends.storage.rest import auth_reason

    def body(detail: str) -> str:
        return (
            '<?xml version="1.0"?><Error><Code>AuthenticationFailed</Code><Message>'
            f"Server failed</Message><AuthenticationErrorDetail>{detail}"
            "</AuthenticationErrorDetail></Error>"
        )

    assert auth_reason(body("Lifetime validation failed. The token is expired.")) == (
        "Lifetime validation failed. The token is expired."
    )
    signed = (
        "The MAC signature found in the HTTP request 'q0Zx+Yk/abc=' is not the same "
        "as any computed signature. Server used following string to sign: 'GET'"
    )
    assert auth_reason(body(signed)) == ""
    assert auth_reason("<Error><Code>AuthenticationFailed</Code></Error>") == ""
