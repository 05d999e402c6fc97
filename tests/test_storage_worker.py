"""Workers and the jobq CLI on Storage Queue (real Azurite, public API and CLI):
outcomes and the -failed queue, malformed messages, heartbeats, a SIGKILLed worker,
`jobq dlq`, `jobq check` and duplicate pushes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import sample_tasks
import worker_scenarios
from azure.storage.queue.aio import QueueClient
from conftest import ROOT, jobq_cli, wait_for, worker_env

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.backends.base import OutgoingMessage
from ai4s_jobq.worker.processors import CallableProcessor
from ai4s_jobq.worker.retry import RetryDelay


@pytest.fixture
def spec(storage_queue_name: str) -> str:
    return f"devstoreaccount1/{storage_queue_name}"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "JOBQ_QUEUE",
        "JOBQ_DEDUP_WINDOW",
        "JOBQ_DETERMINISTIC_IDS",
        "JOBQ_CONNECTION_STRING",
    ):
        monkeypatch.delenv(name, raising=False)


def policy(**kwargs) -> WorkerPolicy:
    return WorkerPolicy(**{"idle_timeout": 1.0, "retry_delay": RetryDelay.immediate(), **kwargs})


def cli(azurite, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return jobq_cli(*args, env={"JOBQ_CONNECTION_STRING": azurite.connection_string}, **kwargs)


async def test_success_retry_and_dead_letter_to_failed_queue(azurite, spec, storage_queue_name):
    async with JobQ.open(spec, connection_string=azurite.connection_string) as q:
        await worker_scenarios.success_retry_then_dead_letter(q, policy(slots=2))
    async with QueueClient.from_connection_string(
        azurite.connection_string, f"{storage_queue_name}-failed"
    ) as raw:
        assert (await raw.get_queue_properties()).approximate_message_count == 1


async def test_malformed_message_dead_lettered_and_worker_continues(
    azurite, spec, storage_queue_name, tmp_path
):
    log = tmp_path / "log"
    async with JobQ.open(spec, connection_string=azurite.connection_string) as q:
        async with QueueClient.from_connection_string(
            azurite.connection_string, storage_queue_name
        ) as raw:
            await raw.send_message("definitely not a task")
        await q.backend.push([OutgoingMessage("junk-2", b'{"id": "x"}')])
        await q.push({"log": str(log), "name": "after"})
        stats = await Worker(q.backend, CallableProcessor(sample_tasks.record), policy()).run()
        assert (stats.malformed, stats.succeeded) == (2, 1)
        assert "end after" in log.read_text()
        dead = await q.dlq_list()
        assert sorted(d.reason or "" for d in dead) == ["MalformedTask", "MalformedTask"]
        by_raw = {d.raw: d for d in dead}
        assert "JSON" in (by_raw[b"definitely not a task"].description or "")
        assert "'args'" in (by_raw[b'{"id": "x"}'].description or "")
        counts = await q.counts()
        assert (counts.active, counts.dead_letter) == (0, 2)


async def test_heartbeat_keeps_a_long_task_invisible_to_other_workers(azurite, spec, tmp_path):
    """Lock (visibility timeout) 3 s, task 7 s, two workers: it runs exactly once.
    (It was 2 s and 5 s; once, in a full run on 2 busy cores, no renewal landed within
    the 2 s and the other worker took the message: the margin is now 2 s.)"""
    log = tmp_path / "log"
    opened = [
        JobQ.open(
            spec, connection_string=azurite.connection_string, lock_duration=timedelta(seconds=3)
        )
        for _ in range(2)
    ]
    async with opened[0] as first, opened[1] as second:
        await first.push({"log": str(log), "name": "long", "seconds": 7.0})
        workers = [
            Worker(q.backend, CallableProcessor(sample_tasks.record), policy(idle_timeout=9.0))
            for q in (first, second)
        ]
        stats = await asyncio.gather(*(w.run() for w in workers))
        assert sum(s.succeeded for s in stats) == 1
        assert log.read_text().count("start long") == 1
        assert (await first.counts()).active == 0


def test_sigkilled_worker_task_reappears_after_visibility_timeout(
    azurite, spec, tmp_path, local_dir
):
    marker, log = tmp_path / "marker", tmp_path / "log"

    async def setup() -> None:
        async with JobQ.open(
            spec, connection_string=azurite.connection_string, lock_duration=timedelta(seconds=2)
        ) as q:
            await q.push({"marker": str(marker), "log": str(log)})

    asyncio.run(setup())
    env = {
        **os.environ,
        **worker_env(local_dir),
        "JOBQ_CONNECTION_STRING": azurite.connection_string,
    }

    def start(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ai4s_jobq_cli",
                "--queue",
                spec,
                "worker",
                "--proc",
                "sample_tasks:hang_first_time",
                *args,
            ],
            env=env,
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    first = start("--idle-timeout", "0")
    try:
        wait_for(marker.exists, what="the first attempt to start")
    finally:
        first.kill()
        first.wait(timeout=10)
    killed_at = time.monotonic()
    second = start("--idle-timeout", "4")
    _, err = second.communicate(timeout=90)
    assert second.returncode == 0, err
    assert log.read_text().count("attempt") == 2
    # A killed worker is an interruption, not a failed attempt (see worker/attempts.py).
    assert "counted as interruptions" in err
    assert "attempt 1 of 3 (1 interruptions)" in err and "succeeded" in err
    assert time.monotonic() - killed_at >= 1.0  # not before the visibility timeout ran out
    result = cli(azurite, "--queue", spec, "size", "--json", check=True)
    sizes = json.loads(result.stdout)
    assert (sizes["active"], sizes["dead_letter"]) == (0, 0)


def test_cli_push_worker_dlq_round_trip(azurite, spec):
    pushed = cli(
        azurite,
        "--queue",
        spec,
        "push",
        "-c",
        "echo ok",
        "-c",
        "exit 4",
        "--num-retries",
        "0",
        check=True,
    )
    assert "pushed 2 new" in pushed.stdout + pushed.stderr
    again = cli(azurite, "--queue", spec, "push", "-c", "echo ok", check=True)
    assert "dropped 1 duplicate" in again.stdout + again.stderr
    cli(azurite, "--queue", spec, "worker", "--idle-timeout", "1s", check=True)
    listed = json.loads(cli(azurite, "--queue", spec, "dlq", "list", "--json", check=True).stdout)
    entries = listed if isinstance(listed, list) else listed.get("tasks", listed)
    assert len(entries) == 1
    assert entries[0]["reason"] == "NonZeroExit" and "exit code 4" in entries[0]["description"]
    cli(azurite, "--queue", spec, "dlq", "requeue", "--all", check=True)
    sizes = json.loads(cli(azurite, "--queue", spec, "size", "--json", check=True).stdout)
    assert (sizes["active"], sizes["dead_letter"]) == (1, 0)
    cli(azurite, "--queue", spec, "worker", "--idle-timeout", "1s", check=True)
    cli(azurite, "--queue", spec, "dlq", "purge", "--yes", check=True)
    sizes = json.loads(cli(azurite, "--queue", spec, "size", "--json", check=True).stdout)
    assert (sizes["active"], sizes["dead_letter"]) == (0, 0)


def test_check_reports_the_ledger_and_warns_on_a_queue_without_dedup(
    azurite, spec, storage_queue_name
):
    cli(azurite, "--queue", spec, "push", "-c", "true", "--dedup-window", "12h", check=True)
    ok = cli(azurite, "--queue", spec, "check", check=True)
    assert "application ledger" in ok.stdout and "12h" in ok.stdout, ok.stdout

    foreign = f"{storage_queue_name}x"

    async def create_foreign() -> None:
        async with QueueClient.from_connection_string(azurite.connection_string, foreign) as raw:
            await raw.create_queue()

    asyncio.run(create_foreign())
    warned = cli(azurite, "--queue", f"devstoreaccount1/{foreign}", "check", "--strict")
    assert warned.returncode == 1, warned.stdout + warned.stderr
    assert "no duplicate detection" in warned.stdout
    assert "--dedup-window" in warned.stdout


async def test_preempt_notice_mid_task(azurite, spec, tmp_path):
    """Fake IMDS on 127.0.0.1 (the only fake: IMDS exists only inside an Azure VM)."""
    from imds_fake import FakeIMDS

    with FakeIMDS() as imds:
        async with JobQ.open(spec, connection_string=azurite.connection_string) as q:
            await worker_scenarios.preempted_mid_task(q, imds, tmp_path)


async def test_delayed_retry_rewrites_the_message_in_place(azurite, spec):
    """On Storage Queue a retry is the same message, its text (with the run counters)
    and visibility timeout replaced in one call; the worker's idle timeout waits for
    the retries it delayed itself (Storage cannot count them)."""
    from ai4s_jobq.worker.attempts import RunCounters
    from ai4s_jobq.worker.processors import ShellProcessor

    async with JobQ.open(spec, connection_string=azurite.connection_string) as q:
        await q.push("exit 2", num_retries=2)
        stats = await Worker(
            q.backend,
            ShellProcessor(),
            policy(idle_timeout=0.5, retry_delay=RetryDelay.fixed(1.5)),
        ).run()
        assert (stats.failed, stats.dead_lettered, stats.rescheduled) == (3, 1, 2)
        (dead,) = await q.dlq_list()
        assert dead.reason == "NonZeroExit"
        assert dead.delivery_count == 3  # the same message, dequeued three times
        assert RunCounters.of(dead.task).attempt == 3


def test_wrong_key_worker_exits_4_in_seconds(azurite, spec):
    wrong = azurite.connection_string_with_key("d3Jvbmcgd3Jvbmcgd3Jvbmcgd3Jvbmc=")
    started = time.monotonic()
    result = jobq_cli(
        "--queue",
        spec,
        "worker",
        "--idle-timeout",
        "120",
        env={"JOBQ_CONNECTION_STRING": wrong},
        timeout=60,
    )
    assert result.returncode == 4, result.stderr
    assert time.monotonic() - started < 15
    assert "refused" in result.stderr
    assert "d3Jvbmcgd3Jvbmcgd3Jvbmcgd3Jvbmc" not in result.stderr
