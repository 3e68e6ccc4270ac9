"""Log-bucket histogram with bounded relative error, mergeable across workers.

Bucket ``i`` holds values in ``(gamma**(i-1), gamma**i]`` with
``gamma = (1 + a) / (1 - a)``; reporting a bucket by ``2 * gamma**i / (gamma + 1)`` is
within relative error ``a`` of every value in it (the DDSketch scheme, Masson et al. 2019).
Memory grows with the log of the value range, never with the number of observations.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

DEFAULT_RELATIVE_ACCURACY = 0.005
# Values at or below this are counted as zero: no signal we measure is meaningful below it.
MIN_POSITIVE = 1e-9


class LogHistogram:
    """Sparse log-bucket histogram: O(1) ``add``, exact ``merge``, bounded size."""

    __slots__ = ("_inv_log_gamma", "accuracy", "count", "gamma", "neg", "pos", "zero")

    def __init__(self, accuracy: float = DEFAULT_RELATIVE_ACCURACY) -> None:
        if not 0.0 < accuracy < 1.0:
            raise ValueError(f"accuracy must be in (0, 1), got {accuracy!r}")
        self.accuracy = accuracy
        self.gamma = (1.0 + accuracy) / (1.0 - accuracy)
        self._inv_log_gamma = 1.0 / math.log(self.gamma)
        self.pos: dict[int, int] = {}
        self.neg: dict[int, int] = {}
        self.zero = 0
        self.count = 0

    def index(self, value: float) -> int:
        """Bucket index of a positive value."""
        return math.ceil(math.log(value) * self._inv_log_gamma)

    def value_of(self, index: int) -> float:
        """Representative value of bucket ``index`` (relative error <= accuracy)."""
        return 2.0 * self.gamma**index / (self.gamma + 1.0)

    def add(self, value: float, n: int = 1) -> None:
        if not math.isfinite(value):
            raise ValueError(f"histogram values must be finite, got {value!r}")
        self.count += n
        if value > MIN_POSITIVE:
            i = math.ceil(math.log(value) * self._inv_log_gamma)
            self.pos[i] = self.pos.get(i, 0) + n
        elif value < -MIN_POSITIVE:
            i = math.ceil(math.log(-value) * self._inv_log_gamma)
            self.neg[i] = self.neg.get(i, 0) + n
        else:
            self.zero += n

    def merge(self, other: LogHistogram) -> None:
        if other.gamma != self.gamma:
            raise ValueError("cannot merge histograms with different accuracy")
        for i, c in other.pos.items():
            self.pos[i] = self.pos.get(i, 0) + c
        for i, c in other.neg.items():
            self.neg[i] = self.neg.get(i, 0) + c
        self.zero += other.zero
        self.count += other.count

    def copy(self) -> LogHistogram:
        h = LogHistogram(self.accuracy)
        h.pos = dict(self.pos)
        h.neg = dict(self.neg)
        h.zero = self.zero
        h.count = self.count
        return h

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted ``(values, counts)`` over all non-empty buckets, negatives first."""
        neg_idx = sorted(self.neg, reverse=True)
        pos_idx = sorted(self.pos)
        values = [-self.value_of(i) for i in neg_idx]
        counts = [self.neg[i] for i in neg_idx]
        if self.zero:
            values.append(0.0)
            counts.append(self.zero)
        values += [self.value_of(i) for i in pos_idx]
        counts += [self.pos[i] for i in pos_idx]
        return np.asarray(values, dtype=float), np.asarray(counts, dtype=np.int64)

    def quantile(self, q: float) -> float:
        """Point estimate of the ``q`` quantile (relative error <= accuracy); nan if empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q!r}")
        if self.count == 0:
            return math.nan
        values, counts = self.to_arrays()
        rank = q * (self.count - 1)
        k = int(np.searchsorted(np.cumsum(counts), rank, side="right"))
        return float(values[min(k, len(values) - 1)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "pos": {str(k): v for k, v in self.pos.items()},
            "neg": {str(k): v for k, v in self.neg.items()},
            "zero": self.zero,
            "count": self.count,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LogHistogram:
        h = cls(float(data["accuracy"]))
        h.pos = {int(k): int(v) for k, v in data["pos"].items()}
        h.neg = {int(k): int(v) for k, v in data["neg"].items()}
        h.zero = int(data["zero"])
        h.count = int(data["count"])
        return h


__all__ = [
    "DEFAULT_RELATIVE_ACCURACY",
    "MIN_POSITIVE",
    "LogHistogram",
]
