"""Simulations of production-like traffic against canary's statistics.

``loadtest.stats_sim`` checks the tests on independent requests. Production traffic is not
that (DESIGN.md, "The unit of inference"): with sticky routing the randomised unit is the
user, and users differ persistently (latency level, error propensity, accuracy); latency and
error rates drift over the day while the weights step 5% -> 25% -> 50%. This module simulates
such traffic and feeds the resulting per-stratum, per-cluster aggregates, exactly as the
accumulators keep them (log-bucket histograms at the accumulators' accuracy, coarse cluster
histograms, 64 clusters by a hash of the user independent of the arm), to the tests the
analysis runs (``proportion_test``, ``stratified_quantile_test``, ``mean_test``), evaluated
at every checkpoint (the controller's analysis interval).

For each condition and metric it reports, over independent runs, the share with a false
verdict and its binomial (Wilson) 95% interval:

- A/A (the arms identical): **false rollback** = WORSE at any check, at the usual margin
  (+10% latency, +0.5pp errors, -1pp accuracy) and at margin 0;
- candidate exactly at the margin: **false promotion** = OK at any check.

::

    python -m loadtest.traffic_sim --fast          # CI form: few runs, a few conditions
    python -m loadtest.traffic_sim --runs 1000 --write-docs   # docs/traffic-simulation.md

Traffic only in memory: nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import ndtri as _ndtri

from canary.observe import CLUSTERS, COARSE_SHIFT
from canary.observe.histogram import DEFAULT_RELATIVE_ACCURACY
from canary.stats import (
    ArmClusters,
    ArmMoments,
    ClusterHistogram,
    Direction,
    HistogramArrays,
    StratifiedHistogram,
    distribution_test,
    error_test,
    mean_test,
    proportion_test,
    quantile_test,
    rate_test,
    stratified_quantile_test,
)

GAMMA = (1 + DEFAULT_RELATIVE_ACCURACY) / (1 - DEFAULT_RELATIVE_ACCURACY)
LOG_GAMMA = math.log(GAMMA)
ALPHA = 0.05


@dataclass(frozen=True)
class Condition:
    """One kind of traffic.

    Attributes
    ----------
    users
        Distinct users (0: every request is its own unit, routed at random).
    heavy
        Sigma of the lognormal activity of users (0: all equally active; 2: a few users send
        most requests).
    user_latency, user_error, user_accuracy
        Persistent per-user effects: sd of the log-latency offset, of the logit error offset,
        of the logit accuracy offset.
    drift_phi, drift_sd
        AR(1) drift of log latency shared by both arms, per 100 requests.
    trend
        Latency multiplier reached at the end of the run (1: none), both arms.
    steps
        (fraction of the run, candidate weight %) of each step.
    requests, check_every
        Requests per run and requests between two analyses.
    effect
        Candidate latency multiplier and error-rate difference and accuracy difference (the
        null at the margin when set to the margins).
    label_right, label_wrong, count_at
        Delayed labels: a right answer's label comes after a delay uniform in ``[0,
        label_right]`` requests, a wrong one's in ``[0, label_wrong]`` (0 and 0: with the
        answer). ``count_at`` as ``feedback.count_at``: ``maturity`` records a label when its
        answer is as old as the longer bound (the ``ttl``), ``arrival`` when it comes.
    """

    name: str
    users: int = 0
    heavy: float = 0.0
    user_latency: float = 0.0
    user_error: float = 0.0
    user_accuracy: float = 0.0
    drift_phi: float = 0.0
    drift_sd: float = 0.0
    trend: float = 1.0
    steps: tuple[tuple[float, float], ...] = ((1.0, 5.0),)
    requests: int = 40_000
    check_every: int = 1_000
    latency_effect: float = 1.0
    error_effect: float = 0.0
    accuracy_effect: float = 0.0
    base_error: float = 0.01
    base_accuracy: float = 0.9
    latency_sigma: float = 0.5
    stop_when_decided: bool = False
    metrics: tuple[str, ...] = ()  # only these metrics (all when empty)
    fixed_n: float = 0.0  # candidate samples of a fixed-sample z-test at 80% power
    label_right: int = 0
    label_wrong: int = 0
    count_at: str = "maturity"
    burst: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 0.0)
    local_effect: tuple[float, float, float] = (0.0, 0.0, 1.0)
    """(lower, upper, factor): candidate latency whose own noise quantile lies in [lower,
    upper] is multiplied by factor, a regression in one part of the distribution only."""
    """(start, length) as fractions of the run, latency multiplier and error rate added, on
    both arms: an incident that hits one period only."""


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "mean" | "quantile" | "errors" | "accuracy"
    margin: float
    relative: bool
    direction: Direction
    q: float = 0.0


METRICS = (
    Metric("latency_mean", "mean", 0.10, True, Direction.INCREASE),
    Metric("latency_p50", "quantile", 0.10, True, Direction.INCREASE, 0.5),
    Metric("latency_p95", "quantile", 0.10, True, Direction.INCREASE, 0.95),
    Metric("latency_dist", "distribution", 0.10, True, Direction.INCREASE),
    Metric("errors", "errors", 0.005, False, Direction.INCREASE),
    Metric("accuracy", "accuracy", 0.01, False, Direction.DECREASE),
)


@dataclass
class Tally:
    """Runs with a false verdict per metric and margin."""

    runs: int = 0
    worse: dict[str, int] = field(default_factory=dict)  # at the usual margin
    worse0: dict[str, int] = field(default_factory=dict)  # at margin 0
    ok: dict[str, int] = field(default_factory=dict)  # OK at the usual margin
    # candidate samples at the first WORSE at margin 0, one per run (inf: never): power
    decided: dict[str, list[float]] = field(default_factory=dict)

    def add(self, other: Tally) -> None:
        self.runs += other.runs
        for name, samples in other.decided.items():
            self.decided.setdefault(name, []).extend(samples)
        for mine, theirs in ((self.worse, other.worse), (self.worse0, other.worse0),
                             (self.ok, other.ok)):  # fmt: skip
            for k, count in theirs.items():
                mine[k] = mine.get(k, 0) + count


def _weights(cond: Condition, n: int) -> np.ndarray:
    """Candidate weight (fraction) of every request."""
    w = np.empty(n)
    start = 0
    total = sum(f for f, _ in cond.steps)
    for i, (frac, weight) in enumerate(cond.steps):
        end = n if i == len(cond.steps) - 1 else start + round(n * frac / total)
        w[start:end] = weight / 100.0
        start = end
    return w


def _drift(cond: Condition, n: int, rng: np.random.Generator) -> np.ndarray:
    """Shared log-latency level of every request (AR(1) per 100 requests and a trend)."""
    level = np.zeros(n)
    if cond.drift_sd > 0:
        blocks = n // 100 + 1
        e = rng.normal(0.0, cond.drift_sd * math.sqrt(1 - cond.drift_phi**2), blocks)
        x = np.empty(blocks)
        x[0] = rng.normal(0.0, cond.drift_sd)
        for i in range(1, blocks):
            x[i] = cond.drift_phi * x[i - 1] + e[i]
        level += np.repeat(x, 100)[:n]
    if cond.trend != 1.0:
        level += np.linspace(0.0, math.log(cond.trend), n)
    start, length, factor, _ = cond.burst
    if length:
        level[int(start * n) : int((start + length) * n)] += math.log(factor)
    return level


def simulate_run(
    cond: Condition, seed: int, metrics: tuple[Metric, ...] = METRICS, legacy: bool = False
) -> Tally:
    """One run: generate the traffic, analyse it at every checkpoint, tally false verdicts.

    ``legacy`` runs the request-level tests canary used before (pooled histograms, the
    conditional-binomial error test, per-arm rate sequences, no clusters) on the same data.
    """
    rng = np.random.default_rng(seed)
    n = cond.requests
    weight = _weights(cond, n)
    if cond.users > 0:
        activity = rng.lognormal(0.0, cond.heavy, cond.users) if cond.heavy else None
        p = activity / activity.sum() if activity is not None else None
        user = rng.choice(cond.users, size=n, p=p)
        point = rng.random(cond.users)
        cluster_of = rng.integers(0, CLUSTERS, cond.users)
        arm_c = point[user] < weight  # sticky: a user's point against the current weight
        cluster = cluster_of[user]
        u_lat = rng.normal(0.0, cond.user_latency, cond.users)[user]
        u_err = rng.normal(0.0, cond.user_error, cond.users)[user]
        u_acc = rng.normal(0.0, cond.user_accuracy, cond.users)[user]
    else:
        arm_c = rng.random(n) < weight
        cluster = None
        u_lat = u_err = u_acc = np.zeros(n)
    level = _drift(cond, n, rng)
    noise = rng.normal(0.0, cond.latency_sigma, n)
    log_y = level + u_lat + noise + np.where(arm_c, math.log(cond.latency_effect), 0.0)
    lo_q, hi_q, factor = cond.local_effect
    if factor != 1.0:
        z_lo, z_hi = (cond.latency_sigma * float(_ndtri(q)) for q in (lo_q, hi_q))
        hit = arm_c & (noise >= z_lo) & (noise <= z_hi)
        log_y = log_y + np.where(hit, math.log(factor), 0.0)
    y = np.exp(log_y) * 0.05  # 50 ms median
    logit_e = math.log(cond.base_error / (1 - cond.base_error)) + u_err
    e_rate = 1.0 / (1.0 + np.exp(-logit_e)) + np.where(arm_c, cond.error_effect, 0.0)
    start, length, _, burst_errors = cond.burst
    if length and burst_errors:
        e_rate[int(start * n) : int((start + length) * n)] += burst_errors
    err = (rng.random(n) < np.clip(e_rate, 0.0, 1.0)).astype(float)
    logit_a = math.log(cond.base_accuracy / (1 - cond.base_accuracy)) + u_acc
    a_rate = 1.0 / (1.0 + np.exp(-logit_a)) + np.where(arm_c, cond.accuracy_effect, 0.0)
    correct = (rng.random(n) < np.clip(a_rate, 0.0, 1.0)).astype(float)
    arm_p = np.where(arm_c, weight, 1.0 - weight)  # the arm's propensity, as recorded
    fine = np.ceil(np.log(y) / LOG_GAMMA).astype(np.int64)
    agg = _Aggregates(arm_c, arm_p, fine, (y, err, correct), cluster, legacy)
    if cond.label_right or cond.label_wrong:
        agg.delay(2, _label_times(cond, correct, rng, legacy))
    seen: dict[str, set[str]] = {"worse": set(), "worse0": set(), "ok": set()}
    decided = {m.name: math.inf for m in metrics}
    for end in range(cond.check_every, n + 1, cond.check_every):
        agg.advance(end)
        for m in metrics:
            if all(m.name in v for v in seen.values()):
                continue
            res = agg.evaluate(m)
            if res is None:
                continue
            lower, upper = res
            if m.direction is Direction.DECREASE:
                tol = 1.0 - m.margin if m.relative else -m.margin
                tol0 = 1.0 if m.relative else 0.0
                flags = (upper < tol, upper < tol0, lower > tol)
            else:
                tol = 1.0 + m.margin if m.relative else m.margin
                tol0 = 1.0 if m.relative else 0.0
                flags = (lower > tol, lower > tol0, upper < tol)
            if flags[1] and m.name not in seen["worse0"]:
                decided[m.name] = float(agg.mom[0, 1, :, 0].sum())
            for key, flag in zip(("worse", "worse0", "ok"), flags, strict=True):
                if flag:
                    seen[key].add(m.name)
        if cond.stop_when_decided and all(math.isfinite(v) for v in decided.values()):
            break
    return Tally(
        runs=1,
        worse=dict.fromkeys(seen["worse"], 1),
        worse0=dict.fromkeys(seen["worse0"], 1),
        ok=dict.fromkeys(seen["ok"], 1),
        decided={k: [v] for k, v in decided.items()},
    )


def _label_times(
    cond: Condition, correct: np.ndarray, rng: np.random.Generator, legacy: bool
) -> np.ndarray:
    """When each request's label is recorded (request index; inf: never)."""
    n = correct.size
    bound = np.where(correct > 0, cond.label_right, cond.label_wrong)
    arrives = np.arange(n) + rng.random(n) * bound
    if cond.count_at == "arrival" or legacy:  # the old join recorded on arrival
        return arrives
    window = max(cond.label_right, cond.label_wrong)
    return np.where(arrives <= np.arange(n) + window, np.arange(n) + window, np.inf)


