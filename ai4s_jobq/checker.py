"""The startup checker: does the queue deduplicate the way the producer expects?

Deterministic IDs only prevent duplicate work when the queue drops repeated IDs.
The checker compares the queue's duplicate-detection setting with
``JOBQ_DETERMINISTIC_IDS`` and with an explicitly configured window, and says
how to fix each disagreement.  It is best effort: if the settings cannot be read
(e.g. no Manage rights on Service Bus) it reports that and moves on.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import timedelta

from .backends.base import DedupInfo
from .durations import format_duration

log = logging.getLogger("ai4s_jobq.checker")

_RECREATE_FIX = {
    "servicebus": (
        "Azure cannot enable duplicate detection on an existing queue: create a new queue "
        "(jobq creates queues with it on) and move the messages with "
        "`jobq migrate --to sb://NAMESPACE/NEWQUEUE`."
    ),
    "storage": "Push with --dedup-window to turn on the application-side dedup ledger.",
    "local": "Create a new local queue (jobq push creates it with duplicate detection) and "
    "move the messages with `jobq migrate --to local://NEWQUEUE`.",
}


@dataclass
class Finding:
    level: str  # "ok", "info", "warning"
    code: str
    message: str
    fix: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def evaluate(
    info: DedupInfo,
    queue: str,
    *,
    deterministic: bool,
    configured_window: timedelta | None,
) -> list[Finding]:
    """All findings for one queue; an empty list never happens (at least "ok")."""
    if not info.queue_exists:
        return [
            Finding(
                "info",
                "missing",
                f"queue {queue} does not exist yet",
                "it is created with duplicate detection by the first push",
            )
        ]
    if info.duplicate_detection is None:
        return [
            Finding(
                "info",
                "unreadable",
                f"could not read the duplicate-detection settings of {queue}"
                + (f": {info.note}" if info.note else ""),
                "grant Manage rights to run the check, or run `jobq check` as an owner",
            )
        ]
    findings: list[Finding] = []
    if deterministic and not info.duplicate_detection:
        findings.append(
            Finding(
                "warning",
                "no-dedup",
                f"deterministic task IDs are on, but {queue} has no duplicate detection: "
                "messages will NOT be deduplicated",
                _RECREATE_FIX.get(info.backend),
            )
        )
    if info.duplicate_detection and not deterministic:
        findings.append(
            Finding(
                "warning",
                "random-ids",
                f"{queue} has duplicate detection, but JOBQ_DETERMINISTIC_IDS is off: "
                "random IDs: duplicate detection has no effect",
                "unset JOBQ_DETERMINISTIC_IDS (or set it to true) to get deterministic IDs",
            )
        )
    if (
        info.duplicate_detection
        and configured_window is not None
        and info.window is not None
        and abs(info.window - configured_window) > timedelta(seconds=1)
    ):
        findings.append(
            Finding(
                "warning",
                "window-mismatch",
                f"{queue} deduplicates over {format_duration(info.window)}, but "
                f"{format_duration(configured_window)} was configured: the queue's window applies",
                "pass the queue's window (--dedup-window / dedup_window=), or change the queue's "
                "duplicate-detection history window with your broker's admin tools",
            )
        )
    if not findings:
        what = (
            f"deduplicates over {format_duration(info.window)} ({info.mechanism})"
            if info.duplicate_detection and info.window
            else "has no duplicate detection"
        )
        ids = "deterministic" if deterministic else "random"
        findings.append(Finding("ok", "consistent", f"{queue} {what}; task IDs are {ids}"))
    return findings


def log_findings(findings: list[Finding]) -> None:
    for finding in findings:
        text = finding.message + (f". Fix: {finding.fix}" if finding.fix else "")
        if finding.level == "warning":
            log.warning(text)
        else:
            log.debug(text)
