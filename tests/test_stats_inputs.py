"""canary.stats.shift_checks: the vectorised drift checks behind input health (the sequences
themselves, mean_shift_cs and proportion_shift_cs, are simulated in tests/test_inputs.py)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from canary.stats import MIN_MEAN_SAMPLES, mean_shift_cs, proportion_shift_cs, shift_checks

NAN, INF = math.nan, math.inf


def _checks(**changes: Any) -> Any:
    """Two fields, two proportions (a null rate kept when unseen, one type share that is not)."""
    args: dict[str, Any] = {
        "n": [[400, 400], [400, 400]],
        "k": [[4, 400], [0, 0]],
        "base_n": [[1000, 1000], [1000, 1000]],
        "base_k": [[10, 1000], [0, 0]],
        "base_p": 0.0,
        "keep_unseen": [True, False],
        "numbers": [396, 0],
        "mean": [51.0, NAN],
        "var": [400.0, NAN],
        "base_numbers": [990, 0],
        "base_mean": [50.0, NAN],
        "base_std": [20.0, NAN],
        "alpha": 0.04,
        "mean_tolerance": 0.25,
        "rate_tolerance": 0.05,
    }
    args.update(changes)
    return shift_checks(**args), args


def test_each_check_is_its_sequence_at_the_split_alpha() -> None:
    r, args = _checks()
    a = 0.04 / (2 * 3)  # 2 fields x (mean + 2 proportions)
    assert r.alpha == pytest.approx(a)
    est, lo, hi = mean_shift_cs(396, 51.0, 400.0, 50.0, 20.0, 990, a)
    assert (r.estimate[0, 0], r.lower[0, 0], r.upper[0, 0]) == (est, lo, hi)
    assert r.tolerance[0, 0] == 0.25 * 20.0 and r.samples[0, 0] == 396
    est, lo, hi = proportion_shift_cs(args["n"], args["k"], args["base_n"], args["base_k"], 0.0, a)
    assert np.array_equal(r.lower[:, 1:], lo) and np.array_equal(r.upper[:, 1:], hi)
    assert np.all(r.tolerance[:, 1:] == 0.05) and np.all(r.samples[:, 1:] == 400)
    assert not r.drifted.any()


def test_what_is_shown() -> None:
    r, _ = _checks()
    # Field 1: no numbers (no mean check); its null rate 0 on both sides is still a check, a
    # type share never seen on either side is not.
    assert r.shown.tolist() == [[True, True, True], [False, True, False]]
    few, _ = _checks(numbers=[MIN_MEAN_SAMPLES - 1, 0])
    assert not few.shown[0, 0]
    small_base, _ = _checks(base_numbers=[MIN_MEAN_SAMPLES - 1, 0])
    assert not small_base.shown[0, 0]
    # A given baseline (base_n inf) is exact; nan where the config gives nothing.
    given, _ = _checks(
        base_n=INF, base_k=0.0, base_p=[[0.01, NAN], [0.0, NAN]], base_numbers=[INF, INF]
    )
    assert given.shown.tolist() == [[True, True, False], [False, True, False]]
    # No requests since the baseline: nothing to show, never a flag.
    empty, _ = _checks(n=0, k=0, numbers=[0, 0])
    assert not empty.shown.any() and not empty.drifted.any()


def test_a_shift_beyond_the_tolerance_is_flagged_either_way() -> None:
    up, _ = _checks(numbers=[5000, 0], mean=[60.0, NAN])
    assert up.drifted[0, 0] and up.lower[0, 0] > up.tolerance[0, 0]
    down, _ = _checks(k=[[400, 400], [0, 0]])  # null rate 1% -> 100%
    assert down.drifted[0, 1] and not down.drifted[0, 0]
    assert not _checks(mean_tolerance=10.0, numbers=[5000, 0], mean=[60.0, NAN])[0].drifted.any()


def test_counts_must_be_fields_by_proportions() -> None:
    with pytest.raises(ValueError, match="fields, proportions"):
        _checks(n=[400, 400], k=[4, 400], base_n=[1000, 1000], base_k=[10, 1000])
