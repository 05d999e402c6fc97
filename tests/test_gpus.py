"""GPU slots.  There is no GPU here: discovery runs a fake ``nvidia-smi`` script put on
PATH (printing what the real ``nvidia-smi -L`` prints); everything else is real (local
queue, worker loop, subprocesses, pool processes)."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import ROOT, worker_env

import ai4s_jobq
from ai4s_jobq import JobQ, Worker, WorkerPolicy
from ai4s_jobq.task import make_task
from ai4s_jobq.worker.build import ProcessorOptions, build_processor
from ai4s_jobq.worker.gpus import GpuConfigError, GpuSlots, gpu_groups, parse_gpu_list
from ai4s_jobq.worker.processors import CallableProcessor, started

SMI_LINES = ["GPU {i}: NVIDIA A100-SXM4-80GB (UUID: GPU-4d1b2c3a-0000-0000-0000-00000000000{i})"]


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    """``nvidia-smi`` on PATH that lists N GPUs (no GPU exists on this machine)."""

    def install(count: int) -> Path:
        bindir = tmp_path / "fake-bin"
        bindir.mkdir(exist_ok=True)
        script = bindir / "nvidia-smi"
        lines = "\n".join(SMI_LINES[0].format(i=i) for i in range(count))
        script.write_text(f'#!/bin/sh\n[ "$1" = "-L" ] || exit 9\ncat <<EOF\n{lines}\nEOF\n')
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        return bindir

    return install


def test_gpu_lists():
    assert parse_gpu_list("0-3") == ["0", "1", "2", "3"]
    assert parse_gpu_list(" 4, 6 ,") == ["4", "6"]
    assert parse_gpu_list("GPU-ab12,MIG-cd-34") == ["GPU-ab12", "MIG-cd-34"]
    with pytest.raises(GpuConfigError, match="listed twice: 1"):
        parse_gpu_list("0,1,1")
    with pytest.raises(GpuConfigError, match="backwards"):
        parse_gpu_list("3-1")
    # a typo'd range: parsing 0-99999 spun for minutes (a quadratic duplicate check)
    # and 0-999999999 would have filled memory
    with pytest.raises(GpuConfigError, match="has over 1024 GPUs"):
        parse_gpu_list("0-999999999")
    with pytest.raises(GpuConfigError, match="more than 1024 GPUs"):
        parse_gpu_list(",".join(f"GPU-{i}" for i in range(1025)))
    assert len(parse_gpu_list("0-1023")) == 1024
    with pytest.raises(GpuConfigError, match="listed twice: 5"):
        parse_gpu_list("0-1000,5")
    assert gpu_groups("0-7", 2) == [("0", "1"), ("2", "3"), ("4", "5"), ("6", "7")]
    assert gpu_groups("0-4", 2) == [("0", "1"), ("2", "3")]  # GPU 4 unused
    assert gpu_groups("0-3", 1, slots=2) == [("0",), ("1",)]
    with pytest.raises(GpuConfigError, match="use -n 2 or fewer"):
        gpu_groups("0-3", 2, slots=3)
    with pytest.raises(GpuConfigError, match="needs 4 GPUs; found 2"):
        gpu_groups("0,1", 4)


def test_auto_discovery_uses_nvidia_smi_or_cuda_visible_devices(fake_smi, monkeypatch):
    fake_smi(4)
    assert gpu_groups("auto", 2) == [("0", "1"), ("2", "3")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # the scheduler's allocation wins
    assert gpu_groups("auto") == [("2",), ("3",)]


def test_auto_without_gpus_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi; pynvml is not installed
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(GpuConfigError, match="found no GPUs"):
        gpu_groups("auto")


def intervals_overlap(log: Path) -> dict[str, int]:
    """Per GPU, how many pairs of task intervals on it overlap (must be none)."""
    per_gpu: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for line in log.read_text().splitlines():
        gpus, start, end = line.split()
        for gpu in gpus.split(","):
            per_gpu[gpu].append((float(start), float(end)))
    clashes = {}
    for gpu, spans in per_gpu.items():
        spans.sort()
        clashes[gpu] = sum(1 for a, b in zip(spans, spans[1:]) if b[0] < a[1])
    return clashes


async def test_no_gpu_is_shared_under_churn(local_dir, tmp_path, monkeypatch):
    """300 short tasks, 4 slots of 2 GPUs each: every GPU's task intervals are disjoint
    and every group is used."""
    log = tmp_path / "intervals"
    monkeypatch.setenv("PROC_TASKS_LOG", str(log))
    import proc_tasks

    async with JobQ.open("local://churn") as q:
        await q.push_many([{"i": i, "seconds": 0.001 * (i % 5)} for i in range(300)])
        built = build_processor(
            ProcessorOptions(proc="proc_tasks:gpu_interval", gpus="0-7", gpus_per_task=2), None
        )
        assert built.slots == 4
        assert isinstance(built.processor, GpuSlots)
        assert built.processor.inner.function is proc_tasks.gpu_interval  # type: ignore[attr-defined]
        stats = await Worker(
            q.backend, built.processor, WorkerPolicy(slots=4, idle_timeout=0.3)
        ).run()
    assert stats.succeeded == 300
    clashes = intervals_overlap(log)
    assert set(clashes) == {str(i) for i in range(8)}
    assert all(count == 0 for count in clashes.values()), clashes
    pairs = {line.split()[0] for line in log.read_text().splitlines()}
    assert pairs == {"0,1", "2,3", "4,5", "6,7"}


async def test_shell_tasks_see_their_gpus_in_cuda_visible_devices(tmp_path):
    out = tmp_path / "out"
    built = build_processor(ProcessorOptions(gpus="0-2"), None)
    cmd = f'echo "$CUDA_VISIBLE_DEVICES $JOBQ_GPUS $(date +%s%N)" >> {out}; sleep 0.05'
    await asyncio.gather(*(built.processor(make_task({"cmd": cmd, "n": i})) for i in range(9)))
    seen = [line.split()[:2] for line in out.read_text().splitlines()]
    assert len(seen) == 9 and all(a == b for a, b in seen)
    assert {a for a, _ in seen} == {"0", "1", "2"}


async def test_pool_processes_are_pinned_to_their_slot_gpus(local_dir):
    built = build_processor(
        ProcessorOptions(
            proc="proc_tasks:whoami", isolation="process", gpus="4-7", gpus_per_task=2
        ),
        None,
    )
    async with started(built.processor):
        seen = await asyncio.gather(*(built.processor(make_task({"i": i})) for i in range(40)))
    pins = defaultdict(set)
    for row in seen:
        assert row["cuda"] == ",".join(row["gpus"])  # the process's own env matches the task
        pins[row["pid"]].add(row["cuda"])
    assert sorted(c for cs in pins.values() for c in cs) == ["4,5", "6,7"]
    assert all(len(cs) == 1 for cs in pins.values())  # a process never changes GPUs


async def test_a_cancelled_sync_task_keeps_its_gpus_until_its_thread_ends():
    """In-process sync code cannot be stopped: its GPU is not handed to the next task
    while the abandoned thread still runs."""
    release = threading.Event()
    entered = threading.Event()
    order: list[str] = []

    def task_body(name: str) -> None:
        order.append(f"start {name}")
        if name == "a":
            entered.set()
            release.wait(30)
        order.append(f"end {name}")

    slots = GpuSlots(CallableProcessor(task_body), [("0",)])
    first = asyncio.ensure_future(slots(make_task({"name": "a"})))
    await asyncio.to_thread(entered.wait, 30)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    second = asyncio.ensure_future(slots(make_task({"name": "b"})))
    await asyncio.sleep(0.2)  # give b every chance to (wrongly) start
    assert order == ["start a"] and not second.done() and slots.in_use == {("0",)}
    release.set()
    await asyncio.wait_for(second, 30)
    assert order == ["start a", "end a", "start b", "end b"]


def test_cli_gpus_auto_sets_slots_and_cuda_visible_devices(local_dir, tmp_path, fake_smi):
    bindir = fake_smi(4)
    out = tmp_path / "out"
    cmds = [f'echo "$CUDA_VISIBLE_DEVICES" >> {out}; sleep 0.2 # {i}' for i in range(6)]
    ai4s_jobq.push_many(cmds, queue="local://q")
    env = {**os.environ, **worker_env(local_dir), "PATH": f"{bindir}:{os.environ['PATH']}"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ai4s_jobq_cli",
            "-q",
            "local://q",
            "-v",
            "worker",
            "--gpus",
            "auto",
            "--gpus-per-task",
            "2",
            "--idle-timeout",
            "0.5",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert set(out.read_text().split()) == {"0,1", "2,3"}
    too_many = subprocess.run(
        [
            sys.executable,
            "-m",
            "ai4s_jobq_cli",
            "-q",
            "local://q",
            "worker",
            "--gpus",
            "auto",
            "--gpus-per-task",
            "2",
            "-n",
            "3",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert too_many.returncode == 2
    assert "use -n 2 or fewer" in too_many.stderr


def test_an_empty_gpus_option_is_a_usage_error(local_dir, jobq):
    """``--gpus "$GPUS"`` with the variable unset ran tasks on every GPU."""
    result = jobq("worker", "--gpus", " ", "--idle-timeout", "1")
    assert result.returncode == 2, result.stderr
    assert "--gpus" in result.stderr and "is the variable set?" in result.stderr
