"""Each arm's distribution of a signal, from the log-bucket histograms the analysis uses: count,
mean, min, max, quantiles, and counts over log-spaced bins shared by both arms (so they
overlay). The dashboard's ``GET /api/v1/rollouts/{name}/distributions`` and ``canary report``
show the same numbers."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from canary.observe.accumulators import RolloutAccumulator

__all__ = ["DISTRIBUTION_BINS", "DISTRIBUTION_SIGNALS", "QUANTILES", "distributions"]

DISTRIBUTION_SIGNALS = ("latency", "ttft")  # seconds, both
DISTRIBUTION_BINS = 40
QUANTILES = (0.5, 0.9, 0.95, 0.99)


def _quantile_name(q: float) -> str:
    return f"p{q * 100:g}"


def distributions(
    totals: RolloutAccumulator,
    bins: int = DISTRIBUTION_BINS,
    signals: tuple[str, ...] = DISTRIBUTION_SIGNALS,
) -> dict[str, Any]:
    """Each arm's latency and ttft distribution: count, mean, quantiles and counts over
    ``bins`` log-spaced bins shared by both arms (so they overlay), from the histograms the
    analysis uses (each value within the histograms' relative accuracy).

    Only signals with a value on some arm are listed; a value at or below zero counts in the
    first bin.
    """
    out: dict[str, Any] = {}
    for signal in signals:
        hists = {}
        for arm, acc in totals.arms.items():
            sig = acc.signals.get(signal)
            if sig is not None and sig.n:
                hists[arm] = sig.hist
        if not hists:
            continue
        arrays = {arm: h.to_arrays() for arm, h in hists.items()}
        positive = [v[v > 0] for v, _ in arrays.values()]
        lows = [float(p.min()) for p in positive if p.size]
        highs = [float(p.max()) for p in positive if p.size]
        lo, hi = (min(lows), max(highs)) if lows else (1e-3, 1.0)
        if hi <= lo:
            lo, hi = lo / 1.1, hi * 1.1
        edges = np.geomspace(lo, hi, bins + 1)
        edges[-1] = hi * (1 + 1e-9)  # the largest value falls in the last bin
        arms: dict[str, Any] = {}
        for arm, (values, counts) in arrays.items():
            h = hists[arm]
            binned, _ = np.histogram(np.clip(values, lo, None), bins=edges, weights=counts)
            sig = totals.arms[arm].signals[signal]
            arms[arm] = {
                "n": h.count,
                "mean": _finite(sig.mean),
                "min": _finite(sig.min),
                "max": _finite(sig.max),
                "quantiles": {_quantile_name(q): _finite(h.quantile(q)) for q in QUANTILES},
                "counts": [int(c) for c in binned],
            }
        out[signal] = {"unit": "seconds", "edges": [float(e) for e in edges], "arms": arms}
    return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
