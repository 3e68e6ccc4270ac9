"""Input health: what the clients send, per configured JSON field of the request body.

For each field of ``inputs.fields`` the proxy counts, per request, the field's JSON type
(number, string, bool, null, missing, object, array) and, for numbers, the count, sum, sum of
squares, minimum and maximum. A baseline is either learned from the first
``baseline.requests`` inspected requests (then frozen) or given in the config; after it, a
sequential drift test per field compares the requests since the baseline with it: the mean
of the numeric values (within ``tolerance.mean`` baseline standard deviations), the null rate
(null or missing) and the share of each other type (within ``tolerance.rate``), every test
anytime-valid, with ``alpha`` split over all of them (the statistics are
:func:`canary.stats.shift_checks`).

:meth:`InputMonitor.observe` is the only hot-path call: one ``json.loads`` of a buffered body
up to ``max_body`` bytes and O(number of fields) integer and float updates, no I/O, no
allocation that stays. :meth:`InputMonitor.snapshot` copies the counts into a frozen,
picklable :class:`InputHealth` (O(fields)); :func:`drift_checks` turns a config and a snapshot
into the checks. That one function serves both readers, so they cannot disagree: the rollout
analysis (``canary.decision.analyze(..., input_health=snapshot)``, which the policy's
``inputs.on_drift: hold`` reads) and :meth:`InputMonitor.report` (the metrics and the admin
API; it reruns the checks at most once per :data:`EVALUATE_EVERY` seconds).

The state is per process and in memory only: it is not in the shared store, a restart
starts a new baseline, and a reload keeps it only while the rollout's ``inputs`` are unchanged
(:meth:`canary.observe.Recorder.apply_inputs`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from canary.observe.extract import JsonPath
from canary.stats import shift_checks

if TYPE_CHECKING:
    from canary.config import InputFieldBaseline, InputsConfig

log = logging.getLogger("canary.inputs")

TYPES: Final = ("number", "string", "bool", "null", "missing", "object", "array")
NUMBER, STRING, BOOL, NULL, MISSING, OBJECT, ARRAY = range(len(TYPES))
SHARE_TYPES: Final = ("number", "string", "bool", "object", "array")  # null/missing: null rate
CHECKS: Final = ("mean", "null_rate", *(f"type:{t}" for t in SHARE_TYPES))  # per field, in order
CHECKS_PER_FIELD: Final = len(CHECKS)  # mean, null rate, one share per other type
RESULTS: Final = ("inspected", "unparseable", "not_inspected", "too_large")
INSPECTED, UNPARSEABLE, NOT_INSPECTED, TOO_LARGE = range(len(RESULTS))

EVALUATE_EVERY: Final = 1.0  # seconds a report's drift tests are reused

_MISSING: Final = object()
_WHITESPACE: Final = b" \t\r\n"
# The null rate is checked even when nothing was ever null (0 is a finding); a type share
# only when that type was seen on either side.
_KEEP_UNSEEN: Final = (True, *(False for _ in SHARE_TYPES))


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

    def snapshot(self) -> WindowCounts:
        return WindowCounts(tuple(self.counts), self.n_num, self.s, self.q, self.lo, self.hi)


class _Field:
    __slots__ = ("base", "now", "path", "segments", "shift")

    def __init__(self, path: str) -> None:
        self.path = path
        self.segments = JsonPath(path).segments  # the json: signal syntax, validated the same way
        self.shift: float | None = None  # first number seen: keeps the sums well conditioned
        self.base = _Window()
        self.now = _Window()


# -- snapshots (what the analysis ships) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WindowCounts:
    """A field's counts over one window, as of a snapshot."""

    types: tuple[int, ...]  # requests per JSON type, in the order of TYPES
    numbers: int  # finite numeric values
    total: float  # sum of (x - shift) over them
    total_sq: float  # sum of (x - shift)**2
    min: float  # inf when there is no number
    max: float  # -inf when there is no number

    @property
    def requests(self) -> int:
        return sum(self.types)


@dataclass(frozen=True, slots=True)
class FieldCounts:
    """One configured field: its baseline and current windows."""

    path: str
    shift: float | None  # first number seen; the windows' sums are of (x - shift)
    baseline: WindowCounts  # the learned baseline (empty when it is given in the config)
    current: WindowCounts  # the requests since the baseline


@dataclass(frozen=True, slots=True)
class InputHealth:
    """A frozen, picklable snapshot of a rollout's input counts: everything the drift checks
    read (:func:`drift_checks`), nothing that refers to the live monitor."""

    rollout: str
    learning: bool  # the baseline is still being learned (no drift test yet)
    baseline_requests: int  # inspected requests in the learned baseline so far
    requests: tuple[int, ...]  # by result, in the order of RESULTS
    fields: tuple[FieldCounts, ...]  # in the order of ``inputs.fields``


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
class FieldDrift:
    """The drift checks of one field (none while the baseline is learned or without data)."""

    field: str
    checks: tuple[DriftCheck, ...]

    @property
    def drifted(self) -> bool:
        return any(c.drifted for c in self.checks)


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