_SIGNALS = {"mean": 0, "errors": 1, "accuracy": 2}


class _Aggregates:
    """Running per-arm, per-stratum (and per-cluster) sums, as the accumulators keep them."""

    def __init__(
        self,
        arm_c: np.ndarray,
        arm_p: np.ndarray,
        fine: np.ndarray,
        values: tuple[np.ndarray, ...],
        cluster: np.ndarray | None,
        legacy: bool = False,
    ) -> None:
        self.legacy = legacy
        self.arm = arm_c.astype(np.int64)  # 0 production, 1 candidate
        rounded = np.round(arm_p, 9)
        self.keys = np.unique(rounded)
        self.sidx = np.searchsorted(self.keys, rounded)
        self.grid, self.fidx = np.unique(fine, return_inverse=True)
        self.cgrid, self.cidx = np.unique(fine >> COARSE_SHIFT, return_inverse=True)
        self.values = values
        self.cluster = cluster
        s, f, c, g = self.keys.size, self.grid.size, self.cgrid.size, CLUSTERS
        nv = len(values)
        self.mom = np.zeros((nv, 2, s, 3))
        self.hist = np.zeros((2, s, f))
        self.clus = np.zeros((nv, 2, s, g, 2))
        self.chist = np.zeros((2, s, c, g))
        self.done = 0
        # per value signal: None (recorded with the request) or (request order by recording
        # time, the sorted times, how many are recorded so far)
        self.later: list[tuple[np.ndarray, np.ndarray, int] | None] = [None] * nv

    def delay(self, i: int, times: np.ndarray) -> None:
        """Record value signal ``i`` of each request at ``times`` (request index; inf: never)."""
        order = np.argsort(times, kind="stable")
        self.later[i] = (order, times[order], 0)

    def _rows(self, i: int, end: int) -> slice | np.ndarray:
        later = self.later[i]
        if later is None:
            return slice(self.done, end)
        order, times, done = later
        upto = int(np.searchsorted(times, end, side="right"))
        self.later[i] = (order, times, upto)
        return order[done:upto]

    def advance(self, end: int) -> None:
        sl = slice(self.done, end)
        s, f, c, g = self.keys.size, self.grid.size, self.cgrid.size, CLUSTERS
        for i, v in enumerate(self.values):
            rows = self._rows(i, end)
            cell = self.arm[rows] * s + self.sidx[rows]
            vv = v[rows]
            for j, w in enumerate((None, vv, vv * vv)):
                self.mom[i, :, :, j] += np.bincount(cell, weights=w, minlength=2 * s).reshape(2, s)
            if self.cluster is not None:
                cc = cell * g + self.cluster[rows]
                self.clus[i, ..., 0] += np.bincount(cc, minlength=2 * s * g).reshape(2, s, g)
                self.clus[i, ..., 1] += np.bincount(cc, weights=vv, minlength=2 * s * g).reshape(
                    2, s, g
                )
        self.done = end
        cell = self.arm[sl] * s + self.sidx[sl]
        self.hist += np.bincount(cell * f + self.fidx[sl], minlength=2 * s * f).reshape(2, s, f)
        if self.cluster is not None:
            cl = self.cluster[sl]
            idx = (cell * c + self.cidx[sl]) * g + cl
            self.chist += np.bincount(idx, minlength=2 * s * c * g).reshape(2, s, c, g)

    def evaluate(self, m: Metric) -> tuple[float, float] | None:
        n_arm = self.mom[0, :, :, 0].sum(axis=1)
        if n_arm.min() < 100:  # the analysis burn-in
            return None
        rows = [self.mom[0, a, :, 0] > 0 for a in (0, 1)]
        if self.legacy:
            return self._legacy(m, rows)
        if m.kind in ("quantile", "distribution"):
            values = 2.0 * GAMMA ** self.grid.astype(float) / (GAMMA + 1.0)
            hists = [
                StratifiedHistogram(
                    self.keys[r], values, self.hist[a][r], DEFAULT_RELATIVE_ACCURACY
                )
                for a, r in enumerate(rows)
            ]
            cl = None
            if self.cluster is not None:
                upper = GAMMA ** (((self.cgrid + 1) << COARSE_SHIFT) - 1).astype(float)
                ch = [
                    ClusterHistogram(self.keys[r], upper, self.chist[a][r])
                    for a, r in enumerate(rows)
                ]
                cl = (ch[0], ch[1])
            if m.kind == "distribution":
                res = distribution_test(
                    hists[0], hists[1], m.margin,
                    relative=m.relative, direction=m.direction, alpha=ALPHA, burn_in=100,
                    clusters=cl,
                )  # fmt: skip
                return res.lower, res.upper
            res = stratified_quantile_test(
                hists[0], hists[1], m.q, m.margin,
                relative=m.relative, direction=m.direction, alpha=ALPHA, burn_in=100, clusters=cl,
            )  # fmt: skip
            return res.lower, res.upper
        i = _SIGNALS[m.kind]
        mom = [
            ArmMoments(self.keys[r], *(self.mom[i, a][r][:, j] for j in range(3)))
            for a, r in enumerate(rows)
        ]
        clm = None
        if self.cluster is not None:
            arms = [
                ArmClusters(self.keys[r], self.clus[i, a][r][..., 0], self.clus[i, a][r][..., 1])
                for a, r in enumerate(rows)
            ]
            clm = (arms[0], arms[1])
        test = mean_test if m.kind == "mean" else proportion_test
        res = test(
            mom[0], mom[1], m.margin,
            relative=m.relative, direction=m.direction, alpha=ALPHA, burn_in=100, clusters=clm,
        )  # fmt: skip
        return res.lower, res.upper

    def _legacy(self, m: Metric, rows: list[np.ndarray]) -> tuple[float, float] | None:
        if m.kind == "distribution":  # new: there was no old form
            return None
        kw: dict[str, Any] = {
            "relative": m.relative,
            "direction": m.direction,
            "alpha": ALPHA,
            "burn_in": 100,
        }
        if m.kind == "quantile":
            values = 2.0 * GAMMA ** self.grid.astype(float) / (GAMMA + 1.0)
            h = [self.hist[a].sum(axis=0) for a in (0, 1)]
            arrays = [
                HistogramArrays(values[c > 0], c[c > 0], DEFAULT_RELATIVE_ACCURACY) for c in h
            ]
            r = quantile_test(arrays[0], arrays[1], m.q, m.margin, **kw)
            return r.lower, r.upper
        i = _SIGNALS[m.kind]
        mom = [
            ArmMoments(self.keys[r], *(self.mom[i, a][r][:, j] for j in range(3)))
            for a, r in enumerate(rows)
        ]
        test = mean_test if m.kind == "mean" else error_test if m.kind == "errors" else rate_test
        r = test(mom[0], mom[1], m.margin, **kw)
        return r.lower, r.upper


