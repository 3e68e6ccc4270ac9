"""LLM endpoints end to end: streamed chat completions measured per arm and decided on ttft."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from loadtest.loadgen import LoadConfig, run_load
from tests.conftest import fake_pair, rollout_config, running_canary

# Equal total generation time (40 ms + 15 x 8 ms = 80 ms + 15 x 5.33 ms = 160 ms), but the
# candidate makes users wait twice as long for the first token.
PRODUCTION = {"ttft": 0.040, "inter_token": 0.008, "completion_tokens": 16}
SLOW_START = {"ttft": 0.080, "inter_token": 0.080 / 15, "completion_tokens": 16}
PRICING = {"production": 0.50, "candidate": 0.35}  # per 1k tokens


def _config(p: str, c: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    cfg = rollout_config(
        [p],
        [c],
        steps=steps,
        analysis={
            "interval": "100ms",
            "burn_in": 50,
            "metrics": [
                {"name": "ttft_p50", "signal": "ttft", "stat": "p50", "max_increase": "15%"},
                {"name": "latency_p95", "signal": "latency", "stat": "p95",
                 "max_increase": "10%"},
                {"name": "errors", "signal": "error", "stat": "rate", "max_increase": "0.5pp"},
                {"name": "itl", "signal": "itl", "stat": "mean", "max_increase": "50%"},
                {"name": "tokens_per_s", "signal": "tokens_per_s", "stat": "mean",
                 "max_decrease": "50%"},
                {"name": "cost", "signal": "cost", "stat": "mean", "max_increase": "5%"},
            ],
        },
    )  # fmt: skip
    for arm, price in PRICING.items():
        cfg["rollouts"][0][arm]["cost"] = {"per_1k_tokens": price}
    return cfg


async def test_stream_metrics_and_token_cost_per_arm() -> None:
    async with fake_pair(PRODUCTION, SLOW_START) as (p, c):
        async with running_canary(_config(p, c, [{"weight": 50}])) as can:
            report = await run_load(
                LoadConfig(url=can.url + "/v1/chat/completions", rate=80, requests=120,
                           body="chat-stream", max_tokens=16, timeout=5.0)
            )  # fmt: skip
            acc = await can.samples("m")
            async with httpx.AsyncClient() as client:
                metrics = (await client.get(can.admin + "/metrics")).text
    assert report.ok == 120 and not report.errors
    prod, cand = acc.production.signals, acc.candidate.signals
    assert prod["ttft"].mean == pytest.approx(0.040, abs=0.015)
    assert cand["ttft"].mean == pytest.approx(0.080, abs=0.015)
    assert prod["latency"].mean == pytest.approx(cand["latency"].mean, rel=0.15)
    # 16 tokens over 120 ms vs 80 ms after the first: the candidate streams faster
    assert cand["itl"].mean < prod["itl"].mean
    assert cand["tokens_per_s"].mean > prod["tokens_per_s"].mean
    # token-priced cost per request: the stream's usage (same tokens on both arms) x price
    assert prod["cost"].n == acc.production.observed
    assert cand["cost"].mean / prod["cost"].mean == pytest.approx(0.35 / 0.50, rel=0.02)
    assert 'canary_cost_per_1k_requests{arm="candidate",rollout="m"}' in metrics


async def test_twice_the_ttft_at_equal_total_latency_is_rolled_back_on_ttft() -> None:
    async with fake_pair(PRODUCTION, SLOW_START) as (p, c):
        cfg = _config(p, c, [{"weight": 10, "min_requests": 50}, {"weight": 50}])
        async with running_canary(cfg, controller=True) as can, httpx.AsyncClient() as client:
            deadline = time.monotonic() + 30.0
            detail: dict[str, Any] = {}
            while time.monotonic() < deadline:
                await run_load(
                    LoadConfig(url=can.url + "/v1/chat/completions", rate=150, requests=150,
                               body="chat-stream", max_tokens=16, timeout=5.0)
                )  # fmt: skip
                detail = (await client.get(can.admin + "/api/v1/rollouts/m")).json()
                if detail["phase"] != "running":
                    break
    assert detail["phase"] == "rolled_back", detail.get("last_decision")
    reason = detail["last_decision"]["reason"]
    assert "ttft_p50" in reason, reason
    latency = next(m for m in detail["metrics"] if m["name"] == "latency_p95")
    assert latency["verdict"] != "WORSE", latency  # the total time did not decide it
