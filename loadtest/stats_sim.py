"""Simulation evidence for ``canary.stats``: false-decision rates, power and samples to decision.

Every run is a simulated canary: requests arrive one by one, each is assigned to the candidate
with the step's weight (5% unless stated), and the tests of ``canary.stats`` are evaluated
after every request on the accumulators at that moment (and, separately, only at the end of
each second of simulated time). Thousands of runs are simulated at once as numpy arrays:
running sums are cumulative sums over the request axis, and the statistics are computed with
the very functions the controller calls (``mean_interval``, ``variance_floor``,
``quantile_rank_bounds``, ``bernoulli_cs``, ``rate_ratio_cs``, ``verdict_codes``).

Two baselines run on the same data: a naive fixed-sample test (z-test, or the fixed-sample
order-statistic interval for quantiles) peeked at every check, and a Kayenta-like judge (a
two-sided Mann-Whitney test at 95%, "High" when significant, re-run every 10 candidate
requests). Kayenta's extra effect-size tolerance is left out.

    python -m loadtest.stats_sim --fast   # CI form, also run by tests/test_stats_simulation.py
    python -m loadtest.stats_sim --full   # >= 1000 runs per A/A row, writes docs/stats-simulation.*

Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import special
from scipy import stats as sps

from canary.stats import (
    Direction,
    allocation_log_evidence,
    bernoulli_cs,
    mean_interval,
    normal_mixture_radius,
    normal_mixture_rho2,
    quantile_rank_bounds,
    rate_ratio_cs,
    variance_floor,
    verdict_codes,
)
from canary.stats._means import DEFAULT_T_OPT
from canary.stats._quantiles import DEFAULT_QUANTILE_T_OPT
from canary.stats._rates import DEFAULT_PRIOR_SHAPE, JEFFREYS

ALPHA = 0.05
BURN_IN = 100
ACCURACY = 0.005  # histogram relative accuracy, as LogHistogram's default
Z_975 = float(sps.norm.ppf(0.975))
WORSE, OK = 1, -1
KAYENTA_EVERY = 10  # candidate requests between Mann-Whitney judgements
RATE_NORMAL, RATE_BURST = 100.0, 600.0  # requests per second, bursty scenarios
RATE_STEADY = 200.0
BURST_RUN = 3000  # mean requests per normal / burst segment
BURST_LATENCY, BURST_EVENTS = 1.6, 3.0  # multipliers during bursts (both arms)
METHODS = ("anytime", "naive", "kayenta")
INF = math.inf


@dataclass(frozen=True)
class Scenario:
    """One row of the report."""

    key: str
    title: str
    kind: str  # mean | quantile | error | rate | srm
    group: str  # aa | margin | power
    runs: int
    steps: tuple[tuple[float, int], ...]  # (candidate weight, requests) per step
    margin: float = 0.0
    relative: bool = True
    q: float = 0.95
    sigma: float = 0.5
    scale: float = 1.0  # candidate latency multiplier
    base: float = 0.01  # production error / accuracy / drop probability
    cand: float = 0.01  # candidate's
    bursty: bool = False
    fixed_n: bool = False  # also measure the fixed-sample size for 80% power

    @property
    def horizon(self) -> int:
        return sum(n for _, n in self.steps)

    @property
    def direction(self) -> Direction:
        return Direction.DECREASE if self.kind == "rate" else Direction.INCREASE

    @property
    def tolerance(self) -> float:
        sign = 1.0 if self.direction is Direction.INCREASE else -1.0
        return (1.0 if self.relative else 0.0) + sign * self.margin

    @property
    def split(self) -> str:
        if len(self.steps) == 1:
            return f"{self.steps[0][0] * 100:g}/{100 - self.steps[0][0] * 100:g}"
        return "->".join(f"{w * 100:g}%" for w, _ in self.steps)

    @property
    def max_candidate(self) -> float:
        return sum(w * n for w, n in self.steps)


@dataclass
class Outcome:
    """Per method: candidate samples at the first WORSE / OK verdict of each run (inf: never)."""

    scenario: Scenario
    worse: dict[str, np.ndarray] = field(default_factory=dict)
    ok: dict[str, np.ndarray] = field(default_factory=dict)
    worse_1s: dict[str, np.ndarray] = field(default_factory=dict)
    ok_1s: dict[str, np.ndarray] = field(default_factory=dict)
    fixed_power: np.ndarray | None = None  # (runs, n) naive WORSE at exactly n candidate samples
    seconds: float = 0.0
    note: str = ""


def steady(weight: float, candidate_samples: int) -> tuple[tuple[float, int], ...]:
    return ((weight, round(candidate_samples / weight)),)


def scenarios(form: str) -> list[Scenario]:
    """The scenario table; ``form`` is "fast" (CI) or "full" (the report)."""
    full = form == "full"
    aa_runs = 1000 if full else 300
    power_runs = 500 if full else 300
    aa = steady(0.05, 2000 if full else 1000)
    steps = ((0.05, 20000), (0.25, 8000), (0.5, 4000)) if full else ((0.05, 10000), (0.5, 4000))
    s: list[Scenario] = []

    def add(**kw: object) -> None:
        s.append(Scenario(**kw))  # type: ignore[arg-type]

    # A/A with zero margin: the null sits exactly on the tolerance, so WORSE and OK are both
    # false decisions.
    add(key="mean-aa-s05", title="mean latency, lognormal s=0.5", kind="mean", group="aa",
        runs=aa_runs, steps=aa)  # fmt: skip
    add(key="mean-aa-s10", title="mean latency, lognormal s=1.0", kind="mean", group="aa",
        runs=aa_runs, steps=aa, sigma=1.0)  # fmt: skip
    add(key="p95-aa-s05", title="p95 latency, lognormal s=0.5", kind="quantile", group="aa",
        runs=aa_runs, steps=aa)  # fmt: skip
    add(key="err-aa-abs", title="error rate 1%, absolute margin", kind="error", group="aa",
        runs=aa_runs, steps=aa, relative=False)  # fmt: skip
    add(key="acc-aa", title="accuracy 90%", kind="rate", group="aa", runs=aa_runs, steps=aa,
        relative=False, base=0.9, cand=0.9)  # fmt: skip
    add(key="srm-aa", title="SRM, both arms drop 0.5%", kind="srm", group="aa", runs=aa_runs,
        steps=aa, base=0.005, cand=0.005)  # fmt: skip
    if full:
        add(key="mean-aa-burst", title="mean latency, bursty arrivals", kind="mean",
            group="aa", runs=aa_runs, steps=aa, bursty=True)  # fmt: skip
        add(key="mean-aa-steps", title="mean latency, allocation 5->25->50%", kind="mean",
            group="aa", runs=aa_runs, steps=steps)  # fmt: skip
        add(key="p95-aa-s10", title="p95 latency, lognormal s=1.0", kind="quantile",
            group="aa", runs=aa_runs, steps=aa, sigma=1.0)  # fmt: skip
        add(key="p99-aa-s05", title="p99 latency, lognormal s=0.5", kind="quantile",
            group="aa", runs=aa_runs, steps=aa, q=0.99)  # fmt: skip
        add(key="p50-aa-s10", title="p50 latency, lognormal s=1.0", kind="quantile",
            group="aa", runs=aa_runs, steps=aa, q=0.5, sigma=1.0)  # fmt: skip
        add(key="p95-aa-burst", title="p95 latency, bursty arrivals", kind="quantile",
            group="aa", runs=aa_runs, steps=aa, bursty=True)  # fmt: skip
        add(key="p95-aa-steps", title="p95 latency, allocation 5->25->50%", kind="quantile",
            group="aa", runs=aa_runs, steps=steps)  # fmt: skip
        add(key="err-aa-rel", title="error rate 1%, relative margin", kind="error", group="aa",
            runs=aa_runs, steps=aa)  # fmt: skip
        add(key="err-aa-burst", title="error rate 1%, bursty (x3 in bursts)", kind="error",
            group="aa", runs=aa_runs, steps=aa, bursty=True)  # fmt: skip
        add(key="err-aa-steps", title="error rate 1%, allocation 5->25->50%", kind="error",
            group="aa", runs=aa_runs, steps=steps, relative=False)  # fmt: skip
        add(key="acc-aa-steps", title="accuracy 90%, allocation 5->25->50%", kind="rate",
            group="aa", runs=aa_runs, steps=steps, relative=False, base=0.9,
            cand=0.9)  # fmt: skip
        add(key="srm-aa-steps", title="SRM, allocation 5->25->50%", kind="srm", group="aa",
            runs=aa_runs, steps=steps, base=0.005, cand=0.005)  # fmt: skip
    # The null exactly at a non-zero margin: promoting is the false decision.
    add(key="mean-margin", title="mean +10%, margin 10%", kind="mean", group="margin",
        runs=aa_runs, steps=aa, scale=1.1, margin=0.10)  # fmt: skip
    add(key="p95-margin", title="p95 +10%, margin 10%", kind="quantile", group="margin",
        runs=aa_runs, steps=aa, scale=1.1, margin=0.10)  # fmt: skip
    add(key="err-margin", title="errors 1% -> 1.5%, margin 0.5pp", kind="error",
        group="margin", runs=aa_runs, steps=aa, relative=False, margin=0.005,
        cand=0.015)  # fmt: skip
    add(key="acc-margin", title="accuracy -1pp, margin 1pp", kind="rate", group="margin",
        runs=aa_runs, steps=aa, relative=False, margin=0.01, base=0.9, cand=0.89)  # fmt: skip
    # Power: a truly worse candidate; WORSE is the correct decision.
    add(key="mean-p10", title="mean latency +10%", kind="mean", group="power",
        runs=power_runs, steps=steady(0.05, 2000 if full else 1000), scale=1.1,
        fixed_n=True)  # fmt: skip
    add(key="slow-mean", title="2x slower (mean, margin 10%)", kind="mean", group="power",
        runs=power_runs, steps=steady(0.05, 400), scale=2.0, margin=0.10)  # fmt: skip
    add(key="slow-p95", title="2x slower (p95, margin 10%)", kind="quantile", group="power",
        runs=power_runs, steps=steady(0.05, 400), scale=2.0, margin=0.10)  # fmt: skip
    add(key="fail20", title="fails 20% (errors, margin 0.5pp)", kind="error", group="power",
        runs=power_runs, steps=steady(0.05, 400), relative=False, margin=0.005,
        cand=0.2)  # fmt: skip
    if full:
        add(key="mean-p05", title="mean latency +5%", kind="mean", group="power",
            runs=power_runs, steps=steady(0.05, 5000), scale=1.05)  # fmt: skip
        add(key="mean-p20", title="mean latency +20%", kind="mean", group="power",
            runs=power_runs, steps=steady(0.05, 1000), scale=1.2)  # fmt: skip
        add(key="p95-p20", title="p95 latency +20%", kind="quantile", group="power",
            runs=power_runs, steps=steady(0.05, 2000), scale=1.2)  # fmt: skip
        add(key="err-2x", title="error rate 2x (1% -> 2%)", kind="error", group="power",
            runs=power_runs, steps=steady(0.05, 4000), cand=0.02)  # fmt: skip
        add(key="acc-m1", title="accuracy -1pp (90% -> 89%)", kind="rate", group="power",
            runs=power_runs, steps=steady(0.05, 40000), relative=False, base=0.9,
            cand=0.89)  # fmt: skip
        add(key="acc-m3", title="accuracy -3pp (90% -> 87%)", kind="rate", group="power",
            runs=power_runs, steps=steady(0.05, 8000), relative=False, base=0.9,
            cand=0.87)  # fmt: skip
        add(key="srm-drop5", title="candidate drops 5% of requests", kind="srm",
            group="power", runs=power_runs, steps=steady(0.05, 1000), base=0.002,
            cand=0.05)  # fmt: skip
    return s


# --------------------------------------------------------------------------------------------
# Request streams


@dataclass
class Stream:
    pi: np.ndarray  # (T,) candidate propensity of each request
    stratum: np.ndarray  # (T,) index of the step
    a: np.ndarray  # (R, T) bool, assigned to the candidate
    burst: np.ndarray | None  # (R, T) bool
    check_1s: np.ndarray  # (R, T) bool, last request of its second


def make_stream(sc: Scenario, rng: np.random.Generator, runs: int) -> Stream:
    weights = np.array([w for w, _ in sc.steps])
    lengths = np.array([n for _, n in sc.steps])
    stratum = np.repeat(np.arange(weights.size), lengths)
    pi = weights[stratum]
    t = sc.horizon
    a = rng.random((runs, t)) < pi
    burst = None
    if sc.bursty:
        burst = np.zeros((runs, t), dtype=bool)
        for r in range(runs):
            seg = rng.geometric(1.0 / BURST_RUN, size=2 * (t // BURST_RUN + 10))
            ends = np.cumsum(seg)
            which = np.searchsorted(ends, np.arange(t), side="right")
            burst[r] = (which % 2) == 1
        rate = np.where(burst, RATE_BURST, RATE_NORMAL)
    else:
        rate = np.full((runs, t), RATE_STEADY)
    second = np.floor(np.cumsum(rng.exponential(1.0, (runs, t)) / rate, axis=1))
    check = np.ones((runs, t), dtype=bool)
    check[:, :-1] = second[:, 1:] != second[:, :-1]
    return Stream(pi=pi, stratum=stratum, a=a, burst=burst, check_1s=check)


def first_candidate_count(
    codes: np.ndarray, value: int, n_c: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """Candidate samples at the first request whose code equals ``value`` (inf: never)."""
    hit = codes == value
    if mask is not None:
        hit &= mask
    anyhit = hit.any(axis=1)
    idx = hit.argmax(axis=1)
    return np.where(anyhit, n_c[np.arange(codes.shape[0]), idx], INF)


def _batches(total: int, per_batch: int) -> list[int]:
    per_batch = max(1, min(per_batch, total))
    return [min(per_batch, total - i) for i in range(0, total, per_batch)]


class Collector:
    """Accumulates per-run first-decision times, batch by batch."""

    def __init__(self) -> None:
        self.parts: dict[tuple[str, str], list[np.ndarray]] = {}

    def add(self, store: str, method: str, values: np.ndarray | float) -> None:
        self.parts.setdefault((store, method), []).append(np.atleast_1d(values).astype(float))

    def record(
        self, method: str, codes: np.ndarray, n_c: np.ndarray, check: np.ndarray | None
    ) -> None:
        self.add("worse", method, first_candidate_count(codes, WORSE, n_c))
        self.add("ok", method, first_candidate_count(codes, OK, n_c))
        if check is not None:
            self.add("worse_1s", method, first_candidate_count(codes, WORSE, n_c, check))
            self.add("ok_1s", method, first_candidate_count(codes, OK, n_c, check))

    def outcome(self, sc: Scenario) -> Outcome:
        out = Outcome(sc)
        for (store, method), parts in self.parts.items():
            getattr(out, store)[method] = np.concatenate(parts)
        return out


# --------------------------------------------------------------------------------------------
# Log buckets and the Kayenta-like Mann-Whitney judge


def bucket_index(y: np.ndarray) -> np.ndarray:
    """Bucket of each positive value in the LogHistogram scheme (DDSketch)."""
    gamma = (1.0 + ACCURACY) / (1.0 - ACCURACY)
    return np.ceil(np.log(y) / math.log(gamma)).astype(np.int64)


def bucket_value(i: np.ndarray) -> np.ndarray:
    gamma = (1.0 + ACCURACY) / (1.0 - ACCURACY)
    return 2.0 * gamma ** i.astype(float) / (gamma + 1.0)


def mann_whitney_first_worse(
    cand: np.ndarray, prod: np.ndarray, prod_at_cand: np.ndarray, every: int
) -> float:
    """Candidate samples at the first judgement where Mann-Whitney says "candidate higher".

    ``cand``/``prod``: bucket indices in arrival order (ties handled by the standard tie
    correction); ``prod_at_cand[j]``: production samples seen when candidate j+1 arrived.
    """
    n_c = cand.size
    checks = np.arange(every, n_c + 1, every)
    checks = checks[checks >= BURN_IN]
    if checks.size == 0:
        return INF
    lo = min(cand.min(), prod.min())
    width = max(cand.max(), prod.max()) - lo + 1
    j_c = np.searchsorted(checks, np.arange(1, n_c + 1), side="left")
    keep = j_c < checks.size
    mc = np.bincount(j_c[keep] * width + (cand[keep] - lo), minlength=checks.size * width).reshape(
        checks.size, width
    )
    p_ends = prod_at_cand[checks - 1]
    j_p = np.searchsorted(p_ends, np.arange(1, prod.size + 1), side="left")
    keep = j_p < checks.size
    mp = np.bincount(j_p[keep] * width + (prod[keep] - lo), minlength=checks.size * width).reshape(
        checks.size, width
    )
    c = np.cumsum(mc, axis=0).astype(float)
    p = np.cumsum(mp, axis=0).astype(float)
    n1 = c.sum(axis=1)
    n2 = p.sum(axis=1)
    below = np.cumsum(p, axis=1) - p
    u = (c * (below + 0.5 * p)).sum(axis=1)
    ties = c + p
    big_n = n1 + n2
    tie_term = (ties**3 - ties).sum(axis=1) / (big_n * (big_n - 1.0))
    var = n1 * n2 / 12.0 * ((big_n + 1.0) - tie_term)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (u - n1 * n2 / 2.0) / np.sqrt(var)
    hit = np.flatnonzero((z > Z_975) & (n2 >= BURN_IN))
    return float(checks[hit[0]]) if hit.size else INF


def _pooled_z_codes(
    n_c: np.ndarray, s_c: np.ndarray, n_p: np.ndarray, s_p: np.ndarray, higher_worse: bool
) -> np.ndarray:
    """Mann-Whitney on 0/1 data with tie correction = the pooled two-proportion z-test."""
    with np.errstate(divide="ignore", invalid="ignore"):
        pool = (s_c + s_p) / (n_c + n_p)
        z = (s_c / n_c - s_p / n_p) / np.sqrt(pool * (1 - pool) * (1 / n_c + 1 / n_p))
    sig = z > Z_975 if higher_worse else z < -Z_975
    return np.where(sig, WORSE, 0).astype(np.int8)


# --------------------------------------------------------------------------------------------
# Means


def mean_intervals(
    sc: Scenario, st: Stream, y: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per method: (lower, upper, n_c, n_p) after every request of every run of a batch.

    The running IPW sums are cumulative sums of per-request terms weighted by 1/pi (which is
    what the stratified sums add up to), reduced with the library's ``variance_floor``,
    ``mean_interval`` and radius.
    """
    tt = np.arange(1, y.shape[1] + 1, dtype=float)
    radius = normal_mixture_radius(tt, normal_mixture_rho2(DEFAULT_T_OPT, ALPHA), ALPHA)
    arms = {}
    for arm, sel, prop in (("c", st.a, st.pi), ("p", ~st.a, 1.0 - st.pi)):
        w = sel / prop
        w1 = np.cumsum(w, axis=1)
        s1 = np.cumsum(w * y, axis=1)
        w2 = np.cumsum(w / prop, axis=1)
        s2 = np.cumsum(w * y / prop, axis=1)
        q2 = np.cumsum(w * y * y / prop, axis=1)
        n = np.cumsum(sel, axis=1)
        u1 = np.cumsum(sel * y, axis=1)
        u2 = np.cumsum(sel * y * y, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            m = s1 / w1
            var = np.maximum(q2 - 2 * m * s2 + m * m * w2, 0.0) / tt
            s2obs = np.maximum(u2 - 2 * m * u1 + m * m * n, 0.0) / n
        arms[arm] = (m, var, s2obs, w2 / tt, n)
    (mc, vc, sc2, wc, n_c), (mp, vp, sp2, wp, n_p) = arms["c"], arms["p"]
    fvc, fvp = variance_floor(mc, mp, vc, vp, sc2, sp2, wc, wp, sc.relative)
    out = {}
    for method, (v1, v2, g) in (
        ("anytime", (fvc, fvp, radius)),
        ("naive", (vc, vp, Z_975 / np.sqrt(tt))),
    ):
        _, lo, hi = mean_interval(mc, mp, v1, v2, g, sc.relative)
        out[method] = (lo, hi, n_c, n_p)
    return out


def latency_stream(sc: Scenario, rng: np.random.Generator, runs: int) -> tuple[Stream, np.ndarray]:
    st = make_stream(sc, rng, runs)
    y = np.exp(sc.sigma * rng.standard_normal((runs, sc.horizon)))
    y[st.a] *= sc.scale
    if st.burst is not None:
        y[st.burst] *= BURST_LATENCY
    return st, y


def simulate_mean(sc: Scenario, rng: np.random.Generator) -> Outcome:
    col = Collector()
    fixed_rows = []
    for b in _batches(sc.runs, max(1, 1_500_000 // sc.horizon)):
        st, y = latency_stream(sc, rng, b)
        for method, (lo, hi, n_c, n_p) in mean_intervals(sc, st, y).items():
            codes = verdict_codes(lo, hi, sc.tolerance, sc.direction)
            codes[np.minimum(n_c, n_p) < BURN_IN] = 0
            col.record(method, codes, n_c, st.check_1s)
            if method == "naive" and sc.fixed_n:
                fixed_rows.append(_fixed_n_codes(codes, st.a, sc))
        kay = []
        for r in range(b):
            cand_b = bucket_index(y[r, st.a[r]])
            prod_b = bucket_index(y[r, ~st.a[r]])
            kay.append(mann_whitney_first_worse(cand_b, prod_b, _prod_at_cand(st.a[r]), 10))
        col.add("worse", "kayenta", np.array(kay))
    out = col.outcome(sc)
    if fixed_rows:
        out.fixed_power = np.concatenate(fixed_rows)
    return out


def _prod_at_cand(a: np.ndarray) -> np.ndarray:
    """Production samples seen at each candidate arrival of one run."""
    pos = np.flatnonzero(a)
    return pos - np.arange(pos.size)


def _fixed_n_codes(codes: np.ndarray, a: np.ndarray, sc: Scenario) -> np.ndarray:
    """Naive verdict at the moment of the n-th candidate sample, n = 1..N (fixed-n tests)."""
    n_max = int(sc.max_candidate * 0.9)
    rows = np.zeros((codes.shape[0], n_max), dtype=np.int8)
    for r in range(codes.shape[0]):
        pos = np.flatnonzero(a[r])[:n_max]
        rows[r, : pos.size] = codes[r, pos]
    return rows


# --------------------------------------------------------------------------------------------
# Quantiles


class PrefixOrder:
    """Order statistics of the first n_j samples of a sequence, for many prefixes at once."""

    def __init__(self, buckets: np.ndarray, prefixes: np.ndarray, nbins: int) -> None:
        self.prefixes = prefixes
        self.nbins = nbins
        owner = np.searchsorted(prefixes, np.arange(1, buckets.size + 1), side="left")
        keep = owner < prefixes.size
        counts = np.bincount(
            owner[keep] * nbins + buckets[keep], minlength=prefixes.size * nbins
        ).reshape(prefixes.size, nbins)
        cum = np.cumsum(np.cumsum(counts, axis=0), axis=1)
        self.top = int(cum[-1, -1]) + 1 if cum.size else 1
        self.flat = (cum + (np.arange(prefixes.size) * self.top)[:, None]).ravel()

    def bucket(self, row: np.ndarray, rank: np.ndarray) -> np.ndarray:
        """Bucket of the rank-th smallest in prefix ``row``; -1 below 1, nbins above n."""
        valid = (rank >= 1) & (rank <= self.prefixes[row])
        r = np.clip(rank, 1, None)
        pos = np.searchsorted(self.flat, r + row * self.top, side="left") - row * self.nbins
        pos = np.where(rank < 1, -1, pos)
        return np.where(valid | (rank < 1), pos, self.nbins)


@dataclass(frozen=True)
class QuantileTables:
    """Per-scenario rank bounds of the quantile simulation (anytime sequence, by n)."""

    sc: Scenario
    kl: np.ndarray
    kh: np.ndarray


def _quantile_tables(sc: Scenario) -> QuantileTables:
    n_top = int(sc.horizon) + 2
    kl, kh = quantile_rank_bounds(np.arange(n_top), sc.q, ALPHA / 2, DEFAULT_QUANTILE_T_OPT)
    # The production brackets of _quantile_run rely on this.
    assert set(np.unique(np.diff(kl))) <= {0, 1} and set(np.unique(np.diff(kh))) <= {0, 1}
    return QuantileTables(sc=sc, kl=kl, kh=kh)


@dataclass(frozen=True)
class BucketTables:
    """One run's buckets, numbered from 0, and the bound each bucket implies."""

    local: np.ndarray  # bucket number of each sample
    nb: int
    lo_val: np.ndarray  # lower bound on the true value of a sample in the bucket
    hi_val: np.ndarray  # upper bound
    mid_val: np.ndarray  # the bucket's representative


def bucket_tables(y: np.ndarray) -> BucketTables:
    """Every bucket the run touches, as LogHistogram would hold them (nothing clipped)."""
    full = bucket_index(y)
    low = int(full.min())
    rep = bucket_value(np.arange(low, int(full.max()) + 1))
    return BucketTables(
        local=full - low,
        nb=rep.size,
        lo_val=rep / (1.0 + ACCURACY),
        hi_val=rep / (1.0 - ACCURACY),
        mid_val=rep,
    )


def simulate_quantile(sc: Scenario, rng: np.random.Generator) -> Outcome:
    col = Collector()
    tab = _quantile_tables(sc)
    for b in _batches(sc.runs, max(1, 400_000 // sc.horizon)):
        st, y = latency_stream(sc, rng, b)
        for r in range(b):
            _quantile_run(tab, st.a[r], y[r], st.check_1s[r], col)
    return col.outcome(sc)


def _quantile_run(
    tab: QuantileTables, a: np.ndarray, y: np.ndarray, check: np.ndarray, col: Collector
) -> None:
    """One simulated rollout of the quantile test."""
    sc, kl, kh = tab.sc, tab.kl, tab.kh
    bt = bucket_tables(y)
    nb = bt.nb
    cand, prod = bt.local[a], bt.local[~a]
    n_c = cand.size
    p_at = _prod_at_cand(a)  # production samples when candidate sample j arrives
    p_next = np.append(p_at[1:], prod.size)  # ... just before candidate sample j + 1
    chk = np.flatnonzero(check)
    c_chk = np.cumsum(a)[chk]
    p_chk = (chk + 1) - c_chk
    prefixes_p = np.unique(np.concatenate([p_at, p_next, p_chk, [0]]))
    po = PrefixOrder(prod, prefixes_p, nb)
    pc = PrefixOrder(cand, np.arange(1, n_c + 1), nb)
    jj = np.arange(1, n_c + 1)

    def cand_bounds(
        n: np.ndarray, lo_rank: np.ndarray, hi_rank: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        lo = _vals(pc.bucket(n - 1, lo_rank), bt.lo_val, nb)
        return lo, _vals(pc.bucket(n - 1, hi_rank), bt.hi_val, nb)

    def prod_bound(n: np.ndarray, rank: np.ndarray, lower: bool) -> np.ndarray:
        bk = po.bucket(np.searchsorted(prefixes_p, n), rank)
        return _vals(bk, bt.lo_val if lower else bt.hi_val, nb)

    lo_c, hi_c = cand_bounds(jj, kl[jj], kh[jj] + 1)
    # Exact states at each candidate arrival.
    lo_p = prod_bound(p_at, kl[p_at], True)
    hi_p = prod_bound(p_at, kh[p_at] + 1, False)
    early = np.minimum(jj, p_at) < BURN_IN
    exact = _quantile_codes(lo_c, hi_c, lo_p, hi_p, sc)
    exact[early] = 0
    if sc.group == "power":  # decisions timed at candidate arrivals, exactly
        first_w, first_o = _first(exact == WORSE, jj), _first(exact == OK, jj)
    else:
        # Between arrivals j and j+1 production moves from n1 = p_at[j] to n2 = p_next[j]
        # samples; bracketing its bounds flags every verdict that could occur in between.
        # For n1 <= n <= n2 (d = n2 - n1), the j-th smallest of the first n samples lies
        # between the j-th of the first n2 and the j-th of the first n1, and between the
        # (j - (n - n1))-th of the first n1 and the (j + (n2 - n))-th of the first n2.
        # With rank bounds that grow by 0 or 1 per sample (checked), this gives two valid
        # brackets for each bound; the tighter one is used.
        d = p_next - p_at
        max_lo_p = np.minimum(
            prod_bound(p_at, kl[p_next], True), prod_bound(p_next, kl[p_at] + d, True)
        )
        min_hi_p = np.maximum(
            prod_bound(p_next, kh[p_at] + 1, False), prod_bound(p_at, kh[p_next] + 1 - d, False)
        )
        flags = _quantile_codes(lo_c, hi_c, max_lo_p, min_hi_p, sc, bracket=True)
        live = (jj >= BURN_IN) & (p_next >= BURN_IN)
        first_w, first_o = _first(flags[0] & live, jj), _first(flags[1] & live, jj)
    col.add("worse", "anytime", first_w)
    col.add("ok", "anytime", first_o)
    # 1 s cadence: exact states at the end of each second.
    has = c_chk >= 1
    cc, pp = c_chk[has], p_chk[has]
    lc1, hc1 = cand_bounds(cc, kl[cc], kh[cc] + 1)
    codes1 = _quantile_codes(
        lc1, hc1, prod_bound(pp, kl[pp], True), prod_bound(pp, kh[pp] + 1, False), sc
    )
    codes1[np.minimum(cc, pp) < BURN_IN] = 0
    col.add("worse_1s", "anytime", _first(codes1 == WORSE, cc))
    col.add("ok_1s", "anytime", _first(codes1 == OK, cc))

    # Naive: z-test on the (log) quantiles with order-statistic standard errors, peeked at
    # every candidate arrival.
    def naive_stats(order: PrefixOrder, row: np.ndarray, n: np.ndarray):
        half = np.sqrt(n * sc.q * (1 - sc.q))
        ranks = [
            np.maximum(np.ceil(n * sc.q), 1),
            np.floor(n * sc.q - half),
            np.ceil(n * sc.q + half),
        ]
        est, lo, hi = (_vals(order.bucket(row, k.astype(np.int64)), bt.mid_val, nb) for k in ranks)
        return est, np.where(np.isfinite(hi) & (lo > 0), (hi - lo) / 2.0, INF)

    est_c, se_c = naive_stats(pc, jj - 1, jj.astype(float))
    est_p, se_p = naive_stats(po, np.searchsorted(prefixes_p, p_at), p_at.astype(float))
    with np.errstate(divide="ignore", invalid="ignore"):
        if sc.relative:
            centre = np.log(est_c / est_p)
            se = np.sqrt((se_c / est_c) ** 2 + (se_p / est_p) ** 2)
            n_lo, n_hi = np.exp(centre - Z_975 * se), np.exp(centre + Z_975 * se)
        else:
            centre, se = est_c - est_p, np.sqrt(se_c**2 + se_p**2)
            n_lo, n_hi = centre - Z_975 * se, centre + Z_975 * se
    naive = verdict_codes(n_lo, n_hi, sc.tolerance, sc.direction)
    naive[early] = 0
    col.add("worse", "naive", _first(naive == WORSE, jj))
    col.add("ok", "naive", _first(naive == OK, jj))
    col.add("worse", "kayenta", mann_whitney_first_worse(cand, prod, p_at, KAYENTA_EVERY))


def _vals(bk: np.ndarray, table: np.ndarray, nb: int) -> np.ndarray:
    """Bound values of looked-up buckets: rank < 1 gives 0 (no lower bound on a positive
    value), rank > n gives inf (no upper bound); both are the conservative ends for the
    brackets too."""
    v = table[np.clip(bk, 0, nb - 1)]
    return np.where(bk < 0, 0.0, np.where(bk >= nb, INF, v))


def _quantile_codes(
    lo_c: np.ndarray,
    hi_c: np.ndarray,
    lo_p: np.ndarray,
    hi_p: np.ndarray,
    sc: Scenario,
    bracket: bool = False,
) -> np.ndarray:
    if sc.relative:
        with np.errstate(divide="ignore", invalid="ignore"):
            lo = np.where(np.isfinite(hi_p) & (hi_p > 0), lo_c / hi_p, 0.0)
            hi = np.where(lo_p > 0, hi_c / lo_p, INF)
    else:
        lo, hi = lo_c - hi_p, hi_c - lo_p
    if bracket:
        # lo/hi here are the extreme values over the bracket: flags of possible verdicts.
        return np.stack([lo > sc.tolerance, hi <= sc.tolerance])
    return verdict_codes(lo, hi, sc.tolerance, sc.direction)


def _first(hit: np.ndarray, n_c: np.ndarray) -> float:
    """Candidate samples at the first hit (inf: none)."""
    idx = np.flatnonzero(hit)
    return float(n_c[idx[0]]) if idx.size else INF


# --------------------------------------------------------------------------------------------
# Errors, bounded rates and sample-ratio mismatch


def _arm_bounds(sel: np.ndarray, event: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Per request: the arm's Bernoulli confidence sequence, forward-filled."""
    n = np.cumsum(sel, axis=1)
    s = np.cumsum(sel & event, axis=1)
    rows, cols = np.nonzero(sel)
    lo, hi = bernoulli_cs(n[rows, cols], s[rows, cols], alpha, JEFFREYS)
    lo_full = np.zeros(sel.shape)
    hi_full = np.ones(sel.shape)
    lo_full[rows, cols] = lo
    hi_full[rows, cols] = hi
    # forward fill along each row from the arm's last arrival
    idx = np.where(sel, np.arange(sel.shape[1]), 0)
    np.maximum.accumulate(idx, axis=1, out=idx)
    r = np.arange(sel.shape[0])[:, None]
    started = n > 0
    lo_full = np.where(started, lo_full[r, idx], 0.0)
    hi_full = np.where(started, hi_full[r, idx], 1.0)
    return lo_full, hi_full


def _ratio_codes_per_request(
    st: Stream, event: np.ndarray, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """Log-rate-ratio sequence after every request (it changes only at events)."""
    b = event.shape[0]
    n_strata = int(st.stratum.max()) + 1
    strata_pi = np.array([st.pi[np.argmax(st.stratum == s)] for s in range(n_strata)])
    rows, cols = np.nonzero(event)
    lab = st.a[rows, cols]
    strat = st.stratum[cols]
    onehot_k = np.zeros((rows.size, n_strata))
    onehot_m = np.zeros((rows.size, n_strata))
    onehot_k[np.arange(rows.size), strat] = lab
    onehot_m[np.arange(rows.size), strat] = ~lab
    ck = np.cumsum(onehot_k, axis=0)
    cm = np.cumsum(onehot_m, axis=0)
    starts = np.searchsorted(rows, np.arange(b))
    base = np.maximum(starts - 1, 0)
    first = starts[rows]
    sub_k = np.where((first > 0)[:, None], ck[base[rows]], 0.0)
    sub_m = np.where((first > 0)[:, None], cm[base[rows]], 0.0)
    k = ck - sub_k
    m = cm - sub_m
    lo_ev = np.empty(rows.size)
    hi_ev = np.empty(rows.size)
    for i in range(0, rows.size, 50_000):
        lo_ev[i : i + 50_000], hi_ev[i : i + 50_000] = rate_ratio_cs(
            strata_pi, k[i : i + 50_000], m[i : i + 50_000], alpha, DEFAULT_PRIOR_SHAPE
        )
    ev_idx = np.cumsum(event, axis=1) - 1 + starts[:, None]
    has = np.cumsum(event, axis=1) > 0
    safe = np.clip(ev_idx, 0, max(rows.size - 1, 0))
    lo = np.where(has, np.exp(lo_ev[safe]) if rows.size else 0.0, 0.0)
    hi = np.where(has, np.exp(hi_ev[safe]) if rows.size else INF, INF)
    return lo, hi


def simulate_binary(sc: Scenario, rng: np.random.Generator) -> Outcome:
    col = Collector()
    t_len = sc.horizon
    higher_worse = sc.direction is Direction.INCREASE
    for b in _batches(sc.runs, max(1, 1_000_000 // t_len)):
        st = make_stream(sc, rng, b)
        prob = np.where(st.a, sc.cand, sc.base)
        if st.burst is not None and sc.kind != "rate":
            prob = np.where(st.burst, np.minimum(prob * BURST_EVENTS, 1.0), prob)
        event = rng.random((b, t_len)) < prob
        cand, prod = st.a, ~st.a
        if sc.kind == "srm":
            # As srm_test: drop-ratio sequence and routed-split evidence, alpha/2 each.
            lo, hi = _ratio_codes_per_request(st, event, ALPHA / 2)
            n_c = np.cumsum(cand, axis=1)
            n_p = np.cumsum(prod, axis=1)
            strata = np.unique(st.stratum)
            pis = np.array([st.pi[np.argmax(st.stratum == s)] for s in strata])
            in_s = st.stratum[None, :, None] == strata
            k_s = np.cumsum(cand[:, :, None] & in_s, axis=1)
            m_s = np.cumsum(prod[:, :, None] & in_s, axis=1)
            routed_off = allocation_log_evidence(pis, k_s, m_s) >= math.log(2.0 / ALPHA)
            codes = np.where((lo > 1.0) | (hi < 1.0) | routed_off, WORSE, 0).astype(np.int8)
            codes[np.minimum(n_c, n_p) < 1] = 0
            col.record("anytime", codes, n_c, st.check_1s)
            d_c = np.cumsum(cand & event, axis=1)
            d_p = np.cumsum(prod & event, axis=1)
            naive = _wald_codes(n_c, d_c, n_p, d_p, sc, two_sided_worse=True)
            naive[np.minimum(n_c, n_p) < BURN_IN] = 0
            col.record("naive", naive, n_c, st.check_1s)
            kay = _pooled_z_codes(n_c, d_c, n_p, d_p, True)
            kay[np.minimum(n_c, n_p) < BURN_IN] = 0
            col.record("kayenta", kay, n_c, st.check_1s)
            continue
        if sc.kind == "error":
            ratio_alpha = ALPHA if sc.relative else ALPHA / 2
            r_lo, r_hi = _ratio_codes_per_request(st, event, ratio_alpha)
        arm_alpha = ALPHA / 2 if sc.kind == "rate" else ALPHA / 4
        n_c = np.cumsum(cand, axis=1).astype(float)
        n_p = np.cumsum(prod, axis=1).astype(float)
        s_c = np.cumsum(cand & event, axis=1).astype(float)
        s_p = np.cumsum(prod & event, axis=1).astype(float)
        if sc.kind == "rate" or not sc.relative:
            c_lo, c_hi = _arm_bounds(cand, event, arm_alpha)
            p_lo, p_hi = _arm_bounds(prod, event, arm_alpha)
        if sc.kind == "rate":
            lo, hi = _combine(c_lo, c_hi, p_lo, p_hi, sc.relative)
        elif sc.relative:
            lo, hi = r_lo, r_hi
        else:
            y_lo, y_hi = r_lo - 1.0, r_hi - 1.0
            lo1 = np.where(y_lo >= 0, p_lo * y_lo, p_hi * y_lo)
            with np.errstate(invalid="ignore"):
                hi1 = np.where(y_hi >= 0, p_hi * y_hi, p_lo * y_hi)
            hi1 = np.where(np.isfinite(y_hi), hi1, INF)
            lo = np.maximum(lo1, c_lo - p_hi)
            hi = np.minimum(hi1, c_hi - p_lo)
            mid = 0.5 * (lo + hi)
            crossed = lo > hi
            lo = np.where(crossed, mid, lo)
            hi = np.where(crossed, mid, hi)
        codes = verdict_codes(lo, hi, sc.tolerance, sc.direction)
        early = np.minimum(n_c, n_p) < BURN_IN
        codes[early] = 0
        col.record("anytime", codes, n_c, st.check_1s)
        naive = _wald_codes(n_c, s_c, n_p, s_p, sc)
        naive[early] = 0
        col.record("naive", naive, n_c, st.check_1s)
        kay = _pooled_z_codes(n_c, s_c, n_p, s_p, higher_worse)
        kay[early] = 0
        col.record("kayenta", kay, n_c, st.check_1s)
    return col.outcome(sc)


def _combine(
    c_lo: np.ndarray, c_hi: np.ndarray, p_lo: np.ndarray, p_hi: np.ndarray, relative: bool
) -> tuple[np.ndarray, np.ndarray]:
    if relative:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(p_hi > 0, c_lo / p_hi, 0.0), np.where(p_lo > 0, c_hi / p_lo, INF)
    return c_lo - p_hi, c_hi - p_lo


def _wald_codes(
    n_c: np.ndarray,
    s_c: np.ndarray,
    n_p: np.ndarray,
    s_p: np.ndarray,
    sc: Scenario,
    two_sided_worse: bool = False,
) -> np.ndarray:
    """Naive fixed-sample Wald interval on the difference (or contrast), peeked."""
    with np.errstate(divide="ignore", invalid="ignore"):
        pc, pp = s_c / n_c, s_p / n_p
        r = sc.tolerance if sc.relative else 1.0
        est = pc - r * pp
        se = np.sqrt(pc * (1 - pc) / n_c + r * r * pp * (1 - pp) / n_p)
        lo, hi = est - Z_975 * se, est + Z_975 * se
    if two_sided_worse:
        return np.where((lo > 0) | (hi < 0), WORSE, 0).astype(np.int8)
    tol = 0.0 if sc.relative else sc.tolerance
    return verdict_codes(lo, hi, tol, sc.direction)


def simulate_rate_at_arrivals(sc: Scenario, rng: np.random.Generator) -> Outcome:
    """Bounded-rate power with long horizons: exact states at each candidate arrival.

    Production requests between candidate arrivals are geometric and their successes
    binomial, so the state at each candidate arrival is simulated without the requests.
    """
    col = Collector()
    ((w, _),) = sc.steps
    n_max = int(sc.max_candidate)
    for b in _batches(sc.runs, max(1, 2_000_000 // n_max)):
        gaps = rng.geometric(w, size=(b, n_max)) - 1
        n_p = np.cumsum(gaps, axis=1).astype(float)
        s_p = np.cumsum(rng.binomial(gaps, sc.base), axis=1).astype(float)
        n_c = np.broadcast_to(np.arange(1, n_max + 1, dtype=float), (b, n_max))
        s_c = np.cumsum(rng.random((b, n_max)) < sc.cand, axis=1).astype(float)
        c_lo, c_hi = bernoulli_cs(n_c.ravel(), s_c.ravel(), ALPHA / 2, JEFFREYS)
        p_lo, p_hi = bernoulli_cs(n_p.ravel(), s_p.ravel(), ALPHA / 2, JEFFREYS)
        lo, hi = _combine(c_lo, c_hi, p_lo, p_hi, sc.relative)
        codes = verdict_codes(lo, hi, sc.tolerance, sc.direction).reshape(b, n_max)
        early = np.minimum(n_c, n_p) < BURN_IN
        codes[early] = 0
        col.record("anytime", codes, n_c, None)
        naive = _wald_codes(n_c, s_c, n_p, s_p, sc)
        naive[early] = 0
        col.record("naive", naive, n_c, None)
        kay = _pooled_z_codes(n_c, s_c, n_p, s_p, sc.direction is Direction.INCREASE)
        kay[early] = 0
        col.record("kayenta", kay, n_c, None)
    return col.outcome(sc)


SIMULATORS: dict[str, Callable[[Scenario, np.random.Generator], Outcome]] = {
    "mean": simulate_mean,
    "quantile": simulate_quantile,
    "error": simulate_binary,
    "rate": simulate_binary,
    "srm": simulate_binary,
}


def run_scenario(sc: Scenario, seed: int) -> Outcome:
    rng = np.random.default_rng([seed, sum(map(ord, sc.key))])
    start = time.perf_counter()
    if sc.kind == "rate" and sc.group == "power":
        out = simulate_rate_at_arrivals(sc, rng)
    else:
        out = SIMULATORS[sc.kind](sc, rng)
    out.seconds = time.perf_counter() - start
    return out


# --------------------------------------------------------------------------------------------
# Summaries


def rate(x: np.ndarray) -> float:
    return float(np.mean(np.isfinite(x))) if x.size else math.nan


def upper_bound(x: np.ndarray, confidence: float = 0.999) -> float:
    """One-sided Clopper-Pearson upper bound of a rate of finite entries."""
    k = int(np.isfinite(x).sum())
    n = x.size
    return 1.0 if k == n else float(special.betaincinv(k + 1, n - k, confidence))


def lower_bound(x: np.ndarray, confidence: float = 0.999) -> float:
    """One-sided Clopper-Pearson lower bound: the rate is significantly above this."""
    k = int(np.isfinite(x).sum())
    n = x.size
    return 0.0 if k == 0 else float(special.betaincinv(k, n - k + 1, 1.0 - confidence))


def median_samples(x: np.ndarray) -> float:
    return float(np.median(x)) if x.size else math.nan


def fixed_n80(power_rows: np.ndarray) -> float:
    """Sample size at which the fixed-sample test has 80% power.

    ``power_rows[r, n-1]`` is the fixed-sample verdict of run r at exactly n candidate
    samples. The measured power curve is fitted by probit(power) = a sqrt(n) + b (the shape of
    a z-test's power) over 5%..95% power, which uses every n instead of the noisy first
    crossing of 80%.
    """
    power = (power_rows == WORSE).mean(axis=0)
    n = np.arange(1, power.size + 1, dtype=float)
    use = (power > 0.05) & (power < 0.95) & (n >= BURN_IN)
    if use.sum() < 10:
        hit = np.flatnonzero(power >= 0.8)
        return float(hit[0] + 1) if hit.size else INF
    a, b = np.polyfit(np.sqrt(n[use]), sps.norm.ppf(power[use]), 1)
    return float(((sps.norm.ppf(0.8) - b) / a) ** 2)


def normal_theory_n80(sc: Scenario) -> float:
    """Fixed-sample size for 80% power from the lognormal moments of the scenario."""
    (w, _), *_ = sc.steps
    var = (math.exp(sc.sigma**2) - 1.0) * math.exp(sc.sigma**2)
    mean = math.exp(sc.sigma**2 / 2.0)
    delta = (sc.scale - 1.0 - sc.margin) * mean
    spread = sc.scale**2 * var + (1.0 + sc.margin) ** 2 * var * w / (1.0 - w)
    return (Z_975 + float(sps.norm.ppf(0.8))) ** 2 * spread / delta**2


def ratio_to_fixed(out: Outcome, reps: int = 200, seed: int = 0) -> tuple[float, float, float]:
    """Median anytime samples to WORSE / fixed-n for 80% power, with a bootstrap 98% interval."""
    assert out.fixed_power is not None
    stop = out.worse["anytime"]
    point = median_samples(stop) / fixed_n80(out.fixed_power)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(reps):
        idx = rng.integers(0, stop.size, stop.size)
        boot.append(median_samples(stop[idx]) / fixed_n80(out.fixed_power[idx]))
    lo, hi = np.quantile(boot, [0.01, 0.99])
    return point, float(lo), float(hi)


def fmt_rate(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 100:.1f}%"


def fmt_n(x: float, horizon: float) -> str:
    if math.isnan(x):
        return "-"
    return f">{horizon:.0f}" if math.isinf(x) else f"{x:.0f}"


def table(outcomes: Sequence[Outcome]) -> str:
    lines = []
    header = {
        "aa": (
            "### A/A at zero margin (any WORSE or OK is a false decision)\n\n"
            "| scenario | split | horizon (cand.) | runs | false rollback | false promotion "
            "| ... at 1 s checks | naive z peeked: rollback / promotion "
            "| Kayenta-like MW: rollback |\n"
            "|---|---|---|---|---|---|---|---|---|"
        ),
        "margin": (
            "### Null exactly at the margin (promotion is the false decision)\n\n"
            "| scenario | split | horizon (cand.) | runs | false promotion | false rollback "
            "| ... at 1 s checks | naive z peeked: promotion / rollback "
            "| Kayenta-like MW: rollback |\n"
            "|---|---|---|---|---|---|---|---|---|"
        ),
        "power": (
            "### Power: a truly worse candidate (rollback is the right decision)\n\n"
            "| scenario | horizon (cand.) | runs | power | median cand. samples | wrong promotion "
            "| naive z: power / median | Kayenta-like MW: power / median |\n"
            "|---|---|---|---|---|---|---|---|"
        ),
    }
    for group in ("aa", "margin", "power"):
        rows = [o for o in outcomes if o.scenario.group == group]
        if not rows:
            continue
        lines.append(header[group])
        for o in rows:
            sc = o.scenario
            hor = sc.max_candidate
            kay = o.worse.get("kayenta", np.array([]))
            if group in ("aa", "margin"):
                first, second = (o.worse, o.ok) if group == "aa" else (o.ok, o.worse)
                f1, s1 = (o.worse_1s, o.ok_1s) if group == "aa" else (o.ok_1s, o.worse_1s)
                one_s = (
                    f"{fmt_rate(rate(f1['anytime']))} / {fmt_rate(rate(s1['anytime']))}"
                    if "anytime" in f1
                    else "-"
                )
                lines.append(
                    f"| {sc.title} | {sc.split} | {hor:.0f} | {sc.runs} "
                    f"| {fmt_rate(rate(first['anytime']))} | {fmt_rate(rate(second['anytime']))} "
                    f"| {one_s} "
                    f"| {fmt_rate(rate(first['naive']))} / {fmt_rate(rate(second['naive']))} "
                    f"| {fmt_rate(rate(kay)) if sc.kind != 'srm' or kay.size else '-'} |"
                )
            else:
                lines.append(
                    f"| {sc.title} | {hor:.0f} | {sc.runs} "
                    f"| {fmt_rate(rate(o.worse['anytime']))} "
                    f"| {fmt_n(median_samples(o.worse['anytime']), hor)} "
                    f"| {fmt_rate(rate(o.ok['anytime']))} "
                    f"| {fmt_rate(rate(o.worse['naive']))} / "
                    f"{fmt_n(median_samples(o.worse['naive']), hor)} "
                    f"| {fmt_rate(rate(kay))} / {fmt_n(median_samples(kay), hor)} |"
                )
        lines.append("")
    return "\n".join(lines)


def check_targets(outcomes: Sequence[Outcome]) -> list[str]:
    """The targets the CI form asserts; returns human-readable failures (empty: all met)."""
    failures = []
    for o in outcomes:
        sc = o.scenario
        checks = []
        if sc.group in ("aa", "margin"):
            checks.append(("false promotion", o.ok["anytime"]))
            checks.append(("false rollback", o.worse["anytime"]))
        for what, x in checks:
            lb = lower_bound(x)
            if lb > ALPHA:
                failures.append(
                    f"{sc.key}: {what} rate {rate(x):.3f} is significantly above alpha "
                    f"(99.9% lower bound {lb:.3f} > {ALPHA})"
                )
        if o.fixed_power is not None:
            point, lo, _ = ratio_to_fixed(o)
            if lo > 1.3:
                failures.append(
                    f"{sc.key}: median samples / fixed-n(80%) = {point:.2f}, above 1.3 "
                    f"(bootstrap 1% quantile {lo:.2f})"
                )
        if sc.key in ("slow-mean", "slow-p95", "fail20"):
            med = median_samples(o.worse["anytime"])
            if not med <= 200:
                failures.append(f"{sc.key}: median candidate samples to rollback {med} > 200")
    return failures


def summary_lines(outcomes: Sequence[Outcome]) -> list[str]:
    lines = []
    for o in outcomes:
        if o.fixed_power is not None:
            point, lo, hi = ratio_to_fixed(o)
            n80 = fixed_n80(o.fixed_power)
            med = median_samples(o.worse["anytime"])
            theory = normal_theory_n80(o.scenario)
            lines.append(
                f"- {o.scenario.title}: median {med:.0f} candidate samples to rollback vs "
                f"{n80:.0f} for a fixed-sample z-test with 80% power (two-sided 5%, measured "
                f"on the same runs; normal theory gives {theory:.0f}): ratio {point:.2f} "
                f"(bootstrap 98% interval {lo:.2f}-{hi:.2f}; {med / theory:.2f} against "
                f"theory); target <= 1.3."
            )
    for o in outcomes:
        if o.scenario.key in ("slow-mean", "slow-p95", "fail20"):
            x = o.worse["anytime"]
            lines.append(
                f"- {o.scenario.title}: median {median_samples(x):.0f} candidate samples to "
                f"rollback, {np.mean(x <= 200) * 100:.1f}% of runs within 200 (target 200)."
            )
    return lines


def plot(outcomes: Sequence[Outcome], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {o.scenario.key: o for o in outcomes}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    aa = by_key.get("mean-aa-s05")
    if aa is not None:
        grid = np.arange(1, int(aa.scenario.max_candidate) + 1)
        for method, label in (
            ("anytime", "anytime CS (ours)"),
            ("naive", "naive z-test, peeked"),
            ("kayenta", "Kayenta-like MW, every 10"),
        ):
            first = np.minimum(
                aa.worse[method], aa.ok.get(method, np.full(aa.worse[method].size, INF))
            )
            cum = (first[:, None] <= grid).mean(axis=0)
            ax.plot(grid, cum * 100, label=label)
        ax.axhline(ALPHA * 100, color="grey", ls="--", lw=1, label="alpha = 5%")
        ax.set_title("A/A mean latency (s=0.5): runs with a false decision")
        ax.set_xlabel("candidate samples")
        ax.set_ylabel("% of runs")
        ax.legend(fontsize=8)
    ax = axes[1]
    for key in ("mean-p05", "mean-p10", "mean-p20", "p95-p20", "err-2x", "acc-m3", "srm-drop5"):
        o = by_key.get(key)
        if o is None:
            continue
        x = np.sort(o.worse["anytime"])
        grid = np.arange(1, int(o.scenario.max_candidate) + 1)
        ax.plot(grid, (x[:, None] <= grid).mean(axis=0) * 100, label=o.scenario.title)
    ax.set_xscale("log")
    ax.set_title("Power: runs rolled back by n candidate samples")
    ax.set_xlabel("candidate samples")
    ax.set_ylabel("% of runs")
    ax.legend(fontsize=7)
    ax = axes[2]
    p10 = by_key.get("mean-p10")
    if p10 is not None and p10.fixed_power is not None:
        power = (p10.fixed_power == WORSE).mean(axis=0) * 100
        n = np.arange(1, power.size + 1)
        x = np.sort(p10.worse["anytime"])
        ax.plot(n, power, label="fixed-n z-test power at n")
        ax.plot(n, (x[:, None] <= n).mean(axis=0) * 100, label="anytime CS: stopped by n")
        ax.axhline(80, color="grey", ls="--", lw=1)
        ax.set_title("+10% mean latency: sequential vs fixed-sample")
        ax.set_xlabel("candidate samples")
        ax.set_ylabel("%")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(outcomes: Sequence[Outcome], form: str, seed: int, elapsed: float) -> str:
    lines = [
        "# canary.stats: simulation report",
        "",
        f"Generated by `python -m loadtest.stats_sim --{form}` (seed {seed}, {elapsed:.0f} s on "
        "this machine). Every figure below is measured by that run; nothing is typed in.",
        "",
        "Setup: alpha = 5% per test, burn-in 100 samples per arm, lognormal latencies (median "
        "1), 5/95 split unless stated. Tests are evaluated after **every request** on the "
        "accumulators at that moment (quantiles: exactly at each candidate request, and the "
        "production updates between two candidate requests are bracketed conservatively, so "
        "the quoted rates are upper bounds); the 1 s column evaluates only at the end of each "
        "second (200 requests/s; bursty: 100/s with bursts of 600/s and x1.6 latency, x3 "
        "errors, for the same time share). Horizon: the candidate samples in the split column "
        "(2000 at 5%) unless stated. Naive: the same estimator with a fixed-sample "
        "interval (z = 1.96), peeked at every check. Kayenta-like: two-sided Mann-Whitney "
        'at 95% ("High" when significant), every 10 candidate requests for latency, '
        "after every request for 0/1 signals (where it equals the pooled z-test).",
        "",
        table(outcomes),
        "### Targets",
        "",
        *summary_lines(outcomes),
        "",
        "### Run time per scenario",
        "",
        "| scenario | seconds | note |",
        "|---|---|---|",
        *(f"| {o.scenario.key} | {o.seconds:.1f} | {o.note} |" for o in outcomes),
        "",
        "![simulation plots](stats-simulation.png)",
        "",
    ]
    return "\n".join(lines)


def run(form: str, seed: int, only: str | None = None, runs: int | None = None) -> list[Outcome]:
    todo = [s for s in scenarios(form) if only is None or only in s.key]
    if runs is not None:
        todo = [replace(s, runs=runs) for s in todo]
    outcomes = []
    for i, sc in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {sc.key}: {sc.runs} runs x {sc.horizon} requests", end="",
              file=sys.stderr, flush=True)  # fmt: skip
        out = run_scenario(sc, seed)
        print(f" ... {out.seconds:.1f} s", file=sys.stderr, flush=True)
        outcomes.append(out)
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    form = parser.add_mutually_exclusive_group(required=True)
    form.add_argument("--fast", action="store_true", help="CI form: fewer runs and scenarios")
    form.add_argument("--full", action="store_true", help="full form: writes the report")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--only", help="run scenarios whose key contains this text")
    parser.add_argument("--runs", type=int, help="override the number of runs")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="report directory")
    args = parser.parse_args(argv)
    name = "full" if args.full else "fast"
    start = time.perf_counter()
    outcomes = run(name, args.seed, args.only, args.runs)
    elapsed = time.perf_counter() - start
    print(table(outcomes))
    print("\n".join(summary_lines(outcomes)))
    failures = check_targets(outcomes)
    for f in failures:
        print(f"TARGET MISSED: {f}")
    if args.full:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "stats-simulation.md").write_text(report(outcomes, name, args.seed, elapsed))
        plot(outcomes, args.out / "stats-simulation.png")
        print(f"wrote {args.out / 'stats-simulation.md'} and .png", file=sys.stderr)
    print(f"total {elapsed:.0f} s", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