# -- conditions ------------------------------------------------------------------------------

STEPS3 = ((1.0, 5.0), (1.0, 25.0), (1.0, 50.0))


def _het(name: str, **kw: Any) -> Condition:
    """Sticky users with persistent offsets (log-latency sd 0.5, logit error and accuracy 1)."""
    return Condition(name, user_latency=0.5, user_error=1.0, user_accuracy=1.0, **kw)


AA_CONDITIONS = (
    Condition("i.i.d. requests, 5%"),
    Condition("i.i.d. requests, steps 5/25/50", steps=STEPS3),
    _het("sticky, 200 heterogeneous users, 5%", users=200),
    _het("sticky, 500 heterogeneous users, 5%", users=500),
    _het("sticky, 500 users, steps 5/25/50", users=500, steps=STEPS3),
    _het("sticky, 2000 users, few heavy (lognormal activity s=2)", users=2000, heavy=2.0),
    _het("sticky, 5000 users, 5%", users=5000),
    _het("sticky, 100 users (about 5 on the candidate), 5%", users=100),
    Condition(
        "sticky, 300 users who differ strongly (log-latency sd 1, logit sd 1.5), 5%",
        users=300,
        user_latency=1.0,
        user_error=1.5,
        user_accuracy=1.5,
    ),
    Condition(
        "heavy-tailed latency (lognormal sigma 1.2), steps 5/25/50", latency_sigma=1.2, steps=STEPS3
    ),
    Condition(
        "latency AR(1) drift phi 0.999/req, steps 5/25/50",
        drift_phi=0.999**100,
        drift_sd=0.3,
        steps=STEPS3,
    ),
    Condition("latency x1.5 trend, steps 5/25/50", trend=1.5, steps=STEPS3),
    Condition("latency x0.67 trend, steps 5/25/50", trend=1 / 1.5, steps=STEPS3),
    Condition(
        "operator weight change mid-step: 5 -> 40 -> 10",
        trend=1.5,
        steps=((1.0, 5.0), (0.5, 40.0), (1.0, 10.0)),
    ),
    _het(
        "sticky 500 users + AR(1) drift, steps 5/25/50",
        users=500,
        drift_phi=0.999**100,
        drift_sd=0.3,
        steps=STEPS3,
    ),
    Condition(
        "incident: latency x3 and +20pp errors for 2% of the run, in step 2 of 5/25/50",
        burst=(0.45, 0.02, 3.0, 0.2),
        steps=STEPS3,
    ),
    Condition(
        "labels of wrong answers later (0-10000 vs 0-1000 requests), steps 5/25/50",
        label_right=1000,
        label_wrong=10000,
        steps=STEPS3,
    ),
    Condition(
        "same labels, counted on arrival (count_at: arrival)",
        label_right=1000,
        label_wrong=10000,
        steps=STEPS3,
        count_at="arrival",
    ),
    _het(
        "sticky 500 users, labels of wrong answers later, steps 5/25/50",
        users=500,
        label_right=1000,
        label_wrong=10000,
        steps=STEPS3,
    ),
)

