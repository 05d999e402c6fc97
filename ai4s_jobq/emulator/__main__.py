"""``python -m ai4s_jobq.emulator``: run the emulator until Ctrl-C / SIGTERM.

The first line on stdout is the connection string (``EmulatorProcess`` reads it);
``jobq emulator`` is the same thing behind the CLI.  The AAD trust key (see
:mod:`.jwt_auth`) comes from ``--aad-trust-key`` or, to keep it out of process
listings, from ``$AI4S_JOBQ_EMULATOR_AAD_TRUST_KEY``; once given it is kept in the
data directory like the SAS key.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .client import AAD_TRUST_KEY_ENV
from .server import DEFAULT_PORT, EmulatorServer, load_settings


def run(
    host: str,
    port: int | None,
    data_dir: str,
    key: str | None = None,
    announce=print,
    aad_trust_key: str | None = None,
) -> None:
    """Start the server, announce the connection string, block until a signal.
    ``port=None`` reuses the port of the last run with this data dir, else 5672;
    ``aad_trust_key=None`` keeps the data dir's (if any)."""
    if port is None:
        port = load_settings(Path(data_dir)).port or DEFAULT_PORT
    server = EmulatorServer(
        data_dir, host=host, port=port, key=key, aad_trust_key=aad_trust_key
    ).start()
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        announce(server.connection_string)
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ai4s_jobq.emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="default: the port of the last run with this data dir, else 5672",
    )
    parser.add_argument("--data", required=True, help="data directory (SQLite store, key, CA)")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument(
        "--aad-trust-key",
        default=os.environ.get(AAD_TRUST_KEY_ENV),
        help="accept Azure AD tokens (JWT, HS256) signed with this key "
        f"(default: ${AAD_TRUST_KEY_ENV}, else the data dir's)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    run(args.host, args.port, args.data, aad_trust_key=args.aad_trust_key)


if __name__ == "__main__":
    main()
