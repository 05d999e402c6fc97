"""Preemption notices on the local backend, and the watcher's parsing of Scheduled
Events.  IMDS is faked (tests/imds_fake.py: the only fake -- IMDS exists only inside an
Azure VM); the queue, worker and tasks are real."""

from __future__ import annotations

import time

import pytest
import worker_scenarios
from imds_fake import FakeIMDS

from ai4s_jobq import JobQ
from ai4s_jobq.worker.preemption import (
    EvictionNotice,
    PreemptionPolicy,
    PreemptionWatcher,
    grace_for,
)


@pytest.fixture
def imds():
    with FakeIMDS() as fake:
        yield fake


async def test_preempt_notice_mid_task_local(local_dir, tmp_path, imds):
    async with JobQ.open("local://preempt") as q:
        await worker_scenarios.preempted_mid_task(q, imds, tmp_path)
    assert imds.missing_metadata_header == 0


async def test_acknowledges_only_when_told_and_after_giving_tasks_back(local_dir, tmp_path, imds):
    import asyncio

    from ai4s_jobq import Worker, WorkerPolicy
    from ai4s_jobq.worker.processors import ShellProcessor

    async with JobQ.open("local://ack") as q:
        await q.push(worker_scenarios.checkpointing_task(tmp_path))
        policy = WorkerPolicy(
            idle_timeout=0,
            preemption=PreemptionPolicy(
                mode="imds", endpoint=imds.endpoint, acknowledge=True, interval=0.1
            ),
        )
        worker = asyncio.ensure_future(Worker(q.backend, ShellProcessor(), policy).run())
        while not (tmp_path / "started").exists():
            await asyncio.sleep(0.02)
        imds.schedule("Terminate", in_seconds=30, event_id="T-9")
        stats = await asyncio.wait_for(worker, 20)
        assert stats.interrupted == 1
        assert imds.acks == ["T-9"]
        assert (await q.counts()).active == 1  # given back before the acknowledgement


async def _first_notice(policy: PreemptionPolicy, timeout: float = 5.0) -> EvictionNotice | None:
    import asyncio

    seen: list[EvictionNotice] = []
    watcher = PreemptionWatcher(policy, seen.append)
    await watcher.start()
    deadline = time.monotonic() + timeout
    while not seen and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await watcher.stop()
    return seen[0] if seen else None


async def test_events_for_other_vms_and_maintenance_are_ignored_by_default(imds):
    imds.schedule("Preempt", resources=["another-vm"], event_id="other")
    imds.schedule("Reboot", event_id="maintenance")
    policy = PreemptionPolicy(mode="imds", endpoint=imds.endpoint, interval=0.05)
    assert await _first_notice(policy, timeout=0.5) is None
    with_maintenance = PreemptionPolicy(
        mode="imds",
        endpoint=imds.endpoint,
        interval=0.05,
        event_types=("Preempt", "Terminate", "Reboot", "Redeploy"),
    )
    notice = await _first_notice(with_maintenance)
    assert notice is not None and notice.event_id == "maintenance"


async def test_auto_mode_stays_off_where_no_endpoint_answers():
    from conftest import free_port_url

    policy = PreemptionPolicy(mode="auto", endpoint=free_port_url(), interval=0.05)
    watcher = PreemptionWatcher(policy, lambda notice: None)
    await watcher.start()
    assert watcher._task is not None
    await watcher._task  # the probe fails and the watch ends by itself
    assert watcher.notice is None


async def test_auto_mode_sends_nothing_off_azure(tmp_path, monkeypatch):
    """With the default endpoint, ``auto`` asks IMDS only on an Azure VM (DMI asset
    tag); here a fake DMI file stands in for the VM's (no real link-local request is
    ever made by this test: the probe is replaced by a recorder)."""
    from ai4s_jobq.worker import preemption

    probes: list[str] = []
    monkeypatch.setattr(preemption.PreemptionWatcher, "_probe", lambda self: probes.append("x"))
    tag = tmp_path / "chassis_asset_tag"
    monkeypatch.setattr(preemption, "DMI_ASSET_TAG_FILE", str(tag))
    policy = PreemptionPolicy(mode="auto", endpoint=preemption.DEFAULT_ENDPOINT)
    for contents, expected in (("Not an Azure VM\n", 0), (preemption.AZURE_ASSET_TAG + "\n", 1)):
        tag.write_text(contents)
        watcher = PreemptionWatcher(policy, lambda notice: None)
        await watcher.start()
        assert watcher._task is not None
        await watcher._task
        assert len(probes) == expected


async def test_notice_deadline_bounds_the_grace(imds):
    imds.schedule("Preempt", in_seconds=20)
    notice = await _first_notice(PreemptionPolicy(mode="imds", endpoint=imds.endpoint))
    assert notice is not None and notice.event_type == "Preempt"
    left = notice.seconds_left()
    assert left is not None and 15 < left <= 20
    assert grace_for(notice, 300) == pytest.approx(left - 3, abs=1)
    assert grace_for(notice, 5) == 5


def test_cli_worker_reads_the_endpoint_from_the_environment(local_dir, tmp_path, imds):
    """The real `jobq worker` (default --preemption auto) finds the fake IMDS through
    JOBQ_IMDS_ENDPOINT, gives the task back on a Terminate notice and exits 0."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, jobq_cli, wait_for, worker_env

    env = {**os.environ, **worker_env(local_dir), "JOBQ_IMDS_ENDPOINT": imds.endpoint}
    jobq_cli("push", "-c", worker_scenarios.checkpointing_task(tmp_path), env=env, check=True)
    worker = subprocess.Popen(
        [sys.executable, "-m", "ai4s_jobq_cli", "worker", "--idle-timeout", "0"],
        env=env,
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for((tmp_path / "started").exists, what="the task to start")
        wait_for(lambda: imds.requests >= 2, what="the worker to poll IMDS")
        imds.schedule("Terminate", in_seconds=60)
        _, err = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, err
    assert "worker stopped (preempted (Terminate))" in err
    assert (tmp_path / "ckpt").exists()
    assert imds.acks == []


@pytest.mark.parametrize(
    "fields", [{"mode": "bogus"}, {"mode": "IMDS"}, {"interval": 0}, {"interval": float("nan")}]
)
def test_a_preemption_policy_the_watcher_cannot_follow_is_refused(fields):
    """An unknown mode was watched as if it were "imds"."""
    with pytest.raises(ValueError, match="preemption"):
        PreemptionPolicy(**fields)


@pytest.mark.parametrize("endpoint", ["not a url", "ftp://169.254.169.254", "169.254.169.254"])
def test_an_imds_endpoint_that_is_not_a_url_stops_the_worker_at_its_start(
    local_dir, jobq, endpoint
):
    """It was polled as it was, with warnings that did not name the variable."""
    env = {"JOBQ_IMDS_ENDPOINT": endpoint}
    result = jobq("worker", "--preemption", "auto", "--idle-timeout", "1", env=env)
    assert result.returncode == 4, result.stderr
    assert "JOBQ_IMDS_ENDPOINT" in result.stderr and "Traceback" not in result.stderr
    off = jobq("worker", "--preemption", "off", "--idle-timeout", "0.2", env=env)
    assert off.returncode == 0, off.stderr  # not watched: not read