MARGIN_CONDITIONS = (
    Condition(
        "at the margin, i.i.d., 5%", latency_effect=1.10, error_effect=0.005, accuracy_effect=-0.01
    ),
    Condition(
        "at the margin, latency falling x0.67, steps",
        latency_effect=1.10,
        error_effect=0.005,
        accuracy_effect=-0.01,
        trend=1 / 1.5,
        steps=STEPS3,
    ),
    _het(
        "at the margin, sticky 500 users, 5%",
        users=500,
        latency_effect=1.10,
        error_effect=0.005,
        accuracy_effect=-0.01,
    ),
    Condition(
        "at the margin, labels of wrong answers later, steps",
        accuracy_effect=-0.01,
        label_right=1000,
        label_wrong=10000,
        steps=STEPS3,
        metrics=("accuracy",),
    ),
    Condition(
        "at the margin, same labels counted on arrival",
        accuracy_effect=-0.01,
        label_right=1000,
        label_wrong=10000,
        steps=STEPS3,
        count_at="arrival",
        metrics=("accuracy",),
    ),
)


def _fixed_n(var_c: float, var_p: float, delta: float, split: float = 0.05) -> float:
    """Candidate samples a two-sided fixed-sample z-test at level 0.05 needs for 80% power.

    ``var_c``, ``var_p`` are the per-observation variances of each arm's estimator (on the
    scale ``delta`` is on); production has ``(1 - split) / split`` times the samples.
    """
    z = 1.959964 + 0.841621
    return z * z * (var_c + var_p * split / (1 - split)) / (delta * delta)


