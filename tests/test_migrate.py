"""``jobq migrate``: a loss-free move into a dedup-enabled queue, including a run that
is SIGKILLed between pushing to the destination and completing in the source."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import timedelta

import pytest
import servicebus_support as support
from conftest import ROOT
from servicebus_support import create_queue, jobq_sb, run_counts, sb_env, spec

from ai4s_jobq import JobQ
from ai4s_jobq.migrate import MigrationError, migrate

sb_process, sb_cs, sb_queue = support.sb_process, support.sb_cs, support.sb_queue

# Pushes to the destination through the real backend, then SIGKILLs its own process
# right after the Nth push returns, before the source messages are completed.
CRASHING_MIGRATION = """
import asyncio, os, signal, sys
from ai4s_jobq.jobq import JobQ
from ai4s_jobq.migrate import migrate

source, destination, pushes_before_crash = sys.argv[1], sys.argv[2], int(sys.argv[3])

async def main():
    async with JobQ.open(source, check=False, create=False) as src, \\
            JobQ.open(destination, check=False) as dst:
        real_push, pushes = dst.backend.push, 0

        async def push_then_crash(messages):
            nonlocal pushes
            outcomes = await real_push(messages)
            pushes += 1
            if pushes >= pushes_before_crash:
                os.kill(os.getpid(), signal.SIGKILL)
            return outcomes

        dst.backend.push = push_then_crash
        await migrate(src.backend, dst.backend, batch_size=10)

asyncio.run(main())
"""


async def fill_plain_queue(cs: str, name: str, count: int) -> set[str]:
    """A queue made without duplicate detection (as many existing queues are)."""
    await create_queue(
        cs, name, requires_duplicate_detection=False, lock_duration=timedelta(seconds=3)
    )
    async with JobQ.open(spec(name), connection_string=cs, check=False, create=False) as q:
        summary = await q.push_many({"n": n} for n in range(count))
        assert not summary.failures
        ids = {t.task.id for t in await q.peek(count + 10)}
    assert len(ids) == count
    return ids


async def destination_ids(cs: str, name: str) -> list[str]:
    async with JobQ.open(spec(name), connection_string=cs, check=False, create=False) as q:
        return [t.message_id for t in await q.peek(1000)]


def test_interrupted_migration_rerun_moves_every_message_exactly_once(sb_cs, sb_queue):
    source, destination = f"{sb_queue}-old", f"{sb_queue}-new"
    ids = asyncio.run(fill_plain_queue(sb_cs, source, 50))

    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_MIGRATION, spec(source), spec(destination), "2"],
        env=sb_env(sb_cs, source),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert crashed.returncode == -9, crashed.stderr
    # Two batches reached the destination; only the first was completed in the source:
    # ten messages are now in both queues (the second batch, still locked in the source).
    assert run_counts(sb_cs, destination) == (20, 0)
    assert run_counts(sb_cs, source) == (40, 0)

    rerun = jobq_sb(sb_cs, source, "migrate", "--to", spec(destination), "--wait", "6", "--json")
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["moved"] == 40 and report["failed"] == []

    moved = asyncio.run(destination_ids(sb_cs, destination))
    assert len(moved) == 50 and set(moved) == ids  # every message, once
    assert run_counts(sb_cs, source) == (0, 0)
    assert run_counts(sb_cs, destination) == (50, 0)


def test_migrate_dead_letters_into_the_destination(sb_cs, sb_queue):
    source, destination = f"{sb_queue}-src", f"{sb_queue}-dst"

    async def dead_letter_three() -> None:
        async with JobQ.open(spec(source), connection_string=sb_cs) as q:
            await q.push_many([{"n": n} for n in range(5)])
            got = []
            while len(got) < 3:
                got += await q.backend.receive(3 - len(got), 2.0)
            for message in got:
                await q.backend.dead_letter(message, "Failed", "three attempts")

    asyncio.run(dead_letter_three())
    result = jobq_sb(
        sb_cs, source, "migrate", "--to", spec(destination), "--dead-letter", "--wait", "1"
    )
    assert result.returncode == 0, result.stderr
    assert "moved 3 message(s)" in result.stdout
    assert run_counts(sb_cs, source) == (2, 0)
    assert run_counts(sb_cs, destination) == (3, 0)


async def test_migrate_refuses_a_destination_without_dedup_and_the_same_queue(sb_cs, sb_queue):
    source, plain = f"{sb_queue}-a", f"{sb_queue}-plain"
    await fill_plain_queue(sb_cs, source, 3)
    await create_queue(sb_cs, plain, requires_duplicate_detection=False)
    async with (
        JobQ.open(spec(source), connection_string=sb_cs, check=False) as src,
        JobQ.open(spec(plain), connection_string=sb_cs, check=False) as dst,
    ):
        with pytest.raises(MigrationError, match="has no duplicate detection"):
            await migrate(src.backend, dst.backend, idle_timeout=0.5)
        with pytest.raises(MigrationError, match="same queue"):
            await migrate(src.backend, src.backend, idle_timeout=0.5)
        assert (await src.counts()).active == 3  # nothing moved
        report = await migrate(src.backend, dst.backend, idle_timeout=0.5, require_dedup=False)
        assert report.moved == 3
        assert (await dst.counts()).active == 3


def test_cli_migrate_refusal_is_a_clear_error(sb_cs, sb_queue):
    source, plain = f"{sb_queue}-a", f"{sb_queue}-plain"
    asyncio.run(create_queue(sb_cs, plain, requires_duplicate_detection=False))
    refused = jobq_sb(sb_cs, source, "migrate", "--to", spec(plain), "--wait", "1")
    assert refused.returncode == 4
    assert "has no duplicate detection" in refused.stderr and "--allow-no-dedup" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_migrate_between_local_queues(local_dir, jobq):
    assert (
        jobq(
            "--queue", "local://old", "push", "-c", "echo a", "-c", "echo b", check=True
        ).returncode
        == 0
    )
    result = jobq(
        "--queue", "local://old", "migrate", "--to", "local://new", "--wait", "0.5", check=True
    )
    assert "moved 2 message(s)" in result.stdout
    size = json.loads(jobq("--queue", "local://new", "size", "--json", check=True).stdout)
    assert size["active"] == 2
    assert json.loads(jobq("--queue", "local://old", "size", "--json").stdout)["active"] == 0
