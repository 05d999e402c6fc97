"""Service Bus with Azure AD: ``sb://NAMESPACE/QUEUE``, no connection string,
``DefaultAzureCredential`` -- the production auth path -- against the emulator.

Real: ``DefaultAzureCredential`` (azure.identity.aio), the azure-servicebus SDK
(AMQP over TLS with a CBS ``jwt`` put-token; ``ServiceBusAdministrationClient``
over HTTPS with ``Authorization: Bearer``), ``JobQ.open`` / ``ServiceBusBackend.open``
and the ``jobq`` CLI.  MOCKED: only Azure AD's token endpoint, which cannot run
here -- ``aad_support.FakeTokenEndpoint`` plays the App Service managed-identity
endpoint and signs tokens with a key the emulator is told to trust.

Users write ``sb://mynamespace/QUEUE``; ``JOBQ_SERVICEBUS_ENDPOINT`` and
``JOBQ_SERVICEBUS_CA`` route both planes to the emulator on 127.0.0.1 (see
``ai4s_jobq.backends.servicebus.endpoint``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import worker_scenarios
from aad_support import (
    SERVICEBUS_RESOURCE,
    FakeTokenEndpoint,
    assert_no_token_in,
    assert_tokens_came_from,
    fake_token_endpoint,
    scrubbed_environ,
    use_managed_identity,
)
from conftest import ROOT

from ai4s_jobq import JobQ
from ai4s_jobq.backends.base import BackendError

pytest.importorskip("azure.identity")

NAMESPACE = "mynamespace"


@pytest.fixture
def aad(sb_emulator_aad, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTokenEndpoint]:
    """The fake token endpoint, signing with the emulator's trust key; this process
    uses it through DefaultAzureCredential and reaches the emulator through the
    endpoint override.  No connection string anywhere."""
    for name in ("JOBQ_QUEUE", "JOBQ_CONNECTION_STRING", "JOBQ_DEDUP_WINDOW"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JOBQ_DETERMINISTIC_IDS", "true")
    monkeypatch.setenv("JOBQ_SERVICEBUS_ENDPOINT", f"sb://127.0.0.1:{sb_emulator_aad.port}")
    monkeypatch.setenv("JOBQ_SERVICEBUS_CA", str(sb_emulator_aad.ca_path))
    with fake_token_endpoint(signing_key=sb_emulator_aad.aad_trust_key.encode()) as endpoint:
        use_managed_identity(monkeypatch, endpoint)
        yield endpoint


def queue_name() -> str:
    return f"aad-{uuid.uuid4().hex[:10]}"


def accepted(emulator, plane: str) -> int:
    return emulator.server.ctx.aad.accepted[plane]


# ---------------------------------------------------------------------- it works


async def test_push_and_worker_drain_with_default_azure_credential(
    aad, sb_emulator_aad, tmp_path: Path
):
    from azure.identity.aio import DefaultAzureCredential

    queue, log = queue_name(), tmp_path / "log"
    async with JobQ.open(f"sb://{NAMESPACE}/{queue}") as q:
        backend = q.backend
        assert backend.namespace == f"{NAMESPACE}.servicebus.windows.net"
        assert backend._connection_string is None
        assert isinstance(backend._credential, DefaultAzureCredential)
        for name in ("a", "b", "c"):
            await q.push({"log": str(log), "name": name})
        await worker_scenarios.drain_recorded(q, log, ["a", "b", "c"])
    # the token really came from the (fake) managed-identity endpoint ...
    assert_tokens_came_from(aad, SERVICEBUS_RESOURCE)
    # ... and the emulator accepted it on both planes
    assert accepted(sb_emulator_aad, "amqp") > 0
    assert accepted(sb_emulator_aad, "https") > 0
    # the queue was created (through the admin plane, with the bearer token) with
    # duplicate detection; read back with the emulator's SAS key
    with sb_emulator_aad.admin() as admin:
        props = admin.get_queue(queue)
    assert props.requires_duplicate_detection is True


async def test_startup_checker_reads_queue_properties_with_the_token(aad, sb_emulator_aad):
    queue = sb_emulator_aad.create_queue(requires_duplicate_detection=False)
    before = accepted(sb_emulator_aad, "https")
    async with JobQ.open(f"sb://{NAMESPACE}/{queue}", check=False) as q:
        findings = await q.check()
    # "no-dedup" can only come from the queue's real properties ("unreadable" otherwise)
    assert [f.code for f in findings] == ["no-dedup"], findings
    assert accepted(sb_emulator_aad, "https") > before
    assert aad.request_count > 0

    aad.mode = "wrong_key"  # a new JobQ gets a new credential, hence a new token
    async with JobQ.open(f"sb://{NAMESPACE}/{queue}", check=False) as q:
        findings = await q.check()
    assert [f.code for f in findings] == ["unreadable"], findings


# ---------------------------------------------------------------------- refused tokens


def test_wrong_key_token_cli_exits_4_with_actionable_message(
    aad, sb_emulator_aad, caplog: pytest.LogCaptureFixture
):
    aad.mode = "wrong_key"
    queue = sb_emulator_aad.create_queue()
    env = scrubbed_environ(os.environ, aad)
    env.update(
        {
            "JOBQ_SERVICEBUS_ENDPOINT": os.environ["JOBQ_SERVICEBUS_ENDPOINT"],
            "JOBQ_SERVICEBUS_CA": os.environ["JOBQ_SERVICEBUS_CA"],
        }
    )
    with caplog.at_level(logging.DEBUG):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "ai4s_jobq_cli",
                "-v",
                "--queue",
                f"sb://{NAMESPACE}/{queue}",
                "size",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    assert result.returncode == 4, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(
        f"error: could not read the counts of sb://{NAMESPACE}.servicebus.windows.net/{queue}"
    )
    assert "signature does not match the emulator's AAD trust key" in error
    assert "Traceback" not in result.stderr
    assert aad.request_count > 0 and accepted(sb_emulator_aad, "https") == 0
    assert_no_token_in(result.stdout + result.stderr + caplog.text, aad)


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("wrong_key", "signature does not match the emulator's AAD trust key"),
        ("expired", "the Azure AD token has expired"),
    ],
)
async def test_refused_token_fails_both_planes_with_the_reason(
    aad, sb_emulator_aad, caplog: pytest.LogCaptureFixture, mode: str, reason: str
):
    aad.mode = mode
    queue = sb_emulator_aad.create_queue()
    with caplog.at_level(logging.DEBUG):
        async with JobQ.open(f"sb://{NAMESPACE}/{queue}", check=False) as q:
            with pytest.raises(BackendError, match="counts") as admin_error:
                await q.counts()
            with pytest.raises(BackendError, match="was refused") as amqp_error:
                await q.push({"cmd": "echo never"})
    assert reason in str(admin_error.value)
    assert reason in str(amqp_error.value)
    assert "CBS Token authentication failed" in str(amqp_error.value)
    assert aad.request_count > 0
    assert accepted(sb_emulator_aad, "amqp") == accepted(sb_emulator_aad, "https") == 0
    assert sb_emulator_aad.server.core.counts(queue).active == 0
    assert_no_token_in(str(admin_error.value) + str(amqp_error.value) + caplog.text, aad)


def test_emulator_without_trust_key_refuses_jwts_clearly(sb_emulator):
    from ai4s_jobq.emulator.auth import AuthError

    with fake_token_endpoint() as endpoint:
        token, _ = endpoint.mint(SERVICEBUS_RESOURCE)
    ctx = sb_emulator.server.ctx
    with pytest.raises(AuthError, match="no AAD trust key") as refused:
        ctx.check_authorization_header(f"Bearer {token}", "https://x/q")
    assert token not in str(refused.value)
