"""``JOBQ_LOCAL_DURABILITY``: the setting reaches SQLite's connections, bad values are a
clear configuration error (``ai4s_jobq/backends/durability.py``)."""

from __future__ import annotations

import threading

import pytest

from ai4s_jobq import JobQ
from ai4s_jobq.backends.base import QueueSettings
from ai4s_jobq.backends.local import LocalBackend
from ai4s_jobq.broker_core import BrokerCore
from ai4s_jobq.ids import ConfigError

NORMAL, FULL = 1, 2  # what PRAGMA synchronous reads back


def synchronous_of(backend) -> int:
    return backend.core._conn().execute("PRAGMA synchronous").fetchone()[0]


async def test_default_is_normal(local_dir, monkeypatch):
    monkeypatch.delenv("JOBQ_LOCAL_DURABILITY", raising=False)
    async with JobQ.open("local://d") as q:
        await q.push("echo hi")
        assert q.backend.durability == "normal"
        assert synchronous_of(q.backend) == NORMAL
        assert q.ledger is not None
        await q.ledger.open()
        assert q.ledger._conn.execute("PRAGMA synchronous").fetchone()[0] == NORMAL


@pytest.mark.parametrize("value", ["full", "FULL", " Full "])
async def test_full_flushes_every_commit(local_dir, monkeypatch, value):
    monkeypatch.setenv("JOBQ_LOCAL_DURABILITY", value)
    async with JobQ.open("local://f") as q:
        await q.push("echo hi")
        assert synchronous_of(q.backend) == FULL
        # Every connection of the core (one per thread) gets it, not just the first.
        other: list[int] = []
        thread = threading.Thread(target=lambda: other.append(synchronous_of(q.backend)))
        thread.start()
        thread.join()
        assert other == [FULL]
        assert (await q.counts()).active == 1
        # The outcome ledger in the same file is flushed as hard as the queue.
        assert q.ledger is not None
        await q.ledger.open()
        assert q.ledger._conn.execute("PRAGMA synchronous").fetchone()[0] == FULL


async def test_explicit_argument_wins_over_the_environment(local_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("JOBQ_LOCAL_DURABILITY", "full")
    backend = LocalBackend(tmp_path / "q.sqlite3", "q", durability="normal")
    await backend.open()
    try:
        await backend.ensure_queue(QueueSettings())  # opening alone creates no file
        assert synchronous_of(backend) == NORMAL
    finally:
        await backend.close()


@pytest.mark.parametrize("value", ["fast", "off", "2", "extra"])
async def test_a_bad_value_is_a_configuration_error_before_opening(local_dir, monkeypatch, value):
    monkeypatch.setenv("JOBQ_LOCAL_DURABILITY", value)
    with pytest.raises(ConfigError) as caught:
        async with JobQ.open("local://bad"):
            pass
    text = str(caught.value)
    assert "JOBQ_LOCAL_DURABILITY" in text and repr(value) in text
    assert "normal" in text and "full" in text
    assert not (local_dir / "bad.sqlite3").exists()


def test_the_cli_reports_a_bad_value_with_exit_code_4(local_dir, jobq):
    result = jobq(
        "--queue", "local://cli", "push", "-c", "echo hi", env={"JOBQ_LOCAL_DURABILITY": "max"}
    )
    assert result.returncode == 4, result.stderr
    assert "JOBQ_LOCAL_DURABILITY='max'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_core_rejects_an_unknown_synchronous_setting(tmp_path):
    with pytest.raises(ValueError, match="NORMAL or FULL"):
        BrokerCore(tmp_path / "x.sqlite3", synchronous="OFF")
