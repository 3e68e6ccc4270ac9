"""The SQLite store's cached samples row: a flush that finds the row as this store last wrote it
merges into the copy it kept instead of decoding the row again, and it is never wrong.

Every write of a samples row draws a new random ``etag`` (schema 3); a store keeps the
accumulator it last wrote or read with that row's etag. These tests pin that the cached path
gives exactly what the plain path (decode, merge, encode) gives, whatever other connections
and processes do to the row meanwhile, and that the migration from schema 2 keeps old rows.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import canary.store.sqlite as sqlite_module
from canary.errors import StoreError
from canary.observe import Observation, RolloutAccumulator
from canary.store import SQLiteStore
from canary.store._protocol import encode, encode_accumulator
from canary.store.sqlite import MIGRATIONS, SCHEMA_VERSION

REPO = Path(__file__).resolve().parent.parent


def _obs(arm: str, latency: float, cost: float = 0.001, status: int = 200) -> Observation:
    return Observation(
        rollout="r",
        arm=arm,
        propensity=0.5,
        shadow=False,
        request_id="x",
        status=status,
        error=None if status < 500 else "status",
        latency=latency,
        signals={"cost": cost},
    )


def _acc(n: int, seed: int = 0, accuracy: float | None = None) -> RolloutAccumulator:
    """``n`` observations spread over both arms, values varying with ``seed`` (new histogram
    buckets, errors now and then)."""
    acc = RolloutAccumulator() if accuracy is None else RolloutAccumulator(accuracy)
    for i in range(n):
        arm = "candidate" if (i + seed) % 2 else "production"
        status = 503 if (i * 7 + seed) % 11 == 0 else 200
        acc.record(_obs(arm, 0.001 * (1 + (i * 13 + seed * 5) % 97), 0.001 * (seed % 5), status))
    return acc


class _DecodeCounter:
    """Counts the rows the store decodes (the work the cache saves)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = sqlite_module.decode

        def counting(text: str, what: str) -> dict[str, object]:
            self.calls += 1
            return real(text, what)

        monkeypatch.setattr(sqlite_module, "decode", counting)


async def test_a_flush_after_our_own_write_decodes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.db"
    one, two = SQLiteStore(path), SQLiteStore(path)
    await one.open()
    await two.open()
    decodes = _DecodeCounter(monkeypatch)
    try:
        expected = RolloutAccumulator()
        for seed in range(5):  # only this store writes: the kept copy is the row
            delta = _acc(20, seed)
            await one.add_samples("r", delta)
            expected.merge(delta)
        assert decodes.calls == 0
        got = await one.get_samples("r")
        assert got is not None and got.to_dict() == expected.to_dict()
        assert decodes.calls == 0

        other = _acc(3, 9)  # another connection writes: the next flush must read the row
        await two.add_samples("r", other)
        expected.merge(other)
        assert decodes.calls == 1  # two had never seen the row
        await one.add_samples("r", _acc(4, 1))
        expected.merge(_acc(4, 1))
        assert decodes.calls == 2
        for store in (one, two):
            got = await store.get_samples("r")
            assert got is not None and got.to_dict() == expected.to_dict()
    finally:
        await one.close()
        await two.close()


async def test_get_samples_returns_a_fresh_copy_of_the_kept_one(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "state.db")
    await store.open()
    try:
        await store.add_samples("r", _acc(10))
        before = _acc(10).to_dict()
        got = await store.get_samples("r")
        assert got is not None and got.to_dict() == before
        got.merge(_acc(50, 3))  # the caller's copy: the store's must not move
        again = await store.get_samples("r")
        assert again is not None and again.to_dict() == before
        await store.add_samples("r", _acc(2, 1))
        assert again.to_dict() == before  # nor a copy handed out earlier
    finally:
        await store.close()


async def test_a_refused_merge_and_a_write_behind_our_back_leave_no_wrong_copy(
    tmp_path: Path,
) -> None:
    """A merge refused (another accuracy) leaves the row and the kept copy as they were; a row
    another writer changed is read again, not taken from the kept copy."""
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    await store.open()
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        await store.add_samples("r", _acc(5))
        with pytest.raises(StoreError, match="accuracy"):
            await store.add_samples("r", _acc(5, 1, accuracy=0.05))
        got = await store.get_samples("r")
        assert got is not None and got.to_dict() == _acc(5).to_dict()
        blocker.execute("BEGIN IMMEDIATE")  # another process changes the row
        blocker.execute(
            "UPDATE samples SET data = ?, etag = 7 WHERE rollout = 'r'",
            (encode(_acc(1, 4).to_dict(), "x"),),
        )
        blocker.execute("COMMIT")
        await store.add_samples("r", _acc(2, 2))
        expected = _acc(1, 4)
        expected.merge(_acc(2, 2))
        got = await store.get_samples("r")
        assert got is not None and got.to_dict() == expected.to_dict()
    finally:
        blocker.close()
        await store.close()


