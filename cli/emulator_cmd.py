"""``jobq emulator``: run the local Service Bus emulator in the foreground.

Prints the connection string (give it to ``--conn-str`` / ``JOBQ_CONN_STR`` or to
the azure-servicebus SDK) and serves until Ctrl-C / SIGTERM.  Needs the
``emulator`` extra (``pip install ai4s_jobq[emulator]``).
"""

from __future__ import annotations

import click


@click.command("emulator")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (AMQP and HTTPS share one port).")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port; default: the last run's port for this data dir, else 5672. "
                   "0 picks a free port.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=".jobq-emulator",
              show_default=True, help="Directory for the message store, SAS key and TLS CA.")
@click.option("--log-level", default="WARNING", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def emulator(host: str, port: int | None, data_dir: str, log_level: str) -> None:
    """Run a local Azure Service Bus emulator (AMQP + management HTTPS)."""
    import logging

    try:
        from ai4s_jobq.emulator.__main__ import run
    except ImportError as exc:  # proton / cryptography missing
        raise click.ClickException(
            f"the emulator needs the 'emulator' extra: pip install 'ai4s_jobq[emulator]' ({exc})"
        ) from exc
    logging.basicConfig(level=log_level.upper())

    def announce(connection_string: str) -> None:
        from ai4s_jobq.emulator.client import ca_path_for, emulator_endpoint

        click.echo(connection_string)
        ca = ca_path_for(*emulator_endpoint(connection_string))
        click.echo(f"# AMQP and management HTTPS on the same port; admin-client CA: {ca}", err=True)
        click.echo("# Ctrl-C to stop", err=True)

    try:
        run(host, port, data_dir, announce=announce)
    except OSError as exc:
        raise click.ClickException(f"cannot start the emulator: {exc}") from exc
