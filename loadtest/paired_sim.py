"""Simulation evidence for the paired-window test (resource signals) under serial dependence.

Every run is one canary's stream of per-window paired values (``log(c / p)`` for relative
margins, ``c - p`` for absolute ones) whose mean sits exactly at the tolerance line, and the
test is evaluated after every window from the burn-in on, with the very function the
controller calls (:func:`canary.stats.paired_interval`) on the running aggregates it is fed
(count, sum, sum of squares, squared changes between consecutive windows and, for "+ batches",
sums of 4, 16, 64 and 256 consecutive windows). A WORSE or an OK verdict at the margin is a
false decision. Consecutive windows are correlated: AR(1) with lag-1 autocorrelation 0 to 0.9,
MA(3), and an AR(1) component under white noise (a slowly varying level the pairing does not
remove). Relative rows have Gaussian log ratios; absolute rows are the difference of the two
arms' lognormal values; two stress rows have skewed (centred exponential) innovations.
"before" is the test as it was before the long-run variance work (AR(1) allowance from a
point estimate plus one standard error, capped at 0.9), on the same data.

    python -m loadtest.paired_sim --fast          # CI-sized form, a few seconds
    python -m loadtest.paired_sim                 # full form: 4000 runs per row
    python -m loadtest.paired_sim --write-docs    # full form, writes docs/paired-simulation.md

Progress goes to stderr, the tables to stdout.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from canary.stats import Direction, normal_mixture_radius, normal_mixture_rho2, verdict_codes
from canary.stats._paired import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_SD_FLOOR_FRACTION,
    DEFAULT_WINDOW_BURN_IN,
    DEFAULT_WINDOW_T_OPT,
    paired_interval,
)
from canary.stats._types import OK_CODE, WORSE_CODE
from loadtest.traffic_sim import wilson

SEED = 20240611
WARM_UP = 200  # windows simulated and dropped so that every run starts stationary
Interval = tuple[np.ndarray, np.ndarray]


# -- dependence models ------------------------------------------------------------------------


@dataclass(frozen=True)
class Dependence:
    """Serial dependence of the paired values (unit marginal variance)."""

    key: str
    title: str
    kind: str  # ar1 | ma | arn
    rho: float = 0.0  # ar1: lag-1 autocorrelation; arn: the AR component's coefficient
    share: float = 1.0  # arn: share of the variance carried by the AR component
    order: int = 0  # ma: order (equal weights)

    @property
    def long_run_factor(self) -> float:
        """Long-run variance over the per-window variance."""
        if self.kind == "ar1":
            return (1.0 + self.rho) / (1.0 - self.rho)
        if self.kind == "ma":
            return float(self.order + 1)
        return self.share * (1.0 + self.rho) / (1.0 - self.rho) + 1.0 - self.share

    def generate(self, rng: np.random.Generator, runs: int, windows: int, skewed: bool):
        def innovations(shape: tuple[int, int]) -> np.ndarray:
            if skewed:
                return rng.standard_exponential(shape) - 1.0
            return rng.standard_normal(shape)

        total = windows + WARM_UP
        if self.kind == "ma":
            e = innovations((runs, total + self.order))
            x = e[:, :total].copy()
            for j in range(1, self.order + 1):
                x += e[:, j : j + total]
            return x[:, WARM_UP:] / math.sqrt(self.order + 1)
        phi = self.rho
        e = innovations((runs, total))
        a = np.empty_like(e)
        a[:, 0] = e[:, 0]
        c = math.sqrt(1.0 - phi * phi)
        for i in range(1, total):
            a[:, i] = phi * a[:, i - 1] + c * e[:, i]
        a = a[:, WARM_UP:]
        if self.kind == "ar1":
            return a
        noise = innovations((runs, windows))
        return math.sqrt(self.share) * a + math.sqrt(1.0 - self.share) * noise


DEPENDENCE = (
    *(Dependence(f"ar1-{r}", f"AR(1) rho {r}", "ar1", rho=r) for r in (0.0, 0.3, 0.6, 0.8, 0.9)),
    Dependence("ma3", "MA(3), equal weights", "ma", order=3),
    Dependence("arn-0.7", "AR(1) 0.7 on half the variance + noise", "arn", rho=0.7, share=0.5),
    Dependence("arn-0.8", "AR(1) 0.8 on half the variance + noise", "arn", rho=0.8, share=0.5),
)


@dataclass(frozen=True)
class Case:
    """Margin kind and direction, with how the paired values are made.

    ``gauss``: log ratios (relative) or differences, Gaussian with sd ``sd`` around the
    tolerance line. ``arms``: each arm's value is lognormal around its level (production
    ``BASE``, candidate ``BASE`` plus the margin) with the dependence on each arm's log-noise
    of sd ``sd``, and the paired value is their difference (absolute margins). ``skewed``:
    differences with centred exponential innovations (skewness 2), a stress case.
    """

    key: str
    relative: bool
    direction: Direction
    margin: float
    sd: float
    model: str = "gauss"  # gauss | arms | skewed
    target: bool = True  # part of the validity targets

    @property
    def centre(self) -> float:
        """The tolerance line on the test scale (where the mean sits at the margin)."""
        sign = 1.0 if self.direction is Direction.INCREASE else -1.0
        return math.log1p(sign * self.margin) if self.relative else sign * self.margin

    @property
    def tolerance(self) -> float:
        return math.exp(self.centre) if self.relative else self.centre

    @property
    def floor(self) -> float:
        return DEFAULT_SD_FLOOR_FRACTION * abs(self.centre)

    def values(self, dep: Dependence, rng: np.random.Generator, runs: int, windows: int):
        """Paired values of ``runs`` runs over ``windows`` windows, mean at the margin."""
        if self.model == "arms":
            a = dep.generate(rng, runs, windows, skewed=False)
            b = dep.generate(rng, runs, windows, skewed=False)
            s2 = self.sd * self.sd / 2.0
            prod = BASE * np.exp(self.sd * a - s2)
            cand = (BASE + self.centre) * np.exp(self.sd * b - s2)
            return cand - prod
        e = dep.generate(rng, runs, windows, skewed=self.model == "skewed")
        return self.centre + self.sd * e


BASE = 4.0  # production's level in the absolute rows (the margin is 1: +25%)
CASES = (
    Case("relative +20%, increase", True, Direction.INCREASE, 0.20, 0.10),
    Case("relative -10%, decrease", True, Direction.DECREASE, 0.10, 0.10),
    Case("absolute +1, increase", False, Direction.INCREASE, 1.0, 0.08, "arms"),
    Case("absolute -1, decrease", False, Direction.DECREASE, 1.0, 0.08, "arms"),
)
STRESS = (
    Case("absolute +1, skewed, increase", False, Direction.INCREASE, 1.0, 0.5, "skewed", False),
    Case("absolute -1, skewed, decrease", False, Direction.DECREASE, 1.0, 0.5, "skewed", False),
)
STRESS_DEPENDENCE = ("ar1-0.0", "ar1-0.6")


# -- the tests on running aggregates -----------------------------------------------------------


@dataclass
class Running:
    """What the analysis is fed after every window, for every run at once."""

    n: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray
    change_n: np.ndarray
    change_sq: np.ndarray
    batches: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]

    @classmethod
    def of(cls, x: np.ndarray, sizes: Sequence[int] = DEFAULT_BATCH_SIZES) -> Running:
        runs, windows = x.shape
        n = np.arange(1, windows + 1, dtype=float)
        d = np.diff(x, axis=1, prepend=x[:, :1])
        cum = np.concatenate([np.zeros((runs, 1)), x.cumsum(axis=1)], axis=1)
        batches = {}
        for b in sizes:
            s = np.zeros_like(x)
            if b <= windows:
                s[:, b - 1 :] = cum[:, b:] - cum[:, :-b]
            count = np.maximum(n - b + 1, 0.0)
            batches[b] = (count, s.cumsum(axis=1), (s * s).cumsum(axis=1))
        return cls(n, x.cumsum(1), (x * x).cumsum(1), n - 1.0, (d * d).cumsum(1), batches)


def before_interval(r: Running, alpha: float, floor: float) -> Interval:
    """The paired interval before this work: AR(1) allowance from the von Neumann estimate
    plus its first-order bias and one standard error, capped at 0.9; normal mixture."""
    nn, s, q, k, dq = r.n, r.total, r.total_sq, r.change_n, r.change_sq
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s / nn
        var = np.where(nn > 1, np.maximum(q - s * mean, 0.0) / (nn - 1.0), np.nan)
        raw = np.nan_to_num(np.where((k > 0) & (var > 0), 1.0 - (dq / k) / (2.0 * var), 0.0))
        upper = np.where(k > 0, raw + (1.0 + 3.0 * raw) / nn + 1.0 / np.sqrt(nn), 0.0)
        rho = np.clip(upper, 0.0, 0.9)
        var = np.maximum(var, floor * floor) * (1.0 + rho) / (1.0 - rho)
        g = normal_mixture_radius(nn, normal_mixture_rho2(DEFAULT_WINDOW_T_OPT, alpha), alpha)
        half = np.sqrt(var) * g
    ok = (nn > 1) & np.isfinite(half)
    return np.where(ok, mean - half, -np.inf), np.where(ok, mean + half, np.inf)


def new_interval(r: Running, alpha: float, floor: float) -> Interval:
    _, lo, hi, _ = paired_interval(
        r.n, r.total, r.total_sq, r.change_n, r.change_sq, alpha, sd_floor=floor
    )
    return lo, hi


def batches_interval(r: Running, alpha: float, floor: float) -> Interval:
    _, lo, hi, _ = paired_interval(
        r.n, r.total, r.total_sq, r.change_n, r.change_sq, alpha, sd_floor=floor,
        batches=r.batches,
    )  # fmt: skip
    return lo, hi


METHODS: dict[str, Callable[[Running, float, float], Interval]] = {
    "before": before_interval,
    "new": new_interval,
    "new + batches": batches_interval,
}


def first_decisions(
    lo: np.ndarray, hi: np.ndarray, case: Case, burn_in: int = DEFAULT_WINDOW_BURN_IN
) -> tuple[np.ndarray, np.ndarray]:
    """Window (1-based) of each run's first WORSE and first OK verdict; inf when never."""
    if case.relative:
        with np.errstate(over="ignore"):
            lo, hi = np.exp(lo), np.exp(hi)
    codes = verdict_codes(lo, hi, case.tolerance, case.direction)
    live = np.arange(1, lo.shape[1] + 1) >= max(burn_in, 2)

    def first(hit: np.ndarray) -> np.ndarray:
        hit = hit & live
        return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1.0, np.inf)

    return first(codes == WORSE_CODE), first(codes == OK_CODE)


