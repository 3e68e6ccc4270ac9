"""What only the Redis store has to get right: concurrent writers, outages, data loss, its URL.

The shared behaviour (state, samples, decisions, reset, lifecycle) is tests/test_store.py and
the lease is tests/test_store_lease.py, both run on Redis too. Every test here talks to a real
``redis-server`` started on a free loopback port (tests/redis_harness.py), and kills, pauses
or restarts it where the test is about that.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from canary.errors import FencedError, StoreError
from canary.observe import Observation, RolloutAccumulator
from canary.store import RedisStore, open_store
from canary.store.redis import redact_url
from tests.redis_harness import RedisServer, command, free_port


def _obs(arm: str = "candidate", latency: float = 0.02) -> Observation:
    return Observation(
        rollout="r",
        arm=arm,
        propensity=0.05 if arm == "candidate" else 0.95,
        shadow=False,
        request_id="x",
        status=200,
        error=None,
        latency=latency,
        signals={"cost": 0.001},
    )


def _acc(*observations: Observation) -> RolloutAccumulator:
    acc = RolloutAccumulator()
    for obs in observations:
        acc.record(obs)
    return acc


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    opened = RedisStore(redis_server.url, timeout=1.0, connect_timeout=1.0)
    await opened.open()
    yield opened
    await opened.close()


# -- several writers --------------------------------------------------------------------------


async def test_concurrent_clients_lose_no_delta_and_merge_none_twice(
    redis_server: RedisServer,
) -> None:
    """Four clients (four replicas' flushes) merge deltas at once: WATCH conflicts are
    retried, so the total is exactly the sum."""
    stores = [RedisStore(redis_server.url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        small = _acc(_obs())
        big = _acc(_obs(), _obs("production"), _obs("production", latency=0.5))
        rounds = 40
        await asyncio.gather(
            *(
                store.add_samples("r", small if i % 2 == 0 else big)
                for i, store in enumerate(stores)
                for _ in range(rounds)
            )
        )
        expected = RolloutAccumulator()
        for i in range(len(stores)):
            for _ in range(rounds):
                expected.merge(small if i % 2 == 0 else big)
        for store in stores:
            got = await store.get_samples("r")
            assert got is not None
            assert got.to_dict() == expected.to_dict()
            assert got.candidate.observed == 4 * rounds
            assert got.production.observed == 2 * 2 * rounds
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_reset_during_merges_is_not_undone(store: RedisStore) -> None:
    """A merge that read the samples before a reset must not write them back after it."""
    await store.add_samples("r", _acc(_obs()))
    merges = [asyncio.create_task(store.add_samples("r", _acc(_obs()))) for _ in range(20)]
    await asyncio.sleep(0)
    await store.reset("r")
    await asyncio.gather(*merges)
    got = await store.get_samples("r")
    assert got is not None
    assert got.candidate.observed <= 20  # the one before the reset is gone whatever the order


async def test_key_prefix_separates_deployments(redis_server: RedisServer) -> None:
    one = RedisStore(redis_server.url)
    two = RedisStore(redis_server.url, key_prefix="other:")
    await one.open()
    await two.open()
    try:
        await one.put_state("r", {"by": "one"})
        assert await two.get_state("r") is None
        assert await two.rollouts() == []
        token = await one.acquire_lease("a", 30)
        assert token is not None
        assert await two.acquire_lease("b", 30) is not None  # its own lease
        assert one.store_id != two.store_id
    finally:
        await one.close()
        await two.close()


async def test_concurrent_opens_connect_once(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    try:
        await asyncio.gather(store.open(), store.open(), store.open())
        await store.put_state("r", {"step": 1})
        assert await store.get_state("r") == {"step": 1}
        assert store.store_id is not None and await store.identity() == store.store_id
    finally:
        await store.close()


# -- Redis unreachable, killed, hung, restarted -----------------------------------------------


async def test_unreachable_redis_is_a_clear_store_error() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"  # nobody listens there
    store = RedisStore(url, connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert time.monotonic() - started < 3
    message = str(caught.value)
    assert "hunter2" not in message
    assert f"state store {redact_url(url)}: cannot connect (PING)" in message
    assert ":***@127.0.0.1" in message
    with pytest.raises(StoreError, match="not open"):
        await store.get_state("r")
    await store.close()


async def test_open_can_be_retried_once_redis_is_up(redis_server: RedisServer) -> None:
    redis_server.stop()
    store = RedisStore(redis_server.url, connect_timeout=1.0)
    with pytest.raises(StoreError, match="cannot connect"):
        await store.open()
    redis_server.start()
    await store.open()
    try:
        await store.put_state("r", {"step": 1})
        assert await store.get_state("r") == {"step": 1}
    finally:
        await store.close()


async def test_killed_redis_fails_every_call_fast_and_works_after_a_restart(
    redis_server: RedisServer, store: RedisStore
) -> None:
    await store.put_state("r", {"step": 1})
    in_flight = [asyncio.create_task(store.add_samples("r", _acc(_obs()))) for _ in range(20)]
    await asyncio.sleep(0)
    redis_server.stop()  # SIGKILL, mid-use
    results = await asyncio.wait_for(asyncio.gather(*in_flight, return_exceptions=True), 5)
    assert all(r is None or isinstance(r, StoreError) for r in results), results
    started = time.monotonic()
    for call in (
        store.get_state("r"),
        store.put_state("r", {"step": 2}),
        store.add_samples("r", _acc(_obs())),
        store.append_decision("r", {"action": "hold"}),
        store.decisions("r"),
        store.rollouts(),
        store.acquire_lease("a", 1.0),
        store.lease(),
    ):
        with pytest.raises(StoreError, match=rf"state store {redis_server.url}: cannot "):
            await asyncio.wait_for(call, 5)
    assert time.monotonic() - started < 5

    redis_server.start()  # same port, empty (no persistence)
    assert await store.get_state("r") is None  # the restart lost it; the store reconnects
    await store.put_state("r", {"step": 3})
    await store.add_samples("r", _acc(_obs()))
    await store.append_decision("r", {"action": "advance"})
    assert await store.get_state("r") == {"step": 3}
    assert await store.decisions("r") == [{"action": "advance"}]


async def test_hung_redis_times_out_instead_of_hanging(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, timeout=0.3, connect_timeout=0.3)
    await store.open()
    try:
        await store.put_state("r", {"step": 1})
        redis_server.pause()  # SIGSTOP: the connection is open, nothing answers
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match=r"cannot read state of rollout 'r': timed out"):
                await asyncio.wait_for(store.get_state("r"), 5)
            with pytest.raises(StoreError, match="timed out"):
                await asyncio.wait_for(store.append_decision("r", {"a": 1}), 5)
            assert time.monotonic() - started < 3
        finally:
            redis_server.resume()
        assert await store.get_state("r") == {"step": 1}
    finally:
        await store.close()


async def test_a_restart_empty_changes_the_identity_and_tokens_keep_growing(
    redis_server: RedisServer, store: RedisStore
) -> None:
    seen = store.store_id
    assert seen is not None and await store.identity() == seen
    other = RedisStore(redis_server.url)
    await other.open()
    assert other.store_id == seen  # one Redis, one id, whoever opened it first
    await other.close()

    token = await store.acquire_lease("a", 30)
    assert token is not None
    redis_server.restart()  # the lease, its counter and the id are gone
    assert await store.identity() is None  # a running process can tell
    with pytest.raises(FencedError):  # the old leader's token fences nothing in
        await store.put_state("r", {"step": 9}, fence=token)
    again = await store.acquire_lease("b", 30)
    assert again is not None and again > token  # the counter restarts from the clock

    reopened = RedisStore(redis_server.url)
    await reopened.open()
    try:
        assert reopened.store_id is not None and reopened.store_id != seen
    finally:
        await reopened.close()


# -- bad data and bad arguments ---------------------------------------------------------------


async def test_corrupt_values_are_store_errors(
    redis_server: RedisServer, store: RedisStore
) -> None:
    await store.put_state("r", {})
    await store.add_samples("r", _acc(_obs()))
    command(redis_server.port, "SET", "canary:state:r", "{not-json")
    command(redis_server.port, "SET", "canary:samples:r", '{"version":1}')
    command(redis_server.port, "RPUSH", "canary:decisions:r", "[1]")
    with pytest.raises(StoreError, match=r"corrupt state of rollout 'r' in redis://127\.0\.0\.1"):
        await store.get_state("r")
    with pytest.raises(StoreError, match="corrupt samples of rollout 'r'"):
        await store.get_samples("r")
    with pytest.raises(StoreError, match="corrupt samples of rollout 'r'"):
        await store.add_samples("r", _acc(_obs()))
    with pytest.raises(StoreError, match="corrupt decision of rollout 'r'"):
        await store.decisions("r")
    command(redis_server.port, "SET", "canary:decisions:r", "not-a-list")
    with pytest.raises(StoreError, match="cannot read decisions of rollout 'r': WRONGTYPE"):
        await store.decisions("r")


async def test_bad_urls_and_arguments() -> None:
    with pytest.raises(StoreError, match=r"cannot open state store http://x:1: bad url"):
        await RedisStore("http://x:1").open()
    with pytest.raises(ValueError, match="timeouts must be > 0"):
        RedisStore("redis://127.0.0.1:1/0", timeout=0)
    with pytest.raises(StoreError, match=r"needs state\.url"):
        open_store("redis", url="")


def test_redact_url_hides_passwords() -> None:
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("redis://user@h:1/0") == "redis://user@h:1/0"
    assert redact_url("rediss://u:p:w@h:1/2") == "rediss://u:***@h:1/2"
    assert redact_url("unix:///run/redis.sock?db=1&password=pw&x=1") == (
        "unix:///run/redis.sock?db=1&password=***&x=1"
    )