# -- the drift checks (one function for the analysis, the metrics and the admin API) ----------


def drift_checks(config: InputsConfig, health: InputHealth) -> tuple[FieldDrift, ...]:
    """The drift checks of every field of ``health`` against the baseline of ``config``.

    One vectorised :func:`canary.stats.shift_checks` call for all fields, at ``config.alpha``
    split over ``CHECKS_PER_FIELD x fields`` checks. Pure: the same snapshot and config give
    the same checks wherever they run (the monitor's reports, the analysis worker). Fields get
    no checks while the baseline is learned, and none when the snapshot's fields are not the
    config's (a snapshot taken across a reload).
    """
    fields = health.fields
    if health.learning or not fields or [f.path for f in fields] != list(config.fields):
        return tuple(FieldDrift(f.path, ()) for f in fields)
    given = config.baseline.fields
    props = 1 + len(SHARE_TYPES)
    n = [[f.current.requests] * props for f in fields]
    k = [_proportion_counts(f.current) for f in fields]
    base_n: Any
    base_k: Any
    base_p: Any
    if given is None:
        base_n = [[f.baseline.requests] * props for f in fields]
        base_k = [_proportion_counts(f.baseline) for f in fields]
        base_p = 0.0
    else:
        base_n, base_k = math.inf, 0.0
        base_p = [_given_shares(given[f.path]) for f in fields]
    current = [_moments(f.current, f.shift) for f in fields]
    baseline = [
        _baseline_moments(f.baseline, f.shift) if given is None else _given_moments(given[f.path])
        for f in fields
    ]
    r = shift_checks(
        n=n,
        k=k,
        base_n=base_n,
        base_k=base_k,
        base_p=base_p,
        keep_unseen=_KEEP_UNSEEN,
        numbers=[c[0] for c in current],
        mean=[c[1] for c in current],
        var=[c[2] for c in current],
        base_numbers=[b[0] for b in baseline],
        base_mean=[b[1] for b in baseline],
        base_std=[b[2] for b in baseline],
        alpha=config.alpha,
        mean_tolerance=config.tolerance.mean,
        rate_tolerance=config.tolerance.rate.value,
    )
    return tuple(
        FieldDrift(
            f.path,
            tuple(
                DriftCheck(
                    check=name,
                    estimate=float(r.estimate[i, j]),
                    lower=float(r.lower[i, j]),
                    upper=float(r.upper[i, j]),
                    tolerance=float(r.tolerance[i, j]),
                    samples=int(r.samples[i, j]),
                    drifted=bool(r.drifted[i, j]),
                )
                for j, name in enumerate(CHECKS)
                if r.shown[i, j]
            ),
        )
        for i, f in enumerate(fields)
    )


def _proportion_counts(w: WindowCounts) -> list[int]:
    """Null-or-missing count, then the count of each of SHARE_TYPES."""
    c = w.types
    return [c[NULL] + c[MISSING], c[NUMBER], c[STRING], c[BOOL], c[OBJECT], c[ARRAY]]


def _given_shares(g: InputFieldBaseline) -> list[float]:
    """A given baseline's null rate and type shares, in the order of _proportion_counts
    (``nan`` where the config gives none: that check is skipped)."""
    p = [math.nan] * (1 + len(SHARE_TYPES))
    if g.null_rate is not None:
        p[0] = g.null_rate
    if g.types is not None:
        p[1:] = [g.types.get(t, 0.0) for t in SHARE_TYPES]
        if g.null_rate is None:
            p[0] = g.types.get("null", 0.0) + g.types.get("missing", 0.0)
    return p


def _moments(w: WindowCounts, shift: float | None) -> tuple[float, float, float]:
    """Count, mean and population variance of the window's numbers (nan without any)."""
    if not w.numbers or shift is None:
        return 0.0, math.nan, math.nan
    m = w.total / w.numbers
    return float(w.numbers), shift + m, max(w.total_sq / w.numbers - m * m, 0.0)


def _baseline_moments(w: WindowCounts, shift: float | None) -> tuple[float, float, float]:
    """Count, mean and sample standard deviation of a learned baseline's numbers."""
    if w.numbers < 2 or shift is None:
        return float(w.numbers), math.nan, math.nan
    var = max(w.total_sq - w.total * w.total / w.numbers, 0.0) / (w.numbers - 1)
    return float(w.numbers), shift + w.total / w.numbers, math.sqrt(var)


