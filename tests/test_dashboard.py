"""The dashboard without a browser: snapshot gathering over a real local queue drained
by a real worker, the charts' geometry, the HTTP routes (through a real aiohttp server
on a free 127.0.0.1 port), escaping of user data, and the ``jobq dashboard`` command's
binding rules and errors.  What a person sees in a browser is in
``test_dashboard_browser.py``."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from conftest import ROOT, jobq_cli
from dashboard_support import (
    DEAD_LETTERED,
    FAILURE_TEXT,
    QUEUED,
    SUCCEEDED,
    KnownOutcomes,
    make_known_outcomes,
    run_worker,
)

from ai4s_jobq import JobQ
from ai4s_jobq.dashboard import charts
from ai4s_jobq.dashboard.server import Dashboard, is_loopback
from ai4s_jobq.dashboard.snapshot import (
    DepthHistory,
    DepthSample,
    DurationStats,
    QueueSource,
    collect,
    format_duration,
    worker_state,
)
from ai4s_jobq.ledger.base import WorkerRecord
from ai4s_jobq.ledger.sqlite_store import SqliteLedger


@pytest.fixture
async def known(local_dir: Path) -> AsyncIterator[KnownOutcomes]:
    async with JobQ.open("local://dash", check=False) as q:
        yield await make_known_outcomes(q)


# ---------------------------------------------------------------------- snapshot


async def test_snapshot_of_known_outcomes(known: KnownOutcomes):
    snap = await collect(known.source)
    assert (snap.active, snap.dead_letter) == (QUEUED, DEAD_LETTERED)
    assert snap.status is not None
    assert snap.status.counts["succeeded"] == SUCCEEDED
    assert snap.status.counts["dead_lettered"] == DEAD_LETTERED
    assert snap.status.counts["queued"] == QUEUED
    by_tag = {t.tag: t for t in snap.tag_outcomes}
    assert by_tag["run-1"].counts == {"succeeded": SUCCEEDED, "dead_lettered": DEAD_LETTERED}
    assert by_tag["run-2"].counts == {"queued": QUEUED}
    (failure,) = snap.failures
    assert failure.reason == "NonZeroExit" and failure.count == DEAD_LETTERED
    assert set(failure.example_ids) == set(known.failed_ids)
    assert FAILURE_TEXT in (failure.example_summary or "")
    assert snap.durations is not None and snap.durations.count == SUCCEEDED
    assert [w.state for w in snap.workers] == ["stopped"]
    assert snap.workers[0].record.tasks_done == SUCCEEDED + DEAD_LETTERED
    assert {d.task_id for d in snap.dead_letters} == set(known.failed_ids)
    assert all(d.reason == "NonZeroExit" for d in snap.dead_letters)
    # Rate from the ledger: six tasks became final within the window.
    assert snap.rate_source == "ledger"
    assert snap.rate_per_second == pytest.approx(6 / 300)
    assert snap.eta_seconds == pytest.approx(QUEUED / (6 / 300))
    assert len(snap.history) == 1  # collecting read the counts once


async def test_snapshot_without_ledger_uses_counts_alone(known: KnownOutcomes):
    source = QueueSource(known.source.name, known.source.queue, None, "no ledger here")
    first = await collect(source)
    assert first.status is None and not first.has_ledger
    assert first.ledger_error == "no ledger here"
    assert first.rate_per_second is None  # one sample says nothing about speed
    # Drain one task between two samples: the net drain rate is positive.
    (message,) = await known.source.queue.backend.receive(1, 1.0)
    await known.source.queue.backend.complete(message)
    second = await collect(source)
    assert second.active == QUEUED - 1
    assert second.rate_source == "queue depth"
    assert second.rate_per_second is not None and second.rate_per_second > 0
    assert second.eta_seconds is not None and second.eta_seconds > 0


async def test_a_failing_ledger_is_shown_not_raised(known: KnownOutcomes):
    class Broken(SqliteLedger):
        async def status(self, tag=None, *, window_minutes=5.0):  # type: ignore[override]
            raise ConnectionError("table endpoint unreachable")

    ledger = known.source.ledger
    assert isinstance(ledger, SqliteLedger)
    broken = Broken(ledger.path)
    try:
        snap = await collect(QueueSource("q", known.source.queue, broken))
    finally:
        await broken.close()
    assert snap.has_ledger and snap.status is None
    assert "ConnectionError: table endpoint unreachable" in (snap.ledger_error or "")
    assert snap.active == QUEUED  # the counts still show


def test_depth_history_drain_rate():
    history = DepthHistory(maxlen=3)
    for at, active in ((0, 100), (10, 90), (20, 70), (30, 40)):
        history.add(DepthSample(at, active, 0))
    assert len(history) == 3  # bounded
    assert history.drain_rate(60, now=30) == pytest.approx((90 - 40) / 20)
    assert history.drain_rate(5, now=30) is None  # one sample in the window
    history.add(DepthSample(40, 60, 0))  # pushes outpaced the drain
    assert history.drain_rate(15, now=40) == 0


def test_duration_stats_quantiles_and_scale():
    stats = DurationStats.of([float(i) for i in range(1, 101)])
    assert stats is not None
    assert (stats.count, stats.p50, stats.p90, stats.max) == (100, 51.0, 91.0, 100.0)
    assert sum(c for _, _, c in stats.bins) == 100 and not stats.log_scale
    skewed = DurationStats.of([0.01] * 50 + [100.0])
    assert skewed is not None and skewed.log_scale
    assert skewed.bins[0][2] == 50 and skewed.bins[-1][2] == 1
    assert DurationStats.of([]) is None
    same = DurationStats.of([2.0, 2.0])
    assert same is not None and same.bins[0][2] == 2


def test_worker_state():
    def worker(last_seen: float, stopped: bool = False) -> WorkerRecord:
        return WorkerRecord("w", "h", 1, 1, "q", 0.0, last_seen, stopped=stopped)

    assert worker_state(worker(100.0), now=110.0) == "alive"
    assert worker_state(worker(100.0), now=200.0) == "stale"  # three 15 s heartbeats missed
    assert worker_state(worker(100.0), now=120.0, heartbeat_seconds=5.0) == "stale"
    assert worker_state(worker(100.0, stopped=True), now=101.0) == "stopped"


def test_format_duration():
    assert format_duration(None) == "—"
    assert format_duration(0.25) == "0.25 s"
    assert format_duration(185) == "3 m 05 s"
    assert format_duration(7800) == "2 h 10 m"
    assert format_duration(3 * 86400 + 4 * 3600) == "3 d 4 h"


# ---------------------------------------------------------------------- charts


def test_line_chart_draws_series_and_waits_for_two_samples():
    assert "chart-empty" in charts.line_chart([("active", [(1.0, 5.0)])], label="d", now=1.0)
    svg = charts.line_chart(
        [("active", [(0.0, 0.0), (30.0, 7.0), (60.0, 3.0)])], label="depth", now=60.0
    )
    assert "chart-empty" not in svg
    (points,) = re.findall(r'points="([^"]+)"', svg)
    ys = [float(p.split(",")[1]) for p in points.split()]
    assert ys[1] < ys[2] < ys[0]  # 7 is drawn highest, 0 lowest
    assert ">active 3<" in svg  # the legend shows the current value
    assert ">10<" in svg  # axis maximum: the 1/2/5 ceiling of 7


def test_histogram_and_stacked_bar_geometry():
    svg = charts.histogram([(0, 1, 4), (1, 2, 0), (2, 3, 2)], label="runtime")
    heights = [float(h) for h in re.findall(r'class="bar"[^>]*height="([\d.]+)"', svg)]
    assert heights[0] == pytest.approx(2 * heights[2]) and heights[1] == 0
    bar = charts.stacked_bar({"succeeded": 3, "dead_lettered": 1}, 4, label="t", width=400)
    widths = dict(re.findall(r'data-state="(\w+)" x="[\d.]+" y="0" width="([\d.]+)"', bar))
    assert float(widths["succeeded"]) == pytest.approx(300)
    assert float(widths["dead_lettered"]) == pytest.approx(100)


def test_chart_labels_are_escaped():
    svg = charts.stacked_bar({"queued": 1}, 1, label='<script>"x"</script>')
    assert "<script>" not in svg and "&lt;script&gt;" in svg


# ---------------------------------------------------------------------- HTTP


@pytest.fixture
async def served(known: KnownOutcomes) -> AsyncIterator[tuple[str, KnownOutcomes]]:
    board = Dashboard([known.source], refresh_seconds=2.0, sample_seconds=0.5)
    port = await board.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}", known
    finally:
        await board.stop()


async def test_routes(served: tuple[str, KnownOutcomes]):
    url, known = served
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/") as page:
            assert page.status == 200
            html = await page.text()
            assert "default-src 'none'" in page.headers["Content-Security-Policy"]
        for state, number in (("succeeded", SUCCEEDED), ("dead_lettered", DEAD_LETTERED)):
            assert re.search(rf'id="card-{state}".*?class="value">{number}<', html, re.S)
        assert FAILURE_TEXT in html and f"/task/{known.failed_ids[0]}?q=0" in html
        assert '<meta http-equiv="refresh" content="2">' in html
        # Nothing is loaded from another origin (the page must work offline).
        assert not re.search(r'(src|href)="(https?:)?//', html)

        async with http.get(url + "/fragment") as fragment:
            body = await fragment.text()
            assert fragment.status == 200 and "<html" not in body and 'id="card-active"' in body
        async with http.get(url + "/api/snapshot") as api:
            data = await api.json()
            assert data["counts"]["active"] == QUEUED
            assert data["ledger"]["states"]["succeeded"] == SUCCEEDED
        async with http.get(url + f"/api/task/{known.succeeded_ids[0]}") as task:
            assert (await task.json())["state"] == "succeeded"
        async with http.get(url + f"/task/{known.failed_ids[0]}") as task:
            assert task.status == 200 and FAILURE_TEXT in await task.text()
        async with http.get(url + "/api/task/" + "0" * 32) as missing:
            assert missing.status == 404 and "no record" in (await missing.json())["error"]
        async with http.get(url + "/?q=7") as wrong:
            assert wrong.status == 404 and "no queue number 7" in await wrong.text()
        for asset in ("dashboard.css", "dashboard.js"):
            async with http.get(url + "/static/" + asset) as static:
                assert static.status == 200
                assert "http://" not in (text := await static.text()) and "https://" not in text


async def test_user_data_is_escaped(known: KnownOutcomes):
    """A task's command, error text and tag are user data: a real task that prints
    markup to stderr and fails shows that markup as text, never as HTML."""
    evil = "<img src=x onerror=alert(1)>"
    q = known.source.queue
    bad = await q.push(f"echo '{evil}' >&2; exit 5", num_retries=0, tag=evil)
    await run_worker(q)
    board = Dashboard([known.source])
    port = await board.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/") as page:
                html = await page.text()
            async with http.get(f"http://127.0.0.1:{port}/task/{bad.id}") as task:
                record_html = await task.text()
    finally:
        await board.stop()
    assert evil not in html and evil not in record_html
    escaped = "&lt;img src=x onerror=alert(1)&gt;"
    assert escaped in html and escaped in record_html
    assert html.count(escaped) >= 3  # the tag row, the failure summary, the dead letter


async def test_queue_without_ledger_page(known: KnownOutcomes):
    source = QueueSource(known.source.name, known.source.queue, None, "This queue has no ledger")
    board = Dashboard([source, known.source])
    port = await board.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/?q=0") as page:
                html = await page.text()
            async with http.get(f"http://127.0.0.1:{port}/task/{known.failed_ids[0]}") as t:
                assert t.status == 404 and "no ledger" in await t.text()
    finally:
        await board.stop()
    assert "This queue has no ledger" in html
    assert re.search(r'id="card-active".*?class="value">3<', html, re.S)
    assert 'id="card-succeeded"' not in html  # no ledger, no state counts
    assert "NonZeroExit" in html  # the dead-letter list comes from the queue itself
    assert 'href="/?q=1"' in html  # both queues are in the navigation


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert not is_loopback("example.org")


# ---------------------------------------------------------------------- CLI


def test_cli_refuses_remote_bind_without_flag(local_dir: Path):
    result = jobq_cli("dashboard", "--host", "0.0.0.0", "--port", "0", timeout=30)
    assert result.returncode == 2
    assert "--allow-remote" in result.stderr and "no authentication" in result.stderr
    assert "not a loopback address" in result.stderr


def test_cli_bad_queue_fails_fast(local_dir: Path):
    started = time.monotonic()
    result = jobq_cli("dashboard", "--queue", "local://bad name!", "--port", "0", timeout=30)
    assert result.returncode == 4 and "error:" in result.stderr
    assert time.monotonic() - started < 20


def _start_dashboard(*args: str) -> tuple[subprocess.Popen[str], str, str]:
    """Start ``jobq dashboard`` and read stderr up to its URL line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ai4s_jobq_cli", "dashboard", "--port", "0", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=os.environ.copy(),
    )
    assert process.stderr is not None
    seen = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen += line
        match = re.search(r"(http://\S+/)", line)
        if match:
            return process, match.group(1), seen
    process.kill()
    raise AssertionError(f"jobq dashboard did not start:\n{seen}")


