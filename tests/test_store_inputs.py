"""The shared input-health entries of every store backend (memory, sqlite, redis).

Each process writes its absolute input counts under (rollout, process): a write replaces
that process's entry (a retry never counts twice), entries of processes that stopped stay,
at most ``keep`` per rollout (the oldest written go), and ``drop_input_health`` forgets some
or all of them. Two clients of one SQLite file or one Redis see each other's entries.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from canary.errors import StoreError
from canary.store import SQLiteStore
from canary.store.sqlite import MIGRATIONS, SCHEMA_VERSION
from tests.store_harness import MakeStore, shared_store_factory  # noqa: F401  (make_store)


def _entry(n: int, **extra: Any) -> dict[str, Any]:
    return {"fingerprint": "f", "seq": n, "health": {"requests": [n, 0, 0, 0]}, **extra}


async def test_entries_are_replaced_per_process_and_shared_between_clients(
    make_store: MakeStore,
) -> None:
    a, b = make_store(), make_store()
    await a.open()
    await b.open()
    assert await a.input_health("m") == {}
    await a.put_input_health("m", "p1", _entry(1))
    await b.put_input_health("m", "p2", _entry(2))
    await a.put_input_health("m", "p1", _entry(3))  # replaces p1's entry
    await a.put_input_health("m", "p1", _entry(3))  # a retry: still one entry
    await b.put_input_health("other", "p1", _entry(9))
    got = await b.input_health("m")
    assert got == {"p1": _entry(3), "p2": _entry(2)}
    got["p1"]["seq"] = 99  # a copy: the store is not aliased
    assert (await a.input_health("m"))["p1"] == _entry(3)
    assert await a.input_health("other") == {"p1": _entry(9)}

    await a.drop_input_health("m", ["p2", "nobody"])
    assert set(await b.input_health("m")) == {"p1"}
    await a.drop_input_health("m", [])
    assert set(await b.input_health("m")) == {"p1"}
    await b.drop_input_health("m")
    assert await a.input_health("m") == {}
    assert await a.input_health("other") == {"p1": _entry(9)}  # other rollouts stay


async def test_at_most_keep_entries_stay_the_oldest_written_go(make_store: MakeStore) -> None:
    store = make_store()
    await store.open()
    for i in range(5):
        await store.put_input_health("m", f"p{i}", _entry(i), keep=3)
    assert set(await store.input_health("m")) == {"p2", "p3", "p4"}
    await store.put_input_health("m", "p2", _entry(7), keep=3)  # rewritten: now the newest
    await store.put_input_health("m", "p5", _entry(5), keep=3)
    assert set(await store.input_health("m")) == {"p2", "p4", "p5"}
    with pytest.raises(ValueError):
        await store.put_input_health("m", "p", _entry(1), keep=0)


async def test_bad_entries_and_closed_stores_raise_store_errors(make_store: MakeStore) -> None:
    store = make_store()
    await store.open()
    with pytest.raises(StoreError):
        await store.put_input_health("m", "p", {"x": math.nan})
    with pytest.raises(StoreError):
        await store.put_input_health("m", "p", {"x": object()})
    assert await store.input_health("m") == {}
    await store.close()
    for call in (
        store.put_input_health("m", "p", _entry(1)),
        store.input_health("m"),
        store.drop_input_health("m"),
    ):
        with pytest.raises(StoreError):
            await call


async def test_sqlite_keeps_entries_across_reopen_and_migrates_an_older_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    await store.open()
    await store.put_input_health("m", "p1", _entry(1))
    await store.close()
    reopened = SQLiteStore(path)
    await reopened.open()
    try:
        assert await reopened.input_health("m") == {"p1": _entry(1)}
    finally:
        await reopened.close()
    # A file of the schema before the input_health table: opening it adds the table.
    mine = next(i for i, m in enumerate(MIGRATIONS) if any("input_health" in q for q in m))
    path = tmp_path / "older.db"
    conn = sqlite3.connect(path)
    for version in range(mine):
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {mine}")
    conn.commit()
    conn.close()
    again = SQLiteStore(path)
    await again.open()
    try:
        assert await again.input_health("m") == {}
        await again.put_input_health("m", "p1", _entry(2))
        assert await again.input_health("m") == {"p1": _entry(2)}
    finally:
        await again.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
