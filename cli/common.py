"""What every ``jobq`` command shares: the global settings, opening the queue, running
a coroutine with our errors turned into clean messages and exit codes, and asking
for confirmation.  Its own module so that command modules (``dlq``, ...) import it
without importing ``main`` (which imports them)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

import click

from ai4s_jobq.backends.base import BackendError
from ai4s_jobq.ids import ConfigError, TaskEncodingError
from ai4s_jobq.jobq import JobQ
from ai4s_jobq.redact import redact
from ai4s_jobq.spec import SpecError

T = TypeVar("T")
EXIT_CONFIG = 4


class Settings:
    def __init__(self, queue: str | None, conn_str: str | None):
        self.queue = queue
        self.conn_str = conn_str


def run(coro: Awaitable[T]) -> T:
    """Run a coroutine, turning our known errors into clean messages (no tracebacks,
    no secrets)."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except (SpecError, ConfigError, TaskEncodingError, BackendError, ValueError) as exc:
        click.echo(f"error: {redact(str(exc))}", err=True)
        sys.exit(EXIT_CONFIG)
    except Exception as exc:  # SDK errors: message only, redacted
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        click.echo(f"error: {type(exc).__name__}: {redact(str(exc))}", err=True)
        sys.exit(EXIT_CONFIG)


def open_queue(ctx: click.Context, **options: Any) -> Any:
    settings: Settings = ctx.obj
    return JobQ.open(settings.queue, connection_string=settings.conn_str, **options)


def confirm(yes: bool, what: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(f"{what}? Pass --yes to confirm when not interactive.")
    click.confirm(f"{what}?", abort=True)
