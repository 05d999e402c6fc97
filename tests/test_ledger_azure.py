"""The ledger on the Azure backends, for real: Storage Queue with its ledger table in
the same (Azurite) account, and Service Bus (our emulator, through the official SDK)
with its ledger in an Azurite Table named by --ledger / JOBQ_LEDGER_CONNECTION_STRING."""

from __future__ import annotations

import json
import signal
import uuid

import pytest
import servicebus_support as support
import test_storage_aad as storage_aad
from azure.data.tables.aio import TableServiceClient
from azurite_fixtures import free_port
from conftest import jobq_cli
from servicebus_support import jobq_sb, run_counts, start_worker

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.backends.storage.dedup import LEDGER_TABLE as DEDUP_TABLE
from ai4s_jobq.ledger.base import TaskState
from ai4s_jobq.ledger.recorder import LedgerRecorder
from ai4s_jobq.ledger.resolve import DEFAULT_TABLE
from ai4s_jobq.worker.processors import CallableProcessor

sb_process, sb_cs, sb_queue = support.sb_process, support.sb_cs, support.sb_queue
# an HTTPS Azurite that checks Azure AD tokens, and the MOCKED token endpoint
oauth_azurite, aad = storage_aad.oauth_azurite, storage_aad.aad


def task(kind: str) -> object:
    if kind == "fail":
        raise KeyError(f"missing input {kind!r} (the real cause)")
    return {"kind": kind}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("JOBQ_QUEUE", "JOBQ_CONNECTION_STRING", "JOBQ_LEDGER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("JOBQ_LEDGER_CONNECTION_STRING", raising=False)


async def test_storage_queue_ledger_lives_in_its_own_table(azurite, storage_queue_name):
    spec = f"devstoreaccount1/{storage_queue_name}"
    async with JobQ.open(spec, connection_string=azurite.connection_string) as q:
        pushed = await q.push_many(
            [{"kind": "a"}, {"kind": "b"}, {"kind": "fail"}], tag="run-1", num_retries=1
        )
        assert pushed.pushed == 3
        again = await q.push_many([{"kind": "a"}], tag="run-2")
        assert again.duplicates == 1
        recorder = LedgerRecorder(q.ledger, flush_interval=0.05)
        await Worker(
            q.backend,
            CallableProcessor(task),
            WorkerPolicy(slots=3, idle_timeout=1.0),
            hooks=[recorder],
        ).run()
        report = await q.wait(tag="run-1", timeout=60)
        assert (report.succeeded, report.dead_lettered, report.exit_code) == (2, 1, 1)
        (failed_id,) = report.dead_lettered_ids
        failed = await q.result(failed_id)
        assert failed.attempt == 2 and failed.reason == "KeyError"
        assert "the real cause" in failed.summary
        assert (await q.wait(tag="run-2", timeout=60)).exit_code == 0
        (a,) = [r async for r in q.ledger.iter_tag("run-2")]
        assert a.state is TaskState.SUCCEEDED and a.result == {"kind": "a"}
        (worker,) = await q.ledger.workers()
        assert worker.stopped and worker.tasks_done == 4  # attempts ended, retries included
    # the ledger table is separate from the dedup claims table
    async with TableServiceClient.from_connection_string(azurite.connection_string) as service:
        names = {t.name async for t in service.list_tables()}
    assert {DEDUP_TABLE, DEFAULT_TABLE} <= names


async def test_reading_a_ledger_creates_no_table_and_needs_only_read_rights(azurite):
    """A read of a ledger table nobody has written finds nothing and creates nothing
    (a mistyped --ledger table must not appear in the account); the first write
    creates it; and a reader whose SAS may only read and list (no right to create a
    table, as a dashboard's role might be) reads an existing ledger."""
    from datetime import datetime, timedelta, timezone

    from azure.core.credentials import AzureNamedKeyCredential
    from azure.data.tables import AccountSasPermissions, ResourceTypes, generate_account_sas
    from azurite_fixtures import ACCOUNT, ACCOUNT_KEY

    from ai4s_jobq.ledger.events import PushEntry
    from ai4s_jobq.ledger.table_store import TableLedger

    table = f"t{uuid.uuid4().hex[:16]}"

    def ledger(connection_string: str) -> TableLedger:
        return TableLedger.for_account(None, table, scope="q", connection_string=connection_string)

    async def tables() -> set[str]:
        async with TableServiceClient.from_connection_string(azurite.connection_string) as svc:
            return {t.name async for t in svc.list_tables()}

    async with ledger(azurite.connection_string) as reader:
        assert (await reader.status()).counts == {}
        assert await reader.get(["x"]) == {} and await reader.tags() == []
        assert [r async for r in reader.iter_tag("run")] == []
    assert table not in await tables()
    async with ledger(azurite.connection_string) as writer:
        await writer.record_pushes([PushEntry("x", False)], tag="run")
    assert table in await tables()

    sas = generate_account_sas(
        AzureNamedKeyCredential(ACCOUNT, ACCOUNT_KEY),
        resource_types=ResourceTypes(service=True, container=True, object=True),
        permission=AccountSasPermissions(read=True, list=True),
        expiry=datetime.now(timezone.utc) + timedelta(hours=1),
    )
    read_only = f"TableEndpoint={azurite.service_url('table')};SharedAccessSignature={sas}"
    async with ledger(read_only) as reader:
        assert (await reader.status()).counts == {"queued": 1}
        assert [r.id async for r in reader.iter_tag("run")] == ["x"]


def test_storage_cli_push_wait_and_status(azurite, storage_queue_name, tmp_path):
    env = {"JOBQ_CONNECTION_STRING": azurite.connection_string}
    spec = f"devstoreaccount1/{storage_queue_name}"
    args = ("-q", spec)
    pushed = jobq_cli(
        *args,
        "push",
        "--tag",
        "t1",
        "-c",
        "true",
        "-c",
        "false",
        "--json",
        "--num-retries",
        "0",
        env=env,
        check=True,
    )
    assert len([x for x in pushed.stdout.splitlines() if '"id"' in x]) == 2
    jobq_cli(*args, "worker", "-n", "2", "--idle-timeout", "1s", env=env, check=True)
    waited = jobq_cli(*args, "wait", "--tag", "t1", "--timeout", "60s", "--json", env=env)
    assert waited.returncode == 1 and json.loads(waited.stdout)["succeeded"] == 1
    status = json.loads(jobq_cli(*args, "status", "--tag", "t1", "--json", env=env).stdout)
    assert status["counts"] == {"succeeded": 1, "dead_lettered": 1}
    assert status["queue"]["dead_letter"] == 1


def test_service_bus_ledger_in_an_azurite_table(sb_cs, sb_queue, azurite):
    ledger = {"JOBQ_LEDGER_CONNECTION_STRING": azurite.connection_string}
    table = f"sb{uuid.uuid4().hex[:10]}"
    pushed = jobq_sb(
        sb_cs,
        sb_queue,
        "--ledger",
        f"devstoreaccount1/{table}",
        "push",
        "--tag",
        "r",
        "-c",
        "echo one",
        "-c",
        "echo two",
        "--json",
        **ledger,
    )
    assert pushed.returncode == 0, pushed.stderr
    worker = start_worker(
        sb_cs,
        sb_queue,
        "-n",
        "2",
        "--idle-timeout",
        "2s",
        JOBQ_LEDGER=f"devstoreaccount1/{table}",
        **ledger,
    )
    try:
        waited = jobq_sb(
            sb_cs,
            sb_queue,
            "wait",
            "--tag",
            "r",
            "--timeout",
            "90s",
            "--json",
            JOBQ_LEDGER=f"devstoreaccount1/{table}",
            **ledger,
        )
        assert waited.returncode == 0, waited.stderr
        assert json.loads(waited.stdout)["succeeded"] == 2
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=60)
    workers = jobq_sb(
        sb_cs, sb_queue, "workers", "--json", JOBQ_LEDGER=f"devstoreaccount1/{table}", **ledger
    )
    (record,) = json.loads(workers.stdout)
    assert record["tasks_done"] == 2 and record["status"] == "stopped"


