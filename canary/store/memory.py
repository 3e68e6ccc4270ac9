"""In-process store: the semantics of the SQLite store without a file (tests, one-shot runs)."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from canary.errors import FencedError, StoreError
from canary.observe import RolloutAccumulator
from canary.store._history import DEFAULT_MAX_HISTORY, check_max_points, thin
from canary.store._protocol import (
    CLAIMED,
    DEFAULT_MAX_DECISIONS,
    DEFAULT_MAX_INPUT_PROCESSES,
    EXPIRED,
    MARKED,
    TAKEN,
    UNMET,
    AnswerClaim,
    ClaimResult,
    Lease,
    StoredAnswer,
    check_answers,
    check_claims,
    check_keep,
    check_lease_request,
    check_limit,
    check_max_decisions,
    decode,
    encode,
    meets,
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
        self._inputs: dict[str, dict[str, str]] = {}  # rollout -> process -> entry (JSON)
        self._answers: dict[str, dict[str, _Kept]] = {}  # shared feedback: rollout -> id -> kept
        # metric history: rollout -> [(at, append number, keep, point JSON)], sorted
        self._history: dict[str, list[tuple[float, int, bool, str]]] = {}
        self._history_seq = itertools.count()

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
        self._inputs.clear()
        self._answers.clear()
        self._history.clear()

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

    async def add_samples(
        self, rollout: str, delta: RolloutAccumulator, *, batch: tuple[str, int] | None = None
    ) -> None:
        self._check()  # ``batch``: an answer in this process is never lost
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
        self._history.pop(rollout, None)

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

    # -- shared input health --

    async def put_input_health(
        self,
        rollout: str,
        process: str,
        entry: dict[str, Any],
        *,
        keep: int = DEFAULT_MAX_INPUT_PROCESSES,
    ) -> None:
        check_keep(keep)
        self._check()
        text = encode(entry, f"input health of rollout {rollout!r}")
        entries = self._inputs.get(rollout)
        if entries is None:
            entries = self._inputs[rollout] = {}
        entries.pop(process, None)  # re-inserted last: the dict's order is the write order
        entries[process] = text
        while len(entries) > keep:
            del entries[next(iter(entries))]

    async def input_health(self, rollout: str) -> dict[str, dict[str, Any]]:
        self._check()
        what = f"input health of rollout {rollout!r}"
        return {p: decode(t, what) for p, t in self._inputs.get(rollout, {}).items()}

    async def drop_input_health(self, rollout: str, processes: Sequence[str] | None = None) -> None:
        self._check()
        if processes is None:
            self._inputs.pop(rollout, None)
            return
        entries = self._inputs.get(rollout, {})
        for process in processes:
            entries.pop(process, None)

    # -- shared feedback answers --

    async def put_answers(
        self,
        rollout: str,
        answers: Sequence[StoredAnswer],
        *,
        ttl: float,
        max_entries: int,
        now: float | None = None,
    ) -> None:
        check_answers(ttl, max_entries)
        self._check()
        book = self._answers.setdefault(rollout, {})
        for a in answers:
            kept = book.get(a.request_id)
            if kept is None or not kept.claimed:
                book[a.request_id] = _Kept(a.at, a.data, a.seen, a.predicted, "")
        cutoff = (self._clock() if now is None else now) - 2 * ttl
        old = [rid for rid, kept in book.items() if kept.at <= cutoff]
        extra = len(book) - len(old) - max_entries
        if extra > 0:  # the oldest of the rest (rare: only a full store sorts)
            rest = sorted((k.at, rid) for rid, k in book.items() if k.at > cutoff)
            old.extend(rid for _, rid in rest[:extra])
        for rid in old:
            del book[rid]

    async def claim_answers(
        self,
        rollouts: Mapping[str, float],
        claims: Sequence[AnswerClaim],
        *,
        now: float | None = None,
    ) -> list[ClaimResult | None]:
        check_claims(rollouts, claims)
        self._check()
        when = self._clock() if now is None else now
        out: list[ClaimResult | None] = []
        for claim in claims:
            result: ClaimResult | None = None
            for name, ttl in rollouts.items():
                kept = self._answers.get(name, {}).get(claim.request_id)
                if kept is not None:
                    result = kept.claim(name, claim, ttl, when)
                    break
            if result is None and claim.local is not None:
                name, at = claim.local
                book = self._answers.setdefault(name, {})
                book[claim.request_id] = _Kept(at, None, False, False, claim.token)
                result = ClaimResult(name, MARKED, at, None)
            out.append(result)
        return out

    # -- metric history --

    async def append_history(
        self,
        rollout: str,
        point: dict[str, Any],
        *,
        at: float,
        keep: bool = False,
        max_points: int = DEFAULT_MAX_HISTORY,
        fence: int | None = None,
    ) -> None:
        check_max_points(max_points)
        self._check()
        text = encode(point, f"history of rollout {rollout!r}")
        when = float(at)
        if not math.isfinite(when):
            raise StoreError(f"cannot store history of rollout {rollout!r}: time {at!r}")
        self._fenced(fence, f"history of rollout {rollout!r}")
        points = self._history.setdefault(rollout, [])
        bisect.insort(points, (when, next(self._history_seq), keep, text))
        if len(points) > max_points:
            drop = set(thin([p[0] for p in points], [p[2] for p in points], max_points))
            points[:] = [p for i, p in enumerate(points) if i not in drop]

    async def history(self, rollout: str, since: float | None = None) -> list[dict[str, Any]]:
        self._check()
        what = f"history of rollout {rollout!r}"
        points = self._history.get(rollout, [])
        start = 0 if since is None else bisect.bisect_right(points, (float(since), math.inf))
        return [decode(p[3], what) for p in points[start:]]


class _Kept:
    """One request id's answers in a :class:`MemoryStore` (shared feedback)."""

    __slots__ = ("at", "claimed", "data", "predicted", "seen")

    def __init__(
        self, at: float, data: str | None, seen: bool, predicted: bool, claimed: str
    ) -> None:
        self.at, self.data, self.seen, self.predicted = at, data, seen, predicted
        self.claimed = claimed  # the claim's token ("" = not claimed)

    def claim(self, rollout: str, claim: AnswerClaim, ttl: float, now: float) -> ClaimResult:
        if self.claimed:
            if self.claimed != claim.token:
                return ClaimResult(rollout, TAKEN, self.at, None)
            return ClaimResult(
                rollout, MARKED if self.data is None else CLAIMED, self.at, self.data
            )
        if self.at + ttl <= now:
            return ClaimResult(rollout, EXPIRED, self.at, None)
        if not meets(claim.need, self.seen, self.predicted):
            return ClaimResult(rollout, UNMET, self.at, self.data)
        self.claimed = claim.token
        return ClaimResult(rollout, CLAIMED, self.at, self.data)


__all__ = [
    "MemoryStore",
]
