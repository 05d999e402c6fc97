"""The local backend under hostile conditions: message bodies no decoder survives, a
queue name with a typo, a queue file we may only read, a damaged queue file."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sample_tasks
from conftest import jobq_cli
from test_hardening_inputs import HOSTILE_BODIES

from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.backends.base import OutgoingMessage
from ai4s_jobq.worker.processors import CallableProcessor, ShellProcessor


async def drain_hostile(q: JobQ, log: Path, bodies: dict[str, bytes]) -> None:
    """Every hostile body is dead-lettered as MalformedTask with a reason, and the task
    pushed after them still runs: the worker goes on.  Shared with the Storage and
    Service Bus tests (each sends the bodies its own raw way)."""
    await q.push({"log": str(log), "name": "after"})
    stats = await asyncio.wait_for(
        Worker(
            q.backend, CallableProcessor(sample_tasks.record), WorkerPolicy(idle_timeout=1.0)
        ).run(),
        timeout=120,
    )
    assert (stats.malformed, stats.succeeded) == (len(bodies), 1)
    assert "end after" in log.read_text()
    dead = await q.dlq_list(1000)
    assert len(dead) == len(bodies)
    for item in dead:
        assert item.reason == "MalformedTask" and item.description and item.task is None
    counts = await q.counts()
    assert (counts.active, counts.dead_letter) == (0, len(bodies))


async def test_hostile_bodies_are_dead_lettered_on_local(local_dir, tmp_path):
    async with JobQ.open("local://hostile") as q:
        await q.backend.push([OutgoingMessage(k, body) for k, body in HOSTILE_BODIES.items()])
        await drain_hostile(q, tmp_path / "log", HOSTILE_BODIES)


def test_peek_and_dlq_list_show_hostile_bodies_raw(local_dir, jobq):
    async def push_raw() -> None:
        async with JobQ.open("local://raw") as q:
            await q.backend.push([OutgoingMessage(k, body) for k, body in HOSTILE_BODIES.items()])

    asyncio.run(push_raw())
    for args in (("peek", "-n", "100"), ("peek", "-n", "100", "--json")):
        result = jobq("--queue", "local://raw", *args)
        assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert len(listed) == len(HOSTILE_BODIES)
    assert all("raw" in item and "args" not in item for item in listed)
    # and once dead-lettered, `dlq list` shows them the same way
    jobq("--queue", "local://raw", "worker", "--idle-timeout", "1", check=True)
    result = jobq("--queue", "local://raw", "dlq", "list", "--json")
    assert result.returncode == 0
    listed = json.loads(result.stdout)
    assert {item["reason"] for item in listed} == {"MalformedTask"}
    assert len(listed) == len(HOSTILE_BODIES)
    assert jobq("--queue", "local://raw", "dlq", "list").returncode == 0


# ---------------------------------------------------------------------- missing queues

READ_ONLY_COMMANDS = [
    ("size",),
    ("peek",),
    ("dlq", "list"),
    ("size", "--json"),
    # commands that read the ledger, which lives in the queue's file
    ("status",),
    ("status", "--json"),
    ("tasks",),
    ("tasks", "--json"),
    ("result", "0" * 32),
    ("wait", "--tag", "run", "--timeout", "30"),
    ("ledger", "prune", "--older-than", "1d"),
]


@pytest.mark.parametrize("command", READ_ONLY_COMMANDS, ids=" ".join)
def test_read_only_command_on_a_missing_queue_lists_the_real_ones(local_dir, jobq, command):
    jobq("--queue", "local://jobs", "push", "-c", "true", check=True)
    jobq("--queue", "local://other", "push", "-c", "true", check=True)
    before = sorted(os.listdir(local_dir))
    result = jobq("--queue", "local://jbos", *command)
    assert result.returncode == 4
    assert "'jbos' does not exist" in result.stderr
    assert "local://jobs" in result.stderr and "local://other" in result.stderr
    assert sorted(os.listdir(local_dir)) == before  # the typo created nothing


def test_check_on_a_missing_local_queue_creates_nothing(local_dir, jobq):
    result = jobq("--queue", "local://nothing", "check")
    assert result.returncode == 0 and "does not exist" in result.stdout
    assert not local_dir.exists() or not list(local_dir.iterdir())


def test_an_unusable_local_dir_is_a_configuration_error(tmp_path, jobq):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    env = {"JOBQ_LOCAL_DIR": str(not_a_dir / "sub")}
    for command in (("push", "-c", "true"), ("worker",), ("size",)):
        result = jobq(*command, env=env)
        assert result.returncode == 4 and "JOBQ_LOCAL_DIR" in result.stderr, result.stderr


def test_push_creates_the_file_whole(local_dir, jobq):
    jobq("--queue", "local://new", "push", "-c", "true", check=True)
    assert [p.name for p in local_dir.iterdir()] == ["new.sqlite3"]  # no temporary left


# ---------------------------------------------------------------------- read-only files


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A data directory another user can enter (pytest's tmp_path is private)."""
    directory = Path(tempfile.mkdtemp(prefix="jobq-ro-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        for path in [directory, *directory.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(directory)


def _as_unprivileged(func, *args):  # type: ignore[no-untyped-def]
    """Run ``func(*args)`` in a forked child that cannot write what it may not: as root
    (which ignores file modes) the child drops to nobody first.  Everything it needs
    is imported before the fork.  Returns what ``func`` returned, or the text of what
    it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        try:
            if os.getuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            result = json.dumps({"ok": func(*args)})
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
        os.write(write_end, result.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def _read_only_view(directory: str) -> dict:
    os.environ["JOBQ_LOCAL_DIR"] = directory

    async def main() -> dict:
        out: dict = {}
        async with JobQ.open("local://ro", check=False, create=False) as q:
            counts = await q.counts()
            out["counts"] = [counts.active, counts.dead_letter]
            out["peek"] = [t.task.args["cmd"] for t in await q.peek(10) if t.task]
            out["dlq"] = len(await q.dlq_list())
            out["check"] = [f.level for f in await q.check()]
            out["status"] = (await q.status()).counts
        try:
            async with JobQ.open("local://ro") as q:
                await q.push("echo refused")
        except Exception as exc:  # noqa: BLE001 - the expected refusal
            out["push"] = str(exc)
        return out

    return asyncio.run(main())


@pytest.mark.parametrize("what", ["file", "file and directory"])
def test_read_only_queue_file(shared_dir, monkeypatch, what):
    monkeypatch.setenv("JOBQ_LOCAL_DIR", str(shared_dir))

    async def fill() -> None:
        async with JobQ.open("local://ro") as q:
            await q.push("echo one")
            await q.push("echo two")

    asyncio.run(fill())
    for path in shared_dir.iterdir():  # the journal files were removed at close
        path.chmod(0o444)
    if what == "file and directory":
        shared_dir.chmod(0o555)
    before = {p.name: p.stat().st_mtime_ns for p in shared_dir.iterdir()}
    seen = _as_unprivileged(_read_only_view, str(shared_dir))
    assert "error" not in seen, seen["error"]
    view = seen["ok"]
    assert view["counts"] == [2, 0]
    assert view["peek"] == ["echo one", "echo two"]
    assert view["dlq"] == 0 and "warning" not in view["check"]
    assert view["status"] == {"queued": 2}  # the ledger, in the same file, reads too
    assert "read-only" in view["push"] and str(shared_dir) in view["push"]
    assert {p.name: p.stat().st_mtime_ns for p in shared_dir.iterdir()} == before


# ---------------------------------------------------------------------- damaged files


def _make_queue(local_dir: Path, name: str, tasks: int = 50) -> Path:
    async def fill() -> None:
        async with JobQ.open(f"local://{name}") as q:
            await q.push_many(f"echo {i} {'x' * 500}" for i in range(tasks))

    asyncio.run(fill())
    return local_dir / f"{name}.sqlite3"


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "not sqlite":
        path.write_bytes(b"this is a text file, not a queue\n" * 100)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "short header":
        path.write_bytes(data[:50])
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif how == "corrupt pages":
        page = int.from_bytes(data[16:18], "big")
        garbage = bytes((i * 7 + 3) % 256 for i in range(page))
        path.write_bytes(data[:page] + garbage * ((len(data) - page) // page))


DAMAGE = ["not sqlite", "empty", "short header", "truncated", "corrupt pages"]
ALL_COMMANDS = [
    ("size",),
    ("peek",),
    ("dlq", "list"),
    ("check",),
    ("push", "-c", "true"),
    ("worker", "--idle-timeout", "1"),
    ("pull",),
    ("clear", "--yes"),
    ("dlq", "purge", "--yes"),
    ("dlq", "requeue", "--all"),
    ("status",),
    ("tasks",),
]


def _refused_at_once(path: Path, command: tuple[str, ...]) -> None:
    damaged_bytes = path.read_bytes()
    started = time.monotonic()
    result = jobq_cli("--queue", f"local://{path.stem}", *command, timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 4, (command, result.stdout, result.stderr)
    assert str(path) in result.stderr and "damaged" in result.stderr, command
    assert "Traceback" not in result.stderr
    assert took < 15, (command, took)
    assert path.read_bytes() == damaged_bytes, command  # never "repaired" into empty


def test_every_command_refuses_a_damaged_queue_file_at_once(local_dir):
    path = _make_queue(local_dir, "hurt")
    _damage(path, "corrupt pages")
    for command in ALL_COMMANDS:
        _refused_at_once(path, command)


@pytest.mark.parametrize("how", DAMAGE)
def test_each_kind_of_damage_is_refused(local_dir, how):
    path = _make_queue(local_dir, "hurt")
    _damage(path, how)
    for command in (("size",), ("push", "-c", "true")):
        _refused_at_once(path, command)


def test_a_worker_stops_when_its_queue_file_is_damaged_under_it(local_dir, caplog):
    """Damage found mid-run (not at open) is permanent: the worker stops at once with
    exit code 4 and says why, instead of retrying the receive forever (idle timeout
    0: it would never stop)."""
    path = _make_queue(local_dir, "midrun", tasks=5)

    async def main() -> None:
        async with JobQ.open("local://midrun") as q:
            _damage(path, "corrupt pages")
            worker = Worker(q.backend, ShellProcessor(), WorkerPolicy(idle_timeout=0))
            with caplog.at_level(logging.ERROR, logger="ai4s_jobq.worker"):
                stats = await asyncio.wait_for(worker.run(), timeout=30)
            assert (stats.exit_code, stats.stop_reason) == (4, "configuration error")
            assert any("damaged" in r.getMessage() for r in caplog.records)

    asyncio.run(main())


def test_a_healthy_file_with_wal_in_use_is_not_taken_for_damaged(local_dir):
    """A reader opening while another connection holds the file open (WAL, pages
    not yet checkpointed) sees a consistent queue."""
    path = _make_queue(local_dir, "busy", tasks=10)
    writer = sqlite3.connect(path)
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("BEGIN")
    writer.execute("SELECT count(*) FROM messages").fetchone()
    try:
        result = jobq_cli("--queue", "local://busy", "size", "--json")
    finally:
        writer.rollback()
        writer.close()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["active"] == 10
    assert stat.S_IMODE(path.stat().st_mode) & 0o200  # still ours to write
