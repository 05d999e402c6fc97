"""GPU slots: every running task gets GPUs of its own (``jobq worker --gpus``).

The worker's GPUs are split into fixed groups of ``--gpus-per-task`` (K) consecutive
devices, one group per slot: with 8 GPUs and K=2, slots own ``0,1``, ``2,3``, ``4,5``
and ``6,7``.  Fixed groups rather than "any K free GPUs" because (a) neighbouring
indices usually share the fastest links, and (b) ``--isolation process`` pins each
pool process to one group *before* its ``setup()`` loads a model, so a task must land
on the process that owns its GPUs (:mod:`.isolation` looks the process up by group).

:class:`GpuSlots` wraps a processor: around each task it takes a free group from the
pool, makes it the task's ``TaskContext.gpus`` (shell tasks see it as
``CUDA_VISIBLE_DEVICES`` and ``JOBQ_GPUS``; Python tasks as ``current_task().gpus``)
and returns it when the task has *really* stopped.  That last part is the exclusivity
guarantee: a cancelled in-process sync task keeps running in its thread, so its group
stays reserved until that thread ends (the slot count then bounds how many tasks can
wait for a group; they wait, they never share).

Discovery (``--gpus auto``): ``CUDA_VISIBLE_DEVICES`` when the scheduler set it
(Slurm, Kubernetes device plugins, Azure ML), else ``nvidia-smi -L``, else NVML
(``pynvml``) if importable.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..task import Task
from .context import TaskContext, current_task, task_context
from .processors import Processor, ProcessorWrapper, watch_abandoned_threads

log = logging.getLogger("ai4s_jobq.worker")

GpuGroup = tuple[str, ...]
NVIDIA_SMI_TIMEOUT = 20.0
#: More GPUs than any node has (8 GPUs split into 7 MIG instances each is 56): a
#: longer list or range is a typo (``0-99999`` spun parsing it, at full CPU).
MAX_GPUS = 1024
_GPU_LINE = re.compile(r"^GPU (\d+):")
_RANGE = re.compile(r"^(\d+)-(\d+)$")


class GpuConfigError(ValueError):
    """``--gpus`` cannot be satisfied (no GPUs found, bad list, too few GPUs)."""


def parse_gpu_list(text: str) -> list[str]:
    """``"0,1,2,3"``, ``"0-3"``, or UUIDs (``GPU-…``, ``MIG-…``) separated by commas."""
    gpus: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        span = _RANGE.match(item)
        if span:
            first, last = int(span.group(1)), int(span.group(2))
            if last < first:
                raise GpuConfigError(f"GPU range {item!r} runs backwards")
            if last - first >= MAX_GPUS:  # checked before a typo'd range fills memory
                raise GpuConfigError(f"GPU range {item!r} has over {MAX_GPUS} GPUs")
            gpus.extend(str(i) for i in range(first, last + 1))
        else:
            gpus.append(item)
        if len(gpus) > MAX_GPUS:
            raise GpuConfigError(f"more than {MAX_GPUS} GPUs in {text[:60]!r}")
    if not gpus:
        raise GpuConfigError(f"no GPUs in {text!r}: give 'auto' or a list such as 0,1,2,3")
    duplicates = sorted(g for g, times in Counter(gpus).items() if times > 1)
    if duplicates:
        raise GpuConfigError(f"GPU(s) listed twice: {', '.join(duplicates)}")
    return gpus


def discover_gpus(environ: dict[str, str] | None = None) -> list[str]:
    """The GPUs this worker may use (see the module docstring for the order)."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("-1", "NoDevFiles", "void"):
        return parse_gpu_list(visible)
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi:
        return _gpus_from_nvidia_smi(smi)
    gpus = _gpus_from_nvml()
    if gpus is None:
        raise GpuConfigError(
            "--gpus auto found no GPUs: nvidia-smi is not on PATH and pynvml is not "
            "installed (give the GPUs explicitly, e.g. --gpus 0,1)"
        )
    return gpus


