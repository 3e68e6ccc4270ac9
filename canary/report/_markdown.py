"""The report as Markdown for a pull-request comment (GitHub-flavoured tables, text sparklines,
no images). Rollout-controlled text is escaped so it renders as text: no HTML, link, image or
table cell break can come from a rollout name or a decision's reason."""

from __future__ import annotations

import re

from canary import __version__
from canary.report._model import (
    ARMS,
    ReportData,
    clock,
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
    sparkline,
    step_text,
    thin,
)

MAX_DECISIONS_MD = 50
SPARK_POINTS = 24
_VERDICT_MARK = {"OK": "✅ OK", "WORSE": "❌ WORSE", "UNKNOWN": "⏳ UNKNOWN"}
_SPECIAL = re.compile(r"([\\`*_\[\]|~])")
_LINE_START = re.compile(r"^([#+=-]|\d+[.)])")


def md(text: object, *, line_start: bool = False) -> str:
    """``text`` as literal Markdown text on one line: HTML characters as entities, the
    punctuation of emphasis, code, links and table cells backslash-escaped, and a leading
    heading, list or quote mark too when it starts a line (``line_start``): no markup, link,
    image or cell break comes through."""
    one = " ".join(str(text).split())
    one = one.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    one = _SPECIAL.sub(r"\\\1", one)
    return _LINE_START.sub(r"\\\1", one) if line_start else one


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def render_markdown(data: ReportData, *, utc: bool = False) -> str:
    """The report as a Markdown document (a str)."""
    result = outcome(data, utc)
    out = [
        f"## canary report: {md(data.name)}: {md(result.title)}",
        "",
        f"**{md(result.summary)}**",
        "",
        md(result.why, line_start=True),
        "",
    ]
    facts: list[tuple[str, str]] = []
    if data.started_at is not None:
        facts.append(("Started", clock(data.started_at, utc)))
    end = data.ended_at()
    if end is not None:
        facts.append(("Ended", clock(end, utc)))
    if data.step is not None:
        facts.append(
            (
                "Step",
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
    if data.samples:
        facts.append(
            (
                "Requests (production/candidate)",
                f"{data.samples.get('production', 0):,}/{data.samples.get('candidate', 0):,}",
            )
        )
    if facts:
        out += ["| | |", "| --- | --- |"]
        out += [_row([md(k), md(v)]) for k, v in facts]
        out.append("")

    results = data.results()
    out.append("### Metrics")
    out.append("")
    if results:
        out.append(
            "| Metric | Verdict | Estimate | Interval | Tolerance | Samples P/C | Over time |"
        )
        out.append("| --- | --- | --- | --- | --- | --- | --- |")
        for m in results:
            name = str(m.get("name"))
            series = [h.metrics[name] for h in data.history if name in h.metrics]
            spark = sparkline([scaled(m, p.get("estimate")) for p in thin(series, SPARK_POINTS)])
            verdict = str(m.get("verdict", "?"))
            out.append(
                _row(
                    [
                        md(name),
                        _VERDICT_MARK.get(verdict, md(verdict)),
                        md(fmt_value(m, m.get("estimate"))),
                        md(fmt_interval(m)),
                        md(fmt_tolerance(m)),
                        md(fmt_samples(m)),
                        f"`{spark}`" if spark.strip() else "",
                    ]
                )
            )
        out.append("")
        guards = "; ".join(data.guard_lines())
        out.append(
            "<sub>Candidate vs production; intervals are anytime-valid confidence sequences. "
            "Over time: the estimate at each analysis."
            + (f" Guard: {md(guards)}." if guards else "")
            + "</sub>"
        )
    else:
        out.append("No metric results yet.")
    out.append("")

    out.append("### Cost per 1,000 inferences")
    out.append("")
    if data.cost_per_1k:
        out += ["| Arm | Cost per 1k |", "| --- | --- |"]
        out += [_row([arm, md(fmt_cost(data.cost_per_1k.get(arm)))]) for arm in ARMS]
        prod, cand = data.cost_per_1k.get("production"), data.cost_per_1k.get("candidate")
        if prod and cand is not None:
            out.append(_row(["candidate vs production", md(f"{(cand / prod - 1) * 100:+.3g}%")]))
    else:
        out.append("Not priced in this source.")
    out.append("")

    for signal, arms in data.distributions.items():
        levels = sorted({q for d in arms.values() for q in d.quantiles})
        out.append(f"### {md(signal)} per arm")
        out.append("")
        out.append(_row(["Arm", "Requests", "Mean", *[quantile_label(q) for q in levels]]))
        out.append(_row(["---"] * (3 + len(levels))))
        for arm, dist in arms.items():
            out.append(
                _row(
                    [
                        md(arm),
                        f"{dist.n:,}" if dist.n else "-",
                        md(fmt_signal_value(signal, dist.mean)) if dist.mean is not None else "-",
                        *[
                            md(fmt_signal_value(signal, dist.quantiles[q]))
                            if q in dist.quantiles
                            else "-"
                            for q in levels
                        ],
                    ]
                )
            )
        out.append("")

    out.append("### Decision log")
    out.append("")
    if data.decisions:
        shown = data.decisions[-MAX_DECISIONS_MD:]
        if len(data.decisions) > len(shown):
            out.append(f"The last {len(shown)} of {len(data.decisions)} entries.")
            out.append("")
        out += ["| Time | Step | Action | By | Reason |", "| --- | --- | --- | --- | --- |"]
        for d in shown:
            at = clock(float(d["at"]), utc) if is_num(d.get("at")) else "?"
            out.append(
                _row(
                    [
                        md(at),
                        md(f"{d.get('step', '?')}/{d.get('steps', '?')}"),
                        md(d.get("action", "?")),
                        "operator" if d.get("manual") else "canary",
                        md(d.get("reason") or ""),
                    ]
                )
            )
    else:
        out.append("The decision log is empty.")
    out.append("")
    for note in data.notes:
        out.append(f"> {md(note)}")
    if data.notes:
        out.append("")
    out.append(
        f"<sub>canary {md(__version__)}, generated {md(clock(data.generated_at, utc))} from "
        f"{md(data.source)}</sub>"
    )
    return "\n".join(out) + "\n"


__all__ = ["md", "render_markdown"]
