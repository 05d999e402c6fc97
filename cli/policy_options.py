"""The ``worker`` / ``pull`` options for interruptions, retries, preemption and the
task environment, kept here so ``cli/main.py`` only applies them.

Each option maps onto a field of :class:`ai4s_jobq.worker.loop.WorkerPolicy` (or the
processor's ``pass_env``); parsing and validation live in the library
(:mod:`ai4s_jobq.worker.retry`, :mod:`ai4s_jobq.worker.preemption`), so the CLI only
turns a bad value into a usage error (exit 2), or a configuration error (exit 4) when
it came from the environment (``JOBQ_IMDS_ENDPOINT``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from ai4s_jobq.worker.preemption import EVICTION_EVENTS, MAINTENANCE_EVENTS, PreemptionPolicy
from ai4s_jobq.worker.retry import DEFAULT_SPEC, RetryDelay

from .common import EXIT_CONFIG

#: Upper bound for --max-interruptions: a count, not a way to say "forever".
MAX_INTERRUPTIONS_LIMIT = 10_000


def _retry_delay(ctx: click.Context, param: click.Parameter, value: str) -> RetryDelay:
    try:
        return RetryDelay.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def worker_policy_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--retry-delay",
            callback=_retry_delay,
            default=DEFAULT_SPEC,
            show_default=True,
            metavar="SPEC",
            envvar="JOBQ_RETRY_DELAY",
            help="Back-off before a failed task's next attempt: 0, a fixed duration (30s) "
            "or exp[:BASE[:CAP[:FACTOR]]] (with jitter). Env: JOBQ_RETRY_DELAY.",
        ),
        click.option(
            "--max-interruptions",
            type=click.IntRange(min=0, max=MAX_INTERRUPTIONS_LIMIT),
            default=10,
            show_default=True,
            help="Interruptions (preemption, shutdown, lost worker) a task may have before "
            "it is dead-lettered as TooManyInterruptions; they do not use up retries.",
        ),
        click.option(
            "--preemption",
            type=click.Choice(["off", "auto", "imds"]),
            default="auto",
            show_default=True,
            envvar="JOBQ_PREEMPTION",
            help="Watch Azure Scheduled Events (IMDS) for eviction notices: auto = where "
            "the endpoint answers. Env: JOBQ_PREEMPTION; JOBQ_IMDS_ENDPOINT overrides "
            "the address.",
        ),
        click.option(
            "--preemption-maintenance",
            is_flag=True,
            help="Also treat Reboot and Redeploy events as eviction notices.",
        ),
        click.option(
            "--preemption-ack",
            is_flag=True,
            help="After giving tasks back on a notice, acknowledge the event so the "
            "platform may proceed at once.",
        ),
        click.option(
            "--pass-env",
            multiple=True,
            metavar="NAME",
            help="Let tasks inherit this credential variable of the worker (repeatable; "
            "shell patterns allowed). By default connection strings, keys, secrets and "
            "tokens are removed from tasks' environments.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def policy_fields(options: dict[str, Any]) -> dict[str, Any]:
    """WorkerPolicy keyword arguments from the options above."""
    events = EVICTION_EVENTS + (MAINTENANCE_EVENTS if options["preemption_maintenance"] else ())
    try:
        preemption = PreemptionPolicy(
            mode=options["preemption"], event_types=events, acknowledge=options["preemption_ack"]
        )
    except ValueError as exc:  # JOBQ_IMDS_ENDPOINT is not a URL: configuration
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    return {
        "retry_delay": options["retry_delay"],
        "max_interruptions": options["max_interruptions"],
        "preemption": preemption,
    }
