"""What a ``jobq`` command against Service Bus loads before it can start.

Import time was a third of a short command's run time (bench/bench_sb_commands.py);
aiohttp alone, pulled in by the SDK's aio management client, was most of what jobq
could avoid.  The backend uses the sync management client instead, which
``import azure.servicebus`` loads anyway.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

LOADED = (
    "import sys, ai4s_jobq_cli.main, ai4s_jobq.backends.servicebus.backend as b; "
    "print(sorted(m for m in ('aiohttp', 'azure.servicebus.aio.management') if m in sys.modules))"
)


def test_the_servicebus_backend_does_not_load_aiohttp():
    out = subprocess.run(
        [sys.executable, "-c", LOADED], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]"