async def test_reset_and_a_new_row_are_never_taken_for_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    one, two = SQLiteStore(path), SQLiteStore(path)
    await one.open()
    await two.open()
    try:
        await one.add_samples("r", _acc(30))
        await two.reset("r")
        await two.add_samples("r", _acc(3, 1))  # a new rollout of that name
        await one.add_samples("r", _acc(2, 2))
        expected = _acc(3, 1)
        expected.merge(_acc(2, 2))
        got = await one.get_samples("r")
        assert got is not None and got.to_dict() == expected.to_dict()
        await one.reset("r")
        assert await one.get_samples("r") is None
        await one.add_samples("r", _acc(1, 5))
        got = await two.get_samples("r")
        assert got is not None and got.to_dict() == _acc(1, 5).to_dict()
    finally:
        await one.close()
        await two.close()


# -- the cached path against the plain one -----------------------------------------------------

# (store, op, size, seed): store 0 or 1 (two stores on one file), or 2: a plain connection
# that writes the row the way the uncached code did (decode, merge, encode), behind both.
_ops = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.sampled_from(["add", "add", "add", "get", "reset"]),
        st.integers(0, 12),
        st.integers(0, 50),
    ),
    max_size=30,
)


def _plain_add(conn: sqlite3.Connection, delta: RolloutAccumulator) -> None:
    """The uncached path: read, decode, merge, encode, write (with a new etag, as any
    writer of schema 3 does)."""
    conn.execute("BEGIN IMMEDIATE")
    row = conn.execute("SELECT data FROM samples WHERE rollout = 'r'").fetchone()
    merged = delta.snapshot()
    if row is not None:
        merged = RolloutAccumulator.from_dict(sqlite_module.decode(row[0], "x"))
        merged.merge(delta)
    conn.execute(
        "INSERT INTO samples (rollout, data, updated_at, etag) VALUES ('r', ?, 0, ?)"
        " ON CONFLICT (rollout) DO UPDATE SET data = excluded.data, etag = excluded.etag",
        (encode(merged.to_dict(), "x"), sqlite_module.new_etag()),
    )
    conn.execute("COMMIT")


async def _run_ops(path: Path, ops: list[tuple[int, str, int, int]]) -> None:
    stores = [SQLiteStore(path), SQLiteStore(path)]
    for store in stores:
        await store.open()
    plain = sqlite3.connect(path, isolation_level=None)
    expected: RolloutAccumulator | None = None
    try:
        for who, op, size, seed in ops:
            if op == "add":
                delta = _acc(size, seed)
                if who == 2:
                    _plain_add(plain, delta)
                else:
                    await stores[who].add_samples("r", delta)
                if expected is None:
                    expected = delta.snapshot()
                else:
                    expected.merge(delta)
            elif op == "reset" and who < 2:
                await stores[who].reset("r")
                expected = None
            else:
                got = await stores[who % 2].get_samples("r")
                if expected is None:
                    assert got is None
                else:
                    assert got is not None and got.to_dict() == expected.to_dict()
                    got.merge(_acc(3, seed))  # a caller changing its copy changes nothing
        for store in stores:
            got = await store.get_samples("r")
            want = None if expected is None else expected.to_dict()
            assert (None if got is None else got.to_dict()) == want
    finally:
        plain.close()
        for store in stores:
            await store.close()


