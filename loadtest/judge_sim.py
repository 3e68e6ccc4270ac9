"""Simulation evidence for the win-rate test of pairwise judging (``signal: judge``).

Every run is one rollout's stream of judged pairs under sticky routing: a few hundred users
with heavy-tailed activity (lognormal, sigma 1), each with a persistent preference of the
judge for the candidate's answers (users differ: some ask what the candidate does better),
in two "time zones" whose activity rises and falls in antiphase over the run (the mix of
users changes over time, the population's win rate does not). Each user hashes to one of 64
clusters, as ``routing.sticky`` does. A judged pair's verdict is 0.5 (a tie) with probability
0.1, else 1 with the user's preference and 0 otherwise.

The test is evaluated every 10 pairs from the burn-in on with the function the analysis runs
(:func:`canary.stats.win_rate_interval` on the running per-cluster sums), at ``max_decrease:
5pp`` (tolerance: a 45% win rate):

- **margin**: the population win rate is exactly 45%: WORSE at any time is a false rollback,
  an interval that ever excludes 45% is a miss of the confidence sequence;
- **A/A**: a coin-flip judge (win rate 50%, users still differ): WORSE is a false rollback;
- **power**: a judge that prefers the candidate 60% of the time: share of runs proven OK,
  and the median number of pairs it took.

"request-level" is the same sequence with the cluster-robust variance left out (what counting
judged requests as independent would give).

    python -m loadtest.judge_sim --fast     # CI-sized form, a few seconds
    python -m loadtest.judge_sim            # full form: 4000 runs per row
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from canary.stats import win_rate_interval
from loadtest.traffic_sim import wilson

SEED = 20261207
CLUSTERS = 64
TIE = 0.1
CHECK_EVERY = 10
BURN_IN = 100
MARGIN = 0.05


@dataclass(frozen=True)
class Form:
    runs: int
    pairs: int
    users: int


FAST = Form(runs=300, pairs=1000, users=300)
FULL = Form(runs=4000, pairs=3000, users=300)


@dataclass(frozen=True)
class Outcome:
    """First-decision counts of one row."""

    runs: int
    worse: int  # runs with a WORSE verdict at some check
    ok: int  # runs with an OK verdict at some check (before any WORSE)
    missed: int  # runs whose interval excluded the true win rate at some check
    pairs_to_ok: float  # median pairs to an OK verdict among runs that reached one


def simulate(
    win_rate: float,
    form: Form,
    *,
    alpha: float = 0.05,
    spread: float = 0.3,
    clustered: bool = True,
    seed: int = SEED,
) -> Outcome:
    """Run ``form.runs`` rollouts whose population win rate is ``win_rate``.

    ``spread``: a user's preference is the population's plus a uniform offset in
    ``[-spread, spread]`` (before ties), independent of the user's activity and time zone, so
    the population win rate is exactly ``win_rate`` at every moment."""
    rng = np.random.default_rng(seed)
    runs, users = form.runs, form.users
    activity = rng.lognormal(0.0, 1.0, users)
    zone = rng.integers(0, 2, users)
    cluster = rng.integers(0, CLUSTERS, users)  # each user's hash bucket
    base = (win_rate - TIE * 0.5) / (1.0 - TIE)  # P(candidate wins | no tie)
    if not spread <= base <= 1.0 - spread:
        raise ValueError(f"win rate {win_rate} with spread {spread} leaves [0, 1]")
    prefer = base + rng.uniform(-spread, spread, (runs, users))

    n = np.zeros(runs)
    s = np.zeros(runs)
    q = np.zeros(runs)
    cn = np.zeros((runs, CLUSTERS))
    cs = np.zeros((runs, CLUSTERS))
    first = np.full(runs, 0)  # 1 worse, 2 ok
    missed = np.zeros(runs, dtype=bool)
    when_ok = np.full(runs, np.nan)
    rows = np.arange(runs)[:, None]
    for start in range(0, form.pairs, CHECK_EVERY):
        phase = math.sin(2.0 * math.pi * 2.0 * start / form.pairs)  # two "days" per run
        weight = activity * (1.0 + 0.8 * np.where(zone == 0, phase, -phase))
        cum = np.cumsum(weight)
        who = np.searchsorted(cum, rng.uniform(0.0, cum[-1], (runs, CHECK_EVERY)))
        who = np.minimum(who, users - 1)
        tie = rng.random((runs, CHECK_EVERY)) < TIE
        win = rng.random((runs, CHECK_EVERY)) < prefer[rows, who]
        w = np.where(tie, 0.5, win.astype(float))
        n += CHECK_EVERY
        s += w.sum(axis=1)
        q += (w * w).sum(axis=1)
        g = cluster[who]
        np.add.at(cn, (np.broadcast_to(rows, g.shape), g), 1.0)
        np.add.at(cs, (np.broadcast_to(rows, g.shape), g), w)
        if n[0] < BURN_IN:
            continue
        if clustered:
            _, lo, hi = win_rate_interval(n, s, q, alpha, cluster_n=cn, cluster_sum=cs)
        else:
            _, lo, hi = win_rate_interval(n, s, q, alpha)
        tol = 0.5 - MARGIN
        undecided = first == 0
        worse = undecided & (hi < tol)
        ok = undecided & ~worse & (lo >= tol)
        first[worse] = 1
        first[ok] = 2
        when_ok[ok] = n[ok]
        missed |= (lo > win_rate) | (hi < win_rate)
    reached = when_ok[~np.isnan(when_ok)]
    return Outcome(
        runs=runs,
        worse=int((first == 1).sum()),
        ok=int((first == 2).sum()),
        missed=int(missed.sum()),
        pairs_to_ok=float(np.median(reached)) if reached.size else math.nan,
    )


def _pct(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def report(form: Form, seed: int = SEED, alpha: float = 0.05) -> str:
    lines = [
        f"{form.runs} runs per row, {form.pairs} judged pairs each, {form.users} sticky users in "
        f"{CLUSTERS} clusters, checked every {CHECK_EVERY} pairs from pair {BURN_IN}, "
        f"alpha {alpha}, max_decrease 5pp (95% Wilson intervals in brackets)",
        "",
        "| row | true win rate | variance | WORSE (rollback) | OK (promotion) "
        "| interval ever missed | median pairs to OK |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [
        ("margin", 0.45, True),
        ("margin", 0.45, False),
        ("A/A coin flip", 0.50, True),
        ("A/A coin flip", 0.50, False),
        ("judge prefers candidate 60%", 0.60, True),
    ]
    for i, (name, rate, clustered) in enumerate(rows):
        o = simulate(rate, form, alpha=alpha, clustered=clustered, seed=seed + i)
        how = "cluster-robust" if clustered else "request-level"
        to_ok = "-" if math.isnan(o.pairs_to_ok) else f"{o.pairs_to_ok:.0f}"
        lines.append(
            f"| {name} | {rate:.2f} | {how} | {_pct(o.worse, o.runs)} | {_pct(o.ok, o.runs)} "
            f"| {_pct(o.missed, o.runs)} | {to_ok} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="CI form: fewer runs")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--runs", type=int, help="override the number of runs per row")
    args = parser.parse_args(argv)
    form = FAST if args.fast else FULL
    if args.runs:
        form = Form(args.runs, form.pairs, form.users)
    start = time.perf_counter()
    print(report(form, args.seed))
    print(f"\n({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
