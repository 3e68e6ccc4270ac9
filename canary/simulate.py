"""``canary simulate FILE``: power analysis of a rollout file before the rollout.

For one rollout of the file, at a given request rate, this runs canary's own decision path
on simulated traffic, many times: the requests of each analysis interval are drawn in bulk,
routed by the steps' weights (or the sticky users' hash points), recorded into a
:class:`~canary.observe.RolloutAccumulator` exactly as the proxy's recorder would record
them (latency and errors per request, ttft, cost and the other signals the metrics read,
labels ``feedback.ttl`` late), and every analysis interval the real
:func:`~canary.decision.analyze`, :func:`~canary.decision.decide` and
:func:`~canary.decision.transition` run on the totals, until promotion, rollback or
``max_duration``. What comes out, per scenario (an identical candidate; the default or given
regressions), is the distribution over repeats of the time and the candidate requests to the
decision, and per metric the smallest regression it catches within ``max_duration``.

Traffic model (every parameter has a flag; docs/simulate.md):

- arrivals: Poisson at ``rate`` requests per second;
- latency: lognormal, median ``latency_median`` (50 ms) and log-sd ``latency_sigma`` (0.5),
  or resampled from a sample file, or drawn from production's Prometheus histogram;
  ``ttft`` lognormal (median half the latency's unless given);
- errors: each request fails with ``error_rate`` (1%) as a 5xx (its latency still counts);
- 0/1 signals (``feedback`` labels, ``agreement``, a ``json:`` value judged in pp): correct
  with ``accuracy`` (90%); labels count ``feedback.ttl`` after the request
  (``count_at: maturity``) or ``label_delay`` after it (``arrival``);
- ``cost``: each arm's price per request from its pricing (``tokens`` per request, the
  ``per_hour`` part amortised over ``rate``), the same for every request; other
  continuous signals (``header:``, ``json:``, ``server_timing:``, ``tokens_per_s``, ``itl``):
  lognormal, median 1, log-sd 0.5;
- sticky routing: ``users`` users (1000) with a uniform hash point and cluster each; a user's
  requests share a log-latency offset (sd ``user_latency_sigma``, 0.5) and a logit error
  offset (sd ``user_error_sigma``, 1.0), as in ``loadtest/scenarios.py``'s ``sticky_aa``;
- ``resource:`` metrics are scraped per window, not per request: they are left out, with the
  alpha of the remaining tests kept as in the file (the report says so).

Timing: the controller flushes and analyses every ``analysis.interval`` rounded up to its
250 ms loop, at a phase that is random relative to the first request; a decision's time is
the time of the analysis that made it. To stay fast over long ``max_duration``s the analysis
is evaluated every interval while it could change the step (requirements met) and otherwise
at intervals spaced at most ``stride`` (20%) of the elapsed time apart; when such an
evaluation finds a promotion or rollback, the intervals since the previous evaluation are
searched by bisection for the first one that decides (exact when a verdict, once reached,
stays; ``--exact`` evaluates every interval).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from canary.config import Config, MetricConfig, RolloutConfig, load_config
from canary.decision import (
    Action,
    Phase,
    RolloutState,
    analyze,
    decide,
    metric_alpha,
    track_failures,
    transition,
)
from canary.errors import CanaryError, ConfigError
from canary.observe import (
    CLUSTERS,
    COARSE_SHIFT,
    ArmAccumulator,
    ClusterCells,
    LogHistogram,
    Moments,
    RolloutAccumulator,
    SignalAccumulator,
    coarse_bucket,
)
from canary.observe.record import ERROR_STATUS
from canary.signals import (
    AGREEMENT,
    COST,
    ERROR,
    FEEDBACK,
    LATENCY,
    OTHER_STATUS_CLASS,
    TTFT,
    is_windowed,
    parse_signal,
    status_class_labels,
)

# The controller's loop period (canary.controller.FLUSH_INTERVAL; a test pins the two): it
# flushes and starts the due analyses once per turn, so an interval shorter than this is this.
LOOP_SECONDS = 0.25
DEFAULT_REPEATS = 20
DEFAULT_DETECT_REPEATS = 5
DETECT_SHARE = 0.8  # "caught": rolled back by that metric in at least 80% of the repeats
DEFAULT_TIME_LIMIT = 40.0
DEFAULT_STRIDE = 0.2
MIN_POSITIVE = 1e-9  # canary.observe.histogram.MIN_POSITIVE: values at or below count as zero
_2XX, _5XX = status_class_labels(OTHER_STATUS_CLASS)[2], status_class_labels(OTHER_STATUS_CLASS)[5]


class SimulateError(CanaryError, ValueError):
    """Bad input to ``canary simulate`` (a file, an effect, a rate): the message says which."""


# -- effects ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Effect:
    """A change of the candidate against production on one signal.

    ``relative``: the candidate's values (or rate) are production's times ``1 + value``
    (``+10%`` is 0.10); else ``value`` is added to the rate (``+1pp`` is 0.01) or the value.
    """

    value: float
    relative: bool

    def text(self) -> str:
        return f"{100 * self.value:+.3g}{'%' if self.relative else 'pp'}"


_EFFECT = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)\s*(%|pp)\s*$|^\s*[x*]\s*(\d+(?:\.\d+)?)\s*$")


def parse_effect_value(text: str) -> Effect:
    """``+10%``, ``-20%``, ``+1pp``, ``-2pp`` or ``x1.3`` (a factor)."""
    m = _EFFECT.match(text)
    if m is None:
        raise SimulateError(
            f"effect {text!r}: expected a change such as +10%, -20%, +1pp, -2pp or x1.3"
        )
    if m.group(3) is not None:
        factor = float(m.group(3))
        if factor <= 0:
            raise SimulateError(f"effect {text!r}: a factor must be positive")
        return Effect(factor - 1.0, True)
    value = float(m.group(1)) / 100.0
    if m.group(2) == "%" and value <= -1.0:
        raise SimulateError(f"effect {text!r}: a relative change must be above -100%")
    return Effect(value, m.group(2) == "%")


def parse_effects(text: str) -> list[tuple[str, Effect]]:
    """``KEY=CHANGE[,KEY=CHANGE...]``; KEY is a metric name or a signal (resolved later)."""
    out: list[tuple[str, Effect]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise SimulateError(
                f"effect {part!r}: expected KEY=CHANGE, such as latency=+10% or errors=+1pp"
            )
        out.append((key.strip(), parse_effect_value(value)))
    if not out:
        raise SimulateError("--effects is empty: give KEY=CHANGE, such as latency=+10%")
    return out


# Signal aliases users type.
_ALIASES = {"errors": ERROR, "accuracy": FEEDBACK, "labels": FEEDBACK}


def resolve_effects(
    rollout: RolloutConfig, effects: Sequence[tuple[str, Effect]]
) -> dict[str, Effect]:
    """Effects keyed by the signal key they change; a KEY names a metric or a signal that some
    metric of the rollout measures."""
    by_name = {m.name: _key(m) for m in rollout.analysis.metrics}
    measured = set(by_name.values())
    out: dict[str, Effect] = {}
    for key, effect in effects:
        if key in by_name:
            sig = by_name[key]
        else:
            alias = _ALIASES.get(key, key)
            try:
                sig = parse_signal(alias).key
            except ValueError as exc:
                raise SimulateError(
                    f"effect on {key!r}: neither a metric of rollout {rollout.name!r} "
                    f"({', '.join(by_name) or 'none'}) nor a signal: {exc}"
                ) from None
            if sig not in measured and key == "accuracy":
                rates = [m for m in rollout.analysis.metrics if _family(m) == "rate"]
                if len(rates) == 1:
                    sig = _key(rates[0])
        if sig not in measured:
            raise SimulateError(
                f"effect on {key!r}: no metric of rollout {rollout.name!r} measures {sig!r} "
                f"(its metrics: {', '.join(f'{n} ({s})' for n, s in by_name.items())})"
            )
        if is_windowed(sig):
            raise SimulateError(f"effect on {key!r}: resource and promql metrics are not simulated")
        family = _family_of(rollout, sig)
        if family in ("rate", "error") and effect.relative and effect.value <= -1.0:
            raise SimulateError(f"effect on {key!r}: a rate cannot fall by 100% or more")
        out[sig] = effect
    return out


def _key(m: MetricConfig) -> str:
    return parse_signal(m.signal).key


def _family(m: MetricConfig) -> str:
    """How a metric's signal is simulated: latency, ttft, error, rate, cost, value, resource."""
    key = _key(m)
    if is_windowed(key):  # resource: and promql: alike
        return "resource"
    if key == ERROR:
        return "error"
    if key in (FEEDBACK, AGREEMENT) or m.stat == "rate":
        return "rate"
    if not m.margin.relative and key.startswith("json:"):
        return "rate"  # a json: value judged in pp: a 0/1 such as "correct"
    if key == LATENCY:
        return "latency"
    if key == TTFT:
        return "ttft"
    if key == COST:
        return "cost"
    return "value"


