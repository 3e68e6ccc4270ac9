"""End-to-end rollout scenarios: real fake models, real canary, real traffic, real decisions.

Each scenario starts a production and a candidate fake model server, canary in front of them
with the rollout controller running, and open-loop Poisson traffic through the proxy (127.0.0.1
only, bounded in count and time) until the rollout reaches a terminal phase or the scenario's
time limit. It then checks the outcome against the expected one and prints the decision time
(first request to the terminal decision), the candidate and total requests the rollout had
observed at that decision, the deciding reason, and every user-visible error (non-2xx answers
and connection errors seen by the load generator).

Run ``python -m loadtest.scenarios`` (every scenario and a summary table of medians),
``--fast`` (the CI subset, small bounds), ``--only NAME ...``, ``--repeat N``, ``--seed S``.
The exit status is 1 when any scenario ended with the wrong outcome or failed a check.

The rollout (one plan for every scenario; the statistics decide)
----------------------------------------------------------------
- ``steps: [{weight: 10, min_requests: 200}, {weight: 50}]``: a small first exposure that
  must see 200 candidate requests, then a 50/50 split, where a comparison needs the fewest
  requests; promotion at the last step needs every metric OK, so it has no minimum of its own.
  (``restart`` has three steps, 10/30/50%, so that there is a middle step to be killed in.)
- ``analysis: {interval: 250ms, alpha: 0.05, burn_in: 100}``: tests evaluated four times a
  second (they are anytime-valid, so checking often costs no error budget), no verdict before
  100 candidate samples, alpha split over the metrics and the sample-ratio guard (Bonferroni).
- ``routing: {failover: true, failover_methods: all, timeout: 5s}`` and a per-request random
  split (no sticky users, so the sample-ratio test checks the routing too). ``all``: the
  fake models' POSTs have no side effects, so the requests a candidate that goes down had
  already taken are replayed on production too (the default replays only idempotent methods
  and those that never reached the candidate, as nginx does).
- Metrics, what a user of a classic REST model would write: ``latency_p95`` at most +10%,
  ``errors`` at most +0.5pp, ``cost`` (each arm's ``X-Model-Cost`` header) at most +5%.
- The accuracy scenarios measure ``accuracy`` per request (``json:correct``, which the fake
  models add with ``report_correct``; mean, at most -1pp) with
  ``tradeoff: {accuracy: 1pp, latency_p95: 10%}``, next to ``latency_p95`` and ``errors``.

Fake models and load
--------------------
Lognormal latency, 20 ms median, sigma 0.3 (p95 about 33 ms); the servers only sleep, so
their CPU cost is the HTTP handling. Canary, both fake servers and the load generator share
one event loop (so one of this machine's two cores): 300 requests per second uses about 40% of
it, 500 about 80%. Scenarios run at 300 req/s except the accuracy ones (500 req/s: they need
tens of thousands of requests); ``--rate`` sets one rate for all. Seeds: run ``r`` uses
``--seed + r`` for the traffic and the fake models; the proxy's split is not seeded, so two
runs with one seed still differ a little.

Accuracy needs many samples: telling +1.5pp from the 1pp-worth-10% trade-off at +8% latency
means resolving the accuracy difference to a few tenths of a pp while the p95 ratio is pinned
below about +10%. At 97% vs 98.5% accuracy that took 78k-147k requests in four runs (130-295 s
at 500-600 req/s), hence its 7-minute bound; at 90% vs 91.5% the per-request variance is about
4 times larger (``accuracy90_slow8``, not in the default set: run it with ``--only``).

Delayed labels (``kind="feedback"``): the rollout sets ``prediction: json:prediction`` and
measures ``accuracy`` as ``{signal: feedback, stat: rate, max_decrease: 1pp}`` next to
``latency_p95`` and ``errors``. A :class:`LabelPoster` posts every answered request's true
label (:func:`~loadtest.fake_model.true_label` of its body) to ``/api/v1/feedback`` after a
delay uniform in 2-30 s, in batches; ``feedback.ttl`` is 32 s, so each label counts once its
answer is 32 s old (``count_at: maturity``) and the accuracy test lags the traffic by that
much. Production answers 97% correctly: near 97% a 0/1 signal has a fifth of the variance it
has near 80% (0.03 vs 0.16), so the per-arm beta-binomial sequences resolve -3pp or +2pp
against the 1pp margin with a few thousand to ten thousand labels per arm (80% vs 82% would
need about five times as many). ``labels_worse3`` must roll back *on accuracy* (the reason is
checked); ``labels_better2`` must promote, which also needs ``latency_p95`` provably within
+10% (equal latency).

Scenarios
---------
``identical`` (promote), ``slow30`` (+30% latency: roll back), ``band20`` (20% slower between
its p60 and p80 only, so p50 and p95 see nothing: ``stat: distribution`` must roll it back, the
reason is checked), ``errors5`` (5% errors: roll back), ``down`` (the candidate's server
stops 4 s into the rollout: roll back within 5 s of it going down, with no user-visible
error thanks to failover), ``unreachable`` (nothing ever
listens at the candidate's address: the same), ``cheaper`` (20% faster and 20% cheaper:
promote), ``memory40`` (the candidate's ``/metrics`` reports 40% more resident memory, equal
latency and errors: ``memory`` at most +20%, scraped every second, rolls it back after the
10-window burn-in), ``memory_same`` (its control: promote), ``accuracy_slow8`` (+1.5pp
accuracy at +8% latency: promote on the trade-off),
``accuracy_slow25`` (the same accuracy at +25% latency: roll back),
``ttft2x`` (streamed chat completions at 150 req/s; the candidate takes 80 ms instead of
40 ms to its first token but streams the other 15 faster, so the total stays 160 ms: roll back
on ``ttft_p50``, the reason is checked),
``labels_worse3`` (94% vs 97% accuracy, measured from labels posted 2-30 s late: roll back on
accuracy), ``labels_better2`` (99% vs 97%, equal latency: promote), ``restart`` (canary as a
process on SQLite, SIGKILLed in step 2 of 3 and started again: it must resume at that step
with the samples it had flushed, losing at most about the last flush interval, then promote;
connection errors while the only canary process is down are expected and reported apart).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TextIO

import httpx
import uvloop
import yaml

from canary.admin.views import rollout_detail
from canary.config import load_config_text
from canary.runtime import Runtime
from loadtest.fake_model import FakeModelConfig, running_fake_model, true_label
from loadtest.loadgen import LoadConfig, LoadReport, ResponseRecord, run_load

__all__ = [
    "SCENARIOS",
    "Result",
    "Scenario",
    "Traffic",
    "format_metric",
    "main",
    "run_scenario",
]

# "not_rolled_back": promoted, or still undecided at the time limit (an A/A whose evidence is
# too thin to promote in the time must at least not be rolled back).
Outcome = Literal["promoted", "rolled_back", "not_rolled_back"]
TERMINAL = ("promoted", "rolled_back")
ROLLOUT = "model"

LATENCY_P95 = {"name": "latency_p95", "signal": "latency", "stat": "p95", "max_increase": "10%"}
LATENCY_P50 = {"name": "latency_p50", "signal": "latency", "stat": "p50", "max_increase": "10%"}
LATENCY_MEAN = {"name": "latency_mean", "signal": "latency", "stat": "mean", "max_increase": "10%"}
LATENCY_DIST = {
    "name": "latency_dist", "signal": "latency", "stat": "distribution", "max_increase": "10%",
}  # fmt: skip
ERRORS = {"name": "errors", "signal": "error", "stat": "rate", "max_increase": "0.5pp"}
COST = {"name": "cost", "signal": "cost", "stat": "mean", "max_increase": "5%"}
ACCURACY = {"name": "accuracy", "signal": "json:correct", "stat": "mean", "max_decrease": "1pp"}
STEPS: list[dict[str, Any]] = [{"weight": 10, "min_requests": 200}, {"weight": 50}]
ANALYSIS: dict[str, Any] = {
    "interval": "250ms",
    "alpha": 0.05,
    "burn_in": 100,
    "max_duration": "30m",  # longer than any scenario: the scenario's own limit ends a run
    "on_inconclusive": "rollback",
}
PERFORMANCE = {"metrics": [LATENCY_P95, ERRORS, COST]}
TRADEOFF = {
    "metrics": [LATENCY_P95, ERRORS, ACCURACY],
    "tradeoff": {"accuracy": "1pp", "latency_p95": "10%"},
}
# Accuracy from delayed labels: the feedback signal joined by request id.
LABELED_ACCURACY = {
    "name": "accuracy",
    "signal": "feedback",
    "stat": "rate",
    "max_decrease": "1pp",
}
LABELS = {"metrics": [LATENCY_P95, ERRORS, LABELED_ACCURACY]}
# Resident memory per replica, scraped from both fake models' /metrics every second.
MEMORY = {
    "name": "memory",
    "signal": "resource:process_resident_memory_bytes",
    "stat": "mean",
    "max_increase": "20%",
}
RESOURCES = {"scrape": "/metrics", "every": "1s"}
# Streamed chat: time to first token next to total latency.
TTFT_P50 = {"name": "ttft_p50", "signal": "ttft", "stat": "p50", "max_increase": "15%"}
LLM = {"metrics": [TTFT_P50, LATENCY_P95, ERRORS]}
# 16 tokens: 40 ms to the first, then 8 ms apart (160 ms in all), on a 20 ms-median server.
CHAT_PRODUCTION = replace(
    FakeModelConfig(model="production", latency_median=0.020, latency_sigma=0.3),
    ttft=0.040,
    inter_token=0.008,
    completion_tokens=16,
)

# 20 ms median, sigma 0.3: p95 is about 33 ms. The servers only sleep, so this costs no CPU.
BASE_MODEL = FakeModelConfig(model="production", latency_median=0.020, latency_sigma=0.3)
# Users who differ persistently, the same on both arms (an A/A with sticky routing).
STICKY_USERS: dict[str, Any] = {
    "user_latency_sigma": 0.5, "error_rate": 0.01, "user_error_sigma": 1.0,
}  # fmt: skip
# Latency rising on both arms over the first 20 s, i.e. across the 10% and 50% steps.
DRIFT: dict[str, Any] = {"latency_trend": 1.6, "trend_seconds": 20.0}


@dataclass(frozen=True)
class Scenario:
    """One end-to-end rollout and the outcome it must reach."""

    name: str
    title: str
    expect: Outcome
    candidate: FakeModelConfig
    production: FakeModelConfig = BASE_MODEL
    analysis: Mapping[str, Any] = field(default_factory=lambda: PERFORMANCE)
    steps: Sequence[Mapping[str, Any]] = tuple(STEPS)
    rate: float = 300.0
    """Requests per second (``--rate`` overrides it for every scenario)."""
    time_limit: float = 120.0
    """Seconds of traffic before the run counts as "no decision"."""
    fast_time_limit: float = 45.0
    """The same with ``--fast``: a CI bound, about twice the typical decision time."""
    candidate_down_at: float | None = None
    """Stop the candidate's server this many seconds after the first request (0: never up)."""
    max_down_to_decision: float | None = None
    """The terminal decision must come within this many seconds of the candidate going down."""
    chat: bool = False
    """Traffic is streamed OpenAI chat completions (``/v1/chat/completions``), not predicts."""
    no_user_errors: bool = False
    """Fail the scenario on any user-visible error."""
    fast: bool = False
    """Part of the ``--fast`` CI subset."""
    kind: Literal["inprocess", "restart", "feedback"] = "inprocess"
    """``feedback``: in process, and every answered request's true label is posted to
    ``/api/v1/feedback`` after a delay uniform in ``label_delay`` (``prediction:
    json:prediction`` on the rollout)."""
    label_delay: tuple[float, float] = (2.0, 30.0)
    expect_reason: str | None = None
    """The terminal decision's reason must start with this (right outcome, right cause)."""
    default: bool = True
    """Part of the full set; the others run only when named with ``--only``."""
    resources: Mapping[str, Any] | None = None
    """``resources:`` of both arms (needed by ``resource:`` metrics)."""
    users: int = 0
    """Sticky users (``routing.sticky`` on ``X-User-Id``, traffic drawn from this many users);
    0: a per-request random split."""

    def rollout(self, production_url: str, candidate_url: str) -> dict[str, Any]:
        """The rollout file (as a dict) for these endpoints."""
        arm_cost = {"header": "X-Model-Cost"}
        res = {"resources": dict(self.resources)} if self.resources is not None else {}
        return {
            "proxy": {"listen": "127.0.0.1:0"},
            "admin": {"listen": "127.0.0.1:0"},
            "state": {"backend": "memory"},
            "rollouts": [
                {
                    "name": ROLLOUT,
                    "production": {"endpoints": [production_url], "cost": arm_cost, **res},
                    "candidate": {"endpoints": [candidate_url], "cost": arm_cost, **res},
                    "routing": {
                        "failover": True,
                        # Model POSTs have no side effects: replay those the candidate may
                        # have taken when it went down (the default replays idempotent ones)
                        "failover_methods": "all",
                        "timeout": "5s",
                        **({"sticky": {"header": "X-User-Id"}} if self.users else {}),
                    },
                    "steps": [dict(s) for s in self.steps],
                    "analysis": {**ANALYSIS, **self.analysis},
                    **(
                        {
                            "prediction": "json:prediction",
                            # labels count once their answers are this old (equal maturity)
                            "feedback": {"ttl": f"{self.label_delay[1] + 2.0:g}s"},
                        }
                        if self.kind == "feedback"
                        else {}
                    ),
                }
            ],
        }


