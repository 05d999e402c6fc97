"""The ledger commands through the real ``jobq`` CLI on a local queue, with real
worker processes: wait (exit codes, --from, --tag), push --wait/--tag/--skip-succeeded,
status/tasks/result/workers --json, heartbeats of a SIGKILLed worker, prune."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, jobq_cli, wait_for, worker_env


@pytest.fixture
def env(local_dir) -> dict[str, str]:
    return {**worker_env(local_dir), "JOBQ_HEARTBEAT_SECONDS": "0.2"}


def cli(env: dict[str, str], *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return jobq_cli("-q", "local://cli", *args, env=env, **kwargs)


def start_worker(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ai4s_jobq_cli", "-q", "local://cli", "worker", *args],
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_wait_from_push_output_while_a_worker_drains(env, tmp_path):
    pushed = cli(
        env, "push", "--json", "--tag", "run-1", "-c", "sleep 0.3", "-c", "echo ok", check=True
    )
    ids_file = tmp_path / "pushed.jsonl"
    ids_file.write_text(pushed.stdout)
    worker = start_worker(env, "-n", "2", "--idle-timeout", "20s")
    try:
        waited = cli(env, "wait", "--from", str(ids_file), "--timeout", "60s", "--json")
        assert waited.returncode == 0, waited.stderr
        report = json.loads(waited.stdout)
        assert (report["total"], report["succeeded"], report["timed_out"]) == (2, 2, False)
        status = json.loads(cli(env, "status", "--tag", "run-1", "--json", check=True).stdout)
        assert status["counts"] == {"succeeded": 2} and status["remaining"] == 0
        assert status["workers"]["live"] == 1
        # a failing task: exit 1, and its record carries the real cause
        failing = cli(env, "push", "--json", "--num-retries", "0", "-c", "echo broken >&2; exit 7")
        (line,) = [x for x in json_lines(failing.stdout) if "id" in x]
        failed = cli(env, "wait", line["id"], "--timeout", "60s", "--json")
        assert failed.returncode == 1
        assert json.loads(failed.stdout)["dead_lettered_ids"] == [line["id"]]
        record = json.loads(cli(env, "result", line["id"], "--json", check=True).stdout)
        assert record["state"] == "dead_lettered" and record["exit_code"] == 7
        assert "broken" in record["summary"]
        tasks = json.loads(cli(env, "tasks", "--state", "dead_lettered", "--json").stdout)
        assert [t["id"] for t in tasks] == [line["id"]]
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)


def test_wait_exit_codes_without_a_worker(env):
    pushed = json_lines(cli(env, "push", "--json", "-c", "echo never-run", check=True).stdout)
    task_id = pushed[0]["id"]
    started = time.monotonic()
    timed_out = cli(env, "wait", task_id, "--timeout", "0.5s", "--json")
    assert timed_out.returncode == 124 and json.loads(timed_out.stdout)["remaining"] == 1
    assert time.monotonic() - started < 30
    unknown = cli(env, "wait", "f" * 32, "--json")
    assert unknown.returncode == 1 and json.loads(unknown.stdout)["unknown"] == ["f" * 32]
    no_tag = cli(env, "wait", "--tag", "never-pushed")
    assert no_tag.returncode == 1 and "never seen" in no_tag.stderr
    usage = cli(env, "wait")
    assert usage.returncode == 2
    drained = cli(env, "wait", "--drained", "--timeout", "0.3s", "--json")
    assert drained.returncode == 124 and json.loads(drained.stdout)["drained"] is False


def test_push_wait_covers_duplicates_of_an_earlier_run(env):
    first = cli(env, "push", "--tag", "run-1", "-c", "echo a", "--json", check=True)
    first_id = json_lines(first.stdout)[0]["id"]
    worker = start_worker(env, "--idle-timeout", "20s")
    try:
        second = cli(
            env, "push", "--tag", "run-2", "-c", "echo a", "-c", "echo b", "--wait", "--json"
        )
        assert second.returncode == 0, second.stderr
        lines = json_lines(second.stdout)
        statuses = {x["id"]: x["status"] for x in lines if "id" in x}
        assert statuses[first_id] == "duplicate"
        report = lines[-1]
        assert (report["total"], report["succeeded"]) == (2, 2)
        members = json.loads(cli(env, "status", "--tag", "run-2", "--json").stdout)
        assert members["total"] == 2
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)


def test_skip_succeeded_reports_the_reason(env):
    cli(env, "push", "-c", "echo once", check=True)
    cli(env, "worker", "--idle-timeout", "0.5s", check=True)
    cli(env, "clear", "--yes", check=True)
    again = cli(env, "push", "--skip-succeeded", "-c", "echo once", "--json", check=True)
    (line,) = [x for x in json_lines(again.stdout) if "id" in x]
    assert line["status"] == "duplicate" and "succeeded" in line["reason"]


@pytest.mark.parametrize(
    "tag, says",
    [
        ("", "is the variable set?"),  # --tag "$RUN" with RUN unset
        ("x" * 101, "at most 100 characters"),
        ("a\nb", "no control characters"),
    ],
)
def test_a_tag_that_cannot_name_a_run_is_refused_before_anything_is_pushed(
    env, local_dir, tag, says
):
    import ai4s_jobq

    for args in (("push", "-c", "echo tagged"), ("wait",), ("status",), ("tasks",)):
        result = cli(env, *args, "--tag", tag)
        assert result.returncode == 2 and says in result.stderr, (args, result.stderr)
    with pytest.raises(ValueError, match=says):
        ai4s_jobq.push_many(["echo tagged"], queue="local://tagged", tag=tag)
    with pytest.raises(ValueError, match=says):
        ai4s_jobq.push("echo tagged", queue="local://tagged", tag=tag)
    assert not local_dir.exists() or not list(local_dir.iterdir())  # no queue was made


def test_heartbeats_appear_and_go_stale_when_the_worker_is_killed(env):
    cli(env, "push", "-c", "sleep 60", check=True)
    worker = start_worker(env, "-n", "2", "--idle-timeout", "0")

    def workers() -> list[dict]:
        return json.loads(cli(env, "workers", "--json", check=True).stdout)

    try:
        (live,) = wait_for(
            lambda: [w for w in workers() if w["running"]], timeout=60, what="a running worker"
        )
        assert live["status"] == "live" and live["pid"] == worker.pid and live["slots"] == 2
    finally:
        worker.kill()
        worker.wait(timeout=30)
    (gone,) = wait_for(
        lambda: [w for w in workers() if w["status"] == "stale"], timeout=30, what="stale"
    )
    assert gone["worker_id"] == live["worker_id"] and not gone["stopped"]


def test_a_worker_leaves_a_final_heartbeat(env):
    cli(env, "push", "-c", "true", check=True)
    cli(env, "worker", "--idle-timeout", "0.3s", check=True)
    (worker,) = json.loads(cli(env, "workers", "--json", check=True).stdout)
    assert worker["status"] == "stopped" and worker["tasks_done"] == 1


def test_prune(env):
    pushed = json_lines(cli(env, "push", "--json", "-c", "echo old", check=True).stdout)
    kept = cli(env, "ledger", "prune", "--json", check=True)
    assert json.loads(kept.stdout) == {"deleted": 0}
    # still queued: kept, whatever its age, unless asked
    pruned = cli(env, "ledger", "prune", "--older-than", "0.001s", "--json", check=True)
    assert json.loads(pruned.stdout) == {"deleted": 0}
    args = ("ledger", "prune", "--older-than", "0.001s", "--unfinished", "--json")
    assert json.loads(cli(env, *args, check=True).stdout) == {"deleted": 1}
    assert cli(env, "result", pushed[0]["id"]).returncode == 1


@pytest.mark.parametrize("tag", [None, "sync-run"])
def test_sync_push_many_result_waits(env, local_dir, tag):
    import ai4s_jobq

    result = ai4s_jobq.push_many(
        ["echo 1", "echo 2", "exit 1"], queue="local://cli", tag=tag, num_retries=0
    )
    assert result.pushed == 3 and (result.ids is None) == (tag is not None)
    cli(env, "worker", "-n", "3", "--idle-timeout", "0.5s")
    report = result.wait(timeout=30)
    assert (report.succeeded, report.dead_lettered, report.exit_code) == (2, 1, 1)


def test_an_interrupted_task_is_recorded_as_interrupted_not_failed(env):
    pushed = json_lines(cli(env, "push", "--json", "-c", "sleep 60", check=True).stdout)
    task_id = pushed[0]["id"]
    worker = start_worker(env, "--idle-timeout", "0", "--grace-period", "0.2s")

    def state() -> str:
        return json.loads(cli(env, "result", task_id, "--json", check=True).stdout)["state"]

    try:
        wait_for(lambda: state() == "running", timeout=60, what="the task running")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    record = json.loads(cli(env, "result", task_id, "--json", check=True).stdout)
    assert (record["state"], record["interruptions"], record["attempt"]) == ("interrupted", 1, 1)
    status = json.loads(cli(env, "status", "--json", check=True).stdout)
    assert status["counts"] == {"interrupted": 1} and status["remaining"] == 1


def test_the_worker_freezes_its_start_up_objects_before_the_first_task(env):
    """``jobq worker`` moves what it built at start-up out of the collector's way
    (ai4s_jobq/worker/heap.py): a task run by it sees a non-empty frozen generation."""
    pushed = cli(env, "push", "--json", "--format", "json", check=True, input="{}\n")
    (line,) = [x for x in json_lines(pushed.stdout) if "id" in x]
    worker = cli(env, "worker", "--proc", "sample_tasks:frozen_objects", "--idle-timeout", "1s")
    assert worker.returncode == 0, worker.stderr
    record = json.loads(cli(env, "result", line["id"], "--json", check=True).stdout)
    assert record["state"] == "succeeded"
    assert record["result"] > 10_000  # the package, click, the SDKs it imported


@pytest.mark.parametrize(
    "content, message",
    [
        (b"0123abcd\n\xff\xfe\n", "not UTF-8 text"),  # a traceback before
        (b"x" * (2 * 1024 * 1024) + b"\n", "line 1: longer than 1,048,576 characters"),
    ],
    ids=["not-utf8", "overlong"],
)
def test_wait_from_a_file_that_is_not_push_output_is_a_usage_error(
    local_dir, jobq, tmp_path, content, message
):
    path = tmp_path / "ids"
    path.write_bytes(content)
    result = jobq("wait", "--from", str(path), "--timeout", "1s")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
