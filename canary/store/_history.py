"""Metric history: how a rollout's history points are bounded and thinned (every backend).

Each analysis appends one point per rollout (``Store.append_history``), so a week at a 1 s
interval would be 600,000 points. A store keeps at most ``max_points`` per rollout: when an
append makes it one more, :func:`thin` picks which to drop, down to :data:`LOW_WATER` of
``max_points`` (so thinning runs once per ~``max_points / 4`` appends, not at every one).

The scheme keeps resolution proportional to age ("log time"): each droppable point is scored
by the gap its removal would leave (the time from its older to its newer neighbour) divided
by its age (the time from it to the newest point); the points with the smallest scores go
first, never two neighbours in one round (so no gap grows more than one neighbour's worth).
Recent time stays at the full analysis interval, old time thins out: simulated at a 1 s
interval for a week with ``max_points`` 1,000 (:data:`DEFAULT_MAX_HISTORY`), 894 points are
left, about 100 per e-fold of age: every point of the last 2 minutes, gaps of <= 4 s over the
last 10 minutes, <= 64 s over the last hour, <= 17 minutes over the last day and <= 2.3
hours over the first days. At 200-700 bytes a point (1-6 metrics) that is 190-620 KB.

Never dropped: the first point (the rollout's start) and the newest; points appended with
``keep`` (decisions: steps and phase changes stay exact in time), unless keep-points alone
crowd the budget (more than about half of it, only after thousands of decisions): then the
oldest points go whatever they are, so the bound always holds. Times need not arrive in
order (a wall clock set back): every store keeps its points sorted by time, then by append.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_MAX_HISTORY = 1000  # points kept per rollout
LOW_WATER = 0.75  # a thinning leaves this share of max_points
MIN_MAX_HISTORY = 4


def check_max_points(max_points: int) -> None:
    if max_points < MIN_MAX_HISTORY:
        raise ValueError(f"max_points must be >= {MIN_MAX_HISTORY}, got {max_points!r}")


def thin(times: Sequence[float], keeps: Sequence[bool], max_points: int) -> list[int]:
    """The indices (ascending) of the points to drop from a history of points at ``times``
    (sorted, oldest first), ``keeps`` flagging the ones to keep; [] while there are at most
    ``max_points``. See the module docstring; :data:`canary.store.redis._THIN_LUA` is the
    same function in Lua (the tests check that they agree)."""
    n = len(times)
    if n <= max_points:
        return []
    target = n - int(max_points * LOW_WATER)
    newest = times[-1]
    scored = []
    for i in range(1, n - 1):
        if keeps[i]:
            continue
        age = newest - times[i]
        scored.append(((times[i + 1] - times[i - 1]) / max(age, 1e-9), i))
    scored.sort()
    taken: set[int] = set()
    for _, i in scored:
        if len(taken) >= target:
            break
        if i - 1 in taken or i + 1 in taken:
            continue
        taken.add(i)
    over = n - len(taken) - max_points
    i = 1
    while over > 0 and i < n - 1:  # keep-points crowd the budget: the oldest go
        if i not in taken:
            taken.add(i)
            over -= 1
        i += 1
    return sorted(taken)


__all__ = ["DEFAULT_MAX_HISTORY", "LOW_WATER", "MIN_MAX_HISTORY", "check_max_points", "thin"]