def _given_moments(g: InputFieldBaseline) -> tuple[float, float, float]:
    """A given baseline: exact (infinitely many values), nan when no mean is given."""
    mean = g.mean if g.mean is not None else math.nan
    std = g.std if g.std is not None else math.nan
    return math.inf, mean, std


# -- the monitor -----------------------------------------------------------------------------


class InputMonitor:
    """Input health of one rollout: :meth:`observe` per request, :meth:`report` to read."""

    __slots__ = (
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
        self._checks: tuple[FieldDrift, ...] | None = None  # as of _checks_at
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

    def snapshot(self) -> InputHealth:
        """The counts as of now, copied (O(fields)): what the rollout analysis ships."""
        return InputHealth(
            rollout=self.rollout,
            learning=self._learning,
            baseline_requests=self._base_n,
            requests=tuple(self._results),
            fields=tuple(
                FieldCounts(f.path, f.shift, f.base.snapshot(), f.now.snapshot())
                for f in self._fields
            ),
        )

    def drifted_fields(self, max_age: float = EVALUATE_EVERY) -> list[str]:
        """Fields whose drift test flags a shift now (tests rerun when older than ``max_age``)."""
        return list(self.report(max_age).drifted)

    def report(self, max_age: float = EVALUATE_EVERY) -> InputReport:
        """Counts and summaries as of now; the drift tests (:func:`drift_checks`) are rerun
        when older than ``max_age`` seconds (0 reruns them)."""
        health = self.snapshot()
        now = self._clock()
        if self._checks is None or now - self._checks_at >= max_age:
            self._checks = drift_checks(self.config, health)
            self._checks_at = now
            self.log_changes(self._checks)
        fields = tuple(
            FieldReport(
                field=f.path,
                values={
                    t: f.baseline.types[i] + f.current.types[i]
                    for i, t in enumerate(TYPES)
                    if f.baseline.types[i] + f.current.types[i]
                },
                baseline=self._baseline_summary(f),
                current=_summary(f.current, f.shift),
                checks=drift.checks,
            )
            for f, drift in zip(health.fields, self._checks, strict=True)
        )
        return InputReport(
            rollout=self.rollout,
            learning=health.learning,
            baseline_source="config" if self._given is not None else "learned",
            baseline_requests=None if self._given is not None else health.baseline_requests,
            baseline_target=self._target,
            requests=dict(zip(RESULTS, health.requests, strict=True)),
            fields=fields,
            alpha=self.alpha,
            on_drift=self.on_drift,
            tested_at=self._checks_at,
            drifted=tuple(r.field for r in fields if r.drifted),
        )

    def _baseline_summary(self, f: FieldCounts) -> WindowSummary:
        if self._given is None:
            return _summary(f.baseline, f.shift)
        g = self._given[f.path]
        types: dict[str, float] = {t: v for t, v in (g.types or {}).items()}
        null_rate = g.null_rate
        if null_rate is None and g.types is not None:
            null_rate = types.get("null", 0.0) + types.get("missing", 0.0)
        return WindowSummary(None, types, null_rate, None, g.mean, g.std, None, None)

    def log_changes(self, checks: tuple[FieldDrift, ...]) -> None:
        """Log a field's drift when it starts and when it ends, once each, whether the checks
        came from a report or from the rollout's analysis."""
        for drift in checks:
            hits = [c for c in drift.checks if c.drifted]
            if hits and drift.field not in self._flagged:
                self._flagged.add(drift.field)
                log.warning(
                    "rollout %s: input drift on field %s: %s",
                    self.rollout,
                    drift.field,
                    "; ".join(c.explain() for c in hits),
                )
            elif not hits and drift.field in self._flagged:
                self._flagged.discard(drift.field)
                log.info("rollout %s: field %s is back within tolerance", self.rollout, drift.field)


def _summary(w: WindowCounts, shift: float | None) -> WindowSummary:
    n = w.requests
    types = {t: w.types[i] / n for i, t in enumerate(TYPES) if w.types[i]} if n else {}
    null_rate = (w.types[NULL] + w.types[MISSING]) / n if n else None
    mean = std = lo = hi = None
    if w.numbers and shift is not None:
        m = w.total / w.numbers
        mean = shift + m
        std = (
            math.sqrt(max(w.total_sq - w.total * m, 0.0) / (w.numbers - 1))
            if w.numbers > 1
            else None
        )
        lo, hi = w.min, w.max
    return WindowSummary(n, types, null_rate, w.numbers, mean, std, lo, hi)


__all__ = [
    "CHECKS",
    "CHECKS_PER_FIELD",
    "EVALUATE_EVERY",
    "RESULTS",
    "SHARE_TYPES",
    "TYPES",
    "DriftCheck",
    "FieldCounts",
    "FieldDrift",
    "FieldReport",
    "InputHealth",
    "InputMonitor",
    "InputReport",
    "WindowCounts",
    "WindowSummary",
    "drift_checks",
]
