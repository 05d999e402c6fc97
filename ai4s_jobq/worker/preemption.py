"""Eviction notices: watch Azure Scheduled Events and tell the worker to give tasks back.

Spot / low-priority VMs (Azure ML, Batch, VM scale sets, AKS node pools) get a
``Preempt`` event about 30 s before they are taken away, and every Azure VM gets
``Terminate`` (scale-in, deletion) and optionally ``Reboot`` / ``Redeploy``
(maintenance) events, through the Instance Metadata Service (IMDS)::

    GET http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01
    Metadata: true

A worker that reads them can stop taking tasks, SIGTERM its running tasks so they
checkpoint, and give their messages back at once -- instead of vanishing and having
the broker redeliver them only when their locks expire.

The policy (``--preemption``):

* ``off`` -- never ask;
* ``auto`` (default) -- on an Azure VM (its DMI chassis asset tag, which every Azure VM
  carries, Azure ML and Batch nodes and AKS nodes included) or with
  ``JOBQ_IMDS_ENDPOINT`` set, probe the endpoint once with a short timeout and watch
  only if it answers.  Elsewhere -- a laptop, CI, another cloud -- it sends nothing at
  all: no request to a link-local address from machines that have no IMDS;
* ``imds`` -- always watch (a failed probe is logged, polling goes on).

Polled about once a second, in a thread (the standard library's ``urllib``: one tiny
request a second does not justify a client session).  Only events whose
``Resources`` name this VM (IMDS ``compute/name``) count; when the name cannot be
read, every event counts (a false alarm costs a requeue, a missed one a lost node).
``JOBQ_IMDS_ENDPOINT`` replaces ``http://169.254.169.254`` (tests, proxies).  The
event is acknowledged (``StartRequests``: "go ahead now") only with ``--preemption-ack``,
after the worker has given its tasks back.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("ai4s_jobq.worker")

DEFAULT_ENDPOINT = "http://169.254.169.254"
EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"
NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
EVICTION_EVENTS = ("Preempt", "Terminate")
MAINTENANCE_EVENTS = ("Reboot", "Redeploy")
PROBE_TIMEOUT = 1.0
#: The chassis asset tag Azure sets on every VM (read from DMI; Linux only).
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
DMI_ASSET_TAG_FILE = "/sys/class/dmi/id/chassis_asset_tag"
POLL_INTERVAL = 1.0
PREEMPTION_MODES = ("off", "auto", "imds")
POLL_TIMEOUT = 2.0
#: Kept in hand before the notice's deadline to give messages back.
DEADLINE_MARGIN = 3.0


@dataclass(frozen=True)
class PreemptionPolicy:
    mode: str = "auto"  # off | auto | imds
    event_types: tuple[str, ...] = EVICTION_EVENTS
    acknowledge: bool = False
    endpoint: str = field(
        default_factory=lambda: (
            os.environ.get("JOBQ_IMDS_ENDPOINT", "").strip().rstrip("/") or DEFAULT_ENDPOINT
        )
    )
    interval: float = POLL_INTERVAL

    def __post_init__(self) -> None:
        # an unknown mode watched as if "imds" (only "off" and "auto" are tested for)
        if self.mode not in PREEMPTION_MODES:
            raise ValueError(
                f"preemption mode must be one of {PREEMPTION_MODES}, not {self.mode!r}"
            )
        if self.mode != "off" and not self.endpoint.lower().startswith(("http://", "https://")):
            raise ValueError(
                f"the Scheduled Events endpoint {self.endpoint!r} (JOBQ_IMDS_ENDPOINT) is not "
                "an http:// or https:// URL"
            )
        if not 0 < self.interval < math.inf:
            raise ValueError(
                f"preemption poll interval must be above 0 seconds, not {self.interval}"
            )


@dataclass(frozen=True)
class EvictionNotice:
    event_id: str
    event_type: str
    not_before: float | None  # wall-clock seconds; None: already due

    def seconds_left(self, now: float | None = None) -> float | None:
        if self.not_before is None:
            return None
        return self.not_before - (time.time() if now is None else now)


class PreemptionWatcher:
    """Polls Scheduled Events and calls ``on_notice`` once, on the first eviction."""

    def __init__(self, policy: PreemptionPolicy, on_notice: Callable[[EvictionNotice], None]):
        self.policy = policy
        self.on_notice = on_notice
        self.notice: EvictionNotice | None = None
        self._vm_name: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start watching in the background (the probe never delays the worker)."""
        if self.policy.mode != "off":
            self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        if self.policy.mode == "auto" and not _may_have_imds(self.policy.endpoint):
            log.debug("not an Azure VM: preemption watch off")
            return
        answered = await _in_daemon_thread(self._probe)
        if not answered:
            if self.policy.mode == "auto":
                log.debug("no Scheduled Events at %s: preemption watch off", self.policy.endpoint)
                return
            log.warning(
                "Scheduled Events endpoint %s did not answer; watching anyway (--preemption imds)",
                self.policy.endpoint,
            )
        log.info(
            "watching Azure Scheduled Events at %s for %s",
            self.policy.endpoint,
            "/".join(self.policy.event_types),
        )
        await self._poll()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    async def acknowledge(self) -> None:
        """Tell the platform it may go ahead now (only with ``--preemption-ack``)."""
        if not self.policy.acknowledge or self.notice is None:
            return
        body = json.dumps({"StartRequests": [{"EventId": self.notice.event_id}]}).encode()
        try:
            await _in_daemon_thread(self._request, EVENTS_PATH, body, POLL_TIMEOUT)
            log.info("acknowledged scheduled event %s", self.notice.event_id)
        except OSError as exc:
            log.warning("could not acknowledge scheduled event %s: %s", self.notice.event_id, exc)

    # -------------------------------------------------------------- polling

    def _probe(self) -> bool:
        try:
            self._request(EVENTS_PATH, None, PROBE_TIMEOUT)
        except (OSError, ValueError):
            return False
        try:
            self._vm_name = self._request(NAME_PATH, None, PROBE_TIMEOUT).decode().strip() or None
        except (OSError, ValueError):
            self._vm_name = None
        return True

    async def _poll(self) -> None:
        failures = 0
        while self.notice is None:
            try:
                raw = await _in_daemon_thread(self._request, EVENTS_PATH, None, POLL_TIMEOUT)
                notice = self._eviction(json.loads(raw))
                failures = 0
            except (OSError, ValueError) as exc:
                failures += 1
                if failures in (1, 10) or failures % 300 == 0:
                    log.warning("reading Scheduled Events failed (%s); still watching", exc)
                notice = None
            if notice is not None:
                self.notice = notice
                self.on_notice(notice)
                return
            await asyncio.sleep(self.policy.interval)

    def _eviction(self, document: Any) -> EvictionNotice | None:
        events = document.get("Events") if isinstance(document, dict) else None
        for event in events if isinstance(events, list) else []:
            if not isinstance(event, dict) or event.get("EventType") not in self.policy.event_types:
                continue
            resources = event.get("Resources") or []
            if self._vm_name and resources and self._vm_name not in resources:
                continue
            return EvictionNotice(
                event_id=str(event.get("EventId", "")),
                event_type=str(event["EventType"]),
                not_before=_parse_time(event.get("NotBefore")),
            )
        return None

    def _request(self, path: str, body: bytes | None, timeout: float) -> bytes:
        request = urllib.request.Request(
            self.policy.endpoint + path,
            data=body,
            headers={"Metadata": "true", **({"Content-Type": "application/json"} if body else {})},
            method="POST" if body is not None else "GET",
        )
        # IMDS must never go through a proxy (Azure's documented requirement).
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=timeout) as response:
            data: bytes = response.read()
            return data


