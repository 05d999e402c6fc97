"""The jobq CLI end to end, as a user runs it (subprocess, real local backend)."""

from __future__ import annotations

import json

import pytest


def test_push_with_commands_prints_ids_and_duplicates(local_dir, jobq):
    result = jobq("push", "-c", "echo a", "-c", "echo a", "-c", "echo b", check=True)
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [status for _, status in lines] == ["pushed", "duplicate", "pushed"]
    assert lines[0][0] == lines[1][0]
    assert "pushed 2 new task(s), dropped 1 duplicate(s)" in result.stderr
    assert json.loads(jobq("size", "--json", check=True).stdout)["active"] == 2


def test_push_lines_with_a_malformed_json_line(local_dir, jobq):
    text = 'echo one\n\n{"cmd": "echo two"}\n{"cmd": oops}\n{"cmd": "echo five"\necho three\n'
    result = jobq("push", "--json", input=text)
    assert result.returncode == 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    by_line = {row["line"]: row for row in rows if "line" in row}
    assert {n: r["status"] for n, r in by_line.items()} == {
        1: "pushed",
        3: "pushed",
        4: "failed",
        5: "failed",
        6: "pushed",
    }
    assert "not valid JSON" in by_line[4]["error"] and "line 4" in by_line[4]["error"]
    assert "line 5" in by_line[5]["error"]
    assert rows[-1]["summary"]["pushed"] == 3 and rows[-1]["summary"]["failed"] == 2
    # Fix the bad lines and push the whole input again: only the fixed lines are new.
    fixed = text.replace("oops", '"echo four"').replace('five"\n', 'five"}\n')
    again = jobq("push", input=fixed, check=True)
    assert "pushed 2 new task(s), dropped 3 duplicate(s)" in again.stderr


def test_json_format_requires_objects(local_dir, jobq):
    result = jobq("push", "--format", "json", "--json", input='[1, 2]\n{"a": 1}\n')
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 1
    assert rows[0]["status"] == "failed" and "must be an object" in rows[0]["error"]
    assert rows[1]["status"] == "pushed"


def test_push_human_errors_name_the_line(local_dir, jobq):
    result = jobq("push", input='{"a": 1}\n{nope\n')
    assert result.returncode == 1
    assert "error: line 2: not valid JSON" in result.stderr
    assert "pushed 1 new task(s)" in result.stderr


def test_push_env_is_part_of_the_task(local_dir, jobq):
    a = jobq("push", "-c", "echo $X", "-e", "X=1", check=True).stdout.split()[0]
    b = jobq("push", "-c", "echo $X", "-e", "X=2", check=True).stdout.split()[0]
    assert a != b
    assert jobq("push", "-c", "echo $X", "-e", "nokey").returncode == 2


@pytest.mark.parametrize("value", ["0", "-1", "7x", "h", "1.5.2"])
def test_bad_dedup_window_is_a_usage_error(local_dir, jobq, value):
    result = jobq("push", "-c", "echo a", "--dedup-window", value)
    assert result.returncode == 2
    assert "--dedup-window" in result.stderr


@pytest.mark.parametrize(
    "value, seconds", [("7", 7 * 86400), ("12h", 43200), ("30m", 1800), ("2d", 172800)]
)
def test_dedup_window_units(local_dir, jobq, value, seconds):
    queue = f"local://w{seconds}"
    jobq("--queue", queue, "push", "-c", "echo a", "--dedup-window", value, check=True)
    report = json.loads(jobq("--queue", queue, "check", "--json", check=True).stdout)
    assert report["consistent"]
    from ai4s_jobq.broker_core import BrokerCore

    props = BrokerCore(local_dir / f"w{seconds}.sqlite3").get_queue(f"w{seconds}")
    assert props.duplicate_detection_window == seconds and props.requires_duplicate_detection


def test_worker_drains_and_pull_runs_one(local_dir, jobq):
    jobq(
        "push",
        "-c",
        "echo first",
        "-c",
        "echo second",
        "-c",
        "exit 4",
        "--num-retries",
        "0",
        check=True,
    )
    pulled = jobq("pull")
    assert pulled.returncode == 0 and "first" in pulled.stderr
    result = jobq("worker", "-n", "2", "--idle-timeout", "0.5")
    assert result.returncode == 0, result.stderr
    assert "second" in result.stderr and "dead-lettering" in result.stderr
    assert json.loads(jobq("size", "--json").stdout) == {
        "active": 0,
        "dead_letter": 1,
        "scheduled": 0,
    }
    empty = jobq("pull", "--wait", "0.2")
    assert empty.returncode == 0


def test_pull_exit_code_when_the_task_fails(local_dir, jobq):
    jobq("push", "-c", "exit 9", check=True)
    assert jobq("pull").returncode == 1


