"""The report as one self-contained HTML file: inline CSS and SVG, no script, no request to
anywhere, readable printed. Every value from the rollout (names, reasons, URLs) is escaped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from canary import __version__
from canary.report._model import (
    ARMS,
    VERDICT_COLOURS,
    Distribution,
    ReportData,
    clock,
    duration,
    fmt_cost,
    fmt_interval,
    fmt_samples,
    fmt_signal_value,
    fmt_tolerance,
    fmt_value,
    is_num,
    outcome,
    quantile_label,
    scaled,
    step_text,
    thin,
    tolerance_scaled,
    unit_of,
    zone_name,
)
from canary.report._svg import (
    ARM_COLOURS,
    IntervalPoint,
    distribution_chart,
    esc,
    interval_bar,
    interval_chart,
    weights_chart,
)

MAX_DECISIONS_SHOWN = 500
MAX_POINTS_DRAWN = 600  # per metric chart: more would not be seen, only weigh

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f6f8fa; color: #1f2328;
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 28px 40px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 2px; word-break: break-word; }
h2 { font-size: 17px; margin: 28px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 14px; margin: 16px 0 6px; word-break: break-word; }
.meta, .note, figcaption { color: #59636e; font-size: 12.5px; }
.outcome { border: 1px solid #d0d7de; border-left: 6px solid var(--c); border-radius: 6px;
  padding: 12px 16px; margin: 16px 0; }
.badge { display: inline-block; color: #fff; background: var(--c); border-radius: 12px;
  padding: 1px 10px; font-weight: 600; font-size: 13px; }
.summary { font-size: 16px; font-weight: 600; margin: 8px 0 4px; }
.why { margin: 0 0 8px; word-break: break-word; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0 0;
  font-size: 13px; }
dl.facts dt { color: #59636e; }
dl.facts dd { margin: 0; word-break: break-all; }
table { border-collapse: collapse; width: 100%; font-size: 13px; margin: 6px 0; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eaeef2;
  vertical-align: middle; }
th { background: #f6f8fa; font-weight: 600; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
td.reason { word-break: break-word; }
.v { display: inline-block; border-radius: 10px; padding: 0 8px; color: #fff; font-size: 12px;
  font-weight: 600; }
figure { margin: 10px 0 18px; break-inside: avoid; }
svg { display: block; }
.arm { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 5px; }
.grid2 { display: grid; grid-template-columns: 1fr; gap: 4px; }
@media print {
  body { background: #fff; }
  main { padding: 0; max-width: none; }
  section, figure, table { break-inside: avoid; }
  h2 { break-after: avoid; }
}
"""


def _verdict(v: Any) -> str:
    text = str(v or "?")
    colour = VERDICT_COLOURS.get(text, "#59636e")
    return f'<span class="v" style="background:{colour}">{esc(text)}</span>'


def _arm(arm: str) -> str:
    colour = ARM_COLOURS.get(arm, "#1f2328")
    return f'<span class="arm" style="background:{colour}"></span>{esc(arm)}'


def _range(data: ReportData) -> tuple[float, float]:
    times = [h.at for h in data.history]
    times += [float(d["at"]) for d in data.decisions if is_num(d.get("at"))]
    if data.started_at is not None:
        times.append(data.started_at)
    t0 = min(times) if times else data.generated_at
    end = data.ended_at()
    t1 = max(times) if data.terminal and times else data.generated_at
    if end is not None:
        t1 = max(t1, end)
    if t1 <= t0:
        t1 = t0 + 1.0
    return t0, t1 + (t1 - t0) * 0.01


def _marks(data: ReportData) -> list[tuple[float, str]]:
    out = []
    for d in data.decisions:
        action = str(d.get("action", ""))
        if action in ("", "CONTINUE", "START") or not is_num(d.get("at")):
            continue
        out.append((float(d["at"]), action.lower()))
    return out