def _candidate(**changes: Any) -> FakeModelConfig:
    return replace(BASE_MODEL, model="candidate", **changes)


ACCURATE_PRODUCTION = replace(BASE_MODEL, accuracy=0.97, report_correct=True)
# 97%: a 0/1 signal near 97% has a fifth of the variance it has near 80%, so the labelled
# scenarios decide on about five times fewer labels (see the docstring).
LABELED_PRODUCTION = replace(BASE_MODEL, accuracy=0.97)
SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("identical", "identical candidate", "promoted", _candidate(), fast=True),
        Scenario(
            "sticky_aa",
            "identical, 400 sticky users who differ (latency x e^(0.5 z), errors 1% on a "
            "logit spread of 1)",
            "not_rolled_back",
            _candidate(**STICKY_USERS),
            production=replace(BASE_MODEL, **STICKY_USERS),
            analysis={"metrics": [LATENCY_P95, LATENCY_MEAN, ERRORS]},
            users=400,
            time_limit=60.0,
            fast_time_limit=30.0,
            fast=True,
        ),
        Scenario(
            "drift_aa",
            "identical, latency rising x1.6 on both arms while the weights step 10 -> 50",
            "not_rolled_back",
            _candidate(**DRIFT),
            production=replace(BASE_MODEL, **DRIFT),
            analysis={"metrics": [LATENCY_P95, LATENCY_P50, ERRORS]},
            time_limit=60.0,
            fast_time_limit=30.0,
            fast=True,
        ),
        Scenario("slow30", "+30% latency", "rolled_back", _candidate(slowdown=1.3), fast=True),
        Scenario(
            "band20",
            "20% slower between its p60 and p80 only (p50 and p95 unchanged)",
            "rolled_back",
            _candidate(slow_band=(0.6, 0.8, 1.2)),
            analysis={"metrics": [LATENCY_P50, LATENCY_P95, LATENCY_DIST, ERRORS]},
            expect_reason="latency_dist is worse than allowed",
            time_limit=90.0,
            fast_time_limit=90.0,  # a power scenario: on a loaded CI machine 60 s was once short
            fast=True,
        ),
        Scenario("errors5", "5% errors", "rolled_back", _candidate(error_rate=0.05), fast=True),
        Scenario(
            "down",
            "candidate stops mid-rollout",
            "rolled_back",
            _candidate(),
            candidate_down_at=4.0,
            max_down_to_decision=5.0,
            no_user_errors=True,
            fast=True,
        ),
        Scenario(
            "unreachable",
            "candidate never up",
            "rolled_back",
            _candidate(),
            candidate_down_at=0.0,
            max_down_to_decision=5.0,
            no_user_errors=True,
            fast=True,
        ),
        Scenario(
            "cheaper",
            "20% faster, 20% cheaper",
            "promoted",
            _candidate(latency_median=0.016, cost=0.0008),
        ),
        Scenario(
            "ttft2x",
            "2x time to first token, same total",
            "rolled_back",
            replace(CHAT_PRODUCTION, model="candidate", ttft=0.080, inter_token=0.080 / 15),
            production=CHAT_PRODUCTION,
            analysis=LLM,
            chat=True,
            rate=150.0,
            expect_reason="ttft_p50 is worse than allowed",
        ),
        Scenario(
            "memory40",
            "+40% memory per replica",
            "rolled_back",
            _candidate(memory_overhead_ratio=0.4),
            analysis={"metrics": [LATENCY_P95, ERRORS, MEMORY]},
            resources=RESOURCES,
        ),
        Scenario(
            "memory_same",
            "same memory (resource control)",
            "promoted",
            _candidate(),
            analysis={"metrics": [LATENCY_P95, ERRORS, MEMORY]},
            resources=RESOURCES,
        ),
        Scenario(
            "accuracy_slow8",
            "+1.5pp accuracy, +8% latency",
            "promoted",
            _candidate(accuracy=0.985, slowdown=1.08, report_correct=True),
            production=ACCURATE_PRODUCTION,
            analysis=TRADEOFF,
            rate=500.0,
            time_limit=420.0,  # measured 130-295 s at 500-600 req/s; see the docstring
        ),
        Scenario(
            "accuracy_slow25",
            "+1.5pp accuracy, +25% latency",
            "rolled_back",
            _candidate(accuracy=0.985, slowdown=1.25, report_correct=True),
            production=ACCURATE_PRODUCTION,
            analysis=TRADEOFF,
            rate=500.0,
            time_limit=300.0,
        ),
        Scenario(
            "labels_worse3",
            "-3pp accuracy, labels 2-30 s late",
            "rolled_back",
            _candidate(accuracy=0.94),
            production=LABELED_PRODUCTION,
            analysis=LABELS,
            time_limit=150.0,
            kind="feedback",
            expect_reason="accuracy is worse than allowed",
        ),
        Scenario(
            "labels_better2",
            "+2pp accuracy, labels 2-30 s late",
            "promoted",
            _candidate(accuracy=0.99),
            production=LABELED_PRODUCTION,
            analysis=LABELS,
            time_limit=150.0,
            kind="feedback",
        ),
        Scenario(
            "accuracy90_slow8",
            "+1.5pp accuracy from 90%, +8% latency",
            "promoted",
            _candidate(accuracy=0.915, slowdown=1.08, report_correct=True),
            production=replace(BASE_MODEL, accuracy=0.90, report_correct=True),
            analysis=TRADEOFF,
            rate=500.0,
            time_limit=900.0,
            default=False,
        ),
        Scenario(
            "restart",
            "canary SIGKILLed at step 2/3",
            "promoted",
            _candidate(),
            steps=(
                {"weight": 10, "min_requests": 200},
                {"weight": 30, "min_requests": 600},
                {"weight": 50},
            ),
            time_limit=150.0,
            kind="restart",
        ),
    ]
}


