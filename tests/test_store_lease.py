"""The leadership lease and fenced writes of every store backend (memory, sqlite, redis).

One leader at a time is what keeps N replicas from taking N decisions: these tests pin the
lease's contract (take, renew with the same token, refuse a second holder until expiry, hand
over at once on release, tokens only grow) and fencing (a write carrying a stale token writes
nothing and raises FencedError). TTLs are a few tenths of a second on the real clock: the
Redis lease expires by Redis's own clock, which no test can move.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from canary.errors import FencedError, StoreError
from canary.observe import Observation, RolloutAccumulator
from canary.store import MemoryStore, RedisStore, SQLiteStore, Store
from tests.redis_harness import RedisServer

MakeStore = Callable[..., Store]
TTL = 0.3


async def _made(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[MakeStore]:
    """Build opened-later stores of one backend that share its data (one sqlite file, one
    redis-server; memory stores share nothing)."""
    made: list[Store] = []
    server: RedisServer | None = (
        request.getfixturevalue("redis_server") if backend == "redis" else None
    )

    def make(**kwargs: Any) -> Store:
        store: Store
        if backend == "memory":
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


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeStore]:
    async for make in _made(request.param, request, tmp_path):
        yield make


@pytest.fixture(params=["sqlite", "redis"])
async def make_shared_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[MakeStore]:
    """The backends whose clients share data (two processes, or a restarted one)."""
    async for make in _made(request.param, request, tmp_path):
        yield make


@pytest.fixture
async def store(make_store: MakeStore) -> Store:
    opened = make_store()
    await opened.open()
    return opened


def _shares_data(store: Store) -> bool:
    return not isinstance(store, MemoryStore)


async def _wait_for_lease(store: Store, holder: str, ttl: float, within: float) -> int:
    """Poll ``acquire_lease`` until ``holder`` gets the lease; its token."""
    deadline = time.monotonic() + within
    while (token := await store.acquire_lease(holder, ttl)) is None:
        assert time.monotonic() < deadline, f"{holder} did not get the lease in {within}s"
        await asyncio.sleep(0.01)
    return token


def _acc() -> RolloutAccumulator:
    acc = RolloutAccumulator()
    acc.record(
        Observation(
            rollout="r",
            arm="candidate",
            propensity=0.05,
            shadow=False,
            request_id="x",
            status=200,
            error=None,
            latency=0.02,
            signals={},
        )
    )
    return acc


# -- the lease --------------------------------------------------------------------------------


async def test_no_lease_until_one_is_taken(store: Store) -> None:
    assert await store.lease() is None


async def test_acquire_renew_keeps_the_token(store: Store) -> None:
    before = time.time()
    token = await store.acquire_lease("a", TTL)
    assert isinstance(token, int)
    lease = await store.lease()
    assert lease is not None
    assert (lease.holder, lease.token) == ("a", token)
    # expires_at is by the store's clock (Redis's TIME): the same machine's clock here.
    assert before + TTL - 0.05 <= lease.expires_at <= time.time() + TTL + 0.05
    for _ in range(4):  # renewing well inside the TTL each time, past the first TTL in all
        await asyncio.sleep(TTL / 2)
        assert await store.acquire_lease("a", 2 * TTL) == token
    assert await store.acquire_lease("b", TTL) is None  # still held: renewals extended it
    renewed = await store.lease()
    assert renewed is not None and renewed.token == token
    assert renewed.expires_at > lease.expires_at


async def test_second_holder_waits_for_expiry_and_gets_a_higher_token(store: Store) -> None:
    started = time.monotonic()
    first = await store.acquire_lease("a", TTL)
    assert first is not None
    assert await store.acquire_lease("b", TTL) is None
    second = await _wait_for_lease(store, "b", TTL, within=5)
    assert time.monotonic() - started >= TTL - 0.02  # not before the first lease ran out
    assert second > first
    lease = await store.lease()
    assert lease is not None and (lease.holder, lease.token) == ("b", second)
    assert await store.acquire_lease("a", TTL) is None  # the old holder is refused now
    # The old holder coming back after b's lease ran out is a change of holder: higher again.
    third = await _wait_for_lease(store, "a", TTL, within=5)
    assert third > second


async def test_an_expired_lease_is_gone(store: Store) -> None:
    assert await store.acquire_lease("a", 0.1) is not None
    await asyncio.sleep(0.3)
    assert await store.lease() is None


async def test_release_hands_over_at_once(store: Store) -> None:
    first = await store.acquire_lease("a", 30)
    assert first is not None
    await store.release_lease("b")  # not b's: nothing happens
    assert await store.acquire_lease("b", 30) is None
    await store.release_lease("a")
    assert await store.lease() is None
    second = await store.acquire_lease("b", 30)
    assert second is not None and second > first
    await store.release_lease("a")  # a released already: b keeps it
    lease = await store.lease()
    assert lease is not None and lease.holder == "b"
    await store.release_lease("nobody")


async def test_the_same_holder_after_release_gets_a_new_token(store: Store) -> None:
    first = await store.acquire_lease("a", 30)
    await store.release_lease("a")
    second = await store.acquire_lease("a", 30)
    assert first is not None and second is not None and second > first


async def test_bad_lease_requests_are_refused(store: Store) -> None:
    for holder, ttl in (("", 1.0), ("a", 0.0), ("a", -1.0), ("a", float("nan"))):
        with pytest.raises(StoreError):
            await store.acquire_lease(holder, ttl)
    assert await store.lease() is None


async def test_lease_calls_need_an_open_store(make_store: MakeStore) -> None:
    store = make_store()
    with pytest.raises(StoreError, match="not open"):
        await store.acquire_lease("a", TTL)
    await store.open()
    assert await store.acquire_lease("a", TTL) is not None
    await store.close()
    for call in (store.acquire_lease("a", TTL), store.release_lease("a"), store.lease()):
        with pytest.raises(StoreError, match="closed"):
            await call


# -- several clients of one backend -----------------------------------------------------------


async def test_one_of_several_clients_gets_the_lease(make_store: MakeStore) -> None:
    first = make_store()
    await first.open()
    if not _shares_data(first):
        holders = [first] * 4  # memory: one store, four holders
    else:
        holders = [first, *[make_store() for _ in range(3)]]
        await asyncio.gather(*(s.open() for s in holders[1:]))
    tokens = await asyncio.gather(*(s.acquire_lease(f"h{i}", 30) for i, s in enumerate(holders)))
    winners = [i for i, token in enumerate(tokens) if token is not None]
    assert len(winners) == 1, tokens
    lease = await holders[-1].lease()
    assert lease is not None
    assert (lease.holder, lease.token) == (f"h{winners[0]}", tokens[winners[0]])


async def test_tokens_survive_the_clients(make_shared_store: MakeStore) -> None:
    """The token counter lives in the store: a restarted canary never gets an old token."""
    make_store = make_shared_store
    old = make_store()
    await old.open()
    first = await old.acquire_lease("a", 30)
    await old.release_lease("a")
    await old.close()
    new = make_store()
    await new.open()
    second = await new.acquire_lease("a", 30)
    assert first is not None and second is not None and second > first


# -- fencing ----------------------------------------------------------------------------------


async def test_writes_with_the_running_token_and_without_a_fence_go_through(
    store: Store,
) -> None:
    token = await store.acquire_lease("a", 30)
    assert token is not None
    await store.put_state("r", {"step": 1}, fence=token)
    await store.append_decision("r", {"action": "advance"}, fence=token)
    await store.put_state("r", {"step": 2})  # unfenced: always written
    await store.append_decision("r", {"action": "hold"})
    assert await store.get_state("r") == {"step": 2}
    assert await store.decisions("r") == [{"action": "advance"}, {"action": "hold"}]
    await store.reset("r", fence=token)
    assert await store.get_state("r") is None and await store.decisions("r") == []


async def test_a_stale_token_writes_nothing(store: Store) -> None:
    old = await store.acquire_lease("a", 1.0)  # long enough for its writes on a busy machine
    assert old is not None
    await store.put_state("r", {"step": 1}, fence=old)
    await store.append_decision("r", {"action": "advance"}, fence=old)
    await store.add_samples("r", _acc())
    new = await _wait_for_lease(store, "b", 30, within=5)  # a paused past its lease
    assert new > old

    with pytest.raises(FencedError, match=f"token {old}"):
        await store.put_state("r", {"step": 99}, fence=old)
    with pytest.raises(FencedError, match=f"token {old}"):
        await store.append_decision("r", {"action": "rollback"}, fence=old)
    with pytest.raises(FencedError, match=f"token {old}"):
        await store.reset("r", fence=old)
    with pytest.raises(FencedError):
        await store.put_state("r", {"step": 99}, fence=new + 1)  # a token never handed out
    assert issubclass(FencedError, StoreError)

    assert await store.get_state("r") == {"step": 1}
    assert await store.decisions("r") == [{"action": "advance"}]
    samples = await store.get_samples("r")
    assert samples is not None and samples.candidate.observed == 1
    assert await store.rollouts() == ["r"]

    await store.put_state("r", {"step": 2}, fence=new)  # the new leader writes
    assert await store.get_state("r") == {"step": 2}


async def test_a_fenced_write_after_the_lease_ran_out_is_refused(store: Store) -> None:
    token = await store.acquire_lease("a", 0.1)
    assert token is not None
    await asyncio.sleep(0.3)  # nobody took over, but the lease is over
    with pytest.raises(FencedError):
        await store.put_state("r", {"step": 1}, fence=token)
    with pytest.raises(FencedError):
        await store.append_decision("r", {"action": "advance"}, fence=token)
    assert await store.get_state("r") is None
    assert await store.decisions("r") == []
    assert await store.rollouts() == []


async def test_a_released_lease_fences_its_holder(store: Store) -> None:
    token = await store.acquire_lease("a", 30)
    assert token is not None
    await store.release_lease("a")
    with pytest.raises(FencedError):
        await store.append_decision("r", {"action": "advance"}, fence=token)
    assert await store.decisions("r") == []


async def test_fencing_is_checked_by_another_client(make_shared_store: MakeStore) -> None:
    """The check reads the store, not the writer's memory: two clients of one backend."""
    make_store = make_shared_store
    one = make_store()
    await one.open()
    two = make_store()
    await two.open()
    old = await one.acquire_lease("a", TTL)
    assert old is not None
    new = await _wait_for_lease(two, "b", 30, within=5)
    with pytest.raises(FencedError):
        await one.put_state("r", {"by": "a"}, fence=old)
    await two.put_state("r", {"by": "b"}, fence=new)
    assert await one.get_state("r") == {"by": "b"}
