"""Sample batches: a flush whose answer was lost after the store applied it is not merged again
when it is retried (``Store.add_samples(..., batch=...)``).

The Redis tests lose the answer of a real EXEC against a real ``redis-server``: the write lands,
then the connection error is raised where redis-py would raise it. The controller test drives
the real ``StoreWriter`` over a store that applies a write and then fails, as a lost answer does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError

from canary.config import load_config_text
from canary.controller import Controller
from canary.errors import StoreError
from canary.metrics import Metrics
from canary.observe import Observation, Recorder, RolloutAccumulator
from canary.store import MemoryStore, RedisStore
from tests.redis_harness import RedisServer


def _obs(arm: str = "candidate") -> Observation:
    return Observation(
        rollout="r",
        arm=arm,
        propensity=0.5,
        shadow=False,
        request_id="x",
        status=200,
        error=None,
        latency=0.02,
        signals={},
    )


def _acc(n: int) -> RolloutAccumulator:
    acc = RolloutAccumulator()
    for _ in range(n):
        acc.record(_obs())
    return acc


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    opened = RedisStore(redis_server.url, timeout=1.0, connect_timeout=1.0)
    await opened.open()
    yield opened
    await opened.close()


def _lose_next_answers(monkeypatch: pytest.MonkeyPatch, n: int) -> list[int]:
    """The next ``n`` transactions run in Redis, then their answers are lost."""
    original = Pipeline.execute
    lost: list[int] = []

    async def execute(self: Pipeline, raise_on_error: bool = True) -> Any:
        result = await original(self, raise_on_error)
        if len(lost) < n:
            lost.append(1)
            raise RedisConnectionError("Connection closed by server.")
        return result

    monkeypatch.setattr(Pipeline, "execute", execute)
    return lost


async def _count(store: RedisStore) -> int:
    got = await store.get_samples("r")
    assert got is not None
    return got.candidate.observed


async def test_a_batch_whose_answer_was_lost_is_merged_once(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost = _lose_next_answers(monkeypatch, 1)
    await store.add_samples("r", _acc(5), batch=("w", 1))  # resent inside, found merged
    assert lost == [1]
    assert await _count(store) == 5
    await store.add_samples("r", _acc(5), batch=("w", 1))  # the caller's own retry, too
    assert await _count(store) == 5
    await store.add_samples("r", _acc(3), batch=("w", 2))  # the next batch counts
    await store.add_samples("r", _acc(2), batch=("other", 1))  # and another writer's
    assert await _count(store) == 10


async def test_batches_are_per_rollout(store: RedisStore) -> None:
    """A writer's later batch of another rollout does not hide a retry of this one."""
    await store.add_samples("q", _acc(1), batch=("w", 7))
    await store.add_samples("r", _acc(4), batch=("w", 6))
    assert await _count(store) == 4


async def test_without_a_batch_a_lost_answer_is_an_error_not_a_retry(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unnumbered call cannot tell a lost answer from a lost write: it says so and does
    not resend (the write did land)."""
    _lose_next_answers(monkeypatch, 1)
    with pytest.raises(StoreError, match="add samples"):
        await store.add_samples("r", _acc(5))
    assert await _count(store) == 5


class _AnswerLost(MemoryStore):
    """Applies the next ``fail`` sample writes, then raises as a lost answer does; merges a
    batch it has seen before at most once (the Redis store's rule, here in memory)."""

    def __init__(self, fail: int) -> None:
        super().__init__()
        self.fail = fail
        self.seen: dict[tuple[str, str], int] = {}
        self.batches: list[tuple[str, int] | None] = []

    async def add_samples(
        self, rollout: str, delta: RolloutAccumulator, *, batch: tuple[str, int] | None = None
    ) -> None:
        self.batches.append(batch)
        fresh = batch is None or self.seen.get((rollout, batch[0]), 0) < batch[1]
        if batch is not None:
            self.seen[(rollout, batch[0])] = max(self.seen.get((rollout, batch[0]), 0), batch[1])
        if fresh:
            await super().add_samples(rollout, delta)
        if self.fail > 0:
            self.fail -= 1
            raise StoreError("connection reset after the write")


async def test_the_controller_resends_a_failed_batch_as_it_was() -> None:
    """The StoreWriter sends a failed batch again with its number and keeps what was
    recorded meanwhile for the next batch, so each sample reaches the store exactly once."""
    config = load_config_text(
        """\
state: {backend: memory}
rollouts:
  - name: r
    production: {endpoints: [http://127.0.0.1:1]}
    candidate: {endpoints: [http://127.0.0.1:2]}
    steps: [{weight: 50}]
"""
    )
    store = _AnswerLost(fail=2)
    await store.open()
    recorder = Recorder()
    controller = Controller(config, store, recorder, Metrics(), lambda name, w: None)
    await controller.load()
    for _ in range(3):
        recorder.record(_obs())
    await controller.flush()  # applied, answer lost
    for _ in range(4):
        recorder.record(_obs())
    await controller.flush()  # the same batch again (skipped by the store), fails again
    await controller.flush()  # the same batch again: succeeds; then the 4 recorded since
    got = await store.get_samples("r")
    assert got is not None and got.candidate.observed == 7
    numbers = [b[1] for b in store.batches if b is not None]
    assert numbers == [1, 1, 1, 2]
