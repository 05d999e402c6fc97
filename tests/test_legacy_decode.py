"""Decoding ai4s-jobq 3.x envelopes: the cases their encoder rarely or never writes.

Every envelope here has the exact shape ``ai4s.jobq.entities.Task.serialize`` writes
(tests/test_legacy_ai4s_jobq.py drains messages written by ai4s-jobq itself); these
tests vary one field at a time to pin down what jobq does with each.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.backends.base import OutgoingMessage
from ai4s_jobq.task import MalformedTaskError, Task
from ai4s_jobq.worker.processors import ShellProcessor


def envelope(kwargs: Any, *, version: int = 1, num_retries: int = 0, **extra: Any) -> bytes:
    """Their serialization: kwargs JSON-encoded into a string inside the envelope."""
    fields = {
        "version": version,
        "reply_requested": False,
        "kwargs": kwargs if isinstance(kwargs, str) else json.dumps(kwargs),
        "num_retries": num_retries,
        "id": "0123456789abcdef0123456789abcdef",
        **extra,
    }
    if version == 0:
        del fields["reply_requested"]
    return json.dumps(fields).encode()


def test_python_task_keeps_its_kwargs_id_and_budget():
    task = Task.from_body(envelope({"x": 1, "cmd": "not a shell task", "y": [1]}, num_retries=4))
    assert task.id == "0123456789abcdef0123456789abcdef"
    assert task.args == {"x": 1, "cmd": "not a shell task", "y": [1]}  # not wrapped
    assert task.num_retries == 4
    assert task.extra["legacy"]["format"] == "ai4s-jobq"


def test_version_0_has_no_reply_field():
    assert Task.from_body(envelope({"a": 1}, version=0)).args == {"a": 1}


def test_shell_task_runs_the_original_command_in_bash(monkeypatch):
    monkeypatch.delenv("JOBQ_USE_LOGIN_SHELL", raising=False)
    cmd = '[[ -n $BASH_VERSION ]] && echo "it\'s bash: $X"'
    task = Task.from_body(envelope({"cmd": cmd, "env": {"X": 5}, "bg_dirsync_to": None}))
    assert task.args["env"] == {"PYTHONUNBUFFERED": "1", "X": "5"}
    assert task.extra["legacy"]["cmd"] == cmd
    assert "bg_dirsync_to" not in task.args
    out = subprocess.run(
        ["/bin/sh", "-c", task.args["cmd"]],
        capture_output=True,
        text=True,
        env={"X": "5", "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout == "it's bash: 5\n"


def test_login_shell_setting_of_the_worker_is_honoured(monkeypatch):
    monkeypatch.setenv("JOBQ_USE_LOGIN_SHELL", "true")
    assert Task.from_body(envelope({"cmd": "true"})).args["cmd"].startswith("exec bash --login")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (envelope({"cmd": "make", "bg_dirsync_to": "/out"}), "bg_dirsync_to"),
        (envelope("{not json"), "'kwargs' is not JSON"),
        (envelope("[1, 2]"), "not a JSON object"),
        (envelope({"a": 1}, num_retries=-1), "num_retries"),
        (envelope({"a": 1}, version=7), "version 7"),
        (envelope({"a": 1}, id=None), "no 'id'"),
        (envelope({"cmd": "x", "env": ["A=1"]}), "'env' is not an object"),
        (envelope("[" * 100_000 + "]" * 100_000), "'kwargs' is not JSON"),
    ],
)
def test_unusable_envelopes_are_malformed_tasks_with_the_reason(body, reason):
    with pytest.raises(MalformedTaskError, match=reason):
        Task.from_body(body)


def test_our_own_envelope_is_not_taken_for_theirs():
    ours = Task(id="abc", args={"kwargs": "x", "version": 1})
    assert Task.from_body(ours.to_body()) == ours


async def test_worker_dead_letters_a_task_it_cannot_honour_and_goes_on(local_dir, tmp_path):
    out = tmp_path / "out"
    async with JobQ.open("local://legacy") as q:
        await q.backend.push(
            [
                OutgoingMessage("a", envelope({"cmd": "touch never", "bg_dirsync_to": "/x"})),
                OutgoingMessage("b", envelope({"cmd": f"echo ran >> {out}", "env": {}})),
            ]
        )
        stats = await Worker(q.backend, ShellProcessor(), WorkerPolicy(idle_timeout=0.5)).run()
        (dead,) = await q.dlq_list()
    assert stats.succeeded == 1
    assert dead.reason == "MalformedTask" and "bg_dirsync_to" in (dead.description or "")
    assert out.read_text() == "ran\n"
