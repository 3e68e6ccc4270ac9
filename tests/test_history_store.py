"""Metric history in every store backend (memory, sqlite, redis) and its thinning.

``append_history`` keeps at most ``max_points`` points per rollout, thinned so that resolution
is proportional to age (``canary/store/_history.py``); the first, the newest and the ``keep``
points stay; points come back sorted by time; ``reset`` forgets them; a stale fencing token
writes nothing. The Lua thinning of the Redis store is the same function as the Python one.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canary.errors import FencedError
from canary.store import MemoryStore, RedisStore, SQLiteStore
from canary.store._history import DEFAULT_MAX_HISTORY, LOW_WATER, thin
from canary.store.sqlite import MIGRATIONS, SCHEMA_VERSION
from tests.store_harness import MakeStore, shared_store_factory  # noqa: F401  (make_store)

T0 = 1_800_000_000.0


def _point(i: int, **extra: object) -> dict[str, object]:
    return {"t": T0 + i, "i": i, **extra}


async def test_points_come_back_sorted_by_time_and_since_filters(make_store: MakeStore) -> None:
    a, b = make_store(), make_store()
    await a.open()
    await b.open()
    assert await a.history("m") == []
    for i in (0, 1, 2, 5, 3):  # a clock set back: sorted by time all the same
        await a.append_history("m", _point(i), at=T0 + i)
    await a.append_history("m", _point(3, dup=True), at=T0 + 3)  # equal times: append order
    await a.append_history("other", _point(9), at=T0 + 9)
    got = await b.history("m")  # another client of the same store sees the same
    assert [p["i"] for p in got] == [0, 1, 2, 3, 3, 5]
    assert got[4] == {"t": T0 + 3, "i": 3, "dup": True}
    assert [p["i"] for p in await b.history("m", since=T0 + 2)] == [3, 3, 5]
    assert [p["i"] for p in await b.history("m", since=T0 + 2.5)] == [3, 3, 5]
    assert await b.history("m", since=T0 + 5) == []
    assert [p["i"] for p in await b.history("other")] == [9]
    # reset: a new rollout of that name has no history; other rollouts keep theirs
    await a.reset("m")
    assert await b.history("m") == []
    assert [p["i"] for p in await b.history("other")] == [9]
    assert "m" not in await a.rollouts()  # history alone does not make a rollout


async def test_the_history_is_bounded_and_keeps_first_newest_and_decisions(
    make_store: MakeStore,
) -> None:
    store = make_store()
    await store.open()
    cap = 40
    decisions = {0, 7, 33, 150}
    for i in range(400):
        await store.append_history("m", _point(i), at=T0 + i, keep=i in decisions, max_points=cap)
        n = len(await store.history("m")) if i % 37 == 0 else 0
        assert n <= cap
    got = [p["i"] for p in await store.history("m")]
    assert int(cap * LOW_WATER) <= len(got) <= cap
    assert got == sorted(got) and got[0] == 0 and got[-1] == 399
    assert decisions <= set(got)
    recent = [i for i in got if i >= 390]
    assert recent == list(range(390, 400))  # the last points at full resolution


async def test_a_stale_fencing_token_writes_no_history(make_store: MakeStore) -> None:
    store = make_store()
    await store.open()
    token = await store.acquire_lease("a", 30.0)
    assert token is not None
    await store.append_history("m", _point(0), at=T0, fence=token)
    await store.release_lease("a")
    other = await store.acquire_lease("b", 30.0)
    assert other is not None and other != token
    with pytest.raises(FencedError):
        await store.append_history("m", _point(1), at=T0 + 1, fence=token)
    with pytest.raises(FencedError):
        await store.reset("m", fence=token)
    assert [p["i"] for p in await store.history("m")] == [0]


async def test_bad_points_and_arguments_are_refused(make_store: MakeStore) -> None:
    from canary.errors import StoreError

    store = make_store()
    await store.open()
    with pytest.raises(StoreError):
        await store.append_history("m", {"x": float("nan")}, at=T0)
    with pytest.raises(StoreError):
        await store.append_history("m", {"x": 1}, at=float("inf"))
    with pytest.raises(ValueError):
        await store.append_history("m", {"x": 1}, at=T0, max_points=1)
    assert await store.history("m") == []


async def test_redis_thins_exactly_as_the_python_function(redis_server: object) -> None:
    """The Lua port and ``thin`` agree on an irregular history (times, ties, keep flags)."""
    url = redis_server.url  # type: ignore[attr-defined]
    store, memory = RedisStore(url), MemoryStore()
    await store.open()
    await memory.open()
    try:
        cap = 30
        for i in range(300):
            at = T0 + (i * 7919 % 13) * 0.25 + i * 0.5  # not monotone, some equal times
            keep = i % 29 == 0
            for s in (store, memory):
                await s.append_history("m", _point(i), at=at, keep=keep, max_points=cap)
        assert await store.history("m") == await memory.history("m")
    finally:
        await store.close()
        await memory.close()


async def test_the_sqlite_migration_adds_the_history_table(tmp_path: Path) -> None:
    mine = next(i for i, m in enumerate(MIGRATIONS) if any("TABLE history" in q for q in m))
    assert mine == 5 and mine + 1 <= SCHEMA_VERSION
    path = tmp_path / "older.db"
    conn = sqlite3.connect(path)
    for version in range(mine):
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
    conn.execute("INSERT INTO state (rollout, data, updated_at) VALUES ('m', '{\"a\": 1}', 0)")
    conn.execute(f"PRAGMA user_version = {mine}")
    conn.commit()
    conn.close()
    store = SQLiteStore(path)
    await store.open()
    try:
        assert await store.get_state("m") == {"a": 1}
        assert await store.history("m") == []
        await store.append_history("m", _point(0), at=T0)
        assert await store.history("m") == [_point(0)]
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


# -- the thinning function ------------------------------------------------------------------


def _apply(times: list[float], keeps: list[bool], max_points: int) -> tuple[list, list]:
    drop = set(thin(times, keeps, max_points))
    kept = [i for i in range(len(times)) if i not in drop]
    return [times[i] for i in kept], [keeps[i] for i in kept]


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=600),
    keep_every=st.integers(0, 60),
    max_points=st.integers(4, 60),
)
def test_thinning_bounds_the_size_and_keeps_order_newest_and_decisions(
    steps: list[float], keep_every: int, max_points: int
) -> None:
    times: list[float] = []
    keeps: list[bool] = []
    ids: list[int] = []
    t = T0
    for n, step in enumerate(steps):
        t += step
        keep = keep_every > 0 and n % keep_every == 0
        times.append(t)
        keeps.append(keep)
        ids.append(n)
        drop = set(thin(times, keeps, max_points))
        assert len(times) - len(drop) <= max_points  # the bound, after every append
        assert 0 not in drop and len(times) - 1 not in drop  # first and newest stay
        if len(times) > max_points:
            assert len(times) - len(drop) >= min(max_points, int(max_points * LOW_WATER))
        times = [x for i, x in enumerate(times) if i not in drop]
        keeps = [x for i, x in enumerate(keeps) if i not in drop]
        ids = [x for i, x in enumerate(ids) if i not in drop]
        assert times == sorted(times) and ids == sorted(ids)
        assert ids[0] == 0 and ids[-1] == n
    decisions = [n for n in range(len(steps)) if keep_every > 0 and n % keep_every == 0]
    if len(decisions) <= max_points // 4:  # decisions never crowd the budget: all stay
        assert set(decisions) <= set(ids)


def test_a_week_at_one_second_stays_small_and_fine_for_recent_time() -> None:
    """The measured figures quoted in canary/store/_history.py and the README."""
    times: list[float] = []
    keeps: list[bool] = []
    for s in range(7 * 24 * 3600):
        times.append(T0 + s)
        keeps.append(s % 86400 == 0)
        if len(times) > DEFAULT_MAX_HISTORY:
            times, keeps = _apply(times, keeps, DEFAULT_MAX_HISTORY)
    assert 0.75 * DEFAULT_MAX_HISTORY <= len(times) <= DEFAULT_MAX_HISTORY
    assert sum(keeps) == 7  # one decision a day: all kept
    now = times[-1]

    def widest_gap(newer_than: float) -> float:
        recent = [t for t in times if now - t <= newer_than]
        return max(b - a for a, b in itertools.pairwise(recent))

    assert widest_gap(120) == 1.0
    assert widest_gap(600) <= 4
    assert widest_gap(3600) <= 64
    assert widest_gap(86400) <= 1024
    assert widest_gap(7 * 86400) <= 3 * 3600
    # a point of a rollout with five metrics (the README's format), about 600 bytes
    point = {
        "t": now, "ph": "running", "st": 2, "w": [75.0, 25.0], "sh": False,
        "n": [123456, 41152], "sn": 30000, "srm": "OK",
        "m": [
            {"k": f"metric_{j}", "e": 1.0312, "l": 0.98123, "u": 1.0945, "tol": 1.1,
             "v": "UNKNOWN", "n": [123456, 41152]}
            for j in range(5)
        ],
    }  # fmt: skip
    size = len(json.dumps(point, separators=(",", ":"))) * len(times)
    assert size < 600_000
