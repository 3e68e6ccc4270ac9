"""Delayed labels: keep each analysed answer's prediction for a while, join feedback to it.

The proxy adds one entry per request it routed for analysis to its rollout's
:class:`FeedbackStore` (``request id -> arm, propensity, prediction, time``); ``POST
/api/v1/feedback`` later sends ``{"request_id", "label" | "correct" | "reward"}`` items, which
:func:`join_feedback` turns into values of the ``feedback`` signal of each arm:

- ``label``: 1.0 when the arm's stored prediction equals the label (as JSON values), else 0.0,
  for *every* answer stored under the id: in a shadow step the user saw production's answer
  and the mirrored candidate's answer is scored on the same request.
- ``correct`` (bool): 1.0 / 0.0 for the answer the user saw (never the shadow mirror).
- ``reward`` (a number in [0, 1]): that value for the answer the user saw. The analysis
  compares ``feedback`` as a bounded rate, so values outside [0, 1] are refused.

When a label counts is ``feedback.count_at``. ``maturity`` (the default): a joined answer's
values wait in its entry and are recorded when the entry leaves the store, i.e. when the
answer is ``ttl`` old (or is evicted, oldest first): every answer of either arm is then
scored after the same label window, so labels that come later for some outcomes (wrong
answers are often reported later than right ones) cannot favour the arm whose answers are
younger or whose outcomes are reported sooner. Labels arriving after ``ttl`` read
``expired`` and count for neither arm; choose ``ttl`` at least as long as labels take.
``arrival`` records a value as soon as its label is joined (faster, and valid only when the
label delay does not depend on the outcome).

Memory is bounded per rollout by ``feedback: {ttl, max_entries}``: entries sit in insertion
order, the oldest is evicted when the store is full and expired ones are dropped from the
front as new ones arrive (amortised O(1), no timers). A joined entry stays (without its
predictions) until it expires, so a second label for the id counts as a duplicate. The ids
of the last dropped entries are remembered (:data:`TOMBSTONES`, per rollout) so that late
feedback reads ``expired`` (or ``duplicate``) rather than ``unknown``; ids dropped before
those count as ``unknown``.

One canary process holds one store per rollout. Several processes on one state store
(``--workers``, replicas on one Redis: the controller has a ``Leadership``) share the joins
(``canary/controller/shared_feedback.py``): the proxy's per-request call stays this O(1)
in-memory :meth:`FeedbackStore.add`, which in shared mode also marks the id in an outbox;
every controller flush (250 ms) writes the outbox's answers to the state store in batches
(:meth:`FeedbackStore.take_outbox`, ``Store.put_answers``: bounded there too by ``ttl``, in
Unix seconds since the processes' monotonic clocks differ, and ``max_entries``). A feedback
body posted to any process is one store round trip (``Store.claim_answers``) that claims
every item's id atomically, so an answer counts at most once over every process and a second
label reads ``duplicate`` wherever it is posted; an id this process holds is claimed through
the store too (a claimed marker when it is not written yet). The claiming process scores the
answers (:func:`score`, the same rules as :meth:`FeedbackStore.join`) and records the values
(``arrival``) or holds them until the answer's stored time + ``ttl`` (``maturity``,
:meth:`FeedbackStore.settle`, recorded by :meth:`FeedbackStore.take_ripe`). Limits: an answer
not yet flushed (within one flush interval of the request) reads ``unknown`` at the other
processes; values held for maturity by a process that dies are lost with it; a store that
does not answer fails the body (503) and counts none of it; a claim whose reply was lost
after the store ran it (a network cut) leaves its labels uncounted, and a resend reads them
``duplicate``. ``expired`` reads come from the store's entries, kept up to twice ``ttl``
within ``max_entries``.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from canary.config import FeedbackConfig, RolloutConfig
from canary.errors import ClientError
from canary.observe.record import NO_CLUSTER
from canary.signals import FEEDBACK

__all__ = [
    "MAX_ITEMS",
    "RESULTS",
    "TOMBSTONES",
    "Answer",
    "FeedbackBodyError",
    "FeedbackItem",
    "FeedbackReport",
    "FeedbackStore",
    "ParsedFeedback",
    "Value",
    "ValueRecorder",
    "decode_answers",
    "join_feedback",
    "parse_feedback",
    "parse_item",
    "record_ripe",
    "same_json",
    "score",
    "store_for",
    "uses_feedback",
]

MAX_ITEMS = 10_000
"""Items per ``POST /api/v1/feedback`` body (the body is also bounded in bytes)."""
TOMBSTONES = 10_000
"""Dropped ids each rollout remembers (at most ``max_entries``) to report ``expired``."""
MAX_REQUEST_ID = 128  # the proxy never returns a longer X-Request-Id

ACCEPTED = "accepted"
UNKNOWN = "unknown"
EXPIRED = "expired"
DUPLICATE = "duplicate"
INVALID = "invalid"
NO_PREDICTION = "no_prediction"
RESULTS = (ACCEPTED, UNKNOWN, EXPIRED, DUPLICATE, INVALID, NO_PREDICTION)
NO_ROLLOUT = ""  # the rollout label of items that match no rollout (unknown ids, invalid items)

Kind = Literal["label", "correct", "reward"]
_KINDS: tuple[Kind, ...] = ("label", "correct", "reward")
_KEYS = frozenset(("request_id", *_KINDS))


class FeedbackBodyError(ClientError):
    """A feedback body that cannot be read at all (not JSON, wrong shape, too large): the
    client's fault, answered with ``status`` (400, or 413 for too many items)."""

    kind = "feedback_body"

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class FeedbackItem:
    """One validated feedback item: ``value`` is the label (any JSON), a bool or a float."""

    request_id: str
    kind: Kind
    value: object