def weight_segments(data: ReportData) -> list[tuple[float, float, bool]]:
    """``(from, candidate weight %, shadow)`` over the rollout, from the decision log (each
    entry carries the weights it set), else the history, else the weights now."""
    segs: list[tuple[float, float, bool]] = []
    for d in data.decisions:
        w = d.get("weights")
        if isinstance(w, Mapping) and is_num(w.get("candidate")) and is_num(d.get("at")):
            segs.append((float(d["at"]), float(w["candidate"]), bool(d.get("shadow"))))
    if not segs:
        segs = [(h.at, h.weight, False) for h in data.history if h.weight is not None]
    if not segs and is_num(data.weights.get("candidate")):
        start = data.started_at if data.started_at is not None else data.generated_at
        segs = [(start, data.weights["candidate"], data.shadow)]
    return segs


def _facts(data: ReportData, utc: bool) -> str:
    rows: list[tuple[str, str]] = []
    if data.started_at is not None:
        rows.append(("started", clock(data.started_at, utc)))
    end = data.ended_at()
    if end is not None:
        rows.append(("ended", clock(end, utc)))
        if data.started_at is not None:
            rows.append(("took", duration(end - data.started_at)))
    elif data.started_at is not None:
        rows.append(("running for", duration(data.generated_at - data.started_at)))
    rows.append(("phase", data.phase))
    if data.step is not None:
        rows.append(
            (
                "step",
                step_text(
                    {
                        "step": data.step,
                        "steps": data.steps,
                        "weights": data.weights,
                        "shadow": data.shadow,
                        "step_kind": data.step_kind,
                        "phase": data.phase,
                    }
                ),
            )
        )
    if data.weights:
        rows.append(
            (
                "weights",
                ", ".join(f"{arm} {data.weights.get(arm, 0):g}%" for arm in ARMS),
            )
        )
    if data.samples:
        rows.append(
            (
                "requests observed",
                ", ".join(f"{arm} {data.samples.get(arm, 0):,}" for arm in ARMS),
            )
        )
    for arm in ARMS:
        if data.endpoints.get(arm):
            rows.append((f"{arm} endpoints", ", ".join(data.endpoints[arm])))
    return (
        '<dl class="facts">'
        + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in rows)
        + "</dl>"
    )


def _metric_table(data: ReportData) -> str:
    results = data.results()
    if not results:
        return '<p class="note">No metric results (no analysis yet, or no metric configured).</p>'
    head = (
        "<tr><th>metric</th><th>verdict</th><th>estimate</th><th>interval</th>"
        "<th>tolerance</th><th>samples P/C</th><th>interval vs tolerance</th></tr>"
    )
    rows = []
    for m in results:
        bar = interval_bar(
            scaled(m, m.get("estimate")),
            scaled(m, m.get("lower")),
            scaled(m, m.get("upper")),
            tolerance_scaled(m),
            str(m.get("verdict", "")),
            unit_of(m),
        )
        rows.append(
            f"<tr><td>{esc(m.get('name', '?'))}</td><td>{_verdict(m.get('verdict'))}</td>"
            f'<td class="num">{esc(fmt_value(m, m.get("estimate")))}</td>'
            f'<td class="num">{esc(fmt_interval(m))}</td>'
            f'<td class="num">{esc(fmt_tolerance(m))}</td>'
            f'<td class="num">{esc(fmt_samples(m))}</td><td>{bar}</td></tr>'
        )
    guards = "; ".join(data.guard_lines())
    note = (
        '<p class="note">Candidate vs production: a relative change (%) or a difference in '
        "percentage points (pp); the interval is an anytime-valid confidence sequence. "
        "WORSE: provably beyond the tolerance; OK: provably within it; UNKNOWN: not yet."
        + (f" Guard: {esc(guards)}." if guards else "")
        + "</p>"
    )
    return f"<table>{head}{''.join(rows)}</table>{note}"


