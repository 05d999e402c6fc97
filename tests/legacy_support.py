"""The original ai4s-jobq 3.13.1, installed only for the tests, to produce real messages.

It is never a dependency of jobq: the first test that needs it creates a venv in a
cache directory (``$JOBQ_TEST_CACHE``, else ``$XDG_CACHE_HOME/ai4s_jobq-tests``, else
``~/.cache/ai4s_jobq-tests``) and ``pip install``s it from PyPI there (about a
minute, once per machine); later runs reuse it.  ``JOBQ_TEST_AI4S_VENV`` points at
an existing venv with ai4s-jobq 3.13.1 instead.

Their producer then runs in that venv as a subprocess (their CLI, or a short script
using their ``Task`` encoder), so the messages on the queue are exactly the bytes
ai4s-jobq writes.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import venv
from pathlib import Path
from typing import Any

ORIGINAL = "ai4s-jobq==3.13.1"
VENV_ENV = "JOBQ_TEST_AI4S_VENV"
INSTALL_TIMEOUT = 900

#: what their REST producer sends as a message's Content-Type on Service Bus
REST_CONTENT_TYPE = "application/atom+xml;type=entry;charset=utf-8"

# Run in their venv: encode each task with their Task (as their JobQ.push does) and
# send it as their Service Bus producer does (servicebus_rest.py: the serialized task
# as the body, MessageId = task._id).  Their producer speaks the REST data plane with
# Azure AD; the emulator speaks AMQP, so the same body and properties go through the
# SDK installed with ai4s-jobq.
SB_PRODUCER = """
import json, sys
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from ai4s.jobq.entities import Task

cs, queue, content_type = sys.argv[1], sys.argv[2], sys.argv[3]
ids = []
with ServiceBusClient.from_connection_string(cs) as client, client.get_queue_sender(queue) as s:
    for line in sys.stdin:
        spec = json.loads(line)
        task = Task(kwargs=spec["kwargs"], num_retries=spec["num_retries"])
        s.send_messages(
            ServiceBusMessage(task.serialize(), message_id=task._id, content_type=content_type)
        )
        ids.append(task._id)
print(json.dumps(ids))
"""

# Run in their venv: push Python keyword-argument tasks with their JobQ API (Storage).
STORAGE_PRODUCER = """
import asyncio, json, sys
from ai4s.jobq import JobQ
from ai4s.jobq.entities import Task

async def main(cs, queue):
    ids = []
    async with JobQ.from_connection_string(queue, connection_string=cs) as q:
        for line in sys.stdin:
            spec = json.loads(line)
            await q.push(spec["kwargs"], num_retries=spec["num_retries"])
            # the ID push gave the task (its future only knows the Storage message ID)
            ids.append(Task(kwargs=spec["kwargs"], num_retries=spec["num_retries"])._id)
    print(json.dumps(ids))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def cache_dir() -> Path:
    explicit = os.environ.get("JOBQ_TEST_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ai4s_jobq-tests"


def ai4s_venv() -> Path:
    """The venv holding ai4s-jobq 3.13.1 (created and installed on first use)."""
    explicit = os.environ.get(VENV_ENV)
    if explicit:
        return Path(explicit)
    target = cache_dir() / "ai4s-jobq-3.13.1"
    done = target / ".installed"
    if done.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".ai4s-jobq.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once install it once
        if not done.exists():
            venv.create(target, with_pip=True, clear=True)
            subprocess.run(
                [str(target / "bin" / "python"), "-m", "pip", "install", "-q", ORIGINAL],
                check=True,
                timeout=INSTALL_TIMEOUT,
            )
            done.write_text(ORIGINAL + "\n")
    return target


def their_env(**extra: str) -> dict[str, str]:
    """An environment for their processes: none of jobq's venv leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBQ_", "PYTHON"))}
    env["JOBQ_COPILOT_SKILL"] = "0"  # their CLI would otherwise install a file in ~/.copilot
    env.update(extra)
    return env


def run_theirs(argv: list[str], *, input: str = "", env: dict[str, str]) -> str:
    result = subprocess.run(argv, input=input, capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0:
        raise AssertionError(f"{argv[:3]} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result.stdout


def send_to_servicebus(cs: str, queue: str, tasks: list[dict[str, Any]]) -> list[str]:
    """Encode ``tasks`` ({"kwargs": ..., "num_retries": N}) with their Task; their IDs."""
    python = str(ai4s_venv() / "bin" / "python")
    lines = "".join(json.dumps(t) + "\n" for t in tasks)
    out = run_theirs(
        [python, "-c", SB_PRODUCER, cs, queue, REST_CONTENT_TYPE], input=lines, env=their_env()
    )
    return list(json.loads(out.strip().splitlines()[-1]))


def push_to_storage(cs: str, queue: str, tasks: list[dict[str, Any]]) -> list[str]:
    """Push ``tasks`` with their ``JobQ.push`` to Storage Queue ``queue``; their IDs."""
    python = str(ai4s_venv() / "bin" / "python")
    lines = "".join(json.dumps(t) + "\n" for t in tasks)
    out = run_theirs([python, "-c", STORAGE_PRODUCER, cs, queue], input=lines, env=their_env())
    return list(json.loads(out.strip().splitlines()[-1]))


def their_cli_push(cs: str, spec: str, *args: str) -> None:
    """``ai4s-jobq SPEC push ARGS`` with their real CLI (connection string: Storage only)."""
    cli = str(ai4s_venv() / "bin" / "ai4s-jobq")
    run_theirs([cli, spec, "push", *args], env=their_env(JOBQ_CONNECTION_STRING=cs))
