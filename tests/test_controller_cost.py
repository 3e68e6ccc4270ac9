"""What the controller does to keep its work off the proxy's event loop: the packed inputs the
worker analyses give the same analysis as the totals, analyses go over a socket to the worker
(and fall back when it goes away), an unchanged rollout is not analysed again, and a flush
writes what it merged exactly once."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import socket
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import yaml

from canary.admin.views import rollout_detail
from canary.analyzer import WorkerAnalyzer
from canary.analyzer.channel import AnalysisChannel, ChannelBroken
from canary.analyzer.worker import (
    analysed_keys,
    analyze_packed,
    init_worker,
    pack_config,
    pack_inputs,
    unpack_inputs,
)
from canary.config import Config, RolloutConfig, load_config_text
from canary.controller import Controller
from canary.decision import Analysis, Phase, analyze
from canary.metrics import Metrics
from canary.observe import Observation, Recorder, RolloutAccumulator
from canary.store import MemoryStore
from tests.conftest import rollout_config

_METRICS = [
    {"name": "latency_p95", "signal": "latency", "stat": "p95", "max_increase": "10%"},
    {"name": "ttft_p50", "signal": "ttft", "stat": "p50", "max_increase": "15%"},
    {"name": "errors", "signal": "error", "stat": "rate", "max_increase": "0.5pp"},
    {"name": "cost", "signal": "cost", "stat": "mean", "max_increase": "5%"},
    {"name": "score", "signal": "json:score", "stat": "mean", "max_decrease": "2%"},
    {"name": "missing", "signal": "json:never", "stat": "mean", "max_increase": "1%"},
]


def _config(**analysis: Any) -> Config:
    spec = {"interval": "100ms", "burn_in": 50, "metrics": _METRICS, **analysis}
    steps = [{"weight": 10, "min_requests": 50}, {"weight": 50}]
    doc = rollout_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"], steps=steps, analysis=spec)
    return load_config_text(yaml.safe_dump(doc))


def _rollout() -> RolloutConfig:
    return _config().rollouts[0]


def _obs(rng: np.random.Generator, i: int, weight: float, slow: float = 1.0) -> Observation:
    cand = bool(rng.random() < weight / 100)
    p = weight / 100 if cand else 1 - weight / 100
    failed = bool(rng.random() < 0.01)
    return Observation(
        rollout="m", arm="candidate" if cand else "production", propensity=p, shadow=False,
        request_id=str(i), status=500 if failed else 200, error="status" if failed else None,
        latency=float(rng.lognormal(math.log(0.02), 0.3)) * (slow if cand else 1.0),
        ttft=float(rng.lognormal(math.log(0.005), 0.3)),
        signals={"cost": float(rng.random()), "json:score": float(rng.normal(0.5, 0.1)),
                 "json:unused": 1.0},
    )  # fmt: skip


def _feed(rec: Recorder, n: int, weight: float, *, slow: float = 1.0, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        rec.record(_obs(rng, i, weight, slow))


def _same(a: Analysis, b: Analysis) -> bool:
    return repr(a) == repr(b)  # repr: nan estimates compare equal


def test_packed_inputs_give_the_same_analysis() -> None:
    cfg = _rollout()
    acc = RolloutAccumulator()
    rng = np.random.default_rng(3)
    for i in range(3000):
        acc.record(_obs(rng, i, 10 if i < 1500 else 50, slow=1.2))  # two strata per arm
    acc.record_lost("candidate", 0.5, 3)
    direct = analyze(cfg, acc, failing_for=2.0, failing_requests=7)
    shipped = analyze_packed(
        pack_config(cfg), pack_inputs(acc, analysed_keys(cfg)), failing_for=2.0, failing_requests=7
    )
    assert _same(direct, shipped)
    assert (
        "json:unused" not in unpack_inputs(pack_inputs(acc, analysed_keys(cfg))).candidate.signals
    )


def test_packed_inputs_are_a_snapshot() -> None:
    cfg = _rollout()
    acc = RolloutAccumulator()
    rng = np.random.default_rng(4)
    for i in range(500):
        acc.record(_obs(rng, i, 50))
    packed = pack_inputs(acc, analysed_keys(cfg))
    before = analyze(cfg, acc)
    for i in range(500):
        acc.record(_obs(rng, i, 50, slow=3.0))
    assert _same(analyze(cfg, unpack_inputs(packed)), before)


async def _channel_roundtrip(executor: Executor) -> None:
    cfg = _rollout()
    acc = RolloutAccumulator()
    rng = np.random.default_rng(5)
    for i in range(800):
        acc.record(_obs(rng, i, 50))
    channel = await AnalysisChannel.open(executor)
    try:
        for failing in (0, 3):
            got = await channel.analyze(
                pack_config(cfg), pack_inputs(acc, analysed_keys(cfg)), 1.5, failing
            )
            assert _same(got, analyze(cfg, acc, failing_for=1.5, failing_requests=failing))
    finally:
        await channel.close()
    with pytest.raises(ChannelBroken):
        await channel.analyze(pack_config(cfg), pack_inputs(acc, analysed_keys(cfg)), 0.0, 0)


async def test_the_channel_answers_in_a_thread_and_frees_the_worker_on_close() -> None:
    executor = ThreadPoolExecutor(1)
    await _channel_roundtrip(executor)
    assert executor.submit(int, "7").result(5.0) == 7  # the serving job has returned
    executor.shutdown()


async def test_the_channel_answers_in_a_forkserver_worker() -> None:
    executor = ProcessPoolExecutor(
        1,
        mp_context=multiprocessing.get_context("forkserver"),
        initializer=init_worker,
        initargs=(os.getpid(),),
    )
    try:
        await _channel_roundtrip(executor)
    finally:
        executor.shutdown(wait=True)  # returns: the job ended when the channel closed


class _DeadExecutor(Executor):
    """Runs nothing: the job fails as a dead worker's would."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        fut.set_exception(RuntimeError("worker died"))
        return fut