_S = 0.5  # lognormal sigma of latency
_CV2 = math.exp(_S * _S) - 1
_Z95, _PHI95 = 1.6448536, 0.10313564  # normal quantile and density at 0.95
_PHI75 = 0.31777657  # normal density at the 0.75 quantile (z = 0.6744898)
# Relative effects are tested on the ratio, so the variance of the log ratio: for a mean,
# CV^2 per arm (delta method); for the p95 of a lognormal, s^2 q(1-q) / phi(z_q)^2.
POWER_CONDITIONS = (
    Condition("power: mean latency +10%", latency_effect=1.10, requests=40_000,
              check_every=200, stop_when_decided=True, metrics=("latency_mean",),
              fixed_n=_fixed_n(1.21 * _CV2, _CV2, 0.10)),
    Condition("power: p95 latency +10%", latency_effect=1.10, requests=120_000,
              check_every=400, stop_when_decided=True, metrics=("latency_p95",),
              fixed_n=_fixed_n(_S**2 * 0.0475 / _PHI95**2, _S**2 * 0.0475 / _PHI95**2,
                               math.log(1.10))),
    Condition("power: p65-p85 only +15% (distribution; fixed n: p75 alone)",
              local_effect=(0.65, 0.85, 1.15), requests=200_000, check_every=500,
              stop_when_decided=True, metrics=("latency_dist",),
              fixed_n=_fixed_n(_S**2 * 0.1875 / _PHI75**2, _S**2 * 0.1875 / _PHI75**2,
                               math.log(1.15))),
    Condition("power: errors 1% -> 2%", error_effect=0.01, requests=160_000, check_every=500,
              stop_when_decided=True, metrics=("errors",),
              fixed_n=_fixed_n(0.02 * 0.98, 0.01 * 0.99, 0.01)),
    Condition("power: accuracy 90% -> 88%", accuracy_effect=-0.02, requests=200_000,
              check_every=500, stop_when_decided=True, metrics=("accuracy",),
              fixed_n=_fixed_n(0.88 * 0.12, 0.9 * 0.1, 0.02)),
)  # fmt: skip

