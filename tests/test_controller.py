"""The controller loop with fakes only at its Protocols: a recorder fed directly, a memory store
(or one that fails), a weight sink and a notifier that record what they get, a manual clock."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import yaml

from canary.admin.views import rollout_detail, rollout_summary
from canary.analyzer import WorkerAnalyzer
from canary.config import Config, WebhookConfig, load_config_text
from canary.controller import Controller
from canary.decision import CommandRejected, Phase
from canary.errors import StoreError, UnknownRollout
from canary.metrics import Metrics
from canary.observe import Observation, Recorder, RolloutAccumulator, Weights
from canary.store import MemoryStore
from tests.conftest import rollout_config


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, bool]] = []

    def __call__(self, rollout: str, weights: Weights) -> None:
        candidate, shadow = weights
        self.calls.append((rollout, candidate, shadow))


class Hooks:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def fire(
        self, rollout: str, event: str, hooks: Sequence[WebhookConfig], payload: Mapping[str, Any]
    ) -> int:
        self.events.append((rollout, event, dict(payload)))
        return len(hooks)


class FlakyStore(MemoryStore):
    """A memory store whose writes fail while ``down`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def add_samples(
        self, rollout: str, delta: RolloutAccumulator, *, batch: tuple[str, int] | None = None
    ) -> None:
        if self.down:
            raise StoreError("disk full")
        await super().add_samples(rollout, delta, batch=batch)

    async def put_state(
        self, rollout: str, state: dict[str, Any], *, fence: int | None = None
    ) -> None:
        if self.down:
            raise StoreError("disk full")
        await super().put_state(rollout, state, fence=fence)


def _config(**overrides: Any) -> Config:
    base: dict[str, Any] = {
        "steps": [{"weight": 10, "min_requests": 50}, {"weight": 50}],
        "analysis": {
            "interval": "100ms",
            "burn_in": 50,
            "metrics": [
                {"name": "latency_p95", "signal": "latency", "stat": "p95", "max_increase": "50%"},
            ],
        },
        "webhooks": [{"on": ["advance", "promote", "rollback"], "url": "http://127.0.0.1:9/h"}],
    }
    base.update(overrides)
    return load_config_text(
        yaml.safe_dump(rollout_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"], **base))
    )


def _feed(
    rec: Recorder, n: int, weight: float, *, slow: float = 1.0, fail: bool = False, seed: int = 0
) -> None:
    rng = np.random.default_rng(seed)
    pc = weight / 100
    for i in range(n):
        cand = rng.random() < pc
        arm = "candidate" if cand else "production"
        lat = float(rng.lognormal(math.log(0.02), 0.2)) * (slow if cand else 1.0)
        failed = cand and fail
        rec.record(
            Observation(
                rollout="m", arm=arm, propensity=pc if cand else 1 - pc, shadow=False,
                request_id=str(i), status=0 if failed else 200,
                error="connect" if failed else None, latency=lat,
            )
        )  # fmt: skip


async def _controller(
    config: Config, store: MemoryStore | None = None
) -> tuple[Controller, Recorder, Sink, Hooks, Clock, MemoryStore, Metrics]:
    store = store or MemoryStore()
    await store.open()
    rec, sink, hooks, clock, metrics = Recorder(), Sink(), Hooks(), Clock(), Metrics()
    ctl = Controller(
        config, store, rec, metrics, sink, notifier=hooks, clock=clock, monotonic=clock
    )
    await ctl.load()
    return ctl, rec, sink, hooks, clock, store, metrics


async def test_a_good_candidate_advances_and_is_promoted() -> None:
    ctl, rec, sink, hooks, clock, store, metrics = await _controller(_config())
    assert ctl.weights() == {"m": (10.0, False)}
    _feed(rec, 800, 10, seed=1)
    await ctl.flush()
    await ctl.evaluate(force=True)
    assert ctl.state("m").step == 1 and sink.calls == [("m", 50.0, False)]
    assert hooks.events[-1][1] == "advance"
    for i in range(40):
        if ctl.state("m").phase is Phase.PROMOTED:
            break
        _feed(rec, 500, 50, seed=10 + i)
        clock.t += 1
        await ctl.flush()
        await ctl.evaluate(force=True)
    assert ctl.state("m").phase is Phase.PROMOTED
    assert sink.calls[-1] == ("m", 100.0, False)
    assert [e[1] for e in hooks.events] == ["start", "advance", "promote"]
    actions = [d["action"] for d in await store.decisions("m")]
    assert actions == ["START", "ADVANCE", "PROMOTE"]
    detail = rollout_detail(ctl.view("m"))
    assert detail["metrics"][0]["verdict"] == "OK"
    assert detail["last_decision"]["action"] == "PROMOTE"
    assert (
        metrics.registry.get_sample_value(
            "canary_decisions_total", {"rollout": "m", "decision": "PROMOTE"}
        )
        == 1.0
    )
    assert (
        metrics.registry.get_sample_value(
            "canary_rollout_phase", {"rollout": "m", "phase": "promoted"}
        )
        == 1.0
    )
    await store.close()


async def test_a_slow_candidate_is_rolled_back_with_evidence() -> None:
    ctl, rec, sink, hooks, _clock, store, _ = await _controller(_config())
    _feed(rec, 3000, 10, slow=2.0, seed=2)
    await ctl.flush()
    await ctl.evaluate(force=True)
    assert ctl.state("m").phase is Phase.ROLLED_BACK
    assert sink.calls == [("m", 0.0, False)]
    entry = (await store.decisions("m"))[-1]
    assert entry["action"] == "ROLLBACK" and entry["evidence"]["metric"] == "latency_p95"
    assert entry["evidence"]["lower"] > 1.5 and entry["evidence"]["n_candidate"] > 100
    assert hooks.events[-1][1] == "rollback"


async def test_a_candidate_failing_every_request_is_rolled_back_within_seconds() -> None:
    ctl, rec, _sink, _, clock, _store, _ = await _controller(_config())
    for _ in range(3):
        _feed(rec, 200, 10, fail=True)
        await ctl.flush()
        await ctl.evaluate(force=True)
        if ctl.state("m").phase is Phase.ROLLED_BACK:
            break
        clock.t += 1.0
    assert ctl.state("m").phase is Phase.ROLLED_BACK
    assert "failed hard" in ctl.state("m").reason


async def test_state_and_samples_survive_a_restart_on_the_same_store() -> None:
    config = _config()
    ctl, rec, _, _, clock, store, _ = await _controller(config)
    _feed(rec, 800, 10, seed=3)
    await ctl.flush()
    await ctl.evaluate(force=True)
    assert ctl.state("m").step == 1
    before = ctl.totals("m").to_dict()
    # a new controller on the same store (the process restarted)
    ctl2 = Controller(config, store, Recorder(), Metrics(), Sink(), clock=clock, monotonic=clock)
    assert await ctl2.load() == {"m": (50.0, False)}
    assert ctl2.state("m") == ctl.state("m")
    assert ctl2.totals("m").to_dict() == before
    assert [d["action"] for d in rollout_detail(ctl2.view("m"))["decisions"]] == [
        "START",
        "ADVANCE",
    ]


async def test_changed_endpoints_start_a_new_rollout_but_thresholds_do_not() -> None:
    config = _config()
    ctl, rec, _, _, _, store, _ = await _controller(config)
    _feed(rec, 800, 10, seed=4)
    await ctl.flush()
    await ctl.evaluate(force=True)
    assert ctl.state("m").step == 1
    stricter = _config(analysis={"interval": "100ms", "burn_in": 50, "max_duration": "2h"})
    assert await ctl.apply_config(stricter) == {"m": (50.0, False)}
    assert ctl.state("m").step == 1 and ctl.totals("m").candidate.observed > 0
    moved = load_config_text(
        yaml.safe_dump(
            rollout_config(["http://127.0.0.1:1"], ["http://127.0.0.1:3"], steps=[{"weight": 20}])
        )
    )
    assert await ctl.apply_config(moved) == {"m": (20.0, False)}
    assert ctl.state("m").step == 0 and ctl.totals("m").candidate.observed == 0
    assert [d["action"] for d in await store.decisions("m")] == ["START"]


async def test_operator_commands_win_and_are_logged() -> None:
    ctl, rec, sink, hooks, _clock, store, _ = await _controller(_config())
    out = await ctl.command("m", "pause", "looking at dashboards")
    assert out["phase"] == "paused" and "looking at dashboards" in out["reason"]
    _feed(rec, 3000, 10, slow=3.0, seed=5)  # would be a rollback if not paused
    await ctl.flush()
    await ctl.evaluate(force=True)
    assert ctl.state("m").phase is Phase.PAUSED
    with pytest.raises(CommandRejected):
        await ctl.command("m", "pause")
    with pytest.raises(UnknownRollout):
        await ctl.command("nope", "pause")
    await ctl.command("m", "promote")
    assert sink.calls[-1] == ("m", 100.0, False) and hooks.events[-1][1] == "promote"
    entries = await store.decisions("m")
    assert [(d["action"], d["manual"]) for d in entries] == [
        ("START", False), ("PAUSE", True), ("PROMOTE", True),
    ]  # fmt: skip


async def test_store_outage_holds_decisions_and_recovers_without_losing_samples() -> None:
    store = FlakyStore()
    ctl, rec, sink, _, _clock, _, metrics = await _controller(_config(), store)
    store.down = True
    _feed(rec, 3000, 10, slow=2.0, seed=6)
    await ctl.flush()
    await ctl.evaluate(force=True)
    assert not ctl.store_ok and ctl.state("m").phase is Phase.RUNNING and sink.calls == []
    assert "state store is unavailable" in rollout_summary(ctl.view("m"))["status"]
    assert metrics.registry.get_sample_value("canary_store_up") == 0.0
    store.down = False
    await ctl.flush()
    assert ctl.store_ok
    stored = await store.get_samples("m")
    assert stored is not None and stored.candidate.observed == ctl.totals("m").candidate.observed
    await ctl.evaluate(force=True)
    assert ctl.state("m").phase is Phase.ROLLED_BACK
    assert (await store.get_state("m") or {})["phase"] == "rolled_back"


class _GatedExecutor(concurrent.futures.Executor):
    """Runs each analysis in a thread once ``gate`` opens: an analysis that takes its time."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(1)

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        def gated() -> Any:
            self.gate.wait(10.0)
            return fn(*args, **kwargs)

        return self._pool.submit(gated)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.gate.set()
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)


async def test_flushes_and_commands_do_not_wait_for_a_running_analysis() -> None:
    store = MemoryStore()
    await store.open()
    rec, metrics, executor = Recorder(), Metrics(), _GatedExecutor()
    analyzer = WorkerAnalyzer(executor, metrics)
    ctl = Controller(_config(), store, rec, metrics, Sink(), notifier=Hooks(), analyzer=analyzer)
    await ctl.load()
    _feed(rec, 800, 10, slow=3.0, seed=1)  # a candidate the analysis would roll back
    await ctl.flush()
    analysis = asyncio.get_running_loop().create_task(ctl.evaluate(force=True))
    await asyncio.sleep(0.05)
    assert not analysis.done()
    _feed(rec, 100, 10, seed=2)
    await asyncio.wait_for(ctl.flush(), 1.0)  # samples keep moving to the store
    assert ctl.totals("m").production.observed + ctl.totals("m").candidate.observed == 900
    await asyncio.wait_for(ctl.command("m", "pause", "looking"), 1.0)
    executor.gate.set()
    await asyncio.wait_for(analysis, 5.0)
    executor.shutdown()
    # The analysis finished after the pause: a paused rollout takes no automatic action.
    assert ctl.state("m").phase is Phase.PAUSED
    assert rollout_detail(ctl.view("m"))["metrics"][0]["verdict"] == "WORSE"


async def test_an_analysis_of_a_config_replaced_meanwhile_is_dropped() -> None:
    store = MemoryStore()
    await store.open()
    rec, metrics, executor = Recorder(), Metrics(), _GatedExecutor()
    analyzer = WorkerAnalyzer(executor, metrics)
    ctl = Controller(_config(), store, rec, metrics, Sink(), notifier=Hooks(), analyzer=analyzer)
    await ctl.load()
    _feed(rec, 800, 10, slow=3.0, seed=1)
    await ctl.flush()
    analysis = asyncio.get_running_loop().create_task(ctl.evaluate(force=True))
    await asyncio.sleep(0.05)
    await ctl.apply_config(_config())  # e.g. a reload with new thresholds
    executor.gate.set()
    await asyncio.wait_for(analysis, 5.0)
    executor.shutdown()
    assert ctl.state("m").phase is Phase.RUNNING  # not rolled back on the stale config
    await ctl.evaluate(force=True)  # the next round decides on the new one
    assert ctl.state("m").phase is Phase.ROLLED_BACK
