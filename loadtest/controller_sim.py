"""Canary's whole decision path under production-like traffic, on a virtual clock.

``loadtest.traffic_sim`` feeds simulated aggregates straight into the statistical tests. This
module sends the same kind of traffic (its model: sticky heterogeneous users, AR(1) latency
drift, trends, few heavy users; :class:`loadtest.traffic_sim.Condition`) through canary's own
parts, request by request:

- **routing**: :class:`canary.proxy.routing.ArmChooser` picks the arm of every request from
  its headers (the sticky ``X-User-Id`` header: the user's hash point and cluster) and the
  current :class:`~canary.proxy.routing.Weights`, as the proxy does;
- **recording**: one :class:`~canary.observe.Observation` per request (arm, propensity,
  cluster, status 500 with ``error="status"`` for an error) into a
  :class:`~canary.observe.Recorder`, as the proxy's ``_record`` does;
- **the controller itself**: a real :class:`canary.controller.Controller` on a
  :class:`~canary.store.memory.MemoryStore`, with its wall clock and monotonic clock injected
  (virtual time: ``RATE`` requests per second, no sleeping). Every ``analysis.interval`` the
  harness calls ``flush()`` (the recorder's deltas into the totals and the store) and
  ``evaluate()``, which runs ``analyze``, ``decide`` and ``transition`` exactly as in
  ``canary run`` (inline: no analysis process); the weight it applies reaches the chooser
  through the same sink the runtime gives it. Steps, ``min_requests``, ``min_duration``,
  ``burn_in``, the sample-ratio guard, the hard-failure guard and the alpha split are the
  controller's and the policy's own. An operator's weight change is a config reload through
  ``Controller.apply_config``, as ``canary run`` does on SIGHUP.

The rollout is a real :class:`~canary.config.RolloutConfig`, built by the config loader (so
validation applies). A run ends at promote, rollback, or the request cap. Per condition it
reports false rollbacks (A/A), false promotions (candidate exactly at the margin), each with a
Wilson 95% interval, the share promoted by the cap and the requests it took, and what the
unpromoted runs were waiting for::

    python -m loadtest.controller_sim --fast        # CI form, seconds
    python -m loadtest.controller_sim --runs 1000 --jobs 1 --write-docs
                                                    # docs/controller-simulation.md

Traffic only in memory: nothing is sent anywhere. Progress goes to stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from canary.admin.views import rollout_detail, rollout_summary
from canary.config import Config, load_config_text
from canary.controller import Controller
from canary.decision import Phase
from canary.metrics import Metrics
from canary.observe import Observation, Recorder, Weights
from canary.observe.record import ERROR_STATUS
from canary.proxy.routing import ArmChooser
from canary.signals import CANDIDATE
from canary.store.memory import MemoryStore
from loadtest.traffic_sim import Condition, _drift, median_interval, wilson

NAME = "sim"
RATE = 100.0  # requests per virtual second
INTERVAL = 10.0  # analysis.interval in seconds: an analysis every 1,000 requests
EPOCH = 1_750_000_000.0  # virtual wall clock at the start of a run
STICKY_HEADER = "X-User-Id"
MEDIAN_LATENCY = 0.05  # seconds; traffic_sim's lognormal latency around 50 ms

# The audit's metrics, and those of configs/input-health.yaml (a test pins them to the file).
P95 = {"name": "latency_p95", "signal": "latency", "stat": "p95", "max_increase": "10%"}
MEAN = {"name": "latency_mean", "signal": "latency", "stat": "mean", "max_increase": "10%"}
ERRORS = {"name": "errors", "signal": "error", "stat": "rate", "max_increase": "0.5pp"}
AUDIT_METRICS: tuple[dict[str, str], ...] = (P95, MEAN, ERRORS)
INPUT_HEALTH_METRICS: tuple[dict[str, str], ...] = (P95, ERRORS)

DEFAULT_CAP = 60_000
SEED = 20260601


@dataclass(frozen=True)
class Scenario:
    """One condition: the traffic, the rollout, and what a wrong decision is.

    Attributes
    ----------
    traffic
        traffic_sim's model. Used: ``users`` (0: i.i.d. requests routed one by one; else
        that many users, routed sticky by ``X-User-Id``), ``heavy``, ``user_latency``,
        ``user_error``, ``drift_phi``/``drift_sd``, ``trend``, ``latency_effect``,
        ``error_effect``, ``base_error``, ``latency_sigma``. Not used: its ``steps``,
        ``requests`` and ``check_every`` (the controller steps the weights here).
    kind
        ``aa`` (identical arms: any rollback is false), ``margin`` (the candidate exactly at
        the tolerances: a promotion is false, a rollback is a false WORSE too) or ``worse``
        (a clearly worse candidate: rolling back is right).
    trend_over
        Requests over which ``traffic.trend`` is reached (log-linear); flat afterwards.
    operator
        Config reloads an operator makes: (step index, share of that step's ``min_requests``
        done, new step weights); each fires once, at the first analysis that finds the
        rollout that far.
    """

    name: str
    traffic: Condition
    kind: str = "aa"
    metrics: tuple[dict[str, str], ...] = AUDIT_METRICS
    weights: tuple[float, ...] = (5.0, 25.0, 50.0)
    min_requests: int = 500
    min_duration: str = "1m"
    burn_in: int = 100
    alpha: float = 0.05
    trend_over: int = 24_000
    max_duration: str = "24h"  # beyond every cap: the cap, not on_inconclusive, ends a run
    on_inconclusive: str = "rollback"
    operator: tuple[tuple[int, float, tuple[float, ...]], ...] = ()
    cap: int = DEFAULT_CAP

    @property
    def sticky(self) -> bool:
        return self.traffic.users > 0


def rollout_document(s: Scenario, weights: Sequence[float] | None = None) -> dict[str, Any]:
    """The rollout file of a scenario (a dict of the YAML users write)."""
    rollout: dict[str, Any] = {
        "name": NAME,
        "production": {"endpoints": ["http://127.0.0.1:8001"]},
        "candidate": {"endpoints": ["http://127.0.0.1:8002"]},
        "steps": [
            {"weight": w, "min_requests": s.min_requests, "min_duration": s.min_duration}
            for w in (s.weights if weights is None else weights)
        ],
        "analysis": {
            "interval": f"{INTERVAL:g}s",
            "alpha": s.alpha,
            "burn_in": s.burn_in,
            "max_duration": s.max_duration,
            "on_inconclusive": s.on_inconclusive,
            "metrics": [dict(m) for m in s.metrics],
        },
    }
    if s.sticky:
        rollout["routing"] = {"sticky": {"header": STICKY_HEADER}}
    return {"state": {"backend": "memory"}, "rollouts": [rollout]}


def build_config(s: Scenario, weights: Sequence[float] | None = None) -> Config:
    """The scenario's rollout through canary's config loader (validation applies)."""
    text = yaml.safe_dump(rollout_document(s, weights), sort_keys=False)
    return load_config_text(text, source=f"<controller_sim: {s.name}>")


# -- traffic -----------------------------------------------------------------------------------


@dataclass
class Traffic:
    """Every request of one run, both arms' outcomes precomputed (the arm is picked live)."""

    headers: list[dict[str, str]]  # per request: the headers the chooser reads
    latency: tuple[list[float], list[float]]  # (production, candidate) seconds per request
    error: tuple[list[bool], list[bool]]


