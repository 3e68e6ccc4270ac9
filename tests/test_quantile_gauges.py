"""Per-arm quantile gauges (``canary_signal_quantile``) at the analysis' resolution.

The regression of issue 15: a candidate whose time to first token is 30% longer (50 ms vs
65 ms) lands in the same classic Prometheus bucket (50-75 ms) as production, so
``histogram_quantile`` shows both arms at about 62 ms. canary's gauges, read from its own
0.5%-accurate histograms, show the 30%, and their ratio is the analysis' own estimate.
"""

from __future__ import annotations

import math
import random
import statistics

import httpx
import pytest
import yaml

from canary.config import load_config_text
from canary.controller.gauges import QUANTILE_LEVELS, Gauges, arm_quantiles, quantile_levels
from canary.decision import analyze
from canary.metrics import Metrics
from canary.observe import RolloutAccumulator
from canary.observe.record import Observation
from loadtest.loadgen import LoadConfig, ResponseRecord, run_load
from tests.conftest import fake_pair, rollout_config, running_canary
from tests.prometheus_harness import histogram_quantile, samples, scraped_buckets, select

PRODUCTION_TTFT = 0.050
CANDIDATE_TTFT = 0.065  # +30%: the same classic bucket (0.05, 0.075]
TRUE_RATIO = CANDIDATE_TTFT / PRODUCTION_TTFT
QUANTILE_METRICS: list[dict[str, str]] = [
    {"name": "ttft_p50", "signal": "ttft", "stat": "p50", "max_increase": "15%"},
    {"name": "latency_p95", "signal": "latency", "stat": "p95", "max_increase": "10%"},
    {"name": "tokens_p99", "signal": "json:usage.total_tokens", "stat": "p99.9",
     "max_increase": "10%"},
    {"name": "errors", "signal": "error", "stat": "rate", "max_increase": "1pp"},
]  # fmt: skip


def _rollout_yaml(metrics: list[dict[str, str]]) -> str:
    cfg = rollout_config(
        ["http://127.0.0.1:1"], ["http://127.0.0.1:2"], analysis={"metrics": metrics}
    )
    return yaml.safe_dump(cfg)


def test_levels_cover_latency_ttft_and_every_quantile_judged_signal() -> None:
    cfg = load_config_text(_rollout_yaml(QUANTILE_METRICS)).rollouts[0]
    levels = quantile_levels(cfg)
    assert levels["latency"] == QUANTILE_LEVELS
    assert levels["ttft"] == QUANTILE_LEVELS
    assert levels["json:usage.total_tokens"] == (*QUANTILE_LEVELS, 99.9 / 100)
    assert "error" not in levels  # a rate, not a quantile


def _obs(arm: str, latency: float, propensity: float, ttft: float | None = None) -> Observation:
    return Observation(
        rollout="m", arm=arm, propensity=propensity, shadow=False, request_id="",
        status=200, error=None, latency=latency, ttft=ttft,
    )  # fmt: skip


def test_the_gauges_ratio_is_the_analysis_estimate_over_shadow_and_steps() -> None:
    """Shadow, then 10%, then 50%: every arm's quantile is the post-stratified one the
    quantile test inverts, so candidate/production at p95 is ``latency_p95``'s estimate."""
    cfg = load_config_text(_rollout_yaml(QUANTILE_METRICS)).rollouts[0]
    acc = RolloutAccumulator()
    rng = random.Random(7)
    # a level that drifts between the steps (both arms alike), the candidate 20% slower
    for weight, level, n in ((None, 0.010, 1000), (0.10, 0.020, 10000), (0.50, 0.015, 4000)):
        for _ in range(n):
            if weight is None:  # shadow: both arms answer every request at propensity 1
                x = level * rng.lognormvariate(0, 0.4)
                acc.record(_obs("production", x, 1.0))
                acc.record(_obs("candidate", 1.2 * level * rng.lognormvariate(0, 0.4), 1.0))
            elif rng.random() < weight:
                acc.record(_obs("candidate", 1.2 * level * rng.lognormvariate(0, 0.4), weight))
            else:
                acc.record(_obs("production", level * rng.lognormvariate(0, 0.4), 1 - weight))
    rows = {(arm, sig, q): v for arm, sig, q, v in arm_quantiles(cfg, acc)}
    estimate = {r.name: r.estimate for r in analyze(cfg, acc).metrics}
    ratio = rows[("candidate", "latency", 0.95)] / rows[("production", "latency", 0.95)]
    assert ratio == pytest.approx(estimate["latency_p95"], rel=1e-12)
    assert ratio == pytest.approx(1.2, rel=0.08)
    assert not any(sig == "ttft" for _, sig, _ in rows)  # no ttft recorded: not exported