async def _controller(
    executor: Executor | None, config: Config | None = None
) -> tuple[Controller, Recorder, MemoryStore]:
    store, rec, metrics = MemoryStore(), Recorder(), Metrics()
    await store.open()
    analyzer = None if executor is None else WorkerAnalyzer(executor, metrics)
    ctl = Controller(config or _config(), store, rec, metrics, lambda *_: None, analyzer=analyzer)
    await ctl.load()
    return ctl, rec, store


def _worker(ctl: Controller) -> WorkerAnalyzer:
    assert isinstance(ctl.analyzer, WorkerAnalyzer)
    return ctl.analyzer


async def _decisions(executor: Executor | None, *, start: bool) -> list[tuple[str, int]]:
    ctl, rec, _ = await _controller(executor)
    if start:
        await ctl.analyzer.start()  # what start() does, without the timer loop
    out = []
    for i in range(6):
        _feed(rec, 600, 10 if ctl.state("m").step == 0 else 50, slow=1.5, seed=i)
        await ctl.flush()
        await ctl.evaluate(force=True)
        out.append((ctl.state("m").phase.value, ctl.state("m").step))
    await ctl.stop()
    return out


async def test_decisions_are_the_same_through_the_channel_the_executor_and_inline() -> None:
    inline = await _decisions(None, start=False)
    assert inline[-1][0] == Phase.ROLLED_BACK.value
    executor = ThreadPoolExecutor(1)
    assert await _decisions(executor, start=True) == inline
    assert await _decisions(executor, start=False) == inline
    executor.shutdown()


async def test_a_dead_worker_falls_back_to_the_event_loop(caplog: Any) -> None:
    ctl, rec, _ = await _controller(_DeadExecutor())
    await ctl.analyzer.start()
    assert _worker(ctl)._channel is not None
    _feed(rec, 600, 10, seed=1)
    await ctl.flush()
    await ctl.evaluate(force=True)
    assert _worker(ctl)._channel is None and _worker(ctl)._executor is None
    assert rollout_detail(ctl.view("m"))["metrics"][0]["n_candidate"] > 0  # analysed here instead
    assert "the analysis process died" in caplog.text
    await ctl.stop()


