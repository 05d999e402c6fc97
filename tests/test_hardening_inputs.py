"""Hostile input that needs no broker: message bodies no decoder survives, absurd
durations and counts, queue names each backend refuses, global options after the
subcommand, the CLI's module layout."""

from __future__ import annotations

import ast
import io
import json
import math
import os
from datetime import timedelta
from pathlib import Path

import pytest
from ai4s_jobq_cli.lines import MAX_LINE_CHARS, numbered_lines
from conftest import ROOT

from ai4s_jobq.durations import MAX_DURATION, DurationError, check_interval, parse_duration
from ai4s_jobq.queue_names import QueueNameError, validate_queue_name
from ai4s_jobq.spec import SpecError, local_dir, parse_spec
from ai4s_jobq.task import MAX_NUM_RETRIES, MalformedTaskError, Task, make_task

# Bodies that are not tasks, one per way of failing.  The first two escaped
# Task.from_body before (RecursionError, and the ValueError of int() past Python's
# digit limit): the worker's handler never settled them and they came back forever.
HOSTILE_BODIES = {
    "deep nesting": b'{"id":"x","args":{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}}",
    "huge integer": b'{"id":"x","args":{"n":' + b"9" * 5000 + b"}}",
    "huge num_retries": b'{"id":"x","args":{},"num_retries":' + b"9" * 40 + b"}",
    "not UTF-8": b"\xff\xfe\x00junk",
    "not JSON": b"definitely not a task",
    "a JSON list": b"[1, 2, 3]",
    "id not a string": b'{"id": 5, "args": {}}',
    "args not an object": b'{"id": "x", "args": [1]}',
    "num_retries a float": b'{"id": "x", "args": {}, "num_retries": 1.5}',
    "empty": b"",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_BODIES))
def test_every_undecodable_body_is_a_malformed_task(kind):
    with pytest.raises(MalformedTaskError) as caught:
        Task.from_body(HOSTILE_BODIES[kind])
    assert str(caught.value)  # a reason for the dead-letter description


def test_a_good_body_still_decodes():
    task = make_task({"x": 1})
    assert Task.from_body(task.to_body()) == task


def test_num_retries_is_bounded_when_pushing_too():
    with pytest.raises(ValueError, match="num_retries"):
        make_task({"x": 1}, num_retries=MAX_NUM_RETRIES + 1)


def test_push_reports_hostile_lines_and_pushes_the_rest(local_dir, jobq):
    lines = [
        '{"a":' + "[" * 100_000 + "]" * 100_000 + "}",  # the decoder's recursion
        '{"n":' + "9" * 5000 + "}",  # past int()'s digit limit
        '{"deep":' + "[" * 900 + "]" * 900 + "}",  # deep, but decodes and encodes: a task
        '{"x": NaN}',
        "echo fine",
    ]
    result = jobq("push", input="\n".join(lines) + "\n")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    for number in (1, 2, 4):
        assert f"line {number}:" in result.stderr
    assert "line 3:" not in result.stderr
    assert "pushed 2 new" in result.stderr
    deep = jobq("id", '{"a":' + "[" * 5000 + "]" * 5000 + "}")
    assert deep.returncode == 2 and "Traceback" not in deep.stderr


def test_an_overlong_line_is_skipped_without_reading_it_whole():
    stream = io.StringIO("first\n" + "x" * 25 + "\nafter\n" + "y" * 40)
    expected = [(1, "first\n"), (2, None), (3, "after\n"), (4, None)]
    assert list(numbered_lines(stream, limit=10)) == expected
    assert list(numbered_lines(io.StringIO("exactly10!\nend"), limit=10)) == [
        (1, "exactly10!\n"),
        (2, "end"),
    ]


def test_push_of_a_line_longer_than_any_message_reports_it_and_pushes_the_rest(
    local_dir, jobq, tmp_path
):
    """A file with no newline (a JSON array on one line, /dev/zero) was read whole
    into memory: a MemoryError, or the kernel's OOM killer."""
    path = tmp_path / "tasks.txt"
    with open(path, "w") as file:
        file.write("echo first\n")
        file.write("x" * (MAX_LINE_CHARS + 5))
        file.write("\necho after\n")
    result = jobq("push", str(path))
    assert result.returncode == 1, result.stderr
    assert f"line 2: longer than {MAX_LINE_CHARS:,} characters" in result.stderr
    assert "pushed 2 new" in result.stderr and "rejected 1" in result.stderr