def test_quantiles_are_within_the_histogram_accuracy_of_the_true_ones() -> None:
    cfg = load_config_text(_rollout_yaml(QUANTILE_METRICS[:1])).rollouts[0]
    acc = RolloutAccumulator()
    rng = random.Random(3)
    values: dict[str, list[float]] = {"production": [], "candidate": []}
    for i in range(20_000):
        arm = "candidate" if i % 2 else "production"
        x = rng.lognormvariate(math.log(0.05), 0.5) * (1.3 if arm == "candidate" else 1.0)
        values[arm].append(x)
        acc.record(_obs(arm, x, 0.5, ttft=x))
    for arm, sig, q, got in arm_quantiles(cfg, acc):
        ordered = sorted(values[arm])
        true = ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]
        assert got == pytest.approx(true, rel=0.006), (arm, sig, q)


def test_a_scrape_computes_once_per_change_of_the_totals() -> None:
    cfg = load_config_text(_rollout_yaml(QUANTILE_METRICS[:1])).rollouts[0]
    acc = RolloutAccumulator()
    for i in range(10):
        acc.record(_obs("production" if i % 2 else "candidate", 0.01 * (i + 1), 0.5))

    class _Rollout:
        config, totals, version = cfg, acc, 1

    ro = _Rollout()
    gauges = Gauges(Metrics(), lambda: {"m": ro}, lambda: True)  # type: ignore[dict-item]
    first = dict(gauges.quantiles())["m"]
    assert dict(gauges.quantiles())["m"] is first  # cached: nothing changed
    ro.version = 2
    assert dict(gauges.quantiles())["m"] is not first


async def test_gauges_show_a_ttft_regression_that_classic_buckets_hide() -> None:
    async with fake_pair(
        {"ttft": PRODUCTION_TTFT, "completion_tokens": 2},
        {"ttft": CANDIDATE_TTFT, "completion_tokens": 2},
    ) as (p, c):
        cfg = rollout_config(
            [p], [c], steps=[{"weight": 50}],
            analysis={"burn_in": 50, "metrics": QUANTILE_METRICS[:2]},
        )  # fmt: skip
        ttfb: dict[str, list[float]] = {"production": [], "candidate": []}

        def on_response(r: ResponseRecord) -> None:
            if r.arm in ttfb and r.ttfb is not None and r.error is None:
                ttfb[r.arm].append(r.ttfb)

        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            report = await run_load(
                LoadConfig(url=can.url + "/v1/chat/completions", rate=150, requests=400,
                           body="chat-stream", max_tokens=2, timeout=5.0,
                           on_response=on_response)
            )  # fmt: skip
            assert report.ok == 400, report
            await can.runtime.controller.flush()
            await can.runtime.controller.evaluate(force=True)
            found = samples((await client.get(can.admin + "/metrics")).text)

    def gauge(arm: str, signal: str, q: str) -> float:
        (s,) = select(found, "canary_signal_quantile", rollout="m", arm=arm, signal=signal,
                      quantile=q)  # fmt: skip
        return s.value

    (estimate,) = select(found, "canary_metric_estimate", rollout="m", metric="ttft_p50")
    prod, cand = gauge("production", "ttft", "0.5"), gauge("candidate", "ttft", "0.5")
    family = "canary_time_to_first_byte_seconds"
    classic = {
        arm: histogram_quantile(0.5, scraped_buckets(found, family, rollout="m", arm=arm))
        for arm in ("production", "candidate")
    }
    client_ratio = statistics.median(ttfb["candidate"]) / statistics.median(ttfb["production"])
    p_classic, c_classic = classic["production"], classic["candidate"]
    print(
        f"ttft p50: gauges {prod * 1e3:.2f} / {cand * 1e3:.2f} ms (x{cand / prod:.3f}); "
        f"histogram_quantile {p_classic * 1e3:.2f} / {c_classic * 1e3:.2f} ms "
        f"(x{c_classic / p_classic:.3f}); "
        f"configured x{TRUE_RATIO:.3f}, client-measured x{client_ratio:.3f}; "
        f"canary_metric_estimate {estimate.value:.4f}"
    )
    # canary's gauges: the configured 30% and what a client measures, within a few %
    assert cand / prod == pytest.approx(TRUE_RATIO, rel=0.03)
    assert cand / prod == pytest.approx(client_ratio, rel=0.03)
    assert cand / prod == pytest.approx(estimate.value, rel=1e-12)  # the analysis' own number
    # classic buckets: both arms in (50 ms, 75 ms], interpolated to a few % apart at most
    assert classic["candidate"] / classic["production"] < 1.05
    assert gauge("production", "latency", "0.99") > 0
    (leader,) = select(found, "canary_leader")
    assert leader.value == 1.0
