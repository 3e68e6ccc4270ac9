"""Fast form of ``loadtest.traffic_sim``: the tests hold their level under production-like
traffic (sticky heterogeneous users, latency drifting while the weights step), where the
request-level tests they replaced did not. Seeded: the counts are deterministic.

The full evidence (1,000 runs a row, more conditions, power) is docs/traffic-simulation.md.
"""

from __future__ import annotations

from dataclasses import replace

from loadtest.traffic_sim import AA_CONDITIONS, MARGIN_CONDITIONS, METRICS, run_condition

RUNS = 40


def _cond(name: str, pool: tuple = AA_CONDITIONS, **kw: object):  # type: ignore[no-untyped-def]
    (cond,) = [c for c in pool if c.name == name]
    return replace(cond, **kw)  # type: ignore[arg-type]


def test_sticky_heterogeneous_users_do_not_cause_false_rollbacks() -> None:
    cond = _cond("sticky, 200 heterogeneous users, 5%")
    now = run_condition(cond, RUNS, seed=101, workers=2)
    assert now.runs == RUNS
    for m in METRICS:  # alpha 0.05 per test: at most 4 of 40 runs (the rate is ~1%)
        assert now.worse.get(m.name, 0) <= 4, (m.name, now.worse)
        assert now.worse0.get(m.name, 0) <= 4, (m.name, now.worse0)
    # Counting requests as independent, the same traffic rolls back far more often (at
    # margin 0: one-sided level 2.5%).
    before = run_condition(replace(cond, metrics=("latency_mean",)), RUNS, seed=101,
                           workers=2, legacy=True)  # fmt: skip
    assert before.worse0.get("latency_mean", 0) >= 6, before.worse0


def test_latency_rising_across_steps_is_compared_within_the_same_periods() -> None:
    cond = _cond("latency x1.5 trend, steps 5/25/50")
    now = run_condition(cond, RUNS, seed=202, workers=2)
    for m in METRICS:  # margin 0: WORSE is false; one-sided level alpha/2
        assert now.worse0.get(m.name, 0) <= 3, (m.name, now.worse0)
    before = run_condition(replace(cond, metrics=("latency_p50",)), RUNS, seed=202,
                           workers=2, legacy=True)  # fmt: skip
    assert before.worse0.get("latency_p50", 0) >= RUNS // 2, before.worse0


def test_a_candidate_at_the_margin_is_not_promoted_while_latency_falls() -> None:
    cond = _cond("at the margin, latency falling x0.67, steps", pool=MARGIN_CONDITIONS)
    now = run_condition(cond, RUNS, seed=303, workers=2)
    for m in METRICS:
        assert now.ok.get(m.name, 0) <= 3, (m.name, now.ok)
    before = run_condition(replace(cond, metrics=("latency_p50",)), RUNS, seed=303,
                           workers=2, legacy=True)  # fmt: skip
    assert before.ok.get("latency_p50", 0) >= RUNS // 2, before.ok


def test_labels_counted_at_maturity_hold_the_level_when_wrong_answers_report_later() -> None:
    # Labels of wrong answers come up to 10x later than those of right ones. Counted at
    # maturity (the feedback ttl), both arms' answers are scored after the same window; the
    # old pooled test counting on arrival promotes a candidate 1pp worse far more often.
    cond = _cond("at the margin, labels of wrong answers later, steps", pool=MARGIN_CONDITIONS)
    now = run_condition(cond, RUNS, seed=404, workers=2)
    assert now.ok.get("accuracy", 0) <= 3, now.ok
    before = run_condition(cond, RUNS, seed=404, workers=2, legacy=True)
    assert before.ok.get("accuracy", 0) >= 4, before.ok
    aa = run_condition(_cond("labels of wrong answers later (0-10000 vs 0-1000 requests), "
                             "steps 5/25/50", metrics=("accuracy",)), RUNS, seed=405,
                       workers=2)  # fmt: skip
    assert aa.worse0.get("accuracy", 0) <= 3, aa.worse0
