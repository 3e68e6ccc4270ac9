"""The state stores of canary.store: one behaviour suite run against every backend."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canary.errors import StoreError
from canary.observe import Observation, RolloutAccumulator
from canary.store import MemoryStore, RedisStore, SQLiteStore, Store, open_store
from canary.store.sqlite import MIGRATIONS, SCHEMA_VERSION
from tests.redis_harness import RedisServer, running_redis

MakeStore = Callable[..., Store]


def _obs(
    arm: str = "candidate",
    *,
    latency: float = 0.02,
    error: str | None = None,
    status: int = 200,
    cost: float = 0.001,
) -> Observation:
    return Observation(
        rollout="r",
        arm=arm,
        propensity=0.05 if arm == "candidate" else 0.95,
        shadow=False,
        request_id="x",
        status=status,
        error=error,
        latency=latency,
        signals={"cost": cost},
    )


def _acc(*observations: Observation, accuracy: float | None = None) -> RolloutAccumulator:
    acc = RolloutAccumulator() if accuracy is None else RolloutAccumulator(accuracy)
    for obs in observations:
        acc.record(obs)
    return acc


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeStore]:
    """Build unopened stores of the parametrised backend (one sqlite file, one redis-server
    started for the test); close them all."""
    made: list[Store] = []
    server: RedisServer | None = (
        request.getfixturevalue("redis_server") if request.param == "redis" else None
    )

    def make(**kwargs: Any) -> Store:
        store: Store
        if request.param == "memory":
            store = MemoryStore(**kwargs)
        elif server is not None:
            store = RedisStore(server.url, **kwargs)
        else:
            store = SQLiteStore(tmp_path / "state.db", **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


@pytest.fixture
async def store(make_store: MakeStore) -> Store:
    opened = make_store()
    await opened.open()
    return opened


# -- factory ----------------------------------------------------------------------------------


async def test_open_store_builds_each_backend_without_opening(tmp_path: Path) -> None:
    memory = open_store("memory")
    assert isinstance(memory, MemoryStore) and isinstance(memory, Store)
    default = open_store("sqlite")
    assert isinstance(default, SQLiteStore) and default.path == "canary-state.db"
    path = tmp_path / "x.db"
    sqlite = open_store("sqlite", path=str(path))
    assert isinstance(sqlite, SQLiteStore) and isinstance(sqlite, Store)
    assert not path.exists()  # not opened
    redis = open_store("redis", url="redis://:secret@127.0.0.1:1/0")  # nothing listens there
    assert isinstance(redis, RedisStore) and isinstance(redis, Store)
    assert redis.url == "redis://:secret@127.0.0.1:1/0" and "secret" not in repr(redis)
    for made in (memory, default, sqlite, redis):
        await made.close()
    with pytest.raises(StoreError, match=r"'redis' needs state\.url"):
        open_store("redis")
    with pytest.raises(StoreError, match="unknown backend 'etcd'"):
        open_store("etcd")


# -- state ------------------------------------------------------------------------------------


async def test_state_round_trip_and_replace(store: Store) -> None:
    assert await store.get_state("r") is None
    state = {"phase": "progressing", "step": 2, "weights": [95.0, 5.0], "meta": {"a": None}}
    await store.put_state("r", state)
    assert await store.get_state("r") == state
    await store.put_state("r", {"phase": "promoted"})
    assert await store.get_state("r") == {"phase": "promoted"}  # replaced, not merged
    assert await store.get_state("other") is None


async def test_state_is_copied_in_and_out(store: Store) -> None:
    state: dict[str, Any] = {"weights": [95, 5], "nested": {"k": 1}}
    await store.put_state("r", state)
    state["weights"].append(0)
    state["nested"]["k"] = 2
    got = await store.get_state("r")
    assert got == {"weights": [95, 5], "nested": {"k": 1}}
    assert got is not None
    got["weights"].clear()
    assert await store.get_state("r") == {"weights": [95, 5], "nested": {"k": 1}}


@pytest.mark.parametrize("bad", [{"x": {1, 2}}, {"x": float("nan")}, {"x": float("inf")}])
async def test_state_must_be_json(store: Store, bad: dict[str, Any]) -> None:
    with pytest.raises(StoreError, match=r"state of rollout 'r'.*not JSON-serialisable"):
        await store.put_state("r", bad)
    assert await store.get_state("r") is None


# -- samples ----------------------------------------------------------------------------------


async def test_add_samples_merges_like_a_local_merge(store: Store) -> None:
    a = _acc(_obs(), _obs(latency=0.5), _obs("production", cost=0.002))
    b = _acc(_obs(error="timeout", status=0), _obs("production", status=503, error="status"))
    assert await store.get_samples("r") is None
    await store.add_samples("r", a)
    await store.add_samples("r", b)
    expected = a.snapshot()
    expected.merge(b)
    got = await store.get_samples("r")
    assert got is not None
    assert got.to_dict() == expected.to_dict()
    assert got.candidate.observed == 3 and got.production.errors == 1
    assert await store.get_samples("other") is None


async def test_samples_are_copied_in_and_out(store: Store) -> None:
    delta = _acc(_obs())
    await store.add_samples("r", delta)
    before = delta.to_dict()
    delta.record(_obs())  # the caller keeps using its delta
    got = await store.get_samples("r")
    assert got is not None and got.to_dict() == before
    got.record(_obs())
    again = await store.get_samples("r")
    assert again is not None and again.to_dict() == before
    await store.add_samples("r", _acc(_obs()))  # merging must not touch the returned copies
    assert again.to_dict() == before


async def test_add_samples_of_another_accuracy_is_refused(store: Store) -> None:
    await store.add_samples("r", _acc(_obs()))
    with pytest.raises(StoreError, match=r"rollout 'r'.*accuracy"):
        await store.add_samples("r", _acc(_obs(), accuracy=0.05))
    got = await store.get_samples("r")
    assert got is not None and got.candidate.observed == 1


# -- decisions --------------------------------------------------------------------------------


async def test_decisions_oldest_first_and_limited(store: Store) -> None:
    assert await store.decisions("r") == []
    for i in range(5):
        await store.append_decision("r", {"i": i, "action": "continue"})
    assert [d["i"] for d in await store.decisions("r")] == [0, 1, 2, 3, 4]
    assert [d["i"] for d in await store.decisions("r", limit=2)] == [3, 4]
    assert await store.decisions("r", limit=0) == []
    with pytest.raises(ValueError, match="limit must be >= 0, got -1"):
        await store.decisions("r", limit=-1)
    got = await store.decisions("r")
    got[0]["i"] = 99
    assert (await store.decisions("r"))[0]["i"] == 0


async def test_decision_log_is_bounded_per_rollout(make_store: MakeStore) -> None:
    store = make_store(max_decisions=5)
    await store.open()
    for i in range(12):
        await store.append_decision("r", {"i": i})
        if i < 3:  # interleaved, so ids of the two rollouts are not contiguous
            await store.append_decision("b", {"i": i})
    assert [d["i"] for d in await store.decisions("r", limit=100)] == [7, 8, 9, 10, 11]
    assert [d["i"] for d in await store.decisions("b", limit=100)] == [0, 1, 2]


def test_max_decisions_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_decisions must be >= 1, got 0"):
        MemoryStore(max_decisions=0)
    with pytest.raises(ValueError, match="max_decisions must be >= 1, got 0"):
        SQLiteStore(tmp_path / "s.db", max_decisions=0)
    with pytest.raises(ValueError, match="max_decisions must be >= 1, got 0"):
        RedisStore("redis://127.0.0.1:1/0", max_decisions=0)


async def test_decision_must_be_json(store: Store) -> None:
    with pytest.raises(StoreError, match=r"decision of rollout 'r'.*not JSON-serialisable"):
        await store.append_decision("r", {"at": object()})
    assert await store.decisions("r") == []


# -- rollouts and reset -----------------------------------------------------------------------


async def test_rollouts_lists_every_name_with_anything_stored(store: Store) -> None:
    assert await store.rollouts() == []
    await store.put_state("zeta", {})
    await store.add_samples("alpha", _acc(_obs()))
    await store.append_decision("mid", {"action": "continue"})
    await store.put_state("alpha", {"phase": "x"})
    assert await store.rollouts() == ["alpha", "mid", "zeta"]


async def test_reset_forgets_one_rollout(store: Store) -> None:
    for name in ("a", "b"):
        await store.put_state(name, {"phase": "progressing"})
        await store.add_samples(name, _acc(_obs()))
        await store.append_decision(name, {"action": "continue"})
    await store.reset("a")
    await store.reset("never-existed")
    assert await store.get_state("a") is None
    assert await store.get_samples("a") is None
    assert await store.decisions("a") == []
    assert await store.rollouts() == ["b"]
    assert await store.get_state("b") == {"phase": "progressing"}
    assert len(await store.decisions("b")) == 1
    # A new rollout of the same name starts from nothing.
    await store.add_samples("a", _acc(_obs()))
    got = await store.get_samples("a")
    assert got is not None and got.candidate.observed == 1


# -- lifecycle --------------------------------------------------------------------------------


async def test_calls_need_an_open_store_and_fail_after_close(make_store: MakeStore) -> None:
    store = make_store()
    with pytest.raises(StoreError, match="not open"):
        await store.get_state("r")
    await store.open()
    await store.open()  # idempotent
    await store.put_state("r", {})
    await store.close()
    await store.close()  # twice is fine
    with pytest.raises(StoreError, match="closed"):
        await store.get_state("r")
    with pytest.raises(StoreError, match="closed"):
        await store.add_samples("r", _acc(_obs()))
    with pytest.raises(StoreError, match="closed"):
        await store.open()


# -- sqlite only ------------------------------------------------------------------------------


async def test_sqlite_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = SQLiteStore(path)
    await first.open()
    await first.put_state("r", {"phase": "progressing", "step": 1})
    await first.add_samples("r", _acc(_obs(), _obs("production")))
    await first.append_decision("r", {"action": "advance"})
    await first.close()

    second = SQLiteStore(str(path))
    await second.open()
    try:
        assert await second.get_state("r") == {"phase": "progressing", "step": 1}
        got = await second.get_samples("r")
        assert got is not None
        assert got.to_dict() == _acc(_obs(), _obs("production")).to_dict()
        assert await second.decisions("r") == [{"action": "advance"}]
        assert await second.rollouts() == ["r"]
    finally:
        await second.close()

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_sqlite_migrates_a_version_1_file_keeping_its_rollouts(tmp_path: Path) -> None:
    """A file written before the leadership lease existed (schema 1) gains the lease table."""
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO state VALUES ('r', '{\"step\": 3}', 0)")
    conn.commit()
    conn.close()
    store = SQLiteStore(path)
    await store.open()
    try:
        assert await store.get_state("r") == {"step": 3}
        assert await store.lease() is None
        assert await store.acquire_lease("a", 5.0) == 1
    finally:
        await store.close()


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    store = SQLiteStore(path)
    newer = rf"schema version {SCHEMA_VERSION + 1} is newer than .* \({SCHEMA_VERSION}\)"
    with pytest.raises(StoreError, match=newer + "; upgrade canary"):
        await store.open()
    await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1  # as it was
    conn.close()


async def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a sqlite database, just text " * 100)
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match=r"garbage\.db.*not a database"):
        await store.open()
    await store.close()


async def test_sqlite_refuses_a_foreign_database_with_our_table_names(tmp_path: Path) -> None:
    path = tmp_path / "foreign.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE state (x)")
    conn.close()
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match=r"foreign\.db.*already exists"):
        await store.open()
    await store.close()


async def test_sqlite_needs_an_existing_directory(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "state.db"
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match=r"missing.*does not exist"):
        await store.open()
    await store.close()
    assert not path.parent.exists()


async def test_sqlite_reports_corrupt_rows(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    await store.open()
    try:
        await store.put_state("r", {})
        await store.add_samples("r", _acc(_obs()))
        conn = sqlite3.connect(path)
        conn.execute("UPDATE state SET data = '{not json'")
        conn.execute("UPDATE samples SET data = '{\"version\": 1}'")
        conn.commit()
        conn.close()
        with pytest.raises(StoreError, match=r"corrupt state of rollout 'r' in .*state\.db"):
            await store.get_state("r")
        with pytest.raises(StoreError, match="corrupt samples of rollout 'r'"):
            await store.get_samples("r")
        with pytest.raises(StoreError, match="corrupt samples of rollout 'r'"):
            await store.add_samples("r", _acc(_obs()))
    finally:
        await store.close()


async def test_sqlite_two_stores_on_one_file_lose_no_delta(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    one, two = SQLiteStore(path), SQLiteStore(path)
    await asyncio.gather(one.open(), two.open())
    try:
        small, big = _acc(_obs()), _acc(_obs(), _obs("production"), _obs("production"))
        await asyncio.gather(
            *(one.add_samples("r", small) for _ in range(60)),
            *(two.add_samples("r", big) for _ in range(60)),
        )
        for store in (one, two):
            got = await store.get_samples("r")
            assert got is not None
            assert got.candidate.observed == 60 + 60
            assert got.production.observed == 2 * 60
            assert got.candidate.signals["cost"].hist.count == 120
    finally:
        await asyncio.gather(one.close(), two.close())


async def test_sqlite_waits_for_a_lock_without_blocking_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        add = asyncio.create_task(store.add_samples("r", _acc(_obs())))
        ticks = 0
        for _ in range(10):
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 10 and not add.done()
        other.execute("COMMIT")
        await asyncio.wait_for(add, 5)
        got = await store.get_samples("r")
        assert got is not None and got.candidate.observed == 1
    finally:
        other.close()
        await store.close()


# -- both backends agree ----------------------------------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from("ab"), st.integers(0, 9)),
        st.tuples(st.just("add"), st.sampled_from("ab"), st.integers(0, 3)),
        st.tuples(st.just("decide"), st.sampled_from("ab"), st.integers(0, 9)),
        st.tuples(st.just("reset"), st.sampled_from("ab"), st.just(0)),
    ),
    max_size=20,
)


async def _apply(store: Store, ops: list[tuple[str, str, int]]) -> list[Any]:
    await store.open()
    try:
        for op, name, n in ops:
            if op == "put":
                await store.put_state(name, {"step": n})
            elif op == "add":
                await store.add_samples(
                    name, _acc(*[_obs(latency=0.01 * (i + 1)) for i in range(n)])
                )
            elif op == "decide":
                await store.append_decision(name, {"n": n})
            else:
                await store.reset(name)
        seen: list[Any] = [await store.rollouts()]
        for name in "ab":
            samples = await store.get_samples(name)
            seen += [
                await store.get_state(name),
                None if samples is None else samples.to_dict(),
                await store.decisions(name, limit=3),
            ]
        return seen
    finally:
        await store.close()


@settings(max_examples=25, deadline=None)
@given(ops=_ops)
def test_memory_and_sqlite_agree(ops: list[tuple[str, str, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = SQLiteStore(Path(tmp) / "s.db", max_decisions=4)
        memory = MemoryStore(max_decisions=4)
        assert asyncio.run(_apply(sqlite, ops)) == asyncio.run(_apply(memory, ops))


@settings(max_examples=25, deadline=None)
@given(ops=_ops)
def test_memory_and_redis_agree(ops: list[tuple[str, str, int]]) -> None:
    with running_redis() as server:  # one server per example: hypothesis and fixtures
        redis = RedisStore(server.url, max_decisions=4)
        memory = MemoryStore(max_decisions=4)
        assert asyncio.run(_apply(redis, ops)) == asyncio.run(_apply(memory, ops))
