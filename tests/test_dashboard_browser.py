"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven over the
DevTools protocol by :mod:`cdp_browser`), against a real local queue that a real
worker drained with known outcomes (:mod:`dashboard_support`).

Asserts what a person would see: the counts rendered in the cards, the failure reason
and its error text, charts present and drawn at a visible size, a failure's example
linking to the task's record, the page refreshing in place, and — with JavaScript
disabled — the same counts.  Screenshots are saved under the test's tmp dir.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cdp_browser import Browser, find_chromium, running_in_ci
from dashboard_support import DEAD_LETTERED, FAILURE_TEXT, QUEUED, SUCCEEDED, make_known_outcomes

from ai4s_jobq import JobQ
from ai4s_jobq.dashboard.server import Dashboard

CHROMIUM = find_chromium()
if CHROMIUM is None and not running_in_ci():
    pytest.skip(
        "chromium is not installed (apt-get install chromium); in CI (CI=true) this test must run",
        allow_module_level=True,
    )

pytestmark = pytest.mark.slow


@pytest.fixture
def refresh_seconds() -> float:
    return 1.0


@pytest.fixture
async def board(local_dir: Path, refresh_seconds: float) -> AsyncIterator[tuple[str, object, JobQ]]:
    async with JobQ.open("local://dash", check=False) as q:
        known = await make_known_outcomes(q)
        dashboard = Dashboard([known.source], refresh_seconds=refresh_seconds, sample_seconds=0.2)
        port = await dashboard.start("127.0.0.1", 0)
        try:
            yield f"http://127.0.0.1:{port}", known, q
        finally:
            await dashboard.stop()


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    assert CHROMIUM is not None, "CI=true but chromium is not installed: .ci/run installs it"
    async with Browser(CHROMIUM, tmp_path / "chromium-profile") as b:
        await b.set_viewport(1280, 900)
        yield b


def card(state: str) -> str:
    return f"document.querySelector('#card-{state} .value').innerText.trim()"


async def test_page_shows_counts_failures_and_charts(board, browser: Browser, tmp_path: Path):
    url, known, q = board
    await browser.goto(url + "/")
    assert await browser.evaluate("document.documentElement.classList.contains('js')")
    # The depth chart needs two samples; the server samples every 0.2 s.
    await browser.wait_for("document.querySelectorAll('svg.line polyline.series').length > 0")

    assert await browser.evaluate(card("succeeded")) == str(SUCCEEDED)
    assert await browser.evaluate(card("dead_lettered")) == str(DEAD_LETTERED)
    assert await browser.evaluate(card("queued")) == str(QUEUED)
    assert await browser.evaluate(card("active")) == str(QUEUED)
    assert await browser.evaluate(card("dead-letter")) == str(DEAD_LETTERED)

    text = await browser.evaluate("document.body.innerText")
    assert "NonZeroExit" in text
    assert FAILURE_TEXT in text
    assert "run-1" in text and "run-2" in text

    # Charts: drawn, visible, and not the "collecting samples" placeholder.
    depth = await browser.evaluate(
        "(() => { const s = document.querySelector('svg.chart.line'); const r ="
        " s.getBoundingClientRect(); return {w: r.width, h: r.height, empty:"
        " s.classList.contains('chart-empty'), points: s.querySelector('polyline.series')"
        ".getAttribute('points').trim().split(' ').length}; })()"
    )
    assert depth["w"] > 300 and depth["h"] > 100 and not depth["empty"]
    assert depth["points"] >= 2
    bars = await browser.evaluate(
        "Array.from(document.querySelectorAll('svg.histogram rect.bar'))"
        ".map(r => r.getBoundingClientRect().height).filter(h => h > 0).length"
    )
    assert bars >= 1
    segments = await browser.evaluate(
        "Array.from(document.querySelectorAll('svg.stacked rect.segment'))"
        ".map(r => r.getAttribute('data-state'))"
    )
    assert {"succeeded", "dead_lettered", "queued"} <= set(segments)
    # The per-tag bars line up: each fills its table cell, all the same width.
    widths = await browser.evaluate(
        "Array.from(document.querySelectorAll('table.tags svg.stacked'))"
        ".map(s => Math.round(s.getBoundingClientRect().width))"
    )
    assert len(widths) == 3 and len(set(widths)) == 1 and widths[0] > 100

    shot = await browser.screenshot(tmp_path / "dashboard.png")
    assert shot.stat().st_size > 10_000

    # A failure's example links to that task's record.
    href = await browser.evaluate("document.querySelector('table.failures td.ids a').href")
    assert any(task_id in href for task_id in known.failed_ids)
    await browser.goto(href)
    record_text = await browser.evaluate("document.body.innerText")
    assert "dead lettered" in record_text and FAILURE_TEXT in record_text
    json_href = await browser.evaluate(
        "Array.from(document.querySelectorAll('a')).find(a => a.innerText === 'JSON').href"
    )
    await browser.goto(json_href)
    record = json.loads(await browser.evaluate("document.body.innerText"))
    assert record["state"] == "dead_lettered" and record["reason"] == "NonZeroExit"


async def test_page_refreshes_in_place(board, browser: Browser):
    url, known, q = board
    await browser.goto(url + "/")
    await browser.evaluate("window.__notReloaded = true")
    await q.push("echo one more")
    await browser.wait_for(f"{card('active')} === '{QUEUED + 1}'", timeout=20)
    assert await browser.evaluate("window.__notReloaded === true")


# Without JavaScript the page reloads itself through a meta refresh; a long period keeps
# the page still while it is read.
@pytest.mark.parametrize("refresh_seconds", [60.0])
async def test_counts_visible_without_javascript(board, browser: Browser, tmp_path: Path):
    url, known, q = board
    await browser.set_javascript(False)
    await browser.goto(url + "/")
    assert not await browser.evaluate("document.documentElement.classList.contains('js')")
    refresh = await browser.evaluate(
        "document.querySelector('meta[http-equiv=refresh]').getAttribute('content')"
    )
    assert refresh == "60"
    assert await browser.evaluate(card("succeeded")) == str(SUCCEEDED)
    assert await browser.evaluate(card("dead_lettered")) == str(DEAD_LETTERED)
    assert await browser.evaluate(card("active")) == str(QUEUED)
    text = await browser.evaluate("document.body.innerText")
    assert FAILURE_TEXT in text
    assert await browser.evaluate("document.querySelectorAll('svg.chart').length") >= 3
    await browser.screenshot(tmp_path / "dashboard-nojs.png")