def make_traffic(s: Scenario, n: int, rng: np.random.Generator) -> Traffic:
    """``n`` requests of traffic_sim's model; both arms' answers to each, same randomness."""
    c = s.traffic
    if c.users > 0:
        activity = rng.lognormal(0.0, c.heavy, c.users) if c.heavy else None
        p = activity / activity.sum() if activity is not None else None
        user = rng.choice(c.users, size=n, p=p)
        ids = [f"{k:016x}" for k in rng.integers(0, 2**63, c.users)]
        per_user = [{STICKY_HEADER: uid} for uid in ids]
        headers = [per_user[u] for u in user.tolist()]
        u_lat = rng.normal(0.0, c.user_latency, c.users)[user]
        u_err = rng.normal(0.0, c.user_error, c.users)[user]
    else:
        none: dict[str, str] = {}
        headers = [none] * n
        u_lat = u_err = np.zeros(n)
    level = _drift(replace(c, trend=1.0), n, rng)  # AR(1) drift and bursts: traffic_sim's
    if c.trend != 1.0:
        level += np.minimum(np.arange(n) / s.trend_over, 1.0) * math.log(c.trend)
    log_y = level + u_lat + rng.normal(0.0, c.latency_sigma, n)
    y_p = np.exp(log_y) * MEDIAN_LATENCY
    y_c = y_p * c.latency_effect
    logit_e = math.log(c.base_error / (1 - c.base_error)) + u_err
    e_p = 1.0 / (1.0 + np.exp(-logit_e))
    u = rng.random(n)
    err_p = u < e_p
    err_c = u < np.clip(e_p + c.error_effect, 0.0, 1.0)
    return Traffic(headers, (y_p.tolist(), y_c.tolist()), (err_p.tolist(), err_c.tolist()))


