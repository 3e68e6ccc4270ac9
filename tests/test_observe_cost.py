"""Cost arithmetic and the request-rate estimator of canary.observe.cost."""

from __future__ import annotations

import math

import pytest

from canary.observe.cost import ArmCost, Pricing, RateEstimator, cost_per_1000
from canary.observe.extract import ResponseExtractor


def _steady(rate: float, seconds: float, est: RateEstimator, t0: float = 0.0) -> float:
    """Tick ``est`` at a constant ``rate`` for ``seconds``; return the time of the last tick."""
    n = round(rate * seconds)
    t = t0
    for i in range(n):
        t = t0 + i / rate
        est.tick(t)
    return t


# --- rate estimator ---------------------------------------------------------------------------


def test_rate_before_any_tick_is_zero() -> None:
    assert RateEstimator().rate(123.0) == 0.0


def test_rate_converges_to_a_constant_rate() -> None:
    est = RateEstimator(half_life=30.0)
    t = _steady(20.0, 300.0, est, t0=1000.0)
    # Exact for a constant rate up to the discreteness of ticks (half a tick of decay): 1%.
    assert est.rate(t) == pytest.approx(20.0, rel=0.01)
    assert est.count == 6000


@pytest.mark.parametrize("seconds", [1.5, 5.0, 30.0, 90.0])
def test_rate_is_unbiased_at_every_age(seconds: float) -> None:
    # The bias correction makes a young estimator right too, not only after many half-lives.
    est = RateEstimator(half_life=30.0)
    t = _steady(50.0, seconds, est)
    assert est.rate(t) == pytest.approx(50.0, rel=0.02)


def test_start_up_floor_keeps_first_costs_sane() -> None:
    est = RateEstimator(half_life=30.0, min_elapsed=1.0)
    est.tick(10.0)
    # One request at t=0 reads as about 1/s (the floor), not 1/epsilon or 0.
    assert est.rate(10.0) == pytest.approx(1.0, rel=0.02)
    for i in range(1, 50):
        est.tick(10.0 + i * 0.01)  # 100/s for half a second
    # Still inside the floor: the elapsed-time rate over 1 s, i.e. underestimated, never inf.
    assert est.rate(10.49) == pytest.approx(50.0, rel=0.02)


def test_rate_decays_when_traffic_stops() -> None:
    est = RateEstimator(half_life=30.0)
    t = _steady(10.0, 600.0, est)
    assert est.rate(t + 30.0) == pytest.approx(5.0, rel=0.02)  # one half-life later
    assert est.rate(t + 300.0) < 0.01


def test_rate_follows_a_change_within_a_few_half_lives() -> None:
    est = RateEstimator(half_life=10.0)
    t = _steady(10.0, 300.0, est)
    t = _steady(40.0, 100.0, est, t0=t + 0.025)
    assert est.rate(t) == pytest.approx(40.0, rel=0.02)


def test_share_scales_a_workers_view_to_the_whole_rollout() -> None:
    one, half = RateEstimator(), RateEstimator(share=0.5)
    for est in (one, half):
        _steady(10.0, 100.0, est)
    assert half.rate(99.9) == pytest.approx(2 * one.rate(99.9))


def test_clock_stepping_back_does_not_break_the_estimate() -> None:
    est = RateEstimator()
    est.tick(100.0)
    est.tick(99.0)
    est.tick(100.0)
    r = est.rate(99.5)
    assert math.isfinite(r)
    assert r > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"half_life": 0.0}, "half_life"), ({"min_elapsed": -1.0}, "min_elapsed"),
     ({"share": 0.0}, "share"), ({"share": 1.5}, "share")],
)  # fmt: skip
def test_rate_estimator_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RateEstimator(**kwargs)


# --- pricing and cost -------------------------------------------------------------------------


def _cost(pricing: Pricing, rate: float = 10.0) -> ArmCost:
    est = RateEstimator()
    _steady(rate, 600.0, est)
    return ArmCost(pricing, est)


def test_per_request_only() -> None:
    assert _cost(Pricing(per_request=0.002)).cost(599.9) == 0.002