@dataclass
class Result:
    """What one scenario run ended with."""

    name: str
    expected: Outcome
    outcome: str
    """``promoted``, ``rolled_back`` or ``no decision (<phase>)``."""
    decision_time: float | None
    """Seconds from the first request to the terminal decision."""
    candidate_requests: int
    """Candidate observations at the terminal decision (at the end when there was none)."""
    total_requests: int
    """Both arms' observations at the terminal decision."""
    sent: int
    """Requests the load generator sent in the whole run."""
    reason: str
    user_errors: dict[str, int]
    extra: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seed: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        errors = ", ".join(f"{k}={v}" for k, v in sorted(self.user_errors.items())) or "none"
        when = "-" if self.decision_time is None else f"{self.decision_time:.1f} s"
        lines = [
            f"  outcome          {self.outcome} (expected {self.expected})",
            f"  decision time    {when} after the first request",
            f"  requests         {self.candidate_requests} candidate, "
            f"{self.total_requests} total at the decision; {self.sent} sent in the run",
            f"  reason           {self.reason}",
            f"  user errors      {errors}",
        ]
        lines += [f"  {k:<16} {v}" for k, v in self.extra.items() if not k.startswith("_")]
        verdict = "OK" if self.ok else "FAILED: " + "; ".join(self.problems)
        lines.append(f"  => {verdict}")
        return "\n".join(lines)