# -- one run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How one run ended.

    ``result`` is ``promote``, ``rollback`` or ``cap`` (neither by the request cap);
    ``requests`` when it ended; ``step`` the 0-based step reached; ``by`` the metric or
    guard behind a rollback, or, at the cap, what the run was waiting for (the metrics not
    OK, comma-separated, or ``steps`` when the last step had not begun).
    """

    result: str
    requests: int
    step: int
    by: str = ""
    candidate: int = 0  # candidate observations at the end
    weights: tuple[float, ...] = ()  # the candidate weights served, in order (changes only)


class _Clock:
    def __init__(self) -> None:
        self.now = EPOCH

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now - EPOCH


def simulate_run(s: Scenario, seed: int) -> Outcome:
    """One rollout of ``s`` with seed ``seed``: traffic through routing and the controller."""
    rng = np.random.default_rng(seed)
    traffic = make_traffic(s, s.cap, rng)
    return asyncio.run(_drive(s, traffic, random.Random(seed).random))


async def _drive(s: Scenario, traffic: Traffic, rand: Callable[[], float]) -> Outcome:
    config = build_config(s)
    rollout_config = config.rollouts[0]
    clock = _Clock()
    store = MemoryStore()
    await store.open()
    recorder = Recorder([NAME])
    served: dict[str, Weights] = {}
    history: list[float] = []

    def apply_weights(rollout: str, weights: Weights) -> None:  # runtime's sink
        served[rollout] = weights
        if not history or history[-1] != weights.candidate:
            history.append(weights.candidate)

    controller = Controller(
        config,
        store,
        recorder,
        Metrics(),
        apply_weights,
        clock=clock.wall,
        monotonic=clock.monotonic,
    )
    for name, weights in (await controller.load()).items():
        apply_weights(name, weights)
    chooser = ArmChooser(rollout_config, rand)
    choose, record = chooser.choose, recorder.record
    headers, (lat_p, lat_c), (err_p, err_c) = traffic.headers, traffic.latency, traffic.error
    per = round(RATE * rollout_config.analysis.interval)
    pending_ops = list(s.operator)
    done = 0
    try:
        while done < s.cap:
            end = min(done + per, s.cap)
            weights = served[NAME]
            for i in range(done, end):  # the proxy: pick an arm, forward, record what came back
                choice = choose(headers[i], weights)
                if choice.arm == CANDIDATE:
                    latency, failed = lat_c[i], err_c[i]
                else:
                    latency, failed = lat_p[i], err_p[i]
                record(
                    Observation(
                        NAME,
                        choice.arm,
                        choice.propensity,
                        False,
                        "",
                        500 if failed else 200,
                        ERROR_STATUS if failed else None,
                        latency,
                        cluster=choice.cluster,
                    )
                )
            done = end
            clock.now = EPOCH + done / RATE
            await controller.flush()
            await controller.evaluate()
            state = controller.state(NAME)
            if state.phase.terminal:
                return _ended(controller, done, history)
            for op in list(pending_ops):
                step, share, new_weights = op
                summary = rollout_summary(controller.view(NAME))
                if state.step == step and summary["step_samples"] >= share * s.min_requests:
                    pending_ops.remove(op)
                    weights_now = await controller.apply_config(build_config(s, new_weights))
                    for name, weights in weights_now.items():
                        apply_weights(name, weights)
        return _ended(controller, done, history)
    finally:
        await controller.stop()
        await store.close()


def _ended(controller: Controller, requests: int, history: Sequence[float]) -> Outcome:
    detail = rollout_detail(controller.view(NAME))
    weights = tuple(history)
    state = controller.state(NAME)
    cand = detail["samples"]["candidate"]
    if state.phase is Phase.PROMOTED:
        return Outcome("promote", requests, state.step, "", cand, weights)
    if state.phase is Phase.ROLLED_BACK:
        last = detail["decisions"][-1]
        evidence = last.get("evidence")
        if evidence is not None:
            by = str(evidence["metric"])
        elif last["reason"].startswith("candidate failed hard"):
            by = "hard failure"
        elif last["reason"].startswith("max_duration"):
            by = "max_duration"
        else:
            by = last["reason"]
        return Outcome("rollback", requests, state.step, by, cand, weights)
    waiting = [m["name"] for m in detail["metrics"] if m["verdict"] != "OK"]
    if state.step < detail["steps"] - 1:
        waiting.insert(0, "steps")
    return Outcome("cap", requests, state.step, ",".join(waiting), cand, weights)


# -- conditions --------------------------------------------------------------------------------


def _het(name: str, **kw: Any) -> Condition:
    """Sticky users with persistent offsets: log-latency sd 0.5, logit error sd 1."""
    return Condition(name, user_latency=0.5, user_error=1.0, **kw)


AR1_PHI, AR1_SD = 0.999**100, 0.3  # traffic_sim's, per 100 requests: phi 0.999 per request
MARGIN_LATENCY, MARGIN_ERRORS = 1.10, 0.005  # the tolerances of the metrics: +10%, +0.5pp

SCENARIOS = (
    Scenario("i.i.d. requests (control)", Condition("iid")),
    Scenario(
        "i.i.d. requests, input-health metrics (p95, errors)",
        Condition("iid"),
        metrics=INPUT_HEALTH_METRICS,
    ),
    Scenario("sticky, 500 heterogeneous users", _het("sticky500", users=500)),
    Scenario(
        "sticky, 2000 users, few heavy (lognormal activity sigma 2)",
        _het("heavy", users=2000, heavy=2.0),
    ),
    Scenario(
        "latency AR(1) drift, phi 0.999/request, both arms",
        Condition("ar1", drift_phi=AR1_PHI, drift_sd=AR1_SD),
    ),
    Scenario("latency rising x1.5 over the steps", Condition("up", trend=1.5)),
    Scenario(
        "operator weight change mid-step: 5 -> 40 (step 1) -> 10 (step 2) -> 50, latency x1.5",
        Condition("operator", trend=1.5),
        operator=((0, 0.5, (40.0, 40.0, 50.0)), (1, 0.5, (10.0, 10.0, 50.0))),
    ),
    Scenario(
        "at the margin (+10% latency, +0.5pp errors), latency falling x0.67 over the steps",
        Condition(
            "margin_down",
            trend=1 / 1.5,
            latency_effect=MARGIN_LATENCY,
            error_effect=MARGIN_ERRORS,
        ),
        kind="margin",
        metrics=INPUT_HEALTH_METRICS,
    ),
    Scenario(
        "at the margin (+10% latency, +0.5pp errors), i.i.d.",
        Condition("margin_iid", latency_effect=MARGIN_LATENCY, error_effect=MARGIN_ERRORS),
        kind="margin",
        metrics=INPUT_HEALTH_METRICS,
    ),
    Scenario(
        "worse: latency x1.3 (sanity: must roll back)",
        Condition("worse", latency_effect=1.3),
        kind="worse",
    ),
)

FAST = (
    "i.i.d. requests (control)",
    "sticky, 500 heterogeneous users",
    "latency AR(1) drift, phi 0.999/request, both arms",
    "at the margin (+10% latency, +0.5pp errors), latency falling x0.67 over the steps",
    "worse: latency x1.3 (sanity: must roll back)",
)
FAST_RUNS = 6


def scenario(name: str) -> Scenario:
    (s,) = [s for s in SCENARIOS if s.name == name]
    return s


# -- many runs ---------------------------------------------------------------------------------


@dataclass
class Tally:
    """Outcomes of the runs of one scenario, in seed order."""

    scenario: Scenario
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0  # CPU time summed over the jobs

    @property
    def runs(self) -> int:
        return len(self.outcomes)

    def count(self, result: str) -> int:
        return sum(o.result == result for o in self.outcomes)

    def by(self, result: str) -> Counter[str]:
        """What ended (``rollback``) or held up (``cap``) the runs, per metric or guard."""
        out: Counter[str] = Counter()
        for o in self.outcomes:
            if o.result == result:
                out.update(o.by.split(",") if o.by else ["(none)"])
        return out

    def requests_to(self, result: str, *, every_run: bool = False) -> np.ndarray:
        """Requests at the end of the runs that ended with ``result`` (``every_run``: inf for
        the others, so that the median counts the runs that never got there)."""
        if every_run:
            return np.array([o.requests if o.result == result else math.inf for o in self.outcomes])
        return np.array([o.requests for o in self.outcomes if o.result == result], dtype=float)


def _job(args: tuple[Scenario, int, int]) -> tuple[list[Outcome], float]:
    s, first, count = args
    t0 = time.process_time()
    out = [simulate_run(s, seed) for seed in range(first, first + count)]
    return out, time.process_time() - t0


def run_scenario(
    s: Scenario,
    runs: int,
    seed: int,
    jobs: int = 1,
    progress: Callable[[int], None] | None = None,
) -> Tally:
    """``runs`` independent runs of ``s`` (seeds ``seed``, ``seed + 1``, ...)."""
    chunk = max(1, min(25, math.ceil(runs / max(1, 4 * jobs))))
    work = [
        (s, first, min(chunk, seed + runs - first)) for first in range(seed, seed + runs, chunk)
    ]
    results: dict[int, list[Outcome]] = {}
    tally = Tally(s)
    finished = 0

    def take(first: int, got: tuple[list[Outcome], float]) -> None:
        nonlocal finished
        results[first] = got[0]
        tally.seconds += got[1]
        finished += len(got[0])
        if progress is not None:
            progress(finished)

    if jobs <= 1:
        for w in work:
            take(w[1], _job(w))
    else:
        with ProcessPoolExecutor(jobs) as pool:
            futures = {pool.submit(_job, w): w[1] for w in work}
            for fut in as_completed(futures):
                take(futures[fut], fut.result())
    for first in sorted(results):
        tally.outcomes.extend(results[first])
    return tally


# -- report ------------------------------------------------------------------------------------


def _pct(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" if n else "-"


def _counts(c: Counter[str], n: int) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.most_common()) if c else "-"


def _median(x: np.ndarray, cap: int) -> str:
    """Median [95% interval]; ``> cap`` where it lies beyond the runs' end (inf: never)."""
    if x.size == 0:
        return "-"

    def show(v: float) -> str:
        return f"{v:,.0f}" if math.isfinite(v) else f"> {cap:,}"

    lo, hi = median_interval(x)
    return f"{show(float(np.median(x)))} [{show(lo)}, {show(hi)}]"


