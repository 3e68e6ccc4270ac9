"""Recording, merging and serialising the per-arm accumulators of canary.observe."""

from __future__ import annotations

import json
import math
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canary.observe import (
    CLUSTERS,
    ArmAccumulator,
    LogHistogram,
    Moments,
    Observation,
    Recorder,
    RolloutAccumulator,
    SignalAccumulator,
    coarse_bucket,
    coarse_upper,
)


def _obs(
    arm: str = "production",
    *,
    propensity: float = 0.95,
    status: int = 200,
    error: str | None = None,
    latency: float = 0.1,
    ttft: float | None = None,
    signals: dict[str, float] | None = None,
    shadow: bool = False,
    rollout: str = "r",
    cluster: int = -1,
) -> Observation:
    return Observation(
        rollout=rollout,
        arm=arm,
        propensity=propensity,
        shadow=shadow,
        request_id="id",
        status=status,
        error=error,
        latency=latency,
        ttft=ttft,
        bytes_out=10,
        bytes_in=100,
        signals=signals if signals is not None else {},
        cluster=cluster,
    )


def test_observation_is_slotted() -> None:
    assert not hasattr(_obs(), "__dict__")


def test_record_counts_and_signals() -> None:
    acc = RolloutAccumulator()
    acc.record_lost("candidate", 0.05, 3)
    acc.record(_obs("candidate", propensity=0.05, ttft=0.02, signals={"cost": 0.5}))
    acc.record(_obs("candidate", propensity=0.05, status=503, error="status", latency=0.3))
    acc.record(_obs("candidate", propensity=0.05, status=0, error="connect", latency=0.001))
    acc.record(_obs("candidate", propensity=1.0, shadow=True, status=404, latency=0.2))
    c = acc.candidate
    assert (c.routed, c.observed, c.answered, c.errors, c.shadow) == (7, 4, 3, 2, 1)
    assert c.routing == {0.05: [6, 3], 1.0: [1, 1]}
    assert c.error_kinds == {"status": 1, "connect": 1}
    assert c.status_classes == {"2xx": 1, "5xx": 1, "4xx": 1}
    assert (c.bytes_in, c.bytes_out) == (400, 40)
    assert set(c.signals) == {"latency", "error", "ttft", "cost"}
    err = c.signals["error"]
    assert err.strata == {0.05: Moments(3, 2.0, 2.0), 1.0: Moments(1, 0.0, 0.0)}
    # latency of complete responses only: the 1 ms connection failure is not a fast response
    lat = c.signals["latency"]
    assert lat.n == 3
    assert lat.min == 0.1
    assert lat.max == 0.3
    assert c.signals["ttft"].n == 1
    assert c.signals["cost"].strata == {0.05: Moments(1, 0.5, 0.25)}
    assert acc.production.observed == 0
    assert set(acc.production.signals) == {"latency", "error"}


def test_status_classes_are_bounded() -> None:
    arm = ArmAccumulator()
    for status in (99, 100, 299, 599, 600, 999, 0):
        arm.record(_obs(status=status))
    assert arm.status_classes == {"other": 3, "1xx": 1, "2xx": 1, "5xx": 1}
    assert arm.answered == 6


def test_bad_arm_and_propensity_are_rejected() -> None:
    acc = RolloutAccumulator()
    with pytest.raises(ValueError, match="unknown arm 'canary'"):
        acc.record(_obs("canary"))
    with pytest.raises(ValueError, match="unknown arm"):
        acc.record_lost("shadow", 1.0)
    for p in (0.0, 1.5, math.nan, -0.1):
        with pytest.raises(ValueError, match="propensity"):
            acc.record(_obs(propensity=p))
    assert acc.empty


def test_non_finite_values_are_ignored() -> None:
    s = SignalAccumulator()
    for v in (math.nan, math.inf, -math.inf, 2.0):
        s.add(v)
    assert s.n == 1
    assert s.hist.count == 1
    assert s.min == s.max == 2.0