# -- traffic --------------------------------------------------------------------------------


class Traffic:
    """Open-loop predict traffic through the proxy, recording what users see.

    Wraps :func:`run_load`: records the wall-clock time of the first request, counts answers
    per arm and every user-visible error (non-2xx status or no response) with its time.
    """

    def __init__(
        self,
        url: str,
        *,
        rate: float,
        duration: float,
        requests: int,
        seed: int,
        users: int = 0,
        on_answer: Callable[[ResponseRecord], None] | None = None,
        chat: bool = False,
    ) -> None:
        self.first_sent: float | None = None
        self._chat = chat
        self._on_answer = on_answer
        self.sent = 0
        self.answered: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.error_times: list[tuple[float, str]] = []
        self._seed = seed
        self._config = LoadConfig(
            url=url,
            rate=rate,
            duration=duration,
            requests=requests,
            max_in_flight=2000,
            timeout=10.0,
            body_factory=self._body,
            on_response=self._on_response,
            users=users,
            seed=seed,
        )
        self._task: asyncio.Task[LoadReport] | None = None
        self.report: LoadReport | None = None

    def _body(self, index: int, rng: Any) -> dict[str, Any]:
        if self.first_sent is None:
            self.first_sent = time.time()
        self.sent += 1
        if self._chat:
            return {
                "model": "fake",
                "messages": [{"role": "user", "content": f"s{self._seed}-{index}: go on"}],
                "max_tokens": 16,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        features = [round(rng.random(), 4) for _ in range(4)]
        return {"id": f"s{self._seed}-{index}", "features": features}

    def _on_response(self, rec: ResponseRecord) -> None:
        if rec.status is not None and 200 <= rec.status < 300:
            self.answered[rec.arm or "unknown"] += 1
            if self._on_answer is not None:
                self._on_answer(rec)
            return
        what = rec.error or str(rec.status)
        self.errors[what] += 1
        self.error_times.append((time.time(), what))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(run_load(self._config))

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def stop(self) -> None:
        """Stop sending (in-flight requests are abandoned) and keep the report if it ended."""
        task = self._task
        if task is None:
            return
        if task.done():
            if not task.cancelled():
                self.report = task.result()
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)  # let the abandoned requests' tasks finish cancelling

    def errors_between(self, start: float, end: float) -> Counter[str]:
        return Counter(what for t, what in self.error_times if start <= t <= end)


