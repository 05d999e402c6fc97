"""``jobq emulator``: run the local Service Bus emulator in the foreground.

Prints the connection string (give it to ``--conn-str`` / ``JOBQ_CONNECTION_STRING`` or to
the azure-servicebus SDK) and serves until Ctrl-C / SIGTERM.  Needs the
``emulator`` extra (``pip install ai4s_jobq[emulator]``; see the README for what
building its python-qpid-proton needs).
"""

from __future__ import annotations

import errno
import sys

import click

from .common import EXIT_CONFIG


@click.command("emulator")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on (AMQP and HTTPS share one port).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port; default: the last run's port for this data dir, else 5672. 0 picks a free port.",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False),
    default=".jobq-emulator",
    show_default=True,
    help="Directory for the message store, SAS key and TLS CA.",
)
@click.option(
    "--log-level",
    default="WARNING",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option(
    "--aad-trust-key",
    envvar="AI4S_JOBQ_EMULATOR_AAD_TRUST_KEY",
    default=None,
    help="Also accept Azure AD tokens (HS256 JWTs) signed with this key; kept in "
    "the data dir once given.  [env var: AI4S_JOBQ_EMULATOR_AAD_TRUST_KEY]",
)
def emulator(
    host: str, port: int | None, data_dir: str, log_level: str, aad_trust_key: str | None
) -> None:
    """Run a local Azure Service Bus emulator (AMQP + management HTTPS)."""
    import logging

    try:
        from ai4s_jobq.emulator.__main__ import run
        from ai4s_jobq.emulator.server import EmulatorDataError
    except ImportError as exc:  # proton / cryptography missing
        raise click.ClickException(
            f"the emulator needs the 'emulator' extra ({exc}): pip install "
            "'ai4s_jobq[emulator]'. It builds python-qpid-proton from source, which needs a C "
            "compiler, the Python headers and OpenSSL's (Debian/Ubuntu: sudo apt-get install "
            "build-essential python3-dev pkg-config libssl-dev)"
        ) from exc
    logging.basicConfig(level=log_level.upper())

    def announce(connection_string: str) -> None:
        from ai4s_jobq.emulator.client import ca_path_for, emulator_endpoint

        click.echo(connection_string)
        sb_host, sb_port = emulator_endpoint(connection_string)
        ca = ca_path_for(sb_host, sb_port)
        click.echo(f"# AMQP and management HTTPS on the same port; admin-client CA: {ca}", err=True)
        click.echo(
            f"# Azure AD: JOBQ_SERVICEBUS_ENDPOINT=sb://{sb_host}:{sb_port} "
            f"JOBQ_SERVICEBUS_CA={ca} (see docs/emulator.md)",
            err=True,
        )
        click.echo("# Ctrl-C to stop", err=True)

    try:
        run(host, port, data_dir, announce=announce, aad_trust_key=aad_trust_key)
    except EmulatorDataError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:  # most often another emulator's port
            message = (
                f"cannot listen on {host}:{port}: the port is in use; choose another "
                "with --port (0 picks a free one)"
            )
        else:
            message = f"cannot start the emulator: {exc}"
        click.echo(f"error: {message}", err=True)
        sys.exit(EXIT_CONFIG)
