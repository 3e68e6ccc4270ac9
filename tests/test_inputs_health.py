"""Input health on the one path from observation to verdict: the monitor's snapshot
(:class:`InputHealth`), the drift checks computed from it by one function for the analysis,
the metrics and the admin API, the policy reading them from the :class:`Analysis`, and the
:class:`Recorder` owning the monitors across reloads. No servers; seeded numpy."""

from __future__ import annotations

import dataclasses
import json
import pickle
from typing import Any

import numpy as np
import pytest
import yaml

from canary.config import InputsConfig, RolloutConfig, load_config_text
from canary.decision import Action, RolloutState, analyze, decide
from canary.observe import Recorder, RolloutAccumulator
from canary.observe.inputs import InputHealth, InputMonitor, drift_checks
from tests.conftest import rollout_config

FIELDS = ["amount", "country", "features.age"]
GIVEN = {
    "fields": {
        "amount": {"mean": 50.0, "std": 20.0, "types": {"number": 0.99, "null": 0.01}},
        "country": {"null_rate": 0.0},
        "features.age": {"mean": 48.5, "std": 17.0},
    }
}


def _body(rng: np.random.Generator, mu: float = 50.0, p_null: float = 0.01) -> bytes:
    amount = None if rng.random() < p_null else round(float(rng.normal(mu, 20.0)), 2)
    doc = {
        "amount": amount,
        "country": ["DE", "FR", "US"][int(rng.integers(3))],
        "features": {"age": int(rng.integers(18, 80))},
    }
    return json.dumps(doc).encode()


def _fed(config: dict[str, Any], drift_from: int = 400, n: int = 900) -> InputMonitor:
    """A monitor fed ``n`` bodies, the amount's mean shifted by one std after ``drift_from``."""
    monitor = InputMonitor("m", InputsConfig.model_validate({"fields": FIELDS, **config}))
    rng = np.random.default_rng(7)
    for i in range(n):
        monitor.observe(_body(rng, mu=50.0 if i < drift_from else 70.0))
    return monitor


def _rollout(on_drift: str, baseline: dict[str, Any]) -> RolloutConfig:
    cfg = rollout_config(
        ["http://127.0.0.1:1"],
        ["http://127.0.0.1:2"],
        steps=[{"weight": 5}, {"weight": 50}],
        analysis={"burn_in": 0, "metrics": [], "max_duration": "1h"},
        inputs={"fields": FIELDS, "baseline": baseline, "on_drift": on_drift},
    )
    return load_config_text(yaml.safe_dump(cfg)).rollouts[0]


# --- the snapshot ----------------------------------------------------------------------------


def test_snapshot_is_frozen_picklable_and_detached_from_the_monitor() -> None:
    monitor = _fed({"baseline": {"requests": 300}}, n=500)
    health = monitor.snapshot()
    assert pickle.loads(pickle.dumps(health)) == health
    with pytest.raises(dataclasses.FrozenInstanceError):
        health.learning = True  # type: ignore[misc]
    amount = health.fields[0]
    assert amount.path == "amount" and amount.baseline.requests == 300
    assert amount.current.requests == 200 and health.baseline_requests == 300
    assert health.requests == (500, 0, 0, 0) and not health.learning
    before = pickle.dumps(health)
    monitor.observe(b'{"amount": 1}')
    monitor.not_inspected()
    assert pickle.dumps(health) == before  # later requests do not reach a taken snapshot
    assert monitor.snapshot().fields[0].current.requests == 201


@pytest.mark.parametrize("baseline", [{"requests": 300}, GIVEN], ids=["learned", "given"])
def test_the_analysis_checks_are_the_report_checks(baseline: dict[str, Any]) -> None:
    """The same counts give the same checks in the monitor's report (metrics, admin API)
    and in the analysis (a pickled snapshot, as the analysis worker receives it)."""
    monitor = _fed({"baseline": baseline})
    health = pickle.loads(pickle.dumps(monitor.snapshot()))
    report = monitor.report(0)
    checks = drift_checks(monitor.config, health)
    assert tuple(f.field for f in checks) == tuple(FIELDS)
    assert tuple(f.checks for f in checks) == tuple(f.checks for f in report.fields)
    assert report.drifted == ("amount",)
    assert any(c.check == "mean" and c.drifted for c in checks[0].checks)

    rollout = _rollout("hold", baseline)
    analysis = analyze(rollout, RolloutAccumulator(), input_health=health)
    assert analysis.inputs == checks and analysis.drifted_inputs == ("amount",)
    assert pickle.loads(pickle.dumps(analysis)).inputs == checks  # the worker ships it back


