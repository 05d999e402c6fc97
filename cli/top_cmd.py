"""``jobq top``: the dashboard's essentials live in the terminal (thin layer over
ai4s_jobq.dashboard.top)."""

from __future__ import annotations

import json

import click

from .options import Seconds


@click.command()
@click.option(
    "--queue",
    "-q",
    "queues",
    multiple=True,
    metavar="SPEC",
    help="A queue to show (repeatable; keys 1-9 switch). Default: the global --queue.",
)
@click.option(
    "--interval",
    type=Seconds(0.2),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --once: the snapshot as JSON.")
@click.pass_context
def top(
    ctx: click.Context, queues: tuple[str, ...], interval: float, once: bool, as_json: bool
) -> None:
    """Live view of the queue in the terminal; q or Ctrl-C quits."""
    from rich.console import Console

    from ai4s_jobq.dashboard.snapshot import collect
    from ai4s_jobq.dashboard.sources import open_sources
    from ai4s_jobq.dashboard.top import render_top, run_top

    from .common import run

    if as_json and not once:
        raise click.UsageError("--json needs --once (a live view cannot be JSON)")
    specs = list(queues) or [ctx.obj.queue]

    async def main() -> None:
        async with open_sources(specs, ctx.obj.conn_str, ledger=ctx.obj.ledger) as sources:
            if not once:
                await run_top(sources, interval=interval)
                return
            snaps = [await collect(s) for s in sources]
            if as_json:
                click.echo(json.dumps([s.as_dict() for s in snaps], default=str))
                return
            console = Console()
            for snap in snaps:
                console.print(render_top(snap))

    try:
        run(main())
    except KeyboardInterrupt:
        pass