def _metric_charts(data: ReportData, utc: bool, t0: float, t1: float, zone: str) -> str:
    if not data.history:
        return ""
    names: list[str] = [str(m.get("name")) for m in data.all_results()]
    for h in data.history:
        names += [n for n in h.metrics if n not in names]
    marks = _marks(data)
    out = []
    for name in names:
        series = [(h.at, h.metrics[name]) for h in data.history if name in h.metrics]
        if not series:
            continue
        ref = next((m for m in data.all_results() if m.get("name") == name), series[-1][1])
        if ref.get("kind") == "srm":
            continue
        points = [
            IntervalPoint(
                at,
                scaled(ref, m.get("estimate")),
                scaled(ref, m.get("lower")),
                scaled(ref, m.get("upper")),
                str(m.get("verdict", "")),
            )
            for at, m in thin(series, MAX_POINTS_DRAWN)
        ]
        unit = unit_of(ref)
        chart = interval_chart(
            f"{name}: interval over time against its tolerance",
            points,
            tolerance=tolerance_scaled(ref),
            unit=unit,
            t0=t0,
            t1=t1,
            marks=marks,
            utc=utc,
            zone=zone,
        )
        what = (
            "net value, trade-off units"
            if ref.get("kind") == "net_value"
            else (
                "change, %" if unit == "%" else "difference, pp" if unit == "pp" else "difference"
            )
        )
        out.append(
            f'<figure><h3>{esc(name)} <span class="note">({esc(what)}; tolerance '
            f"{esc(fmt_tolerance(ref))}; {len(series)} analyses)</span></h3>{chart}</figure>"
        )
    return "".join(out)


def _distributions(data: ReportData) -> str:
    if not data.distributions:
        return '<p class="note">No per-arm distributions in this source.</p>'
    out = []
    if data.distributions_source:
        out.append(f'<p class="note">{esc(data.distributions_source)}</p>')
    for signal, arms in data.distributions.items():
        chart = distribution_chart(f"{signal}: distribution per arm", signal, arms)
        caption = (
            "Share of each arm's requests per bin (log scale); dotted lines: p50, p95, p99."
            if any(d.bins for d in arms.values())
            else "Each arm's quantiles (log scale)."
        )
        out.append(
            f"<figure><h3>{esc(signal)}</h3>{chart}<figcaption>{caption}</figcaption>"
            f"{_quantile_table(signal, arms)}</figure>"
        )
    return "".join(out)


def _quantile_table(signal: str, arms: Mapping[str, Distribution]) -> str:
    levels = sorted({q for d in arms.values() for q in d.quantiles})
    head = "<tr><th>arm</th><th>requests</th><th>mean</th>" + "".join(
        f"<th>{esc(quantile_label(q))}</th>" for q in levels
    )
    rows = []
    for arm, d in arms.items():
        cells = "".join(
            f'<td class="num">{esc(fmt_signal_value(signal, d.quantiles[q]))}</td>'
            if q in d.quantiles
            else "<td>-</td>"
            for q in levels
        )
        mean = fmt_signal_value(signal, d.mean) if d.mean is not None else "-"
        n = f"{d.n:,}" if d.n else "-"
        rows.append(
            f'<tr><td>{_arm(arm)}</td><td class="num">{esc(n)}</td>'
            f'<td class="num">{esc(mean)}</td>{cells}</tr>'
        )
    return f"<table>{head}</tr>{''.join(rows)}</table>"


def _cost(data: ReportData) -> str:
    if not data.cost_per_1k:
        return '<p class="note">Not priced in this source (no cost recorded or configured).</p>'
    rows = []
    for arm in ARMS:
        rows.append(
            f'<tr><td>{_arm(arm)}</td><td class="num">'
            f"{esc(fmt_cost(data.cost_per_1k.get(arm)))}</td></tr>"
        )
    prod, cand = data.cost_per_1k.get("production"), data.cost_per_1k.get("candidate")
    if prod and cand is not None:
        change = (cand / prod - 1.0) * 100.0
        rows.append(f'<tr><td>candidate vs production</td><td class="num">{change:+.3g}%</td></tr>')
    note = f'<p class="note">{esc(data.cost_source)}</p>' if data.cost_source else ""
    return (
        "<table><tr><th>arm</th><th>cost per 1,000 inferences</th></tr>"
        f"{''.join(rows)}</table>{note}"
    )


