"""Input health (canary/observe/inputs.py, canary/stats/_inputs.py): counting, baselines, the
drift tests, the config keys and the policy hook. No servers; seeded numpy for every simulation."""

from __future__ import annotations

import json
import math
import textwrap
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from canary.config import InputsConfig, load_config_text
from canary.decision import Action, RolloutState, analyze, decide
from canary.errors import ConfigError
from canary.observe import RolloutAccumulator
from canary.observe.inputs import CHECKS_PER_FIELD, InputMonitor
from canary.stats import MIN_MEAN_SAMPLES, mean_shift_cs, proportion_shift_cs
from tests.conftest import rollout_config

FIELDS = ["amount", "country", "features.age"]
COUNTRIES = np.array(["DE", "FR", "US", "JP"])


def _monitor(clock: Any = None, **cfg: Any) -> InputMonitor:
    config = InputsConfig.model_validate({"fields": FIELDS, **cfg})
    return InputMonitor("r", config) if clock is None else InputMonitor("r", config, clock)


class Traffic:
    """Seeded request bodies: amount ~ N(mu, sd) (null with p_null), a country string, an
    integer age 18..79 under features."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def body(self, mu: float = 50.0, sd: float = 20.0, p_null: float = 0.01) -> bytes:
        rng = self.rng
        amount = None if rng.random() < p_null else round(float(rng.normal(mu, sd)), 2)
        doc = {
            "amount": amount,
            "country": str(COUNTRIES[rng.integers(4)]),
            "features": {"age": int(rng.integers(18, 80)), "tenure": 3},
        }
        return json.dumps(doc).encode()


def _field(monitor: InputMonitor, name: str) -> Any:
    return next(f for f in monitor.report(0).fields if f.field == name)


# --- counting ---------------------------------------------------------------------------------


def test_every_type_is_counted_and_null_differs_from_missing() -> None:
    m = _monitor(baseline={"requests": 30}, fields=["v", "a.b", "items.1"])
    values: list[Any] = [1, 2.5, "x", True, None, {"k": 1}, [1, 2]]
    for v in values:
        m.observe(json.dumps({"v": v, "a": {"b": v}, "items": [0, v]}).encode())
    m.observe(b"{}")  # everything missing
    m.observe(b'{"a": null, "items": [1]}')  # a path through null / a short list: missing
    report = m.report(0)
    expected = {"number": 2, "string": 1, "bool": 1, "null": 1, "object": 1, "array": 1}
    for f in report.fields:
        assert f.values == {**expected, "missing": 2}, f.field
        assert f.baseline.requests == 9
        assert f.baseline.null_rate == pytest.approx(3 / 9)  # null or missing
        assert f.baseline.types["number"] == pytest.approx(2 / 9)
    assert report.requests == {"inspected": 9, "unparseable": 0, "not_inspected": 0, "too_large": 0}


def test_a_top_level_array_is_inspected_and_indexed() -> None:
    m = _monitor(baseline={"requests": 30}, fields=["0.x", "x"])
    m.observe(b'[{"x": 3}]')
    by = {f.field: f for f in m.report(0).fields}
    assert by["0.x"].values == {"number": 1}
    assert by["x"].values == {"missing": 1}


@pytest.mark.parametrize(
    ("body", "result"),
    [
        (b"plain text", "unparseable"),
        (b"", "unparseable"),
        (b"42", "unparseable"),  # JSON, but no fields to read: not an object or array
        (b'"a string"', "unparseable"),
        (b"{not json", "unparseable"),
        (b'{"amount": 1,}', "unparseable"),
        (b'{"amount": "\xff\xfe"}', "unparseable"),  # not UTF-8
        (b"[" * 200_000 + b"]" * 200_000, "too_large"),
        (b"[" * 40_000 + b"]" * 40_000, "unparseable"),  # RecursionError inside json.loads
        (b'{"amount": ' + b"9" * 5000 + b"}", "unparseable"),  # int too long to convert
        (b'  \n {"amount": 1}', "inspected"),
        (b'{"amount": NaN, "country": Infinity}', "inspected"),
    ],
)
def test_bodies_that_are_not_plain_json_are_counted_never_raised(body: bytes, result: str) -> None:
    m = _monitor(baseline={"requests": 30}, max_body="100KiB")
    m.observe(body)
    assert m.report(0).requests[result] == 1
    assert sum(m.report(0).requests.values()) == 1


def test_non_finite_and_huge_numbers_count_as_numbers_without_moments() -> None:
    m = _monitor(baseline={"requests": 30}, fields=["v"])
    for raw in (b"NaN", b"Infinity", b"-Infinity", b"1e400", b"7", b"1" + b"0" * 400):
        m.observe(b'{"v": ' + raw + b"}")
    f = _field(m, "v")
    assert f.values == {"number": 6}
    assert f.baseline.numbers == 1  # only 7: NaN, +-inf and 10**400 (float overflow) skipped
    assert (f.baseline.mean, f.baseline.min, f.baseline.max) == (7.0, 7.0, 7.0)


def test_not_inspected_and_too_large_bodies() -> None:
    m = _monitor(max_body="1KiB")
    m.not_inspected()
    m.observe(b'{"amount": 1, "pad": "' + b"x" * 2000 + b'"}')
    assert m.report(0).requests == {
        "inspected": 0,
        "unparseable": 0,
        "not_inspected": 1,
        "too_large": 1,
    }


def test_mean_std_min_max_and_null_rate_match_numpy() -> None:
    rng = np.random.default_rng(11)
    # A large offset and a small spread: the shifted sums keep the variance accurate.
    xs = 1e9 + rng.normal(0, 0.5, 700)
    m = _monitor(baseline={"requests": 500}, fields=["x", "amount"])
    for i, x in enumerate(xs):
        m.observe(json.dumps({"x": float(x), "amount": None if i % 10 == 0 else 1}).encode())
    f = _field(m, "x")
    base, cur = xs[:500], xs[500:]
    assert f.baseline.requests == 500 and f.current.requests == 200
    assert f.baseline.mean == pytest.approx(base.mean(), rel=1e-15, abs=1e-6)
    assert f.baseline.std == pytest.approx(base.std(ddof=1), rel=1e-9)
    assert f.current.std == pytest.approx(cur.std(ddof=1), rel=1e-9)
    assert (f.current.min, f.current.max) == (cur.min(), cur.max())
    assert (f.baseline.min, f.baseline.max) == (base.min(), base.max())
    a = _field(m, "amount")
    assert a.baseline.null_rate == pytest.approx(50 / 500)
    assert a.current.null_rate == pytest.approx(20 / 200)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_observe_never_raises_on_arbitrary_bytes(body: bytes) -> None:
    m = _monitor(baseline={"requests": 30})
    m.observe(body)
    m.observe(b"{" + body)
    assert sum(m.report(0).requests.values()) == 2


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["amount", "country", "features", "x"]), _JSON))
def test_every_inspected_body_gives_each_field_exactly_one_type(doc: dict[str, Any]) -> None:
    m = _monitor(baseline={"requests": 30})
    m.observe(json.dumps(doc).encode())
    for f in m.report(0).fields:
        assert sum(f.values.values()) == 1


# --- baselines ---------------------------------------------------------------------------------


def test_learned_baseline_freezes_after_n_requests() -> None:
    m = _monitor(baseline={"requests": 50})
    t = Traffic(1)
    for _ in range(49):
        m.observe(t.body())
    assert m.learning and m.report(0).fields[0].checks == ()
    m.observe(b"not json")  # does not count towards the baseline
    m.observe(t.body())
    assert not m.learning
    for _ in range(40):
        m.observe(t.body(mu=1000.0))
    f = _field(m, "amount")
    assert f.baseline.requests == 50 and f.current.requests == 40
    assert f.baseline.max is not None and f.baseline.max < 500  # frozen: no later values
    assert f.current.min is not None and f.current.min > 500
    assert m.report(0).to_dict()["state"] == "monitoring"


def test_given_baseline_is_used_from_the_first_request() -> None:
    m = _monitor(
        fields=["amount", "country"],
        baseline={
            "fields": {
                "amount": {"mean": 50, "std": 20, "types": {"number": 0.99, "null": 0.01}},
                "country": {"null_rate": 0.0},
            }
        },
    )
    assert not m.learning
    t = Traffic(2)
    for _ in range(200):
        m.observe(t.body())
    report = m.report(0)
    amount, country = report.fields
    assert amount.baseline.mean == 50 and amount.baseline.null_rate == pytest.approx(0.01)
    assert {c.check for c in amount.checks} == {"mean", "null_rate", "type:number"}
    assert {c.check for c in country.checks} == {"null_rate"}  # no types given: no type checks
    assert not report.drifted
    assert report.to_dict()["baseline"] == {"source": "config", "requests": None, "target": None}


def test_report_caches_the_drift_tests_for_max_age() -> None:
    now = [0.0]
    m = _monitor(clock=lambda: now[0], baseline={"requests": 30})
    t = Traffic(3)
    for _ in range(30):
        m.observe(t.body())
    first = m.report()
    for _ in range(200):
        m.observe(t.body(mu=500.0))
    assert m.report().fields[0].checks == first.fields[0].checks  # within a second: reused
    assert m.report().fields[0].current.requests == 200  # the counts are always fresh
    now[0] = 1.0
    assert m.report().drifted == ("amount",)


# --- the statistics ----------------------------------------------------------------------------
# Tolerance 0 is the sharpest null: "any shift at all". The sequences are evaluated after
# every request (anytime validity), and a run counts as a false flag if the interval ever
# excludes 0. The rate must stay below alpha; a fixed-sample test peeked at like this flags
# 30-50% of the runs, so the assertion has teeth.

ALPHA = 0.05
RUNS = 400


def _false_flag_rate(lo: np.ndarray, hi: np.ndarray, valid: np.ndarray | bool = True) -> float:
    return float((((lo > 0) | (hi < 0)) & valid).any(axis=1).mean())


@pytest.mark.parametrize("dist", ["normal", "exponential", "lognormal"])
def test_mean_sequence_false_flag_rate_is_below_alpha(dist: str) -> None:
    rng = np.random.default_rng({"normal": 1, "exponential": 2, "lognormal": 3}[dist])
    mean, sd = {
        "normal": (10.0, 2.0),
        "exponential": (1.0, 1.0),
        "lognormal": (math.exp(0.5), math.sqrt((math.e - 1) * math.e)),
    }[dist]

    def draw(size: tuple[int, int]) -> np.ndarray:
        if dist == "normal":
            return rng.normal(10.0, 2.0, size)
        if dist == "exponential":
            return rng.exponential(1.0, size)
        return rng.lognormal(0.0, 1.0, size)

    nb, n_max = 500, 2000
    base = draw((RUNS, nb))
    x = draw((RUNS, n_max))
    n = np.arange(1, n_max + 1)
    m = np.cumsum(x, axis=1) / n
    var = np.maximum(np.cumsum(x * x, axis=1) / n - m * m, 0.0)
    burned_in = n >= MIN_MEAN_SAMPLES
    bm, bs = base.mean(axis=1)[:, None], base.std(axis=1, ddof=1)[:, None]
    _, lo, hi = mean_shift_cs(n, m, var, bm, bs, nb, ALPHA)  # learned: two-sample
    assert _false_flag_rate(lo, hi, burned_in) <= ALPHA
    _, lo, hi = mean_shift_cs(n, m, var, mean, sd, math.inf, ALPHA)  # given: one-sample
    assert _false_flag_rate(lo, hi, burned_in) <= ALPHA


@pytest.mark.parametrize("p", [0.01, 0.3])
def test_proportion_sequence_false_flag_rate_is_below_alpha(p: float) -> None:
    rng = np.random.default_rng(int(p * 100))
    nb, n_max, step = 500, 2000, 4
    k_base = rng.binomial(nb, p, RUNS)[:, None]
    k = np.cumsum(rng.random((RUNS, n_max)) < p, axis=1)[:, step - 1 :: step]
    n = np.arange(step, n_max + 1, step)
    _, lo, hi = proportion_shift_cs(n, k, nb, k_base, 0.0, ALPHA)
    assert _false_flag_rate(lo, hi) <= ALPHA
    _, lo, hi = proportion_shift_cs(n, k, math.inf, 0.0, p, ALPHA)
    assert _false_flag_rate(lo, hi) <= ALPHA


def test_sequences_contain_the_plain_estimate_and_shrink() -> None:
    n = np.array([50, 500, 5000])
    est, lo, hi = mean_shift_cs(n, 11.0, 4.0, 10.0, 2.0, 1000, 0.01)
    assert np.all(lo < est) and np.all(est < hi) and np.all(np.diff(hi - lo) < 0)
    est, lo, hi = proportion_shift_cs(n, n * 0.2, 1000, 100, 0.0, 0.01)
    assert np.allclose(est, 0.1) and np.all(lo < est) and np.all(np.diff(hi - lo) < 0)
    # No data: an unbounded interval, never a flag.
    _, lo, hi = mean_shift_cs(0, 0.0, 0.0, 10.0, 2.0, math.inf, 0.01)
    assert lo == -math.inf and hi == math.inf


# --- the monitor end to end: power and false flags ----------------------------------------------


def _requests_to_flag(m: InputMonitor, make: Any, limit: int, every: int = 10) -> int | None:
    for i in range(1, limit + 1):
        m.observe(make())
        if i % every == 0 and m.report(0).drifted:
            return i
    return None


@pytest.mark.parametrize("seed", range(8))
def test_a_one_std_mean_shift_is_flagged_within_a_few_hundred_requests(seed: int) -> None:
    t = Traffic(seed)
    learned = _monitor()  # defaults: 1000-request baseline, alpha 0.01, tolerance 0.25 std
    for _ in range(1000):
        learned.observe(t.body())
    n = _requests_to_flag(learned, lambda: t.body(mu=70.0), 300)
    assert n is not None, "a 1-std shift of amount was not flagged within 300 requests"
    assert learned.report(0).drifted == ("amount",)
    (check,) = [c for c in _field(learned, "amount").checks if c.drifted]
    assert check.check == "mean" and check.lower > check.tolerance

    given = _monitor(
        fields=["amount"], baseline={"fields": {"amount": {"mean": 50.0, "std": 20.0}}}
    )
    assert _requests_to_flag(given, lambda: t.body(mu=30.0), 300) is not None


@pytest.mark.parametrize("seed", range(8))
def test_a_null_rate_jump_is_flagged_within_a_bounded_number_of_requests(seed: int) -> None:
    t = Traffic(100 + seed)
    m = _monitor()
    for _ in range(1000):
        m.observe(t.body())
    n = _requests_to_flag(m, lambda: t.body(p_null=0.25), 600)
    assert n is not None, "a null-rate jump from 1% to 25% was not flagged within 600 requests"
    checks = {c.check for c in _field(m, "amount").checks if c.drifted}
    assert "null_rate" in checks


def test_a_type_change_is_flagged() -> None:
    t = Traffic(5)
    m = _monitor(baseline={"requests": 200})
    for _ in range(200):
        m.observe(t.body())
    for i in range(200):  # a client starts sending the age as a string
        m.observe(
            json.dumps({"amount": 1.0, "country": "DE", "features": {"age": str(i)}}).encode()
        )
    drifted = {c.check for c in _field(m, "features.age").checks if c.drifted}
    assert drifted == {"type:number", "type:string"}


@pytest.mark.parametrize(
    ("runs", "tolerance", "alpha"),
    [
        pytest.param(40, {}, 0.01, id="defaults"),
        pytest.param(40, {"mean": 0, "rate": "0pp"}, 0.05, id="zero-tolerance"),
        pytest.param(1000, {"mean": 0, "rate": "0pp"}, 0.05, id="slow", marks=pytest.mark.slow),
    ],
)
def test_stationary_inputs_are_not_flagged(
    runs: int, tolerance: dict[str, Any], alpha: float
) -> None:
    """Every request drawn from the baseline's distribution, the tests read every 50 requests:
    the share of runs ever flagging a field stays below alpha."""
    flagged = 0
    for seed in range(runs):
        t = Traffic(10_000 + seed)
        m = _monitor(baseline={"requests": 500}, alpha=alpha, tolerance=tolerance)
        for _ in range(500):
            m.observe(t.body())
        flagged += _requests_to_flag(m, t.body, 2000, every=50) is not None
    assert flagged / runs <= alpha, f"{flagged}/{runs} stationary runs flagged"


def test_alpha_is_split_over_every_check() -> None:
    m = _monitor(alpha=0.07)
    assert CHECKS_PER_FIELD == 7
    a = 0.07 / (CHECKS_PER_FIELD * len(FIELDS))
    t = Traffic(9)
    for _ in range(1100):
        m.observe(t.body())
    f = _field(m, "amount")
    # The reported interval is the one at the split level: recompute it independently.
    mean = next(c for c in f.checks if c.check == "mean")
    base_n = f.baseline.numbers
    cur_std = f.current.std * math.sqrt((f.current.numbers - 1) / f.current.numbers)
    _, lo, hi = mean_shift_cs(
        f.current.numbers, f.current.mean, cur_std**2, f.baseline.mean, f.baseline.std, base_n, a
    )
    assert (mean.lower, mean.upper) == pytest.approx((float(lo), float(hi)), rel=1e-9)


# --- config ------------------------------------------------------------------------------------

BASE = """\
rollouts:
  - name: m
    production: {endpoints: [http://127.0.0.1:8001]}
    candidate: {endpoints: [http://127.0.0.1:8002]}
    steps: [{weight: 5}]
"""


def _issues(inputs: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config_text(BASE + textwrap.indent(inputs, "    "))
    return [(i.path, i.message) for i in info.value.issues]


def test_inputs_config_defaults() -> None:
    cfg = load_config_text(BASE + "    inputs: {fields: [amount, features.age]}\n")
    inputs = cfg.rollouts[0].inputs
    assert inputs is not None
    assert inputs.baseline.requests == 1000 and inputs.baseline.fields is None
    assert inputs.alpha == 0.01 and inputs.on_drift == "report"
    assert inputs.tolerance.mean == 0.25 and inputs.tolerance.rate.value == 0.05
    assert inputs.max_body == 64 * 1024
    assert load_config_text(BASE).rollouts[0].inputs is None


def test_yaml_null_key_means_the_json_null_type() -> None:
    cfg = load_config_text(
        BASE + "    inputs:\n      fields: [a]\n      baseline: {fields: {a: {types: "
        "{number: 0.9, null: 0.1}}}}\n"
    )
    inputs = cfg.rollouts[0].inputs
    assert inputs is not None and inputs.baseline.fields is not None
    assert inputs.baseline.fields["a"].types == {"number": 0.9, "null": 0.1}


@pytest.mark.parametrize(
    ("inputs", "path", "message"),
    [
        ("inputs: {fields: [a], alhpa: 0.1}", "rollouts[0].inputs.alhpa", "unknown key"),
        ("inputs: {fields: [a], baseline: {requests: 10}}", "inputs.baseline.requests", "30"),
        ("inputs: {fields: [a], baseline: {}}", "inputs.baseline", "exactly one of"),
        ("inputs: {fields: ['a b']}", "inputs.fields", "not a JSON path"),
        ("inputs: {fields: [a, a]}", "inputs.fields", "duplicate fields"),
        ("inputs: {fields: []}", "inputs.fields", "at least 1"),
        ("inputs: {fields: [a], tolerance: {rate: 5%}}", "inputs.tolerance.rate", "5pp"),
        ("inputs: {fields: [a], tolerance: {mean: -1}}", "inputs.tolerance.mean", "0"),
        ("inputs: {fields: [a], on_drift: rollback}", "inputs.on_drift", "'report' or 'hold'"),
        ("inputs: {fields: [a], baseline: {fields: {}}}", "rollouts[0].inputs", "no entry for"),
        (
            "inputs: {fields: [a], baseline: {fields: {a: {null_rate: 0}, b: {null_rate: 0}}}}",
            "rollouts[0].inputs",
            "not in 'fields'",
        ),
        (
            "inputs: {fields: [a], baseline: {fields: {a: {mean: 3}}}}",
            "inputs.baseline.fields.a",
            "together",
        ),
        (
            "inputs: {fields: [a], baseline: {fields: {a: {types: {strnig: 1}}}}}",
            "inputs.baseline.fields.a.types.strnig",
            "'number'",
        ),
        (
            "inputs: {fields: [a], baseline: {fields: {a: {types: {number: 0.5}}}}}",
            "inputs.baseline.fields.a",
            "add up to 1",
        ),
        (
            "inputs: {fields: [a], baseline: {fields: {a: {null_rate: 0.5, types: {number: 1}}}}}",
            "inputs.baseline.fields.a",
            "disagrees",
        ),
        ("inputs: {fields: [a], baseline: {fields: {a: {}}}}", "baseline.fields.a", "at least"),
    ],
)
def test_inputs_config_errors_name_the_key(inputs: str, path: str, message: str) -> None:
    found = _issues(inputs + "\n")
    assert any(path in p and message in msg for p, msg in found), found


# --- policy: on_drift: hold --------------------------------------------------------------------


def _rollout(on_drift: str, **analysis: Any) -> Any:
    cfg = rollout_config(
        ["http://127.0.0.1:1"],
        ["http://127.0.0.1:2"],
        steps=[{"weight": 5}, {"weight": 50}],
        analysis={"burn_in": 0, "metrics": [], "max_duration": "1h", **analysis},
        inputs={"fields": ["amount"], "on_drift": on_drift},
    )
    return load_config_text(yaml.safe_dump(cfg)).rollouts[0]


def test_hold_stops_automatic_advance_while_inputs_drift() -> None:
    r = _rollout("hold")
    s = RolloutState.start(r, 0.0)
    a = analyze(r, RolloutAccumulator())
    assert decide(r, s, a, 1.0).action is Action.ADVANCE
    d = decide(r, s, a, 1.0, input_drift=["amount"])
    assert d.action is Action.CONTINUE
    assert "input drift on fields amount" in d.reason and "on_drift: hold" in d.reason
    # report (the default) only reports
    r2 = _rollout("report")
    assert decide(r2, s, a, 1.0, input_drift=["amount"]).action is Action.ADVANCE


def test_hold_never_blocks_a_rollback_and_never_promotes_at_the_deadline() -> None:
    r = _rollout("hold", on_inconclusive="promote")
    s = RolloutState.start(r, 0.0)
    failing = analyze(r, RolloutAccumulator(), failing_for=10.0, failing_requests=100)
    assert decide(r, s, failing, 1.0, input_drift=["amount"]).action is Action.ROLLBACK
    late = s.deadline + 1.0
    a = analyze(r, RolloutAccumulator())
    assert decide(r, s, a, late).action is Action.PROMOTE
    assert decide(r, s, a, late, input_drift=["amount"]).action is Action.CONTINUE
    r2 = _rollout("hold", on_inconclusive="rollback")
    assert decide(r2, s, a, late, input_drift=["amount"]).action is Action.ROLLBACK