def test_service_bus_without_a_ledger_says_what_to_set(sb_cs, sb_queue):
    assert jobq_sb(sb_cs, sb_queue, "push", "-c", "true").returncode == 0
    status = jobq_sb(sb_cs, sb_queue, "status")
    assert status.returncode == 4 and "--ledger" in status.stderr
    assert "wait --drained" in status.stderr
    refused = jobq_sb(sb_cs, sb_queue, "push", "--wait", "-c", "echo x")
    assert refused.returncode == 4 and "--ledger" in refused.stderr
    assert run_counts(sb_cs, sb_queue)[0] == 1  # refused before pushing anything
    worker = start_worker(sb_cs, sb_queue, "--idle-timeout", "2s")
    try:
        drained = jobq_sb(sb_cs, sb_queue, "wait", "--drained", "--timeout", "60s", "--json")
        assert drained.returncode == 0 and json.loads(drained.stdout)["drained"] is True
    finally:
        worker.communicate(timeout=60)


def test_an_unreachable_ledger_makes_push_warn_but_still_push(sb_cs, sb_queue):
    port = free_port()  # nothing listens there
    dead = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={support_key()};TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    )
    pushed = jobq_sb(
        sb_cs,
        sb_queue,
        "--ledger",
        "devstoreaccount1",
        "push",
        "--tag",
        "x",
        "-c",
        "echo a",
        "-c",
        "echo b",
        JOBQ_LEDGER_CONNECTION_STRING=dead,
    )
    assert pushed.returncode == 0, pushed.stderr
    assert "ledger" in pushed.stderr and "unavailable" in pushed.stderr
    assert support_key() not in pushed.stderr
    assert run_counts(sb_cs, sb_queue)[0] == 2
    status = jobq_sb(
        sb_cs,
        sb_queue,
        "--ledger",
        "devstoreaccount1",
        "status",
        JOBQ_LEDGER_CONNECTION_STRING=dead,
        timeout=120,
    )
    assert status.returncode == 4 and "cannot reach" in status.stderr
    # a worker drains the queue all the same, warning about the ledger
    worker = start_worker(
        sb_cs,
        sb_queue,
        "--idle-timeout",
        "2s",
        JOBQ_LEDGER="devstoreaccount1",
        JOBQ_LEDGER_CONNECTION_STRING=dead,
    )
    _, stderr = worker.communicate(timeout=120)
    assert worker.returncode == 0, stderr
    assert "2 succeeded" in stderr and "ledger" in stderr
    assert run_counts(sb_cs, sb_queue) == (0, 0)
    assert support_key() not in stderr


