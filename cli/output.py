"""Printing tasks for ``peek`` and ``dlq list``."""

from __future__ import annotations

import json
from typing import Any

import click

from ai4s_jobq.jobq import DeadLetteredTask
from ai4s_jobq.worker.attempts import RunCounters


def task_dict(item: DeadLetteredTask) -> dict[str, Any]:
    out: dict[str, Any] = {
        "message_id": item.message_id,
        "delivery_count": item.delivery_count,
    }
    if item.task is not None:
        out.update(id=item.task.id, args=item.task.args, num_retries=item.task.num_retries)
        counters = RunCounters.of(item.task)
        out.update(attempt=counters.attempt, interruptions=counters.interruptions)
    else:
        out["raw"] = item.raw.decode("utf-8", "replace")[:1000]
    if item.reason or item.description:
        out.update(reason=item.reason, description=item.description)
    return out


def print_tasks(items: list[DeadLetteredTask], *, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([task_dict(i) for i in items]))
        return
    if not items:
        click.echo("(empty)")
    for item in items:
        if item.task is not None:
            what = item.task.args.get("cmd") or json.dumps(item.task.args, sort_keys=True)
            counters = RunCounters.of(item.task)
            click.echo(
                f"{item.task.id}  attempt={counters.attempt}"
                f"  interruptions={counters.interruptions}  {what}"
            )
        else:
            click.echo(f"{item.message_id}  (not a task) {item.raw[:80]!r}")
        if item.reason or item.description:
            first = (item.description or "").strip().splitlines()
            detail = first[0] if first else ""
            if item.reason and detail.startswith(f"{item.reason}: "):
                detail = detail[len(item.reason) + 2 :]  # a Python error names its type
            click.echo(f"    reason: {item.reason}" + (f": {detail}" if detail else ""))