def test_signal_accumulator_statistics() -> None:
    s = SignalAccumulator()
    for v, p in ((1.0, 0.5), (2.0, 0.5), (3.0, 0.25), (-1.0, 0.25)):
        s.add(v, p)
    assert s.n == 4
    assert s.total == 5.0
    assert s.mean == 1.25
    assert (s.min, s.max) == (-1.0, 3.0)
    assert s.strata[0.5].mean == 1.5
    assert s.strata[0.5].variance == 0.5
    assert math.isnan(SignalAccumulator().mean)
    assert math.isnan(Moments(1, 1.0, 1.0).variance)
    assert s.hist.quantile(1.0) == pytest.approx(3.0, rel=0.01)


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=50))
def test_inlined_histogram_add_matches_log_histogram(values: list[float]) -> None:
    s, h = SignalAccumulator(), LogHistogram()
    for v in values:
        s.add(v)
        h.add(v)
    assert s.hist.to_dict() == h.to_dict()


# --- merge properties -------------------------------------------------------------------------

# Dyadic values (k / 64) keep float sums exact, so merged results compare equal bit for bit;
# with arbitrary floats they agree up to rounding (checked separately below).
_value = st.integers(0, 64 * 50).map(lambda k: k / 64)
_observations = st.builds(
    _obs,
    arm=st.sampled_from(["production", "candidate"]),
    propensity=st.sampled_from([0.05, 0.95, 0.25, 0.75, 1.0]),
    status=st.sampled_from([0, 200, 204, 404, 500, 503]),
    error=st.sampled_from([None, None, "status", "connect", "timeout", "reset", "protocol"]),
    latency=_value,
    ttft=st.one_of(st.none(), _value),
    signals=st.dictionaries(
        st.sampled_from(["cost", "json:usage.total_tokens", "header:x-c", "tokens_per_s"]),
        st.integers(-64 * 5, 64 * 5000).map(lambda k: k / 64),
        max_size=3,
    ),
    shadow=st.booleans(),
    cluster=st.sampled_from([-1, -1, 0, 7, 63]),
)


def _record_all(observations: list[Observation], routed: list[str]) -> RolloutAccumulator:
    acc = RolloutAccumulator()
    for o in observations:
        acc.record(o)
    for arm in routed:
        acc.record_lost(arm, 0.5)
    return acc


@settings(max_examples=150, deadline=None)
@given(
    st.lists(_observations, max_size=60),
    st.lists(st.sampled_from(["production", "candidate"]), max_size=20),
    st.data(),
)
def test_merge_of_split_recordings_equals_one_recording(
    observations: list[Observation], routed: list[str], data: st.DataObject
) -> None:
    workers = data.draw(st.integers(1, 5))
    where = data.draw(st.lists(st.integers(0, workers - 1), min_size=len(observations),
                               max_size=len(observations)))  # fmt: skip
    where_routed = data.draw(st.lists(st.integers(0, workers - 1), min_size=len(routed),
                                      max_size=len(routed)))  # fmt: skip
    parts = [
        _record_all(
            [o for o, w in zip(observations, where, strict=True) if w == i],
            [a for a, w in zip(routed, where_routed, strict=True) if w == i],
        )
        for i in range(workers)
    ]
    expected = _record_all(observations, routed).to_dict()

    # any order, left fold
    order = data.draw(st.permutations(range(workers)))
    folded = RolloutAccumulator()
    for i in order:
        folded.merge(parts[i])
    assert folded.to_dict() == expected

    # any tree shape: merge random pairs until one is left (on copies)
    pool = [p.snapshot() for p in parts]
    while len(pool) > 1:
        i = data.draw(st.integers(0, len(pool) - 1))
        a = pool.pop(i)
        j = data.draw(st.integers(0, len(pool) - 1))
        b = pool.pop(j)
        a.merge(b)
        pool.append(a)
    assert pool[0].to_dict() == expected

    # the parts were not modified by merging
    assert [p.to_dict() for p in parts] == [
        _record_all(
            [o for o, w in zip(observations, where, strict=True) if w == i],
            [a for a, w in zip(routed, where_routed, strict=True) if w == i],
        ).to_dict()
        for i in range(workers)
    ]


