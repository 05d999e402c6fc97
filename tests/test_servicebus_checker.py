"""The startup checker and ``jobq check`` on Service Bus queues (emulator, real SDK)."""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import pytest
import servicebus_support as support
from servicebus_support import create_queue, jobq_sb, spec

from ai4s_jobq import JobQ

sb_process, sb_cs, sb_queue = support.sb_process, support.sb_cs, support.sb_queue

NO_DEDUP = "messages will NOT be deduplicated"
RANDOM_IDS = "random IDs: duplicate detection has no effect"
MISMATCH = "was configured: the queue's window applies"


def checker_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "ai4s_jobq.checker" and r.levelno == logging.WARNING
    ]


async def open_and_collect(caplog, queue, cs, **options) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="ai4s_jobq"):
        async with JobQ.open(spec(queue), connection_string=cs, **options):
            pass
    return checker_warnings(caplog)


async def test_consistent_queue_logs_no_warning(sb_cs, sb_queue, caplog):
    assert await open_and_collect(caplog, sb_queue, sb_cs) == []  # created with dedup
    assert await open_and_collect(caplog, sb_queue, sb_cs, dedup_window="7d") == []


async def test_queue_without_dedup_warns_once_with_fix(sb_cs, sb_queue, caplog):
    await create_queue(sb_cs, sb_queue, requires_duplicate_detection=False)
    warnings = await open_and_collect(caplog, sb_queue, sb_cs)
    assert len(warnings) == 1
    assert NO_DEDUP in warnings[0]
    assert "jobq migrate --to" in warnings[0]  # says how to fix it
    assert RANDOM_IDS not in warnings[0] and MISMATCH not in warnings[0]


async def test_queue_without_dedup_and_random_ids_is_consistent(
    sb_cs, sb_queue, caplog, monkeypatch
):
    await create_queue(sb_cs, sb_queue, requires_duplicate_detection=False)
    monkeypatch.setenv("JOBQ_DETERMINISTIC_IDS", "false")
    assert await open_and_collect(caplog, sb_queue, sb_cs) == []


async def test_window_mismatch_warns_only_when_a_window_is_configured(sb_cs, sb_queue, caplog):
    await create_queue(
        sb_cs,
        sb_queue,
        requires_duplicate_detection=True,
        duplicate_detection_history_time_window=timedelta(hours=1),
    )
    warnings = await open_and_collect(caplog, sb_queue, sb_cs, dedup_window="2h")
    assert len(warnings) == 1 and MISMATCH in warnings[0]
    assert "1h" in warnings[0] and "2h" in warnings[0]
    assert await open_and_collect(caplog, sb_queue, sb_cs, dedup_window="1h") == []
    assert await open_and_collect(caplog, sb_queue, sb_cs) == []  # nothing configured


async def test_window_from_env_counts_as_configured(sb_cs, sb_queue, caplog, monkeypatch):
    await create_queue(
        sb_cs,
        sb_queue,
        requires_duplicate_detection=True,
        duplicate_detection_history_time_window=timedelta(hours=1),
    )
    monkeypatch.setenv("JOBQ_DEDUP_WINDOW", "3h")
    warnings = await open_and_collect(caplog, sb_queue, sb_cs)
    assert len(warnings) == 1 and MISMATCH in warnings[0]


async def test_random_ids_on_dedup_queue_warns(sb_cs, sb_queue, caplog, monkeypatch):
    monkeypatch.setenv("JOBQ_DETERMINISTIC_IDS", "false")
    warnings = await open_and_collect(caplog, sb_queue, sb_cs)
    assert len(warnings) == 1 and RANDOM_IDS in warnings[0]
    assert "JOBQ_DETERMINISTIC_IDS" in warnings[0]
    monkeypatch.setenv("JOBQ_DETERMINISTIC_IDS", "true")
    assert await open_and_collect(caplog, sb_queue, sb_cs) == []


async def test_unreadable_settings_are_a_debug_note_not_a_crash(sb_cs, sb_queue, caplog):
    """A key the broker rejects stands in for missing Manage rights: the management
    calls fail with 401, and the producer still opens the queue."""
    await create_queue(sb_cs, sb_queue, requires_duplicate_detection=False)
    wrong = sb_cs.replace("SharedAccessKey=", "SharedAccessKey=AAAA")
    warnings = await open_and_collect(caplog, sb_queue, wrong)
    assert warnings == []
    notes = [r.getMessage() for r in caplog.records if r.name == "ai4s_jobq.checker"]
    assert any("could not read the duplicate-detection settings" in n for n in notes)
    assert all(
        r.levelno < logging.WARNING
        for r in caplog.records
        if r.name.startswith("ai4s_jobq.checker")
    )
    assert not any("AAAA" in r.getMessage() for r in caplog.records)


def test_jobq_check_strict_exit_codes(sb_cs, sb_queue):
    import asyncio

    ok = jobq_sb(sb_cs, sb_queue, "push", "-c", "echo hi")
    assert ok.returncode == 0, ok.stderr
    consistent = jobq_sb(sb_cs, sb_queue, "check", "--strict")
    assert consistent.returncode == 0, consistent.stdout + consistent.stderr
    assert consistent.stdout.startswith("OK")

    random_ids = jobq_sb(sb_cs, sb_queue, "check", "--strict", "--json", JOBQ_DETERMINISTIC_IDS="0")
    assert random_ids.returncode == 1
    report = json.loads(random_ids.stdout)
    assert report["consistent"] is False
    assert [f["code"] for f in report["findings"]] == ["random-ids"]

    mismatch = jobq_sb(sb_cs, sb_queue, "check", "--strict", "--dedup-window", "1d")
    assert mismatch.returncode == 1 and "7d" in mismatch.stdout

    plain = f"{sb_queue}-nodedup"
    asyncio.run(create_queue(sb_cs, plain, requires_duplicate_detection=False))
    without = jobq_sb(sb_cs, plain, "check", "--strict")
    assert without.returncode == 1
    assert NO_DEDUP in without.stdout and "jobq migrate" in without.stdout
    assert jobq_sb(sb_cs, plain, "check").returncode == 0  # report only without --strict
    assert "SharedAccessKey" not in without.stdout + without.stderr
