"""Resource metrics end to end: two fake model servers, the real runtime and controller, live
traffic. A candidate reporting 40% more resident memory per replica, equal in latency and
errors, is rolled back on the memory metric alone; an equal one is not."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from canary.admin.views import rollout_detail
from tests.conftest import Canary, fake_pair, rollout_config, running_canary

MEMORY = {
    "name": "memory",
    "signal": "resource:process_resident_memory_bytes",
    "stat": "mean",
    "max_increase": "20%",
}
METRICS = [
    {"name": "latency_p95", "signal": "latency", "stat": "p95", "max_increase": "10%"},
    {"name": "errors", "signal": "error", "stat": "rate", "max_increase": "0.5pp"},
    MEMORY,
]


def _config(pu: str, cu: str) -> dict[str, Any]:
    cfg = rollout_config(
        [pu],
        [cu],
        steps=[{"weight": 50}],
        analysis={"interval": "100ms", "burn_in": 50, "max_duration": "1m", "metrics": METRICS},
    )
    for arm in ("production", "candidate"):
        cfg["rollouts"][0][arm]["resources"] = {"scrape": "/metrics", "every": "200ms"}
    return cfg


@contextlib.asynccontextmanager
async def traffic(url: str) -> AsyncIterator[list[int]]:
    """About 200 requests per second through the proxy until the block ends."""
    statuses: list[int] = []

    async def send(client: aiohttp.ClientSession) -> None:
        i = 0
        while True:
            i += 1
            async with client.post(url + "/predict", json={"id": i}) as resp:
                await resp.read()
                statuses.append(resp.status)
            await asyncio.sleep(0.005)

    async with aiohttp.ClientSession() as client:
        task = asyncio.get_running_loop().create_task(send(client))
        try:
            yield statuses
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _wait(canary: Canary, until: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        detail: dict[str, Any] = rollout_detail(canary.runtime.controller.view("m"))
        if until(detail) or time.monotonic() > deadline:
            return detail
        await asyncio.sleep(0.05)


def _memory(detail: dict[str, Any]) -> dict[str, Any]:
    return next(m for m in detail["metrics"] if m["name"] == "memory")


async def test_candidate_using_40_percent_more_memory_is_rolled_back_on_memory_alone() -> None:
    async with fake_pair(candidate={"memory_overhead_ratio": 0.4}) as (pu, cu):
        async with running_canary(_config(pu, cu), controller=True) as canary:
            started = time.monotonic()
            async with traffic(canary.url) as statuses:
                detail = await _wait(canary, lambda d: d["phase"] == "rolled_back", 20.0)
            took = time.monotonic() - started
            async with aiohttp.ClientSession() as client:
                async with client.get(canary.admin + "/metrics") as resp:
                    exposition = await resp.text()
    assert detail["phase"] == "rolled_back", detail
    rollback = next(d for d in detail["decisions"] if d["action"] == "ROLLBACK")
    assert rollback["reason"].startswith("memory is worse than allowed"), rollback["reason"]
    memory = _memory(detail)
    # Both servers share this process's RSS, so the reported ratio is the configured 1.4.
    assert 1.35 < memory["estimate"] < 1.45, memory
    assert memory["lower"] > 1.2
    # Latency and errors are equal: neither is what decided.
    others = {m["name"]: m["verdict"] for m in detail["metrics"] if m["name"] != "memory"}
    assert "WORSE" not in others.values(), others
    # Ten 200 ms windows of burn-in, then the verdict: a few seconds, not minutes.
    assert took < 10.0, took
    assert statuses and set(statuses) == {200}
    values = {
        s.labels["arm"]: s.value
        for f in text_string_to_metric_families(exposition)
        if f.name == "canary_resource_value"
        for s in f.samples
        if s.labels["metric"] == "memory"
    }
    assert 1.35 < values["candidate"] / values["production"] < 1.45, values
    scrapes = {
        (s.labels["arm"], s.labels["result"]): s.value
        for f in text_string_to_metric_families(exposition)
        if f.name == "canary_resource_scrapes"
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert scrapes[("candidate", "ok")] >= 10, scrapes


async def test_candidate_with_equal_memory_passes_the_memory_metric() -> None:
    async with fake_pair() as (pu, cu):
        async with running_canary(_config(pu, cu), controller=True) as canary:
            async with traffic(canary.url):
                detail = await _wait(
                    canary,
                    lambda d: d["metrics"] and _memory(d)["verdict"] == "OK",
                    15.0,
                )
    assert detail["phase"] in ("running", "promoted"), detail
    memory = _memory(detail)
    assert memory["verdict"] == "OK", memory
    assert 0.95 < memory["estimate"] < 1.05, memory
    assert memory["n_candidate"] >= 10