def report(tallies: Sequence[Tally], argv: str, seconds: float, jobs: int) -> str:
    """The markdown report (docs/controller-simulation.md)."""
    caps = sorted({t.scenario.cap for t in tallies})
    example = rollout_document(tallies[0].scenario if tallies else SCENARIOS[0])
    out = [
        "# Canary's whole decision path under production-like traffic",
        "",
        f"Generated by `python -m loadtest.controller_sim {argv}` ({seconds / 60:.0f} min "
        f"wall-clock with {jobs} worker process{'es' if jobs > 1 else ''} on this shared "
        "2-core machine). Each run is one rollout: every request is routed by canary's "
        "`ArmChooser` (sticky by `X-User-Id` where the condition has users), recorded as an "
        "`Observation` into a `Recorder`, and a real `Controller` (memory store, virtual "
        f"clock: {RATE:g} requests/s) flushes and evaluates every `analysis.interval` "
        f"({INTERVAL:g} s = {RATE * INTERVAL:,.0f} requests): `analyze`, `decide`, "
        "`transition`, the weight swap. A run ends at promote, rollback or the request cap "
        f"({', '.join(f'{c:,}' for c in caps)} requests). Rates in % [Wilson 95% interval].",
        "",
        "Traffic (loadtest.traffic_sim's model): latency lognormal (sigma 0.5) around 50 ms, "
        "errors 1%; heterogeneous users have persistent offsets (log-latency sd 0.5, logit "
        "error sd 1); AR(1) drift of log latency sd 0.3, phi 0.999 per request; trends are "
        "reached over the first 24,000 requests (about the three steps' minimum), flat after.",
        "",
        "The rollout (the audit's metrics; *input-health metrics* are those of "
        "`configs/input-health.yaml`: p95 and errors only). Alpha 0.05 is split over the "
        "metrics and the sample-ratio guard (Bonferroni), as `canary run` does: 0.0125 per "
        "test with three metrics, 0.0167 with two. Conditions with users add `routing: "
        "{sticky: {header: X-User-Id}}`. At 100 requests/s the first step needs about "
        "10,000 requests (500 candidate samples at 5%), the next two 6,000 each (their 1m "
        "`min_duration`), so no promotion comes before about 22,000 requests. *Fired*: the "
        "metric or guard named by the rollback decision.",
        "",
        "```yaml",
        yaml.safe_dump(example["rollouts"][0], sort_keys=False).rstrip(),
        "```",
        "",
        "## Identical arms (A/A): false rollbacks and time to promotion",
        "",
        "*Promoted by the cap*: the right decision. *Median requests to promotion*: total "
        "requests (both arms) when the controller promoted [distribution-free 95% interval], "
        "over every run (a run not promoted by the cap counts as never: `> cap`) and over the "
        "promoted runs only. "
        "*Unpromoted at the cap, waiting on*: for the runs neither promoted nor rolled back, "
        "the metrics not yet OK at the cap (`steps`: the last step had not begun), runs per "
        "metric (a run may wait on several).",
        "",
        "| condition | runs | false rollback % | fired | promoted by the cap % | median "
        "requests to promotion, every run | median, promoted runs | unpromoted at the cap, "
        "waiting on |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in tallies:
        if t.scenario.kind != "aa":
            continue
        n = t.runs
        out.append(
            f"| {t.scenario.name} | {n} | {_pct(t.count('rollback'), n)} | "
            f"{_counts(t.by('rollback'), n)} | {_pct(t.count('promote'), n)} | "
            f"{_median(t.requests_to('promote', every_run=True), t.scenario.cap)} | "
            f"{_median(t.requests_to('promote'), t.scenario.cap)} | {_counts(t.by('cap'), n)} |"
        )
    out += [
        "",
        "## Candidate exactly at the margin: false promotions",
        "",
        "The candidate is +10% on latency (every quantile) and +0.5pp on errors: exactly at "
        "the tolerances, so neither OK nor WORSE is true. A promotion is the costly error; a "
        "rollback is a false WORSE too (each bounded by the alpha of its test).",
        "",
        "| condition | runs | false promotion % | false rollback % | fired | neither by the "
        "cap % | waiting on |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in tallies:
        if t.scenario.kind != "margin":
            continue
        n = t.runs
        out.append(
            f"| {t.scenario.name} | {n} | {_pct(t.count('promote'), n)} | "
            f"{_pct(t.count('rollback'), n)} | {_counts(t.by('rollback'), n)} | "
            f"{_pct(t.count('cap'), n)} | {_counts(t.by('cap'), n)} |"
        )
    worse = [t for t in tallies if t.scenario.kind == "worse"]
    if worse:
        out += [
            "",
            "## Sanity: a worse candidate is rolled back",
            "",
            "| condition | runs | rolled back % | fired | median requests to rollback | "
            "promoted % |",
            "|---|---|---|---|---|---|",
        ]
        for t in worse:
            n = t.runs
            out.append(
                f"| {t.scenario.name} | {n} | {_pct(t.count('rollback'), n)} | "
                f"{_counts(t.by('rollback'), n)} | "
                f"{_median(t.requests_to('rollback'), t.scenario.cap)} | "
                f"{_pct(t.count('promote'), n)} |"
            )
    out += [
        "",
        "## Run times",
        "",
        "| condition | runs | CPU seconds | per run |",
        "|---|---|---|---|",
    ]
    for t in tallies:
        per = t.seconds / t.runs if t.runs else 0.0
        out.append(f"| {t.scenario.name} | {t.runs} | {t.seconds:.0f} | {per:.2f} |")
    return "\n".join(out) + "\n"


def _summary_line(t: Tally) -> str:
    n = t.runs
    parts = [f"promote {t.count('promote')}/{n}", f"rollback {t.count('rollback')}/{n}"]
    if t.count("rollback"):
        parts.append(f"({_counts(t.by('rollback'), n)})")
    parts.append(f"cap {t.count('cap')}/{n}")
    return ", ".join(parts)


def run_all(
    scenarios: Sequence[Scenario], runs: int, seed: int, jobs: int = 1, *, verbose: bool = False
) -> list[Tally]:
    """``runs`` runs of every scenario; the i-th scenario's seeds start at ``seed + 7919 i``."""
    tallies = []
    for i, s in enumerate(scenarios):
        t0 = time.monotonic()
        last = [t0]

        def progress(
            done: int, i: int = i, s: Scenario = s, t0: float = t0, last: list[float] = last
        ) -> None:
            now = time.monotonic()
            if not verbose or (done < runs and now - last[0] < 30):
                return
            last[0] = now
            print(f"  [{i + 1}/{len(scenarios)}] {s.name}: {done}/{runs} runs, "
                  f"{now - t0:.0f} s", file=sys.stderr, flush=True)  # fmt: skip

        t = run_scenario(s, runs, seed + 7919 * i, jobs, progress)
        tallies.append(t)
        if verbose:
            print(f"[{i + 1}/{len(scenarios)}] {s.name}: {runs} runs in "
                  f"{time.monotonic() - t0:.0f} s; " + _summary_line(t),
                  file=sys.stderr, flush=True)  # fmt: skip
    return tallies


def fast_scenarios(cap: int = DEFAULT_CAP) -> list[Scenario]:
    return [replace(scenario(name), cap=cap) for name in FAST]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--runs", type=int, default=1000, help="runs per condition")
    ap.add_argument("--fast", action="store_true", help=f"CI form: {FAST_RUNS} runs, 5 conditions")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (1: in this process)")
    ap.add_argument("--cap", type=int, default=DEFAULT_CAP, help="requests per run at most")
    ap.add_argument("--only", default="", help="conditions whose name contains this")
    ap.add_argument(
        "--skip",
        action="append",
        default=[],
        help="leave out conditions whose name contains this (repeatable)",
    )
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument(
        "--long-runs",
        type=int,
        default=0,
        help="then run the i.i.d. A/A conditions this many times with --long-cap",
    )
    ap.add_argument("--long-cap", type=int, default=60_000)
    ap.add_argument("--write-docs", action="store_true", help="docs/controller-simulation.md")
    args = ap.parse_args(argv)
    runs = FAST_RUNS if args.fast else args.runs
    pool = fast_scenarios(args.cap) if args.fast else [replace(s, cap=args.cap) for s in SCENARIOS]
    chosen = [s for s in pool if args.only in s.name and not any(k in s.name for k in args.skip)]
    started = time.monotonic()
    tallies = run_all(chosen, runs, args.seed, args.jobs, verbose=True)
    if args.long_runs:
        long = [
            replace(s, name=f"{s.name}, cap {args.long_cap:,}", cap=args.long_cap)
            for s in SCENARIOS
            if s.kind == "aa" and s.name.startswith("i.i.d.")
        ]
        tallies += run_all(long, args.long_runs, args.seed + 1, args.jobs, verbose=True)
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    text = report(tallies, shown, time.monotonic() - started, args.jobs)
    print(text)
    if args.write_docs:
        out = Path(__file__).resolve().parent.parent / "docs" / "controller-simulation.md"
        out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
