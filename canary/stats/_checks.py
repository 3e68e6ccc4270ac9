"""Argument checks shared by the public test functions; each error echoes the bad value."""

from __future__ import annotations

import math
import numbers

from canary.stats._types import Direction, _as_direction


def check_alpha(alpha: float) -> float:
    if not isinstance(alpha, numbers.Real) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)


def check_probability_open(name: str, value: float) -> float:
    if not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return float(value)


def check_margin(margin: float, relative: bool, direction: Direction | str) -> Direction:
    d = _as_direction(direction)
    if not isinstance(margin, numbers.Real) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    if relative and d is Direction.DECREASE and margin >= 1:
        raise ValueError(f"a relative max_decrease margin must be < 1 (100%), got {margin!r}")
    return d


def check_burn_in(burn_in: int) -> int:
    if isinstance(burn_in, bool) or not isinstance(burn_in, numbers.Integral) or burn_in < 0:
        raise ValueError(f"burn_in must be an integer >= 0, got {burn_in!r}")
    return int(burn_in)


def check_positive(name: str, value: float) -> float:
    if not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


__all__ = [
    "check_alpha",
    "check_burn_in",
    "check_margin",
    "check_positive",
    "check_probability_open",
]
