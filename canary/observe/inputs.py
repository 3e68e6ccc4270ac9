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

The counting state is per process and in memory: a restart starts a new baseline, and a
reload keeps it only while the rollout's ``inputs`` are unchanged
(:meth:`canary.observe.Recorder.apply_inputs`).

Several processes on one store (shared mode: ``--workers``, replicas on Redis) merge their
counts: each writes its own absolute counts (:meth:`InputMonitor.local_snapshot`,
:meth:`InputHealth.to_dict`) to the store every flush and hands the other processes'
snapshots to its monitor (:meth:`InputMonitor.set_peers`; the I/O is
:mod:`canary.controller.shared_inputs`), whose :meth:`~InputMonitor.snapshot` and
:meth:`~InputMonitor.report` are then of every process's counts (:func:`merge_health`). A
learned baseline merges as the sum of the processes' frozen baselines; a process still
learning is in neither window until it freezes, so no request is in both windows and each
process's baseline is a fixed sample taken before its own current requests. Under the null
(the inputs do not shift, whichever process receives them) both merged windows are then
samples of the same distribution and the current one only grows: the proportion checks,
whose baseline side is itself a confidence sequence, stay anytime-valid as processes'
baselines join; the mean's baseline interval is a fixed-sample one, recomputed each time a
process's baseline joins (once per process, in practice within the first minutes). A given
baseline merges trivially: the current windows are summed. Alone (no peers set), a monitor
behaves exactly as a single process always did.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (what a process writes to a shared store; :meth:`from_dict` reads it):
        an infinite min or max (a window without numbers) becomes None."""
        return {
            "rollout": self.rollout,
            "learning": self.learning,
            "baseline_requests": self.baseline_requests,
            "requests": list(self.requests),
            "fields": [
                {
                    "path": f.path,
                    "shift": f.shift,
                    "baseline": _window_to_list(f.baseline),
                    "current": _window_to_list(f.current),
                }
                for f in self.fields
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputHealth:
        """The snapshot :meth:`to_dict` wrote; ValueError when ``data`` is not one."""
        try:
            requests = tuple(int(n) for n in data["requests"])
            if len(requests) != len(RESULTS):
                raise ValueError(f"expected {len(RESULTS)} request counts, got {len(requests)}")
            return cls(
                rollout=str(data["rollout"]),
                learning=bool(data["learning"]),
                baseline_requests=int(data["baseline_requests"]),
                requests=requests,
                fields=tuple(
                    FieldCounts(
                        str(f["path"]),
                        None if f["shift"] is None else float(f["shift"]),
                        _window_from_list(f["baseline"]),
                        _window_from_list(f["current"]),
                    )
                    for f in data["fields"]
                ),
            )
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"not an input-health snapshot: {exc!r}") from exc


def _window_to_list(w: WindowCounts) -> list[Any]:
    return [
        list(w.types),
        w.numbers,
        w.total,
        w.total_sq,
        w.min if math.isfinite(w.min) else None,
        w.max if math.isfinite(w.max) else None,
    ]


def _window_from_list(data: Sequence[Any]) -> WindowCounts:
    types, numbers, total, total_sq, lo, hi = data
    counts = tuple(int(n) for n in types)
    if len(counts) != len(TYPES):
        raise ValueError(f"expected {len(TYPES)} type counts, got {len(counts)}")
    return WindowCounts(
        counts,
        int(numbers),
        float(total),
        float(total_sq),
        math.inf if lo is None else float(lo),
        -math.inf if hi is None else float(hi),
    )


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


# -- several processes: merged snapshots (shared mode) ---------------------------------------


MAX_PROCESSES: Final = 1000  # process entries a shared store keeps per rollout (oldest go)


def inputs_fingerprint(config: InputsConfig) -> str:
    """A short digest of a rollout's ``inputs`` settings: processes merge only the snapshots
    taken under the same settings (a monitor restarts whenever they change,
    :meth:`canary.observe.Recorder.apply_inputs`)."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]