# -- the runs -------------------------------------------------------------------------------


@dataclass
class MarginRow:
    dep: Dependence
    case: Case
    alpha: float
    runs: int
    # method -> (first WORSE, first OK) per run
    firsts: dict[str, tuple[np.ndarray, np.ndarray]]

    def count(self, method: str, which: int, horizon: int) -> int:
        return int((self.firsts[method][which] <= horizon).sum())


@dataclass
class PowerRow:
    rho: float
    sd: float
    ratio: float  # true candidate / production ratio (1.4: WORSE is right; 1.0: OK is right)
    alpha: float
    runs: int
    times: dict[str, np.ndarray]  # method -> windows to the right decision (inf: none)


@dataclass(frozen=True)
class Form:
    name: str
    runs: int
    windows: int
    horizons: tuple[int, ...]
    alphas: tuple[float, ...]
    deps: tuple[Dependence, ...]
    cases: tuple[Case, ...]
    power_runs: int
    stress: tuple[Case, ...] = ()


FULL = Form("full", 4000, 500, (10, 30, 100, 500), (0.05, 0.0125), DEPENDENCE, CASES, 4000, STRESS)
FAST = Form(
    "fast", 400, 200, (10, 30, 100, 200), (0.05,),
    tuple(d for d in DEPENDENCE if d.key in ("ar1-0.0", "ar1-0.6", "ar1-0.9", "ma3")),
    CASES[:1], 400,
)  # fmt: skip


