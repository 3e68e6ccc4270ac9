"""The dashboard's routes without a browser: the page, its files (types, caching, nothing
outside the package's ``static/`` directory), the distributions view, and all of it behind
the ``--workers`` supervisor. The page itself is tested in Chromium in
``test_dashboard_browser.py``."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from canary.admin.dashboard import DISTRIBUTION_BINS, distributions, static_files
from canary.decision import MANUAL_ACTIONS
from canary.observe.accumulators import RolloutAccumulator
from tests.conftest import fake_pair, rollout_config, running_canary

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "canary" / "admin" / "static"


async def _raw_get(base: str, path: str) -> tuple[int, bytes]:
    """``GET path`` sent byte for byte (an HTTP client would normalise ``..`` away)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_the_page_and_its_files() -> None:
    async with fake_pair() as (p, c), running_canary(rollout_config([p], [c])) as can:
        async with httpx.AsyncClient() as client:
            r = await client.get(can.admin + "/dashboard")
            assert r.status_code == 200
            assert r.headers["Content-Type"] == "text/html; charset=utf-8"
            csp = r.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "connect-src 'self'" in csp
            assert "frame-ancestors 'none'" in csp
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            page = r.text
            assert f'data-actions="{" ".join((*MANUAL_ACTIONS, "approve"))}"' in page
            assert 'data-token-required="false"' in page
            # every file the page loads is this server's, versioned by its content
            refs = re.findall(r'(?:src|href)="([^"]+)"', page)
            assert refs and all(ref.startswith("/dashboard/static/") for ref in refs)
            assert all("?v=" in ref for ref in refs)
            r = await client.get(can.admin + "/dashboard/")
            assert r.status_code == 302 and r.headers["Location"] == "/dashboard"

            types = {
                "dashboard.js": "text/javascript; charset=utf-8",
                "dashboard.css": "text/css; charset=utf-8",
                "favicon.svg": "image/svg+xml; charset=utf-8",
            }
            for name, kind in types.items():
                r = await client.get(f"{can.admin}/dashboard/static/{name}?v=1")
                assert r.status_code == 200, name
                assert r.headers["Content-Type"] == kind
                assert r.content == (STATIC / name).read_bytes()
                assert r.headers["Cache-Control"] == "no-cache"
                again = await client.get(
                    f"{can.admin}/dashboard/static/{name}",
                    headers={"If-None-Match": r.headers["ETag"]},
                )
                assert again.status_code == 304 and again.content == b""
            # HEAD too (a GET route answers it)
            r = await client.head(can.admin + "/dashboard/static/dashboard.js")
            assert r.status_code == 200

            for missing in ("nope.js", "dashboard.JS", "dashboard.js.map", "__init__.py"):
                r = await client.get(f"{can.admin}/dashboard/static/{missing}")
                assert r.status_code == 404, missing
            # only GET: the files cannot be written
            r = await client.put(can.admin + "/dashboard/static/dashboard.js", content=b"x")
            assert r.status_code == 405

        for path in (
            "/dashboard/static/../app.py",
            "/dashboard/static/..%2fapp.py",
            "/dashboard/static/%2e%2e%2fapp.py",
            "/dashboard/static/%2e%2e/%2e%2e/config/__init__.py",
            "/dashboard/static/..%5c..%5capp.py",
            "/dashboard/static/%2fetc%2fpasswd",
            "/dashboard/static//etc/passwd",
            "/dashboard/static/",
            "/dashboard/static/.",
            "/dashboard/static/..",
        ):
            status, body = await _raw_get(can.admin, path)
            assert status == 404, (path, status)
            assert b"import" not in body and b"root:" not in body, path


def test_only_the_package_static_files_are_served() -> None:
    files = static_files()
    assert set(files) == {"dashboard.js", "dashboard.css", "favicon.svg"}
    on_disk = {p.name for p in STATIC.iterdir() if p.suffix in (".js", ".css", ".svg")}
    assert set(files) == on_disk
    # shipped in the wheel next to the code
    assert 'canary = ["admin/static/*"]' in (ROOT / "pyproject.toml").read_text()


