"""The dashboard's sources on the Azure backends, for real: a Storage Queue on Azurite
with its ledger table in the same account, and a Service Bus queue on our emulator
(through the official SDK) without a ledger, where the views show what counts alone
can.  Opened the way the commands open them (:func:`open_sources`)."""

from __future__ import annotations

import aiohttp
import pytest
import servicebus_support as support
from dashboard_support import FAILURE_TEXT

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.dashboard.server import Dashboard
from ai4s_jobq.dashboard.snapshot import collect
from ai4s_jobq.dashboard.sources import open_sources
from ai4s_jobq.ledger.recorder import ledger_hooks
from ai4s_jobq.worker.processors import ShellProcessor

sb_process, sb_cs, sb_queue = support.sb_process, support.sb_cs, support.sb_queue

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("JOBQ_QUEUE", "JOBQ_CONNECTION_STRING", "JOBQ_LEDGER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("JOBQ_LEDGER_CONNECTION_STRING", raising=False)


async def page_text(sources) -> str:  # type: ignore[no-untyped-def]
    board = Dashboard(sources)
    port = await board.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/") as page:
                assert page.status == 200
                return await page.text()
    finally:
        await board.stop()


async def test_storage_queue_with_its_ledger(azurite, storage_queue_name):
    spec = f"devstoreaccount1/{storage_queue_name}"
    cs = azurite.connection_string
    async with JobQ.open(spec, connection_string=cs) as q:
        await q.push_many(["true", "echo two"], tag="nightly")
        await q.push(f"echo '{FAILURE_TEXT}' >&2; exit 3", num_retries=0, tag="nightly")
        policy = WorkerPolicy(slots=2, idle_timeout=1.0)
        await Worker(q.backend, ShellProcessor(), policy, hooks=ledger_hooks(q)).run()
        await q.push("echo later", tag="nightly")
    async with open_sources([spec], cs) as (source,):
        assert source.ledger is not None and source.ledger_note is None
        snap = await collect(source)
        assert (snap.active, snap.dead_letter) == (1, 1)
        assert snap.status is not None, snap.ledger_error
        assert snap.status.counts == {"succeeded": 2, "dead_lettered": 1, "queued": 1}
        assert [t.tag for t in snap.tag_outcomes] == ["nightly"]
        (failure,) = snap.failures
        assert failure.reason == "NonZeroExit" and FAILURE_TEXT in (failure.example_summary or "")
        assert [w.state for w in snap.workers] == ["stopped"]
        assert snap.dead_letters[0].reason == "NonZeroExit"
        html = await page_text([source])
    assert FAILURE_TEXT in html and "nightly" in html


async def test_service_bus_without_a_ledger_shows_counts(sb_cs, sb_queue):
    spec = support.spec(sb_queue)
    async with JobQ.open(spec, connection_string=sb_cs) as q:
        await q.push_many([f"echo {i}" for i in range(3)])
    async with open_sources([spec], sb_cs) as (source,):
        assert source.ledger is None and "--ledger" in (source.ledger_note or "")
        first = await collect(source)
        assert (first.active, first.dead_letter) == (3, 0)
        assert first.status is None and not first.has_ledger
        assert "--ledger" in (first.ledger_error or "")
        (message,) = await source.queue.backend.receive(1, 5.0)
        await source.queue.backend.complete(message)
        second = await collect(source)
        assert second.active == 2 and second.rate_source == "queue depth"
        html = await page_text([source])
    assert "This queue has no ledger" in html and 'id="card-succeeded"' not in html
