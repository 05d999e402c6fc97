"""Build the processor a worker runs from its options, in one place.

The CLI (``jobq worker --proc --isolation --gpus --gpus-per-task --task-timeout
--tty``) and library users describe what they want in :class:`ProcessorOptions`;
:func:`build_processor` composes the pieces, outermost first::

    TaskTimeout  ->  GpuSlots  ->  ProcessPool | InstanceProcessor | CallableProcessor
                                   | ShellProcessor

The order matters: the timeout cancels everything inside it and waits until the work
has really stopped; the GPU group is given back only after that (so a GPU is never
used by two tasks); the pool process that runs a task is the one pinned to the task's
GPUs.  Run the result inside :func:`~ai4s_jobq.worker.processors.started` so
``setup()`` / ``teardown()`` and the pool's processes begin and end with the worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .gpus import GpuGroup, GpuSlots, gpu_groups
from .isolation import ProcessPool
from .processors import KILL_GRACE_SECONDS, Processor, ShellProcessor, make_processor
from .task_env import pass_env_problem, unmatched_pass_env, withheld_names
from .timeouts import TaskTimeout

log = logging.getLogger("ai4s_jobq.worker")

ISOLATION_CHOICES = ("none", "process")


@dataclass
class ProcessorOptions:
    proc: str | None = None  # None/"shell": shell tasks; else module:function or module:Class
    isolation: str = "none"  # "process": Python tasks run in a pool of processes
    gpus: str | None = None  # "auto" or a list ("0,1,2,3", "0-3", UUIDs)
    gpus_per_task: int = 1
    task_timeout: float | None = None  # seconds
    tty: bool = False  # shell tasks' stdout is a pseudo-terminal
    pass_env: tuple[str, ...] = ()  # credential variables tasks may still inherit
    # Stopping a task (cancelled or timed out): SIGTERM, then SIGKILL after this long.
    kill_grace: float = KILL_GRACE_SECONDS


@dataclass
class BuiltProcessor:
    processor: Processor
    slots: int  # the slot count to run with (GPUs may decide it)
    gpu_groups: list[GpuGroup]


def is_shell(options: ProcessorOptions) -> bool:
    return options.proc in (None, "", "shell")


def build_processor(options: ProcessorOptions, slots: int | None = None) -> BuiltProcessor:
    """Compose the processor.  ``slots`` None means "as many as the GPUs allow" with
    ``--gpus`` (else 1).  Raises ``ValueError`` (with a message for the user) on an
    impossible combination."""
    if options.isolation not in ISOLATION_CHOICES:
        raise ValueError(f"--isolation must be one of {', '.join(ISOLATION_CHOICES)}")
    if options.isolation == "process" and is_shell(options):
        raise ValueError(
            "--isolation process runs Python tasks (--proc module:function); "
            "shell tasks already run in their own processes"
        )
    if options.tty and not is_shell(options):
        raise ValueError("--tty applies to shell tasks only")
    if options.gpus_per_task != 1 and not options.gpus:
        raise ValueError("--gpus-per-task needs --gpus")
    _check_pass_env(options)
    groups = gpu_groups(options.gpus, options.gpus_per_task, slots) if options.gpus else []
    count = len(groups) if groups else (slots or 1)

    processor: Processor
    if options.isolation == "process":
        assert options.proc is not None
        processor = ProcessPool(
            options.proc, count, groups, kill_grace=options.kill_grace, pass_env=options.pass_env
        )
    elif is_shell(options):
        processor = ShellProcessor(
            kill_grace=options.kill_grace, tty=options.tty, pass_env=options.pass_env
        )
    else:
        processor = make_processor(options.proc)
    if groups:
        processor = GpuSlots(processor, groups)
    if options.task_timeout is not None:
        processor = TaskTimeout(processor, options.task_timeout)
    return BuiltProcessor(processor, count, groups)


def _check_pass_env(options: ProcessorOptions) -> None:
    """A ``--pass-env`` that cannot name a variable is refused; one that names none of
    the worker's, or that cannot apply (in-process Python tasks share the worker's
    environment), is a warning.  Where tasks get a scrubbed environment, one INFO line
    names the credential variables they go without (names only: never a value)."""
    for pattern in options.pass_env:
        problem = pass_env_problem(pattern)
        if problem is not None:
            raise ValueError(problem)
    scrubbing = is_shell(options) or options.isolation == "process"
    withheld = withheld_names(options.pass_env)
    if scrubbing and withheld:
        log.info(
            "tasks do not inherit these credential variables: %s (--pass-env NAME passes one)",
            ", ".join(withheld),
        )
    if not options.pass_env:
        return
    if not scrubbing:
        log.warning(
            "--pass-env has no effect on in-process Python tasks: they share the worker's "
            "environment (use --isolation process for a scrubbed one)"
        )
        return
    for pattern in unmatched_pass_env(options.pass_env):
        log.warning(
            "--pass-env %s matches no variable of this worker's environment: "
            "tasks inherit nothing for it",
            pattern,
        )
