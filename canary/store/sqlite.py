"""SQLite store: one embedded file that survives restarts and is shared by local workers.

Every blocking call runs on one dedicated worker thread that owns the connection, so the
event loop never waits on the disk. The file is in WAL mode (readers never block the writer)
with ``synchronous=NORMAL`` (a power loss may drop the last transactions, never corrupt the
file). Read-modify-write operations run in ``BEGIN IMMEDIATE`` transactions, which take the
write lock up front: several processes merging sample deltas into one file wait for each
other (up to the busy timeout) instead of losing an update.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from canary.errors import FencedError, StoreError
from canary.observe import RolloutAccumulator
from canary.store._history import DEFAULT_MAX_HISTORY, check_max_points, thin
from canary.store._protocol import (
    DEFAULT_MAX_DECISIONS,
    DEFAULT_MAX_INPUT_PROCESSES,
    MARKED,
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
    encode_accumulator,
    judge_claim,
    merge_in_pieces,
)

T = TypeVar("T")

BUSY_TIMEOUT = 5.0  # seconds a writer waits for another process's transaction

# MIGRATIONS[v] takes a database from schema version v to v + 1 (the version is kept in
# PRAGMA user_version; 0 is a new file). A later version appends one entry, never edits one.
# Plain CREATE (no IF NOT EXISTS): a version-0 file that already has these tables is not ours.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE state (rollout TEXT PRIMARY KEY, data TEXT NOT NULL,"
        " updated_at REAL NOT NULL)",
        "CREATE TABLE samples (rollout TEXT PRIMARY KEY, data TEXT NOT NULL,"
        " updated_at REAL NOT NULL)",
        "CREATE TABLE decisions (id INTEGER PRIMARY KEY AUTOINCREMENT, rollout TEXT NOT NULL,"
        " at REAL NOT NULL, data TEXT NOT NULL)",
        "CREATE INDEX decisions_rollout_id ON decisions (rollout, id)",
    ),
    (
        # One row: the leadership lease. ``token`` stays when the lease ends (holder NULL),
        # so that tokens only grow and a fenced writer can never be mistaken for a new one.
        "CREATE TABLE lease (id INTEGER PRIMARY KEY CHECK (id = 1), holder TEXT,"
        " token INTEGER NOT NULL, expires_at REAL NOT NULL)",
        "INSERT INTO lease (id, holder, token, expires_at) VALUES (1, NULL, 0, 0)",
    ),
    (
        # Every write of a samples row draws a new random etag (new_etag), so a store that
        # finds the etag it last wrote knows the row is still what it wrote and merges into
        # the copy it kept, without decoding the row (add_samples). 0: written before.
        "ALTER TABLE samples ADD COLUMN etag INTEGER NOT NULL DEFAULT 0",
        # A writer that does not know etags (an operator's UPDATE, a tool) still changes it:
        # a kept copy is never taken for data it did not write. (Not recursive: the inner
        # UPDATE changes the etag, so the WHEN is false anyway.)
        "CREATE TRIGGER samples_etag AFTER UPDATE ON samples WHEN NEW.etag = OLD.etag"
        " BEGIN UPDATE samples SET etag = (random() & 4611686018427387903) + 1"
        " WHERE rollout = NEW.rollout; END",
    ),
    (
        # Shared input health: each process's absolute input counts per rollout (JSON), the
        # last `keep` written kept (put_input_health). `seq` orders the writes (a counter in
        # the file: the processes' clocks need not agree).
        "CREATE TABLE input_health (rollout TEXT NOT NULL, process TEXT NOT NULL,"
        " data TEXT NOT NULL, seq INTEGER NOT NULL, updated_at REAL NOT NULL,"
        " PRIMARY KEY (rollout, process))",
        "CREATE INDEX input_health_seq ON input_health (rollout, seq)",
    ),
    (
        # Shared feedback answers: each analysed answer by request id, claimed at most once
        # (claim_answers); `at` in Unix seconds of the serving process. `data` NULL: a
        # claimed marker of answers the claimer held itself. `claimed`: the claim's token.
        "CREATE TABLE answers (rollout TEXT NOT NULL, request_id TEXT NOT NULL,"
        " at REAL NOT NULL, data TEXT, seen INTEGER NOT NULL, predicted INTEGER NOT NULL,"
        " claimed TEXT NOT NULL DEFAULT '', PRIMARY KEY (rollout, request_id))",
        "CREATE INDEX answers_at ON answers (rollout, at)",
        # Rows per rollout, kept by triggers, so that trimming to max_entries walks only the
        # rows it deletes (an upsert that updates fires no INSERT trigger).
        "CREATE TABLE answer_counts (rollout TEXT PRIMARY KEY, n INTEGER NOT NULL)",
        "CREATE TRIGGER answers_added AFTER INSERT ON answers BEGIN"
        " INSERT INTO answer_counts (rollout, n) VALUES (NEW.rollout, 1)"
        " ON CONFLICT (rollout) DO UPDATE SET n = n + 1; END",
        "CREATE TRIGGER answers_removed AFTER DELETE ON answers BEGIN"
        " UPDATE answer_counts SET n = n - 1 WHERE rollout = OLD.rollout; END",
    ),
    (
        # Metric history: one row per point (JSON), sorted by (at, id); `keep` marks the
        # points thinning never drops (decisions). Bounded per rollout by append_history.
        "CREATE TABLE history (id INTEGER PRIMARY KEY AUTOINCREMENT, rollout TEXT NOT NULL,"
        " at REAL NOT NULL, keep INTEGER NOT NULL, data TEXT NOT NULL)",
        "CREATE INDEX history_rollout_at ON history (rollout, at, id)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the original error says more; sqlite rolls back on close anyway
        raise


class SQLiteStore:
    """A :class:`~canary.store.Store` in one SQLite file.

    Parameters
    ----------
    path
        The database file; created on :meth:`open` when absent. Its directory must exist.
    max_decisions
        Decision log entries kept per rollout; appending deletes older ones.
    clock
        Unix seconds, for the lease's expiry (a manual clock in tests).

    Notes
    -----
    Several stores (in one process or several) may use the same file at once; every write is
    one transaction. The schema version is ``PRAGMA user_version``; a file written by a newer
    canary is refused rather than guessed at.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_decisions: int = DEFAULT_MAX_DECISIONS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_max_decisions(max_decisions)
        self.path = os.fspath(path)
        self.max_decisions = max_decisions
        self._clock = clock  # Unix seconds for the lease: every process of one machine agrees
        # One worker: sqlite connections belong to the thread that made them, and a single
        # thread also serialises this store's calls in submission order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="canary-store")
        self._conn: sqlite3.Connection | None = None  # touched only on the worker thread
        self._opened = False
        self._closed = False
        # (st_dev, st_ino) of the file the connection has open, to notice it deleted or
        # replaced (writes then go to a file nobody will read again).
        self._identity: tuple[int, int] | None = None
        self._job_started: float | None = None  # monotonic start of the running call
        # rollout -> (etag, accumulator): the samples row as this store last wrote or read
        # it; touched only on the worker thread (see add_samples).
        self._samples_kept: dict[str, tuple[int, RolloutAccumulator]] = {}

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    async def _run(self, what: str, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreError(f"state store {self.path} is closed")
        if not self._opened:
            raise StoreError(f"state store {self.path} is not open; call open() first")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._call, job)
        except (sqlite3.Error, OSError, UnicodeError) as exc:  # Unicode: names with lone surrogates
            raise StoreError(f"state store {self.path}: cannot {what}: {exc}") from exc

    def _call(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:  # only if close() raced ahead of a queued call
            raise StoreError(f"state store {self.path} is closed")
        self._job_started = time.monotonic()
        try:
            return job(self._conn)
        finally:
            self._job_started = None

    # -- health ---------------------------------------------------------------------------

    def health(self, stall: float) -> str | None:
        """Why this store cannot be trusted to write now, or None when it can.

        A call running for more than ``stall`` seconds (a hung disk, e.g. a frozen file
        system), or the file deleted or replaced since it was opened (SQLite would go on
        writing into the unlinked inode: nothing would survive a restart). Synchronous and
        cheap (one ``stat``); it does not wait for the store's worker thread, so it answers
        while that thread hangs. Run it off the event loop where ``stat`` itself may hang.
        """
        started = self._job_started
        if started is not None and time.monotonic() - started > stall:
            return (
                f"a call to state store {self.path} has not finished after "
                f"{time.monotonic() - started:.1f}s (disk hung?)"
            )
        identity = self._identity
        if identity is None or self._closed:
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return f"state file {self.path} was deleted while canary had it open"
        except OSError as exc:
            return f"cannot stat state file {self.path}: {exc}"
        if (st.st_dev, st.st_ino) != identity:
            return (
                f"state file {self.path} was replaced by another file while canary had it "
                "open; restart canary to use it"
            )
        return None

    def deleted(self) -> bool:
        """The file this store opened no longer exists at its path (see :meth:`reopen`)."""
        return self._identity is not None and not os.path.lexists(self.path)

    async def reopen(self) -> None:
        """Close the connection and open the path again (a new, empty file if it was deleted).

        The caller writes back what the old file held; raises StoreError.
        """
        if self._closed or not self._opened:
            raise StoreError(f"state store {self.path} is not open")
        loop = asyncio.get_running_loop()

        def job() -> None:
            self._disconnect()  # the last connection: SQLite checkpoints and drops its WAL
            if not os.path.lexists(self.path):
                for suffix in ("-wal", "-shm"):  # the deleted file's: never replay them
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path + suffix)
            self._connect()

        try:
            await loop.run_in_executor(self._executor, job)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot reopen state store {self.path}: {exc}") from exc

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        if self._closed:
            raise StoreError(f"state store {self.path} is closed")
        if self._opened:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._connect)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open state store {self.path}: {exc}") from exc
        self._opened = True

    def _connect(self) -> None:
        if self._conn is not None:  # a concurrent open() got here first (calls run in order)
            return
        if self.path != ":memory:":
            parent = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(parent):
                raise StoreError(
                    f"cannot open state store {self.path}: directory {parent} does not exist"
                )
        # isolation_level=None: no implicit transactions, _transaction() says where they are.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            # Check the version before changing anything: the first read of a file that is
            # not a database fails here, and a newer canary's file is left as it was.
            self._check_version(conn)
            _set_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate(conn)
            if self.path not in ("", ":memory:") and not self.path.startswith("file:"):
                st = os.stat(self.path)
                self._identity = (st.st_dev, st.st_ino)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _check_version(self, conn: sqlite3.Connection) -> int:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"state store {self.path}: schema version {version} is newer than this canary"
                f" supports ({SCHEMA_VERSION}); upgrade canary"
            )
        return version

    def _migrate(self, conn: sqlite3.Connection) -> None:
        if self._check_version(conn) == SCHEMA_VERSION:
            return
        with _transaction(conn):
            # Re-read under the write lock: another process may have migrated meanwhile.
            for version in range(self._check_version(conn), SCHEMA_VERSION):
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
            # PRAGMA takes no parameters; the value is our own int. It is transactional.
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            # Queued behind every call already submitted, so those finish first.
            await loop.run_in_executor(self._executor, self._disconnect)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot close state store {self.path}: {exc}") from exc
        finally:
            self._executor.shutdown(wait=False)

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- state ----------------------------------------------------------------------------

    async def get_state(self, rollout: str) -> dict[str, Any] | None:
        what = f"state of rollout {rollout!r} in {self.path}"

        def job(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute("SELECT data FROM state WHERE rollout = ?", (rollout,)).fetchone()
            return None if row is None else decode(row[0], what)

        return await self._run(f"read state of rollout {rollout!r}", job)

    async def put_state(
        self, rollout: str, state: dict[str, Any], *, fence: int | None = None
    ) -> None:
        # Encoded here, before awaiting: the caller may change ``state`` once we yield.
        text = encode(state, f"state of rollout {rollout!r}")

        def job(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                self._fenced(conn, fence, f"state of rollout {rollout!r}")
                conn.execute(
                    "INSERT INTO state (rollout, data, updated_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (rollout) DO UPDATE SET"
                    " data = excluded.data, updated_at = excluded.updated_at",
                    (rollout, text, time.time()),
                )

        await self._run(f"write state of rollout {rollout!r}", job)

    # -- samples --------------------------------------------------------------------------

    async def add_samples(
        self, rollout: str, delta: RolloutAccumulator, *, batch: tuple[str, int] | None = None
    ) -> None:
        """Merge ``delta`` into the row in one write transaction (``batch`` is not needed: a
        local commit's outcome is always known to the caller).

        Decoding the stored totals is most of a flush's cost (milliseconds for a rollout
        with many signals, holding the GIL the proxy's event loop needs). So the store keeps
        the accumulator it last wrote, with the row's etag: when the row still carries that
        etag nobody wrote it since (every write draws a new one), and the delta is merged
        into the kept copy; otherwise (another process wrote, a reset, a new file) the row
        is decoded as before. The kept copy is taken out for the call and put back only
        once the transaction committed, so a failed write never leaves a wrong one.
        """
        copy = delta.snapshot()  # taken now: the caller may record into ``delta`` later
        what = f"samples of rollout {rollout!r} in {self.path}"

        def job(conn: sqlite3.Connection) -> None:
            kept = self._samples_kept.pop(rollout, None)
            with _transaction(conn):
                row = _read_samples(conn, rollout, kept)
                if row is None:
                    merged = copy
                else:
                    merged = _kept_or_decoded(row[1], kept, what)
                    if merged.accuracy != copy.accuracy:
                        raise StoreError(
                            f"cannot add {what}: cannot merge accumulators of accuracy"
                            f" {copy.accuracy} into {merged.accuracy}"
                        )
                    merge_in_pieces(merged, copy)
                etag = new_etag()
                conn.execute(
                    "INSERT INTO samples (rollout, data, updated_at, etag) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (rollout) DO UPDATE SET data = excluded.data,"
                    " updated_at = excluded.updated_at, etag = excluded.etag",
                    (rollout, encode_accumulator(merged, what), time.time(), etag),
                )
            self._samples_kept[rollout] = (etag, merged)

        await self._run(f"add samples of rollout {rollout!r}", job)

    async def get_samples(self, rollout: str) -> RolloutAccumulator | None:
        """The merged totals: a copy of the kept accumulator when the row still carries its
        etag (see :meth:`add_samples`), else the row decoded (and kept)."""
        what = f"samples of rollout {rollout!r} in {self.path}"

        def job(conn: sqlite3.Connection) -> RolloutAccumulator | None:
            kept = self._samples_kept.get(rollout)
            row = _read_samples(conn, rollout, kept)
            if row is None:
                return None
            acc = _kept_or_decoded(row[1], kept, what)
            if row[1] is None:  # the kept one
                return acc.snapshot()
            if row[0] != 0:  # 0: written before etags, not one value per write
                self._samples_kept[rollout] = (row[0], acc)
                return acc.snapshot()  # the caller's to change; the kept one is ours
            return acc

        return await self._run(f"read samples of rollout {rollout!r}", job)

    # -- decisions ------------------------------------------------------------------------

    async def append_decision(
        self, rollout: str, entry: dict[str, Any], *, fence: int | None = None
    ) -> None:
        text = encode(entry, f"decision of rollout {rollout!r}")
        keep = self.max_decisions

        def job(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                self._fenced(conn, fence, f"decision of rollout {rollout!r}")
                conn.execute(
                    "INSERT INTO decisions (rollout, at, data) VALUES (?, ?, ?)",
                    (rollout, time.time(), text),
                )
                # The (rollout, id) index makes this a walk of at most `keep` index entries;
                # decisions are appended seconds apart, so that is cheap enough.
                conn.execute(
                    "DELETE FROM decisions WHERE rollout = ?1 AND id <= ("
                    "SELECT id FROM decisions WHERE rollout = ?1"
                    " ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                    (rollout, keep),
                )

        await self._run(f"append a decision of rollout {rollout!r}", job)

    async def decisions(self, rollout: str, limit: int = 100) -> list[dict[str, Any]]:
        check_limit(limit)  # sqlite reads a negative LIMIT as "no limit"
        what = f"decision of rollout {rollout!r} in {self.path}"

        def job(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT data FROM decisions WHERE rollout = ? ORDER BY id DESC LIMIT ?",
                (rollout, limit),
            ).fetchall()
            return [decode(text, what) for (text,) in reversed(rows)]

        return await self._run(f"read decisions of rollout {rollout!r}", job)

    # -- rollouts -------------------------------------------------------------------------

    async def reset(self, rollout: str, *, fence: int | None = None) -> None:
        def job(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                self._fenced(conn, fence, f"reset of rollout {rollout!r}")
                for table in ("state", "samples", "decisions", "history"):
                    conn.execute(f"DELETE FROM {table} WHERE rollout = ?", (rollout,))

        await self._run(f"reset rollout {rollout!r}", job)

    async def rollouts(self) -> list[str]:
        def job(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT rollout FROM state UNION SELECT rollout FROM samples"
                " UNION SELECT rollout FROM decisions"
            ).fetchall()
            return sorted(name for (name,) in rows)

        return await self._run("list rollouts", job)

    # -- the leadership lease -------------------------------------------------------------

    def _lease_row(self, conn: sqlite3.Connection) -> tuple[str | None, int, float]:
        row = conn.execute("SELECT holder, token, expires_at FROM lease WHERE id = 1").fetchone()
        if row is None:
            raise StoreError(f"state store {self.path}: the lease row is missing")
        holder, token, expires_at = row
        if holder is not None and expires_at <= self._clock():
            holder = None  # ran out: nobody holds it
        return holder, int(token), float(expires_at)

    def _fenced(self, conn: sqlite3.Connection, fence: int | None, what: str) -> None:
        """Inside the write's transaction: refuse it unless ``fence`` is the running lease's."""
        if fence is None:
            return
        holder, token, _ = self._lease_row(conn)
        if holder is None or token != fence:
            raise FencedError(
                f"state store {self.path}: refused to write the {what}: lease token {fence}"
                " is no longer the leader's"
            )

    async def acquire_lease(self, holder: str, ttl: float) -> int | None:
        check_lease_request(holder, ttl)

        def job(conn: sqlite3.Connection) -> int | None:
            with _transaction(conn):
                current, token, _ = self._lease_row(conn)
                if current is not None and current != holder:
                    return None
                if current is None:
                    token += 1  # a new holder (or the same one after its lease ran out)
                conn.execute(
                    "UPDATE lease SET holder = ?, token = ?, expires_at = ? WHERE id = 1",
                    (holder, token, self._clock() + ttl),
                )
                return token

        return await self._run("take the leadership lease", job)

    async def release_lease(self, holder: str) -> None:
        def job(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                current, _, _ = self._lease_row(conn)
                if current == holder:
                    conn.execute("UPDATE lease SET holder = NULL, expires_at = 0 WHERE id = 1")

        await self._run("release the leadership lease", job)

    async def lease(self) -> Lease | None:
        def job(conn: sqlite3.Connection) -> Lease | None:
            holder, token, expires_at = self._lease_row(conn)
            return None if holder is None else Lease(holder, token, expires_at)

        return await self._run("read the leadership lease", job)

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
        text = encode(entry, f"input health of rollout {rollout!r}")

        def job(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute(
                    "INSERT INTO input_health (rollout, process, data, seq, updated_at)"
                    " VALUES (?1, ?2, ?3, (SELECT coalesce(max(seq), 0) + 1 FROM input_health"
                    " WHERE rollout = ?1), ?4) ON CONFLICT (rollout, process) DO UPDATE SET"
                    " data = excluded.data, seq = excluded.seq, updated_at = excluded.updated_at",
                    (rollout, process, text, time.time()),
                )
                # A walk of at most `keep` index entries, as for the decisions.
                conn.execute(
                    "DELETE FROM input_health WHERE rollout = ?1 AND seq <= ("
                    "SELECT seq FROM input_health WHERE rollout = ?1"
                    " ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
                    (rollout, keep),
                )

        await self._run(f"write input health of rollout {rollout!r}", job)

    async def input_health(self, rollout: str) -> dict[str, dict[str, Any]]:
        what = f"input health of rollout {rollout!r} in {self.path}"

        def job(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            rows = conn.execute(
                "SELECT process, data FROM input_health WHERE rollout = ? ORDER BY seq",
                (rollout,),
            ).fetchall()
            return {str(process): decode(text, what) for process, text in rows}

        return await self._run(f"read input health of rollout {rollout!r}", job)

    async def drop_input_health(self, rollout: str, processes: Sequence[str] | None = None) -> None:
        names = None if processes is None else list(processes)

        def job(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                if names is None:
                    conn.execute("DELETE FROM input_health WHERE rollout = ?", (rollout,))
                else:
                    conn.executemany(
                        "DELETE FROM input_health WHERE rollout = ? AND process = ?",
                        [(rollout, name) for name in names],
                    )

        await self._run(f"drop input health of rollout {rollout!r}", job)

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
        rows = [
            (rollout, a.request_id, a.at, a.data, int(a.seen), int(a.predicted)) for a in answers
        ]
        cutoff = (self._clock() if now is None else now) - 2 * ttl

        def job(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany(
                    "INSERT INTO answers (rollout, request_id, at, data, seen, predicted)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (rollout, request_id) DO UPDATE SET"
                    " at = excluded.at, data = excluded.data, seen = excluded.seen,"
                    " predicted = excluded.predicted WHERE answers.claimed = ''",
                    rows,
                )
                conn.execute("DELETE FROM answers WHERE rollout = ? AND at <= ?", (rollout, cutoff))
                row = conn.execute(
                    "SELECT n FROM answer_counts WHERE rollout = ?", (rollout,)
                ).fetchone()
                extra = 0 if row is None else int(row[0]) - max_entries
                if extra > 0:  # the oldest go: a walk of the rows deleted only
                    conn.execute(
                        "DELETE FROM answers WHERE rowid IN (SELECT rowid FROM answers"
                        " WHERE rollout = ? ORDER BY at, rowid LIMIT ?)",
                        (rollout, extra),
                    )

        await self._run(f"write feedback answers of rollout {rollout!r}", job)

    async def claim_answers(
        self,
        rollouts: Mapping[str, float],
        claims: Sequence[AnswerClaim],
        *,
        now: float | None = None,
    ) -> list[ClaimResult | None]:
        check_claims(rollouts, claims)
        when = self._clock() if now is None else now
        order = list(rollouts.items())

        def job(conn: sqlite3.Connection) -> list[ClaimResult | None]:
            out: list[ClaimResult | None] = []
            with _transaction(conn):  # the write lock up front: one claimer at a time
                for claim in claims:
                    result: ClaimResult | None = None
                    for name, ttl in order:
                        row = conn.execute(
                            "SELECT at, data, seen, predicted, claimed FROM answers"
                            " WHERE rollout = ? AND request_id = ?",
                            (name, claim.request_id),
                        ).fetchone()
                        if row is None:
                            continue
                        at, data, seen, predicted, by = row
                        kept = (float(at), data, bool(seen), bool(predicted), str(by))
                        result, take = judge_claim(name, claim, ttl, when, kept)
                        if take:
                            conn.execute(
                                "UPDATE answers SET claimed = ? WHERE rollout = ?"
                                " AND request_id = ?",
                                (claim.token, name, claim.request_id),
                            )
                        break
                    if result is None and claim.local is not None:
                        name, at = claim.local
                        conn.execute(  # no row of the id in this rollout (looked above)
                            "INSERT INTO answers (rollout, request_id, at, data, seen,"
                            " predicted, claimed) VALUES (?, ?, ?, NULL, 0, 0, ?)",
                            (name, claim.request_id, at, claim.token),
                        )
                        result = ClaimResult(name, MARKED, at, None)
                    out.append(result)
            return out

        return await self._run("claim feedback answers", job)

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
        """One transaction: the point inserted, then (about once per ``max_points / 4``
        appends) the rollout's points read by the (rollout, at) index and the thinned ones
        deleted."""
        check_max_points(max_points)
        text = encode(point, f"history of rollout {rollout!r}")
        when = float(at)
        if not math.isfinite(when):
            raise StoreError(f"cannot store history of rollout {rollout!r}: time {at!r}")

        def job(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                self._fenced(conn, fence, f"history of rollout {rollout!r}")
                conn.execute(
                    "INSERT INTO history (rollout, at, keep, data) VALUES (?, ?, ?, ?)",
                    (rollout, when, int(keep), text),
                )
                (count,) = conn.execute(
                    "SELECT count(*) FROM history WHERE rollout = ?", (rollout,)
                ).fetchone()
                if count <= max_points:
                    return
                rows = conn.execute(
                    "SELECT id, at, keep FROM history WHERE rollout = ? ORDER BY at, id",
                    (rollout,),
                ).fetchall()
                drop = thin([r[1] for r in rows], [bool(r[2]) for r in rows], max_points)
                conn.executemany("DELETE FROM history WHERE id = ?", [(rows[i][0],) for i in drop])

        await self._run(f"append history of rollout {rollout!r}", job)

    async def history(self, rollout: str, since: float | None = None) -> list[dict[str, Any]]:
        what = f"history of rollout {rollout!r} in {self.path}"
        after = -math.inf if since is None else float(since)

        def job(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT data FROM history WHERE rollout = ? AND at > ? ORDER BY at, id",
                (rollout, after),
            ).fetchall()
            return [decode(text, what) for (text,) in rows]

        return await self._run(f"read history of rollout {rollout!r}", job)


def new_etag() -> int:
    """A samples row's etag: a random 63-bit integer, never 0 (rows written before etags).

    Random rather than a counter: a counter restarts with a rollout reset or a file restored
    from a backup and could then give another content the etag a store kept; two random
    draws collide with probability 2**-63. From the OS (``secrets``), never from a PRNG seeded
    before ``--workers`` forks: forked workers would draw the same sequence.
    """
    return secrets.randbelow((1 << 63) - 1) + 1


def _read_samples(
    conn: sqlite3.Connection, rollout: str, kept: tuple[int, RolloutAccumulator] | None
) -> tuple[int, str | None] | None:
    """The row's (etag, data), data None when the etag is the kept one's (not read)."""
    row: tuple[int, str | None] | None = conn.execute(
        "SELECT etag, CASE WHEN etag = ? THEN NULL ELSE data END FROM samples WHERE rollout = ?",
        (None if kept is None else kept[0], rollout),
    ).fetchone()
    return row


def _kept_or_decoded(
    data: str | None, kept: tuple[int, RolloutAccumulator] | None, what: str
) -> RolloutAccumulator:
    """The accumulator of a row read by :func:`_read_samples`: the kept one when its data
    was not read (the etags matched), else the data decoded."""
    if data is not None:
        return _accumulator(decode(data, what), what)
    if kept is None:  # data is NOT NULL: only the etag match leaves it out
        raise StoreError(f"corrupt {what}: the row has no data")
    return kept[1]


def _accumulator(data: dict[str, Any], what: str) -> RolloutAccumulator:
    try:
        return RolloutAccumulator.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StoreError(f"corrupt {what}: {exc!r}") from exc


def _set_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, waiting out another process doing the same.

    Changing the journal mode does not go through SQLite's busy handler, so two canaries
    opening one fresh file at the same moment get "database is locked" here at once.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


__all__ = [
    "BUSY_TIMEOUT",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SQLiteStore",
    "new_etag",
]
