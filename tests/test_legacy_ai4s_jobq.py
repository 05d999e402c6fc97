"""Our worker drains queues holding messages of the original ai4s-jobq 3.13.1.

The messages are produced by ai4s-jobq itself, installed in a venv of its own (see
legacy_support.py): its CLI and its ``JobQ.push`` write to Azurite, its ``Task``
encoder writes the bodies sent to the Service Bus emulator (its own Service Bus
producer talks REST with Azure AD only, which the emulator does not serve; body and
properties are what that producer sends).  Then the real ``jobq worker`` drains them:
each task runs once, shell tasks under bash with their environment, Python tasks
with their keyword arguments, and a failing task is retried per its own budget and
dead-lettered.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import legacy_support
import pytest
import servicebus_support as support
from conftest import ROOT, jobq_cli
from servicebus_support import create_queue

pytestmark = pytest.mark.slow  # the first run installs ai4s-jobq 3.13.1 (about a minute)

sb_process, sb_cs, sb_queue = support.sb_process, support.sb_cs, support.sb_queue
TESTS = str(Path(__file__).resolve().parent)

# A bash-only test ([[ ]]) that also shows the environment their shell tasks got.
SHELL_LINE = (
    '[[ -n "$BASH_VERSION" ]] && echo "{n} $GREETING $PYTHONUNBUFFERED $JOBQ_TASK_ID" >> {out}'
)


@pytest.fixture(scope="module")
def ai4s_venv() -> Path:
    return legacy_support.ai4s_venv()


def run_worker(cs: str, spec: str, *args: str) -> None:
    env = {
        "JOBQ_CONNECTION_STRING": cs,
        "PYTHONPATH": os.pathsep.join([TESTS, str(ROOT)]),
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    }
    jobq_cli("--queue", spec, "worker", "--idle-timeout", "2s", *args, env=env, check=True)


def dlq(cs: str, spec: str) -> list[dict]:
    out = jobq_cli("--queue", spec, "dlq", "list", "--json", env={"JOBQ_CONNECTION_STRING": cs})
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    return listed if isinstance(listed, list) else listed.get("tasks", listed)


def sizes(cs: str, spec: str) -> tuple[int, int]:
    out = jobq_cli("--queue", spec, "size", "--json", env={"JOBQ_CONNECTION_STRING": cs})
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout)
    return counts["active"], counts["dead_letter"]


def shell_lines(out: Path) -> list[list[str]]:
    return sorted(line.split() for line in out.read_text().splitlines())


# ---------------------------------------------------------------------- Storage Queue


def test_storage_shell_tasks_from_their_cli_run_once_in_bash(ai4s_venv, azurite, tmp_path):
    cs, queue = azurite.connection_string, f"legacy{uuid.uuid4().hex[:12]}"
    spec, out = f"devstoreaccount1/{queue}", tmp_path / "out.txt"
    commands = [SHELL_LINE.format(n=n, out=out) for n in range(3)]
    legacy_support.their_cli_push(
        cs, spec, *[a for c in commands for a in ("-c", c)], "-e", "GREETING=hi"
    )
    legacy_support.their_cli_push(cs, spec, "-c", "exit 5", "--num-retries", "1")

    run_worker(cs, spec)

    lines = shell_lines(out)
    assert [line[:3] for line in lines] == [[str(n), "hi", "1"] for n in range(3)]  # once each
    assert all(len(line[3]) == 32 for line in lines)  # JOBQ_TASK_ID: their task ID
    (dead,) = dlq(cs, spec)
    assert dead["reason"] == "NonZeroExit" and "exit code 5" in dead["description"]
    assert dead["attempt"] == 2  # num_retries 1: two attempts (counted in the envelope)
    assert sizes(cs, spec) == (0, 1)


def test_storage_python_tasks_from_their_api_get_their_kwargs(ai4s_venv, azurite, tmp_path):
    cs, queue = azurite.connection_string, f"legacypy{uuid.uuid4().hex[:12]}"
    spec, out = f"devstoreaccount1/{queue}", tmp_path / "calls.jsonl"
    tasks = [
        {"kwargs": {"path": str(out), "value": {"n": n, "tags": ["a", n]}}, "num_retries": 2}
        for n in range(4)
    ]
    ids = legacy_support.push_to_storage(cs, queue, tasks)
    run_worker(cs, spec, "--proc", "sample_tasks:legacy_record")

    calls = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(c["value"]["n"] for c in calls) == [0, 1, 2, 3]
    assert all(c["rest"] == {} for c in calls)
    assert sorted(c["id"] for c in calls) == sorted(ids)
    assert sizes(cs, spec) == (0, 0)


# ---------------------------------------------------------------------- Service Bus


async def test_servicebus_shell_and_python_tasks_run_once(ai4s_venv, sb_cs, sb_queue, tmp_path):
    shell_queue, py_queue = f"{sb_queue}-sh", f"{sb_queue}-py"
    for name in (shell_queue, py_queue):
        await create_queue(sb_cs, name, requires_duplicate_detection=True)
    out, calls = tmp_path / "out.txt", tmp_path / "calls.jsonl"
    # What their CLI's `push -c CMD -e GREETING=hi` encodes for each command.
    shell = [
        {
            "kwargs": {
                "cmd": SHELL_LINE.format(n=n, out=out),
                "bg_dirsync_to": None,
                "env": {"GREETING": "hi"},
            },
            "num_retries": 0,
        }
        for n in range(3)
    ]
    failing = {"kwargs": {"cmd": "exit 7", "bg_dirsync_to": None, "env": {}}, "num_retries": 2}
    shell_ids = legacy_support.send_to_servicebus(sb_cs, shell_queue, [*shell, failing])
    py_ids = legacy_support.send_to_servicebus(
        sb_cs,
        py_queue,
        [{"kwargs": {"path": str(calls), "value": n}, "num_retries": 1} for n in range(3)],
    )

    run_worker(sb_cs, support.spec(shell_queue))
    run_worker(sb_cs, support.spec(py_queue), "--proc", "sample_tasks:legacy_record")

    lines = shell_lines(out)
    assert [line[:3] for line in lines] == [[str(n), "hi", "1"] for n in range(3)]
    assert sorted(line[3] for line in lines) == sorted(shell_ids[:3])
    (dead,) = dlq(sb_cs, support.spec(shell_queue))
    assert dead["reason"] == "NonZeroExit" and "exit code 7" in dead["description"]
    assert dead["attempt"] == 3  # num_retries 2: three attempts (counted in the envelope)
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    assert sorted(c["value"] for c in recorded) == [0, 1, 2]
    assert sorted(c["id"] for c in recorded) == sorted(py_ids)
    assert sizes(sb_cs, support.spec(py_queue)) == (0, 0)


async def test_servicebus_peek_shows_their_tasks_decoded(ai4s_venv, sb_cs, sb_queue):
    await create_queue(sb_cs, sb_queue, requires_duplicate_detection=True)
    (task_id,) = legacy_support.send_to_servicebus(
        sb_cs, sb_queue, [{"kwargs": {"cmd": "echo hi", "env": {}}, "num_retries": 3}]
    )
    out = jobq_cli(
        "--queue", support.spec(sb_queue), "peek", "--json", env={"JOBQ_CONNECTION_STRING": sb_cs}
    )
    assert out.returncode == 0, out.stderr
    assert task_id in out.stdout and "echo hi" in out.stdout


# ---------------------------------------------------------------------- moving them


async def test_their_storage_queue_moves_to_servicebus_and_runs_there(
    ai4s_venv, azurite, sb_cs, sb_queue, tmp_path
):
    """`jobq migrate` copies their messages as they are; our worker runs them there."""
    cs, queue = azurite.connection_string, f"legacymv{uuid.uuid4().hex[:12]}"
    source, out = f"devstoreaccount1/{queue}", tmp_path / "out.txt"
    commands = [SHELL_LINE.format(n=n, out=out) for n in range(2)]
    legacy_support.their_cli_push(
        cs, source, *[a for c in commands for a in ("-c", c)], "-e", "GREETING=moved"
    )
    moved = jobq_cli(
        "--queue",
        source,
        "migrate",
        "--to",
        support.spec(sb_queue),
        "--to-conn-str",
        sb_cs,
        "--wait",
        "2",
        "--json",
        env={"JOBQ_CONNECTION_STRING": cs},
    )
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["moved"] == 2

    run_worker(sb_cs, support.spec(sb_queue))

    assert [line[:3] for line in shell_lines(out)] == [["0", "moved", "1"], ["1", "moved", "1"]]
    assert sizes(cs, source) == (0, 0)