class LabelPoster:
    """Posts each answered request's true label to ``POST /api/v1/feedback`` after a delay.

    Like a labelling pipeline: every answer (``X-Request-Id`` and the request body, whose true
    label :func:`~loadtest.fake_model.true_label` derives) becomes due after a delay drawn
    uniformly from ``delay``; due labels are posted in batches of at most ``batch`` items.
    Bounded: it holds one pending label per answered request and :meth:`run` ends by itself
    at ``deadline`` (monotonic seconds) or when cancelled.
    """

    def __init__(
        self, url: str, *, delay: tuple[float, float], seed: int, batch: int = 400
    ) -> None:
        self.url = url
        self.delay = delay
        self.batch = batch  # 400 items of ~70 bytes: well inside the 64 KiB body limit
        self._rng = random.Random(seed)
        self._seq = itertools.count()
        self._due: list[tuple[float, int, str, int]] = []  # (due, seq, request id, label)
        self.posted = 0
        self.results: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()

    def add(self, rec: ResponseRecord) -> None:
        rid = rec.headers.get("X-Request-Id")
        if rid is None or rec.request_json is None:
            self.failures["no request id"] += 1
            return
        due = time.monotonic() + self._rng.uniform(*self.delay)
        heapq.heappush(self._due, (due, next(self._seq), rid, true_label(rec.request_json)))

    @property
    def pending(self) -> int:
        return len(self._due)

    async def run(self, client: httpx.AsyncClient, deadline: float) -> None:
        due = self._due
        while time.monotonic() < deadline:
            now = time.monotonic()
            items: list[dict[str, Any]] = []
            while due and due[0][0] <= now and len(items) < self.batch:
                _, _, rid, label = heapq.heappop(due)
                items.append({"request_id": rid, "label": label})
            if not items:
                await asyncio.sleep(0.2)
                continue
            try:
                r = await client.post(self.url, json=items)
            except httpx.HTTPError as exc:
                self.failures[type(exc).__name__] += 1
                continue
            if r.status_code != 200:
                self.failures[f"HTTP {r.status_code}"] += 1
                continue
            self.posted += len(items)
            self.results.update({k: v for k, v in r.json()["results"].items() if v})

    def summary(self) -> str:
        results = ", ".join(f"{k} {v}" for k, v in sorted(self.results.items())) or "none"
        failed = ", ".join(f"{k} {v}" for k, v in sorted(self.failures.items()))
        tail = f"; FAILED posts: {failed}" if failed else ""
        return f"{self.posted} posted ({results}); {self.pending} not yet due{tail}"


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def dead_url() -> str:
    """A loopback URL where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- progress display -----------------------------------------------------------------------


def format_metric(m: Mapping[str, Any]) -> str:
    """``name VERDICT [lower, upper]`` with ratios as percent changes and rates in pp."""
    lo, hi = m.get("lower"), m.get("upper")
    if m.get("kind") == "net_value":
        unit, scale, offset, digits = "", 1.0, 0.0, 2
    elif m.get("relative"):
        unit, scale, offset, digits = "%", 100.0, 1.0, 1
    elif m.get("kind") in ("error_rate", "rate") or m.get("name") == "accuracy":
        # Rates, and the scenarios' accuracy (a mean of 0/1 with a pp margin), read best in pp.
        unit, scale, offset, digits = "pp", 100.0, 0.0, 2
    else:
        unit, scale, offset, digits = "", 1.0, 0.0, 4

    def num(v: float | None, side: str) -> str:
        if v is None or not math.isfinite(v):
            return f"{side}inf"
        x = round((v - offset) * scale, digits) + 0.0  # + 0.0: no "-0.0"
        return f"{x:+.{digits}f}{unit}"

    return f"{m['name']} {m['verdict']} [{num(lo, '-')}, {num(hi, '+')}]"


def format_status(detail: Mapping[str, Any], elapsed: float) -> str:
    """Progress: elapsed, phase, step, weights, samples; then each metric's verdict."""
    w = detail["weights"]
    s = detail["samples"]
    step = f"step {detail['step_index'] + 1}/{detail['steps']}"
    split = "shadow" if detail.get("shadow") else f"{w['candidate']:g}% candidate"
    line = (
        f"[{elapsed:6.1f}s] {detail['phase']:<8} {step} ({split})  "
        f"samples production {s['production']}, candidate {s['candidate']}"
    )
    results = [format_metric(m) for m in detail.get("metrics", [])]
    net = detail.get("net_value")
    if net:
        results.append(format_metric(net))
    return line + ("\n" + " " * 10 + "  ".join(results) if results else "")


def format_decision(entry: Mapping[str, Any], elapsed: float) -> str:
    samples = entry.get("samples", {})
    return (
        f"[{elapsed:6.1f}s] >> {entry['action']} (n={samples.get('production', 0)}/"
        f"{samples.get('candidate', 0)}): {entry['reason']}"
    )


class Watcher:
    """Polls a rollout's detail and prints new decisions and a status line once a second."""

    def __init__(self, fetch: Callable[[], Awaitable[dict[str, Any]]], out: TextIO) -> None:
        self.fetch = fetch
        self.out = out
        self.seen_at: float = -math.inf
        self.last_print = -math.inf
        self.detail: dict[str, Any] = {}

    async def poll(self, origin: float | None) -> dict[str, Any]:
        detail = await self.fetch()
        self.detail = detail
        now = time.time()
        base = origin if origin is not None else now
        for entry in detail.get("decisions", []):
            at = float(entry.get("at", 0.0))
            if at > self.seen_at and entry.get("action") != "START":
                print(format_decision(entry, at - base), file=self.out, flush=True)
            self.seen_at = max(self.seen_at, at)
        if now - self.last_print >= 1.0:
            self.last_print = now
            print(format_status(detail, now - base), file=self.out, flush=True)
        return detail


def _terminal_entry(detail: Mapping[str, Any]) -> dict[str, Any] | None:
    for entry in reversed(detail.get("decisions", [])):
        if entry.get("action") in ("PROMOTE", "ROLLBACK"):
            return dict(entry)
    return None


def _finish(
    sc: Scenario,
    detail: Mapping[str, Any],
    traffic: Traffic,
    seed: int,
) -> Result:
    """Build the result from the rollout's final detail; check the expected outcome."""
    phase = detail.get("phase", "?")
    entry = _terminal_entry(detail) if phase in TERMINAL else None
    samples = (entry or detail).get("samples", {"production": 0, "candidate": 0})
    decision_time = None
    if entry is not None and traffic.first_sent is not None:
        decision_time = float(entry["at"]) - traffic.first_sent
    outcome = phase if phase in TERMINAL else f"no decision ({phase})"
    result = Result(
        name=sc.name,
        expected=sc.expect,
        outcome=outcome,
        decision_time=decision_time,
        candidate_requests=int(samples.get("candidate", 0)),
        total_requests=int(samples.get("production", 0)) + int(samples.get("candidate", 0)),
        sent=traffic.sent,
        reason=(entry or {}).get("reason") or detail.get("status", ""),
        user_errors=dict(traffic.errors),
        seed=seed,
    )
    if sc.expect == "not_rolled_back":
        if outcome == "rolled_back":
            result.problems.append(f"outcome {outcome}, expected no rollback")
    elif outcome != sc.expect:
        result.problems.append(f"outcome {outcome}, expected {sc.expect}")
    elif sc.expect_reason is not None and not result.reason.startswith(sc.expect_reason):
        result.problems.append(f"decided for another reason, expected {sc.expect_reason!r}")
    if sc.no_user_errors and traffic.errors:
        result.problems.append(f"users saw {sum(traffic.errors.values())} errors")
    return result


