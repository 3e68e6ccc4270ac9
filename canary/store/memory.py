"""In-process store: the semantics of the SQLite store without a file (tests, one-shot runs)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from canary.errors import FencedError, StoreError
from canary.observe import RolloutAccumulator
from canary.store._protocol import (
    DEFAULT_MAX_DECISIONS,
    Lease,
    check_lease_request,
    check_limit,
    check_max_decisions,
    decode,
    encode,
)


class MemoryStore:
    """A :class:`~canary.store.Store` held in dicts; everything is lost on close.

    State and decisions are kept as JSON text, so they are validated and copied exactly as
    the SQLite store does it (tuples come back as lists, ``nan`` is refused).

    Parameters
    ----------
    max_decisions
        Decision log entries kept per rollout; older ones are dropped.
    clock
        Unix seconds, for the lease's expiry (a manual clock in tests).
    """

    def __init__(
        self,
        *,
        max_decisions: int = DEFAULT_MAX_DECISIONS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_max_decisions(max_decisions)
        self.max_decisions = max_decisions
        self._clock = clock
        self._lease: Lease | None = None
        self._last_token = 0
        self._opened = False
        self._closed = False
        self._state: dict[str, str] = {}
        self._samples: dict[str, RolloutAccumulator] = {}
        self._decisions: dict[str, deque[str]] = {}

    def __repr__(self) -> str:
        return f"MemoryStore(max_decisions={self.max_decisions})"

    def _check(self) -> None:
        if self._closed:
            raise StoreError("memory state store is closed")
        if not self._opened:
            raise StoreError("memory state store is not open; call open() first")

    async def open(self) -> None:
        if self._closed:
            raise StoreError("memory state store is closed")
        self._opened = True

    async def close(self) -> None:
        self._closed = True
        self._state.clear()
        self._samples.clear()
        self._decisions.clear()

    async def get_state(self, rollout: str) -> dict[str, Any] | None:
        self._check()
        text = self._state.get(rollout)
        return None if text is None else decode(text, f"state of rollout {rollout!r}")

    async def put_state(
        self, rollout: str, state: dict[str, Any], *, fence: int | None = None
    ) -> None:
        self._check()
        text = encode(state, f"state of rollout {rollout!r}")
        self._fenced(fence, f"state of rollout {rollout!r}")
        self._state[rollout] = text

    async def add_samples(self, rollout: str, delta: RolloutAccumulator) -> None:
        self._check()
        mine = self._samples.get(rollout)
        if mine is None:
            self._samples[rollout] = delta.snapshot()
            return
        if delta.accuracy != mine.accuracy:
            raise StoreError(
                f"cannot add samples to rollout {rollout!r}: cannot merge accumulators of"
                f" accuracy {delta.accuracy} into {mine.accuracy}"
            )
        # One arm per turn of the event loop: each merge blocks it (copies what it takes).
        mine.production.merge(delta.production)
        await asyncio.sleep(0)
        mine.candidate.merge(delta.candidate)

    async def get_samples(self, rollout: str) -> RolloutAccumulator | None:
        self._check()
        mine = self._samples.get(rollout)
        return None if mine is None else mine.snapshot()

    async def append_decision(
        self, rollout: str, entry: dict[str, Any], *, fence: int | None = None
    ) -> None:
        self._check()
        text = encode(entry, f"decision of rollout {rollout!r}")
        self._fenced(fence, f"decision of rollout {rollout!r}")
        log = self._decisions.get(rollout)
        if log is None:
            log = self._decisions[rollout] = deque(maxlen=self.max_decisions)
        log.append(text)

    async def decisions(self, rollout: str, limit: int = 100) -> list[dict[str, Any]]:
        check_limit(limit)
        self._check()
        log = self._decisions.get(rollout, ())
        what = f"decision of rollout {rollout!r}"
        return [decode(t, what) for t in itertools.islice(log, max(0, len(log) - limit), None)]

    async def reset(self, rollout: str, *, fence: int | None = None) -> None:
        self._check()
        self._fenced(fence, f"reset of rollout {rollout!r}")
        self._state.pop(rollout, None)
        self._samples.pop(rollout, None)
        self._decisions.pop(rollout, None)

    async def rollouts(self) -> list[str]:
        self._check()
        return sorted(self._state.keys() | self._samples.keys() | self._decisions.keys())

    # -- the leadership lease ---------------------------------------------------------------

    def _running(self) -> Lease | None:
        lease = self._lease
        if lease is not None and lease.expires_at <= self._clock():
            lease = self._lease = None
        return lease

    def _fenced(self, fence: int | None, what: str) -> None:
        if fence is None:
            return
        lease = self._running()
        if lease is None or lease.token != fence:
            raise FencedError(
                f"refused to write the {what}: lease token {fence} is no longer the leader's"
            )

    async def acquire_lease(self, holder: str, ttl: float) -> int | None:
        self._check()
        check_lease_request(holder, ttl)
        lease, now = self._running(), self._clock()
        if lease is not None and lease.holder != holder:
            return None
        if lease is None:
            self._last_token += 1
            token = self._last_token
        else:
            token = lease.token
        self._lease = Lease(holder, token, now + ttl)
        return token

    async def release_lease(self, holder: str) -> None:
        self._check()
        lease = self._running()
        if lease is not None and lease.holder == holder:
            self._lease = None

    async def lease(self) -> Lease | None:
        self._check()
        return self._running()


__all__ = [
    "MemoryStore",
]
