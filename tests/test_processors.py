"""Processors: failure text, class lifecycle, --tty, PYTHONUNBUFFERED, --task-timeout
(real local queue, real subprocesses)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import wait_for

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.task import make_task
from ai4s_jobq.worker.build import ProcessorOptions, build_processor
from ai4s_jobq.worker.processors import (
    CallableProcessor,
    ProcessorSetupError,
    ShellProcessor,
    TaskFailed,
    make_processor,
    started,
)


@pytest.fixture
def task_log(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "proc_tasks.log"
    path.touch()
    monkeypatch.setenv("PROC_TASKS_LOG", str(path))
    return path


def policy(**kwargs) -> WorkerPolicy:
    return WorkerPolicy(**{"idle_timeout": 0.3, **kwargs})


async def fails(processor, args) -> TaskFailed:
    with pytest.raises(TaskFailed) as info:
        await processor(make_task(args))
    return info.value


# ---------------------------------------------------------------- failure text


async def test_python_failure_reason_leads_with_type_and_message(local_dir):
    async with JobQ.open("local://reason") as q:
        await q.push({"text": "bad input 42"}, num_retries=0)
        import proc_tasks

        await Worker(q.backend, CallableProcessor(proc_tasks.fail_value), policy()).run()
        (dead,) = await q.dlq_list()
    assert dead.reason == "ValueError"
    first, _, rest = (dead.description or "").partition("\n")
    assert first == "ValueError: bad input 42"
    assert "Traceback (most recent call last)" in rest and "proc_tasks.py" in rest
    # The worker's own frames are not the explanation: the traceback starts at the task.
    assert "processors.py" not in rest and "asyncio" not in rest


async def test_shell_failure_leads_with_exit_code_and_last_nonempty_stderr_line():
    failure = await fails(
        ShellProcessor(), {"cmd": "echo first >&2; echo 'disk full' >&2; echo >&2; exit 3"}
    )
    assert failure.reason == "NonZeroExit" and failure.exit_code == 3
    assert failure.summary == "exit code 3: disk full"
    assert "first" in failure.description


async def test_shell_killed_by_signal_names_it():
    failure = await fails(ShellProcessor(), {"cmd": "kill -SEGV $$"})
    assert failure.summary == "killed by signal SIGSEGV"


# ---------------------------------------------------------------- output


async def test_shell_child_gets_pythonunbuffered_unless_the_task_sets_it(tmp_path, monkeypatch):
    out = tmp_path / "env"
    cmd = f'echo "[$PYTHONUNBUFFERED]" >> {out}'
    processor = ShellProcessor()
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    await processor(make_task({"cmd": cmd}))
    await processor(make_task({"cmd": cmd, "env": {"PYTHONUNBUFFERED": ""}}))
    assert out.read_text().splitlines() == ["[1]", "[]"]


async def test_tty_gives_shell_tasks_a_terminal_on_stdout(caplog):
    probe = f"{sys.executable} -c 'import sys; print(\"tty\", sys.stdout.isatty())'"
    caplog.set_level(logging.INFO, logger="ai4s_jobq.task")
    await ShellProcessor(tty=True)(make_task({"cmd": probe + "; echo after"}))
    await ShellProcessor()(make_task({"cmd": probe}))
    lines = [r.getMessage().split("] ", 1)[1] for r in caplog.records]
    assert lines == ["tty True", "after", "tty False"]


async def test_tty_task_failure_still_reports_stderr():
    failure = await fails(ShellProcessor(tty=True), {"cmd": "echo out; echo oops >&2; exit 2"})
    assert failure.summary == "exit code 2: oops"


# ---------------------------------------------------------------- lifecycle


async def test_class_setup_runs_once_in_process_across_200_tasks_on_4_slots(local_dir, task_log):
    async with JobQ.open("local://life") as q:
        await q.push_many([{"i": i} for i in range(200)])
        processor = make_processor("proc_tasks:Counting")
        async with started(processor):
            stats = await Worker(q.backend, processor, policy(slots=4)).run()
    assert stats.succeeded == 200
    kinds = Counter(line.split()[0] for line in task_log.read_text().splitlines())
    assert kinds == {"setup": 1, "call": 200, "teardown": 1}


async def test_class_setup_runs_once_per_pool_process_across_200_tasks(local_dir, task_log):
    async with JobQ.open("local://life-iso") as q:
        await q.push_many([{"i": i} for i in range(200)])
        built = build_processor(
            ProcessorOptions(proc="proc_tasks:Counting", isolation="process"), 4
        )
        async with started(built.processor):
            stats = await Worker(q.backend, built.processor, policy(slots=4)).run()
    assert stats.succeeded == 200
    lines = [line.split() for line in task_log.read_text().splitlines()]
    setups = Counter(pid for kind, pid, *_ in lines if kind == "setup")
    callers = {pid for kind, pid, *_ in lines if kind == "call"}
    teardowns = Counter(pid for kind, pid, *_ in lines if kind == "teardown")
    assert len(setups) == 4 and set(setups.values()) == {1}
    assert str(os.getpid()) not in setups  # not in the worker process itself
    assert callers <= set(setups) and teardowns == setups
    assert sum(1 for line in lines if line[0] == "call") == 200


async def test_async_class_and_results(task_log):
    for isolation in ("none", "process"):
        built = build_processor(
            ProcessorOptions(proc="proc_tasks:AsyncCounting", isolation=isolation), 1
        )
        async with started(built.processor):
            assert await built.processor(make_task({"i": 41})) == 42
    assert Counter(task_log.read_text().split()[::2]) == {"setup": 2, "teardown": 2}


async def test_failing_setup_is_a_configuration_error(task_log):
    for isolation in ("none", "process"):
        built = build_processor(
            ProcessorOptions(proc="proc_tasks:FailingSetup", isolation=isolation), 2
        )
        with pytest.raises(ProcessorSetupError, match="RuntimeError: no model file"):
            async with started(built.processor):
                pass


def test_isolation_needs_a_python_processor():
    with pytest.raises(ValueError, match="--isolation process runs Python tasks"):
        build_processor(ProcessorOptions(isolation="process"))
    with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz'"):
        build_processor(ProcessorOptions(proc="no_such_module_xyz:f", isolation="process"))
    with pytest.raises(ValueError, match="--tty applies to shell tasks"):
        build_processor(ProcessorOptions(proc="proc_tasks:noop", tty=True))


# ---------------------------------------------------------------- timeouts


async def test_task_timeout_stops_a_sync_sleep_under_process_isolation(local_dir, tmp_path):
    marker = tmp_path / "marker"
    async with JobQ.open("local://timeout") as q:
        await q.push({"seconds": 60, "marker": str(marker)}, num_retries=0)
        await q.push({"seconds": 0})
        built = build_processor(
            ProcessorOptions(proc="proc_tasks:sleep_sync", isolation="process", task_timeout=1),
            1,
        )
        started_at = time.monotonic()
        async with started(built.processor):
            stats = await Worker(q.backend, built.processor, policy()).run()
        took = time.monotonic() - started_at
        (dead,) = await q.dlq_list()
    assert took < 20  # not 60
    assert (stats.succeeded, stats.failed, stats.dead_lettered) == (1, 1, 1)
    assert dead.reason == "Timeout" and "longer than 1s" in (dead.description or "")
    pid = int(marker.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the pool process that ran it is gone (and was replaced)


async def test_task_timeout_stops_a_shell_sleep(tmp_path):
    pidfile = tmp_path / "pid"
    built = build_processor(ProcessorOptions(task_timeout=1), 1)
    started_at = time.monotonic()
    failure = await fails(built.processor, {"cmd": f"echo $$ > {pidfile}; exec sleep 60"})
    assert time.monotonic() - started_at < 10
    assert failure.reason == "Timeout"
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)


async def test_task_timeout_leaves_fast_tasks_and_their_own_timeouts_alone():
    async def raises_timeout(**_):
        raise TimeoutError("upstream timed out")

    built = build_processor(ProcessorOptions(task_timeout=5), 1)
    await built.processor(make_task({"cmd": "true"}))
    from ai4s_jobq.worker.timeouts import TaskTimeout

    with pytest.raises(TaskFailed) as info:
        await TaskTimeout(CallableProcessor(raises_timeout), 5)(make_task({}))
    assert info.value.reason == "TimeoutError"


async def test_sigterm_grace_then_sigkill_for_a_task_ignoring_sigterm(tmp_path):
    pidfile = tmp_path / "pid"
    processor = ShellProcessor(kill_grace=0.5)
    work = asyncio.ensure_future(
        processor(make_task({"cmd": f"trap '' TERM; echo $$ > {pidfile}; sleep 60 & wait"}))
    )
    await asyncio.to_thread(wait_for, lambda: pidfile.exists() and pidfile.read_text())
    work.cancel()
    started_at = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await work
    assert 0.4 < time.monotonic() - started_at < 8
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)


async def test_a_class_processor_used_without_started_sets_itself_up(task_log):
    processor = make_processor("proc_tasks:Counting")
    results = await asyncio.gather(*(processor(make_task({"i": i})) for i in range(5)))
    assert results == [0, 2, 4, 6, 8]
    assert task_log.read_text().count("setup") == 1  # concurrent first calls: one setup