def margin_rows(form: Form, seed: int, log: Callable[[str], None]) -> list[MarginRow]:
    rows = []
    for i, dep in enumerate(form.deps):
        cases = form.cases + (form.stress if dep.key in STRESS_DEPENDENCE else ())
        for j, case in enumerate(cases):
            t0 = time.perf_counter()
            rng = np.random.default_rng([seed, i, j])
            running = Running.of(case.values(dep, rng, form.runs, form.windows))
            for alpha in form.alphas:
                firsts = {}
                for name, method in METHODS.items():
                    lo, hi = method(running, alpha, case.floor)
                    firsts[name] = first_decisions(lo, hi, case)
                rows.append(MarginRow(dep, case, alpha, form.runs, firsts))
            log(f"{dep.key} / {case.key}: {time.perf_counter() - t0:.1f} s")
    return rows


def power_rows(form: Form, seed: int, log: Callable[[str], None]) -> list[PowerRow]:
    """Relative margin 20%, increase; a candidate 40% heavier (WORSE is right) or equal (OK
    is right); AR(1) windows with sd 0.1 or 0.2 on the log scale."""
    case = CASES[0]
    rows = []
    for i, rho in enumerate((0.0, 0.6)):
        dep = Dependence("", "", "ar1", rho=rho)
        for j, sd in enumerate((0.1, 0.2)):
            rng = np.random.default_rng([seed, 100 + i, j])
            e = dep.generate(rng, form.power_runs, form.windows, skewed=False)
            for ratio in (1.4, 1.0):
                running = Running.of(math.log(ratio) + sd * e)
                for alpha in form.alphas:
                    times = {}
                    for name, method in METHODS.items():
                        lo, hi = method(running, alpha, case.floor)
                        worse, ok = first_decisions(lo, hi, case)
                        times[name] = worse if ratio > 1.2 else ok
                    lo, hi = oracle_interval(running, alpha, sd * sd * dep.long_run_factor)
                    worse, ok = first_decisions(lo, hi, case)
                    times["known variance"] = worse if ratio > 1.2 else ok
                    rows.append(PowerRow(rho, sd, ratio, alpha, form.power_runs, times))
            log(f"power rho {rho} sd {sd}")
    return rows