def support_key() -> str:
    from azurite_fixtures import ACCOUNT_KEY

    return ACCOUNT_KEY


async def test_a_ledger_named_by_account_uses_default_azure_credential(
    aad, oauth_azurite, monkeypatch
):
    """``--ledger ACCOUNT/TABLE`` without JOBQ_LEDGER_CONNECTION_STRING: the Table is
    reached with DefaultAzureCredential (the token from the MOCKED Azure AD endpoint of
    aad_support; Azurite checks it), through JOBQ_STORAGE_TABLE_ENDPOINT/JOBQ_STORAGE_CA."""
    from aad_support import STORAGE_RESOURCE, assert_tokens_came_from

    from ai4s_jobq.ledger.events import AttemptEvent, PushEntry
    from ai4s_jobq.ledger.resolve import parse_ledger_spec
    from ai4s_jobq.ledger.table_store import TableLedger

    monkeypatch.delenv("JOBQ_LEDGER_CONNECTION_STRING", raising=False)
    account, table = parse_ledger_spec(f"devstoreaccount1/aad{uuid.uuid4().hex[:10]}")
    async with TableLedger.for_account(account, table, scope="sbqueue") as store:
        await store.record_pushes([PushEntry("t1", False)], tag="r")
        await store.record_attempts([AttemptEvent("t1", "succeeded", 1, 1.0, duration=0.5)])
        assert (await store.status("r")).counts == {"succeeded": 1}
    async with storage_aad.with_account_key(oauth_azurite) as (_, tables):
        entities = [e async for e in tables.get_table_client(table).list_entities()]
    assert {e["PartitionKey"] for e in entities} >= {"p~sbqueue", "t~sbqueue", "g~sbqueue~r"}
    assert_tokens_came_from(aad, STORAGE_RESOURCE)