@dataclass(frozen=True, slots=True)
class ParsedFeedback:
    """The valid items (with their index in the body) and one error per invalid item."""

    items: list[tuple[int, FeedbackItem]]
    errors: list[dict[str, Any]]


def _show(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_item(data: object) -> FeedbackItem:
    """Validate one item; raise ValueError with a message naming the bad key and value."""
    if not isinstance(data, dict):
        raise ValueError(f"an item must be a JSON object, got {_show(data)}")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(map(repr, unknown))}: an item has 'request_id' and "
            "one of 'label', 'correct', 'reward'"
        )
    rid = data.get("request_id")
    if not isinstance(rid, str) or not rid:
        raise ValueError(f"'request_id' must be a non-empty string, got {_show(rid)}")
    if len(rid) > MAX_REQUEST_ID:
        raise ValueError(
            f"'request_id' is {len(rid)} characters; canary's X-Request-Id has at most "
            f"{MAX_REQUEST_ID}"
        )
    given = [k for k in _KINDS if k in data]
    if len(given) != 1:
        what = " and ".join(repr(k) for k in given) if given else "none"
        raise ValueError(f"exactly one of 'label', 'correct', 'reward' is needed, got {what}")
    kind = given[0]
    value = data[kind]
    if kind == "label":
        if value is None:
            raise ValueError("'label' must not be null")
        return FeedbackItem(rid, kind, value)
    if kind == "correct":
        if not isinstance(value, bool):
            raise ValueError(f"'correct' must be true or false, got {_show(value)}")
        return FeedbackItem(rid, kind, value)
    # Compared without float(): a huge JSON integer must not overflow.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(
            f"'reward' must be a number in [0, 1] (the feedback signal is compared as a "
            f"rate), got {_show(value)}"
        )
    return FeedbackItem(rid, kind, float(value))


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def parse_feedback(raw: bytes, *, max_items: int = MAX_ITEMS) -> ParsedFeedback:
    """Parse a feedback body: one item object or an array of them.

    Raises
    ------
    FeedbackBodyError
        The body is not JSON, not an object or array, or has more than ``max_items`` items
        (status 413). Invalid items do not raise: they are listed in ``errors``.
    """
    if not raw.strip():
        raise FeedbackBodyError(
            'empty body: send {"request_id": ..., "label" | "correct" | "reward": ...} '
            "or an array of such objects"
        )
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise FeedbackBodyError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise FeedbackBodyError("request body is nested too deeply") from None
    if isinstance(data, dict):
        data = [data]
    elif not isinstance(data, list):
        raise FeedbackBodyError(
            f"request body must be a JSON object or an array of objects, got {_show(data)}"
        )
    if len(data) > max_items:
        raise FeedbackBodyError(
            f"{len(data)} items in one body; send at most {max_items} per request", 413
        )
    items: list[tuple[int, FeedbackItem]] = []
    errors: list[dict[str, Any]] = []
    for i, entry in enumerate(data):
        try:
            items.append((i, parse_item(entry)))
        except ValueError as exc:
            errors.append({"index": i, "error": str(exc)})
    return ParsedFeedback(items, errors)