@settings(max_examples=40, deadline=None)
@given(ops=_ops)
def test_cached_flushes_equal_the_plain_path(ops: list[tuple[int, str, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_run_ops(Path(tmp) / "s.db", ops))


# -- concurrency -------------------------------------------------------------------------------


async def test_two_stores_interleaving_flushes_lose_no_delta(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    one, two = SQLiteStore(path), SQLiteStore(path)
    await asyncio.gather(one.open(), two.open())
    try:
        deltas = [(_acc(5, seed), _acc(3, seed + 100)) for seed in range(40)]
        expected = RolloutAccumulator()
        for a, b in deltas:
            expected.merge(a)
            expected.merge(b)
        # Runs of flushes by one store between the other's: the cache hits and misses.
        for i in range(0, 40, 4):
            await asyncio.gather(
                *(one.add_samples("r", a) for a, _ in deltas[i : i + 4]),
                *(two.add_samples("r", b) for _, b in deltas[i : i + 2]),
            )
            for _, b in deltas[i + 2 : i + 4]:
                await two.add_samples("r", b)
        for store in (one, two):
            got = await store.get_samples("r")
            assert got is not None
            assert got.production.observed == expected.production.observed
            assert got.candidate.observed == expected.candidate.observed
            assert got.candidate.signals["cost"].hist.count == (
                expected.candidate.signals["cost"].hist.count
            )
            for arm in ("production", "candidate"):
                assert got.arms[arm].signals["latency"].hist.to_dict() == (
                    expected.arms[arm].signals["latency"].hist.to_dict()
                )
    finally:
        await asyncio.gather(one.close(), two.close())


_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from canary.observe import Observation, RolloutAccumulator
    from canary.store import SQLiteStore

    async def main(path: str, n: int) -> None:
        store = SQLiteStore(path)
        await store.open()
        for i in range(n):
            acc = RolloutAccumulator()
            acc.record(Observation(rollout="r", arm="candidate" if i % 2 else "production",
                                   propensity=0.5, shadow=False, request_id="x", status=200,
                                   error=None, latency=0.001 * (1 + i % 50), signals={}))
            await store.add_samples("r", acc)
        await store.close()

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


def test_processes_flushing_into_one_file_lose_no_delta(tmp_path: Path) -> None:
    """Three processes, each with its own kept copy, add 150 deltas each at the same time."""
    path = tmp_path / "shared.db"
    n = 150
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(n)], cwd=REPO)
        for _ in range(3)
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0

    async def read() -> RolloutAccumulator | None:
        store = SQLiteStore(path)
        await store.open()
        try:
            return await store.get_samples("r")
        finally:
            await store.close()

    got = asyncio.run(read())
    assert got is not None
    assert got.production.observed + got.candidate.observed == 3 * n
    assert got.candidate.observed == 3 * (n // 2)


# -- migration ---------------------------------------------------------------------------------


async def test_a_version_2_file_gains_the_etag_and_keeps_its_samples(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    for version in range(2):
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    old = _acc(7, 3)
    conn.execute("INSERT INTO samples VALUES ('r', ?, 0)", (encode(old.to_dict(), "x"),))
    conn.commit()
    conn.close()
    store = SQLiteStore(path)
    await store.open()
    try:
        got = await store.get_samples("r")
        assert got is not None and got.to_dict() == old.to_dict()
        await store.add_samples("r", _acc(2, 1))
        await store.add_samples("r", _acc(2, 2))
        old.merge(_acc(2, 1))
        old.merge(_acc(2, 2))
        got = await store.get_samples("r")
        assert got is not None and got.to_dict() == old.to_dict()
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 3
    (etag,) = conn.execute("SELECT etag FROM samples WHERE rollout = 'r'").fetchone()
    assert etag != 0  # written by schema 3: an etag of its own
    conn.close()


def test_etags_are_drawn_afresh_in_forked_processes() -> None:
    """Workers forked from one parent must not draw the same etags (a seeded PRNG would)."""
    import os

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, str(sqlite_module.new_etag()).encode())
        os._exit(0)
    os.close(write)
    mine = sqlite_module.new_etag()
    os.waitpid(pid, 0)
    theirs = int(os.read(read, 64))
    os.close(read)
    assert mine != theirs and 0 < mine < 2**63 and 0 < theirs < 2**63


async def test_a_writer_that_knows_no_etags_still_changes_it(tmp_path: Path) -> None:
    """An UPDATE of the data alone (an operator, a tool) gets a new etag from the trigger, so
    the store reads what it wrote instead of its kept copy."""
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    await store.open()
    try:
        await store.add_samples("r", _acc(4))
        conn = sqlite3.connect(path)
        (before,) = conn.execute("SELECT etag FROM samples").fetchone()
        conn.execute("UPDATE samples SET data = ?", (encode(_acc(9, 2).to_dict(), "x"),))
        conn.commit()
        (after,) = conn.execute("SELECT etag FROM samples").fetchone()
        conn.close()
        assert after not in (before, 0)
        got = await store.get_samples("r")
        assert got is not None and got.to_dict() == _acc(9, 2).to_dict()
    finally:
        await store.close()


# -- the encoding in pieces --------------------------------------------------------------------

_values = st.lists(
    st.tuples(
        st.sampled_from(["production", "candidate"]),
        st.floats(1e-6, 1e3),
        st.floats(-5.0, 5.0),
        st.sampled_from([200, 200, 404, 503]),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(values=_values, accuracy=st.sampled_from([0.01, 0.02, 0.05]))
def test_the_row_encoded_in_pieces_is_the_plain_encoding(
    values: list[tuple[str, float, float, int]], accuracy: float
) -> None:
    acc = RolloutAccumulator(accuracy)
    for arm, latency, score, status in values:
        acc.record(
            Observation(
                rollout="r",
                arm=arm,
                propensity=0.25 if arm == "candidate" else 0.75,
                shadow=False,
                request_id="x",
                status=status,
                error=None if status < 500 else "status",
                latency=latency,
                signals={"cost": latency / 7, "json:score": score},
            )
        )
    assert encode_accumulator(acc, "x") == encode(acc.to_dict(), "x")


def test_the_row_encoded_in_pieces_refuses_what_json_cannot_hold() -> None:
    acc = _acc(3)
    acc.candidate.signals["latency"].accuracy = float("nan")  # as encode() refuses it
    with pytest.raises(StoreError, match="not JSON-serialisable"):
        encode(acc.to_dict(), "x")
    with pytest.raises(StoreError, match="not JSON-serialisable"):
        encode_accumulator(acc, "x")