def test_a_line_that_is_not_utf8_is_reported_and_the_rest_pushed(local_dir):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "ai4s_jobq_cli", "push"],
        input=b"echo ok\n\xff\xfe latin-1 bytes\necho ok2\n",
        capture_output=True,
        env={**os.environ, "JOBQ_LOCAL_DIR": str(local_dir)},
        timeout=60,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in stderr, stderr
    assert "line 2: not UTF-8 text (byte 0xff at column 1)" in stderr
    assert "pushed 2 new" in stderr


@pytest.mark.parametrize("value", ["0.0001", "inf", "nan", "1e300"])
def test_a_heartbeat_interval_out_of_range_stops_the_worker_at_its_start(local_dir, jobq, value):
    """0.0001 s would have the worker write its heartbeat ten thousand times a second."""
    result = jobq("worker", "--idle-timeout", "30", env={"JOBQ_HEARTBEAT_SECONDS": value})
    assert result.returncode == 4 and "JOBQ_HEARTBEAT_SECONDS" in result.stderr, result.stderr


@pytest.mark.parametrize("value", ["1e-9", "inf", "nan", "-1", "x"])
def test_a_depth_interval_out_of_range_is_a_warning_and_the_default(monkeypatch, value):
    from ai4s_jobq.telemetry.worker_hook import DEFAULT_DEPTH_INTERVAL, depth_interval_from_env

    monkeypatch.setenv("JOBQ_TELEMETRY_DEPTH_INTERVAL", value)
    assert depth_interval_from_env() == DEFAULT_DEPTH_INTERVAL  # 1e-9 was a busy loop
    monkeypatch.setenv("JOBQ_TELEMETRY_DEPTH_INTERVAL", "0")
    assert depth_interval_from_env() == 0  # never


# ---------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    "text",
    ["99999999999", "99999999999d", "1e999", "-5", "0", "nan", "inf", "9" * 400 + "s", "3651d"],
)
def test_absurd_durations_are_refused(text):
    with pytest.raises(DurationError):
        parse_duration(text)


@pytest.mark.parametrize("seconds", [math.inf, math.nan, 0.0, -1.0, 86_401.0, 0.1])
def test_intervals_out_of_range_are_refused_by_the_library_too(seconds):
    with pytest.raises(ValueError, match="refresh_seconds must be from 0.2 to 86400"):
        check_interval("refresh_seconds", seconds, 0.2)
    assert check_interval("refresh_seconds", 0.2, 0.2) == 0.2
    assert check_interval("refresh_seconds", 86_400.0) == 86_400.0


def test_durations_below_the_bound_still_parse():
    assert parse_duration("3650") == MAX_DURATION
    assert parse_duration("1d12h") == timedelta(hours=36)
    assert parse_duration("90", bare_unit="s") == timedelta(seconds=90)
    with pytest.raises(DurationError, match="at most 5m"):
        parse_duration("6m", maximum=timedelta(minutes=5))
    with pytest.raises(DurationError):
        parse_duration(10**400)  # an int too large for a float