FAST = ("i.i.d. requests, steps 5/25/50", "sticky, 200 heterogeneous users, 5%",
        "latency x1.5 trend, steps 5/25/50")  # fmt: skip


def _job(args: tuple[Condition, int, int, bool]) -> Tally:
    cond, first, count, legacy = args
    total = Tally()
    for seed in range(first, first + count):
        chosen = tuple(m for m in METRICS if not cond.metrics or m.name in cond.metrics)
        total.add(simulate_run(cond, seed, chosen, legacy=legacy))
    return total


def run_condition(
    cond: Condition, runs: int, seed: int, workers: int, legacy: bool = False
) -> Tally:
    """``runs`` independent runs of ``cond`` (seeds ``seed``, ``seed + 1``, ...)."""
    chunks = max(1, min(workers * 4, runs))
    per = [runs // chunks + (1 if i < runs % chunks else 0) for i in range(chunks)]
    starts = np.cumsum([0, *per[:-1]]) + seed
    jobs = [(cond, int(s), c, legacy) for s, c in zip(starts, per, strict=True) if c]
    total = Tally()
    if workers <= 1:
        for t in map(_job, jobs):
            total.add(t)
        return total
    with ProcessPoolExecutor(workers) as pool:
        for t in pool.map(_job, jobs):
            total.add(t)
    return total


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def _fmt(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


Row = tuple[Condition, Tally, str, Tally | None]


def report(rows: list[Row], runs: int, seconds: float, argv: str) -> str:
    names = [m.name for m in METRICS]
    old_names = [m.name for m in METRICS if m.kind != "distribution"]  # had no old form
    out = [
        "# Production-like traffic: false decisions of canary's tests",
        "",
        f"Generated by `python -m loadtest.traffic_sim {argv}` "
        f"({seconds:.0f} s on this machine). Each cell: % of runs with a false verdict "
        "[Wilson 95% interval]; alpha 0.05 per test, evaluated every "
        "1,000 requests (40 analyses over 40,000 requests), burn-in 100 per arm. Latency "
        "lognormal (sigma 0.5) around 50 ms; errors 1%; accuracy 90%. Heterogeneous users "
        "have persistent offsets: log-latency sd 0.5, logit error sd 1, logit accuracy sd 1.",
        "",
        "## A/A: false rollback (WORSE at any analysis)",
        "",
        "Usual margins: latency +10%, errors +0.5pp, accuracy -1pp. Margin 0: any WORSE. "
        "*Before*: the request-level tests canary ran until this change (pooled histograms, "
        "Lindon-Malek errors, per-arm rate sequences, no clusters) on the same traffic, at "
        "the usual margin.",
        "",
        "| condition | runs | "
        + " | ".join(f"{n} (usual)" for n in names)
        + " | "
        + " | ".join(f"{n} (margin 0)" for n in names)
        + " | before: "
        + ", ".join(old_names)
        + " |",
        "|---|---|" + "---|" * (2 * len(names) + 1),
    ]
    for cond, t, kind, old in rows:
        if kind != "aa":
            continue
        cells = [_fmt(t.worse.get(n, 0), t.runs) for n in names]
        cells += [_fmt(t.worse0.get(n, 0), t.runs) for n in names]
        before = (
            ""
            if old is None
            else f"{old.runs} runs: "
            + ", ".join(f"{100 * old.worse.get(n, 0) / old.runs:.1f}" for n in old_names)
        )
        out.append(f"| {cond.name} | {t.runs} | " + " | ".join(cells) + f" | {before} |")
    out += [
        "",
        "## A/A: right promotion (OK at some analysis, usual margin)",
        "",
        "The other half of trust: the share of identical candidates each test had proven "
        "within its margin by the end of the run (40,000 requests: about 2,000 candidate "
        "samples at 5%, 11,000 with steps 5/25/50). A test that rarely gets there holds a "
        "rollout until `max_duration`.",
        "",
        "| condition | runs | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for cond, t, kind, _ in rows:
        if kind == "aa":
            cells = [f"{100 * t.ok.get(n, 0) / t.runs:.1f}" for n in names]
            out.append(f"| {cond.name} | {t.runs} | " + " | ".join(cells) + " |")
    out += [
        "",
        "## Candidate exactly at the margin: false promotion (OK at any analysis)",
        "",
        "The candidate is +10% on latency (every quantile and the mean), +0.5pp errors and "
        "-1pp accuracy: no metric may be judged OK. `latency_dist` is `stat: distribution` "
        "(p5, p10, ..., p95, p99 at once).",
        "",
        "| condition | runs | " + " | ".join(names) + " | before: " + ", ".join(old_names) + " |",
        "|---|---|" + "---|" * (len(names) + 1),
    ]
    for cond, t, kind, old in rows:
        if kind != "margin":
            continue
        ran = [n for n in names if not cond.metrics or n in cond.metrics]
        cells = [_fmt(t.ok.get(n, 0), t.runs) if n in ran else "-" for n in names]
        before = (
            ""
            if old is None
            else f"{old.runs} runs: "
            + ", ".join(f"{100 * old.ok.get(n, 0) / old.runs:.1f}" if n in ran else "-"
                        for n in old_names)
        )  # fmt: skip
        out.append(f"| {cond.name} | {t.runs} | " + " | ".join(cells) + f" | {before} |")
    return "\n".join(out) + "\n"


def median_interval(x: np.ndarray) -> tuple[float, float]:
    """Distribution-free 95% interval of the median from order statistics."""
    n = x.size
    xs = np.sort(x)
    half = 0.98 * math.sqrt(n)
    lo = max(math.floor(n / 2 - half) - 1, 0)
    hi = min(math.ceil(n / 2 + half), n - 1)
    return float(xs[lo]), float(xs[hi])


def power_report(rows: list[tuple[Condition, Tally]]) -> str:
    out = [
        "## Power: samples to a rollback of a worse candidate (5/95, margin 0)",
        "",
        "Candidate samples at the first WORSE, against the samples a fixed-sample two-sided "
        "z-test at the same alpha needs for 80% power (normal theory for these "
        "distributions). *80% decided*: the samples by which 80% of runs had rolled back.",
        "",
        "| effect | runs | fixed-sample n (80%) | median [95% CI] | median / fixed n | "
        "80% decided / fixed n | never decided |",
        "|---|---|---|---|---|---|---|",
    ]
    for cond, t in rows:
        (name,) = cond.metrics
        x = np.asarray(t.decided.get(name, []), dtype=float)
        med = float(np.median(x))
        lo, hi = median_interval(x)
        q80 = float(np.quantile(x, 0.8))
        never = float(np.mean(~np.isfinite(x)))
        out.append(
            f"| {cond.name.removeprefix('power: ')} | {x.size} | {cond.fixed_n:.0f} | "
            f"{med:.0f} [{lo:.0f}, {hi:.0f}] | {med / cond.fixed_n:.2f} | "
            f"{q80 / cond.fixed_n:.2f} | {100 * never:.1f}% |"
        )
    return "\n".join(out) + "\n"


# The rows of the issue that asked for this evidence (issue 11) run first, so that a run cut
# short still has them; the report keeps the order of the lists above.
FIRST = (
    "i.i.d. requests, 5%",
    "i.i.d. requests, steps 5/25/50",
    "sticky, 200 heterogeneous users, 5%",
    "sticky, 500 heterogeneous users, 5%",
    "latency AR(1) drift phi 0.999/req, steps 5/25/50",
    "latency x1.5 trend, steps 5/25/50",
    "labels of wrong answers later (0-10000 vs 0-1000 requests), steps 5/25/50",
    "sticky, 2000 users, few heavy (lognormal activity s=2)",
    "operator weight change mid-step: 5 -> 40 -> 10",
    "incident: latency x3 and +20pp errors for 2% of the run, in step 2 of 5/25/50",
)


class _Cache:
    """Finished rows on disk (``--cache``): a cut-short run resumes where it stopped."""

    def __init__(self, path: str) -> None:
        self.path = Path(path) if path else None
        self.data: dict[str, Any] = {}
        if self.path is not None and self.path.exists():
            self.data = json.loads(self.path.read_text())

    def get(self, key: str) -> tuple[Tally, float] | None:
        hit = self.data.get(key)
        return None if hit is None else (Tally(**hit["tally"]), float(hit["seconds"]))

    def put(self, key: str, tally: Tally, seconds: float) -> None:
        self.data[key] = {"tally": dataclasses.asdict(tally), "seconds": seconds}
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data))
            tmp.replace(self.path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--legacy-runs", type=int, default=0, help="runs of the old tests per row")
    ap.add_argument("--fast", action="store_true", help="CI form: 100 runs, 3 conditions")
    ap.add_argument("--only", default="", help="run conditions whose name contains this")
    ap.add_argument("--seed", type=int, default=20261203)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--power-runs", type=int, default=0, help="runs per power row (0: none)")
    ap.add_argument("--write-docs", action="store_true",
                    help="write docs/traffic-simulation.md (after every row: a cut-short run "
                         "leaves the rows it finished)")  # fmt: skip
    ap.add_argument("--cache", default="", help="JSON file of finished rows, to resume a run")
    args = ap.parse_args(argv)
    runs = 100 if args.fast else args.runs
    every: list[tuple[Condition, str]] = [(c, "aa") for c in AA_CONDITIONS]
    every += [(c, "margin") for c in MARGIN_CONDITIONS]
    # Seeds follow the place in the full list, so a row's figures do not depend on --only.
    seeds = {c.name: args.seed + 7919 * i for i, (c, _) in enumerate(every)}
    conds = every
    if args.fast:
        conds = [(c, k) for c, k in conds if c.name in FAST]
    if args.only:
        conds = [(c, k) for c, k in conds if args.only in c.name]
    # The rows, then the margin rows, then power, then the other conditions.
    rank = [0 if c.name in FIRST else 1 if k == "margin" else 2 for c, k in conds]
    order = sorted(range(len(conds)), key=lambda i: (rank[i], i))
    cache = _Cache(args.cache)
    done: dict[int, Row] = {}
    power_rows: list[tuple[Condition, Tally]] = []
    spent = [0.0]
    shown = " ".join(sys.argv[1:] if argv is None else argv)

    def write() -> str:
        rows = [done[i] for i in sorted(done)]
        text = report(rows, runs, spent[0], shown)
        if len(done) < len(conds):
            text += f"\n*Partial: {len(done)} of {len(conds)} rows so far.*\n"
        if power_rows:
            text += "\n" + power_report(power_rows)
        if args.write_docs:
            out = Path(__file__).resolve().parent.parent / "docs" / "traffic-simulation.md"
            out.write_text(text)
        return text

    def run_cached(cond: Condition, n: int, seed: int, legacy: bool) -> Tally:
        key = f"{cond!r}|{n}|{seed}|{legacy}"
        hit = cache.get(key)
        if hit is not None:
            spent[0] += hit[1]
            return hit[0]
        t0 = time.monotonic()
        tally = run_condition(cond, n, seed, args.workers, legacy=legacy)
        seconds = time.monotonic() - t0
        cache.put(key, tally, seconds)
        spent[0] += seconds
        return tally

    def power() -> None:
        for i, cond in enumerate(POWER_CONDITIONS if args.power_runs else ()):
            t0 = time.monotonic()
            tally = run_cached(cond, args.power_runs, args.seed + 104729 * (i + 1), False)
            power_rows.append((cond, tally))
            x = np.asarray(next(iter(tally.decided.values())))
            print(f"[power {i + 1}/{len(POWER_CONDITIONS)}] {cond.name}: median "
                  f"{np.median(x) / cond.fixed_n:.2f}x fixed n in {time.monotonic() - t0:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
            write()

    for step, i in enumerate(order):
        if rank[i] == 2 and not power_rows:
            power()
        cond, kind = conds[i]
        t0 = time.monotonic()
        seed = seeds[cond.name]
        tally = run_cached(cond, runs, seed, False)
        old = run_cached(cond, args.legacy_runs, seed, True) if args.legacy_runs else None
        done[i] = (cond, tally, kind, old)
        what = tally.worse if kind == "aa" else tally.ok
        print(
            f"[{step + 1}/{len(conds)}] {cond.name}: {runs} runs in {time.monotonic() - t0:.0f} s; "
            + ", ".join(f"{m.name} {100 * what.get(m.name, 0) / runs:.1f}%" for m in METRICS),
            file=sys.stderr,
            flush=True,
        )
        write()
    if not power_rows:
        power()
    print(write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
