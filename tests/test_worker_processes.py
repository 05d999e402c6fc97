"""Workers as real processes: sharing a queue, SIGKILL, SIGTERM grace."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import ROOT, wait_for, worker_env

import ai4s_jobq
from ai4s_jobq import JobQ
from ai4s_jobq.task import Task
from ai4s_jobq.worker.attempts import RunCounters


def start_worker(local_dir: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ai4s_jobq_cli", "--queue", "local://q", "worker", *args],
        env={**os.environ, **worker_env(local_dir)},
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def counts(local_dir):
    async def main():
        async with JobQ.open("local://q", check=False) as q:
            return await q.counts()

    return asyncio.run(main())


def create_queue(lock_seconds: float) -> None:
    async def main():
        async with JobQ.open("local://q", lock_duration=timedelta(seconds=lock_seconds)):
            pass

    asyncio.run(main())


def test_two_worker_processes_never_run_a_task_twice(local_dir, tmp_path):
    log = tmp_path / "log"
    create_queue(1.0)
    tasks = [
        {"log": str(log), "name": f"t{i}", "seconds": 2.0 if i % 10 == 0 else 0.05}
        for i in range(40)
    ]
    ai4s_jobq.push_many(tasks, queue="local://q")
    workers = [
        start_worker(local_dir, "-n", "3", "--proc", "sample_tasks:record", "--idle-timeout", "1")
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    lines = log.read_text().split("\n")
    starts = Counter(line.split()[1] for line in lines if line.startswith("start"))
    ends = Counter(line.split()[1] for line in lines if line.startswith("end"))
    assert starts == ends == Counter({f"t{i}": 1 for i in range(40)})
    pids = {line.split()[2] for line in lines if line.startswith("start")}
    assert len(pids) == 2  # both processes did work
    assert (counts(local_dir)).active == 0


def test_sigkilled_worker_task_runs_again_after_lock_expiry(local_dir, tmp_path):
    marker, log = tmp_path / "marker", tmp_path / "log"
    create_queue(2.0)
    ai4s_jobq.push({"marker": str(marker), "log": str(log)}, queue="local://q")
    first = start_worker(local_dir, "--proc", "sample_tasks:hang_first_time", "--idle-timeout", "0")
    wait_for(marker.exists, what="the first attempt to start")
    first.kill()
    first.wait(timeout=10)
    killed_at = time.monotonic()
    second = start_worker(
        local_dir, "--proc", "sample_tasks:hang_first_time", "--idle-timeout", "4"
    )
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert log.read_text().count("attempt") == 2
    # A killed worker is an interruption, not a failed attempt (see worker/attempts.py).
    assert "counted as interruptions" in err
    assert "attempt 1 of 3 (1 interruptions)" in err and "succeeded" in err
    assert time.monotonic() - killed_at >= 1.5  # not before the lock expired
    c = counts(local_dir)
    assert (c.active, c.dead_letter) == (0, 0)


def test_sigterm_lets_a_short_task_finish(local_dir, tmp_path):
    log = tmp_path / "log"
    ai4s_jobq.push({"log": str(log), "name": "short", "seconds": 1.0}, queue="local://q")
    worker = start_worker(
        local_dir, "--proc", "sample_tasks:record", "--idle-timeout", "0", "--grace-period", "20"
    )
    wait_for(lambda: log.exists() and "start short" in log.read_text(), what="task start")
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 143, err
    assert "end short" in log.read_text()
    assert (counts(local_dir)).active == 0


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_after_grace_kills_the_group_and_abandons(local_dir, tmp_path, sig, code):
    pidfile = tmp_path / "pid"
    create_queue(300.0)  # a long lock: the message must come back by abandon, not expiry
    ai4s_jobq.push(f"sleep 120 & echo $! > {pidfile}; wait", queue="local://q")
    worker = start_worker(local_dir, "--idle-timeout", "0", "--grace-period", "0.5")
    child = int(
        wait_for(
            lambda: pidfile.exists() and pidfile.read_text().strip(), what="the shell task to start"
        )
    )
    started = time.monotonic()
    worker.send_signal(sig)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == code, err
    assert time.monotonic() - started < 15
    assert not _alive(child), "the task's process group must be killed"

    async def receive_now():
        async with JobQ.open("local://q", check=False) as q:
            return await q.backend.receive(1, 0)

    (again,) = asyncio.run(receive_now())  # available at once: no lock expiry needed
    counters = RunCounters.of(Task.from_body(again.body))
    assert (counters.attempt, counters.interruptions) == (1, 1)  # no retry used


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
