"""The rollout policy as pure functions: no servers, no clocks (times are plain numbers)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import yaml

from canary.config import RolloutConfig, load_config_text
from canary.decision import (
    HARD_FAILURE_REQUESTS,
    HARD_FAILURE_SECONDS,
    Action,
    Analysis,
    CommandRejected,
    Phase,
    RolloutState,
    analyze,
    command,
    decide,
    metric_alpha,
    transition,
)
from canary.observe import Observation, RolloutAccumulator
from canary.stats import Direction, MetricKind, MetricResult, Verdict
from tests.conftest import rollout_config

T0 = 1_000_000.0


def _rollout(**overrides: Any) -> RolloutConfig:
    base: dict[str, Any] = {
        "steps": [
            {"shadow": {"min_requests": 50}},
            {"weight": 5, "min_requests": 100, "min_duration": "1m"},
            {"weight": 50},
        ],
        "analysis": {
            "burn_in": 20,
            "max_duration": "1h",
            "metrics": [
                {"name": "latency_p95", "signal": "latency", "stat": "p95", "max_increase": "10%"},
                {"name": "errors", "signal": "error", "stat": "rate", "max_increase": "1pp"},
            ],
        },
    }
    base.update(overrides)
    cfg = rollout_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"], **base)
    return load_config_text(yaml.safe_dump(cfg)).rollouts[0]


def _result(name: str, verdict: Verdict, kind: MetricKind = MetricKind.QUANTILE) -> MetricResult:
    lo, hi = {Verdict.WORSE: (1.2, 1.4), Verdict.OK: (0.9, 1.05), Verdict.UNKNOWN: (0.95, 1.2)}[
        verdict
    ]
    return MetricResult(
        name=name, kind=kind, estimate=(lo + hi) / 2, lower=lo, upper=hi, margin=0.1,
        relative=True, direction=Direction.INCREASE, verdict=verdict, n_production=500,
        n_candidate=100, alpha=0.05 / 3,
    )  # fmt: skip


def _analysis(
    verdicts: dict[str, Verdict] | None = None,
    *,
    candidate: int = 1000,
    srm: Verdict = Verdict.UNKNOWN,
    net: Verdict | None = None,
    failing_for: float = 0.0,
    failing_requests: int = 0,
) -> Analysis:
    if verdicts is None:
        verdicts = {"latency_p95": Verdict.UNKNOWN, "errors": Verdict.UNKNOWN}
    return Analysis(
        metrics=tuple(_result(n, v) for n, v in verdicts.items()),
        srm=_result("sample_ratio", srm, MetricKind.SRM),
        net=None if net is None else _result("net_value", net, MetricKind.NET_VALUE),
        observed={"production": 10 * candidate, "candidate": candidate},
        failing_for=failing_for,
        failing_requests=failing_requests,
    )


def _state(rollout: RolloutConfig, **changes: Any) -> RolloutState:
    return RolloutState.start(rollout, T0).with_(**changes)


OK_ALL = {"latency_p95": Verdict.OK, "errors": Verdict.OK}


# --- steps --------------------------------------------------------------------------------


def test_shadow_step_waits_for_its_requests_then_advances() -> None:
    r = _rollout()
    s = _state(r)
    d = decide(r, s, _analysis(candidate=49), T0 + 5)
    assert d.action is Action.CONTINUE
    assert "step 1/3 (shadow)" in d.reason and "49/50 candidate requests" in d.reason
    d = decide(r, s, _analysis(candidate=50), T0 + 5)
    assert d.action is Action.ADVANCE
    assert "next weight 5%" in d.reason
    s2 = transition(r, s, d, 50, T0 + 5)
    assert (s2.step, s2.step_base, s2.step_started_at) == (1, 50, T0 + 5)
    assert s2.weights(r) == (5.0, False)
    assert s.weights(r) == (0.0, True)


def test_weight_step_needs_requests_and_duration() -> None:
    r = _rollout()
    s = _state(r, step=1, step_base=50, step_started_at=T0)
    assert decide(r, s, _analysis(candidate=150), T0 + 30).action is Action.CONTINUE  # 100, 30s
    d = decide(r, s, _analysis(candidate=149), T0 + 61)
    assert d.action is Action.CONTINUE and "99/100 candidate requests" in d.reason
    assert decide(r, s, _analysis(candidate=150), T0 + 61).action is Action.ADVANCE


def test_burn_in_holds_back_an_advance() -> None:
    r = _rollout(analysis={"burn_in": 500, "metrics": []})
    s = _state(r, step=1, step_base=0)
    d = decide(r, s, _analysis({}, candidate=200), T0 + 120)
    assert d.action is Action.CONTINUE and "burn-in 200/500" in d.reason


def test_last_step_promotes_only_when_every_metric_is_ok() -> None:
    r = _rollout()
    s = _state(r, step=2)
    d = decide(r, s, _analysis({"latency_p95": Verdict.OK, "errors": Verdict.UNKNOWN}), T0 + 1)
    assert d.action is Action.CONTINUE and "waiting for errors to be OK" in d.reason
    d = decide(r, s, _analysis(OK_ALL), T0 + 1)
    assert d.action is Action.PROMOTE and "latency_p95" in d.reason
    s2 = transition(r, s, d, 1000, T0 + 1)
    assert s2.phase is Phase.PROMOTED and s2.weights(r) == (100.0, False)
    # a finished rollout stays finished whatever the data says later
    worse = _analysis({"latency_p95": Verdict.WORSE, "errors": Verdict.OK})
    assert decide(r, s2, worse, T0 + 2).action is Action.CONTINUE


def test_no_metrics_promotes_when_the_last_step_is_done() -> None:
    r = _rollout(analysis={"burn_in": 0, "metrics": []}, steps=[{"weight": 10}])
    d = decide(r, _state(r), _analysis({}, candidate=0), T0)
    assert d.action is Action.PROMOTE


# --- guards -------------------------------------------------------------------------------


def test_any_worse_metric_rolls_back_with_its_evidence() -> None:
    r = _rollout()
    s = _state(r, step=1)
    d = decide(r, s, _analysis({"latency_p95": Verdict.WORSE, "errors": Verdict.OK}), T0)
    assert d.action is Action.ROLLBACK
    assert d.evidence is not None and d.evidence.metric == "latency_p95"
    assert d.evidence.lower == 1.2 and d.evidence.n_candidate == 100
    assert "latency_p95 is worse" in d.reason and "n=500/100" in d.reason
    s2 = transition(r, s, d, 1000, T0)
    assert s2.phase is Phase.ROLLED_BACK and s2.weights(r) == (0.0, False)


def test_worse_rolls_back_even_during_shadow_and_before_requirements() -> None:
    r = _rollout()
    d = decide(r, _state(r), _analysis({"errors": Verdict.WORSE}, candidate=3), T0)
    assert d.action is Action.ROLLBACK


def test_sample_ratio_mismatch_comes_first() -> None:
    r = _rollout()
    d = decide(r, _state(r, step=1), _analysis({"errors": Verdict.WORSE}, srm=Verdict.WORSE), T0)
    assert d.action is Action.ROLLBACK and d.reason.startswith("sample-ratio mismatch")


def test_hard_failure_needs_both_duration_and_requests() -> None:
    r = _rollout()
    s = _state(r, step=1)
    short = _analysis(failing_for=HARD_FAILURE_SECONDS - 0.1, failing_requests=100)
    few = _analysis(failing_for=10.0, failing_requests=HARD_FAILURE_REQUESTS - 1)
    hard = _analysis(failing_for=HARD_FAILURE_SECONDS, failing_requests=HARD_FAILURE_REQUESTS)
    assert decide(r, s, short, T0).action is Action.CONTINUE
    assert decide(r, s, few, T0).action is Action.CONTINUE
    d = decide(r, s, hard, T0)
    assert d.action is Action.ROLLBACK and "failed hard" in d.reason


def test_unknown_is_never_a_rollback() -> None:
    r = _rollout()
    for step in range(3):
        s = _state(r, step=step)
        assert decide(r, s, _analysis(candidate=0), T0).action is not Action.ROLLBACK


# --- trade-off ----------------------------------------------------------------------------


def _tradeoff_rollout() -> RolloutConfig:
    return _rollout(
        steps=[{"weight": 50}],
        analysis={
            "burn_in": 10,
            "metrics": [
                {"name": "accuracy", "signal": "json:correct", "max_decrease": "1pp"},
                {"name": "latency_p95", "signal": "latency", "stat": "p95", "max_increase": "10%"},
                {"name": "errors", "signal": "error", "stat": "rate", "max_increase": "1pp"},
            ],
            "tradeoff": {"accuracy": "1pp", "latency_p95": "10%"},
        },
    )


def test_tradeoff_net_value_decides_for_its_metrics() -> None:
    r = _tradeoff_rollout()
    s = _state(r)
    unknown_parts = {
        "accuracy": Verdict.UNKNOWN,
        "latency_p95": Verdict.UNKNOWN,
        "errors": Verdict.OK,
    }
    d = decide(r, s, _analysis(unknown_parts, net=Verdict.OK), T0)
    assert d.action is Action.PROMOTE and "net_value" in d.reason
    d = decide(r, s, _analysis(unknown_parts, net=Verdict.UNKNOWN), T0)
    assert d.action is Action.CONTINUE and "net_value" in d.reason
    d = decide(r, s, _analysis(unknown_parts, net=Verdict.WORSE), T0)
    assert d.action is Action.ROLLBACK and "net negative" in d.reason
    # the metrics outside the trade-off still need their own OK
    d = decide(r, s, _analysis({**unknown_parts, "errors": Verdict.UNKNOWN}, net=Verdict.OK), T0)
    assert d.action is Action.CONTINUE and "errors" in d.reason
    # and a trade-off metric beyond its own tolerance is a hard limit
    hard = {**unknown_parts, "latency_p95": Verdict.WORSE}
    assert decide(r, s, _analysis(hard, net=Verdict.OK), T0).action is Action.ROLLBACK


# --- max_duration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "action", "phase"),
    [
        ("rollback", Action.ROLLBACK, Phase.ROLLED_BACK),
        ("promote", Action.PROMOTE, Phase.PROMOTED),
        ("hold", Action.HOLD, Phase.HOLDING),
    ],
)
def test_max_duration_applies_on_inconclusive(policy: str, action: Action, phase: Phase) -> None:
    r = _rollout(analysis={"max_duration": "10m", "on_inconclusive": policy, "metrics": []})
    s = _state(r, step=1)
    assert decide(r, s, _analysis({}, candidate=10), T0 + 599).action is Action.CONTINUE
    d = decide(r, s, _analysis({}, candidate=10), T0 + 600)
    assert d.action is action and "on_inconclusive" in d.reason
    assert transition(r, s, d, 10, T0 + 600).phase is phase


def test_a_held_rollout_waits_for_the_operator_and_resume_gives_it_time() -> None:
    r = _rollout(analysis={"max_duration": "10m", "on_inconclusive": "hold", "metrics": []})
    s = _state(r, phase=Phase.HOLDING)
    assert decide(r, s, _analysis(OK_ALL), T0 + 700).action is Action.HOLD
    resumed = transition(r, s, command(s, "resume"), 10, T0 + 700)
    assert resumed.phase is Phase.RUNNING and resumed.deadline == T0 + 700 + 600


# --- operator commands --------------------------------------------------------------------


def test_pause_freezes_the_policy_and_resume_extends_the_deadline() -> None:
    r = _rollout()
    s = _state(r, step=1)
    d = command(s, "pause", "investigating")
    assert d.manual and d.action is Action.PAUSE and "investigating" in d.reason
    paused = transition(r, s, d, 100, T0 + 10)
    assert paused.phase is Phase.PAUSED and paused.weights(r) == (5.0, False)
    worse = _analysis({"latency_p95": Verdict.WORSE, "errors": Verdict.OK})
    assert decide(r, paused, worse, T0 + 20).action is Action.HOLD  # manual wins
    resumed = transition(r, paused, command(paused, "resume"), 100, T0 + 310)
    assert resumed.phase is Phase.RUNNING and resumed.deadline == s.deadline + 300


def test_manual_promote_and_rollback_win_over_the_policy() -> None:
    r = _rollout()
    s = _state(r)
    promoted = transition(r, s, command(s, "promote"), 0, T0)
    assert promoted.phase is Phase.PROMOTED and promoted.weights(r) == (100.0, False)
    rolled = transition(r, promoted, command(promoted, "rollback"), 0, T0)
    assert rolled.phase is Phase.ROLLED_BACK


@pytest.mark.parametrize(
    ("phase", "action", "message"),
    [
        (Phase.PAUSED, "pause", "already paused"),
        (Phase.RUNNING, "resume", "only a paused or held rollout resumes"),
        (Phase.PROMOTED, "promote", "already promoted"),
        (Phase.ROLLED_BACK, "promote", "deploy a new candidate"),
        (Phase.ROLLED_BACK, "rollback", "already rolled back"),
        (Phase.PROMOTED, "pause", "nothing to pause"),
        (Phase.RUNNING, "explode", "unknown action"),
    ],
)
def test_commands_that_do_not_apply_are_rejected(phase: Phase, action: str, message: str) -> None:
    s = _state(_rollout(), phase=phase)
    with pytest.raises(CommandRejected, match=message):
        command(s, action)


def test_state_round_trips_through_a_dict() -> None:
    r = _rollout()
    s = _state(r, step=2, phase=Phase.PAUSED, paused_at=T0 + 3)
    assert RolloutState.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="version"):
        RolloutState.from_dict({**s.to_dict(), "version": 99})


# --- operator: advance one step, retry --------------------------------------------------


def test_advance_is_a_manual_automatic_advance_with_a_fresh_step() -> None:
    r = _rollout()  # shadow, weight 5, weight 50
    s = _state(r)
    d = command(s, "advance", "looks fine", r)
    assert d.manual and d.action is Action.ADVANCE
    assert d.reason == ("advanced by an operator: looks fine from step 1/3 to step 2/3 (weight 5%)")
    # from the shadow step the next step's weight sends real users to the candidate
    moved = transition(r, s, d, 80, T0 + 30)
    assert moved.step == 1 and moved.weights(r) == (5.0, False)
    assert (moved.step_started_at, moved.step_base) == (T0 + 30, 80)  # a fresh step
    assert moved.phase is Phase.RUNNING and moved.last_action == "ADVANCE"
    # exactly as the automatic ADVANCE of the same step
    auto = decide(r, s.with_(step_started_at=T0 - 100), _analysis(candidate=80), T0 + 30)
    assert auto.action is Action.ADVANCE
    assert transition(r, s, auto, 80, T0 + 30).with_(reason=d.reason, updated_at=0) == (
        moved.with_(updated_at=0)
    )
    # the new step waits for its own requests and duration, counted from the advance
    d2 = decide(r, moved, _analysis(OK_ALL, candidate=150), T0 + 40)
    assert d2.action is Action.CONTINUE and "70/100 candidate requests" in d2.reason


def test_advance_from_the_last_step_promotes() -> None:
    r = _rollout()
    s = _state(r, step=2)
    d = command(s, "advance", None, r)
    assert d.action is Action.PROMOTE and d.manual
    assert "advanced past the last step 3/3" in d.reason
    assert transition(r, s, d, 0, T0).phase is Phase.PROMOTED


@pytest.mark.parametrize("phase", [Phase.PAUSED, Phase.HOLDING])
def test_advance_keeps_a_paused_or_held_rollout_so(phase: Phase) -> None:
    r = _rollout()
    s = _state(r, step=1, phase=phase, paused_at=T0 if phase is Phase.PAUSED else None)
    moved = transition(r, s, command(s, "advance", None, r), 10, T0 + 5)
    assert moved.step == 2 and moved.phase is phase and moved.weights(r) == (50.0, False)
    assert decide(r, moved, _analysis(OK_ALL), T0 + 6).action is Action.HOLD


def test_retry_starts_a_rolled_back_rollout_again_from_step_1() -> None:
    r = _rollout()
    s = _state(r, step=2, phase=Phase.ROLLED_BACK, failing_since=T0, failing_requests=9)
    d = command(s, "retry", "fixed the config", r)
    assert d.manual and d.action is Action.RETRY
    assert d.reason == (
        "retried by an operator: fixed the config: attempt 2 with the same candidate and "
        "fresh samples, from step 1/3 (shadow)"
    )
    again = transition(r, s, d, 12345, T0 + 600)
    fresh = RolloutState.start(r, T0 + 600)
    assert again == fresh.with_(attempt=2, last_action="RETRY", reason=d.reason)
    assert again.step_base == 0  # its samples start anew: the old count is not a base
    assert again.deadline == T0 + 600 + 3600 and again.weights(r) == (0.0, True)
    assert RolloutState.from_dict(again.to_dict()) == again  # attempt is persisted
    # a state stored before retries existed reads as attempt 1
    old = {k: v for k, v in s.to_dict().items() if k != "attempt"}
    assert RolloutState.from_dict(old).attempt == 1
    back = again.with_(phase=Phase.ROLLED_BACK)
    assert transition(r, back, command(back, "retry", None, r), 0, T0 + 900).attempt == 3


@pytest.mark.parametrize(
    ("phase", "action", "message"),
    [
        (Phase.RUNNING, "retry", "is running; only a rolled-back rollout can be retried"),
        (Phase.PAUSED, "retry", "is paused; only a rolled-back"),
        (Phase.HOLDING, "retry", "is holding; only a rolled-back"),
        (Phase.PROMOTED, "retry", "is promoted; only a rolled-back"),
        (Phase.PROMOTED, "advance", "already promoted"),
        (Phase.ROLLED_BACK, "advance", "is rolled_back; retry it"),
        (Phase.ROLLED_BACK, "promote", "is rolled_back; retry it"),
    ],
)
def test_advance_and_retry_are_rejected_naming_the_phase(
    phase: Phase, action: str, message: str
) -> None:
    r = _rollout()
    with pytest.raises(CommandRejected, match=message):
        command(_state(r, phase=phase), action, None, r)


def test_advance_and_retry_need_the_config() -> None:
    r = _rollout()
    with pytest.raises(ValueError, match="needs the rollout's config"):
        command(_state(r), "advance")
    with pytest.raises(ValueError, match="needs the rollout's config"):
        command(_state(r, phase=Phase.ROLLED_BACK), "retry")


# --- analysis on real accumulators --------------------------------------------------------


def _acc(n: int, candidate_slowdown: float, error_rate: float, seed: int) -> RolloutAccumulator:
    rng = np.random.default_rng(seed)
    acc = RolloutAccumulator()
    for i in range(n):
        arm = "candidate" if rng.random() < 0.5 else "production"
        lat = float(rng.lognormal(math.log(0.02), 0.3)) * (
            candidate_slowdown if arm == "candidate" else 1.0
        )
        failed = arm == "candidate" and rng.random() < error_rate
        acc.record(
            Observation(
                rollout="m", arm=arm, propensity=0.5, shadow=False, request_id=str(i),
                status=503 if failed else 200, error="status" if failed else None, latency=lat,
            )
        )  # fmt: skip
    return acc


def test_analyze_runs_every_metric_at_the_split_alpha() -> None:
    r = _rollout(steps=[{"weight": 50}])
    a = analyze(r, _acc(3000, 1.0, 0.0, seed=1))
    assert [m.name for m in a.metrics] == ["latency_p95", "errors"]
    assert all(m.alpha == pytest.approx(metric_alpha(r)) for m in a.metrics)
    assert metric_alpha(r) == pytest.approx(0.05 / 3)
    assert all(m.verdict is not Verdict.WORSE for m in a.all_results())
    assert a.srm.verdict is Verdict.UNKNOWN
    assert a.observed["candidate"] + a.observed["production"] == 3000


def test_analyze_sees_a_slow_and_a_failing_candidate() -> None:
    r = _rollout(steps=[{"weight": 50}])
    slow = analyze(r, _acc(2000, 1.5, 0.0, seed=2))
    assert slow.metrics[0].verdict is Verdict.WORSE
    failing = analyze(r, _acc(2000, 1.0, 0.2, seed=3))
    assert failing.metrics[1].verdict is Verdict.WORSE
    d = decide(r, RolloutState.start(r, T0), failing, T0)
    assert d.action is Action.ROLLBACK and d.evidence is not None
    assert d.evidence.metric == "errors"


def test_analyze_reports_missing_signals_as_unknown() -> None:
    r = _rollout(
        analysis={
            "metrics": [{"name": "ttft", "signal": "ttft", "stat": "p50", "max_increase": "5%"}]
        }
    )
    a = analyze(r, RolloutAccumulator())
    assert a.metrics[0].verdict is Verdict.UNKNOWN
    assert "no ttft values" in a.metrics[0].detail


def test_analyze_sees_requests_one_arm_loses() -> None:
    r = _rollout(steps=[{"weight": 50}])
    acc = _acc(2000, 1.0, 0.0, seed=4)
    acc.record_lost("candidate", 0.5, 60)  # users gave up on 6% of the candidate's requests
    a = analyze(r, acc)
    assert a.srm.verdict is Verdict.WORSE and "candidate drops more" in a.srm.detail
    assert decide(r, RolloutState.start(r, T0), a, T0).action is Action.ROLLBACK


def test_state_written_by_another_version_with_unknown_keys_still_loads() -> None:
    cfg = load_config_text(yaml.safe_dump(rollout_config(["http://a:1"], ["http://b:1"])))
    data = RolloutState.start(cfg.rollouts[0], 100.0).to_dict()
    data["extra"] = {}  # a field an older canary wrote
    assert RolloutState.from_dict(data) == RolloutState.from_dict({**data, "extra": None})
