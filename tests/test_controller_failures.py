"""The hard-failure clock lives in the persisted rollout state: the pure step
(``track_failures``), a state stored before it was persisted, and a restart that keeps it."""

from __future__ import annotations

import pytest

from canary.controller import Controller
from canary.decision import Phase, RolloutState, track_failures
from canary.metrics import Metrics
from canary.observe import Recorder
from canary.store import MemoryStore
from tests.test_controller import Clock, Sink, _config, _feed

_CLOCK_FIELDS = ("failing_since", "failing_requests", "failure_observed", "failure_errors")


def _state() -> RolloutState:
    return RolloutState.start(_config().rollouts[0], 100.0)


def test_all_new_requests_failing_start_and_move_the_clock_one_success_stops_it() -> None:
    s = _state()
    assert (s.failing_since, s.failing_requests, s.failure_observed) == (None, 0, 0)
    s = track_failures(s, 10, 10, 101.0)
    assert (s.failing_since, s.failing_requests) == (101.0, 10)  # no earlier check: now
    s = track_failures(s, 15, 15, 103.0, previous_check=101.0)
    assert (s.failing_since, s.failing_requests, s.failing_for(104.0)) == (101.0, 15, 3.0)
    s = track_failures(s, 20, 19, 104.0, previous_check=103.0)
    assert (s.failing_since, s.failing_requests, s.failing_for(104.0)) == (None, 0, 0.0)
    s = track_failures(s, 25, 24, 105.0, previous_check=104.0)
    assert s.failing_since == 104.0  # since the last check: the first may have failed then
    assert (s.failure_observed, s.failure_errors) == (25, 24)


def test_a_check_without_news_returns_the_same_state() -> None:
    s = track_failures(_state(), 10, 10, 101.0)
    assert track_failures(s, 10, 10, 109.0, previous_check=101.0) is s


def test_a_state_stored_without_the_clock_is_read_and_counted_from_its_next_check() -> None:
    old = _state().to_dict()
    for key in _CLOCK_FIELDS:
        del old[key]
    s = RolloutState.from_dict(old)
    assert (s.failing_since, s.failing_requests, s.failure_observed) == (None, 0, None)
    s = track_failures(s, 500, 500, 200.0)  # counts taken, nothing started
    assert (s.failing_since, s.failure_observed, s.failure_errors) == (None, 500, 500)
    assert RolloutState.from_dict(s.to_dict()) == s


async def test_a_restart_keeps_the_failure_clock() -> None:
    config, store, clock = _config(), MemoryStore(), Clock()
    await store.open()
    ctl = Controller(config, store, Recorder(), Metrics(), Sink(), clock=clock, monotonic=clock)
    await ctl.load()
    rec = ctl._recorder
    _feed(rec, 200, 10, fail=True, seed=1)
    await ctl.flush()
    await ctl.evaluate(force=True)
    started, failed = clock.t, ctl.state("m").failing_requests
    assert ctl.state("m").failing_since == started and failed > 0
    await ctl.flush()  # the clock reaches the store
    await ctl.stop()

    clock.t += 1.5  # the process restarts
    rec2 = Recorder()
    ctl2 = Controller(config, store, rec2, Metrics(), Sink(), clock=clock, monotonic=clock)
    await ctl2.load()
    assert ctl2.state("m").failing_since == started
    assert ctl2.state("m").failing_requests == failed
    _feed(rec2, 200, 10, fail=True, seed=2)
    await ctl2.flush()
    clock.t += 1.0
    await ctl2.evaluate(force=True)
    state = ctl2.state("m")
    assert state.phase is Phase.ROLLED_BACK and "failed hard" in state.reason
    analysis = ctl2._rollouts["m"].analysis
    assert analysis is not None and analysis.failing_for == pytest.approx(2.5)
    assert analysis.failing_requests == ctl2.totals("m").candidate.observed > failed
