"""Persistent rollout state behind one small Protocol: controller state, samples, decisions.

- :class:`Store`: the Protocol the runtime and the controller use.
- :class:`SQLiteStore`: the default; one file that survives restarts and is shared by the
  worker processes of one machine.
- :class:`MemoryStore`: the same semantics in dicts, for tests.
- :class:`RedisStore`: state shared by replicas on several machines, and their leader's lease.
- :func:`open_store`: build the store named by ``state.backend``.

Every failure is raised as :class:`canary.errors.StoreError`.
"""

from __future__ import annotations

from canary.errors import StoreError
from canary.store._protocol import (
    DEFAULT_MAX_DECISIONS,
    FileBackedStore,
    IdentifiedStore,
    Lease,
    Store,
    check_identity,
)
from canary.store.memory import MemoryStore
from canary.store.redis import RedisStore
from canary.store.sqlite import SQLiteStore

__all__ = [
    "DEFAULT_MAX_DECISIONS",
    "FileBackedStore",
    "IdentifiedStore",
    "Lease",
    "MemoryStore",
    "RedisStore",
    "SQLiteStore",
    "Store",
    "check_identity",
    "open_store",
]

DEFAULT_SQLITE_PATH = "canary-state.db"


def open_store(backend: str, *, path: str | None = None, url: str | None = None) -> Store:
    """Build (not open) the store for ``state.backend``.

    Parameters
    ----------
    backend
        ``"sqlite"``, ``"memory"`` or ``"redis"``.
    path
        The SQLite file; ``canary-state.db`` when None. Ignored by the other backends.
    url
        The Redis URL (``redis://HOST:PORT/DB``); required by ``"redis"``, ignored by the
        other backends.

    Returns
    -------
    Store
        A store on which the caller still has to ``await store.open()``.
    """
    if backend == "memory":
        return MemoryStore()
    if backend == "sqlite":
        return SQLiteStore(path or DEFAULT_SQLITE_PATH)
    if backend == "redis":
        if not url:
            raise StoreError("state.backend 'redis' needs state.url: redis://HOST:PORT/DB")
        return RedisStore(url)
    raise StoreError(
        f"state.backend: unknown backend {backend!r}; expected sqlite, memory or redis"
    )