# -- in-process scenarios -------------------------------------------------------------------


def _seeded(cfg: FakeModelConfig, seed: int) -> FakeModelConfig:
    return replace(cfg, seed=seed)


async def _run_inprocess(
    sc: Scenario, *, seed: int, fast: bool, rate: float, out: TextIO
) -> Result:
    limit = sc.fast_time_limit if fast else sc.time_limit
    async with contextlib.AsyncExitStack() as stack:
        p_url = await stack.enter_async_context(
            running_fake_model(_seeded(sc.production, 2 * seed + 1))
        )
        candidate_stack = contextlib.AsyncExitStack()
        stack.push_async_callback(candidate_stack.aclose)
        if sc.candidate_down_at == 0.0:
            c_url = dead_url()
        else:
            c_url = await candidate_stack.enter_async_context(
                running_fake_model(_seeded(sc.candidate, 2 * seed + 2))
            )
        config = load_config_text(yaml.safe_dump(sc.rollout(p_url, c_url)), f"scenario {sc.name}")
        runtime = Runtime(config)
        await runtime.start()
        stack.push_async_callback(runtime.stop)
        path = "/v1/chat/completions" if sc.chat else "/predict"
        proxy = f"http://127.0.0.1:{runtime.proxy_port}{path}"
        poster: LabelPoster | None = None
        if sc.kind == "feedback":
            poster = LabelPoster(
                f"http://127.0.0.1:{runtime.admin_port}/api/v1/feedback",
                delay=sc.label_delay,
                seed=seed,
            )
        traffic = Traffic(
            proxy,
            rate=rate,
            duration=limit,
            requests=int(rate * limit * 1.2) + 1,
            seed=seed,
            on_answer=poster.add if poster is not None else None,
            chat=sc.chat,
            users=sc.users,
        )
        stack.push_async_callback(traffic.stop)
        if poster is not None:
            client = await stack.enter_async_context(httpx.AsyncClient(timeout=10.0))
            deadline = time.monotonic() + limit + sc.label_delay[1] + 5.0
            labelling = asyncio.get_running_loop().create_task(poster.run(client, deadline))
            stack.push_async_callback(_cancel, labelling)

        async def fetch() -> dict[str, Any]:
            return rollout_detail(runtime.controller.view(ROLLOUT))

        watcher = Watcher(fetch, out)
        down_at: float | None = None
        stopping: asyncio.Task[None] | None = None
        traffic.start()
        started = time.monotonic()
        while True:
            detail = await watcher.poll(traffic.first_sent)
            if detail["phase"] in TERMINAL or traffic.done:
                break
            elapsed = time.monotonic() - started
            if elapsed > limit + 2.0:
                break
            if sc.candidate_down_at is not None and down_at is None:
                if sc.candidate_down_at == 0.0:
                    down_at = traffic.first_sent
                elif (
                    traffic.first_sent is not None
                    and time.time() - traffic.first_sent >= sc.candidate_down_at
                ):
                    down_at = time.time()
                    print(
                        f"[{down_at - traffic.first_sent:6.1f}s] !! stopping the candidate server",
                        file=out,
                        flush=True,
                    )
                    stopping = asyncio.get_running_loop().create_task(candidate_stack.aclose())
            await asyncio.sleep(0.1)
        await traffic.stop()
        if stopping is not None:
            await stopping
        result = _finish(sc, watcher.detail, traffic, seed)
        if poster is not None:
            result.extra["labels"] = poster.summary()
            if poster.failures:
                result.problems.append(f"label posts failed: {dict(poster.failures)}")
        entry = _terminal_entry(watcher.detail)
        if sc.candidate_down_at is not None:
            if down_at is not None and entry is not None:
                down_to = float(entry["at"]) - down_at
                result.extra["down->decision"] = f"{down_to:.2f} s"
                result.extra["_down_to_decision"] = down_to
                if sc.max_down_to_decision is not None and down_to > sc.max_down_to_decision:
                    result.problems.append(
                        f"decided {down_to:.1f} s after the candidate went down "
                        f"(limit {sc.max_down_to_decision:g} s)"
                    )
            elif sc.max_down_to_decision is not None:
                result.problems.append("no decision after the candidate went down")
        return result


# -- restart scenario -----------------------------------------------------------------------


def _group_members(pgid: int) -> list[str]:
    """``"pid command"`` of each live process in process group ``pgid`` (Linux /proc)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid or fields[0] == "Z":
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        members.append(f"{entry.name} {cmd.strip()[:100]}")
    return members


_RESUMED = re.compile(r"resumed (\w+) at step (\d+)/(\d+) with (\d+)/(\d+) samples")
FLUSH_SECONDS = 0.25


class _CanaryProcess:
    """``python -m canary run -c FILE`` as a child process with its log in a file.

    Each start gets its own process group, so that whatever a killed canary leaves behind
    (helper processes of its own) can be found, reported and stopped at the end.
    """

    def __init__(self, config_path: Path, log_path: Path, admin: str) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.admin = admin
        self.proc: subprocess.Popen[bytes] | None = None
        self.groups: list[int] = []

    def start(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "canary", "run", "-c", str(self.config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.groups.append(self.proc.pid)

    async def wait_ready(self, client: httpx.AsyncClient, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"canary exited early; log:\n{self.log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(self.admin + "/readyz")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("canary did not become ready")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        """A crash: SIGKILL the canary process itself (not its group)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def reap_groups(self, grace: float = 2.0) -> dict[int, list[str]]:
        """Stop every process left in the groups of canaries that have exited.

        Returns the leftovers per group (pid and command line) found after ``grace`` seconds.
        """
        deadline = time.monotonic() + grace
        left: dict[int, list[str]] = {}
        for pgid in self.groups:
            if self.proc is not None and pgid == self.proc.pid and self.proc.poll() is None:
                continue  # still running: not ours to reap yet
            while (procs := _group_members(pgid)) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if procs:
                left[pgid] = procs
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
        self.groups = [g for g in self.groups if g not in left and _group_members(g)]
        return left

    async def stop(self) -> dict[int, list[str]]:
        """Stop the running canary (SIGTERM) and reap every group; return the leftovers."""
        self.terminate()
        return await self.reap_groups()

    def resumed(self) -> tuple[int, int, int] | None:
        """(step index, production, candidate samples) from the last "resumed" log line."""
        found = _RESUMED.findall(self.log_path.read_text(errors="replace"))
        if not found:
            return None
        _, step, _, prod, cand = found[-1]
        return int(step) - 1, int(prod), int(cand)


