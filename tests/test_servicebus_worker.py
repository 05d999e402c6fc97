"""Workers on Service Bus (emulator, real SDK): outcomes, lock renewal, SIGKILLed
workers, a broker restart mid-drain, and concurrent producers."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time

import sample_tasks
import servicebus_support as support
import worker_scenarios
from conftest import ROOT, wait_for
from servicebus_support import run_counts, sb_env, short_lock_queue, spec, start_worker

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.emulator.process import EmulatorProcess
from ai4s_jobq.worker.processors import CallableProcessor
from ai4s_jobq.worker.retry import RetryDelay

sb_process, sb_cs, sb_queue = support.sb_process, support.sb_cs, support.sb_queue


def policy(**kwargs) -> WorkerPolicy:
    return WorkerPolicy(**{"idle_timeout": 1.0, "retry_delay": RetryDelay.immediate(), **kwargs})


async def test_success_retry_and_dead_letter_with_reason(sb_cs, sb_queue):
    async with JobQ.open(spec(sb_queue), connection_string=sb_cs) as q:
        await worker_scenarios.success_retry_then_dead_letter(q, policy(slots=2))


async def test_malformed_message_dead_lettered_and_worker_continues(sb_cs, sb_queue, tmp_path):
    log = tmp_path / "log"
    async with JobQ.open(spec(sb_queue), connection_string=sb_cs) as q:
        await worker_scenarios.malformed_messages_dead_lettered(q, policy(), log)


async def test_lock_renewal_keeps_a_task_longer_than_the_lock(sb_cs, sb_queue, tmp_path, caplog):
    await asyncio.to_thread(short_lock_queue, sb_cs, sb_queue, 2)
    log = tmp_path / "log"
    async with JobQ.open(spec(sb_queue), connection_string=sb_cs) as q:
        await q.push({"log": str(log), "name": "long", "seconds": 6.0})
        with caplog.at_level(logging.INFO, logger="ai4s_jobq.worker"):
            stats = await Worker(
                q.backend, CallableProcessor(sample_tasks.async_record), policy(idle_timeout=1.0)
            ).run()
        assert (stats.succeeded, stats.failed, stats.lost_locks) == (1, 0, 0)
        lines = log.read_text().splitlines()
        assert [line.split()[0] for line in lines] == ["start", "end"]
        assert float(lines[1].split()[3]) - float(lines[0].split()[3]) >= 6.0  # 3 locks
        assert any("attempt 1 of 3" in r.getMessage() for r in caplog.records)
        assert not any("attempt 2" in r.getMessage() for r in caplog.records)
        counts = await q.counts()
        assert (counts.active, counts.dead_letter) == (0, 0)


def test_sigkilled_worker_task_is_redelivered_and_completed(sb_cs, sb_queue, tmp_path):
    marker, log = tmp_path / "marker", tmp_path / "log"
    short_lock_queue(sb_cs, sb_queue, 3)
    push = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ai4s_jobq, sys; "
            f"ai4s_jobq.push({{'marker': {str(marker)!r}, 'log': {str(log)!r}}})",
        ],
        env=sb_env(sb_cs, sb_queue),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert push.returncode == 0, push.stderr
    first = start_worker(
        sb_cs, sb_queue, "--proc", "sample_tasks:hang_first_time", "--idle-timeout", "0"
    )
    try:
        wait_for(marker.exists, timeout=60, what="the first attempt to start")
    finally:
        first.kill()
        first.communicate(timeout=10)
    killed_at = time.monotonic()
    second = start_worker(
        sb_cs, sb_queue, "--proc", "sample_tasks:hang_first_time", "--idle-timeout", "3"
    )
    _, err = second.communicate(timeout=90)
    assert second.returncode == 0, err
    assert log.read_text().count("attempt") == 2
    # A killed worker is an interruption, not a failed attempt (see worker/attempts.py).
    assert "counted as interruptions" in err
    assert "attempt 1 of 3 (1 interruptions)" in err and "succeeded" in err
    assert time.monotonic() - killed_at >= 2.0  # it came back by lock expiry
    assert run_counts(sb_cs, sb_queue) == (0, 0)


def test_broker_restart_mid_drain_loses_nothing(tmp_path):
    """SIGKILL the emulator while a worker drains, start it again on the same port:
    the worker reconnects and every task completes."""
    log = tmp_path / "log"
    names = [f"t{i}" for i in range(40)]
    with EmulatorProcess(tmp_path / "emulator") as emulator:
        cs, queue = emulator.connection_string, "restart"
        short_lock_queue(cs, queue, 3)

        async def push() -> None:
            async with JobQ.open(spec(queue), connection_string=cs) as q:
                summary = await q.push_many(
                    {"log": str(log), "name": n, "seconds": 0.15} for n in names
                )
                assert not summary.failures

        asyncio.run(push())
        worker = start_worker(
            cs, queue, "--proc", "sample_tasks:record", "-n", "2", "--idle-timeout", "5"
        )
        try:
            wait_for(
                lambda: log.exists() and log.read_text().count("end ") >= 8,
                timeout=60,
                what="the worker to finish some tasks",
            )
            emulator.kill()
            done_before = log.read_text().count("end ")
            emulator.start()
            restarted_at = time.time()
            _, err = worker.communicate(timeout=120)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
        assert worker.returncode == 0, err
        done = {line.split()[1] for line in log.read_text().splitlines() if line.startswith("end ")}
        assert done == set(names), f"missing: {set(names) - done}\n{err[-3000:]}"
        # The worker carried on through the outage: tasks finished after the restart.
        assert done_before < len(names)
        assert any(
            float(line.split()[3]) > restarted_at
            for line in log.read_text().splitlines()
            if line.startswith("end ")
        )
        assert run_counts(cs, queue) == (0, 0)


def test_sixteen_concurrent_producers_push_the_same_tasks_once(sb_cs, sb_queue, tmp_path):
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("".join(f"echo task {i}\n" for i in range(500)))
    env = sb_env(sb_cs, sb_queue)
    # Create the queue first so that all producers race on pushing, not on creating.
    first = subprocess.run(
        [sys.executable, "-m", "ai4s_jobq_cli", "push", "-c", "echo task 0"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.returncode == 0, first.stderr
    producers = [
        subprocess.Popen(
            [sys.executable, "-m", "ai4s_jobq_cli", "push", str(tasks)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(16)
    ]
    for producer in producers:
        _, err = producer.communicate(timeout=150)
        assert producer.returncode == 0, err

    async def inspect():
        async with JobQ.open(spec(sb_queue), connection_string=sb_cs, check=False) as q:
            return (await q.counts()).active, await q.peek(1000)

    active, peeked = asyncio.run(inspect())
    assert active == 500
    assert sorted(int(t.task.args["cmd"].split()[-1]) for t in peeked) == list(range(500))


async def test_preempt_notice_mid_task(sb_cs, sb_queue, tmp_path):
    """Fake IMDS on 127.0.0.1 (the only fake: IMDS exists only inside an Azure VM)."""
    from imds_fake import FakeIMDS

    with FakeIMDS() as imds:
        async with JobQ.open(spec(sb_queue), connection_string=sb_cs) as q:
            await worker_scenarios.preempted_mid_task(q, imds, tmp_path)


def test_kill_mid_reschedule_neither_loses_nor_doubles(sb_cs, sb_queue, tmp_path):
    """Service Bus's delivery count and duplicate detection at work: the copy's
    MessageId is deterministic, so the original's redelivery cannot add a second one."""
    log, marker = tmp_path / "log", tmp_path / "marker"
    short_lock_queue(sb_cs, sb_queue, 3)

    async def push() -> None:
        async with JobQ.open(spec(sb_queue), connection_string=sb_cs) as q:
            await q.push({"log": str(log), "marker": str(marker)})

    asyncio.run(push())
    env = sb_env(sb_cs, sb_queue)
    worker_scenarios.crash_mid_reschedule(spec(sb_queue), env, log, marker)