def _family_of(rollout: RolloutConfig, key: str) -> str:
    for m in rollout.analysis.metrics:
        if _key(m) == key:
            return _family(m)
    return "value"


# -- traffic ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """Production's traffic: what the candidate is compared with (see the module doc)."""

    rate: float
    latency_median: float = 0.05
    latency_sigma: float = 0.5
    latency_samples: tuple[float, ...] | None = None  # resampled instead of the lognormal
    ttft_median: float | None = None  # None: half the latency's median
    ttft_sigma: float | None = None  # None: the latency's sigma
    error_rate: float = 0.01
    accuracy: float = 0.9
    label_delay: float = 0.0  # count_at: arrival
    tokens: float = 500.0  # tokens per request, for per_1k_tokens pricing
    users: int = 1000  # sticky routing only
    user_latency_sigma: float = 0.5
    user_error_sigma: float = 1.0
    source: str = "lognormal"

    def check(self) -> None:
        if not (math.isfinite(self.rate) and 0 < self.rate <= 1_000_000):
            raise SimulateError(
                f"--rate must be a request rate in (0, 1e6] per second, got {self.rate:g}"
            )
        for name, v, lo, hi in (
            ("--latency-median", self.latency_median, 1e-6, 3600.0),
            ("--latency-sigma", self.latency_sigma, 0.0, 5.0),
            ("--error-rate", self.error_rate, 0.0, 1.0),
            ("--accuracy", self.accuracy, 0.0, 1.0),
            ("--label-delay", self.label_delay, 0.0, 86400.0),
            ("--tokens", self.tokens, 0.0, 1e7),
            ("--user-latency-sigma", self.user_latency_sigma, 0.0, 5.0),
            ("--user-error-sigma", self.user_error_sigma, 0.0, 10.0),
        ):
            if not (math.isfinite(v) and lo <= v <= hi):
                raise SimulateError(f"{name} must be within {lo:g}..{hi:g}, got {v:g}")
        if self.users < 1:
            raise SimulateError(f"--users must be at least 1, got {self.users}")

    def describe(self) -> str:
        if self.latency_samples is not None:
            lat = (
                f"latency resampled from {len(self.latency_samples)} values ({self.source}, "
                f"median {1000 * float(np.median(self.latency_samples)):.1f} ms)"
            )
        else:
            lat = (
                f"latency lognormal (median {1000 * self.latency_median:.1f} ms, "
                f"sigma {self.latency_sigma:g})"
            )
        return f"{self.rate:g} req/s; {lat}; errors {100 * self.error_rate:g}%"


def load_latency_samples(path: str) -> tuple[float, ...]:
    """Latencies in seconds: one per line (``#`` comments allowed) or a JSON list."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SimulateError(f"--latency-samples {path}: {exc.strerror or exc}") from None
    values: list[float] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SimulateError(f"--latency-samples {path}: not a JSON list: {exc}") from None
        for i, v in enumerate(data):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise SimulateError(f"--latency-samples {path}: item {i} is not a number: {v!r}")
            values.append(float(v))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                values.append(float(line))
            except ValueError:
                raise SimulateError(
                    f"--latency-samples {path}:{n}: {line!r} is not a latency in seconds"
                ) from None
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise SimulateError(
            f"--latency-samples {path}: latencies must be positive seconds, got {bad[0]!r}"
        )
    if len(values) < 20:
        raise SimulateError(
            f"--latency-samples {path}: {len(values)} values; give at least 20 latencies"
        )
    return tuple(values)


# -- Prometheus ---------------------------------------------------------------------------------

_PROM_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LE = re.compile(r'le="([^"]*)"')


def parse_histogram(
    text: str, metric: str | None = None
) -> tuple[str, list[float], list[float], float]:
    """From Prometheus text: (name, upper bounds, cumulative counts, total count) of a
    histogram, summed over its label sets. ``metric`` names it (without ``_bucket``); by
    default canary's ``canary_request_duration_seconds`` for production, else the first
    histogram whose name has ``duration``, ``latency`` or ``seconds``."""
    buckets: dict[str, dict[float, float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _PROM_LINE.match(line)
        if m is None or not m.group(1).endswith("_bucket"):
            continue
        labels = m.group(2) or ""
        if 'arm="candidate"' in labels:
            continue  # canary's own /metrics: production is the baseline
        le = _LE.search(labels)
        if le is None:
            continue
        try:
            bound = math.inf if le.group(1) in ("+Inf", "Inf") else float(le.group(1))
            value = float(m.group(3))
        except ValueError:
            continue
        name = m.group(1)[: -len("_bucket")]
        cell = buckets.setdefault(name, {})
        cell[bound] = cell.get(bound, 0.0) + value
    if not buckets:
        raise SimulateError("no histogram (*_bucket series) in the Prometheus text")
    if metric is None:
        names = list(buckets)
        preferred = [n for n in names if n == "canary_request_duration_seconds"] or [
            n for n in names if any(w in n for w in ("duration", "latency", "seconds"))
        ]
        if not preferred:
            raise SimulateError(
                f"no latency histogram found; name one with --prometheus-metric "
                f"(histograms: {', '.join(names)})"
            )
        metric = preferred[0]
    if metric not in buckets:
        raise SimulateError(
            f"no histogram {metric!r} in the Prometheus text (histograms: {', '.join(buckets)})"
        )
    cells = sorted(buckets[metric].items())
    bounds = [b for b, _ in cells]
    counts = [c for _, c in cells]
    total = counts[-1] if bounds[-1] == math.inf else max(counts)
    return metric, bounds, counts, total


def histogram_samples(
    bounds: Sequence[float], cumulative: Sequence[float], n: int = 20_000, seed: int = 0
) -> tuple[float, ...]:
    """``n`` latencies drawn from a cumulative histogram: a bucket by its share, then
    log-uniform within it (the first bucket from half its bound; +Inf from the last finite
    bound to 1.5 times it)."""
    per = np.diff(np.concatenate([[0.0], np.asarray(cumulative, dtype=float)]))
    per = np.clip(per, 0.0, None)
    if per.sum() <= 0:
        raise SimulateError("the latency histogram is empty: no requests observed yet")
    finite = [b for b in bounds if math.isfinite(b)]
    if not finite:
        raise SimulateError("the latency histogram has no finite bucket bound")
    lo = np.array([finite[0] / 2] + [b for b in bounds[:-1]], dtype=float)
    hi = np.array([b if math.isfinite(b) else finite[-1] * 1.5 for b in bounds], dtype=float)
    lo = np.minimum(np.maximum(lo, 1e-6), hi)
    rng = np.random.default_rng(seed)
    k = rng.choice(len(per), size=n, p=per / per.sum())
    u = rng.random(n)
    values = np.exp(np.log(lo[k]) + u * (np.log(hi[k]) - np.log(lo[k])))
    return tuple(float(v) for v in values)


def read_prometheus(
    url: str,
    metric: str | None,
    window: float,
    fetch: Callable[[str], str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[float, tuple[float, ...], str]:
    """Scrape ``url`` twice ``window`` seconds apart: (request rate, latency samples, what).

    The rate is the increase of the histogram's count over the window."""
    get = fetch or _http_get
    first = parse_histogram(get(url), metric)
    t0 = time.monotonic()
    sleep(window)
    name, bounds, counts, total = parse_histogram(get(url), first[0])
    elapsed = max(time.monotonic() - t0, window, 1e-3)
    rate = (total - first[3]) / elapsed
    if rate <= 0:
        raise SimulateError(
            f"{url}: {name} counted no request in {elapsed:.1f} s; give --rate R (or a longer "
            "--prometheus-window)"
        )
    # The latencies of the histogram's whole life (the window's alone may be a handful).
    return rate, histogram_samples(bounds, counts), f"{name} at {url}"