def _decision_log(data: ReportData, utc: bool) -> str:
    if not data.decisions:
        return '<p class="note">The decision log is empty.</p>'
    shown: Sequence[dict[str, Any]] = data.decisions[-MAX_DECISIONS_SHOWN:]
    head = (
        "<tr><th>time</th><th>step</th><th>action</th><th>by</th><th>weights P/C</th>"
        "<th>requests P/C</th><th>reason</th></tr>"
    )
    rows = []
    for d in shown:
        at = clock(float(d["at"]), utc) if is_num(d.get("at")) else "?"
        w: Mapping[str, Any] = d["weights"] if isinstance(d.get("weights"), Mapping) else {}
        s: Mapping[str, Any] = d["samples"] if isinstance(d.get("samples"), Mapping) else {}
        weights = "/".join(
            f"{v:g}" if is_num(v) else "?" for v in (w.get("production"), w.get("candidate"))
        )
        if d.get("shadow"):
            weights += " shadow"
        samples = f"{s.get('production', '?')}/{s.get('candidate', '?')}"
        step = f"{d.get('step', '?')}/{d.get('steps', '?')}"
        rows.append(
            f'<tr><td class="num">{esc(at)}</td><td class="num">{esc(step)}</td>'
            f"<td>{esc(d.get('action', '?'))}</td>"
            f"<td>{'operator' if d.get('manual') else 'canary'}</td>"
            f'<td class="num">{esc(weights)}</td><td class="num">{esc(samples)}</td>'
            f'<td class="reason">{esc(d.get("reason") or "")}</td></tr>'
        )
    more = len(data.decisions) - len(shown)
    note = f'<p class="note">{more} older entries not shown.</p>' if more > 0 else ""
    return f"{note}<table>{head}{''.join(rows)}</table>"


def render_html(data: ReportData, *, utc: bool = False) -> str:
    """The report as one HTML document (a str)."""
    result = outcome(data, utc)
    t0, t1 = _range(data)
    zone = zone_name(t0, utc)
    marks = _marks(data)
    segments = weight_segments(data)
    weights = (
        weights_chart(
            "candidate's share of the traffic over time",
            segments,
            t0=t0,
            t1=t1,
            marks=marks,
            utc=utc,
            zone=zone,
        )
        if segments
        else '<p class="note">No weights recorded.</p>'
    )
    notes = "".join(f"<li>{esc(n)}</li>" for n in data.notes)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        '<link rel="icon" href="data:,">',  # no request for /favicon.ico
        f"<title>canary report: {esc(data.name)} ({esc(result.title)})</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<header><h1>canary report: {esc(data.name)}</h1>",
        f'<p class="meta">Generated {esc(clock(data.generated_at, utc))} from '
        f"{esc(data.source)}.</p></header>",
        f'<section class="outcome" id="outcome" style="--c:{result.colour}">',
        f'<span class="badge">{esc(result.title)}</span>',
        f'<p class="summary">{esc(result.summary)}</p>',
        f'<p class="why">{esc(result.why)}</p>',
        _facts(data, utc),
        "</section>",
        '<section id="timeline"><h2>Timeline: traffic weights</h2>',
        f"<figure>{weights}<figcaption>The candidate's share of the traffic (orange; hatched: "
        "shadow, a mirror the users never see); dotted lines: decisions.</figcaption></figure>",
        "</section>",
        '<section id="metrics"><h2>Metrics</h2>',
        _metric_table(data),
        _metric_charts(data, utc, t0, t1, zone),
        "</section>",
        '<section id="distributions"><h2>Per-arm distributions</h2>',
        _distributions(data),
        "</section>",
        '<section id="cost"><h2>Cost per 1,000 inferences</h2>',
        _cost(data),
        "</section>",
        '<section id="decisions"><h2>Decision log</h2>',
        _decision_log(data, utc),
        "</section>",
        f'<section id="notes"><h2>Notes</h2><ul class="note">{notes}</ul></section>'
        if notes
        else "",
        f'<footer class="meta"><p>canary {esc(__version__)}: a self-contained report '
        "(no script, nothing loaded from elsewhere).</p></footer>",
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


__all__ = ["render_html", "weight_segments"]
