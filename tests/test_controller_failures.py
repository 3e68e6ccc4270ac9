"""The hard-failure clock lives in the persisted rollout state: the pure step
(``track_failures``), a state stored before it was persisted, and a restart that keeps it."""

from __future__ import annotations

import pytest

from canary.controller import Controller
from canary.decision import (
    Phase,
    RolloutState,
    failure_clock_moved,
    resume_failures,
    track_failures,
)
from canary.metrics import Metrics
from canary.observe import Recorder
from canary.store import MemoryStore
from tests.test_controller import Clock, Sink, _config, _feed

_CLOCK_FIELDS = (
    "failing_since",
    "failing_requests",
    "failure_observed",
    "failure_errors",
    "failure_checked_at",
)


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


async def test_a_restart_keeps_the_failure_clock_without_the_downtime() -> None:
    config, store, clock = _config(), MemoryStore(), Clock()
    await store.open()
    ctl = Controller(config, store, Recorder(), Metrics(), Sink(), clock=clock, monotonic=clock)
    await ctl.load()
    rec = ctl._recorder
    _feed(rec, 200, 10, fail=True, seed=1)
    await ctl.flush()
    await ctl.evaluate(force=True)
    started = clock.t
    assert ctl.state("m").failing_since == started
    _feed(rec, 200, 10, fail=True, seed=3)
    await ctl.flush()
    clock.t += 1.0
    await ctl.evaluate(force=True)  # failing for 1 s: not yet a hard failure
    failed = ctl.state("m").failing_requests
    assert ctl.state("m").phase is Phase.RUNNING and failed > 0
    await ctl.flush()  # the clock reaches the store
    await ctl.stop()

    clock.t += 30.0  # canary is down for 30 s, then restarts
    rec2 = Recorder()
    ctl2 = Controller(config, store, rec2, Metrics(), Sink(), clock=clock, monotonic=clock)
    await ctl2.load()
    assert ctl2.state("m").failing_requests == failed
    assert ctl2.state("m").failing_for(clock.t) == pytest.approx(1.0)  # downtime left out
    _feed(rec2, 200, 10, fail=True, seed=2)
    await ctl2.flush()
    clock.t += 0.5
    await ctl2.evaluate(force=True)  # 1.5 s of failing in all: still running
    assert ctl2.state("m").phase is Phase.RUNNING
    _feed(rec2, 200, 10, fail=True, seed=4)
    await ctl2.flush()
    clock.t += 1.0
    await ctl2.evaluate(force=True)
    state = ctl2.state("m")
    assert state.phase is Phase.ROLLED_BACK and "failed hard" in state.reason
    analysis = ctl2._rollouts["m"].analysis
    assert analysis is not None and analysis.failing_for == pytest.approx(2.5)
    assert analysis.failing_requests == ctl2.totals("m").candidate.observed > failed


def test_resume_moves_a_running_clock_past_the_downtime_only() -> None:
    s = track_failures(_state(), 10, 10, 101.0)
    s = track_failures(s, 20, 20, 102.0, previous_check=101.0)
    assert (s.failing_since, s.failure_checked_at) == (101.0, 102.0)
    r = resume_failures(s, 160.0)
    assert r.failing_for(160.0) == pytest.approx(1.0) and r.failure_checked_at == 160.0
    idle = track_failures(_state(), 10, 0, 101.0)
    assert resume_failures(idle, 160.0) is idle  # no clock running: nothing to move


def test_totals_behind_the_stored_counts_restart_the_count() -> None:
    s = track_failures(_state(), 20, 20, 101.0)
    behind = track_failures(s, 15, 15, 102.0)  # samples lost in a crash between two writes
    assert (behind.failure_observed, behind.failure_errors) == (15, 15)
    assert (behind.failing_since, behind.failing_requests) == (s.failing_since, 20)


def test_only_a_moved_clock_is_worth_a_state_write() -> None:
    s = track_failures(_state(), 10, 0, 101.0)  # successes: counts move, the clock does not
    assert not failure_clock_moved(_state(), s)
    t = track_failures(s, 20, 10, 102.0)
    assert failure_clock_moved(s, t)
