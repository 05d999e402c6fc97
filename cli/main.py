"""The ``jobq`` command line: a thin click layer over :mod:`ai4s_jobq`.

Exit codes: 0 success; 1 a task or push failed (``push`` rejected lines, ``pull``'s
task failed, ``check --strict`` found a problem); 2 usage error (bad option
value); 3 worker stopped after too many consecutive failures; 4 configuration
or connection error; 128+N stopped by signal N (130 SIGINT, 143 SIGTERM).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import click

from ai4s_jobq.backends.base import BackendError
from ai4s_jobq.durations import DurationError, parse_duration
from ai4s_jobq.ids import ConfigError, TaskEncodingError, canonical_json, identify
from ai4s_jobq.jobq import JobQ
from ai4s_jobq.ledger.base import LedgerError
from ai4s_jobq.ledger.recorder import ledger_hooks
from ai4s_jobq.redact import redact
from ai4s_jobq.spec import SpecError
from ai4s_jobq.task import task_args
from ai4s_jobq.worker.loop import Worker, WorkerPolicy
from ai4s_jobq.worker.processors import make_processor

from .push_input import LedgerPush, read_tasks, run_push

T = TypeVar("T")
EXIT_CONFIG = 4


class Settings:
    def __init__(self, queue: str | None, conn_str: str | None, ledger: str | None = None):
        self.queue = queue
        self.conn_str = conn_str
        self.ledger = ledger


def _duration(bare_unit: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def convert(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        if bare_unit == "s" and str(value).strip() == "0":
            return timedelta(0)
        try:
            return parse_duration(value, bare_unit=bare_unit)
        except DurationError as exc:
            raise click.BadParameter(str(exc)) from None

    return convert


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


def _open(ctx: click.Context, **options: Any) -> Any:
    settings: Settings = ctx.obj
    options.setdefault("ledger", settings.ledger)
    return JobQ.open(settings.queue, connection_string=settings.conn_str, **options)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--queue",
    "-q",
    envvar="JOBQ_QUEUE",
    metavar="SPEC",
    help="local://NAME (default local://default), sb://NAMESPACE/QUEUE or "
    "ACCOUNT/QUEUE. Env: JOBQ_QUEUE.",
)
@click.option(
    "--conn-str",
    envvar="JOBQ_CONNECTION_STRING",
    metavar="CS",
    help="Connection string (Service Bus or Storage). Env: JOBQ_CONNECTION_STRING.",
)
@click.option(
    "--ledger",
    envvar="JOBQ_LEDGER",
    metavar="ACCOUNT[/TABLE]",
    help="Azure Table for task outcomes (needed for Service Bus; default table jobqledger). "
    "Env: JOBQ_LEDGER; JOBQ_LEDGER_CONNECTION_STRING instead of Azure AD.",
)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("--quiet", is_flag=True, help="Only errors.")
@click.version_option(package_name="ai4s_jobq")
@click.pass_context
def cli(
    ctx: click.Context,
    queue: str | None,
    conn_str: str | None,
    ledger: str | None,
    verbose: int,
    quiet: bool,
) -> None:
    """Push tasks with deterministic, deduplicating IDs and run workers that drain them."""
    level = (
        logging.ERROR
        if quiet
        else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    )
    ctx.ensure_object(dict)
    ctx.meta["log_level_explicit"] = quiet or verbose > 0
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("azure", "uamqp", "proton"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    ctx.obj = Settings(queue, conn_str, ledger)


@cli.command()
@click.option(
    "-c",
    "--cmd",
    "commands",
    multiple=True,
    metavar="CMD",
    help="A shell command to push (repeatable). Without -c, tasks are read "
    "from FILE or stdin, one per line.",
)
@click.argument("file", type=click.File("r", encoding="utf-8"), required=False)
@click.option(
    "--num-retries",
    type=click.IntRange(min=0),
    default=None,
    help="Retries after the first attempt (default 2).",
)
@click.option(
    "--dedup-window",
    callback=_duration("d"),
    metavar="W",
    help="Duplicate-detection window for a new queue: days (7) or 12h, 30m, 2d. "
    "Default 7 days. Env: JOBQ_DEDUP_WINDOW.",
)
@click.option(
    "-e",
    "--env",
    "env_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Environment variable for shell tasks (repeatable; part of the ID).",
)
@click.option(
    "--format",
    "line_format",
    type=click.Choice(["auto", "shell", "json"]),
    default="auto",
    show_default=True,
    help="How to read lines: auto (a line starting with '{' is a JSON object of "
    "arguments, any other line a shell command), shell, or json.",
)
@click.option("--dedup-keys", metavar="K1,K2", help="Compute IDs from only these arguments.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON result per task and a JSON summary on stdout.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar (default: when stderr is a terminal).",
)
@click.option(
    "--lock-duration",
    callback=_duration("s"),
    metavar="D",
    hidden=False,
    help="Lock duration for a new queue (default 5m).",
)
@click.option("--tag", metavar="NAME", help="Record the tasks as members of run NAME.")
@click.option(
    "--wait",
    "wait_after",
    is_flag=True,
    help="Then wait for exactly the pushed tasks (duplicates included); exit as `jobq wait`.",
)
@click.option(
    "--timeout", callback=_duration("s"), metavar="D", help="With --wait: give up after D."
)
@click.option(
    "--skip-succeeded",
    is_flag=True,
    help="Do not push a task the ledger records as succeeded (even after the dedup window).",
)
@click.pass_context
def push(
    ctx: click.Context,
    commands: tuple[str, ...],
    file: Any,
    num_retries: int | None,
    dedup_window: timedelta | None,
    env_pairs: tuple[str, ...],
    line_format: str,
    dedup_keys: str | None,
    as_json: bool,
    progress: bool | None,
    lock_duration: timedelta | None,
    tag: str | None,
    wait_after: bool,
    timeout: timedelta | None,
    skip_succeeded: bool,
) -> None:
    """Push tasks. Blank lines are ignored; a malformed line is reported with its line
    number and not pushed, every other line is pushed; the exit code is then 1.
    Re-running the same input is safe: duplicates are dropped."""
    env = _parse_env(env_pairs)
    if commands and file is not None:
        raise click.UsageError("give either -c commands or a FILE, not both")
    source = file if file is not None else sys.stdin
    if not commands and source.isatty():
        raise click.UsageError("no tasks: use -c CMD, give a FILE, or pipe lines to stdin")
    keys = [k.strip() for k in dedup_keys.split(",") if k.strip()] if dedup_keys else None
    lines: Iterator[tuple[int, str]] = (
        iter(enumerate(commands, start=1)) if commands else enumerate(source, start=1)
    )
    tasks = read_tasks(lines, "shell" if commands else line_format, env)
    show_progress = sys.stderr.isatty() if progress is None else progress

    async def main() -> int:
        async with _open(ctx, dedup_window=dedup_window, lock_duration=lock_duration) as q:
            return await run_push(
                q,
                tasks,
                num_retries=num_retries,
                dedup_keys=keys,
                as_json=as_json,
                show_progress=show_progress,
                print_ids=bool(commands),
                ledger=LedgerPush(tag, skip_succeeded, wait_after, timeout),
            )

    sys.exit(run(main()))


def _parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="-e/--env")
        env[key] = value
    return env


def _worker_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--proc",
            metavar="MODULE:FUNCTION",
            help="Python callable to run tasks (default: shell tasks).",
        ),
        click.option(
            "--grace-period",
            callback=_duration("s"),
            default="30s",
            show_default=True,
            metavar="D",
            help="On SIGTERM/SIGINT, how long running tasks may finish.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _run_worker(ctx: click.Context, proc: str | None, policy: WorkerPolicy) -> int:
    if not ctx.meta.get("log_level_explicit"):
        logging.getLogger().setLevel(logging.INFO)
    try:
        processor = make_processor(proc)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--proc") from None

    async def main() -> int:
        async with _open(ctx) as q:
            stats = await Worker(q.backend, processor, policy, hooks=ledger_hooks(q)).run()
            return stats.exit_code

    return run(main())


@cli.command()
@click.option(
    "-n",
    "--slots",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Tasks run concurrently.",
)
@click.option(
    "--idle-timeout",
    callback=_duration("s"),
    default="5s",
    show_default=True,
    metavar="D",
    help="Exit after the queue stays empty this long (0 = never).",
)
@click.option(
    "--time-limit",
    callback=_duration("s"),
    metavar="D",
    help="Stop taking new tasks after this long (running ones finish).",
)
@click.option(
    "--max-consecutive-failures",
    type=click.IntRange(min=1),
    help="Exit (code 3) after this many failed tasks in a row.",
)
@_worker_options
@click.pass_context
def worker(
    ctx: click.Context,
    slots: int,
    idle_timeout: timedelta,
    time_limit: timedelta | None,
    max_consecutive_failures: int | None,
    proc: str | None,
    grace_period: timedelta,
) -> None:
    """Run tasks from the queue until it stays empty (or a limit is hit)."""
    policy = WorkerPolicy(
        slots=slots,
        idle_timeout=idle_timeout.total_seconds(),
        time_limit=time_limit.total_seconds() if time_limit else None,
        max_consecutive_failures=max_consecutive_failures,
        grace_period=grace_period.total_seconds(),
    )
    sys.exit(_run_worker(ctx, proc, policy))


@cli.command()
@click.option(
    "--wait",
    callback=_duration("s"),
    default="5s",
    show_default=True,
    metavar="D",
    help="How long to wait for a task.",
)
@_worker_options
@click.pass_context
def pull(ctx: click.Context, wait: timedelta, proc: str | None, grace_period: timedelta) -> None:
    """Run exactly one task (exit 0 if it succeeded or none came, 1 if it failed)."""
    policy = WorkerPolicy(
        slots=1,
        max_tasks=1,
        idle_timeout=max(wait.total_seconds(), 0.001),
        grace_period=grace_period.total_seconds(),
    )
    sys.exit(_run_worker(ctx, proc, policy))


@cli.command()
@click.option("-n", "max_count", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--dead-letter", is_flag=True, help="Peek the dead-letter queue.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def peek(ctx: click.Context, max_count: int, dead_letter: bool, as_json: bool) -> None:
    """Show tasks at the head of the queue without taking them."""

    async def main() -> list[Any]:
        async with _open(ctx, check=False) as q:
            return await q.peek(max_count, dead_letter=dead_letter)

    from .output import print_tasks

    print_tasks(run(main()), as_json=as_json)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def size(ctx: click.Context, as_json: bool) -> None:
    """Count active, dead-lettered and scheduled messages."""

    async def main() -> Any:
        async with _open(ctx, check=False) as q:
            return await q.counts()

    counts = run(main())
    if as_json:
        click.echo(json.dumps(counts.as_dict()))
    else:
        click.echo(f"active: {counts.active}")
        click.echo(f"dead-letter: {counts.dead_letter}")
        if counts.scheduled is not None:
            click.echo(f"scheduled: {counts.scheduled}")


@cli.command()
@click.option("--dead-letter", is_flag=True, help="Clear the dead-letter queue instead.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def clear(ctx: click.Context, dead_letter: bool, yes: bool) -> None:
    """Delete every message in the queue."""
    _confirm(yes, "Delete every message" + (" in the dead-letter queue" if dead_letter else ""))

    async def main() -> int:
        async with _open(ctx, check=False) as q:
            return await q.clear(dead_letter=dead_letter)

    click.echo(f"deleted {run(main())} message(s)")


def _confirm(yes: bool, what: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(f"{what}? Pass --yes to confirm when not interactive.")
    click.confirm(f"{what}?", abort=True)


@cli.command("id")
@click.argument("task", required=False)
@click.option("-c", "--cmd", help="A shell command.")
@click.option("-e", "--env", "env_pairs", multiple=True, metavar="KEY=VALUE")
@click.option("--dedup-keys", metavar="K1,K2")
@click.option("--json", "as_json", is_flag=True)
def id_command(
    task: str | None,
    cmd: str | None,
    env_pairs: tuple[str, ...],
    dedup_keys: str | None,
    as_json: bool,
) -> None:
    """Show the canonical form and the ID a task would get (JSON object or shell command)."""
    text = cmd if cmd is not None else task
    if text is None:
        raise click.UsageError("give a task: jobq id '{\"x\": 1}' or jobq id -c 'echo hi'")
    try:
        args: Any = json.loads(text) if cmd is None and text.lstrip().startswith("{") else text
        keys = [k.strip() for k in dedup_keys.split(",")] if dedup_keys else None
        identified = identify(
            task_args(args, _parse_env(env_pairs) or None), dedup_keys=keys, deterministic=True
        )
    except (json.JSONDecodeError, TaskEncodingError, ValueError, TypeError) as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(
            json.dumps({"id": identified.id, "hashed": identified.hashed, "args": identified.args})
        )
    else:
        click.echo(f"hashed: {identified.hashed}")
        click.echo(f"id:     {identified.id}")
        if identified.hashed != canonical_json(identified.args):
            click.echo(f"args:   {canonical_json(identified.args)}")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--strict", is_flag=True, help="Exit 1 when a warning is found.")
@click.option(
    "--dedup-window",
    callback=_duration("d"),
    metavar="W",
    help="The window you expect the queue to have.",
)
@click.pass_context
def check(ctx: click.Context, as_json: bool, strict: bool, dedup_window: timedelta | None) -> None:
    """Report whether the queue's deduplication matches JOBQ_DETERMINISTIC_IDS."""

    async def main() -> Any:
        async with _open(ctx, check=False, create=False, dedup_window=dedup_window) as q:
            return await q.check()

    findings = run(main())
    if as_json:
        click.echo(
            json.dumps(
                {
                    "findings": [f.as_dict() for f in findings],
                    "consistent": not any(f.level == "warning" for f in findings),
                }
            )
        )
    else:
        for finding in findings:
            click.echo(f"{finding.level.upper():8} {finding.message}")
            if finding.fix:
                click.echo(f"{'':8} fix: {finding.fix}")
    if strict and any(f.level == "warning" for f in findings):
        sys.exit(1)


from .dlq import dlq  # noqa: E402
from .ledger_cmds import register as register_ledger_commands  # noqa: E402

cli.add_command(dlq)
register_ledger_commands(cli)


def _register_optional() -> None:
    """Commands that live in their own modules (the emulator's needs an optional extra,
    which its module imports only when the command runs)."""
    import importlib
    import importlib.util

    for module_name, command_name in (
        (f"{__package__}.emulator_cmd", "emulator"),
        (f"{__package__}.migrate", "migrate"),
        (f"{__package__}.dashboard_cmd", "dashboard"),
        (f"{__package__}.top_cmd", "top"),
    ):
        if importlib.util.find_spec(module_name) is not None:
            cli.add_command(getattr(importlib.import_module(module_name), command_name))


_register_optional()


def main() -> None:
    cli(prog_name="jobq")


if __name__ == "__main__":
    main()