def same_json(a: object, b: object) -> bool:
    """Equality of two decoded JSON values: ``1 == 1.0``, but ``true != 1`` and ``"1" != 1``.

    Python's ``==`` treats ``True`` as ``1``; a model answering ``1`` for a ``true`` label is
    not correct.
    """
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if type(a) is not type(b):
        return False
    return a == b


# -- the store ------------------------------------------------------------------------------

# arm, propensity, prediction (None: none extracted), sticky cluster (the unit of analysis)
Answer = tuple[str, float, object, int]
_Answer = Answer


class _Entry:
    """What is kept of one request id: the answer the user saw and a shadow mirror's answer."""

    __slots__ = ("at", "joined", "mirror", "seen", "values")

    def __init__(self, at: float) -> None:
        self.at = at
        self.seen: _Answer | None = None
        self.mirror: _Answer | None = None
        self.joined = False
        self.values: list[Value] | None = None  # joined values waiting for maturity


# arm, value, propensity, cluster: one value of the feedback signal to record
Value = tuple[str, float, float, int]


def _identity(rollout: RolloutConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    # Changing an arm's endpoints starts a new rollout: its old predictions must not count.
    return tuple(sorted(rollout.production.endpoints)), tuple(sorted(rollout.candidate.endpoints))


class FeedbackStore:
    """Recent answers of one rollout by request id, bounded by ``max_entries`` and ``ttl``.

    Parameters
    ----------
    rollout
        The rollout's name.
    config
        Its ``feedback`` section.
    clock
        Monotonic seconds (injectable for tests).
    identity
        What must stay equal for the store to survive a config reload (:func:`store_for`).
    """

    def __init__(
        self,
        rollout: str,
        config: FeedbackConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        identity: object = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.rollout = rollout
        self.identity = identity
        self._clock = clock
        self._wall = wall  # Unix seconds: the times other processes compare (shared mode)
        # OrderedDict, not dict: popping a plain dict from the front leaves holes that every
        # later ``next(iter(d))`` walks over (quadratic); OrderedDict's front is O(1).
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._tombstones: OrderedDict[str, bool] = OrderedDict()  # dropped id -> was joined
        self.ttl = config.ttl
        self.max_entries = config.max_entries
        self.at_maturity = config.count_at == "maturity"
        self._max_tombstones = min(config.max_entries, TOMBSTONES)
        self._ripe: list[Value] = []  # matured values not yet taken (take_ripe)
        self.evicted = 0  # dropped because the store was full
        self.expired = 0  # dropped because their ttl passed
        # Shared mode (several processes on one state store, see the module docstring): ids
        # added or changed since the last take_outbox(), and values of answers claimed
        # through the store that wait for their maturity (Unix due time, order, values).
        self.sharing = False
        self._outbox: OrderedDict[str, None] = OrderedDict()
        self._held: list[tuple[float, int, list[Value]]] = []
        self._held_order = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def configure(self, config: FeedbackConfig) -> None:
        """Apply new limits (a config reload); shrinking evicts the oldest entries now."""
        self.ttl = config.ttl
        self.max_entries = config.max_entries
        self.at_maturity = config.count_at == "maturity"  # waiting values still wait
        self._max_tombstones = min(config.max_entries, TOMBSTONES)
        while len(self._entries) > self.max_entries:
            self._drop_oldest()
            self.evicted += 1
        while len(self._tombstones) > self._max_tombstones:
            self._tombstones.popitem(last=False)

    def _drop_oldest(self) -> None:
        rid, entry = self._entries.popitem(last=False)
        if entry.values is not None:  # matured (or evicted, the oldest first): now they count
            self._ripe.extend(entry.values)
        self._bury(rid, entry.joined)

    def take_ripe(self) -> list[Value]:
        """The values whose answers matured since the last call (``count_at: maturity``)."""
        self._expire(self._clock())
        ripe, self._ripe = self._ripe, []
        held = self._held
        if held:
            now = self._wall()
            while held and held[0][0] <= now:
                ripe.extend(heapq.heappop(held)[2])
        return ripe

    def _bury(self, rid: str, joined: bool) -> None:
        stones = self._tombstones
        stones[rid] = joined
        if len(stones) > self._max_tombstones:
            stones.popitem(last=False)

    def _expire(self, now: float) -> None:
        # Entries are in insertion order and ``at`` never decreases along it (a re-inserted
        # id moves to the end with a fresh time), so the expired ones are a prefix.
        entries = self._entries
        deadline = now - self.ttl
        while entries:
            rid = next(iter(entries))
            if entries[rid].at > deadline:
                return
            self._drop_oldest()
            self.expired += 1

    def add(
        self,
        request_id: str,
        arm: str,
        propensity: float,
        prediction: object,
        shadow: bool,
        cluster: int = NO_CLUSTER,
    ) -> _Answer | None:
        """Keep one answer (O(1) amortised; called by the proxy per analysed response).

        A shadow mirror's answer joins the entry of the same request id; a second answer for
        a slot that is already filled means the id was reused, and replaces the entry. When
        this answer completes a pair (the user's and the mirror's), the other one is returned:
        the proxy compares their predictions (shadow agreement).
        """
        now = self._clock()
        self._expire(now)
        if self.sharing:  # written to the state store by the next flush (take_outbox)
            outbox = self._outbox
            outbox[request_id] = None
            if len(outbox) > self.max_entries:
                outbox.popitem(last=False)
        entries = self._entries
        entry = entries.get(request_id)
        answer: _Answer = (arm, propensity, prediction, cluster)
        if entry is not None:
            if shadow and entry.mirror is None:
                if not entry.joined:  # a mirror slower than the user's feedback is not scored
                    entry.mirror = answer
                return entry.seen
            if not shadow and entry.seen is None and not entry.joined:
                entry.seen = answer
                return entry.mirror
            if entry.values is not None:  # its label came: count it before the entry goes
                self._ripe.extend(entry.values)
            del entries[request_id]  # a reused id: the newer request replaces the entry
        elif len(entries) >= self.max_entries:
            self._drop_oldest()
            self.evicted += 1
        entry = _Entry(now)
        if shadow:
            entry.mirror = answer
        else:
            entry.seen = answer
        entries[request_id] = entry
        return None

    def join(self, item: FeedbackItem) -> tuple[str, list[Value]]:
        """Score ``item`` against its entry; return the result and ``(arm, value, propensity,
        cluster)`` for each value to record now (none with ``count_at: maturity``: they wait
        in the entry until it matures, then :meth:`take_ripe` returns them).

        The result is ``unknown`` when this store has no trace of the id (or, for
        ``correct``/``reward``, holds only a shadow answer: what the user saw was not kept).
        """
        self._expire(self._clock())
        entry = self._entries.get(item.request_id)
        if entry is None:
            stone = self._tombstones.get(item.request_id)
            if stone is None:
                return UNKNOWN, []
            return (DUPLICATE if stone else EXPIRED), []
        if entry.joined:
            return DUPLICATE, []
        result, values = score(item, entry.seen, entry.mirror)
        if result != ACCEPTED:
            return result, []
        entry.joined = True
        entry.seen = entry.mirror = None  # the marker is all a joined entry needs
        if self.at_maturity:
            entry.values = values
            return ACCEPTED, []
        return ACCEPTED, values

    # -- shared feedback answers --

    @property
    def shared_key(self) -> str:
        """The rollout's name in the state store's answers: with its arms' endpoints, so that
        a rollout started anew (other endpoints) never joins its predecessor's answers."""
        if self.identity is None:
            return self.rollout
        digest = hashlib.sha256(repr(self.identity).encode()).hexdigest()[:16]
        return f"{self.rollout}#{digest}"

    def share(self) -> None:
        """Start shared mode: every answer added from now on, and every one held now, goes
        to the outbox (:meth:`take_outbox`)."""
        if not self.sharing:
            self.sharing = True
            self.requeue(rid for rid, e in self._entries.items() if not e.joined)

    def take_outbox(self, limit: int) -> list[tuple[str, float, str, bool, bool]]:
        """Up to ``limit`` of the answers added or changed since they were last taken, for
        the state store: ``(request id, Unix time of the answer, its answers as JSON, holds
        the user's answer, holds a prediction)``; joined and dropped ones are left out."""
        outbox = self._outbox
        if not outbox:
            return []
        mono, wall = self._clock(), self._wall()
        out = []
        for _ in range(min(limit, len(outbox))):
            rid = outbox.popitem(last=False)[0]
            entry = self._entries.get(rid)
            if entry is None or entry.joined:
                continue
            try:
                data = json.dumps([entry.seen, entry.mirror])
            except (TypeError, ValueError, RecursionError):
                continue  # not JSON: stays local (feedback to this process still joins it)
            seen, mirror = entry.seen, entry.mirror
            predicted = any(a is not None and a[2] is not None for a in (seen, mirror))
            out.append((rid, wall - (mono - entry.at), data, seen is not None, predicted))
        return out

    def requeue(self, request_ids: Iterable[str]) -> None:
        """Put ids whose write failed back into the outbox (the next flush retries them)."""
        outbox = self._outbox
        for rid in request_ids:
            outbox[rid] = None
        while len(outbox) > self.max_entries:
            outbox.popitem(last=False)

    def local_answers(self, request_id: str) -> tuple[float, _Answer | None, _Answer | None] | None:
        """``(Unix time, the user's answer, the mirror's)`` of an id this process holds and
        has not joined; None otherwise."""
        now = self._clock()
        self._expire(now)
        entry = self._entries.get(request_id)
        if entry is None or entry.joined:
            return None
        return self._wall() - (now - entry.at), entry.seen, entry.mirror

    def settle(self, request_id: str, values: list[Value], at: float) -> list[Value]:
        """Values of an answer claimed through the state store (``at``: its Unix time): the
        local entry, if any, is marked joined; with ``count_at: maturity`` the values wait
        until ``at + ttl`` (:meth:`take_ripe`), else they are returned to record now."""
        self.mark_joined(request_id)
        if self.at_maturity:
            heapq.heappush(self._held, (at + self.ttl, next(self._held_order), values))
            return []
        return values

    def mark_joined(self, request_id: str) -> None:
        """The answers of ``request_id`` were claimed (here or by another process): what
        this process holds of them is dropped, and never written to the store again."""
        entry = self._entries.get(request_id)
        if entry is not None and not entry.joined:
            entry.joined = True
            entry.seen = entry.mirror = None

    @property
    def held(self) -> int:
        """Values of claimed answers waiting for their maturity (shared mode)."""
        return sum(len(v) for _, _, v in self._held)


def score(
    item: FeedbackItem, seen: _Answer | None, mirror: _Answer | None
) -> tuple[str, list[Value]]:
    """``item`` scored against the answers of its id: ``accepted`` with the values to record,
    or why nothing counts (``no_prediction``; ``unknown`` for ``correct``/``reward`` when
    the answer the user saw is not held)."""
    values: list[Value] = []
    if item.kind == "label":
        for answer in (seen, mirror):
            if answer is not None and answer[2] is not None:
                arm, propensity, prediction, cluster = answer
                try:
                    hit = same_json(prediction, item.value)
                except RecursionError:
                    hit = False  # only absurdly nested values get here
                values.append((arm, 1.0 if hit else 0.0, propensity, cluster))
        if not values:
            return NO_PREDICTION, []
        return ACCEPTED, values
    if seen is None:
        return UNKNOWN, []
    arm, propensity, _, cluster = seen
    value = item.value
    assert isinstance(value, bool | float)  # parse_item guarantees it
    return ACCEPTED, [(arm, float(value), propensity, cluster)]


def decode_answers(data: str) -> tuple[_Answer | None, _Answer | None]:
    """The ``(user's answer, mirror's)`` of :meth:`FeedbackStore.take_outbox`'s JSON;
    ValueError when it is not that."""
    pair = json.loads(data)
    if not isinstance(pair, list) or len(pair) != 2:
        raise ValueError(f"stored answers must be a pair, got {data[:60]!r}")
    out: list[_Answer | None] = []
    for answer in pair:
        if answer is None:
            out.append(None)
            continue
        arm, propensity, prediction, cluster = answer
        if not isinstance(arm, str) or isinstance(propensity, bool):
            raise ValueError(f"a stored answer is malformed: {answer!r}")
        out.append((arm, float(propensity), prediction, int(cluster)))
    return out[0], out[1]


def uses_feedback(rollout: RolloutConfig) -> bool:
    """True when the rollout can use feedback: a ``feedback`` metric or a ``prediction``."""
    return rollout.prediction is not None or any(
        m.signal == FEEDBACK for m in rollout.analysis.metrics
    )


def store_for(
    rollout: RolloutConfig,
    previous: FeedbackStore | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> FeedbackStore | None:
    """The rollout's store: ``previous`` when its arms did not change (a config reload keeps
    the waiting predictions), a new one otherwise, None when the rollout cannot use feedback."""
    if not uses_feedback(rollout):
        return None
    identity = _identity(rollout)
    if previous is not None and previous.identity == identity:
        previous.configure(rollout.feedback)
        return previous
    return FeedbackStore(rollout.name, rollout.feedback, clock=clock, identity=identity)


# -- the join -------------------------------------------------------------------------------


class ValueRecorder(Protocol):
    """Where joined values go (:class:`canary.observe.Recorder` in canary)."""

    def record_value(
        self,
        rollout: str,
        arm: str,
        key: str,
        value: float,
        propensity: float = 1.0,
        cluster: int = NO_CLUSTER,
    ) -> None: ...


@dataclass
class FeedbackReport:
    """Outcome of one feedback body: counts per (rollout, result) and the invalid items."""

    items: int = 0
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def count(self, rollout: str, result: str, n: int = 1) -> None:
        key = (rollout, result)
        self.counts[key] = self.counts.get(key, 0) + n

    def totals(self) -> dict[str, int]:
        """Items per result, every result present."""
        out = dict.fromkeys(RESULTS, 0)
        for (_, result), n in self.counts.items():
            out[result] += n
        return out

    def to_json(self) -> dict[str, Any]:
        return {"items": self.items, "results": self.totals(), "errors": self.errors}


def join_feedback(
    parsed: ParsedFeedback,
    stores: Mapping[str, FeedbackStore] | Iterable[FeedbackStore],
    recorder: ValueRecorder,
) -> FeedbackReport:
    """Join every valid item to the store that knows its id and record the values (and
    those of every store whose answers matured meanwhile).

    An id is looked up in each rollout's store in turn (a handful of dict lookups); the
    first store that has a trace of it decides the result.
    """
    found = list(stores.values()) if isinstance(stores, Mapping) else list(stores)
    report = FeedbackReport(items=len(parsed.items) + len(parsed.errors))
    report.errors = list(parsed.errors)
    if parsed.errors:
        report.count(NO_ROLLOUT, INVALID, len(parsed.errors))
    for _, item in parsed.items:
        result, rollout = UNKNOWN, NO_ROLLOUT
        for store in found:
            r, values = store.join(item)
            if r == UNKNOWN:
                continue
            result, rollout = r, store.rollout
            for arm, value, propensity, cluster in values:
                recorder.record_value(store.rollout, arm, FEEDBACK, value, propensity, cluster)
            break
        report.count(rollout, result)
    for store in found:
        record_ripe(store, recorder)
    return report


def record_ripe(store: FeedbackStore, recorder: ValueRecorder) -> int:
    """Record the values of ``store``'s matured answers; return how many."""
    ripe = store.take_ripe()
    for arm, value, propensity, cluster in ripe:
        recorder.record_value(store.rollout, arm, FEEDBACK, value, propensity, cluster)
    return len(ripe)