@pytest.mark.slow
async def test_cli_serves_and_stops_on_sigint(known: KnownOutcomes):
    process, url, _ = _start_dashboard("--queue", "local://dash", "--refresh", "3")
    try:
        assert url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as page:
                html = await page.text()
        assert re.search(r'id="card-active".*?class="value">3<', html, re.S)
        assert re.search(r'id="card-dead-letter".*?class="value">2<', html, re.S)
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


@pytest.mark.slow
async def test_cli_remote_bind_warns(known: KnownOutcomes):
    process, url, seen = _start_dashboard(
        "--queue", "local://dash", "--host", "0.0.0.0", "--allow-remote"
    )
    try:
        assert "warning: serving on 0.0.0.0 without authentication" in seen
        assert "port 0 " not in seen  # the warning names the port really bound
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


async def test_pages_do_not_wait_for_a_slow_ledger(known: KnownOutcomes):
    """A gathering stuck on the ledger does not hold up pages: they show the latest
    snapshot (and say when it was taken)."""
    release = asyncio.Event()
    calls = 0

    class Slow(SqliteLedger):
        async def status(self, tag=None, *, window_minutes=5.0):  # type: ignore[override]
            nonlocal calls
            calls += 1
            if calls > 3:  # the first gathering (status + two tags) answers at once
                await release.wait()
            return await super().status(tag, window_minutes=window_minutes)

    ledger = known.source.ledger
    assert isinstance(ledger, SqliteLedger)
    slow = Slow(ledger.path)
    board = Dashboard([QueueSource("q", known.source.queue, slow)], refresh_seconds=0.5)
    port = await board.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http:
            first = await (await http.get(f"http://127.0.0.1:{port}/api/snapshot")).json()
            while calls <= 3:  # the second gathering is now stuck in status()
                await asyncio.sleep(0.05)
            page = await asyncio.wait_for(http.get(f"http://127.0.0.1:{port}/api/snapshot"), 10)
            second = await page.json()
            assert second["taken_at"] == first["taken_at"]  # the latest complete snapshot
            assert second["ledger"]["states"]["succeeded"] == SUCCEEDED
            release.set()
    finally:
        await board.stop()
        await slow.close()


def test_cli_without_the_dashboard_extra_says_what_to_install(local_dir: Path):
    """Without Jinja2 (the ``dashboard`` extra) the command names the extra, exit 4."""
    code = (
        "import sys; sys.modules['jinja2'] = None; "
        "from ai4s_jobq_cli.main import main; sys.argv = ['jobq', 'dashboard']; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 4
    assert "pip install 'ai4s_jobq[dashboard]'" in result.stderr


async def test_cli_port_in_use_is_a_clear_error(known: KnownOutcomes):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = jobq_cli("dashboard", "-q", "local://dash", "--port", str(port), timeout=60)
    assert result.returncode == 4
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
