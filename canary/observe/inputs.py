"""Input health: what the clients send, per configured JSON field of the request body.

For each field of ``inputs.fields`` the proxy counts, per request, the field's JSON type
(number, string, bool, null, missing, object, array) and, for numbers, the count, sum, sum of
squares, minimum and maximum. A baseline is either learned from the first
``baseline.requests`` inspected requests (then frozen) or given in the config; after it, a
sequential drift test per field compares the requests since the baseline with it:

- the **mean** of the numeric values: an asymptotic confidence sequence on the difference of
  means (:func:`mean_shift_cs`), flagged when it lies wholly beyond ``tolerance.mean``
  baseline standard deviations;
- the **null rate** (null or missing) and the **share of each other type**: beta-mixture
  confidence sequences on proportions (:func:`proportion_shift_cs`), flagged when the
  difference lies wholly beyond ``tolerance.rate``.

Every check is anytime-valid and ``alpha`` is split equally over all of them
(``alpha / (7 x fields)``), so the probability that a field is ever flagged while the inputs
are within the tolerances is at most ``alpha``, however often the tests are evaluated.

:meth:`InputMonitor.observe` is the only hot-path call: one ``json.loads`` of a buffered body
up to ``max_body`` bytes and O(number of fields) integer and float updates, no I/O, no
allocation that stays. The tests run lazily, at most once per second, when the metrics, the
admin API or the controller ask (:meth:`InputMonitor.report`).

The state is per process and in memory only: it is not in the shared store, a restart
starts a new baseline, and a reload keeps it only while the rollout's ``inputs`` are unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special

from canary.observe.signals import JsonPath
from canary.stats import bernoulli_cs, normal_mixture_radius, normal_mixture_rho2

if TYPE_CHECKING:
    from canary.config import InputsConfig

log = logging.getLogger("canary.inputs")

FloatArray = NDArray[np.float64]

TYPES: Final = ("number", "string", "bool", "null", "missing", "object", "array")
NUMBER, STRING, BOOL, NULL, MISSING, OBJECT, ARRAY = range(len(TYPES))
SHARE_TYPES: Final = ("number", "string", "bool", "object", "array")  # null/missing: null rate
CHECKS_PER_FIELD: Final = 2 + len(SHARE_TYPES)  # mean, null rate, one share per other type
RESULTS: Final = ("inspected", "unparseable", "not_inspected", "too_large")
INSPECTED, UNPARSEABLE, NOT_INSPECTED, TOO_LARGE = range(len(RESULTS))

MIN_MEAN_SAMPLES: Final = 30  # numeric values per window before the mean is tested
EVALUATE_EVERY: Final = 1.0  # seconds a report's drift tests are reused
T_OPT: Final = 1000.0  # requests at which the mean's confidence sequence is tightest

_MISSING: Final = object()
_WHITESPACE: Final = b" \t\r\n"


# -- statistics (pure, vectorised: the tests simulate them for thousands of runs at once) ----


def mean_shift_cs(
    n: ArrayLike,
    mean: ArrayLike,
    var: ArrayLike,
    base_mean: ArrayLike,
    base_std: ArrayLike,
    base_n: ArrayLike,
    alpha: float,
    t_opt: float = T_OPT,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Anytime-valid interval for the shift of a mean from its baseline.

    Parameters
    ----------
    n, mean, var : array_like
        Count, mean and (population) variance of the values since the baseline.
    base_mean, base_std : array_like
        Mean and standard deviation of the baseline.
    base_n : array_like
        Number of values the baseline was learned from, or ``inf`` when it was given (then
        it is taken as exact and the whole ``alpha`` goes to the current values).
    alpha : float
        Level: the interval misses the true shift at any time with probability <= alpha
        (asymptotically).
    t_opt : float
        Number of values at which the sequence is tightest.

    Returns
    -------
    estimate, lower, upper : ndarray
        :math:`\\bar x_n - m_b` and the bounds on :math:`\\mu - \\mu_b` (``-inf``/``inf`` when
        ``n`` is 0).

    Notes
    -----
    The values since the baseline get the one-sample Gaussian-mixture asymptotic confidence
    sequence

    .. math:: \\bar x_n \\pm \\hat\\sigma_n\\, g_n, \\qquad
              g_n = \\sqrt{\\frac{2(n\\rho^2 + 1)}{n^2\\rho^2}
              \\log\\frac{\\sqrt{n\\rho^2 + 1}}{a}}

    (:func:`canary.stats.normal_mixture_radius`), with :math:`\\hat\\sigma_n^2` the sample
    variance floored by the baseline's (a small sample that has not yet seen the tails has a
    too small variance; the floor only widens the interval, so the sequence stays valid).
    A learned baseline is one fixed sample of ``base_n`` values taken before the current
    ones: its mean gets the fixed-sample interval :math:`m_b \\pm z_{1-\\alpha/4}
    s_b/\\sqrt{n_b}`, the current sequence is built at :math:`a = \\alpha/2`, and the union
    bound makes :math:`[\\bar x_n - m_b - h_n - h_b,\\ \\bar x_n - m_b + h_n + h_b]` a
    (1 - alpha) sequence for :math:`\\mu - \\mu_b`. A given baseline is exact: :math:`a =
    \\alpha`, :math:`h_b = 0`.

    References
    ----------
    Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas (2024), "Time-uniform central limit theory
    and asymptotic confidence sequences", Ann. Statist., Theorem 2.2 (Gaussian-mixture
    AsympCS for the mean of i.i.d. observations) and Sec. 2.3 (tuning rho).
    """
    nn, m, v, mb, sb, nb = np.broadcast_arrays(
        *(np.asarray(x, dtype=float) for x in (n, mean, var, base_mean, base_std, base_n))
    )
    learned = np.isfinite(nb)
    est = m - mb
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(
            learned,
            normal_mixture_radius(nn, normal_mixture_rho2(t_opt, alpha / 2.0), alpha / 2.0),
            normal_mixture_radius(nn, normal_mixture_rho2(t_opt, alpha), alpha),
        )
        z = float(special.ndtri(1.0 - alpha / 4.0))
        half_b = np.where(learned, z * sb / np.sqrt(np.where(learned, nb, 1.0)), 0.0)
        half = g * np.sqrt(np.maximum(v, sb * sb)) + half_b
    half = np.where(nn > 0, half, np.inf)
    return est, est - half, est + half


