"""The shared feedback answers of every store backend (memory, sqlite, redis).

A process writes the answers it served (``put_answers``); feedback posted to any process claims
them (``claim_answers``): each at most once over every client, ``taken`` for everyone else,
``expired`` past the rollout's ttl, ``unmet`` when the entry lacks what the claim needs, a
claimed marker for answers the claimer holds itself. Entries are bounded by ``max_entries``
and dropped at twice the ttl. Two clients of one SQLite file or one Redis share them.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from canary.store import RedisStore, SQLiteStore, Store
from canary.store._protocol import (
    CLAIMED,
    EXPIRED,
    MARKED,
    TAKEN,
    UNMET,
    AnswerClaim,
    ClaimResult,
    StoredAnswer,
)
from canary.store.sqlite import MIGRATIONS, SCHEMA_VERSION
from tests.store_harness import MakeStore, shared_store_factory  # noqa: F401  (make_store)

NOW = 1_800_000_000.0
TTL = 60.0


async def _opened(make: MakeStore) -> tuple[Store, Store]:
    a, b = make(), make()
    await a.open()
    await b.open()
    return a, b


def _answer(
    rid: str, at: float = NOW, *, seen: bool = True, predicted: bool = True
) -> StoredAnswer:
    return StoredAnswer(rid, at, f'["{rid}", 0.5, "p"]', seen, predicted)


async def _put(store: Store, rollout: str, *answers: StoredAnswer, max_entries: int = 100) -> None:
    await store.put_answers(rollout, list(answers), ttl=TTL, max_entries=max_entries, now=NOW)


async def _claim(
    store: Store, *claims: AnswerClaim, rollouts: dict[str, float] | None = None, now: float = NOW
) -> list[ClaimResult | None]:
    return await store.claim_answers(rollouts or {"m": TTL}, list(claims), now=now)


async def test_an_answer_is_claimed_once_and_read_as_taken_by_everyone_else(
    make_store: MakeStore,
) -> None:
    a, b = await _opened(make_store)
    await _put(a, "m", _answer("r1"), _answer("r2", NOW - 5))
    first = await _claim(b, AnswerClaim("r1", "t1"))
    assert first == [ClaimResult("m", CLAIMED, NOW, '["r1", 0.5, "p"]')]
    # the same token again (a resend after a lost reply): the same result, not a duplicate
    assert await _claim(a, AnswerClaim("r1", "t1")) == first
    assert await _claim(a, AnswerClaim("r1", "t2")) == [ClaimResult("m", TAKEN, NOW, None)]
    # writing the answers again (a flush retried, a late mirror) never frees a claimed one
    await _put(a, "m", _answer("r1"))
    assert (await _claim(b, AnswerClaim("r1", "t3")))[0].status == TAKEN  # type: ignore[union-attr]
    # in one call, claims run in order: the second claim of an id sees the first
    got = await _claim(b, AnswerClaim("r2", "u1"), AnswerClaim("r2", "u2"), AnswerClaim("x", "u3"))
    assert [g.status if g else None for g in got] == [CLAIMED, TAKEN, None]
    assert got[0] is not None and got[0].at == NOW - 5
    assert await _claim(a) == []


async def test_expired_unmet_and_local_markers(make_store: MakeStore) -> None:
    a, b = await _opened(make_store)
    await _put(
        a,
        "m",
        _answer("old", NOW - TTL),  # exactly ttl old: expired
        _answer("mirror-only", seen=False),
        _answer("no-pred", predicted=False),
    )
    got = await _claim(
        b,
        AnswerClaim("old", "t"),
        AnswerClaim("mirror-only", "t1", "seen"),
        AnswerClaim("no-pred", "t2", "predicted"),
    )
    assert [g.status if g else None for g in got] == [EXPIRED, UNMET, UNMET]
    assert got[1] is not None and got[1].data == '["mirror-only", 0.5, "p"]'
    # unmet claims took nothing: a claim that needs what is there gets it
    got = await _claim(
        a, AnswerClaim("mirror-only", "t3", "predicted"), AnswerClaim("no-pred", "t4", "seen")
    )
    assert [g.status if g else None for g in got] == [CLAIMED, CLAIMED]
    # an expired answer is never claimed: it reads expired again (not taken)
    assert (await _claim(b, AnswerClaim("old", "t5")))[0].status == EXPIRED  # type: ignore[union-attr]

    # nothing stored: the claimer's own answers are marked claimed under its rollout...
    marked = await _claim(a, AnswerClaim("mine", "t6", local=("m", NOW - 1)))
    assert marked == [ClaimResult("m", MARKED, NOW - 1, None)]
    assert await _claim(a, AnswerClaim("mine", "t6", local=("m", NOW - 1))) == marked
    # ...so that its flush racing the join cannot offer them to another process
    await _put(a, "m", _answer("mine", NOW - 1))
    assert (await _claim(b, AnswerClaim("mine", "t7")))[0].status == TAKEN  # type: ignore[union-attr]
    # a local fallback is only used when no rollout has the id
    got = await _claim(b, AnswerClaim("no-pred", "t8", local=("m", NOW)))
    assert got[0] is not None and got[0].status == TAKEN


async def test_rollouts_are_looked_in_order_and_kept_apart(make_store: MakeStore) -> None:
    a, b = await _opened(make_store)
    await _put(a, "one", _answer("r"), _answer("only-one"))
    await _put(b, "two", _answer("r"), _answer("only-two"))
    order = {"two": TTL, "one": TTL}
    got = await _claim(
        a,
        AnswerClaim("r", "t1"),
        AnswerClaim("only-one", "t2"),
        AnswerClaim("only-two", "t3"),
        AnswerClaim("r", "t4"),
        rollouts=order,
    )
    assert [(g.rollout, g.status) if g else None for g in got] == [
        ("two", CLAIMED),
        ("one", CLAIMED),
        ("two", CLAIMED),
        ("two", TAKEN),  # the first rollout holding the id decides
    ]
    # a rollout not asked about is not looked at
    assert await _claim(b, AnswerClaim("only-one", "t5"), rollouts={"two": TTL}) == [None]
    # each rollout's own ttl decides
    late = NOW + 30
    got = await _claim(
        b,
        AnswerClaim("r", "t6"),
        rollouts={"one": 20.0},
        now=late,
    )
    assert got[0] is not None and got[0].status == EXPIRED


async def test_entries_are_bounded_by_max_entries_and_twice_the_ttl(
    make_store: MakeStore,
) -> None:
    a, b = await _opened(make_store)
    await _put(a, "m", *[_answer(f"r{i}", NOW - 10 + i) for i in range(10)], max_entries=4)
    got = await _claim(b, *[AnswerClaim(f"r{i}", f"t{i}") for i in range(10)])
    # the newest 4 by answer time stay, the oldest went
    assert [g.status if g else None for g in got] == [None] * 6 + [CLAIMED] * 4
    # older than twice the ttl: dropped at the next write (expired before that)
    await _put(a, "n", _answer("gone", NOW - 2 * TTL), _answer("late", NOW - 1.5 * TTL))
    got = await _claim(b, AnswerClaim("gone", "u1"), AnswerClaim("late", "u2"), rollouts={"n": TTL})
    assert [g.status if g else None for g in got] == [None, EXPIRED]
    # expired ones go first when the store is full: live answers are never pushed out by them
    await _put(
        a, "k", _answer("x1", NOW - 1.5 * TTL), _answer("x2", NOW - 2), _answer("x3", NOW - 1),
        max_entries=2,
    )  # fmt: skip
    got = await _claim(b, *[AnswerClaim(f"x{i}", f"v{i}") for i in (1, 2, 3)], rollouts={"k": TTL})
    assert [g.status if g else None for g in got] == [None, CLAIMED, CLAIMED]


async def test_concurrent_claims_of_the_same_ids_have_exactly_one_winner(
    make_store: MakeStore,
) -> None:
    a, b = await _opened(make_store)
    ids = [f"r{i}" for i in range(300)]
    await _put(a, "m", *[_answer(r) for r in ids], max_entries=1000)

    async def claim(store: Store, who: str) -> list[ClaimResult | None]:
        out: list[ClaimResult | None] = []
        for start in range(0, len(ids), 30):  # many calls, interleaved with the other client
            part = ids[start : start + 30]
            out += await _claim(store, *[AnswerClaim(r, f"{who}:{r}") for r in part])
        return out

    first, second = await asyncio.gather(claim(a, "a"), claim(b, "b"))
    for x, y in zip(first, second, strict=True):
        assert x is not None and y is not None
        assert sorted((x.status, y.status)) == [CLAIMED, TAKEN]


async def test_bad_arguments_are_refused(make_store: MakeStore) -> None:
    a, _ = await _opened(make_store)
    with pytest.raises(ValueError, match="ttl"):
        await a.put_answers("m", [], ttl=0, max_entries=1)
    with pytest.raises(ValueError, match="max_entries"):
        await a.put_answers("m", [], ttl=1, max_entries=0)
    with pytest.raises(ValueError, match="need"):
        await _claim(a, AnswerClaim("r", "t", "nonsense"))
    with pytest.raises(ValueError, match="token"):
        await _claim(a, AnswerClaim("r", ""))
    with pytest.raises(ValueError, match="not one of"):
        await _claim(a, AnswerClaim("r", "t", local=("other", NOW)))


async def test_sqlite_keeps_answers_across_reopen_and_migrates_an_older_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    await store.open()
    await _put(store, "m", _answer("r1"))
    await store.close()
    reopened = SQLiteStore(path)
    await reopened.open()
    try:
        assert (await _claim(reopened, AnswerClaim("r1", "t")))[0] == ClaimResult(
            "m", CLAIMED, NOW, '["r1", 0.5, "p"]'
        )
    finally:
        await reopened.close()
    # A file of the schema before the answers table: opening it adds the table and keeps
    # what the file held.
    mine = next(i for i, m in enumerate(MIGRATIONS) if any("TABLE answers" in q for q in m))
    assert mine == 4 and mine + 1 <= SCHEMA_VERSION
    path = tmp_path / "older.db"
    conn = sqlite3.connect(path)
    for version in range(mine):
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
    conn.execute("INSERT INTO state (rollout, data, updated_at) VALUES ('m', '{\"a\": 1}', 0)")
    conn.execute(f"PRAGMA user_version = {mine}")
    conn.commit()
    conn.close()
    again = SQLiteStore(path)
    await again.open()
    try:
        assert await again.get_state("m") == {"a": 1}
        assert await _claim(again, AnswerClaim("r1", "t")) == [None]
        await _put(again, "m", _answer("r1"))
        assert (await _claim(again, AnswerClaim("r1", "t")))[0] is not None
    finally:
        await again.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


async def test_redis_keys_expire_with_the_answers(redis_server: object) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    store = RedisStore(url, key_prefix="t:")
    await store.open()
    try:
        await store.put_answers("m", [_answer("r")], ttl=5.0, max_entries=10, now=NOW)
        await store.claim_answers({"n": 5.0}, [AnswerClaim("q", "t", local=("n", NOW))])
        client = store._live()
        for key in ("t:answers:m", "t:answers-at:m", "t:answers-meta:m", "t:answers-meta:n"):
            ttl = await client.pttl(key)
            assert 0 < ttl <= 10_000, key
    finally:
        await store.close()


async def test_sqlite_row_counts_follow_inserts_updates_markers_and_deletes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    await store.open()
    try:
        for k in range(5):  # new ids, rewritten ids, trimmed and expired ones
            await _put(
                store, "m", *[_answer(f"r{k}-{i}", NOW - 50 + k + i / 100) for i in range(30)]
            )
            await _put(store, "m", *[_answer(f"r{k}-{i}", NOW - 50 + k) for i in range(10)])
            await _put(store, "m", _answer("x"), max_entries=70)
        await _claim(store, AnswerClaim("mark", "t", local=("m", NOW)))
        await _put(store, "m", _answer("mark"), _answer("old", NOW - 3 * TTL))
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    (rows,) = conn.execute("SELECT count(*) FROM answers WHERE rollout = 'm'").fetchone()
    (counted,) = conn.execute("SELECT n FROM answer_counts WHERE rollout = 'm'").fetchone()
    conn.close()
    assert rows == counted == 71  # 70 kept, then the marker ("old" went at once)