async def _run_restart(sc: Scenario, *, seed: int, fast: bool, rate: float, out: TextIO) -> Result:
    limit = sc.fast_time_limit if fast else sc.time_limit
    kill_after = 150  # candidate requests into step 2: well inside it, far from its end
    with tempfile.TemporaryDirectory(prefix="canary-restart-") as tmp:
        tmpdir = Path(tmp)
        async with contextlib.AsyncExitStack() as stack:
            p_url = await stack.enter_async_context(
                running_fake_model(_seeded(sc.production, 2 * seed + 1))
            )
            c_url = await stack.enter_async_context(
                running_fake_model(_seeded(sc.candidate, 2 * seed + 2))
            )
            proxy_port, admin_port = free_port(), free_port()
            config = sc.rollout(p_url, c_url)
            config["proxy"]["listen"] = f"127.0.0.1:{proxy_port}"
            config["admin"]["listen"] = f"127.0.0.1:{admin_port}"
            config["state"] = {"backend": "sqlite", "path": str(tmpdir / "state.db")}
            config_path = tmpdir / "rollout.yaml"
            config_path.write_text(yaml.safe_dump(config))
            load_config_text(config_path.read_text())  # fail here, not in the child
            admin = f"http://127.0.0.1:{admin_port}"
            canary = _CanaryProcess(config_path, tmpdir / "canary.log", admin)
            stack.push_async_callback(canary.stop)
            client = await stack.enter_async_context(httpx.AsyncClient(timeout=5.0))
            canary.start()
            await canary.wait_ready(client)
            traffic = Traffic(
                f"http://127.0.0.1:{proxy_port}/predict",
                rate=rate,
                duration=limit,
                requests=int(rate * limit * 1.2) + 1,
                seed=seed,
            )
            stack.push_async_callback(traffic.stop)

            async def fetch() -> dict[str, Any]:
                r = await client.get(f"{admin}/api/v1/rollouts/{ROLLOUT}")
                r.raise_for_status()
                data: dict[str, Any] = r.json()
                return data

            watcher = Watcher(fetch, out)
            traffic.start()
            started = time.monotonic()
            before: dict[str, Any] | None = None
            killed_at = ready_at = None
            answered_at_kill = 0
            resumed: tuple[int, int, int] | None = None
            after: dict[str, Any] | None = None
            problems: list[str] = []
            detail: dict[str, Any] = {}
            while time.monotonic() - started < limit + 2.0 and not traffic.done:
                try:
                    detail = await watcher.poll(traffic.first_sent)
                except httpx.HTTPError:
                    await asyncio.sleep(0.05)
                    continue
                if detail["phase"] in TERMINAL:
                    break
                if (
                    killed_at is None
                    and detail["step_index"] == 1
                    and detail["step_samples"] >= kill_after
                ):
                    before = detail
                    canary.kill()
                    killed_at = time.time()
                    answered_at_kill = traffic.answered["candidate"]
                    t0 = traffic.first_sent or killed_at
                    print(
                        f"[{killed_at - t0:6.1f}s] !! SIGKILL canary at step 2/3 with "
                        f"{before['samples']['production']}/{before['samples']['candidate']} "
                        "samples; starting it again",
                        file=out,
                        flush=True,
                    )
                    canary.start()
                    await canary.wait_ready(client)
                    ready_at = time.time()
                    resumed = canary.resumed()
                    after = await fetch()
                    print(
                        f"[{ready_at - t0:6.1f}s] !! canary is back after "
                        f"{ready_at - killed_at:.2f} s: {after['phase']} at step "
                        f"{after['step_index'] + 1}/{after['steps']} (log: resumed with "
                        f"{resumed[1] if resumed else '?'}/{resumed[2] if resumed else '?'} "
                        "samples)",
                        file=out,
                        flush=True,
                    )
                    continue
                await asyncio.sleep(0.1)
            await traffic.stop()
            leftovers = await canary.stop()
            result = _finish(sc, watcher.detail or detail, traffic, seed)
            if leftovers:
                # Not a wrong outcome, but a crashed canary must not leave processes behind.
                procs = [p for group in leftovers.values() for p in group]
                result.extra["_leftovers"] = len(procs)
                result.extra["LEFTOVERS"] = (
                    f"{len(procs)} processes of exited canaries were still running (now "
                    "killed): " + "; ".join(procs)
                )
            if before is None or after is None or killed_at is None or ready_at is None:
                result.problems.append("the rollout never reached step 2 to be restarted")
                return result
            cand_rate = rate * float(before["weights"]["candidate"]) / 100.0
            if after["step_index"] != before["step_index"] or after["phase"] != "running":
                problems.append(
                    f"resumed {after['phase']} at step {after['step_index'] + 1}, expected running "
                    f"at step {before['step_index'] + 1}"
                )
            restored = resumed[2] if resumed is not None else after["samples"]["candidate"]
            if resumed is not None and resumed[0] != before["step_index"]:
                problems.append(f"log says resumed at step {resumed[0] + 1}")
            if restored < before["samples"]["candidate"]:
                problems.append(
                    f"restored {restored} candidate samples, fewer than the "
                    f"{before['samples']['candidate']} flushed before the kill"
                )
            lost = max(0, answered_at_kill - restored)
            # Unflushed deltas (<= one flush interval) plus the requests in flight at the kill.
            allowed = math.ceil(cand_rate * 2 * FLUSH_SECONDS) + 10
            if lost > allowed:
                problems.append(f"lost {lost} candidate samples (allowed {allowed})")
            down_errors = traffic.errors_between(killed_at - 0.1, ready_at + 0.5)
            other = Counter(traffic.errors)
            other.subtract(down_errors)
            other_errors = {k: v for k, v in other.items() if v > 0}
            if other_errors:
                problems.append(f"users saw errors outside the restart window: {other_errors}")
            result.extra["restart"] = (
                f"down {ready_at - killed_at:.2f} s; resumed at step {after['step_index'] + 1}/"
                f"{after['steps']} with {restored} candidate samples (had "
                f"{before['samples']['candidate']} flushed, {answered_at_kill} answered: "
                f"{lost} lost, ~{lost / cand_rate * 1000 if cand_rate else 0:.0f} ms)"
            )
            result.extra["restart errors"] = (
                ", ".join(f"{k}={v}" for k, v in sorted(down_errors.items()))
                or "none (traffic kept flowing into the dead port)"
            )
            result.extra["_lost"] = lost
            result.extra["_restart_errors"] = sum(down_errors.values())
            result.problems.extend(problems)
            if result.problems:
                tail = canary.log_path.read_text(errors="replace").splitlines()[-20:]
                print("  canary's log (last lines):", *tail, sep="\n    ", file=out)
            return result


