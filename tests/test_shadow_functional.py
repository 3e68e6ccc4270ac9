"""Shadow steps end to end: mirrors never touch the user's answer, and they are measured."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtest.fake_model import FakeModelConfig, running_fake_model
from tests.conftest import FAST, fake_pair, rollout_config, running_canary

SHADOW = [{"shadow": {"min_requests": 100000}}, {"weight": 5}]


def shadow_counts(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "canary_shadow_requests":
            for s in family.samples:
                out[s.labels["outcome"]] = s.value
    return out


@contextlib.asynccontextmanager
async def models(
    production: dict[str, Any], candidate: dict[str, Any]
) -> AsyncIterator[tuple[str, str]]:
    p = FakeModelConfig(**{**FAST, "model": "production", **production})
    c = FakeModelConfig(**{**FAST, "model": "candidate", "seed": 1, **candidate})
    async with running_fake_model(p) as pu, running_fake_model(c) as cu:
        yield pu, cu


async def _post_all(client: httpx.AsyncClient, url: str, n: int, start: int = 0) -> list[str]:
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> str:
        async with sem:
            r = await client.post(url, json={"id": str(i)})
            assert r.status_code == 200
            return r.headers["x-canary-arm"]

    return await asyncio.gather(*(one(i) for i in range(start, start + n)))


async def test_agreement_is_measured_on_mirrored_requests() -> None:
    n = 400
    async with models({"accuracy": 0.9}, {"accuracy": 0.6}) as (p, c):
        cfg = rollout_config([p], [c], steps=SHADOW, prediction="json:prediction")
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            arms = await _post_all(client, can.url + "/predict", n)
            for _ in range(100):
                if (await can.samples("m")).candidate.observed == n:
                    break
                await asyncio.sleep(0.02)
            acc = await can.samples("m")
            counts = shadow_counts((await client.get(can.admin + "/metrics")).text)
    assert set(arms) == {"production"}
    cand = acc.candidate.signals["agreement"]
    prod = acc.production.signals["agreement"]
    assert cand.n == prod.n == counts["compared"] == n
    assert prod.mean == 1.0
    # Independent errors: P(agree) = 0.9 * 0.6 + 0.1 * 0.4 = 0.58.
    sd = math.sqrt(0.58 * 0.42 / n)
    assert abs(cand.mean - 0.58) < 4.5 * sd, cand.mean
    assert acc.candidate.signals["latency"].n == n  # latency and errors of the mirrors too


async def test_a_slow_mirror_never_slows_the_user() -> None:
    async with fake_pair(candidate={"latency_median": 0.3}) as (p, c):
        cfg = rollout_config([p], [c], steps=SHADOW)
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            took = []
            for i in range(10):
                t0 = time.perf_counter()
                r = await client.post(can.url + "/predict", json={"id": str(i)})
                took.append(time.perf_counter() - t0)
                assert r.headers["x-model-name"] == "production"
            for _ in range(100):
                if (await can.samples("m")).candidate.observed == 10:
                    break
                await asyncio.sleep(0.05)
            acc = await can.samples("m")
    assert max(took) < 0.15, took  # the 300 ms candidate is not on the user's path
    assert acc.candidate.observed == acc.candidate.shadow == 10


async def test_saturated_mirrors_are_dropped_and_counted() -> None:
    async with fake_pair(candidate={"latency_median": 0.5}) as (p, c):
        cfg = rollout_config([p], [c], steps=SHADOW)
        cfg["proxy"]["mirror_concurrency"] = 2
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            arms = await _post_all(client, can.url + "/predict", 20)
            counts = shadow_counts((await client.get(can.admin + "/metrics")).text)
    assert arms == ["production"] * 20
    assert counts["dropped_busy"] >= 10  # 2 in flight at most while 20 arrive within 0.5 s
    assert counts["sent"] + counts["dropped_busy"] == 20


async def test_bodies_over_the_replay_buffer_are_not_mirrored() -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config([p], [c], steps=SHADOW)
        cfg["proxy"]["replay_buffer"] = "1KiB"
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            big = await client.post(can.url + "/predict", json={"id": "1", "pad": "x" * 4096})
            small = await client.post(can.url + "/predict", json={"id": "2"})
            counts = shadow_counts((await client.get(can.admin + "/metrics")).text)
    assert big.status_code == small.status_code == 200
    assert counts["dropped_body"] == 1 and counts["sent"] == 1


def _agreement_config(p: str, c: str) -> dict[str, Any]:
    return rollout_config(
        [p],
        [c],
        steps=[{"shadow": {"min_requests": 100000}}, {"weight": 50}],
        prediction="json:prediction",
        analysis={
            "interval": "100ms",
            "burn_in": 50,
            "metrics": [
                {"name": "agreement", "signal": "agreement", "stat": "rate",
                 "max_decrease": "5pp"},
                {"name": "latency_p95", "signal": "latency", "stat": "p95",
                 "max_increase": "50%"},
            ],
        },
    )  # fmt: skip


async def _drive(can: Any, client: httpx.AsyncClient, until: Any, limit: float) -> Any:
    deadline = time.monotonic() + limit
    i = 0
    detail: Any = None
    while time.monotonic() < deadline:
        await _post_all(client, can.url + "/predict", 50, start=i)
        i += 50
        detail = (await client.get(can.admin + "/api/v1/rollouts/m")).json()
        if until(detail):
            return detail
    return detail


async def test_shadow_step_rolls_back_a_candidate_that_disagrees() -> None:
    # A candidate at 50% accuracy agrees with a 95% production about half the time.
    async with models({"accuracy": 0.95}, {"accuracy": 0.5}) as (p, c):
        cfg = _agreement_config(p, c)
        async with running_canary(cfg, controller=True) as can, httpx.AsyncClient() as client:
            detail = await _drive(can, client, lambda d: d["phase"] != "running", 20.0)
    assert detail["phase"] == "rolled_back", detail["last_decision"]
    assert "agreement" in detail["last_decision"]["reason"]


async def test_shadow_step_finds_an_identical_candidate_in_agreement() -> None:
    # Same model name and seed: the same answer to every request.
    async with models({"accuracy": 0.9}, {"accuracy": 0.9, "model": "production", "seed": 0}) as (
        p,
        c,
    ):
        cfg = _agreement_config(p, c)
        async with running_canary(cfg, controller=True) as can, httpx.AsyncClient() as client:

            def agreed(d: dict[str, Any]) -> bool:
                return any(m["name"] == "agreement" and m["verdict"] == "OK" for m in d["metrics"])

            detail = await _drive(can, client, agreed, 20.0)
    assert detail["phase"] == "running" and detail["step"] == 1  # still shadowing, healthy
    agreement = next(m for m in detail["metrics"] if m["name"] == "agreement")
    assert agreement["verdict"] == "OK", agreement
