"""Worker policies on the local backend (real SQLite broker, real processes where it
matters): retry back-off, interruptions vs attempts, permanent errors, tasks that try
to take the worker down, the task environment, signals after --time-limit."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import sample_tasks
import worker_scenarios
from conftest import ROOT, jobq_cli, wait_for, worker_env

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.backends.base import OutgoingMessage
from ai4s_jobq.task import Task
from ai4s_jobq.worker.attempts import RunCounters
from ai4s_jobq.worker.processors import CallableProcessor, ShellProcessor
from ai4s_jobq.worker.retry import RetryDelay
from ai4s_jobq.worker.task_env import task_environment


def test_retry_delay_parse_and_bounds():
    default = RetryDelay.parse("exp")
    assert (default.base, default.factor, default.cap) == (10, 2, 600)
    rng = random.Random(7)
    for failures, nominal in [(1, 10), (2, 20), (3, 40), (7, 600), (50, 600), (10_000, 600)]:
        for _ in range(50):
            delay = default.seconds(failures, rng=rng)
            assert nominal * 0.75 <= delay <= nominal
    assert RetryDelay.parse("30s").seconds(5) == 30
    assert RetryDelay.parse("0").seconds(3) == 0
    assert RetryDelay.parse("exp:1s:4s:3").seconds(3) <= 4
    bad_specs = ("soon", "exp:1s:2s:3:4", "exp:10s:1s", "exp:1s:1m:0.5", "-5s")
    # a nan or infinite factor passed the "factor < 1" test: delays of nan / inf
    for bad in (*bad_specs, "exp:1s:1m:nan", "exp:1s:1m:inf"):
        with pytest.raises(ValueError, match="--retry-delay"):
            RetryDelay.parse(bad)


@pytest.mark.parametrize(
    "fields",
    [
        {"base": -1.0},
        {"base": float("nan")},
        {"cap": float("inf")},
        {"base": 20.0, "cap": 10.0},
        {"factor": 0.5},
        {"factor": float("nan")},
        {"jitter": 2.0},
    ],
    ids=repr,
)
def test_a_retry_delay_made_in_code_is_checked_too(fields):
    with pytest.raises(ValueError, match="retry delay"):
        RetryDelay(**fields)


def test_bad_retry_delay_is_a_usage_error(local_dir):
    result = jobq_cli("worker", "--retry-delay", "soonish")
    assert result.returncode == 2
    assert "--retry-delay" in result.stderr and "Traceback" not in result.stderr


async def test_backoff_delays_are_observed_within_bounds(local_dir, tmp_path):
    """Each retry starts no earlier than its back-off (and not much later); the worker
    with --idle-timeout shorter than the delays still drains all attempts, because
    it waits for the retries it scheduled."""
    log = tmp_path / "log"
    async with JobQ.open("local://backoff") as q:
        await q.push(f"date +%s.%N >> {log}; exit 1", num_retries=2)
        policy = WorkerPolicy(idle_timeout=0.3, retry_delay=RetryDelay(base=1.0, factor=2, cap=5))
        stats = await Worker(q.backend, ShellProcessor(), policy).run()
        assert (stats.failed, stats.dead_lettered, stats.rescheduled) == (3, 1, 2)
        starts = [float(line) for line in log.read_text().split()]
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert 0.75 <= gaps[0] <= 1.0 + 1.5, gaps  # 1 s x [0.75, 1] + scheduling slack
        assert 1.5 <= gaps[1] <= 2.0 + 1.5, gaps
        (dead,) = await q.dlq_list()
        assert dead.reason == "NonZeroExit"
        assert RunCounters.of(dead.task).attempt == 3


def test_cli_worker_with_short_idle_timeout_drains_a_failing_task(local_dir, tmp_path):
    jobq_cli("push", "-c", "exit 1", "--num-retries", "2", check=True)
    result = jobq_cli("worker", "--idle-timeout", "0.5", "--retry-delay", "exp:1s:2s")
    assert result.returncode == 0, result.stderr
    assert "attempt 3 of 3: dead-lettering" in result.stderr
    listed = json.loads(jobq_cli("dlq", "list", "--json", check=True).stdout)
    assert [(d["reason"], d["attempt"], d["interruptions"]) for d in listed] == [
        ("NonZeroExit", 3, 0)
    ]
    requeued = jobq_cli("dlq", "requeue", "--all", check=True)
    assert "requeued 1" in requeued.stdout
    (fresh,) = json.loads(jobq_cli("peek", "--json", check=True).stdout)
    assert (fresh["attempt"], fresh["interruptions"]) == (1, 0)  # a fresh set of attempts


async def test_permanent_errors_skip_retries(local_dir, tmp_path):
    async with JobQ.open("local://permanent") as q:
        for args in ({"message": "input is corrupt"}, {}):
            await q.push(args, num_retries=5)
        await q.push({"log": str(tmp_path / "never"), "name": "x"}, num_retries=5)
        calls: list[str] = []

        async def route(task):  # one processor per task kind, as a user's --proc would
            calls.append(json.dumps(task.args, sort_keys=True))
            if "message" in task.args:
                return await CallableProcessor(sample_tasks.raise_permanent)(task)
            if not task.args:
                return await CallableProcessor(sample_tasks.import_missing)(task)
            return await ShellProcessor()(task)  # no 'cmd': a shell task cannot run

        policy = WorkerPolicy(idle_timeout=0.3, retry_delay=RetryDelay.fixed(60))
        stats = await Worker(q.backend, route, policy).run()
        assert (stats.failed, stats.dead_lettered, stats.rescheduled) == (3, 3, 0)
        assert len(calls) == 3  # each ran once
        reasons = sorted((d.reason, (d.description or "")) for d in await q.dlq_list())
        assert [r for r, _ in reasons] == ["Permanent"] * 3
        text = "\n".join(d for _, d in reasons)
        assert "input is corrupt" in text
        assert "ai4s_jobq_module_that_does_not_exist" in text
        assert "needs a 'cmd'" in text


async def test_a_shell_task_whose_env_cannot_be_set_fails_once_not_three_times(local_dir):
    """Pushed by another producer (``push`` refuses it): each attempt failed with
    "illegal environment variable name", and its retries were burnt on it."""
    async with JobQ.open("local://badenv") as q:
        bad = Task("bad-env", {"cmd": "true", "env": {"A=B": "1"}}, num_retries=5)
        await q.backend.push([OutgoingMessage(bad.id, bad.to_body())])
        await q.push("true", env={"FINE": "1"})
        policy = WorkerPolicy(idle_timeout=0.3, retry_delay=RetryDelay.fixed(60))
        stats = await Worker(q.backend, ShellProcessor(), policy).run()
        assert (stats.succeeded, stats.failed, stats.dead_lettered) == (1, 1, 1)
        (dead,) = await q.dlq_list()
        assert dead.reason == "Permanent"
        assert "'A=B' cannot be an environment variable name" in (dead.description or "")


@pytest.mark.parametrize(
    "how", ["sys.exit", "KeyboardInterrupt", "SystemExit", "GeneratorExit", "close-stdout"]
)
def test_a_task_that_exits_fails_alone(local_dir, tmp_path, how):
    """Through the real CLI: the task fails (and is dead-lettered with its reason), the
    worker goes on to the next task and ends normally."""
    env = worker_env(local_dir)
    log = tmp_path / "after"
    jobq_cli("push", "--num-retries", "0", env=env, input=json.dumps({"how": how}) + "\n")
    jobq_cli(
        "push",
        "--num-retries",
        "0",
        env=env,
        input=json.dumps({"log": str(log), "name": "next"}) + "\n",
    )
    result = jobq_cli(
        "worker",
        "--proc",
        "sample_tasks:dispatch_exit_or_record",
        "--idle-timeout",
        "0.5",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "end next" in log.read_text()
    assert "worker stopped (idle timeout): 1 succeeded, 1 failed" in result.stderr
    (dead,) = json.loads(jobq_cli("dlq", "list", "--json", env=env, check=True).stdout)
    assert dead["args"] == {"how": how}


async def test_interruptions_do_not_use_retries_and_are_bounded(local_dir, tmp_path):
    """A task interrupted over and over (here: its worker loses it every time) keeps its
    attempt number; past --max-interruptions it is dead-lettered TooManyInterruptions."""
    async with JobQ.open("local://interrupted", lock_duration=timedelta(seconds=0.5)) as q:
        await q.push("true", num_retries=0)
        for expected in range(1, 4):
            (message,) = await q.backend.receive(1, 5)  # taken, never settled: a lost node
            await asyncio.sleep(0.6)
            policy = WorkerPolicy(idle_timeout=0.2, max_interruptions=2, max_tasks=1)
            stats = await Worker(q.backend, _never_runs, policy).run()
            assert stats.interrupted == 1
            if expected <= 2:
                (copy,) = await q.peek(1)
                counters = RunCounters.of(copy.task)
                assert (counters.attempt, counters.interruptions) == (1, expected)
        (dead,) = await q.dlq_list()
        assert dead.reason == "TooManyInterruptions"
        assert "interrupted 3 times" in (dead.description or "")


async def _never_runs(task):
    raise AssertionError("a message with unsettled deliveries is put back, not run")


def test_tasks_do_not_inherit_credentials_unless_asked(local_dir, tmp_path):
    log = tmp_path / "env"
    secrets = {
        "JOBQ_CONNECTION_STRING": "Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=SECRET1",
        "AZURE_CLIENT_SECRET": "SECRET2",
        "AZURE_STORAGE_SAS_TOKEN": "sv=2020&sig=SECRET3",
        "OPENAI_API_KEY": "SECRET4",
        "AZURE_CLIENT_ID": "keep-me",
    }
    env = {**worker_env(local_dir), **secrets}
    names = " ".join(secrets)
    cmd = "for n in " + names + "; do eval echo $n=\\${$n:-unset}; done > " + str(log)
    cmd += "; echo 'leaked AccountKey=abc123secret' >&2; exit 1"
    jobq_cli(
        "--queue", "local://envq", "push", "-c", cmd, "--num-retries", "0", env=env, check=True
    )
    result = jobq_cli(
        "--queue",
        "local://envq",
        "worker",
        "--idle-timeout",
        "0.3",
        "--pass-env",
        "OPENAI_*",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    seen = dict(line.split("=", 1) for line in log.read_text().split())
    assert seen == {
        "JOBQ_CONNECTION_STRING": "unset",
        "AZURE_CLIENT_SECRET": "unset",
        "AZURE_STORAGE_SAS_TOKEN": "unset",
        "OPENAI_API_KEY": "SECRET4",  # asked for with --pass-env
        "AZURE_CLIENT_ID": "keep-me",  # identifies, does not authenticate
    }
    assert "abc123secret" not in result.stderr  # task output is redacted in the log
    # the start says which variables tasks go without (names, never values)
    (withheld,) = [ln for ln in result.stderr.splitlines() if "do not inherit" in ln]
    for name in ("JOBQ_CONNECTION_STRING", "AZURE_CLIENT_SECRET", "AZURE_STORAGE_SAS_TOKEN"):
        assert name in withheld
    assert "OPENAI_API_KEY" not in withheld and "SECRET" not in withheld.replace("_SECRET", "")
    (dead,) = json.loads(
        jobq_cli("--queue", "local://envq", "dlq", "list", "--json", env=env, check=True).stdout
    )
    assert "abc123secret" not in dead["description"] and "AccountKey=***" in dead["description"]


def test_task_environment_names():
    env = task_environment(
        environ={"PATH": "/bin", "MY_CONNECTION_STRING": "x", "HF_TOKEN": "y", "KEY": "z"}
    )
    assert env == {"PATH": "/bin"}
    assert task_environment(["HF_*"], {"HF_TOKEN": "y"}) == {"HF_TOKEN": "y"}


@pytest.mark.parametrize(
    "pattern, exit_code, says",
    [
        ("FOO=bar", 2, "push them with -e KEY=VALUE"),  # a value, not a name
        ("MY KEY", 2, "no spaces"),
        ("AZURE_CLIENT_SECERT", 0, "matches no variable of this worker's environment"),
    ],
)
def test_pass_env_that_cannot_pass_anything_is_said(local_dir, pattern, exit_code, says):
    result = jobq_cli(
        "worker", "--idle-timeout", "0.1", "--pass-env", pattern, env=worker_env(local_dir)
    )
    assert result.returncode == exit_code and says in result.stderr, result.stderr


def test_signal_after_time_limit_still_honours_grace_period(local_dir, tmp_path):
    """--time-limit fired (intake stopped, the long task keeps running); a SIGTERM then
    gives it --grace-period, not forever: the worker ends within it and the task is put
    back as an interruption."""
    pidfile = tmp_path / "pid"
    jobq_cli(
        "push",
        "-c",
        f"sleep 120 & echo $! > {pidfile}; wait",
        env=worker_env(local_dir),
        check=True,
    )
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ai4s_jobq_cli",
            "worker",
            "--idle-timeout",
            "0",
            "--time-limit",
            "0.5",
            "--grace-period",
            "1",
        ],
        env={**os.environ, **worker_env(local_dir)},
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(pidfile.exists, what="the task to start")
    time.sleep(1.0)  # let --time-limit fire (no event to await from outside the process)
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 143, err
    assert time.monotonic() - started < 10, err
    assert "interrupted (Shutdown)" in err
    (again,) = json.loads(jobq_cli("peek", "--json", env=worker_env(local_dir), check=True).stdout)
    assert (again["attempt"], again["interruptions"]) == (1, 1)


def test_kill_mid_reschedule_neither_loses_nor_doubles_local(local_dir, tmp_path):
    log, marker = tmp_path / "log", tmp_path / "marker"

    async def setup() -> None:
        async with JobQ.open("local://crash", lock_duration=timedelta(seconds=3)) as q:
            await q.push({"log": str(log), "marker": str(marker)})

    asyncio.run(setup())
    env = {**os.environ, **worker_env(local_dir)}
    worker_scenarios.crash_mid_reschedule("local://crash", env, log, marker)


async def test_a_queue_that_disappears_stops_the_worker_with_code_4(local_dir):
    """Not a transient error: no retries, no waiting for --idle-timeout."""
    async with JobQ.open("local://vanishing") as q:
        worker = asyncio.ensure_future(
            Worker(q.backend, ShellProcessor(), WorkerPolicy(idle_timeout=0)).run()
        )
        await asyncio.sleep(0.2)  # the worker is polling the empty queue
        q.backend.core.delete_queue("vanishing")
        stats = await asyncio.wait_for(worker, 10)
        assert stats.exit_code == 4 and stats.stop_reason == "configuration error"


@pytest.mark.parametrize(
    "fields",
    [
        {"slots": 0},  # waited for ever for a free slot
        {"slots": -2},
        {"slots": 2.5},
        {"idle_timeout": -1},  # spun the event loop at full CPU, deaf to SIGTERM
        {"idle_timeout": float("nan")},  # never came
        {"idle_timeout": float("inf")},
        {"grace_period": float("nan")},
        {"time_limit": -5},
        {"max_tasks": 0},
        {"max_interruptions": -1},
        {"max_consecutive_failures": -1},
        {"slots": True},
    ],
    ids=repr,
)
def test_a_policy_the_loop_cannot_run_is_refused_when_made(fields):
    (name,) = fields
    with pytest.raises(ValueError, match=f"WorkerPolicy.{name} must be"):
        WorkerPolicy(**fields)


def test_the_policy_bounds_keep_what_users_pass():
    WorkerPolicy(idle_timeout=0, time_limit=0.5, max_consecutive_failures=0, max_interruptions=0)
    WorkerPolicy(slots=64, idle_timeout=0.3, grace_period=0, max_tasks=1)