def _http_get(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise SimulateError(f"--prometheus {url!r}: expected an http:// or https:// URL")
    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # http(s) only: checked above
            data: bytes = r.read(16 * 1024 * 1024)
            return data.decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SimulateError(f"--prometheus {url}: {getattr(exc, 'reason', exc)}") from None


# -- the plan: what is simulated of the rollout --------------------------------------------------


@dataclass(frozen=True)
class Plan:
    rollout: RolloutConfig  # as simulated (resource metrics left out)
    period: float  # seconds between analyses
    notes: tuple[str, ...] = ()
    label_lag: float = 0.0
    alpha: float = 0.05  # the file's

    @property
    def max_duration(self) -> float:
        return self.rollout.analysis.max_duration


def make_plan(rollout: RolloutConfig, traffic: Traffic) -> Plan:
    notes: list[str] = []
    file_alpha = rollout.analysis.alpha
    metrics = rollout.analysis.metrics
    dropped = [m for m in metrics if _family(m) == "resource"]
    if dropped:
        kept = [m for m in metrics if _family(m) != "resource"]
        # Keep the per-test alpha of the file: alpha / (metrics + 1) with every metric.
        alpha = metric_alpha(rollout) * (len(kept) + 1)
        tradeoff = rollout.analysis.tradeoff
        if tradeoff is not None:
            tradeoff = {k: v for k, v in tradeoff.items() if k not in {m.name for m in dropped}}
            if len(tradeoff) < 1:
                tradeoff = None
        analysis = rollout.analysis.model_copy(
            update={"metrics": kept, "alpha": alpha, "tradeoff": tradeoff}
        )
        rollout = rollout.model_copy(update={"analysis": analysis})
        notes.append(
            "not simulated (resource: and promql: are per window, not per request): "
            + ", ".join(m.name for m in dropped)
            + "; the other tests keep the file's alpha each"
        )
    costs = arm_costs(rollout, traffic)
    if any(_family(m) == "cost" for m in rollout.analysis.metrics) and costs[0] != costs[1]:
        notes.append(
            f"cost from the arms' pricing: candidate {100 * (costs[1] / costs[0] - 1):+.1f}% "
            "per request before any effect"
        )
    if rollout.inputs is not None:
        notes.append("input health not simulated (inputs are assumed not to drift)")
    if rollout.routing.sticky is not None:
        notes.append(
            f"sticky routing: {traffic.users} users, per-user log-latency sd "
            f"{traffic.user_latency_sigma:g}, logit error sd {traffic.user_error_sigma:g}"
        )
    lag = 0.0
    if any(_key(m) == FEEDBACK for m in rollout.analysis.metrics):
        lag = (
            rollout.feedback.ttl if rollout.feedback.count_at == "maturity" else traffic.label_delay
        )
        notes.append(f"labels count {lag:g} s after their request ({rollout.feedback.count_at})")
    period = LOOP_SECONDS * math.ceil(rollout.analysis.interval / LOOP_SECONDS - 1e-9)
    return Plan(rollout, max(period, LOOP_SECONDS), tuple(notes), lag, alpha=file_alpha)


# -- bulk recording (what Recorder.record does, for many observations at once) -------------------


def _inv_log_gamma(accuracy: float) -> float:
    return 1.0 / math.log((1.0 + accuracy) / (1.0 - accuracy))


def _count_into(into: dict[int, int], keys: np.ndarray) -> None:
    """``into[k] += count of k in keys`` (a bincount over the keys' range when it is small)."""
    if keys.size == 0:
        return
    lo, hi = int(keys.min()), int(keys.max())
    if hi - lo <= max(4 * keys.size, 4096):
        counts = np.bincount(keys - lo)
        nz = np.nonzero(counts)[0]
        pairs = zip((nz + lo).tolist(), counts[nz].tolist(), strict=True)
    else:
        u, c = np.unique(keys, return_counts=True)
        pairs = zip(u.tolist(), c.tolist(), strict=True)
    for k, v in pairs:
        into[k] = into.get(k, 0) + v


def add_values(
    sig: SignalAccumulator,
    values: np.ndarray,
    p: float,
    clusters: np.ndarray | None = None,
    *,
    binary: bool = False,
) -> None:
    """Add ``values`` at propensity ``p`` (and their sticky clusters) to ``sig``: the same
    moments, histogram buckets, min/max and cluster cells as ``sig.add`` one by one (bucket
    indices from numpy's log, which may differ from ``math.log`` by an ulp at a boundary).
    ``binary``: every value is 0.0 or 1.0 (errors, labels), counted without logarithms."""
    if not binary:
        keep = np.isfinite(values)
        if not keep.all():
            values = values[keep]
            clusters = clusters[keep] if clusters is not None else None
    n = int(values.size)
    if n == 0:
        return
    m = sig.strata.get(p)
    if m is None:
        m = sig.strata[p] = Moments()
        sig.hists[p] = LogHistogram(sig.accuracy)
    h = sig.hists[p]
    h.count += n
    inv = _inv_log_gamma(sig.accuracy)
    lo, hi = float(values.min()), float(values.max())
    if lo < sig.min:
        sig.min = lo
    if hi > sig.max:
        sig.max = hi
    cells = None
    if clusters is not None:
        cells = sig.clusters.get(p)
        if cells is None:
            cells = sig.clusters[p] = ClusterCells()
        cn = np.bincount(clusters, minlength=CLUSTERS)
    if binary or lo == hi:
        # Two values at most (0 and 1, or one constant): counts, no logarithm per value.
        ones = values > 0.5 if binary else np.ones(n, dtype=bool)
        k1 = int(np.count_nonzero(ones)) if binary else n
        v1 = 1.0 if binary else lo
        m.n += n
        m.total += k1 * v1
        m.total_sq += k1 * v1 * v1
        parts = [(v1, k1)] + ([(0.0, n - k1)] if binary else [])
        for v, k in parts:
            if k == 0:
                continue
            if v > MIN_POSITIVE:
                i = math.ceil(math.log(v) * inv)
                h.pos[i] = h.pos.get(i, 0) + k
            elif v < -MIN_POSITIVE:
                i = math.ceil(math.log(-v) * inv)
                h.neg[i] = h.neg.get(i, 0) + k
            else:
                h.zero += k
        if cells is None or clusters is None:
            return
        c1 = np.bincount(clusters[ones], minlength=CLUSTERS) if binary else cn
        hist = cells.hist
        for g in np.nonzero(cn)[0].tolist():
            k1g, kg = int(c1[g]), int(cn[g])
            cells.n[g] += kg
            cells.total[g] += k1g * v1
            for v, k in ((v1, k1g), (0.0, kg - k1g)):
                if k:
                    key = coarse_bucket(v, inv) * CLUSTERS + g
                    hist[key] = hist.get(key, 0) + k
        return
    m.n += n
    m.total += float(values.sum())
    m.total_sq += float(np.dot(values, values))
    if lo > MIN_POSITIVE:  # every value positive (latencies): no masks
        idx = np.ceil(np.log(values) * inv).astype(np.int64)
        _count_into(h.pos, idx)
        coarse = idx >> COARSE_SHIFT
    else:
        pos = values > MIN_POSITIVE
        negm = values < -MIN_POSITIVE
        zero = ~(pos | negm)
        idx = np.zeros(n, dtype=np.int64)
        idx[pos] = np.ceil(np.log(values[pos]) * inv).astype(np.int64)
        _count_into(h.pos, idx[pos])
        idx[negm] = np.ceil(np.log(-values[negm]) * inv).astype(np.int64)
        _count_into(h.neg, idx[negm])
        h.zero += int(zero.sum())
        coarse = idx >> COARSE_SHIFT
        coarse[zero] = coarse_bucket(0.0, inv)
        if negm.any():
            coarse[negm] = [coarse_bucket(float(v), inv) for v in values[negm]]
    if cells is None or clusters is None:
        return
    ct = np.bincount(clusters, weights=values, minlength=CLUSTERS)
    for g in np.nonzero(cn)[0].tolist():
        cells.n[g] += int(cn[g])
        cells.total[g] += float(ct[g])
    _count_into(cells.hist, coarse * CLUSTERS + clusters)


@dataclass
class Batch:
    """One arm's observations at one propensity: what the proxy would have recorded."""

    p: float
    latency: np.ndarray
    error: np.ndarray  # bool
    signals: dict[str, np.ndarray]
    clusters: np.ndarray | None
    tick: np.ndarray  # analysis interval index of each observation
    shadow: bool = False

    def head(self, k: int) -> Batch:
        return Batch(
            self.p,
            self.latency[:k],
            self.error[:k],
            {key: v[:k] for key, v in self.signals.items()},
            self.clusters[:k] if self.clusters is not None else None,
            self.tick[:k],
            self.shadow,
        )


def record_batch(arm: ArmAccumulator, b: Batch) -> None:
    """``ArmAccumulator.record`` for every observation of ``b`` (status 200, or 500 with
    ``error="status"``, whose latency counts too)."""
    n = int(b.latency.size)
    if n == 0:
        return
    errors = int(b.error.sum())
    arm.observed += n
    arm.routed += n
    cell = arm.routing.get(b.p)
    if cell is None:
        arm.routing[b.p] = [n, n]
    else:
        cell[0] += n
        cell[1] += n
    arm.answered += n
    sc = arm.status_classes
    if n - errors:
        sc[_2XX] = sc.get(_2XX, 0) + n - errors
    if errors:
        sc[_5XX] = sc.get(_5XX, 0) + errors
        arm.errors += errors
        arm.error_kinds[ERROR_STATUS] = arm.error_kinds.get(ERROR_STATUS, 0) + errors
    if b.shadow:
        arm.shadow += n
    add_values(arm.signals[ERROR], b.error.astype(float), b.p, b.clusters, binary=True)
    add_values(arm.signals[LATENCY], b.latency, b.p, b.clusters)
    for key, values in b.signals.items():
        acc = arm.signals.get(key)
        if acc is None:
            acc = arm.signals[key] = SignalAccumulator(arm.accuracy)
        add_values(acc, values, b.p, b.clusters)


@dataclass
class Labels:
    """0/1 labels waiting to count (``release`` is an analysis interval index)."""

    arm: str
    p: float
    key: str
    values: np.ndarray
    clusters: np.ndarray | None
    release: np.ndarray


def record_labels(acc: RolloutAccumulator, labels: Sequence[Labels], upto: int, after: int) -> None:
    """Record the labels released in intervals ``after < release <= upto``."""
    for lab in labels:
        lo = int(np.searchsorted(lab.release, after, side="right"))
        hi = int(np.searchsorted(lab.release, upto, side="right"))
        if hi <= lo:
            continue
        sig = acc.arms[lab.arm].signals.get(lab.key)
        if sig is None:
            sig = acc.arms[lab.arm].signals[lab.key] = SignalAccumulator(acc.accuracy)
        cl = lab.clusters[lo:hi] if lab.clusters is not None else None
        add_values(sig, lab.values[lo:hi], lab.p, cl, binary=True)


# -- one run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """How one simulated rollout ended: ``promote``, ``rollback`` or ``timeout`` (``rollback``
    by ``on_inconclusive`` is ``by == "max_duration"``)."""

    result: str
    seconds: float
    candidate: int
    total: int
    by: str = ""


class _Users:
    def __init__(self, t: Traffic, rng: np.random.Generator) -> None:
        self.point = rng.random(t.users) * 100.0
        self.cluster = rng.integers(0, CLUSTERS, t.users)
        self.lat = rng.normal(0.0, t.user_latency_sigma, t.users)
        self.err = rng.normal(0.0, t.user_error_sigma, t.users)


class Simulator:
    """Runs one rollout plan under one traffic model and one set of effects."""

    def __init__(
        self,
        plan: Plan,
        traffic: Traffic,
        effects: dict[str, Effect],
        *,
        stride: float = DEFAULT_STRIDE,
    ) -> None:
        self.plan = plan
        self.t = traffic
        self.effects = effects
        self.stride = stride
        r = plan.rollout
        self.sticky = r.routing.sticky is not None
        self.families = {}
        for m in r.analysis.metrics:
            self.families[_key(m)] = _family(m)
        self.samples = (
            np.asarray(traffic.latency_samples, dtype=float)
            if traffic.latency_samples is not None
            else None
        )
        base_median = (
            float(np.median(self.samples)) if self.samples is not None else traffic.latency_median
        )
        self.ttft_median = (
            traffic.ttft_median if traffic.ttft_median is not None else base_median / 2
        )
        self.ttft_sigma = (
            traffic.ttft_sigma if traffic.ttft_sigma is not None else traffic.latency_sigma
        )
        self.base_logit = _logit(traffic.error_rate)
        self.cost = arm_costs(plan.rollout, traffic)

    # -- traffic of a block of intervals ---------------------------------------------------------

    def _values(
        self,
        key: str,
        fam: str,
        n: int,
        rng: np.random.Generator,
        cand: bool,
        u_lat: np.ndarray,
    ) -> np.ndarray:
        """``n`` values of signal ``key`` (the candidate's with its effect); ``u_lat``: the
        users' log-latency offsets."""
        eff = self.effects.get(key) if cand else None
        if fam == "latency":
            if self.samples is not None:
                v = self.samples[rng.integers(0, self.samples.size, n)]
            else:
                v = self.t.latency_median * np.exp(self.t.latency_sigma * rng.standard_normal(n))
            v = v * np.exp(u_lat)
        elif fam == "ttft":
            v = self.ttft_median * np.exp(self.ttft_sigma * rng.standard_normal(n) + u_lat)
        elif fam == "cost":
            v = np.full(n, self.cost[1 if cand else 0])
        elif fam == "rate":
            prod = 1.0 if key == AGREEMENT else self.t.accuracy
            rate = _apply_rate(prod, eff)
            return (rng.random(n) < rate).astype(float)
        else:
            v = np.exp(0.5 * rng.standard_normal(n))
        if eff is not None:
            v = v * (1.0 + eff.value) if eff.relative else np.maximum(v + eff.value, 0.0)
        return v

    def block(
        self,
        rng: np.random.Generator,
        users: _Users | None,
        weight: float,
        shadow: bool,
        first_tick: int,
        tick_seconds: np.ndarray,
    ) -> list[tuple[str, Batch]]:
        """The observations, per arm, of the intervals from ``first_tick`` on (their lengths
        ``tick_seconds``), routed as the proxy's ``ArmChooser`` routes: a uniform point (the
        sticky user's hash point) below the candidate's weight goes to the candidate; a
        shadow step sends every request to production and mirrors it to the candidate."""
        counts = rng.poisson(self.t.rate * tick_seconds)
        n = int(counts.sum())
        tick = np.repeat(np.arange(first_tick, first_tick + len(counts)), counts)
        clusters: np.ndarray | None = None
        if users is not None:
            who = rng.integers(0, len(users.point), n)
            point, clusters = users.point[who], users.cluster[who]
            u_lat, u_err = users.lat[who], users.err[who]
        else:
            point = rng.random(n) * 100.0
            u_lat = u_err = np.zeros(n)
        if shadow:
            every = np.ones(n, dtype=bool)
            parts = [("production", every, 1.0, False), ("candidate", every, 1.0, True)]
        else:
            to_cand = point < weight
            parts = [
                ("production", ~to_cand, 1.0 - weight / 100.0, False),
                ("candidate", to_cand, weight / 100.0, False),
            ]
        out: list[tuple[str, Batch]] = []
        for arm, mask, p, is_shadow in parts:
            k = int(mask.sum())
            if k == 0:
                continue
            cand = arm == "candidate"
            ul, ue = u_lat[mask], u_err[mask]
            lat = self._values(LATENCY, "latency", k, rng, cand, ul)
            perr = _sigmoid(self.base_logit + ue) if self.t.error_rate > 0 else np.zeros(k)
            if cand:
                perr = _apply_rate(perr, self.effects.get(ERROR))
            err = rng.random(k) < perr
            sigs: dict[str, np.ndarray] = {}
            for key, fam in self.families.items():
                if fam in ("latency", "error", "resource") or key in (FEEDBACK, AGREEMENT):
                    continue
                sigs[key] = self._values(key, fam, k, rng, cand, ul)
            cl = clusters[mask] if clusters is not None else None
            out.append((arm, Batch(p, lat, err, sigs, cl, tick[mask], is_shadow)))
        return out

    def labels(
        self, rng: np.random.Generator, arms: list[tuple[str, Batch]], lag_ticks: int
    ) -> list[Labels]:
        """Labels of the answered requests of ``arms`` (``feedback``), counting ``lag_ticks``
        intervals later; shadow agreement of mirrored pairs (propensity 1, at once)."""
        out: list[Labels] = []
        shadow = any(b.shadow for _, b in arms)
        for key in (FEEDBACK, AGREEMENT):
            if key not in self.families or (key == AGREEMENT and not shadow):
                continue
            for arm, b in arms:
                ok = ~b.error
                k = int(ok.sum())
                if k == 0:
                    continue
                vals = self._values(key, "rate", k, rng, arm == "candidate", np.zeros(k))
                out.append(
                    Labels(
                        arm,
                        1.0 if key == AGREEMENT else b.p,
                        key,
                        vals,
                        b.clusters[ok] if b.clusters is not None else None,
                        b.tick[ok] + (0 if key == AGREEMENT else lag_ticks),
                    )
                )
        return out

    # -- one rollout -----------------------------------------------------------------------------

    def run(self, rng: np.random.Generator, exact: bool = False) -> Run:
        r = self.plan.rollout
        period = self.plan.period
        phase = float(rng.uniform(0.0, period))  # first analysis after the first request

        def at(k: int) -> float:  # time of analysis k (k >= 0)
            return phase + k * period

        users = _Users(self.t, rng) if self.sticky else None
        state = RolloutState.start(r, 0.0)
        acc = RolloutAccumulator()
        labels: list[Labels] = []
        lag_ticks = math.ceil(self.plan.label_lag / period - 1e-9) if self.plan.label_lag else 0
        k = -1  # last analysed interval
        last_check: float | None = None
        deadline_tick = max(0, math.ceil((state.deadline - phase) / period - 1e-9))
        while True:
            step = r.steps[min(state.step, len(r.steps) - 1)]
            weight, shadow = step.candidate_weight, step.is_shadow
            elapsed_ticks = k + 1
            span = 1 if exact else max(1, int(self.stride * elapsed_ticks))
            end = min(k + span, deadline_tick)
            end = max(end, k + 1)
            ticks = np.arange(k + 1, end + 1)
            secs = np.full(len(ticks), period)
            if k < 0:
                secs[0] = phase
            arms = self.block(rng, users, weight, shadow, k + 1, secs)
            new_labels = self.labels(rng, arms, lag_ticks)
            # Step requirements met inside the block: the analysis at that interval advances
            # (or rolls back): cut the block there.
            last_step = state.step >= len(r.steps) - 1
            if not last_step and len(ticks) > 1:
                cut = self._met_at(state, acc, arms, ticks, at)
                if cut is not None and cut < end:
                    end = cut
                    arms = [(a, _upto(b, end)) for a, b in arms]
                    new_labels = [_labels_upto_request(lab, end, lag_ticks) for lab in new_labels]
            before = acc.snapshot() if end > k + 1 else None
            before_labels = list(labels)
            for a, b in arms:
                record_batch(acc.arms[a], b)
            labels = _merge_labels(labels, new_labels)
            record_labels(acc, labels, end, k)
            decision, new_state, check = self._evaluate(r, state, acc, at(end), last_check)
            if decision.action in (Action.PROMOTE, Action.ROLLBACK) and before is not None:
                # The first interval of the block that decides (bisection).
                lo, hi = k + 1, end  # hi decides
                found = (decision, new_state, check, acc)
                while lo < hi:
                    mid = (lo + hi) // 2
                    trial = before.snapshot()
                    for a, b in arms:
                        record_batch(trial.arms[a], _upto(b, mid))
                    record_labels(trial, _merge_labels(before_labels, new_labels), mid, k)
                    d, s2, c2 = self._evaluate(r, state, trial, at(mid), last_check)
                    if d.action in (Action.PROMOTE, Action.ROLLBACK):
                        hi, found = mid, (d, s2, c2, trial)
                    else:
                        lo = mid + 1
                end = hi
                decision, new_state, check, acc = found
            last_check = check
            state = new_state
            k = end
            labels = [_released_after(lab, k) for lab in labels]
            if state.phase is Phase.PROMOTED or state.phase is Phase.ROLLED_BACK:
                by = "max_duration" if decision.reason.startswith("max_duration") else ""
                if state.phase is Phase.ROLLED_BACK and not by:
                    if decision.evidence is not None:
                        by = decision.evidence.metric
                    elif decision.reason.startswith("candidate failed hard"):
                        by = "hard failure"
                    else:
                        by = decision.reason.split(":")[0]
                result = "promote" if state.phase is Phase.PROMOTED else "rollback"
                return Run(
                    result,
                    at(k),
                    acc.candidate.observed,
                    acc.candidate.observed + acc.production.observed,
                    by,
                )
            if state.phase is not Phase.RUNNING or k >= deadline_tick + 1:
                # held (on_inconclusive: hold) or beyond the deadline
                return Run(
                    "timeout",
                    at(k),
                    acc.candidate.observed,
                    acc.candidate.observed + acc.production.observed,
                    "max_duration",
                )

    def _evaluate(
        self,
        r: RolloutConfig,
        state: RolloutState,
        acc: RolloutAccumulator,
        now: float,
        last_check: float | None,
    ) -> tuple[Any, RolloutState, float]:
        state = track_failures(
            state, acc.candidate.observed, acc.candidate.errors, now, previous_check=last_check
        )
        analysis = analyze(
            r, acc, failing_for=state.failing_for(now), failing_requests=state.failing_requests
        )
        decision = decide(r, state, analysis, now)
        new = transition(r, state, decision, analysis.candidate_observed, now)
        return decision, new, now

    def _met_at(
        self,
        state: RolloutState,
        acc: RolloutAccumulator,
        arms: list[tuple[str, Batch]],
        ticks: np.ndarray,
        at: Callable[[int], float],
    ) -> int | None:
        """The first interval of ``ticks`` at whose analysis the step's requirements are met."""
        r = self.plan.rollout
        step = r.steps[min(state.step, len(r.steps) - 1)]
        cand = np.zeros(len(ticks), dtype=np.int64)
        for a, b in arms:
            if a == "candidate":
                cand += np.bincount(b.tick - ticks[0], minlength=len(ticks))[: len(ticks)]
        total = acc.candidate.observed + np.cumsum(cand)
        times = np.array([at(int(t)) for t in ticks])
        met = (
            (total - state.step_base >= step.required_requests)
            & (times - state.step_started_at >= step.required_duration)
            & (total >= r.analysis.burn_in)
        )
        hit = np.nonzero(met)[0]
        return int(ticks[hit[0]]) if hit.size else None


def arm_costs(rollout: RolloutConfig, traffic: Traffic) -> tuple[float, float]:
    """Cost per request of (production, candidate) from the arms' pricing, as the proxy prices
    it: ``per_request + per_1k_tokens * tokens / 1000 + per_hour * replicas / 3600 / rate``
    (amortised over the rollout's total rate). A cost header is taken as equal on both arms;
    arms without a priced component both cost 1 (only effects then differ)."""

    def priced(arm: Any) -> float | None:
        c = arm.cost
        if c is None:
            return None
        v = c.per_request + c.per_1k_tokens * traffic.tokens / 1000.0
        v += c.per_hour * c.replicas / 3600.0 / traffic.rate
        return v if v > 0 else None

    p, c = priced(rollout.production), priced(rollout.candidate)
    if p is None or c is None:
        return (1.0, 1.0)
    return (p, c)


def _upto(b: Batch, tick: int) -> Batch:
    return b.head(int(np.searchsorted(b.tick, tick, side="right")))


def _labels_upto_request(lab: Labels, tick: int, lag: int) -> Labels:
    keep = int(
        np.searchsorted(lab.release - (0 if lab.key == AGREEMENT else lag), tick, side="right")
    )
    return Labels(
        lab.arm,
        lab.p,
        lab.key,
        lab.values[:keep],
        lab.clusters[:keep] if lab.clusters is not None else None,
        lab.release[:keep],
    )


def _released_after(lab: Labels, tick: int) -> Labels:
    """The labels of ``lab`` still to count after interval ``tick``."""
    i = int(np.searchsorted(lab.release, tick, side="right"))
    if i == 0:
        return lab
    return Labels(
        lab.arm,
        lab.p,
        lab.key,
        lab.values[i:],
        lab.clusters[i:] if lab.clusters is not None else None,
        lab.release[i:],
    )


def _merge_labels(old: list[Labels], new: list[Labels]) -> list[Labels]:
    """Pending labels as chunks (each sorted by release), empty ones dropped."""
    return [lab for lab in (*old, *new) if lab.release.size]


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-x))
    return out


