"""Shared feedback: labels posted to any canary process join the answer another one served.

Units first (two "processes" = two feedback stores and two :class:`FeedbackSharing` on one
memory store or SQLite file, fake clocks), then real canaries on loopback: two Runtimes on
one SQLite file (``--workers``) and on one Redis (replicas), a request served by A, its label
posted to B's admin API, its value in the merged samples exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from canary.config import FeedbackConfig, load_config_text
from canary.controller.shared_feedback import FeedbackSharing
from canary.errors import StoreError
from canary.metrics import Metrics
from canary.observe.feedback import (
    FeedbackItem,
    FeedbackReport,
    FeedbackStore,
    ParsedFeedback,
    join_feedback,
)
from canary.runtime import Runtime
from canary.store import MemoryStore, SQLiteStore, Store
from canary.store._protocol import AnswerClaim, ClaimResult
from canary.workers import WorkerSpec
from loadtest.fake_model import true_label
from tests.conftest import fake_pair, rollout_config
from tests.redis_harness import RedisServer, free_port

ACCURACY = {"name": "accuracy", "signal": "feedback", "stat": "rate", "max_decrease": "1pp"}


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Values:
    """A ValueRecorder that keeps what it is given."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str, str, float, float, int]] = []

    def record_value(
        self,
        rollout: str,
        arm: str,
        key: str,
        value: float,
        propensity: float = 1.0,
        cluster: int = -1,
    ) -> None:
        self.got.append((rollout, arm, key, value, propensity, cluster))


class Process:
    """One canary process's side: its proxy's feedback store, its sharing, its recorder."""

    def __init__(
        self, store: Store, mono: Clock, wall: Clock, count_at: str, ttl: float = 60.0
    ) -> None:
        cfg = FeedbackConfig.model_validate({"ttl": ttl, "max_entries": 1000, "count_at": count_at})
        self.fs = FeedbackStore("m", cfg, clock=mono, wall=wall, identity=("p", "c"))
        self.sharing = FeedbackSharing(store, Metrics(), timeout=5.0, clock=wall)
        self.sharing.attach(lambda: [self.fs])
        self.values = Values()

    async def join(self, *items: FeedbackItem) -> dict[str, int]:
        parsed = ParsedFeedback(list(enumerate(items)), [])
        report = await self.sharing.join(parsed, [self.fs], self.values)
        return {k: v for k, v in report.totals().items() if v}


def label(rid: str, value: object) -> FeedbackItem:
    return FeedbackItem(rid, "label", value)