def test_no_checks_while_learning_or_from_a_snapshot_of_other_fields() -> None:
    learning = _fed({"baseline": {"requests": 1000}}, n=200)
    assert learning.snapshot().learning
    assert all(f.checks == () for f in drift_checks(learning.config, learning.snapshot()))
    monitor = _fed({"baseline": {"requests": 300}})
    other = InputsConfig.model_validate({"fields": ["amount"], "baseline": {"requests": 300}})
    stale = drift_checks(other, monitor.snapshot())  # taken before a reload changed `fields`
    assert [f.field for f in stale] == FIELDS and all(f.checks == () for f in stale)


# --- the verdict: through the analysis --------------------------------------------------------


@pytest.mark.parametrize("on_drift", ["hold", "report"])
def test_drift_in_the_analysis_holds_only_with_on_drift_hold(on_drift: str) -> None:
    rollout = _rollout(on_drift, {"requests": 300})
    state = RolloutState.start(rollout, 0.0)
    monitor = _fed({"baseline": {"requests": 300}})
    drifted = analyze(rollout, RolloutAccumulator(), input_health=monitor.snapshot())
    assert drifted.drifted_inputs == ("amount",)
    d = decide(rollout, state, drifted, 1.0)
    if on_drift == "hold":
        assert d.action is Action.CONTINUE
        assert "input drift on fields amount" in d.reason and "on_drift: hold" in d.reason
    else:
        assert d.action is Action.ADVANCE
    # Without a snapshot, or with inputs within tolerance, nothing holds.
    assert analyze(rollout, RolloutAccumulator()).inputs == ()
    calm = _fed({"baseline": {"requests": 300}}, drift_from=10_000)
    steady = analyze(rollout, RolloutAccumulator(), input_health=calm.snapshot())
    assert steady.inputs and steady.drifted_inputs == ()
    assert decide(rollout, state, steady, 1.0).action is Action.ADVANCE


def test_a_rollout_without_inputs_ignores_a_snapshot() -> None:
    cfg = rollout_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"])
    rollout = load_config_text(yaml.safe_dump(cfg)).rollouts[0]
    health = _fed({"baseline": {"requests": 300}}).snapshot()
    assert analyze(rollout, RolloutAccumulator(), input_health=health).inputs == ()


# --- the recorder owns the monitors ---------------------------------------------------------------


def _config(**inputs: Any) -> list[RolloutConfig]:
    """Rollout "m" (with ``inputs`` when given) and "plain" (never with inputs)."""
    cfg = rollout_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"])
    if inputs:
        cfg["rollouts"][0]["inputs"] = inputs
    other = rollout_config(["http://127.0.0.1:3"], ["http://127.0.0.1:4"], name="plain")
    cfg["rollouts"][0]["match"] = {"path_prefix": "/m"}
    cfg["rollouts"].append({**other["rollouts"][0], "match": {"path_prefix": "/plain"}})
    return load_config_text(yaml.safe_dump(cfg)).rollouts


def test_recorder_keeps_a_monitor_while_inputs_are_unchanged() -> None:
    rec = Recorder()
    assert rec.input_health("m") is None
    monitors = rec.apply_inputs(_config(fields=FIELDS, baseline={"requests": 50}))
    assert set(monitors) == {"m"} and rec.input_monitor("plain") is None
    monitor = rec.input_monitor("m")
    assert monitor is monitors["m"]
    monitor.observe(b'{"amount": 3}')
    health = rec.input_health("m")
    assert isinstance(health, InputHealth) and health.requests[0] == 1

    # A reload with the same inputs keeps the monitor (its baseline and counts) ...
    assert rec.apply_inputs(_config(fields=FIELDS, baseline={"requests": 50}))["m"] is monitor
    # ... and the controller restarting the rollout's samples does not reset its clients.
    rec.remove("m")
    assert rec.input_monitor("m") is monitor
    # Changed inputs: a new monitor, learning again.
    fresh = rec.apply_inputs(_config(fields=FIELDS, baseline={"requests": 50}, alpha=0.001))["m"]
    assert fresh is not monitor and fresh.learning and fresh.snapshot().requests[0] == 0
    # Inputs removed, or the rollout no longer configured: the monitor goes.
    assert rec.apply_inputs(_config()) == {} and rec.input_health("m") is None
    rec.apply_inputs(_config(fields=FIELDS))
    assert rec.apply_inputs(_config(fields=FIELDS)[1:]) == {}
    assert rec.input_monitor("m") is None
