"""What a report shows, whichever source it came from (:class:`ReportData`), and the words and
numbers every format shares: the outcome and why, values on a reader's scale, times with
their zone."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeGuard

ARMS = ("production", "candidate")
TERMINAL = ("promoted", "rolled_back")
# Verdict colours (the dashboard's too): provably within, provably beyond, not yet known.
VERDICT_COLOURS = {"OK": "#1a7f37", "WORSE": "#cf222e", "UNKNOWN": "#9a6700"}


@dataclass(frozen=True)
class Distribution:
    """One arm's distribution of one signal.

    ``bins``: ``(lower edge, upper edge, count)`` of a histogram (from the state store's
    log-bucket histograms), empty when only quantiles are known (the admin API's
    ``canary_signal_quantile`` gauges). ``quantiles``: level -> value.
    """

    n: int
    quantiles: dict[float, float]
    mean: float | None = None
    bins: tuple[tuple[float, float, int], ...] = ()


@dataclass(frozen=True)
class HistoryPoint:
    """One analysis: when, where the rollout was, and each metric's result then."""

    at: float
    phase: str | None
    step: int | None  # 1-based
    weight: float | None  # the candidate's %
    metrics: dict[str, dict[str, Any]]  # name -> result (the admin API's result shape)


@dataclass
class ReportData:
    """A rollout as a report shows it, running or finished.

    ``metrics`` (and ``guards``, ``net_value``) are results in the admin API's shape
    (``name, kind, verdict, estimate, lower, upper, margin, relative, direction, tolerance,
    n_production, n_candidate, explain``); ``decisions`` the decision log, oldest first.
    ``cost_per_1k``: arm -> cost of 1000 inferences (None: not priced). ``notes`` say what
    the source could not give.
    """

    name: str
    source: str
    generated_at: float
    phase: str
    step: int | None = None  # 1-based
    steps: int | None = None
    step_kind: str | None = None
    weights: dict[str, float] = field(default_factory=dict)
    shadow: bool = False
    started_at: float | None = None
    samples: dict[str, int] = field(default_factory=dict)
    status: str = ""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    guards: list[dict[str, Any]] = field(default_factory=list)
    net_value: dict[str, Any] | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)
    history: list[HistoryPoint] = field(default_factory=list)
    distributions: dict[str, dict[str, Distribution]] = field(default_factory=dict)
    distributions_source: str = ""
    cost_per_1k: dict[str, float | None] = field(default_factory=dict)
    cost_source: str = ""
    endpoints: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    def final_decision(self) -> dict[str, Any] | None:
        """The decision that ended the rollout (or the last one, while it runs)."""
        for entry in reversed(self.decisions):
            if entry.get("action") in ("PROMOTE", "ROLLBACK"):
                return entry if self.terminal else self.decisions[-1]
        return self.decisions[-1] if self.decisions else None

    def ended_at(self) -> float | None:
        if not self.terminal:
            return None
        entry = self.final_decision()
        at = entry.get("at") if entry else None
        return float(at) if isinstance(at, int | float) else None

    def results(self) -> list[dict[str, Any]]:
        """The metrics and the trade-off's net value (the guards aside)."""
        out = list(self.metrics)
        if self.net_value is not None:
            out.append(self.net_value)
        return out

    def all_results(self) -> list[dict[str, Any]]:
        return self.results() + list(self.guards)

    def guard_lines(self) -> list[str]:
        """The guards in words: ``sample ratio: OK (dropped 0/0)``."""
        out = []
        for g in self.guards:
            name = str(g.get("name", "guard")).replace("_", " ")
            detail = f" ({g['detail']})" if g.get("detail") else ""
            out.append(f"{name}: {g.get('verdict', '?')}{detail}")
        return out


# -- numbers on a reader's scale --------------------------------------------------------------


def is_num(x: Any) -> TypeGuard[int | float]:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def unit_of(m: Mapping[str, Any]) -> str:
    """``%`` (a ratio shown as a change), ``pp`` (a rate difference) or ``""``."""
    if m.get("kind") == "net_value":
        return ""
    if m.get("relative"):
        return "%"
    if m.get("kind") in ("error_rate", "rate"):
        return "pp"
    return ""


def scaled(m: Mapping[str, Any], value: Any) -> float | None:
    """A result's estimate or bound on the reader's scale: ratio 1.12 -> +12 (%), rate
    difference 0.004 -> +0.4 (pp); None when not a finite number."""
    if not is_num(value):
        return None
    unit = unit_of(m)
    if unit == "%":
        return (float(value) - 1.0) * 100.0
    if unit == "pp":
        return float(value) * 100.0
    return float(value)


def tolerance_scaled(m: Mapping[str, Any]) -> float | None:
    """The tolerance line on the reader's scale (net value: 0); None for guards."""
    kind = m.get("kind")
    if kind == "net_value":
        return 0.0
    margin = m.get("margin")
    if kind == "srm" or not is_num(margin):
        return None
    sign = -1.0 if m.get("direction") == "decrease" else 1.0
    return sign * float(margin) * (100.0 if unit_of(m) else 1.0)


