"""Input and result types of the statistics engine, and the verdict rule."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]

# Strata are keyed by the propensity the arm was assigned with; keys that differ by less
# than this are the same stratum (weights arrive as floats such as 0.05 and 1 - 0.95).
PROPENSITY_DECIMALS = 9

WORSE_CODE = 1
OK_CODE = -1
UNKNOWN_CODE = 0


class Verdict(enum.StrEnum):
    """Outcome of one test against its tolerance."""

    WORSE = "worse"  # the whole interval is beyond the tolerance: provably worse than allowed
    OK = "ok"  # the whole interval is within the tolerance: provably no worse than allowed
    UNKNOWN = "unknown"  # not enough evidence either way (never a reason to roll back)


class MetricKind(enum.StrEnum):
    MEAN = "mean"
    QUANTILE = "quantile"
    DISTRIBUTION = "distribution"
    ERROR_RATE = "error_rate"
    RATE = "rate"
    SRM = "srm"
    NET_VALUE = "net_value"


class Direction(enum.StrEnum):
    """Which way is bad: ``INCREASE`` for ``max_increase`` (latency, cost, errors),
    ``DECREASE`` for ``max_decrease`` (accuracy, agreement, tokens/s)."""

    INCREASE = "increase"
    DECREASE = "decrease"


def _as_direction(direction: Direction | str) -> Direction:
    try:
        return Direction(direction)
    except ValueError:
        raise ValueError(f"direction must be 'increase' or 'decrease', got {direction!r}") from None


def tolerance_of(margin: float, relative: bool, direction: Direction) -> float:
    """The tolerance line on the result's scale.

    Relative margins compare the candidate/production ratio with ``1 + margin``
    (``1 - margin`` for ``DECREASE``); absolute margins compare the difference
    candidate - production with ``+margin`` (``-margin``).
    """
    sign = 1.0 if direction is Direction.INCREASE else -1.0
    return (1.0 if relative else 0.0) + sign * margin


def verdict_codes(
    lower: ArrayLike, upper: ArrayLike, tolerance: ArrayLike, direction: Direction | str
) -> NDArray[np.int8]:
    """Vectorised verdict rule: ``WORSE_CODE``, ``OK_CODE`` or ``UNKNOWN_CODE`` per element.

    For ``INCREASE``: WORSE when ``lower > tolerance``, OK when ``upper <= tolerance``.
    For ``DECREASE``: WORSE when ``upper < tolerance``, OK when ``lower >= tolerance``.
    NaN bounds compare false and give UNKNOWN.
    """
    lo = np.asarray(lower, dtype=float)
    hi = np.asarray(upper, dtype=float)
    tol = np.asarray(tolerance, dtype=float)
    if _as_direction(direction) is Direction.INCREASE:
        worse = lo > tol
        ok = hi <= tol
    else:
        worse = hi < tol
        ok = lo >= tol
    codes = np.zeros(np.broadcast(lo, hi, tol).shape, dtype=np.int8)
    codes[ok] = OK_CODE
    codes[worse] = WORSE_CODE
    return codes


_CODE_TO_VERDICT = {WORSE_CODE: Verdict.WORSE, OK_CODE: Verdict.OK, UNKNOWN_CODE: Verdict.UNKNOWN}


def classify(lower: float, upper: float, tolerance: float, direction: Direction | str) -> Verdict:
    """Scalar form of :func:`verdict_codes`."""
    return _CODE_TO_VERDICT[int(verdict_codes(lower, upper, tolerance, direction))]


def _check_counts(name: str, values: FloatArray, *, integer: bool) -> None:
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"{name} must be finite and >= 0, got {values.tolist()!r}")
    if integer and np.any(values != np.round(values)):
        raise ValueError(f"{name} must be whole numbers, got {values.tolist()!r}")


def _as_1d(name: str, values: ArrayLike) -> FloatArray:
    arr = np.atleast_1d(np.asarray(values, dtype=float))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _check_propensity(propensity: FloatArray) -> None:
    if np.any(~np.isfinite(propensity)) or np.any(propensity <= 0) or np.any(propensity > 1):
        raise ValueError(f"propensity must be in (0, 1], got {propensity.tolist()!r}")
    keys = np.round(propensity, PROPENSITY_DECIMALS)
    if np.unique(keys).size != keys.size:
        raise ValueError(f"propensity strata must be distinct, got {propensity.tolist()!r}")


@dataclass(frozen=True, eq=False)
class ArmMoments:
    """Mergeable sufficient statistics of one numeric signal on one arm, by propensity.

    One entry per stratum: ``propensity[s]`` is the probability with which requests of
    stratum ``s`` were assigned to this arm (the traffic weight of a step, e.g. 0.05 for the
    candidate at a 5% step and 0.95 for production), and ``n``, ``sum``, ``sumsq`` are the
    count, sum and sum of squares of the signal over this arm's observations in that stratum.
    A 0/1 signal (errors, correct predictions) has ``sum`` = number of ones.

    Strata of the two arms are paired by ``p_candidate = 1 - p_production``.
    """

    propensity: np.ndarray  # any numeric dtype; stored as float64
    n: np.ndarray  # any numeric dtype; stored as float64
    sum: np.ndarray  # any numeric dtype; stored as float64
    sumsq: np.ndarray  # any numeric dtype; stored as float64

    def __post_init__(self) -> None:
        arrays = {}
        for name in ("propensity", "n", "sum", "sumsq"):
            arrays[name] = _as_1d(name, getattr(self, name))
            object.__setattr__(self, name, arrays[name])
        shapes = {a.shape for a in arrays.values()}
        if len(shapes) != 1:
            raise ValueError(
                "propensity, n, sum and sumsq must have the same length, got "
                + ", ".join(f"{k}={v.shape[0]}" for k, v in arrays.items())
            )
        _check_propensity(self.propensity)
        _check_counts("n", self.n, integer=True)
        _check_counts("sumsq", self.sumsq, integer=False)
        if not np.all(np.isfinite(self.sum)):
            raise ValueError(f"sum must be finite, got {self.sum.tolist()!r}")

    @classmethod
    def from_strata(cls, strata: Mapping[float, tuple[float, float, float]]) -> ArmMoments:
        """Build from ``{propensity: (n, sum, sumsq)}``; equal propensities are merged."""
        merged: dict[float, list[float]] = {}
        for p, cell in strata.items():
            if len(cell) != 3:
                raise ValueError(f"stratum {p!r} must be (n, sum, sumsq), got {cell!r}")
            key = round(float(p), PROPENSITY_DECIMALS)
            acc = merged.setdefault(key, [0.0, 0.0, 0.0])
            for i in range(3):
                acc[i] += float(cell[i])
        keys = sorted(merged)
        return cls(
            propensity=np.array(keys, dtype=float),
            n=np.array([merged[k][0] for k in keys], dtype=float),
            sum=np.array([merged[k][1] for k in keys], dtype=float),
            sumsq=np.array([merged[k][2] for k in keys], dtype=float),
        )

    @classmethod
    def from_values(cls, values: ArrayLike, propensity: ArrayLike) -> ArmMoments:
        """Build from raw observations and the propensity each one was assigned with."""
        y = _as_1d("values", values)
        p = np.broadcast_to(_as_1d("propensity", propensity), y.shape)
        keys, inverse = np.unique(np.round(p, PROPENSITY_DECIMALS), return_inverse=True)
        size = keys.size
        return cls(
            propensity=keys,
            n=np.bincount(inverse, minlength=size).astype(float),
            sum=np.bincount(inverse, weights=y, minlength=size).astype(float),
            sumsq=np.bincount(inverse, weights=y * y, minlength=size).astype(float),
        )

    @classmethod
    def empty(cls) -> ArmMoments:
        e = np.zeros(0)
        return cls(propensity=e, n=e, sum=e, sumsq=e)

    def merge(self, other: ArmMoments) -> ArmMoments:
        """Sum of two accumulators (e.g. from two workers); commutative and associative."""
        strata: dict[float, tuple[float, float, float]] = {}
        for arm in (self, other):
            for p, n, s, q in zip(arm.propensity, arm.n, arm.sum, arm.sumsq, strict=True):
                key = round(float(p), PROPENSITY_DECIMALS)
                old = strata.get(key, (0.0, 0.0, 0.0))
                strata[key] = (old[0] + n, old[1] + s, old[2] + q)
        return ArmMoments.from_strata(strata)

    @property
    def total(self) -> int:
        """Number of observations over all strata."""
        return int(self.n.sum())


@dataclass(frozen=True, eq=False)
class ArmRouting:
    """Routed and answered request counts of one arm, by propensity (for the SRM test).

    ``routed[s]`` counts requests assigned to the arm in stratum ``s`` whose outcome is final;
    ``answered[s]`` those of them that produced an observation. Requests still in flight must
    be in neither count, or a slower arm looks like one that drops requests.
    """

    propensity: np.ndarray  # any numeric dtype; stored as float64
    routed: np.ndarray  # any numeric dtype; stored as float64
    answered: np.ndarray  # any numeric dtype; stored as float64

    def __post_init__(self) -> None:
        for name in ("propensity", "routed", "answered"):
            object.__setattr__(self, name, _as_1d(name, getattr(self, name)))
        if not (self.propensity.shape == self.routed.shape == self.answered.shape):
            raise ValueError(
                "propensity, routed and answered must have the same length, got "
                f"{self.propensity.size}, {self.routed.size}, {self.answered.size}"
            )
        _check_propensity(self.propensity)
        _check_counts("routed", self.routed, integer=True)
        _check_counts("answered", self.answered, integer=True)
        if np.any(self.answered > self.routed):
            raise ValueError(
                f"answered must not exceed routed, got answered={self.answered.tolist()!r} "
                f"routed={self.routed.tolist()!r}"
            )

    @classmethod
    def from_strata(cls, strata: Mapping[float, tuple[float, float]]) -> ArmRouting:
        """Build from ``{propensity: (routed, answered)}``; equal propensities are merged."""
        merged: dict[float, list[float]] = {}
        for p, cell in strata.items():
            if len(cell) != 2:
                raise ValueError(f"stratum {p!r} must be (routed, answered), got {cell!r}")
            acc = merged.setdefault(round(float(p), PROPENSITY_DECIMALS), [0.0, 0.0])
            acc[0] += float(cell[0])
            acc[1] += float(cell[1])
        keys = sorted(merged)
        return cls(
            propensity=np.array(keys, dtype=float),
            routed=np.array([merged[k][0] for k in keys], dtype=float),
            answered=np.array([merged[k][1] for k in keys], dtype=float),
        )


def _fmt_pp(x: float) -> str:
    if not math.isfinite(x):
        return "inf" if x > 0 else "-inf" if x < 0 else "nan"
    return f"{x * 100:+.3g}pp"


def _fmt_num(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.3g}"


@dataclass(frozen=True)
class MetricResult:
    """One metric's confidence interval for candidate vs production and its verdict.

    ``relative=True``: ``estimate``, ``lower``, ``upper`` are candidate/production ratios and
    the tolerance is ``1 + margin`` (``1 - margin`` for ``DECREASE``). ``relative=False``:
    they are differences candidate - production and the tolerance is ``+margin``
    (``-margin``). ``alpha`` is the level at which ``[lower, upper]`` is a confidence
    sequence. For ``NET_VALUE`` the scale is the trade-off unit, positive = candidate better.
    """

    name: str
    kind: MetricKind
    estimate: float
    lower: float
    upper: float
    margin: float
    relative: bool
    direction: Direction
    verdict: Verdict
    n_production: int
    n_candidate: int
    alpha: float
    detail: str = ""

    @property
    def tolerance(self) -> float:
        if self.kind is MetricKind.NET_VALUE:
            return 0.0
        return tolerance_of(self.margin, self.relative, self.direction)

    def explain(self) -> str:
        """One line: metric, interval, margin, samples per arm, verdict."""
        n = f"n={self.n_production}/{self.n_candidate}"
        tail = f"{n}, alpha={self.alpha:.3g} -> {self.verdict.value.upper()}"
        detail = f" ({self.detail})" if self.detail else ""
        if self.kind is MetricKind.NET_VALUE:
            return (
                f"{self.name}: net value {_fmt_num(self.estimate)} "
                f"[{_fmt_num(self.lower)}, {_fmt_num(self.upper)}] trade-off units "
                f"(positive = candidate better){detail}, {tail}"
            )
        sign = "+" if self.direction is Direction.INCREASE else "-"
        if self.kind is MetricKind.SRM and math.isnan(self.estimate):
            # Nothing dropped on either arm yet: there is no ratio of drop rates to show.
            return f"{self.name}: no request dropped on either arm{detail}, {tail}"
        if self.relative:
            what = "candidate/production ratio"
            body = f"{_fmt_num(self.estimate)} [{_fmt_num(self.lower)}, {_fmt_num(self.upper)}]"
            margin = f"{sign}{self.margin * 100:.3g}%"
        else:
            what = "candidate-production difference"
            if self.kind in (MetricKind.ERROR_RATE, MetricKind.RATE):
                body = f"{_fmt_pp(self.estimate)} [{_fmt_pp(self.lower)}, {_fmt_pp(self.upper)}]"
                margin = f"{sign}{self.margin * 100:.3g}pp"
            else:
                body = f"{_fmt_num(self.estimate)} [{_fmt_num(self.lower)}, {_fmt_num(self.upper)}]"
                margin = f"{sign}{self.margin:.3g}"
        return f"{self.name}: {what} {body}{detail}, margin {margin}, {tail}"


__all__ = [
    "OK_CODE",
    "PROPENSITY_DECIMALS",
    "UNKNOWN_CODE",
    "WORSE_CODE",
    "ArmMoments",
    "ArmRouting",
    "Direction",
    "FloatArray",
    "MetricKind",
    "MetricResult",
    "Verdict",
    "classify",
    "tolerance_of",
    "verdict_codes",
]
