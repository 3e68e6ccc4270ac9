"""A shadow step's samples (both arms at propensity 1) feed the IPW mean test."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from canary.config import load_config_text
from canary.decision.analysis import analyze
from canary.observe import Observation, RolloutAccumulator
from canary.stats import Verdict
from tests.conftest import rollout_config

CONFIG = load_config_text(
    yaml.safe_dump(
        rollout_config(
            ["http://127.0.0.1:1"],
            ["http://127.0.0.1:2"],
            steps=[{"shadow": {}}, {"weight": 50}],
            analysis={
                "burn_in": 50,
                "metrics": [{"name": "score", "signal": "json:score", "max_increase": "10%"}],
            },
        )
    )
).rollouts[0]


def _feed(acc: RolloutAccumulator, rng: np.random.Generator, n: int, lift: float, p: float) -> None:
    """``n`` requests: with ``p`` = 1 both arms answer each (shadow), else a p/1-p split."""
    for i in range(n):
        base = rng.lognormal(0.0, 0.3)
        arms = (
            ["production", "candidate"]
            if p == 1.0
            else ["candidate" if rng.random() < p else "production"]
        )
        for arm in arms:
            value = base * lift * rng.lognormal(0.0, 0.05) if arm == "candidate" else base
            prop = p if arm == "candidate" else (1.0 if p == 1.0 else 1.0 - p)
            acc.record(
                Observation(
                    rollout="m", arm=arm, propensity=prop, shadow=p == 1.0 and arm == "candidate",
                    request_id=str(i), status=200, error=None, latency=0.01,
                    signals={"json:score": value},
                )
            )  # fmt: skip


@pytest.mark.parametrize(("lift", "verdict"), [(1.4, Verdict.WORSE), (1.0, Verdict.OK)])
def test_shadow_samples_decide_a_mean_metric(lift: float, verdict: Verdict) -> None:
    acc = RolloutAccumulator()
    _feed(acc, np.random.default_rng(3), 3000, lift, 1.0)
    result = analyze(CONFIG, acc).metrics[0]
    assert result.verdict is verdict, result
    assert result.n_candidate == result.n_production == 3000


def test_shadow_samples_join_a_later_randomised_step() -> None:
    shadow_only = RolloutAccumulator()
    _feed(shadow_only, np.random.default_rng(4), 400, 1.3, 1.0)
    both = shadow_only.snapshot()
    _feed(both, np.random.default_rng(5), 2000, 1.3, 0.5)
    a, b = analyze(CONFIG, shadow_only).metrics[0], analyze(CONFIG, both).metrics[0]
    assert b.n_candidate > a.n_candidate
    assert b.upper - b.lower < a.upper - a.lower  # more data, a shorter interval
    assert b.lower < 0.3 < b.upper or b.verdict is Verdict.WORSE
