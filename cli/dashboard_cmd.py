"""``jobq dashboard``: serve the web dashboard (thin layer over ai4s_jobq.dashboard)."""

from __future__ import annotations

import asyncio
import sys

import click

from .options import Seconds

SPEC_HELP = "A queue to show (repeatable; default: the global --queue / JOBQ_QUEUE)."


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port",
    type=click.IntRange(min=0, max=65535),
    default=8765,
    show_default=True,
    help="Port to bind (0 = any free port).",
)
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Allow binding to a non-loopback address. The dashboard has no authentication: "
    "anyone who can reach the port sees task IDs, commands and errors.",
)
@click.option("--queue", "-q", "queues", multiple=True, metavar="SPEC", help=SPEC_HELP)
@click.option(
    "--refresh",
    type=Seconds(0.5),
    default=5.0,
    show_default=True,
    help="Seconds between page refreshes.",
)
@click.option(
    "--sample",
    type=Seconds(0.1),
    default=5.0,
    show_default=True,
    help="Seconds between queue depth samples.",
)
@click.pass_context
def dashboard(
    ctx: click.Context,
    host: str,
    port: int,
    allow_remote: bool,
    queues: tuple[str, ...],
    refresh: float,
    sample: float,
) -> None:
    """Serve a self-refreshing web page: depth over time, throughput and ETA, outcomes
    per tag, failures by reason, runtimes, workers and the dead-letter queue.
    Needs the ai4s_jobq[dashboard] extra."""
    try:
        from ai4s_jobq.dashboard.server import Dashboard, is_loopback
        from ai4s_jobq.dashboard.sources import open_sources
    except ImportError as exc:
        click.echo(
            f"error: the dashboard needs the dashboard extra ({exc.name} is missing): "
            "pip install 'ai4s_jobq[dashboard]'",
            err=True,
        )
        sys.exit(4)
    from .common import run

    remote = not is_loopback(host)
    if remote and not allow_remote:
        raise click.UsageError(
            f"--host {host} is not a loopback address: the dashboard would be reachable "
            "from other machines, and it has no authentication; pass --allow-remote to "
            "bind it anyway"
        )
    specs = list(queues) or [ctx.obj.queue]

    async def main() -> None:
        async with open_sources(specs, ctx.obj.conn_str, ledger=ctx.obj.ledger) as sources:
            board = Dashboard(sources, refresh_seconds=refresh, sample_seconds=sample)
            try:
                bound = await board.start(host, port)
            except OSError as exc:
                raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            if remote:
                click.echo(
                    f"warning: serving on {host} without authentication: anyone who can "
                    f"reach port {bound} can read these queues' tasks, commands and errors",
                    err=True,
                )
            shown = f"[{host}]" if ":" in host else host
            click.echo(f"jobq dashboard on http://{shown}:{bound}/ (Ctrl-C to stop)", err=True)
            try:
                await asyncio.Event().wait()
            finally:
                await board.stop()

    try:
        run(main())
    except KeyboardInterrupt:
        pass