USAGE_ERRORS = [
    ("push", "--dedup-window", "99999999999", "-c", "true"),
    ("push", "--dedup-window", "-3", "-c", "true"),
    ("push", "--lock-duration", "99999999999", "-c", "true"),
    ("push", "--lock-duration", "8d", "-c", "true"),
    ("push", "--num-retries", "99999999999", "-c", "true"),
    ("push", "--num-retries", "-1", "-c", "true"),
    ("worker", "--idle-timeout", "99999999999"),
    ("worker", "--idle-timeout", "1e999"),
    ("worker", "--time-limit", "99999999999"),
    ("worker", "--grace-period", "-1"),
    ("worker", "-n", "99999999999"),
    ("worker", "-n", "0"),
    ("worker", "--max-consecutive-failures", "99999999999"),
    ("pull", "--wait", "99999999999"),
    ("peek", "-n", "99999999999999999999999"),
    ("dlq", "list", "-n", "99999999999"),
    ("tasks", "-n", "99999999999999999999999"),  # was an OverflowError from SQLite
    # an unset variable: the IDs were silently made from every argument
    ("push", "--dedup-keys", "", "-c", "true"),
    ("push", "--dedup-keys", ",,", "-c", "true"),
    ("id", "--dedup-keys", "", "-c", "true"),
    ("check", "--dedup-window", "99999999999"),
    # a float range lets nan through (it compares false with both bounds), and an
    # infinite refresh made every dashboard page a server error
    ("dashboard", "--refresh", "inf"),
    ("dashboard", "--refresh", "nan"),
    ("dashboard", "--refresh", "1e308"),
    ("dashboard", "--sample", "nan"),
    ("top", "--interval", "inf"),
    ("top", "--interval", "nan"),
    ("migrate", "--to", "local://other", "--wait", "nan"),
]


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=" ".join)
def test_absurd_option_values_are_usage_errors(local_dir, jobq, args):
    result = jobq(*args, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "Invalid value" in result.stderr
    assert not local_dir.exists()  # refused before anything was touched


@pytest.mark.parametrize("command", ["", "  "])
def test_an_empty_command_is_a_usage_error_not_an_empty_push(local_dir, jobq, command):
    result = jobq("push", "-c", "echo first", "-c", command)
    assert result.returncode == 2, result.stderr
    assert "-c got an empty command" in result.stderr
    assert not local_dir.exists()  # nothing pushed, not even the good one


def test_push_timeout_without_wait_is_a_usage_error(local_dir, jobq):
    """It was silently ignored: the user expected push to wait."""
    result = jobq("push", "--timeout", "5s", "-c", "true")
    assert result.returncode == 2 and "--timeout is for --wait" in result.stderr
    assert not local_dir.exists()


def test_dedup_window_from_the_environment_is_bounded_too(local_dir, jobq):
    result = jobq("push", "-c", "true", env={"JOBQ_DEDUP_WINDOW": "99999999999"})
    assert result.returncode == 4 and "too long" in result.stderr
    assert "JOBQ_DEDUP_WINDOW" in result.stderr  # where the bad value came from
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["abc", "-3"])
def test_a_bad_ledger_retention_stops_the_worker_at_its_start(local_dir, jobq, value):
    """Read when the worker starts, not a minute in when it first prunes (where it
    was only a warning)."""
    jobq("push", "-c", "true", check=True)
    result = jobq("worker", "--idle-timeout", "30", env={"JOBQ_LEDGER_RETENTION": value})
    assert result.returncode == 4, result.stderr
    assert "JOBQ_LEDGER_RETENTION" in result.stderr and "Traceback" not in result.stderr
    off = jobq("worker", "--idle-timeout", "0.2", env={"JOBQ_LEDGER_RETENTION": "0"})
    assert off.returncode == 0 and "WARNING" not in off.stderr  # 0: no pruning, no fuss


# ---------------------------------------------------------------------- queue names

VALID = {
    "servicebus": ["q", "Jobs", "a.b-c_d", "team/jobs/gpu", "x" * 260],
    "storage": ["abc", "my-queue-1", "x" * 56],
    "local": ["default", "A.b_c-1", "x" * 128],
}
INVALID = {
    "servicebus": ["", "/jobs", "jobs/", "a//b", "a b", "a@b", "q?x", "a#b", "x" * 261, "$dlq"],
    "storage": [
        "ab",
        "Jobs",
        "-jobs",
        "jobs-",
        "a--b",
        "a_b",
        "a.b",
        "x" * 57,  # its NAME-failed would not fit Azure's 63
        "jobs-failed",  # reserved: the dead letters of queue "jobs"
    ],
    "local": ["", ".hidden", "a/b", "a b", "x" * 129, "../up"],
}


@pytest.mark.parametrize(
    "kind,name", [(k, n) for k, names in VALID.items() for n in names], ids=str
)
def test_valid_queue_names(kind, name):
    assert validate_queue_name(kind, name) == name


@pytest.mark.parametrize(
    "kind,name", [(k, n) for k, names in INVALID.items() for n in names], ids=str
)
def test_invalid_queue_names(kind, name):
    with pytest.raises(QueueNameError):
        validate_queue_name(kind, name)


def test_reserved_storage_name_says_whose_dead_letters_it_holds():
    with pytest.raises(QueueNameError, match="dead letters of queue 'jobs'"):
        validate_queue_name("storage", "jobs-failed")


