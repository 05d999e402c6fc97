"""``--isolation process``: crashes fail one task, cancellation stops the pool process,
the pool replaces it (real forkserver processes, real local queue)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from conftest import wait_for

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.task import make_task
from ai4s_jobq.worker.isolation import ProcessPool
from ai4s_jobq.worker.processors import TaskFailed, started


async def test_crashing_tasks_fail_alone_and_the_pool_replaces_the_process(local_dir):
    async with JobQ.open("local://crash") as q:
        await q.push({"code": 1}, num_retries=0)  # os._exit(1)
        await q.push_many([{"i": i} for i in range(20)])
        pool = ProcessPool("proc_tasks:exit_hard", 2)
        # One pool, several functions: route by argument names through a tiny shim.
        segv = ProcessPool("proc_tasks:segfault", 1)
        async with started(pool), started(segv):

            async def processor(task):
                if "i" in task.args:
                    return None
                return await pool(task)

            stats = await Worker(
                q.backend, processor, WorkerPolicy(slots=2, idle_timeout=0.3)
            ).run()
            (dead,) = await q.dlq_list()
            assert stats.succeeded == 20 and stats.dead_lettered == 1
            assert dead.reason == "ProcessDied"
            assert (dead.description or "").startswith(
                "ProcessDied: pool process died: exit code 1"
            )
            # The pool still serves: the dead process was replaced.
            with pytest.raises(TaskFailed) as info:
                await segv(make_task({}))
            assert "killed by signal SIGSEGV" in info.value.summary
            with pytest.raises(TaskFailed):
                await segv(make_task({"x": 1}))  # the replacement runs (and crashes) too
        assert segv.started_processes >= 2


async def test_a_crash_among_many_tasks_fails_only_that_task(local_dir):
    pool = ProcessPool("proc_tasks:whoami", 2)
    crash = ProcessPool("proc_tasks:exit_hard", 2)
    async with started(pool), started(crash):
        results = await asyncio.gather(
            *(pool(make_task({"i": i})) for i in range(50)),
            crash(make_task({"code": 3})),
            return_exceptions=True,
        )
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 1 and "exit code 3" in str(failures[0])
    assert len({r["pid"] for r in results[:50]}) <= 2  # type: ignore[index]


async def test_cancelling_a_task_kills_its_process_and_the_slot_serves_again(tmp_path):
    marker = tmp_path / "marker"
    pool = ProcessPool("proc_tasks:sleep_sync", 1, kill_grace=1.0)
    async with started(pool):
        work = asyncio.ensure_future(pool(make_task({"seconds": 60, "marker": str(marker)})))
        await asyncio.to_thread(wait_for, marker.exists, 30, 0.02, "the task to start")
        pid = int(marker.read_text())
        work.cancel()
        with pytest.raises(asyncio.CancelledError):
            await work
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        await pool(make_task({"seconds": 0}))  # a fresh process took the slot
        assert pool.started_processes == 2


async def test_task_can_catch_sigterm_to_checkpoint_before_it_is_killed(tmp_path):
    """SIGTERM first: a sync task's own handler runs (it is on the process's main thread)."""
    checkpoint = tmp_path / "checkpoint"
    marker = tmp_path / "marker"
    pool = ProcessPool("proc_tasks:checkpoint_on_sigterm", 1, kill_grace=5.0)
    async with started(pool):
        work = asyncio.ensure_future(
            pool(make_task({"checkpoint": str(checkpoint), "marker": str(marker)}))
        )
        await asyncio.to_thread(wait_for, marker.exists, 30, 0.02, "the task to start")
        work.cancel()
        with pytest.raises(asyncio.CancelledError):
            await work
    assert checkpoint.read_text() == "saved"


async def test_errors_carry_type_message_and_original_exception():
    pool = ProcessPool("proc_tasks:fail_value", 1)
    async with started(pool):
        with pytest.raises(TaskFailed) as info:
            await pool(make_task({"text": "no such file: x.h5"}))
    failure = info.value
    assert failure.reason == "ValueError"
    assert failure.summary == "ValueError: no such file: x.h5"
    assert isinstance(failure.__cause__, ValueError)
    assert "isolation.py" not in failure.description  # the traceback starts at the task


async def test_tasks_see_their_context_and_environment():
    pool = ProcessPool("proc_tasks:whoami", 1)
    async with started(pool):
        task = make_task({"i": 1})
        seen = await pool(task)
    assert seen["task_id"] == task.id and seen["pid"] != os.getpid()


def test_worker_sigint_does_not_reach_pool_processes(local_dir, tmp_path):
    """Pool processes run in their own session: Ctrl-C in the terminal (SIGINT to the
    foreground process group) reaches the worker, which decides what tasks get."""
    import subprocess
    import sys

    from conftest import ROOT, worker_env

    marker = tmp_path / "marker"
    import ai4s_jobq

    ai4s_jobq.push_many([{"seconds": 60, "marker": str(marker)}], queue="local://q")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ai4s_jobq_cli",
            "--queue",
            "local://q",
            "worker",
            "--proc",
            "proc_tasks:sleep_sync",
            "--isolation",
            "process",
            "--grace-period",
            "1",
        ],
        env={**os.environ, **worker_env(local_dir)},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(marker.exists, 60, what="the task to start")
        child = int(marker.read_text())
        assert os.getpgid(child) != os.getpgid(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted (Shutdown); putting it back at once" in stderr
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    remaining = asyncio.run(_count("local://q"))
    assert remaining == 1  # abandoned for redelivery, not failed


async def _count(queue: str) -> int:
    async with JobQ.open(queue, check=False) as q:
        return (await q.counts()).active


def test_cli_task_timeout_under_process_isolation(local_dir, tmp_path):
    """`jobq worker --isolation process --task-timeout 1s`: a time.sleep(60) task is
    stopped and dead-lettered as Timeout; the next task runs in a fresh process."""
    import subprocess
    import sys
    import time

    from conftest import ROOT, worker_env

    import ai4s_jobq

    ai4s_jobq.push_many([{"seconds": 60}], queue="local://q", num_retries=0)
    ai4s_jobq.push_many([{"seconds": 0}], queue="local://q")
    started_at = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ai4s_jobq_cli",
            "--queue",
            "local://q",
            "worker",
            "--proc",
            "proc_tasks:sleep_sync",
            "--isolation",
            "process",
            "--task-timeout",
            "1s",
            "--idle-timeout",
            "0.5",
        ],
        env={**os.environ, **worker_env(local_dir)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started_at < 30
    assert "1 succeeded, 1 failed attempts, 1 dead-lettered" in result.stderr

    async def dead():
        async with JobQ.open("local://q", check=False) as q:
            return await q.dlq_list()

    (entry,) = asyncio.run(dead())
    assert entry.reason == "Timeout"


async def test_a_task_killed_like_by_the_oom_killer_fails_with_a_hint():
    pool = ProcessPool("proc_tasks:kill_self", 1)
    async with started(pool):
        with pytest.raises(TaskFailed) as info:
            await pool(make_task({"signum": 9}))
    assert info.value.reason == "ProcessDied"
    assert "killed by signal SIGKILL" in info.value.summary
    assert "out-of-memory" in info.value.summary


async def test_large_arguments_and_results_cross_the_pipes_intact():
    """Messages larger than a pipe's buffer are framed and reassembled (many reads)."""
    pool = ProcessPool("proc_tasks:echo", 2)
    payload = "".join(chr(48 + i % 70) for i in range(300_000))
    async with started(pool):
        results = await asyncio.gather(
            pool(make_task({"payload": payload, "repeat": 3})),
            pool(make_task({"payload": "small"})),
            pool(make_task({"payload": payload[:70_000], "repeat": 1})),
        )
    assert results == [payload * 3, "small", payload[:70_000]]