def signed(value: float | None, unit: str) -> str:
    if value is None:
        return "?"
    if abs(value) >= 1000:
        text = f"{value:+.0f}"
    else:
        text = f"{value:+.3g}"
        if "e" in text:
            text = f"{value:+.2e}"
    return text + unit


def fmt_value(m: Mapping[str, Any], value: Any) -> str:
    return signed(scaled(m, value), unit_of(m))


def fmt_interval(m: Mapping[str, Any]) -> str:
    """``[+1.2%, +8%]``; a bound that is missing next to an estimate is unbounded (±∞)."""
    known = is_num(m.get("estimate"))
    lo, hi = m.get("lower"), m.get("upper")
    low = fmt_value(m, lo) if is_num(lo) or not known else "-∞"
    high = fmt_value(m, hi) if is_num(hi) or not known else "+∞"
    return f"[{low}, {high}]"


def fmt_tolerance(m: Mapping[str, Any]) -> str:
    if m.get("kind") == "net_value":
        return ">= 0 (net value)"
    tol = tolerance_scaled(m)
    if tol is None:
        return "-"
    unit = unit_of(m)
    word = "at most" if m.get("direction") != "decrease" else "at least"
    return f"{word} {signed(tol, unit)}"


def fmt_samples(m: Mapping[str, Any]) -> str:
    return f"{m.get('n_production', '?')}/{m.get('n_candidate', '?')}"


def plain_number(x: float) -> str:
    """A measurement for people: 3 significant digits, no exponent for everyday sizes."""
    if not math.isfinite(x):
        return "?"
    if x == 0:
        return "0"
    if abs(x) >= 1e6 or abs(x) < 1e-4:
        return f"{x:.3g}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def fmt_seconds(x: float) -> str:
    """Latency-like values: 12.3 ms, 1.20 s."""
    if not math.isfinite(x):
        return "?"
    if abs(x) < 1.0:
        return f"{x * 1000:.3g} ms"
    return f"{x:.3g} s"


def fmt_signal_value(signal: str, x: float) -> str:
    if signal in ("latency", "ttft") or signal.startswith(("server_timing:",)):
        return fmt_seconds(x)
    return plain_number(x)


