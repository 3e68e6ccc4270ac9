"""The Analyzer seam (canary/analyzer): the inline and the worker analyzer give the same
analysis of the same job, the worker receives everything in the job (input health included),
and a worker that fails answers that call from the event loop and is started again."""

from __future__ import annotations

import json
import math
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import yaml

from canary.analyzer import AnalysisJob, Analyzer, InlineAnalyzer, WorkerAnalyzer
from canary.analyzer.channel import AnalysisFailed, ChannelBroken
from canary.config import InputsConfig, RolloutConfig, load_config_text
from canary.decision import Analysis, analyze
from canary.errors import AnalysisError, CanaryError
from canary.metrics import Metrics
from canary.observe import Observation, RolloutAccumulator
from canary.observe.inputs import InputMonitor
from tests.conftest import rollout_config

_METRICS = [
    {"name": "latency_p95", "signal": "latency", "stat": "p95", "max_increase": "10%"},
    {"name": "errors", "signal": "error", "stat": "rate", "max_increase": "0.5pp"},
]


def _rollout() -> RolloutConfig:
    doc = rollout_config(
        ["http://127.0.0.1:1"],
        ["http://127.0.0.1:2"],
        steps=[{"weight": 50}],
        analysis={"interval": "100ms", "metrics": _METRICS},
        inputs={"fields": ["amount"], "baseline": {"requests": 100}},
    )
    return load_config_text(yaml.safe_dump(doc)).rollouts[0]


def _totals(seed: int = 1) -> RolloutAccumulator:
    rng = np.random.default_rng(seed)
    acc = RolloutAccumulator()
    for i in range(600):
        cand = bool(rng.random() < 0.5)
        acc.record(
            Observation(
                rollout="m", arm="candidate" if cand else "production", propensity=0.5,
                shadow=False, request_id=str(i), status=200, error=None,
                latency=float(rng.lognormal(math.log(0.02), 0.3)),
            )
        )  # fmt: skip
    return acc


def _job(input_health: Any = None) -> AnalysisJob:
    return AnalysisJob(_rollout(), _totals(), 1.5, 4, input_health)


def _drifted_health() -> Any:
    """A snapshot of input counts whose current window moved far from its baseline."""
    monitor = InputMonitor("m", InputsConfig.model_validate({"fields": ["amount"]}))
    rng = np.random.default_rng(2)
    for mu in [50.0] * 200 + [90.0] * 400:
        monitor.observe(json.dumps({"amount": float(rng.normal(mu, 5.0))}).encode())
    return monitor.snapshot()


def _same(a: Analysis, b: Analysis) -> bool:
    return repr(a) == repr(b)  # repr: nan estimates compare equal


class _DeadExecutor(Executor):
    """Every job fails as a dead worker's would."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        fut.set_exception(RuntimeError("worker died"))
        return fut


def test_channel_errors_are_analysis_errors() -> None:
    assert issubclass(ChannelBroken, AnalysisError) and issubclass(AnalysisFailed, AnalysisError)
    assert issubclass(AnalysisError, CanaryError)


async def test_the_inline_analyzer_is_decision_analyze() -> None:
    job = _job()
    inline: Analyzer = InlineAnalyzer()
    inline.warm()
    await inline.start()
    await inline.check()
    got = await inline.analyze(job)
    await inline.close()
    want = analyze(job.config, job.totals, failing_for=1.5, failing_requests=4)
    assert _same(got, want) and got.failing_for == 1.5 and got.failing_requests == 4


async def test_the_worker_gets_the_whole_job_through_the_channel_and_as_a_job() -> None:
    health = _drifted_health()
    job = _job(health)
    want = await InlineAnalyzer().analyze(job)
    assert not _same(want, await InlineAnalyzer().analyze(_job()))  # the health matters
    executor = ThreadPoolExecutor(1)
    try:
        metrics = Metrics()
        jobs = WorkerAnalyzer(executor, metrics)  # not started: executor jobs
        assert _same(await jobs.analyze(job), want)
        channel = WorkerAnalyzer(executor, metrics)
        await channel.start()
        assert channel._channel is not None
        assert _same(await channel.analyze(job), want)
        await channel.close()
        assert channel._channel is None
        assert metrics.registry.get_sample_value("canary_analysis_worker_up") == 1.0
    finally:
        executor.shutdown()


async def test_a_failing_worker_answers_from_the_event_loop_and_restarts() -> None:
    now = [100.0]
    metrics = Metrics()
    healthy = ThreadPoolExecutor(1)
    makes = iter([healthy])
    analyzer = WorkerAnalyzer(
        _DeadExecutor(), metrics, executor_factory=lambda: next(makes), monotonic=lambda: now[0]
    )
    job = _job()
    want = await InlineAnalyzer().analyze(job)
    assert _same(await analyzer.analyze(job), want)  # the job failed: analysed here
    assert analyzer._executor is None
    assert metrics.registry.get_sample_value("canary_analysis_worker_up") == 0.0
    await analyzer.check()  # the back-off (1 s) has not passed
    assert analyzer._restart_task is None
    now[0] += 1.0
    await analyzer.check()
    assert analyzer._restart_task is not None
    await analyzer._restart_task
    assert analyzer._executor is healthy and analyzer._channel is not None
    restarts = metrics.registry.get_sample_value(
        "canary_analysis_worker_restarts_total", {"result": "ok"}
    )
    assert restarts == 1.0
    assert metrics.registry.get_sample_value("canary_analysis_worker_up") == 1.0
    assert _same(await analyzer.analyze(job), want)
    await analyzer.close()
    healthy.shutdown()