def _apply_rate(p: Any, eff: Effect | None) -> Any:
    if eff is None:
        return p
    out = p * (1.0 + eff.value) if eff.relative else p + eff.value
    return np.clip(out, 0.0, 1.0)


# -- scenarios, repeats, detection ---------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """A candidate to simulate: its effects (by signal key) and the decision that is right."""

    name: str
    effects: dict[str, Effect]
    expect: str  # "promote" | "rollback"


def _worse(rollout: RolloutConfig, key: str) -> int:
    """+1 when higher values of signal ``key`` are worse for the rollout's metrics, else -1."""
    for m in rollout.analysis.metrics:
        if _key(m) == key:
            return 1 if m.higher_is_worse else -1
    return 1


def _signal_label(rollout: RolloutConfig, key: str) -> str:
    if key == FEEDBACK or (_family_of(rollout, key) == "rate" and key != ERROR):
        names = [m.name for m in rollout.analysis.metrics if _key(m) == key]
        return names[0] if names else key
    return {ERROR: "errors"}.get(key, key)


def default_scenarios(rollout: RolloutConfig) -> list[Scenario]:
    """An identical candidate, then the default regressions of each simulated signal: +10% and
    +25% on latency-like signals, +1pp errors, -2pp on rates such as accuracy, and twice the
    tolerance on any other metric (each in the direction its metrics call worse)."""
    out = [Scenario("identical", {}, "promote")]
    seen: set[str] = set()
    for m in rollout.analysis.metrics:
        key, fam = _key(m), _family(m)
        if key in seen or fam == "resource":
            continue
        seen.add(key)
        sign = _worse(rollout, key)
        label = _signal_label(rollout, key)
        if fam in ("latency", "ttft"):
            for v in (0.10, 0.25):
                e = Effect(sign * v, True)
                out.append(Scenario(f"{label} {e.text()}", {key: e}, "rollback"))
        elif fam == "error":
            e = Effect(0.01, False)
            out.append(Scenario(f"{label} {e.text()}", {key: e}, "rollback"))
        elif fam == "rate":
            e = Effect(0.02 * sign, False)
            out.append(Scenario(f"{label} {e.text()}", {key: e}, "rollback"))
        else:
            v = 2 * m.margin.value
            e = Effect(sign * v, m.margin.relative)
            out.append(Scenario(f"{label} {e.text()}", {key: e}, "rollback"))
    return out


