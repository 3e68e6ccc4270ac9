"""Combining metrics: Bonferroni, intersection-union, net value; result formatting."""

from __future__ import annotations

import math

import pytest

from canary.stats import (
    Direction,
    MetricKind,
    MetricResult,
    Verdict,
    classify,
    net_value,
    promotion_verdict,
    rollback_verdict,
    split_alpha,
)


def _result(
    name: str,
    lower: float,
    upper: float,
    *,
    relative: bool = True,
    direction: Direction = Direction.INCREASE,
    verdict: Verdict = Verdict.UNKNOWN,
    kind: MetricKind = MetricKind.MEAN,
    estimate: float | None = None,
) -> MetricResult:
    return MetricResult(
        name=name,
        kind=kind,
        estimate=(lower + upper) / 2 if estimate is None else estimate,
        lower=lower,
        upper=upper,
        margin=0.1,
        relative=relative,
        direction=direction,
        verdict=verdict,
        n_production=1000,
        n_candidate=50,
        alpha=0.0125,
    )


def test_classify_follows_the_verdict_rule() -> None:
    up, down = Direction.INCREASE, Direction.DECREASE
    assert classify(1.12, 1.3, 1.1, up) is Verdict.WORSE
    assert classify(0.9, 1.1, 1.1, up) is Verdict.OK  # the tolerance itself is allowed
    assert classify(1.0, 1.2, 1.1, up) is Verdict.UNKNOWN
    assert classify(-0.03, -0.02, -0.01, down) is Verdict.WORSE
    assert classify(-0.01, 0.02, -0.01, down) is Verdict.OK
    assert classify(math.nan, math.nan, 1.1, up) is Verdict.UNKNOWN


def test_split_alpha_and_its_checks() -> None:
    assert split_alpha(0.05, 4) == pytest.approx(0.0125)
    with pytest.raises(ValueError, match="0"):
        split_alpha(0.05, 0)
    with pytest.raises(ValueError, match=r"1\.5"):
        split_alpha(1.5, 2)


def test_rollback_and_promotion_verdicts() -> None:
    ok = _result("a", 0.9, 1.05, verdict=Verdict.OK)
    unknown = _result("b", 0.9, 1.2)
    worse = _result("c", 1.2, 1.3, verdict=Verdict.WORSE)
    srm = _result("srm", 0.5, 2.0, kind=MetricKind.SRM)
    assert rollback_verdict([ok, unknown]) is Verdict.UNKNOWN
    assert rollback_verdict([ok, worse]) is Verdict.WORSE
    assert promotion_verdict([ok, ok, srm]) is Verdict.OK  # the SRM guard is not a criterion
    assert promotion_verdict([ok, unknown]) is Verdict.UNKNOWN
    assert promotion_verdict([ok, worse]) is Verdict.WORSE
    assert promotion_verdict([srm]) is Verdict.UNKNOWN


def test_net_value_interval_arithmetic_and_signs() -> None:
    # accuracy +2pp [+1pp, +3pp] (higher is better), p95 latency ratio [1.05, 1.15],
    # cost ratio [0.90, 1.00]; trade-off: 1pp accuracy ~ 10% latency ~ 5% cost.
    acc = _result("accuracy", 0.01, 0.03, relative=False, direction=Direction.DECREASE)
    lat = _result("latency_p95", 1.05, 1.15)
    cost = _result("cost", 0.90, 1.00)
    res = net_value([acc, lat, cost], {"accuracy": 0.01, "latency_p95": 0.10, "cost": 0.05})
    # accuracy [1, 3], latency [-1.5, -0.5], cost [0, 2] units
    assert res.lower == pytest.approx(1 - 1.5 + 0)
    assert res.upper == pytest.approx(3 - 0.5 + 2)
    assert res.estimate == pytest.approx(2 - 1 + 1)
    assert res.verdict is Verdict.UNKNOWN and res.kind is MetricKind.NET_VALUE
    assert res.alpha == pytest.approx(3 * 0.0125)
    better = net_value([acc, cost], {"accuracy": 0.01, "cost": 0.05})
    assert better.verdict is Verdict.OK
    worse = net_value([lat], {"latency_p95": 0.10})
    assert worse.verdict is Verdict.WORSE
    assert "positive = candidate better" in res.explain()
    assert net_value([lat], {"latency_p95": 0.1}, burn_in=100).verdict is Verdict.UNKNOWN


def test_net_value_unbounded_components_give_unknown() -> None:
    lat = _result("latency_p95", 0.0, math.inf)
    res = net_value([lat], {"latency_p95": 0.1})
    assert res.lower == -math.inf and res.verdict is Verdict.UNKNOWN


def test_net_value_checks_weights() -> None:
    lat = _result("latency_p95", 1.0, 1.1)
    with pytest.raises(ValueError, match="cost"):
        net_value([lat], {"latency_p95": 0.1, "cost": 0.05})
    with pytest.raises(ValueError, match=r"-0\.1"):
        net_value([lat], {"latency_p95": -0.1})
    with pytest.raises(ValueError, match="empty"):
        net_value([], {})


def test_explain_formats() -> None:
    lat = MetricResult(
        name="latency_p95",
        kind=MetricKind.QUANTILE,
        estimate=1.04,
        lower=0.98,
        upper=1.11,
        margin=0.10,
        relative=True,
        direction=Direction.INCREASE,
        verdict=Verdict.UNKNOWN,
        n_production=1200,
        n_candidate=64,
        alpha=0.05,
    )
    assert lat.explain() == (
        "latency_p95: candidate/production ratio 1.04 [0.98, 1.11], margin +10%, "
        "n=1200/64, alpha=0.05 -> UNKNOWN"
    )
    assert lat.tolerance == pytest.approx(1.1)
    errors = _result("errors", -0.002, 0.004, relative=False, kind=MetricKind.ERROR_RATE)
    assert "errors: candidate-production difference +0.1pp [-0.2pp, +0.4pp]" in errors.explain()
    assert "margin +10pp" in errors.explain()
