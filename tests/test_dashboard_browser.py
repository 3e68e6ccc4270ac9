"""``/dashboard`` in a real headless Chromium during a live rollout: what the page shows
(phase, weights, every metric's interval) is what the API says, its buttons command the
rollout with the admin token typed into the page, and screenshots are saved.

Screenshots go to ``$CANARY_ARTIFACTS`` (default: the test's tmp dir; the path is printed);
with ``CANARY_UPDATE_SCREENSHOTS=1`` (``scripts/screenshots``) the README's
``docs/img/dashboard.png`` is written too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from canary.decision import MANUAL_ACTIONS
from tests.browser_harness import Browser
from tests.conftest import Canary, fake_pair, rollout_config, running_canary

ROOT = Path(__file__).resolve().parent.parent
DOCS_IMAGE = ROOT / "docs" / "img" / "dashboard.png"
POLL = 0.4  # the page's poll interval in these tests (seconds)
UPDATE_DOCS = os.environ.get("CANARY_UPDATE_SCREENSHOTS") == "1"
DOCS_WAIT = 40.0  # seconds of live rollout before the README's screenshot
METRICS = [
    {"name": "latency_p95", "signal": "latency", "stat": "p95", "max_increase": "10%"},
    {"name": "latency_mean", "signal": "latency", "stat": "mean", "max_increase": "5%"},
    {"name": "errors", "signal": "error", "stat": "rate", "max_increase": "1pp"},
]

# What the page shows, read from its data- attributes (strings, as the DOM holds them).
READ_PAGE = """
const d = document.querySelector('#detail');
if (!d || d.hidden || !d.dataset.rollout) return null;
const row = document.querySelector('tr[data-rollout-row="' + d.dataset.rollout + '"]');
return {
  rollout: d.dataset.rollout, phase: d.dataset.phase, step: d.dataset.step,
  candidate: d.dataset.weightCandidate, production: d.dataset.weightProduction,
  row_phase: row && row.dataset.phase,
  metrics: [...document.querySelectorAll('[data-metric]')].map(m => ({
    name: m.dataset.metric, verdict: m.dataset.verdict, estimate: m.dataset.estimate,
    lower: m.dataset.lower, upper: m.dataset.upper, tolerance: m.dataset.tolerance})),
};
"""


def _num(value: str) -> float | None:
    return None if value == "" else float(value)


def _as_api(page: dict[str, Any]) -> dict[str, Any]:
    """The page's reading in the API's terms."""
    return {
        "phase": page["phase"],
        "step": int(page["step"]),
        "weights": {
            "production": float(page["production"]),
            "candidate": float(page["candidate"]),
        },
        "metrics": [
            {
                "name": m["name"],
                "verdict": m["verdict"],
                **{k: _num(m[k]) for k in ("estimate", "lower", "upper", "tolerance")},
            }
            for m in page["metrics"]
        ],
    }


def _from_api(detail: dict[str, Any]) -> dict[str, Any]:
    keys = ("name", "verdict", "estimate", "lower", "upper", "tolerance")
    return {
        "phase": detail["phase"],
        "step": detail["step"],
        "weights": detail["weights"],
        "metrics": [{k: m[k] for k in keys} for m in detail["metrics"]],
    }


def _artifacts(tmp_path: Path) -> Path:
    out = Path(os.environ.get("CANARY_ARTIFACTS") or tmp_path / "artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _resize(browser: Browser, width: int, height: int) -> None:
    browser._call("POST", "/window/rect", {"width": width, "height": height})


async def _page(browser: Browser, source: str, timeout: float = 15.0) -> Any:
    """``browser.wait_for`` off the event loop (the canary under test runs on it)."""
    return await asyncio.to_thread(browser.wait_for, source, timeout)


async def _script(browser: Browser, source: str) -> Any:
    return await asyncio.to_thread(browser.script, source)


async def _click(browser: Browser, css: str) -> None:
    element = await asyncio.to_thread(browser.find, css)
    await asyncio.to_thread(browser.click, element)


@contextlib.asynccontextmanager
async def _traffic(can: Canary) -> AsyncIterator[None]:
    """Requests to the proxy, a few at a time, until the block ends."""

    async def send(client: httpx.AsyncClient) -> None:
        i = 0
        while True:
            batch = [client.post(can.url + "/predict", json={"id": str(i + k)}) for k in range(6)]
            for r in await asyncio.gather(*batch, return_exceptions=True):
                assert not isinstance(r, httpx.Response) or r.status_code == 200
            i += 6
            await asyncio.sleep(0.01)

    async with httpx.AsyncClient(timeout=10) as client:
        task = asyncio.create_task(send(client))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _live_config(p: str, c: str) -> dict[str, Any]:
    return rollout_config(
        [p], [c],
        steps=[{"weight": 20, "min_requests": 80}, {"weight": 50, "min_requests": 10**6}],
        analysis={"interval": "1s", "burn_in": 30, "metrics": METRICS},
    )  # fmt: skip


async def test_the_dashboard_shows_the_live_rollout_and_pauses_it(
    browser: Browser, tmp_path: Path
) -> None:
    artifacts = _artifacts(tmp_path)
    print(f"dashboard screenshots: {artifacts}")
    prod = {"latency": "lognormal", "latency_median": 0.004}
    cand = {"latency": "lognormal", "latency_median": 0.0043}
    async with fake_pair(prod, cand) as (p, c):
        async with (
            running_canary(_live_config(p, c), controller=True) as can,
            _traffic(can),
            httpx.AsyncClient() as client,
        ):
            api = can.admin + "/api/v1/rollouts/m"
            await asyncio.to_thread(browser.get, f"{can.admin}/dashboard?poll={POLL}")
            await _page(browser, "return document.querySelector('#detail[data-rollout=\"m\"]')")
            # the rollout advances on its own; the page follows without a reload
            await _page(browser, "return document.querySelector('#detail').dataset.step === '2'")
            await _page(
                browser,
                "return [...document.querySelectorAll('[data-metric]')].length === 3 && "
                "[...document.querySelectorAll('[data-metric]')].every(m => m.dataset.lower)",
            )
            # what it shows is what the API says (re-read: the page may be one poll behind)
            shown: dict[str, Any] = {}
            said: dict[str, Any] = {}
            for _ in range(60):
                page = await _script(browser, READ_PAGE)
                detail = (await client.get(api)).json()
                shown, said = _as_api(page), _from_api(detail)
                if shown == said:
                    break
                await asyncio.sleep(0.1)
            assert shown == said
            assert said["phase"] == "running" and said["weights"]["candidate"] == 50.0
            assert [m["name"] for m in said["metrics"]] == [m["name"] for m in METRICS]
            assert all(m["lower"] is not None for m in said["metrics"])
            assert page["row_phase"] == "running"

            # charts drawn from the history: the weight step and a band per metric
            await _page(
                browser,
                "return [...document.querySelectorAll('[data-metric] svg')].every("
                "s => s.querySelector('path[class^=\"band-\"]')) && "
                "document.querySelectorAll('[data-dist-arm]').length >= 2",
            )
            history = (await client.get(api + "/history")).json()["points"]
            assert {pt["w"][1] for pt in history} == {20.0, 50.0}
            # a reload shows the past at once: the time series come from the API's history
            await asyncio.to_thread(browser.get, f"{can.admin}/dashboard?poll=60")
            chart = await _page(
                browser,
                "const c = document.querySelector('svg[data-chart=\"weights\"]');"
                "return c && c.dataset.weights && {n: c.dataset.points, w: c.dataset.weights}",
            )
            assert chart["w"] == "20 50" and int(chart["n"]) >= len(history)
            await asyncio.to_thread(browser.get, f"{can.admin}/dashboard?poll={POLL}")
            await asyncio.sleep(3 * POLL)  # a few more points after the step
            if UPDATE_DOCS:  # the README's picture: let the intervals narrow for a while
                await asyncio.sleep(DOCS_WAIT)
            for width, height in ((1366, 768), (2560, 1440), (1440, 1400)):
                await asyncio.to_thread(_resize, browser, width, height)
                await asyncio.sleep(0.3)
                overflow = await _script(
                    browser, "return document.documentElement.scrollWidth - window.innerWidth"
                )
                assert overflow <= 0, f"wider than a {width}x{height} window by {overflow}px"
                shot = artifacts / f"dashboard-{width}x{height}.png"
                await asyncio.to_thread(browser.screenshot, shot)
                assert shot.stat().st_size > 10_000
            if UPDATE_DOCS:
                DOCS_IMAGE.write_bytes(shot.read_bytes())
                print(f"updated {DOCS_IMAGE}")

            # a click pauses the rollout (no token configured: none is needed)
            await _click(browser, 'button[data-action="pause"]')
            await _page(
                browser, "return document.querySelector('#detail').dataset.phase === 'paused'"
            )
            detail = (await client.get(api)).json()
            assert detail["phase"] == "paused"
            assert (
                detail["decisions"][-1]["action"] == "PAUSE" and detail["decisions"][-1]["manual"]
            )
            buttons = await _script(
                browser,
                "return Object.fromEntries([...document.querySelectorAll('button[data-action]')]"
                ".map(b => [b.dataset.action, !b.disabled]))",
            )
            assert buttons["pause"] is False and buttons["resume"] is True
            assert set(buttons) == {*MANUAL_ACTIONS, "approve"}  # a button for every command
            assert buttons["approve"] is False  # nothing waits at a gate
            await _page(browser, "return document.querySelector('[data-decision=\"PAUSE\"]')")
            assert await asyncio.to_thread(browser.console_errors) == []


async def test_the_page_sends_the_admin_token(
    browser: Browser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_DASHBOARD_TOKEN", "s3cret-token")
    async with fake_pair() as (p, c):
        cfg = rollout_config([p], [c], steps=[{"weight": 20}, {"weight": 50}])
        cfg["admin"]["token_env"] = "TEST_DASHBOARD_TOKEN"
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            api = can.admin + "/api/v1/rollouts/m"
            await asyncio.to_thread(browser.get, f"{can.admin}/dashboard?poll={POLL}")
            await _page(browser, "return document.querySelector('#detail[data-phase=\"running\"]')")
            state = await _script(
                browser, "return document.querySelector('#token-state').textContent"
            )
            assert "need" in state

            # no token: the API refuses, the page says so and records it
            await _click(browser, 'button[data-action="pause"]')
            errors = await _page(browser, "return window.__errors.length && window.__errors")
            assert "401" in errors[-1] and "enter the admin token" in errors[-1]
            shown = await _script(browser, "return document.querySelector('#errors').innerText")
            assert "401" in shown
            assert (await client.get(api)).json()["phase"] == "running"

            # a wrong token: 401 again, saying the token is wrong
            set_token = (
                "document.querySelector('#token').value = arguments[0];"
                "document.querySelector('#token-form').requestSubmit();"
            )
            await asyncio.to_thread(browser.script, set_token, "not-the-token")
            await _click(browser, 'button[data-action="pause"]')
            errors = await _page(browser, "return window.__errors.length >= 2 && window.__errors")
            assert "401" in errors[-1] and "wrong" in errors[-1]
            assert (await client.get(api)).json()["phase"] == "running"

            # the right one, kept for this tab only
            await asyncio.to_thread(browser.script, set_token, "s3cret-token")
            stored = await _script(browser, "return sessionStorage.getItem('canary.adminToken')")
            assert stored == "s3cret-token"
            await _click(browser, 'button[data-action="pause"]')
            await _page(
                browser, "return document.querySelector('#detail').dataset.phase === 'paused'"
            )
            assert (await client.get(api)).json()["phase"] == "paused"

            # promote and rollback ask first: declined, nothing happens
            await _script(browser, "window.confirm = () => false;")
            await _click(browser, 'button[data-action="rollback"]')
            await asyncio.sleep(2 * POLL)
            assert (await client.get(api)).json()["phase"] == "paused"
            await _script(browser, "window.confirm = (q) => { window.__asked = q; return true; };")
            await _click(browser, 'button[data-action="rollback"]')
            await _page(
                browser, "return document.querySelector('#detail').dataset.phase === 'rolled_back'"
            )
            assert "Roll back m" in await _script(browser, "return window.__asked")
            detail = (await client.get(api)).json()
            assert detail["phase"] == "rolled_back"
            assert detail["weights"]["candidate"] == 0.0
            retry = await _script(
                browser, "return !document.querySelector('button[data-action=\"retry\"]').disabled"
            )
            assert retry is True
            # the errors shown were the refused clicks only
            assert len(await asyncio.to_thread(browser.console_errors)) == 2
            await asyncio.to_thread(
                browser.screenshot, _artifacts(tmp_path) / "dashboard-rolled-back.png"
            )


async def test_the_dashboard_behind_the_workers_supervisor(
    browser: Browser, tmp_path: Path
) -> None:
    """``canary run --workers 2``: the supervisor serves the page, its files and the API
    calls from the workers, and a click's command (with the page's Origin) reaches the
    leader."""
    from tests.test_workers_functional import _workers

    async with _workers(tmp_path) as w, httpx.AsyncClient(timeout=10) as client:
        api = w.admin + "/api/v1/rollouts/m"
        await asyncio.to_thread(browser.get, f"{w.admin}/dashboard?poll={POLL}")
        await _page(browser, "return document.querySelector('#detail[data-rollout=\"m\"]')")
        page = _as_api(await _script(browser, READ_PAGE))
        said = _from_api((await client.get(api)).json())
        assert (page["phase"], page["step"], page["weights"]) == (
            said["phase"],
            said["step"],
            said["weights"],
        )
        await _click(browser, 'button[data-action="pause"]')
        await _page(browser, "return document.querySelector('#detail').dataset.phase === 'paused'")
        assert (await client.get(api)).json()["phase"] == "paused"
        assert await asyncio.to_thread(browser.console_errors) == []
