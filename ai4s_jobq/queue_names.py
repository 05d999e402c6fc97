"""Queue-name rules, per backend, checked before any call to a broker.

Why a module of its own: the same rules serve the client (``spec.parse_spec``,
so a typo is reported at once instead of as a broker's 400 after a network
round trip, or not at all when the broker accepts what Azure would refuse) and
the Service Bus emulator (which must refuse what Azure refuses).  One function,
:func:`validate_queue_name`, is the single place the rules live.

* Service Bus (``servicebus``): 1-260 characters; letters, digits, ``.``, ``-``,
  ``_`` and ``/``; ``/`` only inside (no leading, trailing or doubled ``/``: a
  ``/`` separates path segments, none of which may be empty).  Names are
  case-insensitive on Azure (``Jobs`` and ``jobs`` are one queue), so case is
  kept as given.
* Storage Queue (``storage``): 3-63 characters; lowercase letters, digits and
  ``-``; starts and ends with a letter or digit; no ``--``.  jobq keeps each
  queue's dead letters in a sibling ``NAME-failed``, so a queue name may be at
  most 56 characters (its ``-failed`` sibling must fit in 63) and a name ending
  in ``-failed`` is reserved: it is some queue's dead-letter queue.
* local (``local``): 1-128 characters; letters, digits, ``.``, ``_``, ``-``,
  starting with a letter or digit (the name is also the file name).
"""

from __future__ import annotations

import re

SERVICEBUS_MAX = 260
STORAGE_MIN, STORAGE_MAX = 3, 63
STORAGE_DLQ_SUFFIX = "-failed"
LOCAL_MAX = 128

_SERVICEBUS_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_STORAGE = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_LOCAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class QueueNameError(ValueError):
    """A queue name the backend (or jobq's use of it) does not allow."""


def validate_queue_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a valid queue name for backend ``kind`` ("servicebus",
    "storage" or "local"); raise :class:`QueueNameError` saying which rule it breaks."""
    if kind == "servicebus":
        _check_servicebus(name)
    elif kind == "storage":
        _check_storage(name)
    elif kind == "local":
        _check_local(name)
    else:
        raise ValueError(f"unknown backend kind {kind!r}")
    return name


def _check_servicebus(name: str) -> None:
    rule = (
        f"a Service Bus queue name has 1-{SERVICEBUS_MAX} letters, digits, '.', '-', '_' "
        "or '/' ('/' only between non-empty parts)"
    )
    if not name or len(name) > SERVICEBUS_MAX:
        raise QueueNameError(f"{name!r} has {len(name)} characters: {rule}")
    if not all(_SERVICEBUS_SEGMENT.fullmatch(part) for part in name.split("/")):
        raise QueueNameError(f"{name!r}: {rule}")


def _check_storage(name: str) -> None:
    rule = (
        "a Storage queue name has 3-63 lowercase letters, digits or single '-', "
        "starting and ending with a letter or digit"
    )
    if not STORAGE_MIN <= len(name) <= STORAGE_MAX:
        raise QueueNameError(f"{name!r} has {len(name)} characters: {rule}")
    if not _STORAGE.fullmatch(name) or "--" in name:
        hint = f" (try {name.lower()!r})" if _STORAGE.fullmatch(name.lower()) else ""
        raise QueueNameError(f"{name!r}: {rule}{hint}")
    if name.endswith(STORAGE_DLQ_SUFFIX):
        base = name[: -len(STORAGE_DLQ_SUFFIX)]
        raise QueueNameError(
            f"{name!r} is reserved: jobq keeps the dead letters of queue {base!r} there. "
            f"Use `jobq --queue ACCOUNT/{base} dlq list` to read them, or pick another name"
        )
    if len(name) > STORAGE_MAX - len(STORAGE_DLQ_SUFFIX):
        raise QueueNameError(
            f"{name!r} has {len(name)} characters: at most "
            f"{STORAGE_MAX - len(STORAGE_DLQ_SUFFIX)}, so that its dead-letter queue "
            f"{name + STORAGE_DLQ_SUFFIX!r} fits Azure's 63-character limit"
        )


def _check_local(name: str) -> None:
    if not _LOCAL.fullmatch(name) or len(name) > LOCAL_MAX:
        raise QueueNameError(
            f"{name!r}: a local queue name has 1-{LOCAL_MAX} letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