@dataclass
class Summary:
    """The runs of one scenario."""

    scenario: Scenario
    runs: list[Run] = field(default_factory=list)

    def share(self, result: str) -> float:
        return sum(r.result == result for r in self.runs) / len(self.runs) if self.runs else 0.0

    def by(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.runs:
            if r.result == "rollback" and r.by:
                out[r.by] = out.get(r.by, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def quantiles(self, what: str) -> tuple[float, float, float]:
        """p10, median and p90 of ``seconds`` or ``candidate`` over every run."""
        if not self.runs:
            return (math.nan, math.nan, math.nan)
        x = np.array([getattr(r, what) for r in self.runs], dtype=float)
        lo, med, hi = np.quantile(x, [0.1, 0.5, 0.9])
        return float(lo), float(med), float(hi)

    @property
    def decision(self) -> str:
        """The most frequent outcome (``rollback (max_duration)`` apart from the data's)."""
        counts: dict[str, int] = {}
        for r in self.runs:
            what = r.result if r.by != "max_duration" else f"{r.result} at max_duration"
            counts[what] = counts.get(what, 0) + 1
        if not counts:
            return "-"
        best = max(counts, key=lambda k: counts[k])
        return f"{best} {100 * counts[best] / len(self.runs):.0f}%"

    def to_dict(self) -> dict[str, Any]:
        t, c = self.quantiles("seconds"), self.quantiles("candidate")
        return {
            "scenario": self.scenario.name,
            "effects": {k: e.text() for k, e in self.scenario.effects.items()},
            "expect": self.scenario.expect,
            "repeats": len(self.runs),
            "promote": self.share("promote"),
            "rollback": sum(r.result == "rollback" and r.by != "max_duration" for r in self.runs)
            / max(1, len(self.runs)),
            "inconclusive": sum(r.by == "max_duration" for r in self.runs) / max(1, len(self.runs)),
            "rolled_back_by": self.by(),
            "seconds": {"p10": t[0], "median": t[1], "p90": t[2]},
            "candidate_requests": {"p10": c[0], "median": c[1], "p90": c[2]},
        }


class _TimeBound(Exception):  # control flow inside this module only
    pass


class Progress:
    """A bar on stderr when it is a terminal, else a plain line every few seconds."""

    def __init__(self, total: int, out: TextIO | None = None, enabled: bool = True) -> None:
        self.total = max(1, total)
        self.done = 0
        self.out = out if out is not None else sys.stderr
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.enabled = enabled
        self.started = time.monotonic()
        self.last = -math.inf
        self.what = ""

    def step(self, what: str, n: int = 1) -> None:
        self.done += n
        self.what = what
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if now - self.last < 0.1 and self.done < self.total:
                return
            share = min(1.0, self.done / self.total)
            bar = "#" * int(30 * share) + "." * (30 - int(30 * share))
            self.out.write(
                f"\r[{bar}] {100 * share:3.0f}% {now - self.started:5.1f}s {what[:40]:<40}"
            )
            self.out.flush()
        elif now - self.last >= 5.0:
            self.out.write(
                f"simulate: {self.done}/{self.total} runs, {now - self.started:.0f} s: {what}\n"
            )
            self.out.flush()
        self.last = now

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.out.write("\r" + " " * 90 + "\r")
        else:
            self.out.write(
                f"simulate: {self.done} runs in {time.monotonic() - self.started:.1f} s\n"
            )
        self.out.flush()


@dataclass
class Detection:
    """The smallest regression of one metric caught within ``max_duration``."""

    metric: str
    signal: str
    tested: list[tuple[float, int, int]] = field(default_factory=list)  # (effect, caught, runs)
    smallest: float | None = None  # the smallest effect caught in >= 80% of repeats
    largest_missed: float | None = None
    relative: bool = True
    note: str = ""

    def text(self, value: float | None) -> str:
        if value is None:
            return "-"
        return Effect(value, self.relative).text()

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "signal": self.signal,
            "smallest_caught": self.text(self.smallest) if self.smallest is not None else None,
            "largest_missed": self.text(self.largest_missed)
            if self.largest_missed is not None
            else None,
            "tested": [
                {"effect": self.text(e), "caught": c, "repeats": n} for e, c, n in self.tested
            ],
            "note": self.note,
        }


@dataclass
class Report:
    rollout: str
    traffic: Traffic
    plan: Plan
    repeats: int
    seed: int
    summaries: list[Summary]
    detections: list[Detection]
    seconds: float = 0.0
    incomplete: str = ""

    def to_dict(self) -> dict[str, Any]:
        r = self.plan.rollout
        return {
            "rollout": self.rollout,
            "traffic": self.traffic.describe(),
            "rate": self.traffic.rate,
            "analysis_every": self.plan.period,
            "max_duration": r.analysis.max_duration,
            "alpha": self.plan.alpha,
            "repeats": self.repeats,
            "seed": self.seed,
            "notes": list(self.plan.notes),
            "scenarios": [s.to_dict() for s in self.summaries],
            "detection": {
                "rule": f"rolled back by the metric before max_duration in >= "
                f"{100 * DETECT_SHARE:.0f}% of repeats",
                "metrics": [d.to_dict() for d in self.detections],
            },
            "seconds": self.seconds,
            "incomplete": self.incomplete,
        }


def run_repeats(
    sim: Simulator,
    repeats: int,
    rng: np.random.Generator,
    *,
    exact: bool,
    on_run: Callable[[], None],
    deadline: float,
    stop: Callable[[list[Run]], bool] | None = None,
) -> list[Run]:
    runs: list[Run] = []
    for _ in range(repeats):
        if time.monotonic() > deadline:
            raise _TimeBound
        runs.append(sim.run(rng, exact=exact))
        on_run()
        if stop is not None and stop(runs):
            break
    return runs


def _detect(
    det: Detection,
    plan: Plan,
    traffic: Traffic,
    m: MetricConfig,
    repeats: int,
    rng: np.random.Generator,
    *,
    exact: bool,
    stride: float,
    steps: int,
    progress: Progress,
    deadline: float,
) -> Detection:
    """Fill ``det``: the smallest regression of ``m``'s signal that ``m`` alone (the rollout
    with that one metric, its test at the alpha it has in the file) rolls back before
    ``max_duration`` in >= 80% of repeats: doubling from twice the tolerance, then bisecting
    (geometrically) ``steps`` times."""
    key = _key(m)
    fam = _family(m)
    rel = m.margin.relative
    sign = 1 if m.higher_is_worse else -1
    need = math.ceil(DETECT_SHARE * repeats)
    margin = m.margin.value
    if rel:
        cap = 9.0 if sign > 0 else 0.95  # +900%, or -95%
    elif fam == "error":
        cap = 1.0 - traffic.error_rate
    elif fam == "rate":
        base = 1.0 if key == AGREEMENT else traffic.accuracy
        cap = base if sign < 0 else 1.0 - base
    else:
        cap = max(10 * margin, 1.0)
    if cap <= margin:
        det.note = "no regression beyond the tolerance is possible at this base rate"
        return det

    # The metric alone (at the alpha its test has in the file): what it catches by itself,
    # not what another metric of the same signal catches first.
    alone = plan.rollout.model_copy(
        update={
            "analysis": plan.rollout.analysis.model_copy(
                update={"metrics": [m], "tradeoff": None, "alpha": 2 * metric_alpha(plan.rollout)}
            )
        }
    )
    plan = dataclasses.replace(plan, rollout=alone)

    def caught(size: float) -> bool:
        eff = Effect(sign * size, rel)
        sim = Simulator(plan, traffic, {key: eff}, stride=stride)

        def stop(runs: list[Run]) -> bool:
            hits = sum(r.result == "rollback" and r.by == m.name for r in runs)
            return hits >= need or len(runs) - hits > repeats - need

        runs = run_repeats(
            sim,
            repeats,
            rng,
            exact=exact,
            deadline=deadline,
            stop=stop,
            on_run=lambda: progress.step(f"detect {m.name} {eff.text()}"),
        )
        hits = sum(r.result == "rollback" and r.by == m.name for r in runs)
        det.tested.append((sign * size, hits, len(runs)))
        return hits >= need

    lo, hi = margin, min(2 * margin if margin > 0 else 0.01, cap)
    while not caught(hi):
        lo = hi
        if hi >= cap:
            det.largest_missed = sign * hi
            det.note = f"not caught even at {Effect(sign * hi, rel).text()}"
            return det
        hi = min(hi * 2, cap)
    for _ in range(steps):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
        if caught(mid):
            hi = mid
        else:
            lo = mid
    det.smallest = sign * hi
    det.largest_missed = sign * lo if lo > margin else None
    return det


def simulate(
    rollout: RolloutConfig,
    traffic: Traffic,
    scenarios: Sequence[Scenario],
    *,
    repeats: int = DEFAULT_REPEATS,
    detect: bool = True,
    detect_repeats: int = DEFAULT_DETECT_REPEATS,
    detect_steps: int = 2,
    seed: int = 0,
    exact: bool = False,
    stride: float = DEFAULT_STRIDE,
    time_limit: float = DEFAULT_TIME_LIMIT,
    progress: Progress | None = None,
) -> Report:
    """Simulate ``rollout`` under ``traffic`` for each scenario (and, with ``detect``, find each
    metric's smallest caught regression). Stops at ``time_limit`` seconds, saying so."""
    traffic.check()
    if repeats < 1:
        raise SimulateError(f"--repeats must be at least 1, got {repeats}")
    plan = make_plan(rollout, traffic)
    started = time.monotonic()
    deadline = started + time_limit
    metrics = [m for m in plan.rollout.analysis.metrics if _family(m) != "resource"]
    if progress is None:
        progress = Progress(0, enabled=False)
    progress.total = max(
        1,
        repeats * len(scenarios)
        + (detect_repeats * (detect_steps + 2) * len(metrics) if detect else 0),
    )
    rng = np.random.default_rng(seed)
    report = Report(rollout.name, traffic, plan, repeats, seed, [], [])
    # Repeats go round the scenarios, so that a time bound leaves each with as many; with
    # detection the scenarios get half the time (at least one round), detection the rest.
    soft = started + (time_limit / 2 if detect else time_limit)
    sims = [Simulator(plan, traffic, sc.effects, stride=stride) for sc in scenarios]
    report.summaries = [Summary(sc) for sc in scenarios]
    cut = ""
    try:
        for rep in range(repeats):
            if rep and time.monotonic() > soft:
                cut = f"{rep} repeats per scenario, not {repeats} (time limit)"
                break
            for sim, summary in zip(sims, report.summaries, strict=True):
                if time.monotonic() > deadline:
                    raise _TimeBound
                summary.runs.append(sim.run(rng, exact=exact))
                progress.step(summary.scenario.name)
        if detect:
            for m in metrics:
                det = Detection(m.name, m.signal, relative=m.margin.relative)
                report.detections.append(det)
                _detect(
                    det, plan, traffic, m, detect_repeats, rng, exact=exact, stride=stride,
                    steps=detect_steps, progress=progress, deadline=deadline,
                )  # fmt: skip
    except _TimeBound:
        for det in report.detections:
            if det.smallest is None and not det.note:
                det.note = "not finished (time limit)"
        report.incomplete = (
            f"stopped at the time limit ({time_limit:g} s): "
            + ("detection not finished" if report.detections else "scenarios not finished")
            + "; raise --time-limit or lower --repeats"
        )
    finally:
        progress.close()
    report.repeats = min((len(s.runs) for s in report.summaries), default=0)
    if cut:
        report.incomplete = "; ".join(x for x in (cut, report.incomplete) if x)
    report.seconds = time.monotonic() - started
    return report


# -- output -------------------------------------------------------------------------------------


def _dur(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(round(seconds), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _num(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:,.0f}"


def format_report(report: Report) -> str:
    r = report.plan.rollout
    a = r.analysis
    steps = ", ".join(
        ("shadow" if s.is_shadow else f"{s.candidate_weight:g}%")
        + (f" (min {s.required_requests} req" if s.required_requests else "")
        + (
            f", {_dur(s.required_duration)}"
            if s.required_duration and s.required_requests
            else f" (min {_dur(s.required_duration)}"
            if s.required_duration
            else ""
        )
        + (")" if s.required_requests or s.required_duration else "")
        for s in r.steps
    )
    lines = [
        f"rollout {report.rollout}: steps {steps}; analysis every {report.plan.period:g}s, "
        f"alpha {report.plan.alpha:g}, burn-in {a.burn_in}, max_duration {_dur(a.max_duration)} "
        f"(on_inconclusive: {a.on_inconclusive})",
        f"traffic: {report.traffic.describe()}",
        *(f"note: {n}" for n in report.plan.notes),
        f"{report.repeats} repeats per scenario, seed {report.seed}",
        "",
    ]
    header = [
        "scenario",
        "decision",
        "time p10",
        "median",
        "p90",
        "cand. req median",
        "p10-p90",
        "rolled back by",
    ]
    rows = [header]
    for s in report.summaries:
        t, c = s.quantiles("seconds"), s.quantiles("candidate")
        by = ", ".join(f"{k} {v}" for k, v in s.by().items()) or "-"
        rows.append(
            [
                s.scenario.name,
                s.decision,
                _dur(t[0]),
                _dur(t[1]),
                _dur(t[2]),
                _num(c[1]),
                f"{_num(c[0])}-{_num(c[2])}",
                by,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if report.detections:
        lines += [
            "",
            f"smallest regression caught within max_duration {_dur(a.max_duration)} "
            f"(rolled back by that metric alone in >= {100 * DETECT_SHARE:.0f}% of repeats):",
        ]
        for d in report.detections:
            tol = d.text(None)
            m = next((x for x in r.analysis.metrics if x.name == d.metric), None)
            if m is not None:
                tol = Effect(
                    (1 if m.higher_is_worse else -1) * m.margin.value, m.margin.relative
                ).text()
            if d.smallest is not None:
                what = f"{d.text(d.smallest)}"
                if d.largest_missed is not None:
                    what += f" (missed at {d.text(d.largest_missed)})"
            else:
                what = d.note or "-"
            lines.append(f"  {d.metric:<16} tolerance {tol:<8} caught from {what}")
    lines.append("")
    lines.append(f"({report.seconds:.1f} s{'; ' + report.incomplete if report.incomplete else ''})")
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``canary simulate`` on the CLI's subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "simulate",
        help="power analysis: time and traffic to a decision, simulated with canary's analysis",
        description=(
            "Before a rollout: for the file's steps, metrics and alpha at request rate R, the "
            "time and candidate requests canary's own analysis takes to promote an identical "
            "candidate and to roll back given regressions (default: +10%/+25% latency, +1pp "
            "errors, -2pp accuracy), and the smallest regression each metric catches within "
            "max_duration; over repeated simulated rollouts. See docs/simulate.md."
        ),
    )
    p.add_argument("file", help="rollout file (YAML)")
    p.add_argument("--rollout", metavar="NAME", help="the rollout to simulate (when several)")
    p.add_argument("--rate", type=float, help="requests per second (or from --prometheus)")
    p.add_argument(
        "--effects",
        metavar="KEY=CHANGE,...",
        help="one regression scenario instead of the defaults, e.g. "
        "'latency=+10%%,errors=+1pp' (KEY: a metric name or signal; CHANGE: +10%%, "
        "-2pp, x1.3)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help=f"simulated rollouts per scenario (default {DEFAULT_REPEATS})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--time-limit",
        type=float,
        default=DEFAULT_TIME_LIMIT,
        metavar="SECONDS",
        help=f"stop and report what is done after this long (default {DEFAULT_TIME_LIMIT:g})",
    )
    p.add_argument(
        "--no-detect",
        action="store_true",
        help="skip the search for each metric's smallest caught regression",
    )
    p.add_argument(
        "--detect-repeats",
        type=int,
        default=DEFAULT_DETECT_REPEATS,
        help=f"rollouts per tested effect size (default {DEFAULT_DETECT_REPEATS}; caught: "
        f">= {100 * DETECT_SHARE:.0f}%% of them rolled back by the metric)",
    )
    p.add_argument(
        "--exact",
        action="store_true",
        help="evaluate at every analysis interval (slower; default: adaptive + bisection)",
    )
    g = p.add_argument_group("production's traffic")
    g.add_argument(
        "--latency-median",
        type=float,
        default=0.05,
        metavar="SECONDS",
        help="lognormal latency median (default 0.05)",
    )
    g.add_argument(
        "--latency-sigma", type=float, default=0.5, help="lognormal latency log-sd (default 0.5)"
    )
    g.add_argument(
        "--latency-samples",
        metavar="FILE",
        help="latencies in seconds to resample: one per line, or a JSON list",
    )
    g.add_argument(
        "--prometheus", metavar="URL", help="read the rate and latency histogram from this /metrics"
    )
    g.add_argument("--prometheus-metric", metavar="NAME", help="the histogram to read")
    g.add_argument(
        "--prometheus-window",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds between the two scrapes that give the rate (default 10)",
    )
    g.add_argument("--ttft-median", type=float, metavar="SECONDS")
    g.add_argument("--ttft-sigma", type=float)
    g.add_argument("--error-rate", type=float, default=0.01, help="production's (default 0.01)")
    g.add_argument(
        "--accuracy",
        type=float,
        default=0.9,
        help="production's rate of 0/1 signals such as labels (default 0.9)",
    )
    g.add_argument(
        "--label-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="label delay with feedback count_at: arrival (default 0)",
    )
    g.add_argument(
        "--tokens", type=float, default=500.0, help="tokens per request, for per_1k_tokens (500)"
    )
    g.add_argument("--users", type=int, default=1000, help="sticky users (default 1000)")
    g.add_argument("--user-latency-sigma", type=float, default=0.5)
    g.add_argument("--user-error-sigma", type=float, default=1.0)
    p.set_defaults(func=main)
    return p


def pick_rollout(config: Config, name: str | None) -> RolloutConfig:
    names = [r.name for r in config.rollouts]
    if name is None:
        if len(names) > 1:
            raise SimulateError(
                f"the file has {len(names)} rollouts ({', '.join(names)}): choose one with "
                "--rollout NAME"
            )
        return config.rollouts[0]
    for r in config.rollouts:
        if r.name == name:
            return r
    raise SimulateError(f"no rollout {name!r} in the file (it has {', '.join(names)})")


def traffic_from_args(args: argparse.Namespace) -> Traffic:
    rate = args.rate
    samples: tuple[float, ...] | None = None
    source = "lognormal"
    if args.latency_samples and args.prometheus:
        raise SimulateError("give --latency-samples or --prometheus, not both")
    if args.latency_samples:
        samples = load_latency_samples(args.latency_samples)
        source = args.latency_samples
    if args.prometheus:
        prom_rate, samples, source = read_prometheus(
            args.prometheus, args.prometheus_metric, args.prometheus_window
        )
        if rate is None:
            rate = prom_rate
    if rate is None:
        raise SimulateError(
            "give the request rate: --rate R (requests per second), or --prometheus URL"
        )
    return Traffic(
        rate=float(rate),
        latency_median=args.latency_median,
        latency_sigma=args.latency_sigma,
        latency_samples=samples,
        ttft_median=args.ttft_median,
        ttft_sigma=args.ttft_sigma,
        error_rate=args.error_rate,
        accuracy=args.accuracy,
        label_delay=args.label_delay,
        tokens=args.tokens,
        users=args.users,
        user_latency_sigma=args.user_latency_sigma,
        user_error_sigma=args.user_error_sigma,
        source=source,
    )


def main(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``canary simulate``: exit 0 with the report, 1 on bad input (the message says why)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        try:
            config = load_config(args.file)
        except ConfigError as exc:
            print(f"canary simulate: {exc}", file=err)
            return 1
        except OSError as exc:
            print(f"canary simulate: cannot read {args.file}: {exc.strerror or exc}", file=err)
            return 1
        rollout = pick_rollout(config, args.rollout)
        traffic = traffic_from_args(args)
        traffic.check()
        if args.effects:
            effects = resolve_effects(rollout, parse_effects(args.effects))
            name = ", ".join(f"{_signal_label(rollout, k)} {e.text()}" for k, e in effects.items())
            scenarios = [Scenario("identical", {}, "promote"), Scenario(name, effects, "rollback")]
        else:
            scenarios = default_scenarios(rollout)
        if not 1 <= args.repeats <= 10_000:
            raise SimulateError(f"--repeats must be within 1..10000, got {args.repeats}")
        if not 1 <= args.detect_repeats <= 1000:
            raise SimulateError(
                f"--detect-repeats must be within 1..1000, got {args.detect_repeats}"
            )
        if not (math.isfinite(args.time_limit) and args.time_limit > 0):
            raise SimulateError(f"--time-limit must be positive seconds, got {args.time_limit}")
        report = simulate(
            rollout,
            traffic,
            scenarios,
            repeats=args.repeats,
            detect=not args.no_detect,
            detect_repeats=args.detect_repeats,
            seed=args.seed,
            exact=args.exact,
            time_limit=args.time_limit,
            progress=Progress(0, err),
        )
    except SimulateError as exc:
        print(f"canary simulate: {exc}", file=err)
        return 1
    if args.json:
        print(json.dumps(_json_safe(report.to_dict()), indent=2), file=out)
    else:
        print(format_report(report), file=out)
    return 0


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


__all__ = [
    "DEFAULT_REPEATS",
    "LOOP_SECONDS",
    "Batch",
    "Detection",
    "Effect",
    "Plan",
    "Progress",
    "Report",
    "Run",
    "Scenario",
    "SimulateError",
    "Simulator",
    "Summary",
    "Traffic",
    "add_parser",
    "add_values",
    "arm_costs",
    "default_scenarios",
    "format_report",
    "histogram_samples",
    "load_latency_samples",
    "main",
    "make_plan",
    "parse_effect_value",
    "parse_effects",
    "parse_histogram",
    "pick_rollout",
    "read_prometheus",
    "record_batch",
    "resolve_effects",
    "simulate",
]