@settings(max_examples=100, deadline=None)
@given(st.lists(_observations, max_size=30), st.lists(_observations, max_size=30))
def test_merge_is_commutative(xs: list[Observation], ys: list[Observation]) -> None:
    a, b = _record_all(xs, []), _record_all(ys, [])
    ab, ba = a.snapshot(), b.snapshot()
    ab.merge(b)
    ba.merge(a)
    assert ab.to_dict() == ba.to_dict()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=50), st.data())
def test_merge_with_arbitrary_floats_agrees_up_to_rounding(
    values: list[float], data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(values)))
    whole, left, right = SignalAccumulator(), SignalAccumulator(), SignalAccumulator()
    for i, v in enumerate(values):
        whole.add(v)
        (left if i < cut else right).add(v)
    left.merge(right)
    assert left.n == whole.n
    assert left.total == pytest.approx(whole.total, rel=1e-9, abs=1e-6)
    assert left.hist.to_dict() == whole.hist.to_dict()
    assert (left.min, left.max) == (whole.min, whole.max)


def test_merge_does_not_alias() -> None:
    a, b = RolloutAccumulator(), RolloutAccumulator()
    b.record(_obs(signals={"cost": 1.0}, ttft=0.1))
    a.merge(b)
    before = a.to_dict()
    b.record(_obs(signals={"cost": 2.0}, ttft=0.2))
    assert a.to_dict() == before
    snap = a.snapshot()
    a.record(_obs())
    assert snap.to_dict() == before


def test_merge_rejects_different_accuracy() -> None:
    with pytest.raises(ValueError, match="accuracy"):
        RolloutAccumulator(0.01).merge(RolloutAccumulator(0.005))


# --- serialisation ----------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(_observations, max_size=40), st.lists(st.sampled_from(["production"]), max_size=5))
def test_to_dict_from_dict_round_trip(observations: list[Observation], routed: list[str]) -> None:
    acc = _record_all(observations, routed)
    text = json.dumps(acc.to_dict(), allow_nan=False)  # strict JSON: no inf/nan leaks out
    back = RolloutAccumulator.from_dict(json.loads(text))
    assert back.to_dict() == acc.to_dict()
    # the restored accumulator keeps working (its fast paths point at the restored signals)
    back.record(_obs("candidate", propensity=0.05))
    acc.record(_obs("candidate", propensity=0.05))
    assert back.to_dict() == acc.to_dict()


def test_float_propensity_keys_round_trip_exactly() -> None:
    acc = RolloutAccumulator()
    p = 1.0 - 7 / 100.0  # 0.9299999999999999...
    acc.record(_obs(propensity=p))
    back = RolloutAccumulator.from_dict(json.loads(json.dumps(acc.to_dict())))
    assert list(back.production.signals["latency"].strata) == [p]