# -- running --------------------------------------------------------------------------------


async def run_scenario(
    sc: Scenario,
    *,
    seed: int = 0,
    fast: bool = False,
    rate: float | None = None,
    out: TextIO = sys.stdout,
) -> Result:
    """Run one scenario to its end and return the checked result (``rate`` overrides)."""
    limit = sc.fast_time_limit if fast else sc.time_limit
    rate = rate or sc.rate
    print(
        f"== {sc.name}: {sc.title}; expect {sc.expect} (seed {seed}, {rate:g} req/s, "
        f"limit {limit:g} s)",
        file=out,
        flush=True,
    )
    runner = _run_restart if sc.kind == "restart" else _run_inprocess
    result = await runner(sc, seed=seed, fast=fast, rate=rate, out=out)
    print(result.format(), file=out, flush=True)
    return result


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summary_table(results: Sequence[Result]) -> str:
    """One row per scenario: outcomes and medians over its repeats."""
    by_name: dict[str, list[Result]] = {}
    for r in results:
        by_name.setdefault(r.name, []).append(r)
    header = (
        f"{'scenario':<16} {'expected':<12} {'outcomes':<22} {'decision s':>10} "
        f"{'cand req':>9} {'total req':>9} {'user err':>8}  note"
    )
    rows = [header, "-" * len(header)]
    for name, runs in by_name.items():
        outcomes = Counter(r.outcome for r in runs)
        shown = ", ".join(f"{k} {v}/{len(runs)}" for k, v in outcomes.items())
        times = [r.decision_time for r in runs if r.decision_time is not None]
        med_t = _median(times)
        med_c = _median([r.candidate_requests for r in runs])
        med_n = _median([r.total_requests for r in runs])
        errs = sum(sum(r.user_errors.values()) for r in runs)
        note = ""
        downs = [r.extra["_down_to_decision"] for r in runs if "_down_to_decision" in r.extra]
        if downs:
            note = f"down->decision median {statistics.median(downs):.2f} s"
        losts = [r.extra["_lost"] for r in runs if "_lost" in r.extra]
        if losts:
            note = (
                f"resumed at the same step; samples lost median {statistics.median(losts):g}; "
                "user errors all while the one canary process was down"
            )
        leaked = sum(r.extra.get("_leftovers", 0) for r in runs)
        if leaked:
            note += f"; {leaked} processes left behind by SIGKILLed canaries"
        failed = sum(not r.ok for r in runs)
        if failed:
            note = (note + f"; {failed} FAILED").lstrip("; ")
        rows.append(
            f"{name:<16} {runs[0].expected:<12} {shown:<22} "
            f"{'-' if med_t is None else f'{med_t:.1f}':>10} "
            f"{'-' if med_c is None else f'{med_c:.0f}':>9} "
            f"{'-' if med_n is None else f'{med_n:.0f}':>9} {errs:>8}  {note}"
        )
    return "\n".join(rows)


async def run_many(
    names: Sequence[str],
    *,
    repeat: int,
    seed: int,
    fast: bool,
    rate: float | None,
    out: TextIO,
) -> list[Result]:
    results = []
    for r in range(repeat):
        for name in names:
            results.append(
                await run_scenario(SCENARIOS[name], seed=seed + r, fast=fast, rate=rate, out=out)
            )
            print(file=out, flush=True)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.scenarios",
        description="End-to-end canary rollout scenarios on loopback; exit 1 on a wrong outcome.",
    )
    parser.add_argument("--fast", action="store_true", help="the CI subset with small bounds")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", choices=sorted(SCENARIOS), help="these scenarios"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario (seeds S..)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rate", type=float, help="requests per second for every scenario (default: its own)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.repeat <= 100:
        parser.error(f"--repeat must be within 1..100, got {args.repeat}")
    if args.rate is not None and not 20 <= args.rate <= 2000:
        parser.error(f"--rate must be within 20..2000, got {args.rate}")
    names = args.only or [n for n, s in SCENARIOS.items() if (s.fast if args.fast else s.default)]
    # Decisions are printed by the scenarios themselves; keep canary's own log to warnings.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        results = runner.run(
            run_many(
                names,
                repeat=args.repeat,
                seed=args.seed,
                fast=args.fast,
                rate=args.rate,
                out=sys.stdout,
            )
        )
    print(summary_table(results))
    failed = [r for r in results if not r.ok]
    verdict = (
        f"{len(failed)} FAILED: " + ", ".join(sorted({r.name for r in failed}))
        if failed
        else "every outcome as expected"
    )
    print(f"\n{len(results)} run(s) in {time.monotonic() - started:.0f} s; {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