def oracle_interval(r: Running, alpha: float, long_run_var: float) -> Interval:
    """Normal mixture with the true long-run variance: what no estimate can beat."""
    mean = r.total / r.n
    g = normal_mixture_radius(r.n, normal_mixture_rho2(DEFAULT_WINDOW_T_OPT, alpha), alpha)
    half = math.sqrt(long_run_var) * g
    return mean - half, mean + half


# -- report -----------------------------------------------------------------------------------


def _pct(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"


def margin_table(rows: list[MarginRow], form: Form, alpha: float) -> str:
    rows = [r for r in rows if r.alpha == alpha]
    hs = form.horizons
    last = hs[-1]
    head = (
        "| dependence (long-run var. factor) | margin | runs | "
        + " | ".join(f"WORSE / OK by {h}" for h in hs[:-1])
        + f" | false WORSE by {last} [Wilson 95%] | false OK by {last} [Wilson 95%]"
        + f" | before: WORSE / OK by {last} | new without batches: WORSE / OK by {last} |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    m = "new + batches"
    for r in rows:
        short = " | ".join(
            f"{100 * r.count(m, 0, h) / r.runs:.2f} / {100 * r.count(m, 1, h) / r.runs:.2f}"
            for h in hs[:-1]
        )
        flag = ""
        for which in (0, 1):
            if wilson(r.count(m, which, last), r.runs)[1] > 1.5 * alpha:
                flag = " **!**"
        before = " / ".join(f"{100 * r.count('before', w, last) / r.runs:.2f}" for w in (0, 1))
        new = " / ".join(f"{100 * r.count('new', w, last) / r.runs:.2f}" for w in (0, 1))
        lines.append(
            f"| {r.dep.title} ({r.dep.long_run_factor:.1f}) | {r.case.key} | {r.runs} | {short} | "
            f"{_pct(r.count(m, 0, last), r.runs)} | {_pct(r.count(m, 1, last), r.runs)}{flag} | "
            f"{before} | {new} |"
        )
    return "\n".join(lines)


def _times(t: np.ndarray) -> str:
    done = np.isfinite(t).mean()
    if done < 0.5:
        return f"- / - ({100 * done:.0f}%)"
    with np.errstate(invalid="ignore"):  # inf - inf between never-decided runs
        median, p90 = np.quantile(t, [0.5, 0.9], method="lower")
    p90s = f"{p90:.0f}" if np.isfinite(p90) else ">H"
    return f"{median:.0f} / {p90s} ({100 * done:.0f}%)"


def power_table(rows: list[PowerRow], horizon: int) -> str:
    methods = ("before", "new", "new + batches", "known variance")
    head = (
        "| alpha | lag-1 autocorr. | sd per window | candidate | decision | runs | "
        + " | ".join(methods)
        + " |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        decision = "WORSE" if r.ratio > 1.2 else "OK"
        cells = " | ".join(_times(r.times[m]) for m in methods)
        lines.append(
            f"| {r.alpha} | {r.rho} | {r.sd} | x{r.ratio} | {decision} | {r.runs} | {cells} |"
        )
    return "\n".join(lines) + (
        f"\n\nWindows to the right decision: median / 90th percentile (share of runs decided "
        f"within {horizon} windows); '-' when fewer than half decided."
    )


def check(rows: list[MarginRow], form: Form) -> list[str]:
    """Targets: false WORSE and false OK at the margin at most alpha, and the Wilson upper
    bound at most 1.5 alpha, for every supported dependence (all but the 0.8 component)."""
    missed = []
    last = form.horizons[-1]
    for r in rows:
        if r.dep.key == "arn-0.8" or not r.case.target:
            continue
        for which, label in ((0, "false WORSE"), (1, "false OK")):
            k = r.count("new + batches", which, last)
            if k / r.runs > r.alpha or wilson(k, r.runs)[1] > 1.5 * r.alpha:
                missed.append(f"{r.dep.key} / {r.case.key} / alpha {r.alpha}: {label} {k}/{r.runs}")
    return missed


def summary_lines(margin: list[MarginRow], power: list[PowerRow], form: Form) -> list[str]:
    """Largest false-decision rates per group and alpha, and the time-to-decision ratios."""
    last = form.horizons[-1]
    groups = (
        ("target rows (AR(1) 0-0.9, MA(3), AR(1) 0.7 component)", lambda r: r.case.target
         and r.dep.key != "arn-0.8"),
        ("AR(1) 0.8 component + noise (not covered)", lambda r: r.case.target
         and r.dep.key == "arn-0.8"),
        ("skewed windows (stress, not a target)", lambda r: not r.case.target),
    )  # fmt: skip
    lines = []
    for alpha in form.alphas:
        for title, keep in groups:
            rows = [r for r in margin if r.alpha == alpha and keep(r)]
            if not rows:
                continue
            cells = []
            for method in METHODS:
                k, r = max(
                    ((r.count(method, w, last), r) for r in rows for w in (0, 1)),
                    key=lambda t: t[0],
                )
                hi = wilson(k, r.runs)[1]
                cells.append(f"{method} {100 * k / r.runs:.2f}% (Wilson upper {100 * hi:.2f}%)")
            lines.append(f"- alpha {alpha}, {title}: largest false WORSE or OK by window "
                         f"{last}: " + "; ".join(cells))  # fmt: skip
    with np.errstate(invalid="ignore"):  # inf - inf where runs never decided
        ratios = [
            float(np.median(r.times["new + batches"]) / np.median(r.times["before"])) for r in power
        ]
    ratios = [x for x in ratios if math.isfinite(x)]
    if ratios:
        lines.append(
            f"- Time to a decision, new + batches over before (medians): {min(ratios):.1f} to "
            f"{max(ratios):.1f} times the windows."
        )
    return lines


def report(
    margin: list[MarginRow], power: list[PowerRow], form: Form, seed: int, seconds: float,
    command: str,
) -> str:  # fmt: skip
    parts = [
        "# Paired windows (resource signals): simulation report",
        "",
        f"Generated by `{command}` (seed {seed}, {form.runs} runs per row, {seconds:.0f} s on "
        "this 2-core machine at nice 10, one process). Every figure below is measured by that "
        "run; nothing is typed in.",
        "",
        "Setup: each run is one canary's per-window paired values (log ratio for relative "
        "margins, difference for absolute ones), their mean exactly at the tolerance line; "
        "the test is evaluated after **every window** from the burn-in "
        f"({DEFAULT_WINDOW_BURN_IN} windows) to {form.windows}, on the running aggregates the "
        "analysis is fed, with `canary.stats.paired_interval` itself. Any WORSE or OK verdict "
        "is a false decision. Relative rows: Gaussian log ratios, sd 0.1 per window, margin "
        "+20% (increase) or -10% (decrease). Absolute rows: each arm's value lognormal "
        f"around its level (production {BASE:g}, candidate {BASE:g} +/- 1, log-sd 0.08, the "
        "dependence on each arm's log-noise), the paired value their difference, margin 1. "
        "Skewed rows (a stress case, not a target): differences with centred exponential "
        "innovations (skewness 2), sd 0.5. 'new + batches' is the test "
        f"fed sums of {', '.join(map(str, DEFAULT_BATCH_SIZES))} consecutive windows as well "
        "(what `resources.py` should record); 'new' is fed only the squared changes it gets "
        "today; 'before' is the test before this work, on the same data.",
        "",
        "## Summary",
        "",
        *summary_lines(margin, power, form),
        "",
        "Method (see `canary.stats.paired_interval`, Notes): an upper confidence bound for the "
        "lag-1 autocorrelation from the von Neumann ratio with its small-sample distribution "
        "under AR(1), the exact finite-n AR(1) variance of the mean at that bound, a "
        "Student-ised mixture boundary with the bound's effective degrees of freedom, and, "
        "with batches, the overlapping-batch-means long-run variance (Bartlett kernel) once "
        "it has 10 degrees of freedom; the widest radius wins. Dependence that lag 1 "
        "understates is caught through the batches only once the windows are several times "
        "its correlation time, hence the 0.8-component rows.",
        "",
    ]
    for alpha in form.alphas:
        parts += [
            f"## False decisions at the margin, alpha = {alpha}",
            "",
            "Percent of runs with a WORSE / OK verdict by the given window; the Wilson 95% "
            "interval for the whole horizon; **!** marks an upper end above 1.5 alpha.",
            "",
            margin_table(margin, form, alpha),
            "",
        ]
    parts += [
        "## Time to a decision (relative margin +20%, increase)",
        "",
        "A candidate 40% heavier (twice the margin: WORSE is right) or equal (OK is right). "
        "'known variance': the normal mixture with the true long-run variance, a bound no "
        "estimate reaches.",
        "",
        power_table(power, form.windows),
        "",
    ]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="CI form: fewer runs and rows")
    parser.add_argument("--write-docs", action="store_true", help="write the report")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--runs", type=int, help="override the number of runs per row")
    parser.add_argument("--windows", type=int, help="override the horizon (windows)")
    parser.add_argument("--out", type=Path, default=Path("docs/paired-simulation.md"))
    args = parser.parse_args(argv)
    if args.fast and args.write_docs:
        parser.error("--write-docs needs the full form")
    form = FAST if args.fast else FULL
    if args.runs or args.windows:
        windows = args.windows or form.windows
        form = Form(
            form.name, args.runs or form.runs, windows,
            (*(h for h in form.horizons if h < windows), windows),
            form.alphas, form.deps, form.cases, args.runs or form.power_runs, form.stress,
        )  # fmt: skip

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    margin = margin_rows(form, args.seed, log)
    power = power_rows(form, args.seed, log)
    seconds = time.perf_counter() - start
    for alpha in form.alphas:
        print(f"\nFalse decisions at the margin, alpha = {alpha}\n")
        print(margin_table(margin, form, alpha))
    print("\nTime to a decision\n")
    print(power_table(power, form.windows))
    print()
    print("\n".join(summary_lines(margin, power, form)))
    missed = check(margin, form)
    for m in missed:
        print(f"TARGET MISSED: {m}")
    if args.write_docs:
        command = "nice -n 10 python -m loadtest.paired_sim --write-docs"
        args.out.write_text(report(margin, power, form, args.seed, seconds, command))
        log(f"wrote {args.out}")
    log(f"total {seconds:.0f} s")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