def test_from_dict_rejects_unknown_version() -> None:
    data = RolloutAccumulator().to_dict()
    data["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        RolloutAccumulator.from_dict(data)


def test_format_2_state_loads_with_its_histogram_in_the_largest_stratum() -> None:
    acc = RolloutAccumulator()
    for _ in range(3):
        acc.record(_obs(propensity=0.95, latency=0.2))
    acc.record(_obs(propensity=0.75, latency=0.4))
    data = acc.to_dict()
    data["version"] = 2
    for arm in ("production", "candidate"):
        for sig in data[arm]["signals"].values():
            hist = SignalAccumulator.from_dict(sig).hist.to_dict()
            for key in ("hists", "clusters", "accuracy"):
                del sig[key]
            sig["hist"] = hist
    back = RolloutAccumulator.from_dict(data)
    lat = back.production.signals["latency"]
    assert lat.hists[0.95].count == 4 and lat.hists[0.75].count == 0
    assert lat.hist.to_dict() == acc.production.signals["latency"].hist.to_dict()


def test_clusters_are_kept_per_stratum_with_coarse_buckets() -> None:
    acc = RolloutAccumulator()
    acc.record(_obs("candidate", propensity=0.05, latency=0.1, cluster=3))
    acc.record(_obs("candidate", propensity=0.05, latency=0.1, cluster=3))
    acc.record(_obs("candidate", propensity=0.05, latency=2.0, cluster=60))
    acc.record(_obs("candidate", propensity=0.25, latency=0.1))  # no sticky key
    lat = acc.candidate.signals["latency"]
    cells = lat.clusters[0.05]
    assert cells.n[3] == 2 and cells.n[60] == 1 and sum(cells.n) == 3
    assert cells.total[3] == pytest.approx(0.2)
    assert 0.25 not in lat.clusters
    inv = lat.hists[0.05]._inv_log_gamma
    assert cells.hist == {
        coarse_bucket(0.1, inv) * CLUSTERS + 3: 2,
        coarse_bucket(2.0, inv) * CLUSTERS + 60: 1,
    }
    for v in (1e-3, 0.1, 2.0, 0.0, -0.5):
        c = coarse_bucket(v, inv)
        assert coarse_upper(c - 1, 0.005) < v <= coarse_upper(c, 0.005) or v <= 0
    assert acc.candidate.signals["error"].clusters[0.05].n[3] == 2


# --- recorder ---------------------------------------------------------------------------------


def test_recorder_swap_hands_over_deltas() -> None:
    rec = Recorder(["a"])
    rec.record(_obs(rollout="a"))
    rec.record_lost("a", "production", 1.0)
    rec.record(_obs("candidate", propensity=0.05, rollout="b"))
    old = rec.swap()
    assert set(old) == {"a", "b"}
    assert old["a"].production.observed == 1
    assert old["a"].production.routed == 2
    assert old["b"].candidate.observed == 1
    fresh = rec.swap()
    assert set(fresh) == {"a", "b"}
    assert all(acc.empty for acc in fresh.values())
    rec.record(_obs(rollout="a"))
    assert rec.live("a").production.observed == 1
    assert old["a"].production.observed == 1  # the handed-over delta is not touched
    assert rec.remove("b") is not None
    assert "b" not in rec.swap()


# --- bounded memory ---------------------------------------------------------------------------


def test_memory_does_not_grow_with_history() -> None:
    rec = Recorder(["r"])
    sample = [
        _obs(arm, propensity=p, status=s, error=e, latency=lat, ttft=lat / 2,
             signals={"cost": lat * 3, "json:usage.total_tokens": float(int(lat * 1000))})
        for arm, p in (("production", 0.95), ("candidate", 0.05))
        for s, e in ((200, None), (503, "status"), (0, "timeout"))
        for lat in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
    ]  # fmt: skip

    def record(n: int) -> None:
        for i in range(n):
            rec.record(sample[i % len(sample)])

    record(20_000)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        record(100_000)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown < 16_384, f"recording 100k more observations allocated {grown} bytes"

    acc = rec.live("r")
    assert acc.production.observed + acc.candidate.observed == 120_000
    for arm in (acc.production, acc.candidate):
        assert len(arm.signals) == 5
        assert set(arm.error_kinds) == {"status", "timeout"}
        assert set(arm.status_classes) == {"2xx", "5xx"}
        for sig in arm.signals.values():
            assert len(sig.strata) == 1
            assert len(sig.hist.pos) + len(sig.hist.neg) <= 6


def test_a_delta_with_only_external_values_is_not_empty() -> None:
    # A label or a resource window may come in a flush interval without any request; the
    # controller skips empty deltas, so such a delta must not read as empty.
    acc = RolloutAccumulator()
    assert acc.empty
    acc.arms["candidate"].record_value("feedback", 1.0, 0.5)
    assert not acc.empty