def test_the_files_name_no_other_host() -> None:
    """No CDN, no third-party code: the only absolute URL is the SVG namespace name (an
    identifier, never fetched)."""
    for path in STATIC.iterdir():
        text = path.read_text()
        urls = set(re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[a-z]{2,}[^\s\"'`)]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)
        assert "import " not in text or path.suffix != ".js", path.name  # no modules to fetch


def test_distributions_of_an_accumulator() -> None:
    rng = np.random.default_rng(7)
    acc = RolloutAccumulator()
    prod = rng.lognormal(np.log(0.010), 0.4, 4000)
    cand = rng.lognormal(np.log(0.012), 0.4, 3000)
    for v in prod:
        acc.production.signals["latency"].add(float(v))
    for v in cand:
        acc.candidate.signals["latency"].add(float(v))
    out = distributions(acc)
    assert set(out) == {"latency"}  # no ttft was recorded
    lat = out["latency"]
    edges = lat["edges"]
    assert len(edges) == DISTRIBUTION_BINS + 1 and edges == sorted(edges)
    # one axis for both arms, from the smallest to the largest value (within the histogram's
    # relative accuracy, 0.5%)
    assert edges[0] == pytest.approx(min(prod.min(), cand.min()), rel=0.01)
    assert edges[-1] == pytest.approx(max(prod.max(), cand.max()), rel=0.01)
    for arm, values in (("production", prod), ("candidate", cand)):
        a = lat["arms"][arm]
        assert a["n"] == len(values) and sum(a["counts"]) == len(values)
        assert a["mean"] == pytest.approx(values.mean())
        for q in (50, 90, 95, 99):
            assert a["quantiles"][f"p{q}"] == pytest.approx(np.quantile(values, q / 100), rel=0.02)
    assert (
        lat["arms"]["candidate"]["quantiles"]["p50"] > lat["arms"]["production"]["quantiles"]["p50"]
    )
    assert distributions(RolloutAccumulator()) == {}
    one = RolloutAccumulator()
    one.candidate.signals["latency"].add(0.02)
    single = distributions(one)["latency"]
    assert single["arms"]["candidate"]["counts"][0] + sum(
        single["arms"]["candidate"]["counts"][1:]
    ) == 1 and set(single["arms"]) == {"candidate"}


async def test_the_distributions_view_on_live_traffic() -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config([p], [c], steps=[{"weight": 50}])
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            for i in range(60):
                await client.post(can.url + "/predict", json={"id": str(i)})
            await can.runtime.controller.flush()
            r = await client.get(can.admin + "/api/v1/rollouts/m/distributions")
            assert r.status_code == 200
            body = r.json()
            arms = body["signals"]["latency"]["arms"]
            assert arms["production"]["n"] + arms["candidate"]["n"] == 60
            assert (
                await client.get(can.admin + "/api/v1/rollouts/x/distributions")
            ).status_code == (404)


async def test_behind_the_workers_supervisor(tmp_path: Path) -> None:
    """``canary run --workers 2``: the supervisor forwards the page, its files (types,
    caching headers) and the distributions view from a worker unchanged."""
    from tests.test_workers_functional import _workers

    async with _workers(tmp_path) as w, httpx.AsyncClient(timeout=10) as client:
        r = await client.get(w.admin + "/dashboard")
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "Content-Security-Policy" in r.headers
        r = await client.get(w.admin + "/dashboard/static/dashboard.js")
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert r.content == (STATIC / "dashboard.js").read_bytes()
        etag = r.headers["ETag"]
        r = await client.get(
            w.admin + "/dashboard/static/dashboard.css", headers={"If-None-Match": etag}
        )
        assert r.status_code == 200 and r.headers["Content-Type"] == "text/css; charset=utf-8"
        r = await client.get(
            w.admin + "/dashboard/static/dashboard.js", headers={"If-None-Match": etag}
        )
        assert r.status_code == 304
        assert (await client.get(w.admin + "/dashboard/static/x.js")).status_code == 404
        r = await client.get(w.admin + "/api/v1/rollouts/m/distributions")
        assert r.status_code == 200 and r.json()["name"] == "m"
