"""Per-rollout, per-arm mergeable accumulators: what the statistics and the controller read.

The proxy records every :class:`~canary.observe.record.Observation` into a :class:`Recorder`
(O(1), no locks: one event loop per process). A flusher calls :meth:`Recorder.swap` every few
hundred milliseconds and ships the returned deltas to the store, where they are merged across
workers and replicas. Merging is exact for counts and histograms and associative and
commutative (up to float rounding of sums), so the order in which deltas arrive does not
matter. Memory is bounded by configuration, never by history: one :class:`Moments` per distinct
propensity (one per rollout step), one histogram bucket per distinct value magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from canary.observe.histogram import DEFAULT_RELATIVE_ACCURACY, MIN_POSITIVE, LogHistogram
from canary.observe.inputs import InputHealth, InputMonitor
from canary.observe.record import CLUSTERS, ERROR_STATUS, NO_CLUSTER, Observation
from canary.signals import ARMS, CANDIDATE, OTHER_STATUS_CLASS, PRODUCTION, status_class_labels

if TYPE_CHECKING:
    from canary.config import RolloutConfig

FORMAT_VERSION = 3  # 2: per-propensity routing counts; 3: histograms per stratum, clusters
_READABLE_VERSIONS = (2, 3)
COARSE_SHIFT = 4  # a coarse cluster bucket spans 2**4 histogram buckets
_COARSE_ZERO = -(1 << 40)  # below every positive value's coarse bucket
_COARSE_NEG = -(1 << 41)  # minus the bucket of |value|: below zero, ascending with the value
_INF = math.inf
_log = math.log
_ceil = math.ceil
# status // 100 -> class label; an answer outside 100..599 is "other" (index 0).
_STATUS_CLASS = status_class_labels(OTHER_STATUS_CLASS)


class Moments:
    """Count, sum and sum of squares of a stream of values."""

    __slots__ = ("n", "total", "total_sq")

    def __init__(self, n: int = 0, total: float = 0.0, total_sq: float = 0.0) -> None:
        self.n = n
        self.total = total
        self.total_sq = total_sq

    def add(self, value: float) -> None:
        self.n += 1
        self.total += value
        self.total_sq += value * value

    def merge(self, other: Moments) -> None:
        self.n += other.n
        self.total += other.total
        self.total_sq += other.total_sq

    @property
    def mean(self) -> float:
        """Mean, or nan when empty."""
        return self.total / self.n if self.n else math.nan

    @property
    def variance(self) -> float:
        """Sample variance (n - 1 denominator), or nan below two values.

        Computed from raw sums, so it loses precision when the mean is large against the
        spread; the statistics layer should prefer histograms or shifted data for that case.
        """
        if self.n < 2:
            return math.nan
        return max(0.0, (self.total_sq - self.total * self.total / self.n) / (self.n - 1))

    def copy(self) -> Moments:
        return Moments(self.n, self.total, self.total_sq)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Moments):
            return NotImplemented
        return (self.n, self.total, self.total_sq) == (other.n, other.total, other.total_sq)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Moments(n={self.n}, total={self.total!r}, total_sq={self.total_sq!r})"


class ClusterCells:
    """Per-cluster sums of one signal in one propensity stratum (sticky routing only).

    ``n[g]`` and ``total[g]`` are the count and sum of the values of cluster ``g``; ``hist``
    counts them per (coarse bucket, cluster) under the key ``coarse * CLUSTERS + g``, where a
    coarse bucket spans ``2**COARSE_SHIFT`` histogram buckets (about 17% of a value at the
    default accuracy): enough to estimate how strongly a user's requests agree about being
    below a quantile, at a small, bounded size (the quantile itself comes from the fine
    histogram). Values at or below zero have coarse buckets below every positive one.
    """

    __slots__ = ("hist", "n", "total")

    def __init__(self) -> None:
        self.n = [0] * CLUSTERS
        self.total = [0.0] * CLUSTERS
        self.hist: dict[int, int] = {}

    def merge(self, other: ClusterCells) -> None:
        n, total, hist = self.n, self.total, self.hist
        for g in range(CLUSTERS):
            n[g] += other.n[g]
            total[g] += other.total[g]
        for k, c in other.hist.items():
            hist[k] = hist.get(k, 0) + c

    def copy(self) -> ClusterCells:
        out = ClusterCells()
        out.merge(self)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": list(self.n),
            "total": list(self.total),
            "hist": {str(k): c for k, c in self.hist.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterCells:
        out = cls()
        n, total = data["n"], data["total"]
        if len(n) != CLUSTERS or len(total) != CLUSTERS:
            raise ValueError(f"cluster cells must have {CLUSTERS} entries, got {len(n)}")
        out.n = [int(x) for x in n]
        out.total = [float(x) for x in total]
        out.hist = {int(k): int(c) for k, c in data["hist"].items()}
        return out


def coarse_bucket(value: float, inv_log_gamma: float) -> int:
    """Coarse bucket of ``value`` in :attr:`ClusterCells.hist` (ascending with the value)."""
    if value > MIN_POSITIVE:
        return _ceil(_log(value) * inv_log_gamma) >> COARSE_SHIFT
    if value < -MIN_POSITIVE:
        return _COARSE_NEG - (_ceil(_log(-value) * inv_log_gamma) >> COARSE_SHIFT)
    return _COARSE_ZERO


def coarse_upper(coarse: int, accuracy: float) -> float:
    """The largest value coarse bucket ``coarse`` (of :func:`coarse_bucket`) holds."""
    gamma = (1.0 + accuracy) / (1.0 - accuracy)
    if coarse == _COARSE_ZERO:
        return MIN_POSITIVE
    if coarse < _COARSE_ZERO:  # negative values: |v| in fine buckets 16c' .. 16c' + 15
        return -float(gamma ** (((_COARSE_NEG - coarse) << COARSE_SHIFT) - 1))
    return float(gamma ** (((coarse + 1) << COARSE_SHIFT) - 1))


class SignalAccumulator:
    """One signal of one arm: moments and a histogram per propensity stratum, min and max.

    ``strata`` and ``hists`` are keyed by the arm's assignment probability when the value was
    observed, so the analysis can weight by inverse propensity and compare the arms within
    the periods that had the same split; there is one entry per distinct weight used.
    ``clusters`` (same keys) holds per-cluster sums when values came with a sticky cluster.
    Non-finite values are ignored (they would poison every sum).
    """

    __slots__ = ("_inv_log_gamma", "accuracy", "clusters", "hists", "max", "min", "strata")

    def __init__(self, accuracy: float = DEFAULT_RELATIVE_ACCURACY) -> None:
        self.accuracy = accuracy
        self._inv_log_gamma = LogHistogram(accuracy)._inv_log_gamma
        self.strata: dict[float, Moments] = {}
        self.hists: dict[float, LogHistogram] = {}
        self.clusters: dict[float, ClusterCells] = {}
        self.min = _INF
        self.max = -_INF

    def add(self, value: float, propensity: float = 1.0, cluster: int = NO_CLUSTER) -> None:
        if not -_INF < value < _INF:  # also false for nan
            return
        p = propensity
        m = self.strata.get(p)
        if m is None:
            m = self.strata[p] = Moments()
            self.hists[p] = LogHistogram(self.accuracy)
        m.n += 1
        m.total += value
        m.total_sq += value * value
        # LogHistogram.add inlined (it is most of the cost of a record); the equivalence is
        # pinned by a test.
        h = self.hists[p]
        h.count += 1
        if value > MIN_POSITIVE:
            i = _ceil(_log(value) * h._inv_log_gamma)
            pos = h.pos
            pos[i] = pos.get(i, 0) + 1
            coarse = i >> COARSE_SHIFT
        elif value < -MIN_POSITIVE:
            i = _ceil(_log(-value) * h._inv_log_gamma)
            neg = h.neg
            neg[i] = neg.get(i, 0) + 1
            coarse = _COARSE_NEG - (i >> COARSE_SHIFT)
        else:
            h.zero += 1
            coarse = _COARSE_ZERO
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        if cluster >= 0:
            cells = self.clusters.get(p)
            if cells is None:
                cells = self.clusters[p] = ClusterCells()
            cells.n[cluster] += 1
            cells.total[cluster] += value
            key = coarse * CLUSTERS + cluster
            ch = cells.hist
            ch[key] = ch.get(key, 0) + 1

    def merge(self, other: SignalAccumulator) -> None:
        for p, m in other.strata.items():
            mine = self.strata.get(p)
            if mine is None:
                self.strata[p] = m.copy()
            else:
                mine.merge(m)
        for p, h in other.hists.items():
            mine_h = self.hists.get(p)
            if mine_h is None:
                self.hists[p] = h.copy()
            else:
                mine_h.merge(h)
        for p, cells in other.clusters.items():
            mine_c = self.clusters.get(p)
            if mine_c is None:
                self.clusters[p] = cells.copy()
            else:
                mine_c.merge(cells)
        if other.min < self.min:
            self.min = other.min
        if other.max > self.max:
            self.max = other.max

    @property
    def hist(self) -> LogHistogram:
        """All strata's histograms merged (a new object: read-only use)."""
        out = LogHistogram(self.accuracy)
        for h in self.hists.values():
            out.merge(h)
        return out

    @property
    def n(self) -> int:
        return sum(m.n for m in self.strata.values())

    @property
    def total(self) -> float:
        return sum(m.total for m in self.strata.values())

    @property
    def mean(self) -> float:
        """Unweighted mean over all strata, or nan when empty."""
        n = self.n
        return self.total / n if n else math.nan

    def copy(self) -> SignalAccumulator:
        out = SignalAccumulator(self.accuracy)
        out.merge(self)
        return out

    def to_dict(self) -> dict[str, Any]:
        empty = self.max < self.min
        return {
            # repr() of a float round-trips exactly, so merged strata keys stay identical.
            "strata": {repr(p): [m.n, m.total, m.total_sq] for p, m in self.strata.items()},
            "hists": {repr(p): h.to_dict() for p, h in self.hists.items()},
            "clusters": {repr(p): c.to_dict() for p, c in self.clusters.items()},
            "accuracy": self.accuracy,
            "min": None if empty else self.min,
            "max": None if empty else self.max,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SignalAccumulator:
        strata = {
            float(p): Moments(int(n), float(t), float(t2))
            for p, (n, t, t2) in data["strata"].items()
        }
        if "hists" in data:
            hists = {float(p): LogHistogram.from_dict(h) for p, h in data["hists"].items()}
            accuracy = float(data["accuracy"])
        else:
            # Format 2 kept one histogram for all strata: give it to the largest stratum (the
            # quantile test then compares those periods as one, as it did before).
            pooled = LogHistogram.from_dict(data["hist"])
            accuracy = pooled.accuracy
            hists = {}
            if strata:
                hists[max(strata, key=lambda p: strata[p].n)] = pooled
        out = cls(accuracy)
        out.strata = strata
        for p in strata:
            out.hists[p] = hists.get(p) or LogHistogram(accuracy)
        out.clusters = {
            float(p): ClusterCells.from_dict(c) for p, c in data.get("clusters", {}).items()
        }
        out.min = _INF if data["min"] is None else float(data["min"])
        out.max = -_INF if data["max"] is None else float(data["max"])
        return out


def _add_counts(into: dict[str, int], other: dict[str, int]) -> None:
    for k, v in other.items():
        into[k] = into.get(k, 0) + v


class ArmAccumulator:
    """Everything recorded for one arm of one rollout.

    ``routed`` counts requests assigned to the arm whose outcome is final: every recorded
    observation, plus requests lost without one (:meth:`RolloutAccumulator.record_lost`: the
    client went away first). ``routing`` splits that by propensity as ``[routed, observed]``
    for the sample-ratio check; requests still in flight are in neither count, so a slower arm
    never looks like one that drops requests. ``observed`` counts the observations recorded,
    ``answered`` those with an HTTP response. Signals
    always include ``latency`` and ``error`` (1/0 per observation), ``ttft`` once a value was
    seen, and every signal present on an observation. ``latency`` is recorded only for
    complete responses (no error, or an error status): a connection that fails in 1 ms must
    not make an arm look fast; the failure is counted by ``error``.
    """

    __slots__ = (
        "_error",
        "_latency",
        "accuracy",
        "answered",
        "bytes_in",
        "bytes_out",
        "error_kinds",
        "errors",
        "observed",
        "routed",
        "routing",
        "shadow",
        "signals",
        "status_classes",
    )

    def __init__(self, accuracy: float = DEFAULT_RELATIVE_ACCURACY) -> None:
        self.routed = 0
        self.routing: dict[float, list[int]] = {}
        self.observed = 0
        self.answered = 0
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.status_classes: dict[str, int] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.shadow = 0
        self.accuracy = accuracy
        self._latency = SignalAccumulator(accuracy)
        self._error = SignalAccumulator(accuracy)
        self.signals: dict[str, SignalAccumulator] = {
            "latency": self._latency,
            "error": self._error,
        }

    def record(self, obs: Observation) -> None:
        """Add one observation: O(number of signals on it), independent of history."""
        p = obs.propensity
        if not 0.0 < p <= 1.0:  # also rejects nan, which would add a stratum per request
            raise ValueError(f"propensity must be in (0, 1], got {p!r}")
        self.observed += 1
        self.routed += 1
        cell = self.routing.get(p)
        if cell is None:
            self.routing[p] = [1, 1]
        else:
            cell[0] += 1
            cell[1] += 1
        status = obs.status
        if status:
            self.answered += 1
            label = _STATUS_CLASS[status // 100 if 100 <= status < 600 else 0]
            self.status_classes[label] = self.status_classes.get(label, 0) + 1
        error = obs.error
        g = obs.cluster
        if error is None:
            self._error.add(0.0, p, g)
            self._latency.add(obs.latency, p, g)
        else:
            self.errors += 1
            self.error_kinds[error] = self.error_kinds.get(error, 0) + 1
            self._error.add(1.0, p, g)
            if error == ERROR_STATUS:
                self._latency.add(obs.latency, p, g)
        signals = self.signals
        if obs.ttft is not None:
            acc = signals.get("ttft")
            if acc is None:
                acc = signals["ttft"] = SignalAccumulator(self.accuracy)
            acc.add(obs.ttft, p, g)
        self.bytes_in += obs.bytes_in
        self.bytes_out += obs.bytes_out
        if obs.shadow:
            self.shadow += 1
        for key, value in obs.signals.items():
            acc = signals.get(key)
            if acc is None:
                acc = signals[key] = SignalAccumulator(self.accuracy)
            acc.add(value, p, g)

    def record_value(
        self, key: str, value: float, propensity: float = 1.0, cluster: int = NO_CLUSTER
    ) -> None:
        """Add one value of a signal that does not come with a request's response.

        Feedback joined later, a scraped resource window, a shadow agreement: the value goes
        into ``signals[key]`` only; routed and observed counts are untouched.
        """
        if not 0.0 < propensity <= 1.0:
            raise ValueError(f"propensity must be in (0, 1], got {propensity!r}")
        acc = self.signals.get(key)
        if acc is None:
            acc = self.signals[key] = SignalAccumulator(self.accuracy)
        acc.add(value, propensity, cluster)

    def record_lost(self, propensity: float, n: int = 1) -> None:
        """Count ``n`` requests assigned to this arm that ended without an observation."""
        if not 0.0 < propensity <= 1.0:
            raise ValueError(f"propensity must be in (0, 1], got {propensity!r}")
        self.routed += n
        cell = self.routing.get(propensity)
        if cell is None:
            self.routing[propensity] = [n, 0]
        else:
            cell[0] += n

    def merge(self, other: ArmAccumulator) -> None:
        self.routed += other.routed
        for p, (routed, observed) in other.routing.items():
            cell = self.routing.get(p)
            if cell is None:
                self.routing[p] = [routed, observed]
            else:
                cell[0] += routed
                cell[1] += observed
        self.observed += other.observed
        self.answered += other.answered
        self.errors += other.errors
        _add_counts(self.error_kinds, other.error_kinds)
        _add_counts(self.status_classes, other.status_classes)
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.shadow += other.shadow
        for key, acc in other.signals.items():
            mine = self.signals.get(key)
            if mine is None:
                self.signals[key] = acc.copy()
            else:
                mine.merge(acc)

    def to_dict(self) -> dict[str, Any]:
        return {
            "routed": self.routed,
            "routing": {repr(p): list(cell) for p, cell in self.routing.items()},
            "observed": self.observed,
            "answered": self.answered,
            "errors": self.errors,
            "error_kinds": dict(self.error_kinds),
            "status_classes": dict(self.status_classes),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "shadow": self.shadow,
            "signals": {k: v.to_dict() for k, v in self.signals.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], accuracy: float) -> ArmAccumulator:
        out = cls(accuracy)
        for name in ("routed", "observed", "answered", "errors", "bytes_in", "bytes_out", "shadow"):
            setattr(out, name, int(data[name]))
        out.routing = {float(p): [int(r), int(o)] for p, (r, o) in data["routing"].items()}
        out.error_kinds = {str(k): int(v) for k, v in data["error_kinds"].items()}
        out.status_classes = {str(k): int(v) for k, v in data["status_classes"].items()}
        for key, sig in data["signals"].items():
            out.signals[key] = SignalAccumulator.from_dict(sig)
        out._latency = out.signals["latency"]
        out._error = out.signals["error"]
        return out


class RolloutAccumulator:
    """Both arms of one rollout."""

    __slots__ = ("accuracy", "arms", "candidate", "production")

    def __init__(self, accuracy: float = DEFAULT_RELATIVE_ACCURACY) -> None:
        self.accuracy = accuracy
        self.production = ArmAccumulator(accuracy)
        self.candidate = ArmAccumulator(accuracy)
        self.arms: dict[str, ArmAccumulator] = {
            PRODUCTION: self.production,
            CANDIDATE: self.candidate,
        }

    def record(self, obs: Observation) -> None:
        arm = self.arms.get(obs.arm)
        if arm is None:
            raise ValueError(f"unknown arm {obs.arm!r}; expected one of {', '.join(ARMS)}")
        arm.record(obs)

    def record_lost(self, arm: str, propensity: float, n: int = 1) -> None:
        """Count ``n`` requests assigned to ``arm`` that ended without an observation."""
        acc = self.arms.get(arm)
        if acc is None:
            raise ValueError(f"unknown arm {arm!r}; expected one of {', '.join(ARMS)}")
        acc.record_lost(propensity, n)

    def merge(self, other: RolloutAccumulator) -> None:
        """Add ``other`` into this one (``other`` is not modified nor aliased)."""
        if other.accuracy != self.accuracy:
            raise ValueError(
                f"cannot merge accumulators of accuracy {other.accuracy} into {self.accuracy}"
            )
        self.production.merge(other.production)
        self.candidate.merge(other.candidate)

    def snapshot(self) -> RolloutAccumulator:
        """A deep copy."""
        out = RolloutAccumulator(self.accuracy)
        out.merge(self)
        return out

    @property
    def empty(self) -> bool:
        """True when nothing was recorded or routed (values of external signals count: a
        label or a resource window may come while no request does)."""
        return not any(
            a.observed or a.routed or any(v.n for v in a.signals.values())
            for a in (self.production, self.candidate)
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (plain dicts, str keys, ints, finite floats, None)."""
        return {
            "version": FORMAT_VERSION,
            "accuracy": self.accuracy,
            "production": self.production.to_dict(),
            "candidate": self.candidate.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutAccumulator:
        version = data.get("version")
        if version not in _READABLE_VERSIONS:
            raise ValueError(f"unsupported accumulator format version {version!r}")
        out = cls(float(data["accuracy"]))
        out.production = ArmAccumulator.from_dict(data["production"], out.accuracy)
        out.candidate = ArmAccumulator.from_dict(data["candidate"], out.accuracy)
        out.arms = {PRODUCTION: out.production, CANDIDATE: out.candidate}
        return out


class Recorder:
    """The live accumulators of every rollout in this process, and its input-health monitors.

    Single-threaded by design (one asyncio loop): :meth:`record` and :meth:`swap` never run
    at the same time, and ``swap`` replaces the live dict in one attribute assignment, so a
    flusher takes deltas without locks.

    Input health (:mod:`canary.observe.inputs`) is not in the deltas: the recorder keeps one
    :class:`~canary.observe.inputs.InputMonitor` per rollout with ``inputs``
    (:meth:`apply_inputs` on each (re)load), the proxy counts request bodies into it, and
    :meth:`input_health` snapshots it for the rollout's analysis (in shared mode the
    controller writes each monitor's own counts to the store and merges the other
    processes' into it: :mod:`canary.controller.shared_inputs`).
    """

    __slots__ = ("_inputs", "_live", "accuracy")

    def __init__(
        self,
        rollouts: tuple[str, ...] | list[str] = (),
        accuracy: float = DEFAULT_RELATIVE_ACCURACY,
    ) -> None:
        self.accuracy = accuracy
        self._live: dict[str, RolloutAccumulator] = {
            name: RolloutAccumulator(accuracy) for name in rollouts
        }
        self._inputs: dict[str, InputMonitor] = {}

    def record(self, obs: Observation) -> None:
        acc = self._live.get(obs.rollout)
        if acc is None:
            acc = self._live[obs.rollout] = RolloutAccumulator(self.accuracy)
        acc.record(obs)

    def record_lost(self, rollout: str, arm: str, propensity: float) -> None:
        """A request routed to ``arm`` ended (client gone, cancelled) without an observation."""
        acc = self._live.get(rollout)
        if acc is None:
            acc = self._live[rollout] = RolloutAccumulator(self.accuracy)
        acc.record_lost(arm, propensity)

    def record_value(
        self,
        rollout: str,
        arm: str,
        key: str,
        value: float,
        propensity: float = 1.0,
        cluster: int = NO_CLUSTER,
    ) -> None:
        """Record a value of an external signal (feedback, resource, agreement) for ``arm``."""
        acc = self._live.get(rollout)
        if acc is None:
            acc = self._live[rollout] = RolloutAccumulator(self.accuracy)
        arm_acc = acc.arms.get(arm)
        if arm_acc is None:
            raise ValueError(f"unknown arm {arm!r}; expected one of {', '.join(ARMS)}")
        arm_acc.record_value(key, value, propensity, cluster)

    def live(self, rollout: str) -> RolloutAccumulator:
        """The live accumulator of ``rollout`` (read-only use: tests, local gauges)."""
        acc = self._live.get(rollout)
        if acc is None:
            acc = self._live[rollout] = RolloutAccumulator(self.accuracy)
        return acc

    def remove(self, rollout: str) -> RolloutAccumulator | None:
        """Stop tracking a retired rollout; return what it had not yet flushed."""
        return self._live.pop(rollout, None)

    def swap(self) -> dict[str, RolloutAccumulator]:
        """Replace every live accumulator with a fresh one; return the old ones (the deltas)."""
        old = self._live
        self._live = {name: RolloutAccumulator(self.accuracy) for name in old}
        return old

    # -- input health -------------------------------------------------------------------------

    def apply_inputs(self, rollouts: Iterable[RolloutConfig]) -> dict[str, InputMonitor]:
        """Adopt the input-health settings of the configured ``rollouts`` (every (re)load).

        A rollout keeps its monitor (learned baseline and counts) while its ``inputs`` are
        unchanged, gets a new one when they change, and loses it without ``inputs`` or when it
        is no longer configured. Not tied to :meth:`remove`: a rollout restarted with new
        endpoints keeps its clients' baseline. Returns the monitors by rollout (the proxy's
        routes and the metrics keep them).
        """
        monitors: dict[str, InputMonitor] = {}
        for r in rollouts:
            if r.inputs is None:
                continue
            monitor = self._inputs.get(r.name)
            if monitor is None or monitor.config != r.inputs:
                monitor = InputMonitor(r.name, r.inputs)
            monitors[r.name] = monitor
        self._inputs = monitors
        return dict(monitors)

    def input_monitor(self, rollout: str) -> InputMonitor | None:
        """The input-health monitor of ``rollout`` (None without ``inputs``)."""
        return self._inputs.get(rollout)

    def input_health(self, rollout: str) -> InputHealth | None:
        """A frozen snapshot of ``rollout``'s input counts (O(fields)) for its analysis
        (``canary.decision.analyze(..., input_health=...)``); None without ``inputs``."""
        monitor = self._inputs.get(rollout)
        return monitor.snapshot() if monitor is not None else None


__all__ = [
    "COARSE_SHIFT",
    "FORMAT_VERSION",
    "ArmAccumulator",
    "ClusterCells",
    "Moments",
    "Recorder",
    "RolloutAccumulator",
    "SignalAccumulator",
    "coarse_bucket",
    "coarse_upper",
]