async def test_a_task_ignoring_sigterm_is_killed_after_the_grace(tmp_path):
    from ai4s_jobq.worker.build import ProcessorOptions, build_processor

    marker = tmp_path / "marker"
    built = build_processor(
        ProcessorOptions(
            proc="proc_tasks:ignore_sigterm", isolation="process", task_timeout=1, kill_grace=0.5
        ),
        1,
    )
    async with started(built.processor):
        began = asyncio.get_running_loop().time()
        with pytest.raises(TaskFailed) as info:
            await built.processor(make_task({"marker": str(marker)}))
        took = asyncio.get_running_loop().time() - began
    assert info.value.reason == "Timeout"
    assert 1.4 < took < 10  # the timeout, then the grace, then SIGKILL
    with pytest.raises(ProcessLookupError):
        os.kill(int(marker.read_text()), 0)


async def test_a_crash_leaving_a_forked_grandchild_is_reported_and_cleaned_up(tmp_path):
    marker = tmp_path / "marker"
    pool = ProcessPool("proc_tasks:fork_then_exit", 1)
    async with started(pool):
        with pytest.raises(TaskFailed) as info:
            await asyncio.wait_for(pool(make_task({"marker": str(marker)})), 30)
    assert "exit code 1" in info.value.summary
    grandchild = int(marker.read_text())
    await asyncio.to_thread(
        wait_for, lambda: not _alive(grandchild), 10, 0.05, "the grandchild to be killed"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
