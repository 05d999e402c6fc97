"""The environment a task's child process gets: the worker's, minus its credentials.

A worker holds the keys to its queue (``JOBQ_CONNECTION_STRING``, a service
principal's ``AZURE_CLIENT_SECRET``, SAS tokens, account keys); a task is code from
whoever could push to that queue, and its environment ends up in its logs, core dumps
and ``/proc``.  So variables that look like credentials are not passed on unless the
user names them with ``--pass-env NAME`` (repeatable; ``--pass-env 'PATTERN*'`` takes
a shell-style pattern).

What counts as a credential, by name (case-insensitive): ``*CONNECTION_STRING*``,
``*CONN_STR*``, ``*SECRET*``, ``*PASSWORD*``, ``*PASSWD*``, ``*_KEY`` /
``*_KEY_*`` (``AZURE_STORAGE_KEY``, ``OPENAI_API_KEY``), ``*_TOKEN`` and a ``SAS``
word (``AZURE_STORAGE_SAS_TOKEN``), ``*CREDENTIAL*``.  Names like
``AZURE_CLIENT_ID`` or ``AZURE_TENANT_ID`` identify, they do not authenticate, and
stay.  In-process Python tasks (``--proc``) share the worker's memory and cannot be
kept from its credentials; run them with ``--isolation process`` for the same
scrubbed environment.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping

_CREDENTIAL_NAME = re.compile(
    r"CONNECTION_?STRING|CONN_?STR|SECRET|PASSWORD|PASSWD|CREDENTIAL"
    r"|_KEY$|_KEY_|(?:^|_)KEY$|_TOKEN$|(?:^|_)SAS(?:_|$)",
    re.IGNORECASE,
)


def is_credential_name(name: str) -> bool:
    return bool(_CREDENTIAL_NAME.search(name))


def task_environment(
    pass_env: Iterable[str] = (), environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``environ`` (default: the worker's) without credential variables, except those
    named (or matched) by ``pass_env``."""
    source = os.environ if environ is None else environ
    patterns = tuple(pass_env)
    return {name: value for name, value in source.items() if not _withheld(name, patterns)}


def withheld_names(
    pass_env: Iterable[str] = (), environ: Mapping[str, str] | None = None
) -> list[str]:
    """The names ``task_environment`` leaves out (for a log line at startup)."""
    source = os.environ if environ is None else environ
    patterns = tuple(pass_env)
    return sorted(name for name in source if _withheld(name, patterns))


def _withheld(name: str, patterns: tuple[str, ...]) -> bool:
    return is_credential_name(name) and not any(
        fnmatch.fnmatchcase(name, pattern) for pattern in patterns
    )


def pass_env_problem(pattern: str) -> str | None:
    """Why ``pattern`` (a ``--pass-env`` value) cannot name a variable, or None."""
    if "=" in pattern:
        return (
            f"--pass-env {pattern!r}: names a variable of the worker for tasks to inherit "
            "(NAME or a shell pattern); to give tasks a value, push them with -e KEY=VALUE"
        )
    if not pattern or any(c.isspace() for c in pattern):
        return f"--pass-env {pattern!r}: a variable name or shell pattern has no spaces"
    return None


def unmatched_pass_env(
    patterns: Iterable[str], environ: Mapping[str, str] | None = None
) -> list[str]:
    """The ``--pass-env`` names or patterns that match no variable of ``environ``
    (default: the worker's): a typo there silently passes nothing."""
    source = os.environ if environ is None else environ
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in source)]
