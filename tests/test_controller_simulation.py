"""Fast form of ``loadtest.controller_sim``: production-like traffic through canary's routing,
recorder and controller (analyze, decide, transition) on a virtual clock. Seeded: the
outcomes are deterministic.

The full evidence (1,000 runs a condition) is docs/controller-simulation.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from canary.config import load_config
from canary.errors import ConfigError
from loadtest.controller_sim import (
    FAST_RUNS,
    INPUT_HEALTH_METRICS,
    SCENARIOS,
    SEED,
    Tally,
    build_config,
    fast_scenarios,
    main,
    run_all,
    run_scenario,
    scenario,
    simulate_run,
)

ROOT = Path(__file__).resolve().parent.parent
STICKY = "sticky, 500 heterogeneous users"
DRIFT = "latency AR(1) drift, phi 0.999/request, both arms"
CONTROL = "i.i.d. requests (control)"
MARGIN = "at the margin (+10% latency, +0.5pp errors), latency falling x0.67 over the steps"
WORSE = "worse: latency x1.3 (sanity: must roll back)"


@pytest.fixture(scope="module")
def fast() -> dict[str, Tally]:
    """The CI form, as ``python -m loadtest.controller_sim --fast`` runs it (same seeds)."""
    tallies = run_all(fast_scenarios(), FAST_RUNS, SEED)
    return {t.scenario.name: t for t in tallies}


@pytest.mark.parametrize("name", [STICKY, DRIFT, CONTROL])
def test_identical_arms_are_not_rolled_back(fast: dict[str, Tally], name: str) -> None:
    t = fast[name]
    assert t.count("rollback") == 0, [o for o in t.outcomes if o.result == "rollback"]


def test_identical_arms_with_iid_traffic_are_promoted_through_every_step(
    fast: dict[str, Tally],
) -> None:
    t = fast[CONTROL]
    promoted = [o for o in t.outcomes if o.result == "promote"]
    assert promoted, t.outcomes
    for o in promoted:  # the controller stepped 5 -> 25 -> 50 -> 100 on its own
        assert o.weights == (5.0, 25.0, 50.0, 100.0), o
        # step minimums: 500 candidate samples at 5% (~10,000 requests), then a 1m
        # min_duration at 100 requests/s for each of the two later steps
        assert o.requests >= 20_000, o


def test_a_candidate_at_the_margin_is_not_promoted_while_latency_falls(
    fast: dict[str, Tally],
) -> None:
    t = fast[MARGIN]
    assert t.count("promote") == 0, t.outcomes
    assert t.count("rollback") <= 1, t.outcomes  # a false WORSE at the margin: rare


def test_a_worse_candidate_is_rolled_back_by_a_latency_metric_in_its_first_step(
    fast: dict[str, Tally],
) -> None:
    # The harness can fail: the decisions it counts are the controller's, not constants.
    t = fast[WORSE]
    assert t.count("rollback") == t.runs, t.outcomes
    for o in t.outcomes:
        assert o.by in ("latency_p95", "latency_mean"), o
        assert o.step == 0 and o.weights == (5.0, 0.0), o


def test_an_operator_weight_change_reaches_the_router_mid_step() -> None:
    s = scenario(next(s.name for s in SCENARIOS if s.operator))
    o = simulate_run(s, SEED)
    assert o.result != "rollback", o
    assert o.weights[:4] == (5.0, 40.0, 10.0, 50.0), o


def test_the_rollout_goes_through_the_config_loader() -> None:
    s = scenario(CONTROL)
    r = build_config(s).rollouts[0]
    assert [st.weight for st in r.steps] == [5.0, 25.0, 50.0]
    assert r.steps[0].min_duration == 60.0 and r.analysis.burn_in == 100
    assert r.routing.sticky is None and build_config(scenario(STICKY)).rollouts[0].routing.sticky
    with pytest.raises(ConfigError):  # validation applies: step weights must not decrease
        build_config(s, (40.0, 25.0, 50.0))


def test_the_input_health_variant_has_the_metrics_of_the_example_config() -> None:
    example = load_config(ROOT / "configs" / "input-health.yaml").rollouts[0]
    sim = build_config(scenario(MARGIN)).rollouts[0]
    assert sim.analysis.metrics == example.analysis.metrics
    assert len(INPUT_HEALTH_METRICS) == len(example.analysis.metrics)


def test_the_cli_writes_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--fast", "--only", "worse", "--cap", "20000"]) == 0
    out = capsys.readouterr()
    assert "python -m loadtest.controller_sim --fast --only worse --cap 20000" in out.out
    assert "| worse: latency x1.3 (sanity: must roll back) | 6 | 100.0 [" in out.out
    assert "runs in" in out.err  # progress on stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_false_decisions_stay_rare_over_100_runs(name: str) -> None:
    s = scenario(name)
    t = run_scenario(s, 100, seed=SEED + 1)
    if s.kind == "aa":
        assert t.count("rollback") <= 7, t.by("rollback")
    elif s.kind == "margin":
        assert t.count("promote") <= 7 and t.count("rollback") <= 7, t.outcomes
    else:
        assert t.count("rollback") >= 95, t.outcomes