def test_per_token_cost_needs_tokens() -> None:
    arm = _cost(Pricing(per_request=0.001, per_1k_tokens=0.5))
    assert arm.cost(599.9, tokens=1500) == pytest.approx(0.001 + 0.75)
    assert arm.cost(599.9, tokens=None) is None  # not silently cheaper
    assert Pricing(per_1k_tokens=0.5).needs_tokens
    assert not Pricing(per_hour=1.0).needs_tokens


def test_header_cost() -> None:
    arm = _cost(Pricing(per_request=0.01, header="X-Model-Cost"))
    assert arm.cost(599.9, headers={"x-model-cost": "0.25"}) == pytest.approx(0.26)
    assert arm.cost(599.9, headers={"x-model-cost": "n/a"}) is None
    assert arm.cost(599.9, headers={}) is None
    assert arm.cost(599.9) is None


def test_amortised_hourly_cost_uses_the_rollout_rate() -> None:
    # 2 replicas at 3.60/h = 0.002/s; at 10 req/s that is 0.0002 per request.
    arm = _cost(Pricing(per_hour=3.6, replicas=2), rate=10.0)
    assert arm.cost(599.9) == pytest.approx(0.0002, rel=0.01)
    assert cost_per_1000(arm.cost(599.9) or 0.0) == pytest.approx(0.2, rel=0.01)


def test_both_arms_share_one_rate() -> None:
    # The candidate at 5% is priced as if it served all traffic: same rate for both arms.
    est = RateEstimator()
    _steady(100.0, 300.0, est)
    prod = ArmCost(Pricing(per_hour=3.6), est)
    cand = ArmCost(Pricing(per_hour=7.2), est)
    assert cand.cost(299.99) == pytest.approx(2 * (prod.cost(299.99) or 0.0))
    assert prod.cost(299.99) == pytest.approx(0.001 / 100, rel=0.01)


def test_all_components_add_up() -> None:
    arm = _cost(
        Pricing(per_request=0.001, per_1k_tokens=0.02, per_hour=36.0, replicas=1, header="x-c"),
        rate=10.0,
    )
    got = arm.cost(599.9, tokens=500, headers={"x-c": "0.004"})
    assert got == pytest.approx(0.001 + 0.01 + 0.004 + 0.001, rel=1e-3)


def test_no_rate_yet_means_no_amortised_cost() -> None:
    arm = ArmCost(Pricing(per_request=1.0, per_hour=1.0), RateEstimator())
    assert arm.cost(0.0) is None
    assert ArmCost(Pricing(per_request=1.0), RateEstimator()).cost(0.0) == 1.0


def test_unpriced_arm_costs_zero() -> None:
    assert ArmCost(Pricing(), RateEstimator()).cost(0.0) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"per_request": -1.0}, "per_request"), ({"per_hour": math.nan}, "per_hour"),
     ({"per_1k_tokens": math.inf}, "per_1k_tokens"), ({"replicas": 0}, "replicas"),
     ({"replicas": 1.5}, "replicas"), ({"header": "X Cost"}, "header")],
)  # fmt: skip
def test_pricing_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Pricing(**kwargs)  # type: ignore[arg-type]


def test_cost_signal_through_the_inspector() -> None:
    est = RateEstimator()
    _steady(10.0, 600.0, est)
    arm = ArmCost(Pricing(per_1k_tokens=1.0, header="X-Model-Cost"), est)
    ex = ResponseExtractor(["cost"], cost_tokens=True)
    ins = ex.start("application/json")
    ins.feed(b'{"usage": {"total_tokens": 250}}')
    ins.finish({"x-model-cost": "0.5"}, latency=0.1, ttft=0.05, cost=arm, now=599.9)
    assert ins.signals == {"cost": pytest.approx(0.75)}
    # without a cost model (e.g. an arm without pricing) there is no cost signal
    ins = ex.start("application/json")
    ins.feed(b'{"usage": {"total_tokens": 250}}')
    ins.finish({}, latency=0.1, ttft=0.05)
    assert ins.signals == {}
