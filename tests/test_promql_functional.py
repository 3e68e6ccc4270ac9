"""``promql:`` metrics end to end: two fake models scraped every second by a real Prometheus
(Debian's ``prometheus``, on loopback), the real runtime and controller, live traffic.

A candidate whose GPU gauge is 30% higher is rolled back on the promql metric alone; an
equal one is not. Queries that cannot give a number (a Prometheus that is down, a syntax
error, no series, several series, NaN) are counted, shown in the rollout's status and never
decide anything, while the proxy keeps serving.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from canary.cli import _rollout_lines
from tests.conftest import Canary, fake_pair, rollout_config, running_canary
from tests.prometheus_harness import Prometheus, running_prometheus
from tests.redis_harness import free_port
from tests.test_resources_functional import traffic

# Prometheus scrapes every 500 ms and canary queries every 500 ms: the paired test needs
# 10-20 windows, and Debian's Prometheus 2.42 applies its first targets only ~5 s after start.
SCRAPE = "500ms"
GPU_INLINE = 'promql:avg(gpu_utilization_ratio{instance=~"{{endpoints}}"})'
LATENCY = {"name": "latency_p95", "signal": "latency", "stat": "p95", "max_increase": "10%"}


def _config(
    pu: str, cu: str, prometheus_url: str, metrics: list[dict[str, Any]], **arms: Any
) -> dict[str, Any]:
    cfg = rollout_config(
        [pu],
        [cu],
        steps=[{"weight": 50}],
        analysis={
            "interval": "100ms",
            "burn_in": 50,
            "max_duration": "1m",
            "prometheus": {"url": prometheus_url, "every": SCRAPE},
            "metrics": metrics,
        },
    )
    for arm, extra in arms.items():
        cfg["rollouts"][0][arm].update(extra)
    return cfg


def _hostport(url: str) -> str:
    return urlsplit(url).netloc


async def _both_scraped(prom: Prometheus) -> None:
    """Wait until Prometheus has the gauge of both fake models (its first scrapes)."""
    deadline = time.monotonic() + 15.0
    while True:
        found = await prom.wait_for("gpu_utilization_ratio", timeout=15.0)
        if len(found) >= 2:
            return
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.2)


async def _detail(canary: Canary) -> dict[str, Any]:
    async with aiohttp.ClientSession() as client:
        async with client.get(canary.admin + "/api/v1/rollouts/m") as resp:
            assert resp.status == 200
            detail: dict[str, Any] = await resp.json()
            return detail


async def _wait(
    canary: Canary, until: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        detail = await _detail(canary)
        if until(detail) or time.monotonic() > deadline:
            return detail
        await asyncio.sleep(0.1)


async def _exposition(canary: Canary) -> str:
    async with aiohttp.ClientSession() as client:
        async with client.get(canary.admin + "/metrics") as resp:
            return await resp.text()


def _counts(exposition: str, family: str) -> dict[tuple[str, ...], float]:
    return {
        tuple(s.labels[k] for k in sorted(s.labels) if k != "rollout"): s.value
        for f in text_string_to_metric_families(exposition)
        if f.name == family
        for s in f.samples
        if s.name.endswith("_total")
    }


def _metric(detail: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in detail["metrics"] if m["name"] == name)


async def test_candidate_with_30_percent_higher_gpu_is_rolled_back_through_prometheus() -> None:
    gpu = {"name": "gpu", "signal": GPU_INLINE, "stat": "mean", "max_increase": "10%"}
    async with fake_pair(candidate={"gpu_utilization": 0.39}) as (pu, cu):
        async with running_prometheus([_hostport(pu), _hostport(cu)], interval=SCRAPE) as prom:
            await _both_scraped(prom)
            cfg = _config(pu, cu, prom.url, [LATENCY, gpu])
            async with running_canary(cfg, controller=True) as canary:
                started = time.monotonic()
                async with traffic(canary.url) as statuses:
                    detail = await _wait(canary, lambda d: d["phase"] == "rolled_back", 25.0)
                took = time.monotonic() - started
                exposition = await _exposition(canary)
    assert detail["phase"] == "rolled_back", detail
    rollback = next(d for d in detail["decisions"] if d["action"] == "ROLLBACK")
    assert rollback["reason"].startswith("gpu is worse than allowed"), rollback["reason"]
    assert "paired windows" in rollback["reason"] and "margin +10%" in rollback["reason"]
    result = _metric(detail, "gpu")
    # 0.39 / 0.30 idle, plus the same small load-dependent part on both arms (50% split).
    assert 1.2 < result["estimate"] < 1.35, result
    assert _metric(detail, "latency_p95")["verdict"] != "WORSE"
    # Ten 500 ms windows of burn-in, then the verdict: 14-27 windows (7-13 s) in 10 runs.
    assert 5.0 < took < 20.0, took
    assert statuses and set(statuses) == {200}
    status = detail["promql"]["gpu"]
    assert status["windows"] >= 10, status
    for arm, url in (("production", pu), ("candidate", cu)):
        assert status["arms"][arm]["result"] == "ok", status
        # {{endpoints}} became this arm's own instance, escaped for a PromQL string
        assert _hostport(url).replace(".", "\\\\.") in status["arms"][arm]["query"], status
    queries = _counts(exposition, "canary_promql_queries")
    assert queries[("candidate", "gpu", "ok")] >= 10, queries
    assert queries[("production", "gpu", "ok")] == queries[("candidate", "gpu", "ok")]
    windows = _counts(exposition, "canary_promql_windows")
    assert windows[("gpu", "recorded")] >= 10, windows


async def test_equal_gpu_with_named_queries_is_not_rolled_back() -> None:
    """A/A through named queries selecting each arm by a target label Prometheus adds."""
    gpu = {"name": "gpu", "signal": "promql:gpu", "stat": "mean", "max_increase": "10%"}
    async with fake_pair() as (pu, cu):
        labels = {_hostport(pu): {"arm": "production"}, _hostport(cu): {"arm": "candidate"}}
        async with running_prometheus(
            [_hostport(pu), _hostport(cu)], interval=SCRAPE, labels=labels
        ) as prom:
            await _both_scraped(prom)
            cfg = _config(
                pu,
                cu,
                prom.url,
                [LATENCY, gpu],
                production={"queries": {"gpu": 'avg(gpu_utilization_ratio{arm="production"})'}},
                candidate={"queries": {"gpu": 'avg(gpu_utilization_ratio{arm="{{arm}}"})'}},
            )
            async with running_canary(cfg, controller=True) as canary:
                started = time.monotonic()
                async with traffic(canary.url):
                    # as long as the rolled-back test took at most, and the gpu test decided
                    detail = await _wait(
                        canary,
                        lambda d: (
                            d["phase"] == "rolled_back"
                            or (time.monotonic() - started > 13.0 and bool(d["metrics"]))
                        ),
                        20.0,
                    )
    assert detail["phase"] != "rolled_back", detail
    result = _metric(detail, "gpu")
    assert result["verdict"] in ("OK", "UNKNOWN"), result
    assert result["n_candidate"] >= 10, result
    assert 0.95 < result["estimate"] < 1.05, result
    status = detail["promql"]["gpu"]
    assert status["arms"]["candidate"]["query"] == 'avg(gpu_utilization_ratio{arm="candidate"})'
    assert status["arms"]["production"]["result"] == "ok", status


async def test_query_errors_empty_and_nan_are_counted_shown_and_never_decide() -> None:
    def metric(name: str, query: str) -> dict[str, Any]:
        return {"name": name, "signal": f"promql:{query}", "stat": "mean", "max_increase": "1%"}

    bad = {
        # a missing ')': Prometheus answers status error, errorType bad_data
        "syntax": metric("syntax", 'avg(gpu_utilization_ratio{instance=~"{{endpoints}}"}'),
        "empty": metric("empty", 'avg(no_such_metric{instance=~"{{endpoints}}"})'),
        "nan": metric("nan", 'avg(gpu_utilization_ratio{instance=~"{{endpoints}}"}) * 0 / 0'),
        "many": metric("many", 'up{instance=~"{{endpoints}}"} or gpu_utilization_ratio'),
    }
    async with fake_pair(candidate={"gpu_utilization": 0.9}) as (pu, cu):
        async with running_prometheus([_hostport(pu), _hostport(cu)], interval=SCRAPE) as prom:
            await _both_scraped(prom)
            cfg = _config(pu, cu, prom.url, list(bad.values()))
            async with running_canary(cfg, controller=True) as canary:
                async with traffic(canary.url) as statuses:
                    detail = await _wait(
                        canary,
                        lambda d: (
                            bool(d.get("promql") and d["metrics"])
                            and all(
                                sum(m["arms"]["candidate"]["counts"].values()) >= 3
                                for m in d["promql"].values()
                            )
                        ),
                        10.0,
                    )
                exposition = await _exposition(canary)
    assert statuses and set(statuses) == {200}
    assert detail["phase"] == "running", detail
    expected = {
        "syntax": ("bad_query", "bad_data"),
        "empty": ("empty", "no series"),
        "nan": ("not_finite", "NaN"),
        "many": ("many_series", "aggregate them"),
    }
    queries = _counts(exposition, "canary_promql_queries")
    for name, (result, why) in expected.items():
        m = _metric(detail, name)
        assert m["verdict"] == "UNKNOWN", m
        assert "no promql windows yet" in m["detail"], m
        for arm in ("production", "candidate"):
            shown = detail["promql"][name]["arms"][arm]
            assert shown["result"] == result, (name, shown)
            assert why in shown["message"], (name, shown)
            assert queries[(arm, name, result)] >= 3, queries
        assert detail["promql"][name]["windows"] == 0
    windows = _counts(exposition, "canary_promql_windows")
    assert windows[("syntax", "query_failed")] >= 3, windows
    # `canary status m` prints why, one line per metric and arm
    shown_lines = _rollout_lines(detail, 200, True, time.time())
    assert any(ln.startswith("promql empty (candidate): empty: the query") for ln in shown_lines)
    assert any(ln.startswith("promql syntax (production): bad_query: ") for ln in shown_lines)


async def test_prometheus_down_is_counted_and_shown_and_the_proxy_keeps_serving() -> None:
    gpu = {"name": "gpu", "signal": GPU_INLINE, "stat": "mean", "max_increase": "10%"}
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with fake_pair(candidate={"gpu_utilization": 0.9}) as (pu, cu):
        cfg = _config(pu, cu, down, [gpu])
        cfg["rollouts"][0]["analysis"]["prometheus"]["every"] = "200ms"
        async with running_canary(cfg, controller=True) as canary:
            async with traffic(canary.url) as statuses:
                detail = await _wait(
                    canary,
                    lambda d: (
                        bool(d.get("promql") and d["metrics"])
                        and d["promql"]["gpu"]["arms"]["candidate"]["counts"].get("error", 0) >= 5
                    ),
                    10.0,
                )
            exposition = await _exposition(canary)
    assert statuses and set(statuses) == {200}
    assert detail["phase"] == "running", detail
    shown = detail["promql"]["gpu"]["arms"]["candidate"]
    assert shown["result"] == "error", shown
    assert "ClientConnectorError" in shown["message"] or "Connect" in shown["message"], shown
    assert _metric(detail, "gpu")["verdict"] == "UNKNOWN"
    queries = _counts(exposition, "canary_promql_queries")
    assert queries[("production", "gpu", "error")] >= 5, queries