async def test_a_worker_that_stops_answering_falls_back_to_the_event_loop() -> None:
    executor = ThreadPoolExecutor(1)
    ctl, rec, _ = await _controller(executor)
    await ctl.analyzer.start()
    assert _worker(ctl)._channel is not None
    _worker(ctl)._channel._theirs.shutdown(socket.SHUT_RDWR)  # the worker's end goes away
    _feed(rec, 600, 10, seed=1)
    await ctl.flush()
    await asyncio.wait_for(ctl.evaluate(force=True), 5.0)
    assert _worker(ctl)._channel is None
    assert rollout_detail(ctl.view("m"))["metrics"][0]["n_candidate"] > 0
    await ctl.stop()
    executor.shutdown()


class _CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(1)
        self.jobs = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.jobs += 1
        return super().submit(fn, *args, **kwargs)


async def test_a_rollout_without_new_samples_is_not_analysed_again() -> None:
    executor = _CountingExecutor()
    ctl, rec, _ = await _controller(executor)
    base = executor.jobs  # the warm-up
    _feed(rec, 300, 10, seed=1)
    await ctl.flush()
    await ctl.evaluate(force=True)
    assert executor.jobs == base + 1
    first = ctl._rollouts["m"].analysis
    await ctl.flush()  # nothing recorded meanwhile
    await ctl.evaluate(force=True)
    assert executor.jobs == base + 1
    assert ctl._rollouts["m"].analysis == first
    _feed(rec, 10, 10, seed=2)
    await ctl.flush()
    await ctl.evaluate(force=True)
    assert executor.jobs == base + 2
    await ctl.apply_config(_config(alpha=0.01))  # a new config is analysed even without samples
    await ctl.evaluate(force=True)
    assert executor.jobs == base + 3
    executor.shutdown()


async def test_the_failing_clock_moves_on_when_the_analysis_is_reused() -> None:
    ctl, rec, _ = await _controller(None)
    clock = [1000.0]
    ctl._clock = lambda: clock[0]
    rng = np.random.default_rng(1)
    for i in range(20):  # every candidate request fails
        obs = _obs(rng, i, 100)
        obs.error, obs.status = "connect", 0
        rec.record(obs)
    await ctl.flush()
    await ctl.evaluate(force=True)
    clock[0] += 30.0
    await ctl.flush()
    await ctl.evaluate(force=True)
    analysis = ctl._rollouts["m"].analysis
    assert analysis is not None and analysis.failing_requests == 20
    assert analysis.failing_for == pytest.approx(30.0)


async def test_a_flush_writes_each_delta_once_and_keeps_it_when_the_store_fails() -> None:
    ctl, rec, store = await _controller(None)
    _feed(rec, 200, 10, seed=1)
    await asyncio.gather(ctl.flush(), ctl.flush())  # concurrent flushes: one write each
    _feed(rec, 100, 10, seed=2)
    real = store.add_samples

    async def broken(rollout: str, delta: RolloutAccumulator, **_: object) -> None:
        from canary.errors import StoreError

        raise StoreError("down")

    store.add_samples = broken  # type: ignore[method-assign]
    await ctl.flush()
    assert not ctl.store_ok
    _feed(rec, 50, 10, seed=3)
    store.add_samples = real  # type: ignore[method-assign]
    await ctl.flush()
    assert ctl.store_ok
    saved = await store.get_samples("m")
    assert saved is not None
    totals = ctl.totals("m")
    for arm in ("production", "candidate"):
        mine, theirs = saved.arms[arm], totals.arms[arm]
        assert (mine.observed, mine.routed, mine.routing) == (
            theirs.observed,
            theirs.routed,
            theirs.routing,
        )
        for key, sig in theirs.signals.items():  # sums up to rounding: merged in another order
            assert mine.signals[key].hist.count == sig.hist.count
            assert mine.signals[key].total == pytest.approx(sig.total)
    assert totals.production.observed + totals.candidate.observed == 350


async def test_gauges_show_the_latest_analysis() -> None:
    ctl, rec, _ = await _controller(None)
    metrics = ctl._metrics
    for seed in (1, 2):
        _feed(rec, 400, 10, seed=seed)
        await ctl.flush()
        await ctl.evaluate(force=True)
        a = ctl._rollouts["m"].analysis
        assert a is not None
        for r in a.all_results():
            got = metrics.metric_samples.labels("m", r.name, "candidate")._value.get()
            assert got == r.n_candidate
            estimate = metrics.metric_estimate.labels("m", r.name)._value.get()
            assert (math.isnan(estimate) and math.isnan(r.estimate)) or estimate == r.estimate
