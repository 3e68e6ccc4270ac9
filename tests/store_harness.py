"""``make_store``: unopened stores of one backend (memory, SQLite, a real Redis) standing for
several canary processes on one shared store: memory "clients" share the one object, SQLite
clients open one file, Redis clients connect to one ``redis-server`` (tests/redis_harness.py).
Every store made is closed at the end. Import ``shared_store_factory`` into a test module to
use the fixture."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from canary.store import MemoryStore, RedisStore, SQLiteStore, Store

MakeStore = Callable[[], Store]


@pytest.fixture(name="make_store", params=["memory", "sqlite", "redis"])
async def shared_store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[MakeStore]:
    made: list[Store] = []
    backend = request.param
    url = request.getfixturevalue("redis_server").url if backend == "redis" else None
    memory = MemoryStore()  # memory "clients" share the one object

    def make() -> Store:
        store: Store
        if backend == "memory":
            store = memory
        elif url is not None:
            store = RedisStore(url)
        else:
            store = SQLiteStore(tmp_path / "state.db")
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


__all__ = ["MakeStore", "shared_store_factory"]