def test_peek_size_clear(local_dir, jobq):
    jobq("push", "-c", "echo a", "-c", "echo b", check=True)
    peeked = json.loads(jobq("peek", "--json", check=True).stdout)
    assert [p["args"]["cmd"] for p in peeked] == ["echo a", "echo b"]
    assert "echo a" in jobq("peek", "-n", "1", check=True).stdout
    assert jobq("clear").returncode == 2  # not interactive: needs --yes
    assert "deleted 2" in jobq("clear", "--yes", check=True).stdout
    assert json.loads(jobq("size", "--json").stdout)["active"] == 0


def test_dlq_list_names_a_python_error_once(local_dir, jobq):
    from conftest import worker_env

    env = worker_env(local_dir)
    jobq("push", "--num-retries", "0", env=env, input='{"message": "no input"}\n', check=True)
    jobq("worker", "--proc", "sample_tasks:fail", "--idle-timeout", "0.3", env=env)
    listed = jobq("dlq", "list", env=env, check=True).stdout
    assert "reason: RuntimeError: no input" in listed, listed  # not "RuntimeError: RuntimeError"


def test_dlq_list_requeue_purge(local_dir, jobq):
    jobq("push", "-c", "exit 3", "-c", "exit 5", "--num-retries", "0", check=True)
    jobq("worker", "--idle-timeout", "0.3")
    listed = json.loads(jobq("dlq", "list", "--json", check=True).stdout)
    assert sorted(d["args"]["cmd"] for d in listed) == ["exit 3", "exit 5"]
    assert all(d["reason"] == "NonZeroExit" for d in listed)
    target = next(d["id"] for d in listed if d["args"]["cmd"] == "exit 3")
    assert "requeued 1" in jobq("dlq", "requeue", target, check=True).stdout
    again = jobq("dlq", "requeue", target, "0" * 32)  # neither is dead-lettered now
    assert again.returncode == 1 and "requeued 0" in again.stdout
    assert "2 of the 2 task ID(s) given are not dead-lettered" in again.stderr
    assert json.loads(jobq("size", "--json").stdout)["active"] == 1
    (requeued,) = json.loads(jobq("peek", "--json").stdout)
    assert requeued["id"] == target and requeued["message_id"] != target
    assert requeued["delivery_count"] == 0  # a fresh set of attempts
    assert "purged 1" in jobq("dlq", "purge", "--yes", check=True).stdout


def test_id_command(local_dir, jobq):
    out = jobq("id", "-c", "echo hello", check=True).stdout
    assert "39efe3ac3ce0f83aa90079cc18e125fd" in out and '{"cmd":"echo hello"}' in out
    data = json.loads(jobq("id", '{"b": 1, "a": 2}', "--json", check=True).stdout)
    assert data["hashed"] == '{"a":2,"b":1}'
    sub = json.loads(
        jobq("id", '{"url": "u", "n": 1}', "--dedup-keys", "url", "--json", check=True).stdout
    )
    assert sub["hashed"] == '{"url":"u"}'
    pushed = jobq("push", "-c", "echo hello", check=True).stdout.split()[0]
    assert pushed == "39efe3ac3ce0f83aa90079cc18e125fd"


def test_check_strict_and_env_toggle(local_dir, jobq):
    jobq("push", "-c", "echo a", check=True)
    assert jobq("check", "--strict").returncode == 0
    off = jobq("check", "--strict", env={"JOBQ_DETERMINISTIC_IDS": "false"})
    assert off.returncode == 1 and "random IDs" in off.stdout
    mismatch = jobq("check", "--strict", "--dedup-window", "1d")
    assert mismatch.returncode == 1 and "window" in mismatch.stdout
    bad = jobq("push", "-c", "echo a", env={"JOBQ_DETERMINISTIC_IDS": "perhaps"})
    assert bad.returncode == 4 and "JOBQ_DETERMINISTIC_IDS" in bad.stderr


def test_startup_warning_on_push_with_random_ids(local_dir, jobq):
    jobq("push", "-c", "echo a", check=True)
    result = jobq("push", "-c", "echo a", env={"JOBQ_DETERMINISTIC_IDS": "0"}, check=True)
    assert "duplicate detection has no effect" in result.stderr


def test_bad_queue_specs_are_clear_errors(local_dir, jobq):
    result = jobq("--queue", "ftp://x/y", "size")
    assert result.returncode == 4 and "unknown scheme" in result.stderr
    assert "Traceback" not in result.stderr
    result = jobq("--queue", "justaname", "size")
    assert result.returncode == 4 and "local://justaname" in result.stderr


def test_worker_finds_proc_module_in_working_directory(local_dir, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    (tmp_path / "userjobs.py").write_text("def greet(name):\n    open(name, 'w').write('done')\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "ai4s_jobq_cli", "push"],
        input='{"name": "out.txt"}\n',
        text=True,
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.pop(0); from ai4s_jobq_cli.main import main; main()",
            "worker",
            "--proc",
            "userjobs:greet",
            "--idle-timeout",
            "0.3",
        ],
        text=True,
        cwd=tmp_path,
        env=env,
        capture_output=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.txt").read_text() == "done"