def proportion_shift_cs(
    n: ArrayLike,
    k: ArrayLike,
    base_n: ArrayLike,
    base_k: ArrayLike,
    base_p: ArrayLike,
    alpha: float,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Anytime-valid interval for the shift of a proportion from its baseline.

    Parameters
    ----------
    n, k : array_like
        Requests since the baseline and how many of them had the property.
    base_n, base_k : array_like
        The same for a learned baseline; ``base_n = inf`` when the baseline was given.
    base_p : array_like
        The given baseline proportion (used where ``base_n`` is ``inf``).
    alpha : float
        Level of the two-sided sequence.

    Returns
    -------
    estimate, lower, upper : ndarray
        :math:`k/n - p_b` and bounds on :math:`p - p_b`.

    Notes
    -----
    The same construction as :func:`canary.stats.rate_test` on the difference scale: the
    beta-mixture confidence sequence of :func:`canary.stats.bernoulli_cs` for each sample at
    ``alpha / 2`` (for the current one; the learned baseline is one of its fixed times) and
    :math:`[l - u_b,\\ u - l_b]` by the union bound. A given baseline proportion is exact:
    the current sequence gets the whole ``alpha`` and :math:`[l - p_b,\\ u - p_b]`.

    References
    ----------
    Robbins (1970), Ann. Math. Statist. 41(5), Sec. 3 (beta mixture); Howard, Ramdas,
    McAuliffe & Sekhon (2021), Ann. Statist. 49(2), Prop. 7.
    """
    nn, kk, nb, kb, pb = np.broadcast_arrays(
        *(np.asarray(x, dtype=float) for x in (n, k, base_n, base_k, base_p))
    )
    shape = nn.shape
    nn, kk, nb, kb, pb = (np.atleast_1d(x).ravel() for x in (nn, kk, nb, kb, pb))
    learned = np.isfinite(nb)
    lower, upper = np.empty_like(nn), np.empty_like(nn)
    if learned.any():
        i = learned
        lo, hi = bernoulli_cs(nn[i], kk[i], alpha / 2.0)
        lo_b, hi_b = bernoulli_cs(nb[i], kb[i], alpha / 2.0)
        lower[i], upper[i] = lo - hi_b, hi - lo_b
    if not learned.all():
        i = ~learned
        lo, hi = bernoulli_cs(nn[i], kk[i], alpha)
        lower[i], upper[i] = lo - pb[i], hi - pb[i]
    with np.errstate(divide="ignore", invalid="ignore"):
        p_now = np.where(nn > 0, kk / np.where(nn > 0, nn, 1.0), np.nan)
        p_base = np.where(learned, kb / np.where(learned & (nb > 0), nb, 1.0), pb)
    est = p_now - p_base
    return est.reshape(shape), lower.reshape(shape), upper.reshape(shape)


# -- per-request accumulation (the hot path) -------------------------------------------------


class _Window:
    """Counts of one field over one window (the baseline, or the requests since it)."""

    __slots__ = ("counts", "hi", "lo", "n_num", "q", "s")

    def __init__(self) -> None:
        self.counts = [0] * len(TYPES)
        self.n_num = 0  # finite numbers
        self.s = 0.0  # sum of (x - shift)
        self.q = 0.0  # sum of (x - shift)**2
        self.lo = math.inf
        self.hi = -math.inf

    @property
    def requests(self) -> int:
        return sum(self.counts)


class _Field:
    __slots__ = ("base", "now", "path", "segments", "shift")

    def __init__(self, path: str) -> None:
        self.path = path
        self.segments = JsonPath(path).segments  # the json: signal syntax, validated the same way
        self.shift: float | None = None  # first number seen: keeps the sums well conditioned
        self.base = _Window()
        self.now = _Window()


# -- reports (read side) ---------------------------------------------------------------------


@dataclass(frozen=True)
class WindowSummary:
    """A field over one window: requests, type shares, null rate and numeric moments."""

    requests: int | None  # None for a given baseline
    types: dict[str, float]  # share of requests per type (types never seen are left out)
    null_rate: float | None
    numbers: int | None
    mean: float | None
    std: float | None
    min: float | None
    max: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "types": dict(self.types),
            "null_rate": self.null_rate,
            "numbers": self.numbers,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
        }


@dataclass(frozen=True)
class DriftCheck:
    """One sequential test of a field: its estimate, interval, tolerance and flag."""

    check: str  # "mean", "null_rate" or "type:<name>"
    estimate: float
    lower: float
    upper: float
    tolerance: float  # +-, in the check's unit (the field's unit for the mean, a fraction else)
    samples: int
    drifted: bool

    def explain(self) -> str:
        unit = "" if self.check == "mean" else "pp"
        scale = 1.0 if self.check == "mean" else 100.0
        what = "shifted beyond" if self.drifted else "not shown beyond"
        return (
            f"{self.check} {what} +-{self.tolerance * scale:.3g}{unit}: change "
            f"{self.estimate * scale:+.3g}{unit} in [{self.lower * scale:+.3g}, "
            f"{self.upper * scale:+.3g}]{unit}, n={self.samples}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "estimate": _num(self.estimate),
            "lower": _num(self.lower),
            "upper": _num(self.upper),
            "tolerance": self.tolerance,
            "samples": self.samples,
            "drifted": self.drifted,
            "explain": self.explain(),
        }


@dataclass(frozen=True)
class FieldReport:
    field: str
    values: dict[str, int]  # every request since start, by type (the metrics' counters)
    baseline: WindowSummary
    current: WindowSummary  # the requests since the baseline
    checks: tuple[DriftCheck, ...]

    @property
    def drifted(self) -> bool:
        return any(c.drifted for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "field": self.field,
            "drifted": self.drifted,
            "baseline": self.baseline.to_dict(),
            "current": self.current.to_dict(),
            "checks": [c.to_dict() for c in self.checks],
        }


@dataclass(frozen=True)
class InputReport:
    """Everything the metrics and the admin API show about a rollout's inputs."""

    rollout: str
    learning: bool  # the baseline is still being learned (no drift test yet)
    baseline_source: str  # "learned" | "config"
    baseline_requests: int | None  # learned so far (None when given)
    baseline_target: int | None
    requests: dict[str, int]  # by result: inspected, unparseable, not_inspected, too_large
    fields: tuple[FieldReport, ...]
    alpha: float
    on_drift: str
    tested_at: float | None = None  # monotonic time of the drift tests shown
    drifted: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": "learning" if self.learning else "monitoring",
            "baseline": {
                "source": self.baseline_source,
                "requests": self.baseline_requests,
                "target": self.baseline_target,
            },
            "requests": dict(self.requests),
            "alpha": self.alpha,
            "on_drift": self.on_drift,
            "drifted": list(self.drifted),
            "fields": [f.to_dict() for f in self.fields],
        }


