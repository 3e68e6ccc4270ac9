"""In-process store: the semantics of the SQLite store without a file (tests, one-shot runs)."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Any

from canary.errors import StoreError
from canary.observe import RolloutAccumulator
from canary.store._protocol import (
    DEFAULT_MAX_DECISIONS,
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
    """

    def __init__(self, *, max_decisions: int = DEFAULT_MAX_DECISIONS) -> None:
        check_max_decisions(max_decisions)
        self.max_decisions = max_decisions
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

    async def put_state(self, rollout: str, state: dict[str, Any]) -> None:
        self._check()
        self._state[rollout] = encode(state, f"state of rollout {rollout!r}")

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

    async def append_decision(self, rollout: str, entry: dict[str, Any]) -> None:
        self._check()
        text = encode(entry, f"decision of rollout {rollout!r}")
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

    async def reset(self, rollout: str) -> None:
        self._check()
        self._state.pop(rollout, None)
        self._samples.pop(rollout, None)
        self._decisions.pop(rollout, None)

    async def rollouts(self) -> list[str]:
        self._check()
        return sorted(self._state.keys() | self._samples.keys() | self._decisions.keys())


__all__ = [
    "MemoryStore",
]
