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
from ai4s_jobq.ledger.base import LedgerError
from ai4s_jobq.redact import redact
from ai4s_jobq.spec import SpecError

T = TypeVar("T")
EXIT_CONFIG = 4


class Settings:
    def __init__(self, queue: str | None, conn_str: str | None, ledger: str | None = None):
        self.queue = queue
        self.conn_str = conn_str
        self.ledger = ledger


def apply_log_level(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Set the log level from ``-v`` (count) and ``--quiet``, wherever they were given
    (before or after the subcommand: the counts add up in ``ctx.meta``)."""
    meta = ctx.meta
    meta["verbose"] = meta.get("verbose", 0) + verbose
    meta["quiet"] = meta.get("quiet", False) or quiet
    verbose, quiet = meta["verbose"], meta["quiet"]
    level = (
        logging.ERROR
        if quiet
        else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    )
    meta["log_level_explicit"] = quiet or verbose > 0
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger().setLevel(level)
    for noisy in ("azure", "uamqp", "proton"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def accept_global_options(group: click.Group) -> None:
    """Let the group's own options (``--queue``, ``--conn-str``, ``-v``, ``--quiet``)
    also follow any subcommand, at any depth: ``jobq push --queue X`` works like
    ``jobq --queue X push``.  A value given after the subcommand wins; environment
    variables are read once, by the group's option.  Call it after every command is
    registered; a command's own option of the same name keeps its meaning."""

    def set_setting(name: str) -> Any:
        def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
            settings = ctx.find_object(Settings)
            if value is not None and settings is not None:
                setattr(settings, name, value)

        return callback

    def set_verbose(ctx: click.Context, param: click.Parameter, value: int) -> None:
        if value:
            apply_log_level(ctx, value, False)

    def set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value:
            apply_log_level(ctx, 0, True)

    def options() -> list[click.Option]:
        by_name = {p.name: p for p in group.params if isinstance(p, click.Option)}
        copies = []
        for name, callback, extra in (
            ("queue", set_setting("queue"), {}),
            ("conn_str", set_setting("conn_str"), {}),
            ("ledger", set_setting("ledger"), {}),
            ("verbose", set_verbose, {"count": True}),
            ("quiet", set_quiet, {"is_flag": True}),
        ):
            original = by_name[name]
            copies.append(
                click.Option(
                    original.opts,
                    help=original.help,
                    metavar=original.metavar,
                    expose_value=False,
                    callback=callback,
                    **extra,
                )
            )
        return copies

    def visit(command: click.Command) -> None:
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                visit(sub)
        if command is group:
            return
        taken = {opt for p in command.params for opt in p.opts}
        command.params.extend(o for o in options() if not taken & set(o.opts))

    visit(group)


def run(coro: Awaitable[T]) -> T:
    """Run a coroutine, turning our known errors into clean messages (no tracebacks,
    no secrets)."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except (
        SpecError,
        ConfigError,
        TaskEncodingError,
        BackendError,
        LedgerError,
        ValueError,
    ) as exc:
        click.echo(f"error: {redact(str(exc))}", err=True)
        sys.exit(EXIT_CONFIG)
    except Exception as exc:  # SDK errors: message only, redacted
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        click.echo(f"error: {type(exc).__name__}: {redact(str(exc))}", err=True)
        sys.exit(EXIT_CONFIG)


def open_queue(ctx: click.Context, **options: Any) -> Any:
    settings: Settings = ctx.obj
    options.setdefault("ledger", settings.ledger)
    return JobQ.open(settings.queue, connection_string=settings.conn_str, **options)


def confirm(yes: bool, what: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(f"{what}? Pass --yes to confirm when not interactive.")
    click.confirm(f"{what}?", abort=True)
