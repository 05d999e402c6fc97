"""Tasks queued by the original ai4s-jobq (3.x, on PyPI), run by our worker.

Users of ai4s-jobq have queues full of its messages.  ``Task.from_body`` hands
any JSON object without our ``args`` but with their ``kwargs`` to
:func:`decode_legacy`, so ``jobq worker`` drains such a queue like one of ours,
on Service Bus and Storage Queue alike (``jobq peek``/``dlq list`` show the
decoded task too).  This module imports nothing from the rest of jobq, so
``task.py`` can import it without a cycle.

What their producer writes (``ai4s.jobq.entities.Task.serialize``, read from
ai4s-jobq 3.13.1), as the message text on Storage Queue and the body (with
MessageId = the task ID) on Service Bus::

    {"version": 1, "reply_requested": false,
     "kwargs": "<the keyword arguments, themselves JSON-encoded into a string>",
     "num_retries": 0, "id": "<32 hex digits>"}

Version 0 has no ``reply_requested``.  How their worker runs a task, and how we
keep that:

* **Arguments.**  ``kwargs`` is decoded and becomes the task's ``args``: a Python
  task (``--proc``) is called with them as keyword arguments, as their
  processor's ``__call__(**kwargs)`` was.  Their ``--proc`` names a Processor
  class; ours names a function (docs/migrating-from-ai4s-jobq.md says how to
  wrap one).
* **Shell tasks** are those their ``ShellCommandProcessor`` can run: a ``cmd``
  string and nothing but ``env``, ``cwd`` and ``bg_dirsync_to`` besides.  They
  ran under ``bash -c`` (``bash --login -c`` when the worker has
  ``JOBQ_USE_LOGIN_SHELL`` set), with ``PYTHONUNBUFFERED=1`` unless the task's
  env says otherwise; ours run under ``/bin/sh -c``, so the command is wrapped
  in ``exec bash -c '<cmd>'`` (when bash is installed; their fallback without
  bash was the default shell too).  The original command stays in
  ``extra["legacy"]["cmd"]``.  ``bg_dirsync_to`` (a folder their worker synced
  in the background) cannot be honoured: a shell task that sets it is rejected
  (dead-lettered as MalformedTask, with that reason) rather than run without
  its output being copied.  ``bg_dirsync_to: null``, which their CLI adds to
  every task, is dropped.
* **Task ID** and **retry budget** are kept: ``id`` is our task ID, and
  ``num_retries`` means the same (retries after the first attempt).  Their IDs
  are MD5s of *their* envelope, so a task pushed by ``jobq push`` never
  deduplicates against the same work queued by ai4s-jobq.
* ``reply_requested`` (their ``push --wait``) is kept in ``extra`` and
  otherwise ignored: no reply is sent.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import dataclass, field
from typing import Any

#: the keys their shell processor accepts (``ShellCommandProcessor.__call__``)
SHELL_KEYS = frozenset({"cmd", "env", "cwd", "bg_dirsync_to"})
LOGIN_SHELL_ENV = "JOBQ_USE_LOGIN_SHELL"
VERSIONS = (0, 1)


class LegacyFormatError(ValueError):
    """An ai4s-jobq envelope that cannot become a task (the reason says why)."""


@dataclass(frozen=True)
class LegacyTask:
    id: str
    args: dict[str, Any]
    num_retries: int
    extra: dict[str, Any] = field(default_factory=dict)


def is_legacy(envelope: dict[str, Any]) -> bool:
    """True for an ai4s-jobq 3.x envelope (never for one of ours, which has ``args``)."""
    return "args" not in envelope and "kwargs" in envelope and "version" in envelope


def decode_legacy(envelope: dict[str, Any]) -> LegacyTask:
    version = envelope.get("version")
    if version not in VERSIONS or isinstance(version, bool):
        raise LegacyFormatError(f"ai4s-jobq envelope version {version!r} is not 0 or 1")
    task_id, encoded = envelope.get("id"), envelope.get("kwargs")
    num_retries = envelope.get("num_retries", 0)
    if not isinstance(task_id, str) or not task_id:
        raise LegacyFormatError("ai4s-jobq envelope has no 'id' string")
    if not isinstance(num_retries, int) or isinstance(num_retries, bool) or num_retries < 0:
        raise LegacyFormatError("ai4s-jobq envelope's 'num_retries' is not a non-negative integer")
    if not isinstance(encoded, str):
        raise LegacyFormatError("ai4s-jobq envelope's 'kwargs' is not a JSON string")
    try:
        kwargs = json.loads(encoded)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise LegacyFormatError(f"ai4s-jobq envelope's 'kwargs' is not JSON ({exc})") from None
    if not isinstance(kwargs, dict):
        raise LegacyFormatError("ai4s-jobq envelope's 'kwargs' is not a JSON object")
    legacy: dict[str, Any] = {"format": "ai4s-jobq", "version": version}
    if envelope.get("reply_requested"):
        legacy["reply_requested"] = True
    args = _shell_args(kwargs, legacy) if _is_shell_task(kwargs) else kwargs
    return LegacyTask(task_id, args, num_retries, {"legacy": legacy})


def _is_shell_task(kwargs: dict[str, Any]) -> bool:
    return isinstance(kwargs.get("cmd"), str) and set(kwargs) <= SHELL_KEYS


def _shell_args(kwargs: dict[str, Any], legacy: dict[str, Any]) -> dict[str, Any]:
    if kwargs.get("bg_dirsync_to"):
        raise LegacyFormatError(
            "ai4s-jobq task sets bg_dirsync_to (background sync of its output folder), "
            "which jobq does not do; run it with ai4s-jobq, or push it again without it"
        )
    env = kwargs.get("env") or {}
    if not isinstance(env, dict):
        raise LegacyFormatError("ai4s-jobq shell task's 'env' is not an object")
    cmd: str = kwargs["cmd"]
    legacy["cmd"] = cmd
    args: dict[str, Any] = {
        "cmd": _in_bash(cmd),
        "env": {"PYTHONUNBUFFERED": "1", **{str(k): str(v) for k, v in env.items()}},
    }
    if kwargs.get("cwd") is not None:
        args["cwd"] = kwargs["cwd"]
    return args


def _in_bash(cmd: str) -> str:
    if shutil.which("bash") is None:
        return cmd
    login = os.environ.get(LOGIN_SHELL_ENV, "0").lower() in ("1", "true", "yes")
    return f"exec bash {'--login ' if login else ''}-c {shlex.quote(cmd)}"