def test_the_local_directory_is_always_absolute(monkeypatch, tmp_path):
    """A relative JOBQ_LOCAL_DIR was used, and printed, as given: a worker started in
    another directory drained another queue, and the messages did not show it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JOBQ_LOCAL_DIR", "relative/dir")
    assert local_dir() == tmp_path / "relative" / "dir"
    monkeypatch.delenv("JOBQ_LOCAL_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", "not/absolute")  # ignored, as XDG says
    assert local_dir() == tmp_path / "home" / ".local" / "share" / "ai4s_jobq"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert local_dir() == tmp_path / "data" / "ai4s_jobq"


def test_specs_are_validated_per_backend():
    assert parse_spec("sb://ns/team/jobs").queue == "team/jobs"
    assert parse_spec("sb://ns/Jobs").queue == "Jobs"
    assert parse_spec("acct/jobs").queue == "jobs"
    for bad in ("acct/Jobs", "acct/jobs-failed", "sb://ns/a//b", "local://a b", "acct/ab"):
        with pytest.raises(SpecError):
            parse_spec(bad)
    cs = "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=eA==;EndpointSuffix=x"
    with pytest.raises(SpecError, match="Storage queue name"):
        parse_spec("My_Queue", cs)
    for not_text in (123, Path("local://x"), b"local://x"):  # an AttributeError before
        with pytest.raises(SpecError, match="a queue spec is a string"):
            parse_spec(not_text)  # type: ignore[arg-type]


def test_a_bad_queue_name_is_refused_before_any_call(jobq):
    # The account does not exist: a call would hang on DNS or fail differently.
    result = jobq("--queue", "nosuchaccount0/jobs-failed", "size", timeout=30)
    assert result.returncode == 4 and "reserved" in result.stderr


# ---------------------------------------------------------------------- CLI layout


def _subcommands():
    from ai4s_jobq_cli.main import cli

    out = []
    for name, command in cli.commands.items():
        subs = getattr(command, "commands", None)
        if subs:
            out += [(name, sub) for sub in subs]
        else:
            out.append((name,))
    return out


@pytest.mark.parametrize("path", _subcommands(), ids=" ".join)
def test_global_options_are_accepted_after_every_subcommand(path):
    from ai4s_jobq_cli.main import cli
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, [*path, "--queue", "local://x", "-v", "--help"])
    assert result.exit_code == 0, result.output
    assert "--queue" in result.output and "--conn-str" in result.output


def test_queue_after_the_subcommand_is_used(local_dir, jobq):
    jobq("push", "--queue", "local://after", "-c", "echo a", check=True)
    jobq("--queue", "local://before", "push", "-c", "echo b", "-c", "echo c", check=True)
    assert sorted(p.name for p in local_dir.glob("*.sqlite3")) == [
        "after.sqlite3",
        "before.sqlite3",
    ]
    # after the subcommand wins over before it (and over JOBQ_QUEUE)
    result = jobq(
        "--queue",
        "local://before",
        "size",
        "--json",
        "--queue",
        "local://after",
        env={"JOBQ_QUEUE": "local://nope"},
    )
    assert json.loads(result.stdout)["active"] == 1
    result = jobq("dlq", "list", "--json", "--queue", "local://before")
    assert result.returncode == 0 and json.loads(result.stdout) == []


def test_no_cli_module_imports_main():
    """main imports the command modules: one importing main back is a circle."""
    for path in (ROOT / "cli").glob("*.py"):
        if path.name in ("main.py", "__main__.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level and node.module == "main":
                raise AssertionError(f"{path.name} imports .main")


def test_emulator_without_its_extra_says_what_to_install(monkeypatch):
    """Fake only the missing extra (proton absent); the message must say what building
    python-qpid-proton needs."""
    import builtins

    from ai4s_jobq_cli.emulator_cmd import emulator
    from click.testing import CliRunner

    real_import = builtins.__import__

    def no_proton(name, *args, **kwargs):
        if name.startswith("ai4s_jobq.emulator") or name.startswith("proton"):
            raise ImportError("No module named 'proton'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_proton)
    result = CliRunner().invoke(emulator, [])
    assert result.exit_code != 0
    assert "ai4s_jobq[emulator]" in result.output
    for needed in ("build-essential", "python3-dev", "libssl-dev"):
        assert needed in result.output


def test_readme_quickstart_says_how_to_get_the_emulator():
    text = (ROOT / "README.md").read_text()
    assert "ai4s_jobq[emulator]" in text
    assert "libssl-dev" in text
