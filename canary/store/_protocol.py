"""The :class:`Store` Protocol and the JSON helpers every backend shares."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from canary.errors import StoreDataLost, StoreError
from canary.observe import RolloutAccumulator
from canary.store._history import DEFAULT_MAX_HISTORY

DEFAULT_MAX_DECISIONS = 10_000
DEFAULT_MAX_INPUT_PROCESSES = 1000  # input-health entries kept per rollout (shared input health)


@dataclass(frozen=True, slots=True)
class Lease:
    """The leadership lease: who holds it, its fencing token, and when it runs out (Unix
    seconds by the store's clock)."""

    holder: str
    token: int
    expires_at: float


@runtime_checkable
class Store(Protocol):
    """Persistent state of every rollout: controller state, merged samples, decision log.

    Every method is a coroutine. A store is opened once (:meth:`open`), used, and closed once
    (:meth:`close`); any other call after :meth:`close` raises
    :class:`~canary.errors.StoreError`. A store never aliases the caller's objects: what goes
    in is copied, what comes out is a fresh copy. Every backend failure is raised as
    :class:`~canary.errors.StoreError`.
    """

    async def open(self) -> None:
        """Create or migrate the schema; idempotent."""

    async def close(self) -> None:
        """Release the backend; closing twice is fine."""

    async def get_state(self, rollout: str) -> dict[str, Any] | None:
        """Return the state last put for ``rollout``, or None."""

    async def put_state(
        self, rollout: str, state: dict[str, Any], *, fence: int | None = None
    ) -> None:
        """Replace the state of ``rollout`` with ``state`` (a JSON-serialisable dict).

        ``fence``: the fencing token of the writer's lease (:meth:`acquire_lease`); when given
        and it is not the token of the lease running now, nothing is written and
        :class:`~canary.errors.FencedError` is raised (checked atomically with the write).
        """

    async def add_samples(
        self, rollout: str, delta: RolloutAccumulator, *, batch: tuple[str, int] | None = None
    ) -> None:
        """Merge ``delta`` into the stored accumulator of ``rollout`` (created if absent).

        ``batch``: ``(writer, number)``, numbers growing per writer and rollout. A writer
        whose call failed sends the same delta with the same batch again: a store whose
        answer can be lost after the write landed (Redis over a network) merges a batch at
        most once, so the retry never counts it twice."""

    async def get_samples(self, rollout: str) -> RolloutAccumulator | None:
        """Return the merged accumulator of ``rollout``, or None when nothing was added."""

    async def append_decision(
        self, rollout: str, entry: dict[str, Any], *, fence: int | None = None
    ) -> None:
        """Append ``entry`` (a JSON-serialisable dict) to the decision log of ``rollout``
        (``fence`` as in :meth:`put_state`)."""

    async def decisions(self, rollout: str, limit: int = 100) -> list[dict[str, Any]]:
        """Return the last ``limit`` decisions of ``rollout``, oldest first."""

    async def reset(self, rollout: str, *, fence: int | None = None) -> None:
        """Forget state, samples and decisions of ``rollout`` (a new rollout of that name;
        ``fence`` as in :meth:`put_state`)."""

    async def rollouts(self) -> list[str]:
        """Return the sorted names of the rollouts with any state, samples or decisions."""

    async def acquire_lease(self, holder: str, ttl: float) -> int | None:
        """Take the leadership lease for ``holder`` for ``ttl`` seconds, or renew it when
        ``holder`` holds it already; return its fencing token when ``holder`` holds the lease
        after the call, None while another holder's lease runs.

        The token grows at every change of holder and is never reused (it survives the
        clients' restarts: it is kept in the store), so a leader that lost its lease while
        paused or partitioned cannot write with its old token (``fence`` of the writes).
        Renewing keeps the token.
        """

    async def release_lease(self, holder: str) -> None:
        """End the lease now if ``holder`` holds it (a clean stop hands over at once)."""

    async def lease(self) -> Lease | None:
        """The lease running now, or None when nobody holds one."""

    # -- shared input health --

    async def put_input_health(
        self,
        rollout: str,
        process: str,
        entry: dict[str, Any],
        *,
        keep: int = DEFAULT_MAX_INPUT_PROCESSES,
    ) -> None:
        """Replace the input-health entry of ``process`` for ``rollout`` with ``entry`` (a
        JSON-serialisable dict: the process's absolute counts, so a retried write never
        counts twice); then keep only the ``keep`` entries of ``rollout`` written last
        (entries of processes that stopped stay until then: their counts must not vanish)."""

    async def input_health(self, rollout: str) -> dict[str, dict[str, Any]]:
        """Every input-health entry of ``rollout``, by process (empty when none)."""

    async def drop_input_health(self, rollout: str, processes: Sequence[str] | None = None) -> None:
        """Forget the input-health entries of ``processes`` for ``rollout`` (None: all)."""

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
        """Keep ``answers`` of ``rollout`` for feedback posted to any process: each replaces
        the entry of its request id unless that entry was claimed (:meth:`claim_answers`).

        Then the entries older than twice ``ttl`` (Unix seconds ``now``, default the store's
        clock; the second ``ttl`` only tells late feedback that it is ``expired``) are dropped,
        and the oldest beyond the newest ``max_entries`` (expired ones go first). Idempotent:
        a resend writes the same entries again."""

    async def claim_answers(
        self,
        rollouts: Mapping[str, float],
        claims: Sequence[AnswerClaim],
        *,
        now: float | None = None,
    ) -> list[ClaimResult | None]:
        """Claim each stored answer at most once, over every process; one atomic step.

        ``rollouts``: rollout name -> its ``ttl``, in the order they are looked in. Per claim
        (in order, so a second claim of an id in the same call sees the first), the first
        rollout holding an entry of the id decides: ``taken`` when a claim with another token
        took it, ``expired`` when it is ``ttl`` old (Unix seconds ``now``), ``unmet`` when it
        lacks what the claim needs (``need``; nothing claimed: the caller reports why), else
        ``claimed`` (with its data; a claim with the same token gets it again, so a resend is
        safe). No entry anywhere: with ``local`` set, a claimed entry of that rollout and time
        is written (``marked``: the caller has the answers itself, and a later
        :meth:`put_answers` of them changes nothing), else None."""

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
        """Append ``point`` (a JSON-serialisable dict) at Unix time ``at`` to the history of
        ``rollout``; ``keep``: a point never thinned (a decision). Then, in the same atomic
        step, when more than ``max_points`` are kept, thin them
        (:func:`canary.store._history.thin`: resolution proportional to age; the first, the
        newest and the ``keep`` points stay). ``fence`` as in :meth:`put_state`;
        :meth:`reset` forgets the history. Not idempotent: a resend may add the point twice
        (harmless: the same values at the same time)."""

    async def history(self, rollout: str, since: float | None = None) -> list[dict[str, Any]]:
        """The history points of ``rollout`` kept now, sorted by time (then by append),
        oldest first; with ``since``, only those at a time after it."""


@runtime_checkable
class FileBackedStore(Protocol):
    """A store whose file can go bad under it (hang, deletion): what the controller's
    watchdog asks (:class:`~canary.store.SQLiteStore` implements it; memory has no file)."""

    def health(self, stall: float) -> str | None:
        """Why the store cannot be trusted to write now, or None; synchronous and cheap."""
        ...

    def deleted(self) -> bool:
        """The file the store opened no longer exists at its path."""
        ...

    async def reopen(self) -> None:
        """Open the path again (the caller writes back what the old file held)."""
        ...


@runtime_checkable
class IdentifiedStore(Protocol):
    """A store that can lose all its data behind canary's back (a Redis restarted without
    persistence): it names itself at :meth:`Store.open` and says whether it still is the
    same store (:class:`~canary.store.RedisStore` implements it)."""

    @property
    def store_id(self) -> str | None:
        """The store's id as seen at open (None before)."""
        ...

    async def identity(self) -> str | None:
        """The store's id now; None or another id: its data is gone."""
        ...


async def check_identity(store: Store) -> None:
    """Raise StoreDataLost when ``store`` lost its data since it was opened (a Redis restarted
    empty): canary must hold rather than start afresh a rollout it had rolled back. A store
    that cannot be reached raises a plain StoreError (that may pass)."""
    if not isinstance(store, IdentifiedStore):
        return
    now = await store.identity()
    if now is None or now != store.store_id:
        raise StoreDataLost(
            "the state store lost its data since canary opened it (a Redis restarted without "
            "persistence, flushed, or failed over to an empty replica): holding every "
            "rollout rather than starting them afresh; restore the data, or restart canary "
            "to begin new rollouts on the empty store"
        )


def let_go() -> None:
    """Let the event loop's thread have the GIL if it waits for it (a zero sleep drops it).

    A store's thread (SQLite's, or the one Redis merges run in) shares the GIL with the
    proxy's event loop: a piece of pure Python
    work (merging, encoding the totals) holds it until it ends or the switch interval (5 ms)
    runs out, and every request arriving meanwhile waits that long (the benchmark's added
    p99). Working in pieces of a fraction of a millisecond with this between them bounds
    that wait; the flush itself takes a little longer, off the hot path.
    """
    time.sleep(0)


_DUMP = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def _dump_in_pieces(value: Any, depth: int) -> str:
    """``json.dumps`` of ``value`` (compact, no NaN), the items of dicts ``depth`` levels
    down encoded one at a time with :func:`let_go` between them."""
    if depth <= 0 or not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        return _DUMP(value)
    items = []
    for key, item in value.items():
        items.append(f"{_DUMP(key)}:{_dump_in_pieces(item, depth - 1)}")
        let_go()
    return "{" + ",".join(items) + "}"


def encode_accumulator(acc: RolloutAccumulator, what: str) -> str:
    """``encode(acc.to_dict(), what)``, byte for byte, in pieces (see :func:`let_go`): each
    arm's dict built on its own, the signals' encoded one at a time.

    The layout (version, accuracy, one key per arm) is the accumulator's own: taken from an
    empty one of the same accuracy, whose arms are then replaced by ``acc``'s.
    """
    try:
        shell = RolloutAccumulator(acc.accuracy).to_dict()
        items = []
        for key, value in shell.items():
            arm = acc.arms.get(key)
            if arm is None:
                items.append(f"{_DUMP(key)}:{_DUMP(value)}")
                continue
            data = arm.to_dict()
            let_go()
            items.append(f"{_DUMP(key)}:{_dump_in_pieces(data, 2)}")
        return "{" + ",".join(items) + "}"
    except (TypeError, ValueError) as exc:  # unserialisable type, nan/inf
        raise StoreError(f"cannot store {what}: not JSON-serialisable ({exc})") from exc


def merge_in_pieces(into: RolloutAccumulator, delta: RolloutAccumulator) -> None:
    """``into.merge(delta)`` one arm at a time, with :func:`let_go` between them (the caller
    checked that the accuracies agree)."""
    for arm, part in into.arms.items():
        part.merge(delta.arms[arm])
        let_go()


def encode(value: dict[str, Any], what: str) -> str:
    """Serialise ``value`` compactly; StoreError naming ``what`` when it is not valid JSON."""
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:  # unserialisable type, nan/inf, circular reference
        raise StoreError(f"cannot store {what}: not JSON-serialisable ({exc})") from exc


def decode(text: str, what: str) -> dict[str, Any]:
    """Parse a stored JSON object; StoreError naming ``what`` when it is corrupt."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"corrupt {what}: {exc}") from exc
    if not isinstance(value, dict):
        raise StoreError(f"corrupt {what}: expected a JSON object, got {type(value).__name__}")
    return value


def check_lease_request(holder: str, ttl: float) -> None:
    """The arguments of :meth:`Store.acquire_lease`: a non-empty holder, a positive TTL."""
    if not isinstance(holder, str) or not holder:
        raise StoreError(f"a lease holder must be a non-empty string, got {holder!r}")
    if not ttl > 0:
        raise StoreError(f"a lease TTL must be a positive number of seconds, got {ttl!r}")


# -- shared feedback answers --

CLAIMED = "claimed"  # claimed by this call (or an earlier one with the same token)
MARKED = "marked"  # nothing stored: the claimer's own answers, claimed in the store now
TAKEN = "taken"  # claimed before by another token: a duplicate
EXPIRED = "expired"  # older than the rollout's ttl
UNMET = "unmet"  # stored, but without what the claim needs: not claimed
NEEDS = ("", "seen", "predicted")


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """What a process keeps in the store of one request id's answers (shared feedback)."""

    request_id: str
    at: float  # Unix seconds of the answer, by the serving process's clock
    data: str  # the answers, encoded by the caller (opaque to the store)
    seen: bool = True  # it holds the answer the user saw
    predicted: bool = True  # it holds at least one prediction


@dataclass(frozen=True, slots=True)
class AnswerClaim:
    """One id to claim (:meth:`Store.claim_answers`)."""

    request_id: str
    token: str  # the claimer: unique per feedback item (a resend uses the same)
    need: str = ""  # "seen" / "predicted": claim only an entry that has it ("" anything)
    local: tuple[str, float] | None = None  # (rollout, at) of the claimer's own answers


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """The outcome of one claim: the rollout whose entry decided, its time and data."""

    rollout: str
    status: str  # CLAIMED, MARKED, TAKEN, EXPIRED or UNMET
    at: float
    data: str | None  # the stored answers (None for MARKED)


def check_answers(ttl: float, max_entries: int) -> None:
    if not ttl > 0 or ttl == float("inf"):
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
    if max_entries < 1:
        raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")


def check_claims(rollouts: Mapping[str, float], claims: Sequence[AnswerClaim]) -> None:
    for claim in claims:
        if claim.need not in NEEDS:
            raise ValueError(f"need must be one of {NEEDS}, got {claim.need!r}")
        if not claim.token:
            raise ValueError("a claim needs a non-empty token")
        if claim.local is not None and claim.local[0] not in rollouts:
            raise ValueError(f"local rollout {claim.local[0]!r} is not one of the rollouts")
    for ttl in rollouts.values():
        check_answers(ttl, 1)


def judge_claim(
    rollout: str,
    claim: AnswerClaim,
    ttl: float,
    now: float,
    row: tuple[float, str | None, bool, bool, str],
) -> tuple[ClaimResult, bool]:
    """The outcome of ``claim`` on a stored entry ``(at, data, seen, predicted, claimed by)``
    and whether the entry is to be marked claimed by the claim's token now."""
    at, data, seen, predicted, claimed = row
    if claimed:
        if claimed != claim.token:
            return ClaimResult(rollout, TAKEN, at, None), False
        return ClaimResult(rollout, MARKED if data is None else CLAIMED, at, data), False
    if at + ttl <= now:
        return ClaimResult(rollout, EXPIRED, at, None), False
    if not meets(claim.need, seen, predicted):
        return ClaimResult(rollout, UNMET, at, data), False
    return ClaimResult(rollout, CLAIMED, at, data), True


def meets(need: str, seen: bool, predicted: bool) -> bool:
    """An entry with these flags can be claimed for ``need``."""
    return need == "" or (need == "seen" and seen) or (need == "predicted" and predicted)


def check_keep(keep: int) -> None:
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep!r}")


def check_limit(limit: int) -> None:
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit!r}")


def check_max_decisions(max_decisions: int) -> None:
    if max_decisions < 1:
        raise ValueError(f"max_decisions must be >= 1, got {max_decisions!r}")


__all__ = [
    "CLAIMED",
    "DEFAULT_MAX_DECISIONS",
    "DEFAULT_MAX_INPUT_PROCESSES",
    "EXPIRED",
    "MARKED",
    "NEEDS",
    "TAKEN",
    "UNMET",
    "AnswerClaim",
    "ClaimResult",
    "FileBackedStore",
    "IdentifiedStore",
    "Lease",
    "Store",
    "StoredAnswer",
    "check_answers",
    "check_claims",
    "check_identity",
    "check_keep",
    "check_lease_request",
    "check_limit",
    "check_max_decisions",
    "decode",
    "encode",
    "encode_accumulator",
    "judge_claim",
    "let_go",
    "meets",
    "merge_in_pieces",
]
