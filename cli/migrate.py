"""``jobq migrate``: move a queue's messages into another (e.g. a dedup-enabled) queue."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .options import Seconds


@click.command()
@click.option(
    "--to",
    "destination",
    required=True,
    metavar="SPEC",
    help="The destination queue (created with duplicate detection if missing).",
)
@click.option(
    "--to-conn-str",
    envvar="JOBQ_MIGRATE_TO_CONNECTION_STRING",
    metavar="CS",
    help="Connection string for the destination (default: --conn-str). "
    "Env: JOBQ_MIGRATE_TO_CONNECTION_STRING.",
)
@click.option(
    "--dead-letter",
    is_flag=True,
    help="Move the source's dead-lettered messages (into the destination's "
    "active queue) instead of its active ones.",
)
@click.option(
    "--dedup-window",
    metavar="W",
    help="Duplicate-detection window if the destination is created (default 7d).",
)
@click.option("--batch-size", type=click.IntRange(1, 5000), default=100, show_default=True)
@click.option(
    "--wait",
    "idle_wait",
    type=Seconds(0.1),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="Stop when the source stays empty this long.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Move at most this many messages.")
@click.option(
    "--allow-no-dedup",
    is_flag=True,
    help="Allow a destination without duplicate detection (a re-run after an "
    "interruption may then duplicate messages).",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def migrate(
    ctx: click.Context,
    destination: str,
    to_conn_str: str | None,
    dead_letter: bool,
    dedup_window: str | None,
    batch_size: int,
    idle_wait: float,
    limit: int | None,
    allow_no_dedup: bool,
    as_json: bool,
) -> None:
    """Move every message of the --queue queue into the --to queue, loss-free.

    Each message is pushed with the same MessageId, then completed in the source. An
    interrupted run loses nothing (uncompleted messages return to the source when their
    lock expires) and a re-run duplicates nothing (the destination drops the MessageIds
    it already has). Exit 1 if some messages could not be moved.
    """
    from ai4s_jobq.durations import DurationError, parse_duration
    from ai4s_jobq.jobq import JobQ
    from ai4s_jobq.migrate import migrate as run_migration

    from .common import open_queue, run

    window = None
    if dedup_window is not None:
        try:
            window = parse_duration(dedup_window, bare_unit="d")
        except DurationError as exc:
            raise click.BadParameter(str(exc), param_hint="--dedup-window") from None
    settings = ctx.obj
    dest_cs = to_conn_str or settings.conn_str

    def progress(report: Any) -> None:
        if not as_json:
            click.echo(f"moved {report.moved}", err=True)

    async def main() -> Any:
        async with (
            open_queue(ctx, check=False, create=False) as src,
            JobQ.open(
                destination,
                connection_string=dest_cs,
                dedup_window=window,
                check=False,
            ) as dest,
        ):
            return await run_migration(
                src.backend,
                dest.backend,
                dead_letter=dead_letter,
                batch_size=batch_size,
                idle_timeout=idle_wait,
                limit=limit,
                require_dedup=not allow_no_dedup,
                on_batch=progress,
            )

    report = run(main())
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        click.echo(f"moved {report.moved} message(s) from {report.source} to {report.destination}")
        for message_id, error in report.failed:
            click.echo(f"not moved: {message_id}: {error}", err=True)
        if report.lock_lost:
            click.echo(
                f"{report.lock_lost} message(s) lost their source lock after the push; "
                "run the migration again to finish them",
                err=True,
            )
    if report.failed or report.lock_lost:
        sys.exit(1)