def _may_have_imds(endpoint: str) -> bool:
    """Whether ``auto`` should probe: an endpoint set by hand, or a VM that says it
    runs on Azure."""
    if endpoint != DEFAULT_ENDPOINT:
        return True
    try:
        with open(DMI_ASSET_TAG_FILE, encoding="ascii", errors="replace") as tag:
            return tag.read().strip() == AZURE_ASSET_TAG
    except OSError:
        return False


async def _in_daemon_thread(function: Callable[..., T], *args: Any) -> T:
    """Run a blocking call in a daemon thread of its own, not the loop's default
    executor: ``asyncio.run`` waits for that executor at exit, and a probe of an
    address that does not answer would hold every short-lived worker up to its timeout."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            error = exc
            call = lambda: deliver(lambda: future.set_exception(error))  # noqa: E731
        else:
            call = lambda: deliver(lambda: future.set_result(result))  # noqa: E731
        try:
            loop.call_soon_threadsafe(call)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass

    threading.Thread(target=run, name="jobq-imds", daemon=True).start()
    return await future


def _parse_time(value: Any) -> float | None:
    """``NotBefore`` is an RFC 1123 date ("Mon, 19 Sep 2016 18:29:47 GMT") or empty."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def grace_for(notice: EvictionNotice, grace_period: float) -> float:
    """How long running tasks get after SIGTERM: ``grace_period``, but never past the
    notice's deadline (less a margin to give the messages back)."""
    left = notice.seconds_left()
    if left is None:
        return min(grace_period, DEADLINE_MARGIN)
    return max(0.0, min(grace_period, left - DEADLINE_MARGIN))