def fmt_cost(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "not priced"
    return f"{x:.4g}"


# -- time -------------------------------------------------------------------------------------


def clock(at: float, utc: bool = False) -> str:
    """A wall-clock time with its zone: ``2026-12-07 20:31:05 UTC``, ``... CET``, or the
    offset (``... +0530``) where the zone has no name of letters."""
    when = datetime.fromtimestamp(at, tz=UTC if utc else None).astimezone(UTC if utc else None)
    zone = when.tzname() or ""
    if not zone.isalpha():
        zone = when.strftime("%z")
    return f"{when:%Y-%m-%d %H:%M:%S} {zone}".rstrip()


def short_clock(at: float, utc: bool = False) -> str:
    when = datetime.fromtimestamp(at, tz=UTC if utc else None).astimezone(UTC if utc else None)
    return f"{when:%H:%M:%S}"


def zone_name(at: float, utc: bool = False) -> str:
    return clock(at, utc).rsplit(" ", 1)[-1]


def duration(seconds: Any) -> str:
    if not is_num(seconds) or seconds < 0:
        return "?"
    s = float(seconds)
    if s < 10:
        return f"{s:.1f}s"
    n = int(s)
    if n < 60:
        return f"{n}s"
    if n < 3600:
        return f"{n // 60}m{n % 60:02d}s"
    if n < 86400:
        return f"{n // 3600}h{n % 3600 // 60:02d}m"
    return f"{n // 86400}d{n % 86400 // 3600:02d}h"


# -- the outcome ------------------------------------------------------------------------------


def step_text(d: Mapping[str, Any]) -> str:
    """``step 2/4 (weight 25%)`` of a report or a decision-log entry."""
    step, steps = d.get("step"), d.get("steps")
    where = f"step {step}/{steps}" if isinstance(step, int) else "step ?"
    if d.get("phase") in TERMINAL:
        return f"{where}, where it ended"
    weights = d.get("weights") or {}
    if d.get("shadow") or d.get("step_kind") == "shadow":
        return f"{where} (shadow)"
    cand = weights.get("candidate") if isinstance(weights, Mapping) else None
    return f"{where} (weight {cand:g}%)" if is_num(cand) else where


def _candidate_requests(entry: Mapping[str, Any] | None, data: ReportData) -> int | None:
    samples = entry.get("samples") if entry and data.terminal else None
    if isinstance(samples, Mapping) and isinstance(samples.get("candidate"), int):
        return int(samples["candidate"])
    value = data.samples.get("candidate")
    return value if isinstance(value, int) else None


def _evidence_result(data: ReportData, evidence: Mapping[str, Any]) -> dict[str, Any]:
    """The decision's evidence with the metric's scale and tolerance (from the results)."""
    name = evidence.get("metric")
    base: Mapping[str, Any] = next(
        (m for m in data.all_results() if m.get("name") == name),
        {},
    )
    if not base:
        for point in reversed(data.history):
            if name in point.metrics:
                base = point.metrics[name]
                break
    return {**base, **{k: v for k, v in evidence.items() if k != "metric"}, "name": name}


@dataclass(frozen=True)
class Outcome:
    """The headline (``Rolled back``), one sentence of how it went, and why in words."""

    title: str
    summary: str
    why: str
    colour: str


def outcome(data: ReportData, utc: bool = False) -> Outcome:
    """What happened to the rollout and why, in plain words."""
    final = data.final_decision()
    started = data.started_at
    ended = data.ended_at()
    took = duration(ended - started) if ended is not None and started is not None else None
    n = _candidate_requests(final, data)
    requests = f"{n:,} candidate requests" if n is not None else "an unknown number of requests"
    reason = str(final.get("reason") or "") if final else ""
    manual = bool(final and final.get("manual"))
    by = " by an operator" if manual else ""
    if data.phase == "promoted":
        summary = f"Promoted{by} after {requests}" + (f" in {took}" if took else "") + "."
        why = reason or "every metric was within its tolerance at the last step"
        if not manual:
            why = f"{why}. The candidate now serves 100% of the traffic."
        return Outcome("Promoted", summary, why, VERDICT_COLOURS["OK"])
    if data.phase == "rolled_back":
        summary = f"Rolled back{by} after {requests}" + (f" in {took}" if took else "") + "."
        evidence = final.get("evidence") if final else None
        if isinstance(evidence, Mapping) and evidence.get("metric"):
            m = _evidence_result(data, evidence)
            tol = fmt_tolerance(m)
            interval = fmt_interval(m)
            if m.get("kind") == "net_value":
                why = (
                    f"the net value of the trade-off, {interval} trade-off units, was "
                    "provably negative"
                )
            elif m.get("kind") == "srm":
                why = f"sample-ratio mismatch: {m.get('explain') or reason}"
            else:
                why = (
                    f"metric {m['name']}'s interval {interval} (candidate vs production) "
                    f"lay beyond its tolerance ({tol}), with "
                    f"{m.get('n_production', '?')}/{m.get('n_candidate', '?')} samples "
                    "(production/candidate)"
                )
            if manual and reason:
                why = f"{why}. The operator's reason: {reason}"
        else:
            why = reason or "no reason recorded"
        return Outcome("Rolled back", summary, why, VERDICT_COLOURS["WORSE"])
    where = step_text(
        {
            "step": data.step,
            "steps": data.steps,
            "weights": data.weights,
            "shadow": data.shadow,
            "step_kind": data.step_kind,
        }
    )
    elapsed = duration(data.generated_at - started) if started is not None else "?"
    title = {"running": "Running", "paused": "Paused", "holding": "Holding"}.get(
        data.phase, data.phase.capitalize()
    )
    summary = f"{title} at {where}, {elapsed} after it started, {requests} so far."
    waiting = data.status or "no status reported"
    if data.phase == "running":
        why = f"Now: {waiting}"
    else:
        why = f"Now: {waiting}" + (f" (last decision: {reason})" if reason else "")
    return Outcome(title, summary, why, "#0969da" if data.phase == "running" else "#9a6700")


def quantile_label(q: float) -> str:
    text = f"{q * 100:.4g}"
    return f"p{text}"


def sorted_quantiles(qs: Mapping[float, float]) -> list[tuple[float, float]]:
    return sorted((float(q), float(v)) for q, v in qs.items() if is_num(v))


def sparkline(values: Sequence[float | None]) -> str:
    """A text sparkline (``▁▂▃▅▇``) of ``values``; gaps as spaces."""
    bars = "▁▂▃▄▅▆▇█"
    nums = [v for v in values if v is not None and math.isfinite(v)]
    if not nums:
        return ""
    low, high = min(nums), max(nums)
    span = high - low
    out = []
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(" ")
        elif span <= 0:
            out.append(bars[3])
        else:
            out.append(bars[min(len(bars) - 1, int((v - low) / span * (len(bars) - 1) + 0.5))])
    return "".join(out)


def thin(seq: Sequence[Any], most: int) -> list[Any]:
    """At most ``most`` items of ``seq``, evenly spaced, the last one kept."""
    if len(seq) <= most:
        return list(seq)
    step = (len(seq) - 1) / (most - 1)
    return [seq[round(i * step)] for i in range(most)]


__all__ = [
    "ARMS",
    "TERMINAL",
    "VERDICT_COLOURS",
    "Distribution",
    "HistoryPoint",
    "Outcome",
    "ReportData",
    "clock",
    "duration",
    "fmt_cost",
    "fmt_interval",
    "fmt_samples",
    "fmt_seconds",
    "fmt_signal_value",
    "fmt_tolerance",
    "fmt_value",
    "is_num",
    "outcome",
    "plain_number",
    "quantile_label",
    "scaled",
    "short_clock",
    "signed",
    "sorted_quantiles",
    "sparkline",
    "step_text",
    "thin",
    "tolerance_scaled",
    "unit_of",
    "zone_name",
]
