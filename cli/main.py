"""The ``jobq`` command line: a thin click layer over :mod:`ai4s_jobq`.

Exit codes: 0 success; 1 a task or push failed (``push`` rejected lines, ``pull``'s
task failed, ``check --strict`` found a problem); 2 usage error (bad option
value); 3 worker stopped after too many consecutive failures; 4 configuration
or connection error; 124 ``wait`` timed out; 128+N stopped by signal N (130 SIGINT,
143 SIGTERM).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import click
from click.core import ParameterSource

from ai4s_jobq.ids import TaskEncodingError, canonical_json, identify
from ai4s_jobq.ledger.recorder import ledger_hooks
from ai4s_jobq.task import task_args
from ai4s_jobq.telemetry.setup import telemetry_session
from ai4s_jobq.worker.build import ProcessorOptions, build_processor
from ai4s_jobq.worker.heap import freeze_startup_objects
from ai4s_jobq.worker.loop import Worker, WorkerPolicy
from ai4s_jobq.worker.processors import started

from . import options
from .common import Settings, accept_global_options, apply_log_level, confirm, open_queue, run
from .dlq import dlq
from .ledger_cmds import register as register_ledger_commands
from .lines import numbered_lines
from .policy_options import policy_fields, worker_policy_options
from .push_input import LedgerPush, read_tasks, run_push
from .worker_options import processor_options


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
    """Push tasks with deterministic, deduplicating IDs and run workers that drain them.

    The options above may also follow the command (jobq push --queue X)."""
    ctx.ensure_object(dict)
    apply_log_level(ctx, verbose, quiet)
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
    type=options.NUM_RETRIES,
    default=None,
    help="Retries after the first attempt (default 2).",
)
@click.option(
    "--dedup-window",
    type=options.Duration("d"),
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
@click.option(
    "--dedup-keys",
    metavar="K1,K2",
    callback=options.dedup_keys_option,
    help="Compute IDs from only these arguments.",
)
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
    type=options.Duration("s", maximum=options.MAX_LOCK),
    metavar="D",
    hidden=False,
    help="Lock duration for a new queue (default 5m).",
)
@click.option(
    "--tag",
    metavar="NAME",
    callback=options.tag_option,
    help="Record the tasks as members of run NAME.",
)
@click.option(
    "--wait",
    "wait_after",
    is_flag=True,
    help="Then wait for exactly the pushed tasks (duplicates included); exit as `jobq wait`.",
)
@click.option(
    "--timeout",
    type=options.Duration("s", zero_ok=True),
    metavar="D",
    help="With --wait: give up after D.",
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
    dedup_keys: list[str] | None,
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
    if any(not command.strip() for command in commands):
        # a blank line of a file is skipped; a blank -c is a mistake (``-c "$CMD"``)
        raise click.UsageError("-c got an empty command (is the variable set?)")
    source = file if file is not None else sys.stdin
    if not commands and source.isatty():
        raise click.UsageError("no tasks: use -c CMD, give a FILE, or pipe lines to stdin")
    if timeout is not None and not wait_after:
        raise click.UsageError("--timeout is for --wait (push itself does not wait)")
    lines: Iterator[tuple[int, str | None]] = (
        iter(enumerate(commands, start=1)) if commands else numbered_lines(source)
    )
    tasks = read_tasks(lines, "shell" if commands else line_format, env)
    show_progress = sys.stderr.isatty() if progress is None else progress

    async def main() -> int:
        async with open_queue(ctx, dedup_window=dedup_window, lock_duration=lock_duration) as q:
            return await run_push(
                q,
                tasks,
                num_retries=num_retries,
                dedup_keys=dedup_keys,
                as_json=as_json,
                show_progress=show_progress,
                print_ids=bool(commands),
                ledger=LedgerPush(tag, skip_succeeded, wait_after, timeout),
            )

    with telemetry_session("jobq-push"):
        code = run(main())
    sys.exit(code)


def _parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="-e/--env")
        env[key] = value
    return env


def _worker_options(func: Callable[..., Any]) -> Callable[..., Any]:
    decorators = [
        click.option(
            "--proc",
            metavar="MODULE:FUNCTION",
            help="Python function or class (module:function, module:Class) to run "
            "tasks (default: shell tasks). A class is instantiated once per process; "
            "its optional setup()/teardown() run once.",
        ),
        click.option(
            "--grace-period",
            type=options.Duration("s", zero_ok=True),
            default="30s",
            show_default=True,
            metavar="D",
            help="On SIGTERM/SIGINT, how long running tasks may finish.",
        ),
    ]
    for option in reversed(decorators):
        func = option(func)
    return worker_policy_options(func)


def _run_worker(ctx: click.Context, options: ProcessorOptions, policy: WorkerPolicy) -> int:
    if not ctx.meta.get("log_level_explicit"):
        logging.getLogger().setLevel(logging.INFO)
    slots_given = ctx.get_parameter_source("slots") not in (None, ParameterSource.DEFAULT)
    try:
        built = build_processor(options, policy.slots if slots_given or not options.gpus else None)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    policy.slots = built.slots

    async def main() -> int:
        async with open_queue(ctx) as q, started(built.processor):
            # the ledger's recorder (outcomes, heartbeats), and telemetry when configured
            hooks = [*ledger_hooks(q), *telemetry.worker_hooks(q.backend)]
            worker = Worker(q.backend, built.processor, policy, hooks=hooks)
            freeze_startup_objects()  # start-up done: see ai4s_jobq/worker/heap.py
            stats = await worker.run()
            return stats.exit_code

    with telemetry_session("jobq-worker") as telemetry:
        return run(main())


@cli.command()
@click.option(
    "-n",
    "--slots",
    type=options.SLOTS,
    default=1,
    show_default=True,
    help="Tasks run concurrently.",
)
@click.option(
    "--idle-timeout",
    type=options.Duration("s", zero_ok=True),
    default="5s",
    show_default=True,
    metavar="D",
    help="Exit after the queue stays empty this long (0 = never).",
)
@click.option(
    "--time-limit",
    type=options.Duration("s", zero_ok=True),
    metavar="D",
    help="Stop taking new tasks after this long (running ones finish; 0 = no limit).",
)
@click.option(
    "--max-consecutive-failures",
    type=options.FAILURES,
    help="Exit (code 3) after this many failed tasks in a row.",
)
@_worker_options
@processor_options
@click.pass_context
def worker(
    ctx: click.Context,
    slots: int,
    idle_timeout: timedelta,
    time_limit: timedelta | None,
    max_consecutive_failures: int | None,
    proc: str | None,
    grace_period: timedelta,
    processor_options: ProcessorOptions,
    **options: Any,
) -> None:
    """Run tasks from the queue until it stays empty (or a limit is hit)."""
    policy = WorkerPolicy(
        slots=slots,
        idle_timeout=idle_timeout.total_seconds(),
        time_limit=time_limit.total_seconds() if time_limit else None,
        max_consecutive_failures=max_consecutive_failures,
        grace_period=grace_period.total_seconds(),
        **policy_fields(options),
    )
    how = dataclasses.replace(processor_options, pass_env=options["pass_env"])
    sys.exit(_run_worker(ctx, how, policy))


@cli.command()
@click.option(
    "--wait",
    type=options.Duration("s", zero_ok=True),
    default="5s",
    show_default=True,
    metavar="D",
    help="How long to wait for a task.",
)
@_worker_options
@click.pass_context
def pull(
    ctx: click.Context, wait: timedelta, proc: str | None, grace_period: timedelta, **options: Any
) -> None:
    """Run exactly one task (exit 0 if it succeeded or none came, 1 if it failed)."""
    policy = WorkerPolicy(
        slots=1,
        max_tasks=1,
        idle_timeout=max(wait.total_seconds(), 0.001),
        grace_period=grace_period.total_seconds(),
        **policy_fields(options),
    )
    sys.exit(_run_worker(ctx, ProcessorOptions(proc=proc, pass_env=options["pass_env"]), policy))


@cli.command()
@click.option("-n", "max_count", type=options.LISTED, default=10, show_default=True)
@click.option("--dead-letter", is_flag=True, help="Peek the dead-letter queue.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def peek(ctx: click.Context, max_count: int, dead_letter: bool, as_json: bool) -> None:
    """Show tasks at the head of the queue without taking them."""

    async def main() -> list[Any]:
        async with open_queue(ctx, check=False, create=False) as q:
            return await q.peek(max_count, dead_letter=dead_letter)

    from .output import print_tasks

    print_tasks(run(main()), as_json=as_json)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def size(ctx: click.Context, as_json: bool) -> None:
    """Count active, dead-lettered and scheduled messages."""

    async def main() -> Any:
        async with open_queue(ctx, check=False, create=False) as q:
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
    confirm(yes, "Delete every message" + (" in the dead-letter queue" if dead_letter else ""))

    async def main() -> int:
        async with open_queue(ctx, check=False) as q:
            return await q.clear(dead_letter=dead_letter)

    click.echo(f"deleted {run(main())} message(s)")


@cli.command("id")
@click.argument("task", required=False)
@click.option("-c", "--cmd", help="A shell command.")
@click.option("-e", "--env", "env_pairs", multiple=True, metavar="KEY=VALUE")
@click.option("--dedup-keys", metavar="K1,K2", callback=options.dedup_keys_option)
@click.option("--json", "as_json", is_flag=True)
def id_command(
    task: str | None,
    cmd: str | None,
    env_pairs: tuple[str, ...],
    dedup_keys: list[str] | None,
    as_json: bool,
) -> None:
    """Show the canonical form and the ID a task would get (JSON object or shell command)."""
    text = cmd if cmd is not None else task
    if text is None:
        raise click.UsageError("give a task: jobq id '{\"x\": 1}' or jobq id -c 'echo hi'")
    try:
        args: Any = json.loads(text) if cmd is None and text.lstrip().startswith("{") else text
        identified = identify(
            task_args(args, _parse_env(env_pairs) or None),
            dedup_keys=dedup_keys,
            deterministic=True,
        )
    except (TaskEncodingError, ValueError, TypeError, RecursionError) as exc:
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
    type=options.Duration("d"),
    metavar="W",
    help="The window you expect the queue to have.",
)
@click.pass_context
def check(ctx: click.Context, as_json: bool, strict: bool, dedup_window: timedelta | None) -> None:
    """Report whether the queue's deduplication matches JOBQ_DETERMINISTIC_IDS."""

    async def main() -> Any:
        async with open_queue(ctx, check=False, create=False, dedup_window=dedup_window) as q:
            findings = await q.check()
            if any(f.code == "unreadable" for f in findings):
                # No Manage rights, or a wrong key? (Service Bus answers both with the same
                # 401.)  A peek tells: a refused one exits 4.  Only here, not at every
                # startup, where it would cost Send/Listen-only producers a round trip.
                await q.backend.peek(1)
            return findings

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
accept_global_options(cli)


def main() -> None:
    cli(prog_name="jobq")


if __name__ == "__main__":
    main()
