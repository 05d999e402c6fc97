"""``jobq dlq``: inspect, requeue and purge dead-lettered tasks (every backend)."""

from __future__ import annotations

import click

from . import options
from .common import confirm, open_queue, run
from .output import print_tasks


@click.group()
def dlq() -> None:
    """Dead-lettered tasks: list, requeue, purge."""


@dlq.command("list")
@click.option("-n", "max_count", type=options.LISTED, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def dlq_list(ctx: click.Context, max_count: int, as_json: bool) -> None:
    """Show dead-lettered tasks with their reasons."""

    async def main():  # type: ignore[no-untyped-def]
        async with open_queue(ctx, check=False, create=False) as q:
            return await q.dlq_list(max_count)

    print_tasks(run(main()), as_json=as_json)


@dlq.command("requeue")
@click.argument("ids", nargs=-1)
@click.option("--all", "requeue_all", is_flag=True, help="Requeue every dead-lettered task.")
@click.pass_context
def dlq_requeue(ctx: click.Context, ids: tuple[str, ...], requeue_all: bool) -> None:
    """Give dead-lettered tasks (by task ID, or --all) a fresh set of attempts."""
    if bool(ids) == requeue_all:
        raise click.UsageError("give task IDs or --all (not both)")

    async def main() -> int:
        async with open_queue(ctx, check=False) as q:
            return await q.dlq_requeue(None if requeue_all else ids)

    moved = run(main())
    click.echo(f"requeued {moved} task(s)")
    wanted = len(set(ids))
    if ids and moved < wanted:
        click.echo(
            f"{wanted - moved} of the {wanted} task ID(s) given are not dead-lettered in "
            "this queue (`jobq dlq list` shows those that are)",
            err=True,
        )
        raise SystemExit(1)


@dlq.command("purge")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def dlq_purge(ctx: click.Context, yes: bool) -> None:
    """Delete every dead-lettered task."""
    confirm(yes, "Delete every dead-lettered task")

    async def main() -> int:
        async with open_queue(ctx, check=False) as q:
            return await q.dlq_purge()

    click.echo(f"purged {run(main())} task(s)")