def merge_health(parts: Sequence[InputHealth]) -> InputHealth:
    """One snapshot of the input counts of several processes (shared mode).

    The request results are summed over every part. The windows are summed over the parts
    whose baseline is frozen: their baselines are summed into the merged baseline and their
    current windows into the merged current window (counts and sums added, the sums of each
    part moved to a common shift first; min and max combined). A part still learning its
    baseline contributes to neither window until it freezes, so the merged current window
    never holds a request that some baseline also holds, and every request of the merged
    baseline was taken before that process's first current request. The merged snapshot is
    learning only while every part is; then it shows the learning parts' partial baselines
    summed and, as ``baseline_requests``, the largest count of any part (the process closest
    to freezing; each freezes at ``baseline.requests`` of its own requests).

    A given baseline (config) has empty baseline windows and never learns: the merge is the
    sum of the current windows. Merging is associative and one part comes back unchanged;
    parts whose fields are not the first part's are left out (the caller merges only
    snapshots of one ``inputs`` fingerprint).
    """
    if not parts:
        raise ValueError("merge_health needs at least one snapshot")
    first = parts[0]
    paths = [f.path for f in first.fields]
    same = [p for p in parts if [f.path for f in p.fields] == paths]
    if len(same) == 1:
        return first
    frozen = [p for p in same if not p.learning]
    sources = frozen or same
    fields = []
    for i, path in enumerate(paths):
        counts = [p.fields[i] for p in sources]
        shift = next((f.shift for f in counts if f.shift is not None), None)
        fields.append(
            FieldCounts(
                path,
                shift,
                _merge_windows([(f.baseline, f.shift) for f in counts], shift),
                _merge_windows([(f.current, f.shift) for f in counts], shift),
            )
        )
    return InputHealth(
        rollout=first.rollout,
        learning=not frozen,
        baseline_requests=(
            sum(p.baseline_requests for p in frozen)
            if frozen
            else max(p.baseline_requests for p in same)
        ),
        requests=tuple(sum(c) for c in zip(*(p.requests for p in same), strict=True)),
        fields=tuple(fields),
    )


def _merge_windows(
    windows: Sequence[tuple[WindowCounts, float | None]], shift: float | None
) -> WindowCounts:
    """Windows added up, each one's sums of ``(x - own shift)`` moved to ``shift``:
    sum(x - s) = sum(x - s_j) + n d and sum((x - s)**2) = sum((x - s_j)**2) + 2 d sum(x - s_j)
    + n d**2, with d = s_j - s."""
    types = [0] * len(TYPES)
    numbers, total, total_sq = 0, 0.0, 0.0
    lo, hi = math.inf, -math.inf
    for w, own in windows:
        for i, n in enumerate(w.types):
            types[i] += n
        if not w.numbers or own is None or shift is None:
            continue
        d = own - shift
        numbers += w.numbers
        total += w.total + w.numbers * d
        total_sq += w.total_sq + 2.0 * d * w.total + w.numbers * d * d
        lo, hi = min(lo, w.min), max(hi, w.max)
    return WindowCounts(tuple(types), numbers, total, total_sq, lo, hi)


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
        "_peers",
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
        # Shared mode: the other processes' counts, merged (None: this process is alone).
        self._peers: InputHealth | None = None

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
        """The counts as of now, copied (O(fields)): what the rollout analysis ships and the
        reports show. In shared mode (:meth:`set_peers`) the counts of every process, merged
        (:func:`merge_health`); else this process's own (:meth:`local_snapshot`)."""
        local = self.local_snapshot()
        peers = self._peers
        return local if peers is None else merge_health((local, peers))

    @property
    def shared(self) -> bool:
        """The snapshots and reports merge other processes' counts (:meth:`set_peers`)."""
        return self._peers is not None

    def set_peers(self, peers: Sequence[InputHealth]) -> None:
        """Merge the snapshots of the other processes of a shared store into
        :meth:`snapshot` and :meth:`report` from now on (their latest; they replace the ones
        set before). Snapshots of other fields are ignored; an empty ``peers`` merges
        nothing, as :meth:`clear_peers`."""
        paths = [f.path for f in self._fields]
        same = [p for p in peers if [f.path for f in p.fields] == paths]
        self._peers = merge_health(same) if same else None

    def clear_peers(self) -> None:
        """Back to this process's own counts only."""
        self._peers = None

    def local_snapshot(self) -> InputHealth:
        """This process's own counts as of now, copied (O(fields)): what it writes to a
        shared store for the other processes to merge."""
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
    "MAX_PROCESSES",
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
    "inputs_fingerprint",
    "merge_health",
]