def _gpus_from_nvidia_smi(smi: str) -> list[str]:
    try:
        result = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GpuConfigError(f"--gpus auto: running {smi} -L failed: {exc}") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise GpuConfigError(f"--gpus auto: nvidia-smi -L exited {result.returncode}: {last}")
    gpus = [m.group(1) for m in map(_GPU_LINE.match, result.stdout.splitlines()) if m]
    if not gpus:
        raise GpuConfigError("--gpus auto: nvidia-smi -L lists no GPUs")
    return gpus


def _gpus_from_nvml() -> list[str] | None:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # NVML present but no driver
        raise GpuConfigError(f"--gpus auto: NVML failed: {exc}") from None


def gpu_groups(spec: str, per_task: int = 1, slots: int | None = None) -> list[GpuGroup]:
    """The GPU group of each slot.  ``slots`` None means one slot per group; more
    slots than groups is an error (a slot without GPUs would wait forever)."""
    if per_task < 1:
        raise GpuConfigError("--gpus-per-task must be at least 1")
    gpus = discover_gpus() if spec.strip() == "auto" else parse_gpu_list(spec)
    if len(gpus) < per_task:
        raise GpuConfigError(
            f"--gpus-per-task {per_task} needs {per_task} GPUs; found {len(gpus)}: "
            + ",".join(gpus)
        )
    groups = [tuple(gpus[i : i + per_task]) for i in range(0, len(gpus), per_task)]
    if len(groups[-1]) < per_task:
        log.warning("GPU(s) %s left unused: not a full group of %d", groups[-1], per_task)
        groups.pop()
    if slots is not None:
        if slots > len(groups):
            raise GpuConfigError(
                f"-n {slots} slots need {slots * per_task} GPUs at {per_task} per task; "
                f"there are {len(gpus)} ({','.join(gpus)}): use -n {len(groups)} or fewer"
            )
        groups = groups[:slots]
    return groups


class GpuSlots(ProcessorWrapper):
    """Wraps a processor: each task runs with a GPU group of its own."""

    def __init__(self, inner: Processor, groups: Sequence[GpuGroup]):
        if not groups:
            raise GpuConfigError("no GPU groups")
        super().__init__(inner)
        self.groups = list(groups)
        self._free: asyncio.Queue[GpuGroup] | None = None
        self.in_use: set[GpuGroup] = set()  # for tests and logs: groups held right now

    def _pool(self) -> asyncio.Queue[GpuGroup]:
        if self._free is None:
            self._free = asyncio.Queue()
            for group in self.groups:
                self._free.put_nowait(group)
        return self._free

    async def start(self) -> None:
        self._pool()
        await super().start()

    async def __call__(self, task: Task) -> Any:
        group = await self._pool().get()
        if group in self.in_use:  # cannot happen: a group is queued only when free
            raise RuntimeError(f"GPU group {group} handed out twice")
        self.in_use.add(group)
        abandoned: list[asyncio.Future[Any]] = []
        try:
            context = current_task() or TaskContext(task.id)
            with task_context(replace(context, gpus=group)), watch_abandoned_threads() as watch:
                abandoned = watch
                return await self.inner(task)
        finally:
            self._release(group, abandoned)

    def _release(self, group: GpuGroup, abandoned: list[asyncio.Future[Any]]) -> None:
        pending = [future for future in abandoned if not future.done()]
        if not pending:
            self._give_back(group)
            return
        log.warning(
            "GPU(s) %s stay reserved until the cancelled task's thread ends "
            "(use --isolation process to stop sync tasks at once)",
            ",".join(group),
        )
        left = [len(pending)]

        def one_done(_: object) -> None:
            left[0] -= 1
            if left[0] == 0:
                self._give_back(group)

        for future in pending:
            future.add_done_callback(one_done)

    def _give_back(self, group: GpuGroup) -> None:
        self.in_use.discard(group)
        self._pool().put_nowait(group)