@pytest.fixture(params=["memory", "sqlite"])
async def shared(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    """Two processes on one store: ``make(count_at, ttl) -> (a, b, mono, wall)``."""
    opened: list[Store] = []

    async def make(count_at: str = "arrival", ttl: float = 60.0) -> Any:
        stores: list[Store]
        if request.param == "memory":
            one = MemoryStore()
            stores = [one, one]
        else:
            stores = [SQLiteStore(tmp_path / "state.db"), SQLiteStore(tmp_path / "state.db")]
        for s in stores:
            await s.open()
            opened.append(s)
        mono, wall = Clock(100.0), Clock(1_800_000_000.0)
        a = Process(stores[0], mono, wall, count_at, ttl)
        b = Process(stores[1], mono, wall, count_at, ttl)
        return a, b, mono, wall

    yield make
    for s in opened:
        await s.close()


async def test_a_label_posted_to_another_process_counts_once_everywhere(shared: Any) -> None:
    a, b, _, _ = await shared()
    a.fs.add("r1", "candidate", 0.5, "cat", False, 7)
    a.fs.add("r2", "production", 0.5, "dog", False)
    assert await b.join(label("r1", "cat")) == {"unknown": 1}  # not flushed yet
    await a.sharing.flush()
    assert await b.join(label("r1", "cat"), label("r2", "cat")) == {"accepted": 2}
    assert b.values.got == [
        ("m", "candidate", "feedback", 1.0, 0.5, 7),
        ("m", "production", "feedback", 0.0, 0.5, -1),
    ]
    # a second label, to either process, in any kind: a duplicate, nothing recorded again
    assert await a.join(label("r1", "dog"), FeedbackItem("r2", "correct", True)) == {"duplicate": 2}
    assert await b.join(FeedbackItem("r1", "reward", 1.0)) == {"duplicate": 1}
    assert a.values.got == [] and len(b.values.got) == 2
    # A knows it was joined: its next flush does not offer it again
    assert a.fs.local_answers("r1") is None
    await a.sharing.flush()
    assert await b.join(label("r1", "cat")) == {"duplicate": 1}


async def test_the_shadow_mirror_is_scored_for_labels_only(shared: Any) -> None:
    a, b, _, _ = await shared()
    a.fs.add("s1", "production", 1.0, "cat", False)
    a.fs.add("s1", "candidate", 1.0, "dog", True)  # the mirror's answer
    a.fs.add("s2", "production", 1.0, "cat", False)
    a.fs.add("s2", "candidate", 1.0, "cat", True)
    a.fs.add("only-mirror", "candidate", 1.0, "cat", True)
    a.fs.add("no-pred", "production", 1.0, None, False)
    await a.sharing.flush()
    got = await b.join(
        label("s1", "cat"),
        FeedbackItem("s2", "correct", False),
        FeedbackItem("only-mirror", "correct", True),  # the user's answer is not kept
        label("no-pred", "cat"),
    )
    assert got == {"accepted": 2, "unknown": 1, "no_prediction": 1}
    assert sorted(b.values.got) == [
        ("m", "candidate", "feedback", 0.0, 1.0, -1),
        ("m", "production", "feedback", 0.0, 1.0, -1),  # s2: correct=false
        ("m", "production", "feedback", 1.0, 1.0, -1),
    ]
    # nothing was claimed for the unknown/no_prediction ones: a usable label still counts
    assert await a.join(label("only-mirror", "cat"), FeedbackItem("no-pred", "correct", True)) == {
        "accepted": 2
    }


async def test_labels_arriving_after_the_ttl_read_expired(shared: Any) -> None:
    a, b, mono, wall = await shared(ttl=10.0)
    a.fs.add("r", "production", 1.0, "cat", False)
    await a.sharing.flush()
    mono.now += 10
    wall.now += 10
    assert await b.join(label("r", "cat")) == {"expired": 1}
    assert b.values.got == []


async def test_maturity_holds_the_claimed_values_until_the_answer_is_ttl_old(
    shared: Any,
) -> None:
    a, b, mono, wall = await shared("maturity", ttl=30.0)
    a.fs.add("r", "candidate", 0.25, "cat", False)
    mono.now += 10
    wall.now += 10
    await a.sharing.flush()
    assert await b.join(label("r", "cat")) == {"accepted": 1}
    assert b.values.got == []  # held by B, the process that claimed it
    assert b.fs.held == 1 and b.fs.take_ripe() == []
    wall.now += 19.9
    assert b.fs.take_ripe() == []
    wall.now += 0.1  # 30 s after the answer, by its stored time
    assert b.fs.take_ripe() == [("candidate", 1.0, 0.25, -1)]
    assert b.fs.held == 0 and a.fs.take_ripe() == []


async def test_an_id_held_here_is_claimed_through_the_store_before_any_flush(
    shared: Any,
) -> None:
    a, b, _, _ = await shared()
    a.fs.add("r", "production", 1.0, "cat", False)
    assert await a.join(label("r", "cat")) == {"accepted": 1}  # not flushed: a marker
    assert a.values.got == [("m", "production", "feedback", 1.0, 1.0, -1)]
    a.fs.add("late", "production", 1.0, "cat", False)
    await a.sharing.flush()  # the joined one is not written; the marker stays claimed
    assert await b.join(label("r", "cat"), label("late", "dog")) == {
        "duplicate": 1,
        "accepted": 1,
    }
    # the same id twice in one body: the second is a duplicate
    a.fs.add("twice", "production", 1.0, "cat", False)
    assert await a.join(label("twice", "cat"), label("twice", "cat")) == {
        "accepted": 1,
        "duplicate": 1,
    }


async def test_the_owner_counts_a_mirror_answer_that_is_not_flushed_yet(shared: Any) -> None:
    a, b, _, _ = await shared()
    a.fs.add("r", "production", 1.0, None, False)  # the user's answer had no prediction
    await a.sharing.flush()
    a.fs.add("r", "candidate", 1.0, "cat", True)  # the mirror's, after the flush
    assert await b.join(label("r", "cat")) == {"no_prediction": 1}  # B sees what is stored
    assert await a.join(label("r", "cat")) == {"accepted": 1}  # A holds the newest
    assert a.values.got == [("m", "candidate", "feedback", 1.0, 1.0, -1)]


async def test_concurrent_labels_for_the_same_ids_count_once(shared: Any) -> None:
    a, b, _, _ = await shared()
    ids = [f"r{i}" for i in range(200)]
    for rid in ids:
        a.fs.add(rid, "production", 1.0, "cat", False)
    await a.sharing.flush()
    for rid in ids[:100]:  # A holds the first half unflushed again (newer answers)
        a.fs.add(rid + "x", "production", 1.0, "cat", False)
    items = [label(rid, "cat") for rid in ids + [r + "x" for r in ids[:100]]]
    ra, rb = await asyncio.gather(a.join(*items), b.join(*items))
    assert ra.get("accepted", 0) + rb.get("accepted", 0) == 300
    assert ra.get("duplicate", 0) + rb.get("duplicate", 0) + rb.get("unknown", 0) == 300
    assert len(a.values.got) + len(b.values.got) == 300


class _Failing(MemoryStore):
    """A memory store whose answer calls fail while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def put_answers(self, *args: Any, **kwargs: Any) -> None:
        if self.down:
            raise StoreError("store down")
        await super().put_answers(*args, **kwargs)

    async def claim_answers(self, *args: Any, **kwargs: Any) -> list[ClaimResult | None]:
        if self.down:
            raise StoreError("store down")
        return await super().claim_answers(*args, **kwargs)


async def test_a_store_outage_fails_the_join_and_loses_no_answer() -> None:
    store = _Failing()
    await store.open()
    mono, wall = Clock(100.0), Clock(1_800_000_000.0)
    a = Process(store, mono, wall, "arrival")
    b = Process(store, mono, wall, "arrival")
    a.fs.add("r", "production", 1.0, "cat", False)
    store.down = True
    await a.sharing.flush()  # fails quietly; the answer is kept for the next flush
    with pytest.raises(StoreError):
        await b.join(label("r", "cat"))
    with pytest.raises(StoreError):  # the owner cannot count it alone either
        await a.join(label("r", "cat"))
    assert a.values.got == b.values.got == [] and a.fs.local_answers("r") is not None
    store.down = False
    await a.sharing.flush()
    assert await b.join(label("r", "cat")) == {"accepted": 1}


async def test_one_process_alone_joins_as_before() -> None:
    """Without leadership nothing is shared: the local join, no outbox."""
    fs = FeedbackStore("m", FeedbackConfig(count_at="arrival"))
    fs.add("r", "production", 1.0, "cat", False)
    assert not fs.sharing and fs.take_outbox(10) == []
    values = Values()
    report = join_feedback(ParsedFeedback([(0, label("r", "cat"))], []), [fs], values)
    assert isinstance(report, FeedbackReport) and report.totals()["accepted"] == 1
    assert values.got == [("m", "production", "feedback", 1.0, 1.0, -1)]


async def test_a_rollout_started_anew_never_joins_its_predecessors_answers() -> None:
    store = MemoryStore()
    await store.open()
    mono, wall = Clock(100.0), Clock(1_800_000_000.0)
    a = Process(store, mono, wall, "arrival")
    a.fs.add("r", "production", 1.0, "cat", False)
    await a.sharing.flush()
    cfg = FeedbackConfig()
    other = FeedbackStore("m", cfg, clock=mono, wall=wall, identity=("p2", "c"))
    assert other.shared_key != a.fs.shared_key
    got = await store.claim_answers({other.shared_key: 60.0}, [AnswerClaim("r", "t")])
    assert got == [None]


# -- real canaries on one store ------------------------------------------------------------------


def _config(state: dict[str, Any], p: str, c: str) -> dict[str, Any]:
    cfg = rollout_config(
        [p], [c], steps=[{"weight": 50, "min_duration": "1h"}], prediction="json:prediction",
        analysis={"interval": "100ms", "burn_in": 0, "metrics": [ACCURACY]},
        feedback={"count_at": "arrival"},
    )  # fmt: skip
    cfg["state"] = state
    return cfg


@contextlib.asynccontextmanager
async def _canary(cfg: dict[str, Any], worker: WorkerSpec | None) -> AsyncIterator[Runtime]:
    runtime = Runtime(load_config_text(yaml.safe_dump(cfg)), worker=worker)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


@contextlib.asynccontextmanager
async def _two_canaries(
    backend: str, tmp_path: Path, redis: Callable[[], RedisServer]
) -> AsyncIterator[tuple[Runtime, Runtime]]:
    """Two canaries on one store: ``--workers`` workers on one SQLite file, or replicas on
    one Redis (A starts first, so it leads)."""
    workers: list[WorkerSpec | None] = [None, None]
    if backend == "sqlite":
        state: dict[str, Any] = {"backend": "sqlite", "path": str(tmp_path / "state.db")}
        workers = [WorkerSpec(i, 2, free_port(), str(tmp_path), os.getpid()) for i in (1, 2)]
    else:
        state = {"backend": "redis", "url": redis().url}
    async with fake_pair(candidate={"accuracy": 0.5}) as (p, c):
        cfg = _config(state, p, c)
        async with _canary(cfg, workers[0]) as a, _canary(cfg, workers[1]) as b:
            yield a, b


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_feedback_posted_to_another_canary_reaches_the_merged_samples_once(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    def redis() -> RedisServer:
        server: RedisServer = request.getfixturevalue("redis_server")
        return server

    async with (
        _two_canaries(backend, tmp_path, redis) as (a, b),
        httpx.AsyncClient() as client,
    ):
        assert a.leadership is not None and b.leadership is not None
        sent = []
        for i in range(40):  # every request served by A
            body = {"id": f"q{i}", "features": [i, 1.0]}
            r = await client.post(f"http://127.0.0.1:{a.proxy_port}/predict", json=body)
            assert r.status_code == 200, r.text
            sent.append((r.headers["X-Request-Id"], r.json()["prediction"], true_label(body)))
        await a.controller.flush()  # A's answers reach the store (the loop does it every 250 ms)
        labels = [{"request_id": rid, "label": lab} for rid, _, lab in sent]
        admin_b, admin_a = (f"http://127.0.0.1:{rt.admin_port}" for rt in (b, a))
        r = await client.post(admin_b + "/api/v1/feedback", json=labels)
        assert r.status_code == 200, r.text
        assert r.json()["results"]["accepted"] == 40, r.json()
        # a second label for each, posted to A (which served them) or to B: duplicates
        r = await client.post(admin_a + "/api/v1/feedback", json=labels[:25])
        assert r.json()["results"] == {
            "accepted": 0, "unknown": 0, "expired": 0, "duplicate": 25, "invalid": 0,
            "no_prediction": 0,
        }  # fmt: skip
        r = await client.post(admin_b + "/api/v1/feedback", json=labels[25:])
        assert r.json()["results"]["duplicate"] == 15
        for rt in (a, b):
            await rt.controller.flush()
        totals = await a.store.get_samples("m")
        assert totals is not None
        n = totals.production.signals["feedback"].n + totals.candidate.signals["feedback"].n
        hits = (
            totals.production.signals["feedback"].total + totals.candidate.signals["feedback"].total
        )
        assert n == 40  # exactly once, though posted twice to two processes
        assert hits == sum(pred == lab for _, pred, lab in sent)


async def test_a_hung_store_answers_503_keeps_serving_and_counts_the_resend_once(
    redis_server: RedisServer,
) -> None:
    async with fake_pair() as (p, c), httpx.AsyncClient(timeout=30) as client:
        cfg = _config({"backend": "redis", "url": redis_server.url}, p, c)
        async with _canary(cfg, None) as a:
            body = {"id": "q", "features": [1, 1.0]}
            r = await client.post(f"http://127.0.0.1:{a.proxy_port}/predict", json=body)
            rid = r.headers["X-Request-Id"]
            await a.controller.flush()
            admin = f"http://127.0.0.1:{a.admin_port}"
            redis_server.pause()  # every call hangs until its timeout
            try:
                got = await client.post(
                    admin + "/api/v1/feedback", json={"request_id": rid, "label": 1}
                )
                assert got.status_code == 503, got.text
                assert "send it again" in got.json()["error"]
                # the proxy never waits for the store
                r = await client.post(f"http://127.0.0.1:{a.proxy_port}/predict", json=body)
                assert r.status_code == 200
            finally:
                redis_server.resume()
            label = true_label(body)
            got = await client.post(
                admin + "/api/v1/feedback", json={"request_id": rid, "label": label}
            )
            assert got.json()["results"]["accepted"] == 1, got.text
            await a.controller.flush()
            totals = await a.store.get_samples("m")
            assert totals is not None
            kept = [totals.arms[arm].signals.get("feedback") for arm in ("production", "candidate")]
            assert sum(acc.n for acc in kept if acc is not None) == 1
