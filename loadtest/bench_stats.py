"""Benchmark: evaluate every test of a rollout with >= 1,000,000 observations per arm.

The rollout has the metrics of the DESIGN.md example (latency p95, ttft p50, errors, cost,
memory, accuracy), the trade-off net value and the SRM guard, with data from three allocation
steps (5%, 25%, 50%). The work is proportional to histogram buckets and strata, not to
observations, so the time does not grow with traffic.

    python -m loadtest.bench_stats [--repeats 300] [--scale 1.0]

Prints the median (and 90th percentile) wall time of one full evaluation, with the histogram
snapshots already converted to arrays and, separately, including ``LogHistogram.to_arrays()``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from canary.observe.histogram import LogHistogram
from canary.stats import (
    ArmMoments,
    ArmRouting,
    HistogramArrays,
    MetricResult,
    error_test,
    mean_test,
    net_value,
    quantile_test,
    rate_test,
    split_alpha,
    srm_test,
)

STEPS = (0.05, 0.25, 0.5)
# Requests per step: the candidate gets 5%, 25% then 50% of them; both arms end with at least
# 1,000,000 observations (candidate 1.0M, production 1.56M).
REQUESTS = (400_000, 400_000, 1_770_000)


def _histogram(values: np.ndarray) -> LogHistogram:
    """A LogHistogram holding ``values``, filled in bulk (set-up, not timed)."""
    h = LogHistogram()
    idx = np.ceil(np.log(values) * h._inv_log_gamma).astype(np.int64)
    keys, counts = np.unique(idx, return_counts=True)
    h.pos = {int(k): int(c) for k, c in zip(keys, counts, strict=True)}
    h.count = int(values.size)
    return h


def _moments(values: np.ndarray, steps: np.ndarray, production: bool) -> ArmMoments:
    p = np.asarray(STEPS)[steps]
    return ArmMoments.from_values(values, 1.0 - p if production else p)


def build(scale: float = 1.0, seed: int = 0) -> dict[str, dict[str, object]]:
    """Accumulators of a rollout whose requests were split by the steps' weights."""
    rng = np.random.default_rng(seed)
    step = np.repeat(np.arange(len(STEPS)), np.round(np.asarray(REQUESTS) * scale).astype(int))
    p = np.asarray(STEPS)
    to_candidate = rng.random(step.size) < p[step]
    arms: dict[str, dict[str, object]] = {}
    for arm, sel, slower in (("production", ~to_candidate, 1.0), ("candidate", to_candidate, 1.03)):
        n = int(sel.sum())
        steps = step[sel]
        prod = arm == "production"
        latency = slower * np.exp(0.5 * rng.standard_normal(n))
        ttft = 0.2 * slower * np.exp(0.7 * rng.standard_normal(n))
        errors = (rng.random(n) < 0.01).astype(float)
        correct = (rng.random(n) < 0.9).astype(float)
        routed = np.bincount(steps, minlength=len(STEPS))
        answered = routed - rng.binomial(routed, 0.001)
        arms[arm] = {
            "latency_hist": _histogram(latency),
            "ttft_hist": _histogram(ttft),
            "latency": _moments(latency, steps, prod),
            "cost": _moments(0.002 * latency, steps, prod),
            "memory": _moments(2e9 + 1e8 * rng.standard_normal(n), steps, prod),
            "errors": _moments(errors, steps, prod),
            "accuracy": _moments(correct, steps, prod),
            "routing": ArmRouting(1.0 - p if prod else p, routed, answered),
        }
    return arms


def evaluate(
    arms: dict[str, dict[str, object]], snapshot: Callable[[LogHistogram], HistogramArrays]
) -> list[MetricResult]:
    """Every test of one analysis interval, as the controller runs it."""
    prod, cand = arms["production"], arms["candidate"]
    a = split_alpha(0.05, 7)
    lat_p95 = quantile_test(
        snapshot(prod["latency_hist"]),  # type: ignore[arg-type]
        snapshot(cand["latency_hist"]),  # type: ignore[arg-type]
        0.95,
        0.10,
        alpha=a,
        name="latency_p95",
    )
    ttft = quantile_test(
        snapshot(prod["ttft_hist"]),  # type: ignore[arg-type]
        snapshot(cand["ttft_hist"]),  # type: ignore[arg-type]
        0.5,
        0.15,
        alpha=a,
        name="ttft_p50",
    )
    errors = error_test(prod["errors"], cand["errors"], 0.005, alpha=a, name="errors")  # type: ignore[arg-type]
    cost = mean_test(prod["cost"], cand["cost"], 0.05, alpha=a, name="cost")  # type: ignore[arg-type]
    memory = mean_test(prod["memory"], cand["memory"], 0.20, alpha=a, name="memory")  # type: ignore[arg-type]
    accuracy = rate_test(prod["accuracy"], cand["accuracy"], 0.01, alpha=a, name="accuracy")  # type: ignore[arg-type]
    srm = srm_test(prod["routing"], cand["routing"], alpha=a)  # type: ignore[arg-type]
    net = net_value(
        [accuracy, lat_p95, cost], {"accuracy": 0.01, "latency_p95": 0.10, "cost": 0.05}
    )
    return [lat_p95, ttft, errors, cost, memory, accuracy, srm, net]


def _snapshot(h: LogHistogram) -> HistogramArrays:
    values, counts = h.to_arrays()
    return HistogramArrays(values, counts, h.accuracy)


def timeit(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the traffic")
    args = parser.parse_args(argv)
    arms = build(args.scale)
    hists: list[LogHistogram] = [
        arm[key]  # type: ignore[misc]
        for arm in arms.values()
        for key in ("latency_hist", "ttft_hist")
    ]
    cached = {id(h): _snapshot(h) for h in hists}
    n_obs = {name: arm["latency"].total for name, arm in arms.items()}  # type: ignore[attr-defined]
    buckets = sum(c.values.size for c in cached.values())
    for line in evaluate(arms, _snapshot):
        print(line.explain())
    stats_only = timeit(lambda: evaluate(arms, lambda h: cached[id(h)]), args.repeats)
    with_snap = timeit(lambda: evaluate(arms, _snapshot), args.repeats)
    print(
        f"\n{n_obs['production']:,}/{n_obs['candidate']:,} observations (production/candidate), "
        f"3 strata, {buckets} histogram buckets "
        f"in total, 8 results per evaluation, {args.repeats} repeats"
    )
    for label, times in (("statistics only", stats_only), ("with to_arrays()", with_snap)):
        ms = [t * 1e3 for t in times]
        p90 = statistics.quantiles(ms, n=10)[-1]
        print(f"{label:>17}: median {statistics.median(ms):.2f} ms, p90 {p90:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