def _num(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


# -- the monitor -----------------------------------------------------------------------------


class InputMonitor:
    """Input health of one rollout: :meth:`observe` per request, :meth:`report` to read."""

    __slots__ = (
        "_base_cache",
        "_base_n",
        "_checks",
        "_checks_at",
        "_clock",
        "_fields",
        "_flagged",
        "_given",
        "_learning",
        "_max_body",
        "_results",
        "_target",
        "alpha",
        "config",
        "on_drift",
        "rollout",
    )

    def __init__(
        self,
        rollout: str,
        config: InputsConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rollout = rollout
        self.config = config
        self.alpha = config.alpha
        self.on_drift = config.on_drift
        self._clock = clock
        self._fields = tuple(_Field(p) for p in config.fields)
        self._max_body = config.max_body
        self._results = [0] * len(RESULTS)
        self._given = config.baseline.fields
        self._target = config.baseline.requests
        self._learning = self._target is not None
        self._base_n = 0  # inspected requests in the learned baseline
        self._base_cache: tuple[FloatArray, FloatArray] | None = None  # frozen baseline arrays
        self._checks: tuple[tuple[DriftCheck, ...], ...] | None = None
        self._checks_at = -math.inf
        self._flagged: set[str] = set()

    # -- hot path ---------------------------------------------------------------------------

    def observe(self, body: bytes) -> None:
        """Count one buffered request body. Never raises; O(fields), no I/O."""
        results = self._results
        try:
            if len(body) > self._max_body:
                results[TOO_LARGE] += 1
                return
            head = body[:1]
            if head and head in _WHITESPACE:
                head = body.lstrip(_WHITESPACE)[:1]
            if head != b"{" and head != b"[":  # a cheap test before paying for json.loads
                results[UNPARSEABLE] += 1
                return
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError):  # invalid JSON or UTF-8, too deep, huge ints
                results[UNPARSEABLE] += 1
                return
            results[INSPECTED] += 1
            learning = self._learning
            for f in self._fields:
                w = f.base if learning else f.now
                v: Any = doc
                # The value at the path; _MISSING when absent (JsonPath.resolve maps a JSON null
                # to None as well, but here null and missing are different types).
                for key, idx in f.segments:
                    if type(v) is dict:
                        v = v.get(key, _MISSING)
                        if v is _MISSING:
                            break
                    elif type(v) is list and 0 <= idx < len(v):
                        v = v[idx]
                    else:
                        v = _MISSING
                        break
                t = type(v)
                if t is float or t is int:
                    w.counts[NUMBER] += 1
                    try:
                        x = float(v)
                    except OverflowError:
                        continue
                    if x - x != 0.0:  # inf or nan (json.loads accepts NaN/Infinity): no moments
                        continue
                    shift = f.shift
                    if shift is None:
                        shift = f.shift = x
                    d = x - shift
                    w.n_num += 1
                    w.s += d
                    w.q += d * d
                    if x < w.lo:
                        w.lo = x
                    if x > w.hi:
                        w.hi = x
                elif t is str:
                    w.counts[STRING] += 1
                elif v is None:
                    w.counts[NULL] += 1
                elif v is _MISSING:
                    w.counts[MISSING] += 1
                elif t is bool:
                    w.counts[BOOL] += 1
                elif t is dict:
                    w.counts[OBJECT] += 1
                else:
                    w.counts[ARRAY] += 1
            if learning:
                self._base_n += 1
                if self._base_n >= self._target:  # type: ignore[operator]
                    self._freeze()
        except Exception:  # unreachable by design; a body must never break a request
            results[UNPARSEABLE] += 1

    def not_inspected(self) -> None:
        """Count a request whose body was streamed upstream (or absent): nothing to parse."""
        self._results[NOT_INSPECTED] += 1

    def _freeze(self) -> None:
        self._learning = False  # later requests are compared with the baseline
        log.info(
            "rollout %s: input baseline learned from %d requests; drift tests start",
            self.rollout,
            self._base_n,
        )

    # -- read side (off the hot path) -----------------------------------------------------------

    @property
    def learning(self) -> bool:
        return self._learning

    def drifted_fields(self, max_age: float = EVALUATE_EVERY) -> list[str]:
        """Fields whose drift test flags a shift now (tests rerun when older than ``max_age``)."""
        return list(self.report(max_age).drifted)

    def report(self, max_age: float = EVALUATE_EVERY) -> InputReport:
        """Counts and summaries as of now; the drift tests are rerun when older than
        ``max_age`` seconds (0 reruns them)."""
        now = self._clock()
        if self._checks is None or now - self._checks_at >= max_age:
            self._checks = self._run_checks()
            self._checks_at = now
            self._log_changes(self._checks)
        fields = []
        for f, checks in zip(self._fields, self._checks, strict=True):
            fields.append(
                FieldReport(
                    field=f.path,
                    values={
                        t: f.base.counts[i] + f.now.counts[i]
                        for i, t in enumerate(TYPES)
                        if f.base.counts[i] + f.now.counts[i]
                    },
                    baseline=self._baseline_summary(f),
                    current=_summary(f.now, f.shift),
                    checks=checks,
                )
            )
        return InputReport(
            rollout=self.rollout,
            learning=self._learning,
            baseline_source="config" if self._given is not None else "learned",
            baseline_requests=None if self._given is not None else self._base_n,
            baseline_target=self._target,
            requests=dict(zip(RESULTS, self._results, strict=True)),
            fields=tuple(fields),
            alpha=self.alpha,
            on_drift=self.on_drift,
            tested_at=self._checks_at,
            drifted=tuple(r.field for r in fields if r.drifted),
        )

    def _baseline_summary(self, f: _Field) -> WindowSummary:
        if self._given is None:
            return _summary(f.base, f.shift)
        g = self._given[f.path]
        types: dict[str, float] = {t: v for t, v in (g.types or {}).items()}
        null_rate = g.null_rate
        if null_rate is None and g.types is not None:
            null_rate = types.get("null", 0.0) + types.get("missing", 0.0)
        return WindowSummary(None, types, null_rate, None, g.mean, g.std, None, None)

    def _log_changes(self, checks: tuple[tuple[DriftCheck, ...], ...]) -> None:
        for f, field_checks in zip(self._fields, checks, strict=True):
            hits = [c for c in field_checks if c.drifted]
            if hits and f.path not in self._flagged:
                self._flagged.add(f.path)
                log.warning(
                    "rollout %s: input drift on field %s: %s",
                    self.rollout,
                    f.path,
                    "; ".join(c.explain() for c in hits),
                )
            elif not hits and f.path in self._flagged:
                self._flagged.discard(f.path)
                log.info("rollout %s: field %s is back within tolerance", self.rollout, f.path)

    # -- the drift tests ------------------------------------------------------------------------

    def _baseline_arrays(self) -> tuple[FloatArray, FloatArray]:
        """Per field and proportion check, (n, k) of the learned baseline; cached once frozen."""
        if self._base_cache is not None:
            return self._base_cache
        n = np.array([[f.base.requests] * (1 + len(SHARE_TYPES)) for f in self._fields], float)
        k = np.array([_proportion_counts(f.base) for f in self._fields], float)
        if not self._learning:
            self._base_cache = (n, k)
        return n, k

    def _run_checks(self) -> tuple[tuple[DriftCheck, ...], ...]:
        nf = len(self._fields)
        if self._learning or nf == 0:
            return tuple(() for _ in self._fields)
        a = self.alpha / (CHECKS_PER_FIELD * nf)
        tol_mean = self.config.tolerance.mean
        tol_rate = self.config.tolerance.rate.value
        names = ("null_rate", *(f"type:{t}" for t in SHARE_TYPES))
        cur_n = np.array([[f.now.requests] * len(names) for f in self._fields], float)
        cur_k = np.array([_proportion_counts(f.now) for f in self._fields], float)
        if self._given is None:
            base_n, base_k = self._baseline_arrays()
            base_p = np.zeros_like(base_n)
        else:
            base_n = np.full_like(cur_n, np.inf)
            base_k = np.zeros_like(cur_n)
            base_p = np.full_like(cur_n, np.nan)
            for i, f in enumerate(self._fields):
                g = self._given[f.path]
                if g.null_rate is not None:
                    base_p[i, 0] = g.null_rate
                if g.types is not None:
                    shares = [g.types.get(t, 0.0) for t in SHARE_TYPES]
                    base_p[i, 1:] = shares
                    if g.null_rate is None:
                        base_p[i, 0] = g.types.get("null", 0.0) + g.types.get("missing", 0.0)
        est, lo, hi = proportion_shift_cs(cur_n, cur_k, base_n, base_k, base_p, a)

        out: list[tuple[DriftCheck, ...]] = []
        for i, f in enumerate(self._fields):
            checks: list[DriftCheck] = []
            mean_check = self._mean_check(f, a, tol_mean)
            if mean_check is not None:
                checks.append(mean_check)
            n_now = int(cur_n[i, 0])
            for j, name in enumerate(names):
                if n_now == 0 or math.isnan(est[i, j]):
                    continue  # no data yet, or nothing given for this check
                if j > 0 and cur_k[i, j] == 0 and _base_share(base_n, base_k, base_p, i, j) == 0:
                    continue  # a type never seen on either side: nothing to show
                checks.append(
                    DriftCheck(
                        check=name,
                        estimate=float(est[i, j]),
                        lower=float(lo[i, j]),
                        upper=float(hi[i, j]),
                        tolerance=tol_rate,
                        samples=n_now,
                        drifted=bool(lo[i, j] > tol_rate or hi[i, j] < -tol_rate),
                    )
                )
            out.append(tuple(checks))
        return tuple(out)

    def _mean_check(self, f: _Field, a: float, tol: float) -> DriftCheck | None:
        now = f.now
        if now.n_num < MIN_MEAN_SAMPLES or f.shift is None:
            return None
        if self._given is None:
            base = f.base
            if base.n_num < MIN_MEAN_SAMPLES:
                return None
            b_mean = f.shift + base.s / base.n_num
            b_var = max(base.q - base.s * base.s / base.n_num, 0.0) / (base.n_num - 1)
            b_std, b_n = math.sqrt(b_var), float(base.n_num)
        else:
            g = self._given[f.path]
            if g.mean is None or g.std is None:
                return None
            b_mean, b_std, b_n = g.mean, g.std, math.inf
        m = now.s / now.n_num
        var = max(now.q / now.n_num - m * m, 0.0)
        est, lo, hi = mean_shift_cs(now.n_num, f.shift + m, var, b_mean, b_std, b_n, a)
        margin = tol * b_std
        lower, upper = float(lo), float(hi)
        return DriftCheck(
            check="mean",
            estimate=float(est),
            lower=lower,
            upper=upper,
            tolerance=margin,
            samples=now.n_num,
            drifted=lower > margin or upper < -margin,
        )


def _proportion_counts(w: _Window) -> list[int]:
    """Null-or-missing count, then the count of each of SHARE_TYPES."""
    c = w.counts
    return [c[NULL] + c[MISSING], c[NUMBER], c[STRING], c[BOOL], c[OBJECT], c[ARRAY]]


def _base_share(
    base_n: FloatArray, base_k: FloatArray, base_p: FloatArray, i: int, j: int
) -> float:
    if math.isfinite(base_n[i, j]):
        return float(base_k[i, j] / base_n[i, j]) if base_n[i, j] > 0 else 0.0
    return float(base_p[i, j])


def _summary(w: _Window, shift: float | None) -> WindowSummary:
    n = w.requests
    types = {t: w.counts[i] / n for i, t in enumerate(TYPES) if w.counts[i]} if n else {}
    null_rate = (w.counts[NULL] + w.counts[MISSING]) / n if n else None
    mean = std = lo = hi = None
    if w.n_num and shift is not None:
        m = w.s / w.n_num
        mean = shift + m
        std = math.sqrt(max(w.q - w.s * m, 0.0) / (w.n_num - 1)) if w.n_num > 1 else None
        lo, hi = w.lo, w.hi
    return WindowSummary(n, types, null_rate, w.n_num, mean, std, lo, hi)


__all__ = [
    "CHECKS_PER_FIELD",
    "RESULTS",
    "TYPES",
    "DriftCheck",
    "FieldReport",
    "InputMonitor",
    "InputReport",
    "WindowSummary",
    "mean_shift_cs",
    "proportion_shift_cs",
]