async def test_scheduled_retries_keep_an_idle_worker_waiting(sb_cs, sb_queue):
    """A failing task is retried after its back-off as a scheduled message; the worker's
    idle timeout (shorter than the delay) waits for it because the broker counts it."""
    from ai4s_jobq.worker.processors import ShellProcessor

    async with JobQ.open(spec(sb_queue), connection_string=sb_cs) as q:
        await q.push("exit 2", num_retries=1)
        stats = await Worker(
            q.backend,
            ShellProcessor(),
            policy(idle_timeout=0.5, retry_delay=RetryDelay.fixed(2)),
        ).run()
        assert (stats.failed, stats.dead_lettered, stats.rescheduled) == (2, 1, 1)
        (dead,) = await q.dlq_list()
        assert dead.reason == "NonZeroExit"


def test_wrong_key_worker_exits_4_in_seconds(sb_cs, sb_queue):
    import re

    from servicebus_support import jobq_sb

    wrong = re.sub(r"SharedAccessKey=[^;]+", "SharedAccessKey=d3JvbmcKd3JvbmcK", sb_cs)
    started = time.monotonic()
    result = jobq_sb(wrong, sb_queue, "worker", "--idle-timeout", "120", timeout=60)
    assert result.returncode == 4, result.stderr
    assert time.monotonic() - started < 15
    assert "refused" in result.stderr or "Unauthorized" in result.stderr
    assert "d3JvbmcKd3JvbmcK" not in result.stderr
