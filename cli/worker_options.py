"""The ``jobq worker`` options that decide *how* tasks run: ``--isolation``, ``--gpus``,
``--gpus-per-task``, ``--task-timeout``, ``--tty``.

Kept apart from :mod:`cli.main` so the ``worker`` command only gains one decorator and
one parameter (a :class:`~ai4s_jobq.worker.build.ProcessorOptions`); the library
(:mod:`ai4s_jobq.worker.build`) composes the processor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from ai4s_jobq.worker.build import ISOLATION_CHOICES, ProcessorOptions

from . import options as option_types

_NAMES = ("isolation", "gpus", "gpus_per_task", "task_timeout", "tty")


def processor_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options; the command receives them as ``processor_options``."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in _NAMES}
        options = ProcessorOptions(proc=kwargs.get("proc"), **values)
        return func(*args, processor_options=options, **kwargs)

    options = [
        click.option(
            "--isolation",
            type=click.Choice(ISOLATION_CHOICES),
            default="none",
            show_default=True,
            help="process: run Python tasks in a pool of processes (one per slot, "
            "forkserver) so they can be stopped and a crash fails only its task.",
        ),
        click.option(
            "--gpus",
            metavar="auto|LIST",
            callback=_gpus_given,
            help="Give each running task its own GPUs (CUDA_VISIBLE_DEVICES, JOBQ_GPUS): "
            "auto (CUDA_VISIBLE_DEVICES, nvidia-smi -L or NVML) or a list such as "
            "0,1,2,3 or 0-3. Without -n, slots = GPUs / --gpus-per-task.",
        ),
        click.option(
            "--gpus-per-task",
            type=option_types.count(1, 64),
            default=1,
            show_default=True,
            metavar="K",
            help="GPUs per running task (consecutive groups of K).",
        ),
        click.option(
            "--task-timeout",
            type=option_types.Duration("s"),
            callback=lambda ctx, param, value: None if value is None else value.total_seconds(),
            metavar="D",
            help="Stop a task that runs longer (SIGTERM, then SIGKILL) and count it as a "
            "failed attempt with reason Timeout: seconds or 90s, 30m, 2h.",
        ),
        click.option(
            "--tty",
            is_flag=True,
            help="Run shell tasks with stdout on a pseudo-terminal (for programs that "
            "only line-buffer on a TTY).",
        ),
    ]
    decorated: Callable[..., Any] = wrapper
    for option in reversed(options):
        decorated = option(decorated)
    return decorated


def _gpus_given(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An empty ``--gpus`` (``--gpus "$GPUS"`` with the variable unset) is a usage
    error: it was taken for no ``--gpus`` at all, and tasks shared every GPU."""
    if value is not None and not value.strip():
        raise click.BadParameter("an empty list (is the variable set?)", ctx, param)
    return value
