"""Charts as inline SVG text, drawn here: no script, no font or file from anywhere else.

Every text that reaches the SVG passes through :func:`esc`; numbers are formatted here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape

from canary.report._model import (
    VERDICT_COLOURS,
    Distribution,
    fmt_signal_value,
    quantile_label,
    signed,
    sorted_quantiles,
)

ARM_COLOURS = {"production": "#0969da", "candidate": "#bc4c00"}
GRID = "#d0d7de"
INK = "#1f2328"
MUTED = "#59636e"
FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;font-size:11px"

_TIME_STEPS = (
    1,
    2,
    5,
    10,
    15,
    30,
    60,
    120,
    300,
    600,
    900,
    1800,
    3600,
    7200,
    10800,
    21600,
    43200,
    86400,
    172800,
    604800,
)


def esc(text: object) -> str:
    return escape(str(text), quote=True)


def _n(x: float) -> str:
    """A coordinate: short, never NaN."""
    text = f"{x:.1f}" if math.isfinite(x) else "0"
    return text[:-2] if text.endswith(".0") else text


def nice_ticks(lo: float, hi: float, most: int = 6) -> list[float]:
    """Round values from ``lo`` to ``hi``, at most about ``most`` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(most - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    out: list[float] = []
    v = first
    while v <= hi + step * 1e-9:
        out.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return out


def time_ticks(t0: float, t1: float, most: int = 7) -> list[float]:
    span = max(t1 - t0, 1e-9)
    step = next((s for s in _TIME_STEPS if span / s <= most), _TIME_STEPS[-1])
    first = float(math.ceil(t0 / step) * step)
    out: list[float] = []
    t = first
    while t <= t1:
        out.append(t)
        t += step
    return out


def _time_label(t: float, span: float, utc: bool) -> str:
    when = datetime.fromtimestamp(t, tz=UTC if utc else None).astimezone(UTC if utc else None)
    if span >= 2 * 86400:
        return f"{when:%m-%d %H:%M}"
    return f"{when:%H:%M:%S}" if span < 600 else f"{when:%H:%M}"


@dataclass(frozen=True)
class Frame:
    """A plot area inside a ``width`` x ``height`` SVG with margins."""

    width: int = 760
    height: int = 220
    left: int = 64
    right: int = 16
    top: int = 14
    bottom: int = 34

    @property
    def x0(self) -> float:
        return float(self.left)

    @property
    def x1(self) -> float:
        return float(self.width - self.right)

    @property
    def y0(self) -> float:  # bottom
        return float(self.height - self.bottom)

    @property
    def y1(self) -> float:  # top
        return float(self.top)


class Linear:
    def __init__(self, d0: float, d1: float, r0: float, r1: float) -> None:
        if d1 == d0:
            d0, d1 = d0 - 1.0, d1 + 1.0
        self.d0, self.d1, self.r0, self.r1 = d0, d1, r0, r1

    def __call__(self, v: float) -> float:
        return self.r0 + (v - self.d0) / (self.d1 - self.d0) * (self.r1 - self.r0)


class Log:
    def __init__(self, d0: float, d1: float, r0: float, r1: float) -> None:
        d0 = max(d0, 1e-12)
        d1 = max(d1, d0 * 1.0001)
        self.l0, self.l1, self.r0, self.r1 = math.log(d0), math.log(d1), r0, r1

    def __call__(self, v: float) -> float:
        lv = math.log(max(v, 1e-12))
        return self.r0 + (lv - self.l0) / (self.l1 - self.l0) * (self.r1 - self.r0)


def _open(f: Frame, label: str) -> list[str]:
    return [
        f'<svg viewBox="0 0 {f.width} {f.height}" '
        f'width="{f.width}" height="{f.height}" role="img" aria-label="{esc(label)}" '
        f'style="{FONT};width:100%;height:auto">',
        f"<title>{esc(label)}</title>",
    ]


def _time_axis(f: Frame, x: Linear, t0: float, t1: float, utc: bool, zone: str) -> list[str]:
    out = [
        f'<line x1="{_n(f.x0)}" y1="{_n(f.y0)}" x2="{_n(f.x1)}" y2="{_n(f.y0)}" stroke="{MUTED}"/>'
    ]
    span = t1 - t0
    for t in time_ticks(t0, t1):
        px = x(t)
        if px > f.x1 - 24:  # its label would run off the chart
            continue
        out.append(
            f'<line x1="{_n(px)}" y1="{_n(f.y0)}" x2="{_n(px)}" y2="{_n(f.y0 + 4)}" '
            f'stroke="{MUTED}"/>'
            f'<text x="{_n(px)}" y="{_n(f.y0 + 16)}" text-anchor="middle" fill="{MUTED}">'
            f"{esc(_time_label(t, span, utc))}</text>"
        )
    out.append(
        f'<text x="{_n(f.x1)}" y="{_n(f.height - 3)}" text-anchor="end" fill="{MUTED}">'
        f"time ({esc(zone)})</text>"
    )
    return out


def _y_axis(f: Frame, y: Linear, ticks: Sequence[float], fmt: str) -> list[str]:
    out = []
    for v in ticks:
        py = y(v)
        out.append(
            f'<line x1="{_n(f.x0)}" y1="{_n(py)}" x2="{_n(f.x1)}" y2="{_n(py)}" '
            f'stroke="{GRID}" stroke-width="0.6"/>'
            f'<text x="{_n(f.x0 - 6)}" y="{_n(py + 3.5)}" text-anchor="end" fill="{MUTED}">'
            f"{esc(_fmt_tick(v, fmt))}</text>"
        )
    return out


def _fmt_tick(v: float, unit: str) -> str:
    if unit in ("%", "pp"):
        return signed(v, unit)
    if unit == "w":
        return f"{v:g}%"
    return f"{v:.3g}"


@dataclass(frozen=True)
class IntervalPoint:
    at: float
    estimate: float | None
    lower: float | None  # None: unbounded below
    upper: float | None
    verdict: str


def interval_chart(
    label: str,
    points: Sequence[IntervalPoint],
    *,
    tolerance: float | None,
    unit: str,
    t0: float,
    t1: float,
    marks: Sequence[tuple[float, str]] = (),
    utc: bool = False,
    zone: str = "",
) -> str:
    """A metric's confidence interval over time (shaded band, estimate line, one dot per
    analysis in its verdict's colour) against its tolerance line (dashed red) and no change
    (0); ``marks``: decisions as labelled vertical lines. Bounds beyond the plotted range
    (the first, wide intervals) are drawn at its edge."""
    f = Frame()
    x = Linear(t0, t1 if t1 > t0 else t0 + 1, f.x0, f.x1)
    finite = [v for p in points for v in (p.estimate, p.lower, p.upper) if v is not None]
    later = points[len(points) // 5 :] or points
    core = [v for p in later for v in (p.estimate, p.lower, p.upper) if v is not None]
    anchors = [0.0] + ([tolerance] if tolerance is not None else [])
    values = core or finite
    lo = min(values + anchors)
    hi = max(values + anchors)
    if tolerance is not None and tolerance != 0:  # never zoom out past 4x the tolerance
        lo = max(lo, min(anchors) - 3 * abs(tolerance))
        hi = min(hi, max(anchors) + 3 * abs(tolerance))
        if points and points[-1].estimate is not None:
            lo, hi = min(lo, points[-1].estimate), max(hi, points[-1].estimate)
    pad = (hi - lo) * 0.08 or 1.0
    lo, hi = lo - pad, hi + pad
    y = Linear(lo, hi, f.y0, f.y1)

    def cy(v: float | None, side: float) -> float:
        if v is None:
            return f.y1 if side > 0 else f.y0
        return min(max(y(v), f.y1), f.y0)

    out = _open(f, label)
    out += _y_axis(f, y, nice_ticks(lo, hi, 6), unit)
    if len(points) >= 2:
        top = [f"{_n(x(p.at))},{_n(cy(p.upper, 1))}" for p in points]
        bottom = [f"{_n(x(p.at))},{_n(cy(p.lower, -1))}" for p in reversed(points)]
        out.append(
            f'<polygon points="{" ".join(top + bottom)}" fill="#8c959f" fill-opacity="0.22" '
            'stroke="none"/>'
        )
    elif points:
        p = points[0]
        out.append(
            f'<line x1="{_n(x(p.at))}" y1="{_n(cy(p.lower, -1))}" x2="{_n(x(p.at))}" '
            f'y2="{_n(cy(p.upper, 1))}" stroke="#8c959f" stroke-width="6" stroke-opacity="0.4"/>'
        )
    zero = y(0.0)
    out.append(
        f'<line x1="{_n(f.x0)}" y1="{_n(zero)}" x2="{_n(f.x1)}" y2="{_n(zero)}" '
        f'stroke="{MUTED}" stroke-width="1"/>'
    )
    if tolerance is not None:
        ty = y(tolerance)
        label_y = ty + 13 if ty - f.y1 < 22 else ty - 4  # below the line near the top
        out.append(
            f'<line x1="{_n(f.x0)}" y1="{_n(ty)}" x2="{_n(f.x1)}" y2="{_n(ty)}" '
            f'stroke="{VERDICT_COLOURS["WORSE"]}" stroke-width="1.5" stroke-dasharray="6 4"/>'
            f'<text x="{_n(f.x1 - 2)}" y="{_n(label_y)}" text-anchor="end" '
            f'fill="{VERDICT_COLOURS["WORSE"]}">tolerance {esc(_fmt_tick(tolerance, unit))}'
            "</text>"
        )
    est = [p for p in points if p.estimate is not None]
    if len(est) >= 2:
        path = " ".join(f"{_n(x(p.at))},{_n(cy(p.estimate, 0))}" for p in est)
        out.append(f'<polyline points="{path}" fill="none" stroke="{INK}" stroke-width="1.2"/>')
    radius = 3.0 if len(points) < 120 else 1.8
    for p in points:
        if p.estimate is None:
            continue
        colour = VERDICT_COLOURS.get(p.verdict, MUTED)
        out.append(
            f'<circle cx="{_n(x(p.at))}" cy="{_n(cy(p.estimate, 0))}" r="{radius}" '
            f'fill="{colour}"><title>{esc(p.verdict)}</title></circle>'
        )
    out += _marks(f, x, marks)
    out += _time_axis(f, x, t0, t1, utc, zone)
    out.append("</svg>")
    return "".join(out)


def _marks(f: Frame, x: Linear, marks: Sequence[tuple[float, str]]) -> list[str]:
    out = []
    row, last = 0, -1e9
    for at, text in sorted(marks):
        px = x(at)
        if not f.x0 - 0.5 <= px <= f.x1 + 0.5:
            continue
        row = row + 1 if px - last < 60 and row < 3 else 0  # labels close together: stacked
        last = px
        right = px > f.x1 - 60  # near the right edge: the label goes left of the line
        tx, anchor = (px - 3, "end") if right else (px + 3, "start")
        out.append(
            f'<line x1="{_n(px)}" y1="{_n(f.y1)}" x2="{_n(px)}" y2="{_n(f.y0)}" '
            f'stroke="{MUTED}" stroke-width="0.8" stroke-dasharray="2 3"/>'
            f'<text x="{_n(tx)}" y="{_n(f.y1 + 9 + 11 * row)}" text-anchor="{anchor}" '
            f'fill="{MUTED}">{esc(text)}</text>'
        )
    return out


def weights_chart(
    label: str,
    segments: Sequence[tuple[float, float, bool]],
    *,
    t0: float,
    t1: float,
    marks: Sequence[tuple[float, str]] = (),
    utc: bool = False,
    zone: str = "",
) -> str:
    """The candidate's share of the traffic over time: ``segments`` are ``(from time,
    weight %, shadow)``, each lasting until the next (the last until ``t1``). Shadow steps
    (users get production's answer, the candidate sees a mirror) are hatched."""
    f = Frame(height=170)
    x = Linear(t0, t1 if t1 > t0 else t0 + 1, f.x0, f.x1)
    y = Linear(0.0, 100.0, f.y0, f.y1)
    out = _open(f, label)
    out.append(
        '<defs><pattern id="shadow-hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="#fff"/>'
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="{ARM_COLOURS["candidate"]}" '
        'stroke-width="2"/></pattern></defs>'
    )
    out += _y_axis(f, y, (0, 25, 50, 75, 100), "w")
    for i, (start, weight, shadow) in enumerate(segments):
        end = segments[i + 1][0] if i + 1 < len(segments) else t1
        a, b = x(max(start, t0)), x(min(end, t1))
        if b <= a:
            continue
        if shadow:
            out.append(
                f'<rect x="{_n(a)}" y="{_n(f.y1)}" width="{_n(b - a)}" '
                f'height="{_n(f.y0 - f.y1)}" fill="url(#shadow-hatch)" fill-opacity="0.35">'
                "<title>shadow: the candidate sees a mirror of the traffic</title></rect>"
            )
        h = f.y0 - y(weight)
        out.append(
            f'<rect x="{_n(a)}" y="{_n(y(weight))}" width="{_n(b - a)}" height="{_n(h)}" '
            f'fill="{ARM_COLOURS["candidate"]}" fill-opacity="0.75">'
            f"<title>candidate {esc(f'{weight:g}')}%</title></rect>"
        )
    out += _marks(f, x, marks)
    out += _time_axis(f, x, t0, t1, utc, zone)
    out.append("</svg>")
    return "".join(out)


def distribution_chart(label: str, signal: str, arms: Mapping[str, Distribution]) -> str:
    """Both arms' distributions of ``signal`` on a log axis: histograms overlaid (share of
    the arm's requests per bin) with their p50/p95/p99 marked; with quantiles only, one
    row of quantile dots per arm."""
    with_bins = {a: d for a, d in arms.items() if d.bins}
    if with_bins:
        return _histograms(label, signal, with_bins)
    return _quantile_rows(label, signal, arms)


def _value_axis(f: Frame, x: Log, lo: float, hi: float, signal: str) -> list[str]:
    out = [
        f'<line x1="{_n(f.x0)}" y1="{_n(f.y0)}" x2="{_n(f.x1)}" y2="{_n(f.y0)}" stroke="{MUTED}"/>'
    ]
    ticks = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**e
            if lo <= v <= hi:
                ticks.append(v)
    if len(ticks) < 2:
        ticks = [lo, math.sqrt(lo * hi), hi]
    for v in ticks:
        px = x(v)
        out.append(
            f'<line x1="{_n(px)}" y1="{_n(f.y0)}" x2="{_n(px)}" y2="{_n(f.y0 + 4)}" '
            f'stroke="{MUTED}"/><text x="{_n(px)}" y="{_n(f.y0 + 16)}" text-anchor="middle" '
            f'fill="{MUTED}">{esc(fmt_signal_value(signal, v))}</text>'
        )
    out.append(
        f'<text x="{_n(f.x1)}" y="{_n(f.height - 3)}" text-anchor="end" fill="{MUTED}">'
        f"{esc(signal)} (log scale)</text>"
    )
    return out


def _legend(f: Frame, arms: Sequence[str]) -> list[str]:
    out = []
    for i, arm in enumerate(arms):
        px = f.x0 + 8 + i * 110
        colour = ARM_COLOURS.get(arm, INK)
        out.append(
            f'<rect x="{_n(px)}" y="{_n(f.y1)}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{_n(px + 14)}" y="{_n(f.y1 + 9)}" fill="{INK}">{esc(arm)}</text>'
        )
    return out


def _histograms(label: str, signal: str, arms: Mapping[str, Distribution]) -> str:
    f = Frame(height=200)
    lo = min(b[0] for d in arms.values() for b in d.bins)
    hi = max(b[1] for d in arms.values() for b in d.bins)
    lo = max(lo, 1e-9)
    hi = max(hi, lo * 1.01)
    x = Log(lo, hi, f.x0, f.x1)
    shares = {
        arm: [(a, b, c / max(sum(cc for _, _, cc in d.bins), 1)) for a, b, c in d.bins]
        for arm, d in arms.items()
    }
    top = max((s for v in shares.values() for _, _, s in v), default=1.0) or 1.0
    y = Linear(0.0, top * 1.1, f.y0, f.y1 + 14)
    out = _open(f, label)
    ticks = nice_ticks(0.0, top * 1.1, 4)
    for v in ticks:
        py = y(v)
        out.append(
            f'<line x1="{_n(f.x0)}" y1="{_n(py)}" x2="{_n(f.x1)}" y2="{_n(py)}" '
            f'stroke="{GRID}" stroke-width="0.6"/><text x="{_n(f.x0 - 6)}" y="{_n(py + 3.5)}" '
            f'text-anchor="end" fill="{MUTED}">{esc(f"{v * 100:.3g}%")}</text>'
        )
    for arm, bins in shares.items():
        colour = ARM_COLOURS.get(arm, INK)
        pts = [f"{_n(x(bins[0][0]))},{_n(f.y0)}"]
        for a, b, s in bins:
            pts.append(f"{_n(x(a))},{_n(y(s))}")
            pts.append(f"{_n(x(b))},{_n(y(s))}")
        pts.append(f"{_n(x(bins[-1][1]))},{_n(f.y0)}")
        out.append(
            f'<polygon points="{" ".join(pts)}" fill="{colour}" fill-opacity="0.18" '
            f'stroke="{colour}" stroke-width="1.3"/>'
        )
        for q, v in sorted_quantiles(arms[arm].quantiles):
            if q not in (0.5, 0.95, 0.99) or not lo <= v <= hi:
                continue
            px = x(v)
            out.append(
                f'<line x1="{_n(px)}" y1="{_n(f.y1 + 14)}" x2="{_n(px)}" y2="{_n(f.y0)}" '
                f'stroke="{colour}" stroke-width="1" stroke-dasharray="3 2">'
                f"<title>{esc(arm)} {esc(quantile_label(q))} "
                f"{esc(fmt_signal_value(signal, v))}</title></line>"
            )
    out += _legend(f, list(arms))
    out += _value_axis(f, x, lo, hi, signal)
    out.append("</svg>")
    return "".join(out)


def _quantile_rows(label: str, signal: str, arms: Mapping[str, Distribution]) -> str:
    rows = [a for a in arms if arms[a].quantiles]
    f = Frame(height=60 + 34 * max(len(rows), 1), left=90)
    values = [v for a in rows for _, v in sorted_quantiles(arms[a].quantiles) if v > 0]
    lo, hi = (min(values), max(values)) if values else (1e-3, 1.0)
    lo, hi = lo / 1.3, hi * 1.3
    x = Log(lo, hi, f.x0, f.x1)
    out = _open(f, label)
    for i, arm in enumerate(rows):
        py = f.y1 + 24 + i * 34
        colour = ARM_COLOURS.get(arm, INK)
        out.append(
            f'<text x="{_n(f.x0 - 8)}" y="{_n(py + 4)}" text-anchor="end" fill="{INK}">'
            f"{esc(arm)}</text>"
            f'<line x1="{_n(f.x0)}" y1="{_n(py)}" x2="{_n(f.x1)}" y2="{_n(py)}" stroke="{GRID}"/>'
        )
        for q, v in sorted_quantiles(arms[arm].quantiles):
            if v <= 0:
                continue
            px = x(v)
            out.append(
                f'<circle cx="{_n(px)}" cy="{_n(py)}" r="4" fill="{colour}"/>'
                f'<text x="{_n(px)}" y="{_n(py - 8)}" text-anchor="middle" fill="{MUTED}">'
                f"{esc(quantile_label(q))}</text>"
            )
    out += _value_axis(f, x, lo, hi, signal)
    out.append("</svg>")
    return "".join(out)


def interval_bar(
    estimate: float | None,
    lower: float | None,
    upper: float | None,
    tolerance: float | None,
    verdict: str,
    unit: str,
) -> str:
    """A small inline chart of one interval against its tolerance (and 0), for tables."""
    w, h, pad = 180, 26, 8
    values = [v for v in (estimate, lower, upper, tolerance, 0.0) if v is not None]
    lo, hi = min(values), max(values)
    if tolerance is not None and tolerance != 0:
        lo = max(lo, min(0.0, tolerance) - 3 * abs(tolerance))
        hi = min(hi, max(0.0, tolerance) + 3 * abs(tolerance))
    span = (hi - lo) or 1.0
    lo, hi = lo - span * 0.1, hi + span * 0.1
    x = Linear(lo, hi, pad, w - pad)

    def cx(v: float | None, side: float) -> float:
        if v is None:
            return pad if side < 0 else w - pad
        return min(max(x(v), pad), w - pad)

    colour = VERDICT_COLOURS.get(verdict, MUTED)
    label = f"interval {verdict}"
    out = [
        f'<svg viewBox="0 0 {w} {h}" width="{w}" '
        f'height="{h}" role="img" aria-label="{esc(label)}">',
        f'<line x1="{_n(x(0.0))}" y1="3" x2="{_n(x(0.0))}" y2="{h - 3}" stroke="{MUTED}"/>',
    ]
    if tolerance is not None:
        tx = x(tolerance)
        out.append(
            f'<line x1="{_n(tx)}" y1="2" x2="{_n(tx)}" y2="{h - 2}" '
            f'stroke="{VERDICT_COLOURS["WORSE"]}" stroke-width="1.5" stroke-dasharray="3 2"/>'
        )
    if lower is not None or upper is not None or estimate is not None:
        out.append(
            f'<line x1="{_n(cx(lower, -1))}" y1="{h / 2}" x2="{_n(cx(upper, 1))}" '
            f'y2="{h / 2}" stroke="{colour}" stroke-width="5" stroke-linecap="round" '
            'stroke-opacity="0.55"/>'
        )
    if estimate is not None:
        out.append(f'<circle cx="{_n(cx(estimate, 0))}" cy="{h / 2}" r="3.5" fill="{colour}"/>')
    out.append("</svg>")
    return "".join(out)


__all__ = [
    "ARM_COLOURS",
    "IntervalPoint",
    "distribution_chart",
    "esc",
    "interval_bar",
    "interval_chart",
    "nice_ticks",
    "time_ticks",
    "weights_chart",
]
