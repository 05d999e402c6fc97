"""Tasks and their wire envelope.

A task is a dict of keyword arguments for a processor plus a retry budget.  A
shell task is ``{"cmd": "...", "env": {...}}``.  On the queue a task travels as
a small JSON envelope::

    {"v": 1, "id": "<task id>", "args": {...}, "num_retries": 2}

Only ``args`` (or the ``dedup_keys`` subset of it) is hashed into the ID: the
retry budget says how hard to try, not what the work is, so re-pushing the same
work with another budget still deduplicates.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .ids import IdentifiedArgs, TaskEncodingError, identify, json_string
from .legacy import LegacyFormatError, decode_legacy, is_legacy

ENVELOPE_VERSION = 1
DEFAULT_NUM_RETRIES = 2
#: A retry budget beyond this is a mistake, not a policy (and a huge one would
#: overflow the brokers' delivery counters).
MAX_NUM_RETRIES = 1000


# Built once: ``json.dumps`` with options builds an encoder per call.
# Sorted keys: the envelope's "args" is then exactly the canonical text that was
# hashed into the ID (when the ID was computed from all arguments).
_ENVELOPE_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class MalformedTaskError(ValueError):
    """A queue message that is not a task envelope we can run."""


@dataclass(frozen=True)
class Task:
    id: str
    args: dict[str, Any]
    num_retries: int = DEFAULT_NUM_RETRIES
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    #: The canonical JSON of ``args`` when it is already known (it was hashed into the
    #: ID), so :meth:`to_body` need not encode the arguments a second time.
    args_json: str | None = field(default=None, compare=False, repr=False)

    @property
    def is_shell(self) -> bool:
        return "cmd" in self.args

    @property
    def max_attempts(self) -> int:
        return self.num_retries + 1

    def to_body(self) -> bytes:
        if self.args_json is not None and not self.extra and type(self.num_retries) is int:
            # The envelope's keys in sorted order, as _ENVELOPE_JSON writes them; the
            # arguments' canonical text is what that encoder would write for them.
            return (
                f'{{"args":{self.args_json},"id":{json_string(self.id)},'
                f'"num_retries":{self.num_retries},"v":{ENVELOPE_VERSION}}}'
            ).encode()
        envelope = {
            "v": ENVELOPE_VERSION,
            "id": self.id,
            "args": self.args,
            "num_retries": self.num_retries,
            **self.extra,
        }
        return _ENVELOPE_JSON.encode(envelope).encode("utf-8")

    @classmethod
    def from_body(cls, body: bytes) -> Task:
        """The task a message body carries.  Any body that is not one (whatever the
        reason: not UTF-8, not JSON, nested too deep for the decoder, an integer
        beyond Python's conversion limit, a wrong type) raises
        :class:`MalformedTaskError` and nothing else, so a worker can always
        dead-letter it instead of leaving it to come back forever."""
        try:
            return cls._from_body(body)
        except MalformedTaskError:
            raise
        except RecursionError:
            raise MalformedTaskError("message body is nested too deeply to decode") from None
        except Exception as exc:  # noqa: BLE001 - any undecodable body is malformed
            raise MalformedTaskError(
                f"message body cannot be decoded ({type(exc).__name__}: {str(exc)[:200]})"
            ) from None

    @classmethod
    def _from_body(cls, body: bytes) -> Task:
        if not isinstance(body, (bytes, bytearray, memoryview)):
            raise MalformedTaskError(f"message body is {type(body).__name__}, not bytes")
        try:
            envelope = json.loads(bytes(body).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise MalformedTaskError(f"message body is not UTF-8 text ({exc})") from None
        except json.JSONDecodeError as exc:
            raise MalformedTaskError(f"message body is not JSON ({exc})") from None
        if not isinstance(envelope, dict):
            raise MalformedTaskError("message body is not a JSON object")
        if is_legacy(envelope):  # queued by the original ai4s-jobq 3.x (see legacy.py)
            try:
                old = decode_legacy(envelope)
            except LegacyFormatError as exc:
                raise MalformedTaskError(str(exc)) from None
            return cls(id=old.id, args=old.args, num_retries=old.num_retries, extra=old.extra)
        task_id, args = envelope.get("id"), envelope.get("args")
        num_retries = envelope.get("num_retries", DEFAULT_NUM_RETRIES)
        if not isinstance(task_id, str) or not task_id:
            raise MalformedTaskError("task envelope has no 'id' string")
        if not isinstance(args, dict):
            raise MalformedTaskError("task envelope has no 'args' object")
        if not isinstance(num_retries, int) or isinstance(num_retries, bool) or num_retries < 0:
            raise MalformedTaskError("task envelope's 'num_retries' is not a non-negative integer")
        if num_retries > MAX_NUM_RETRIES:
            raise MalformedTaskError(
                f"task envelope's 'num_retries' is {num_retries}; at most {MAX_NUM_RETRIES}"
            )
        extra = {k: v for k, v in envelope.items() if k not in ("v", "id", "args", "num_retries")}
        return cls(id=task_id, args=args, num_retries=num_retries, extra=extra)


def bad_env_name(env: Mapping[Any, Any], *, empty_ok: bool = False) -> str | None:
    """Why one of ``env``'s names cannot be set in a process environment (``=`` or a
    NUL byte in it, or empty unless ``empty_ok``), or None.  Checked at push, so that
    such a task is refused before it is queued, and again by the worker, for messages
    pushed by other producers: there it fails at once, without retries (an empty name,
    with which such tasks always ran, is let through there)."""
    for name, value in env.items():
        text = str(name)
        if (not text and not empty_ok) or "=" in text or "\0" in text:
            return f"{text!r} cannot be an environment variable name"
        if "\0" in str(value):
            return f"the value of {text} has a NUL byte"
    return None


def task_args(
    task: str | Mapping[str, Any], env: Mapping[str, str] | None = None
) -> Mapping[str, Any]:
    """A shell command string becomes ``{"cmd": ...}``; a mapping is used as is -- not
    copied unless ``env`` is merged in, since :func:`~ai4s_jobq.ids.identify` builds a
    normalized copy anyway."""
    if isinstance(task, str):
        if not task.strip():
            raise ValueError("a shell task needs a non-empty command")
        args: dict[str, Any] = {"cmd": task}
    elif type(task) is dict or isinstance(task, Mapping):
        if not env:
            return task
        args = dict(task)
    else:
        raise TypeError(
            f"a task is a shell command string or a dict of arguments, not {type(task).__name__}"
        )
    if env:
        problem = bad_env_name(env)
        if problem is not None:
            raise ValueError(f"env: {problem}")
        args["env"] = {**args.get("env", {}), **env}
    return args


def make_task(
    task: str | Mapping[str, Any] | Task,
    *,
    num_retries: int | None = None,
    id: str | None = None,
    dedup_keys: Iterable[str] | None = None,
    deterministic: bool | None = None,
    env: Mapping[str, str] | None = None,
) -> Task:
    """Build a :class:`Task`, computing its ID (see :func:`ai4s_jobq.ids.identify`)."""
    if isinstance(task, Task):
        return task
    if num_retries is not None and (
        not isinstance(num_retries, int)
        or isinstance(num_retries, bool)
        or not 0 <= num_retries <= MAX_NUM_RETRIES
    ):
        raise ValueError(f"num_retries must be an integer from 0 to {MAX_NUM_RETRIES}")
    try:
        identified: IdentifiedArgs = identify(
            task_args(task, env), id=id, dedup_keys=dedup_keys, deterministic=deterministic
        )
    except RecursionError:  # a reported bad task, like any other that cannot be encoded
        raise TaskEncodingError("the task's arguments are nested too deeply to encode") from None
    return Task(
        id=identified.id,
        args=identified.args,
        num_retries=DEFAULT_NUM_RETRIES if num_retries is None else num_retries,
        args_json=identified.hashed if identified.how == "content" else None,
    )
