"""Shared feedback: labels posted to any canary process join the answer another one gave.

Several processes on one state store (``--workers``, replicas on one Redis) each keep the
answers they served in their proxy's :class:`~canary.observe.feedback.FeedbackStore` (an O(1)
in-memory add per request, as in one process). :meth:`FeedbackSharing.flush`, run by the
controller's flush every interval, writes the answers added or changed since to the store
in batches (:meth:`~canary.store.Store.put_answers`, bounded per rollout by its
``feedback.ttl`` and ``max_entries``). :meth:`FeedbackSharing.join` answers ``POST
/api/v1/feedback`` with one store round trip per body: every item's id is claimed
(:meth:`~canary.store.Store.claim_answers`), atomically, so an answer is counted at most once
over every process, and a second label for it reads ``duplicate`` wherever it is posted. The
process that claimed an answer scores it and records the values (``count_at: arrival``) or
holds them until the answer is ``ttl`` old by its stored time (``maturity``); the recorder's
deltas reach the merged samples through the ordinary flush.

An id this process still holds itself is claimed through the store too (with its own answers
as the fallback: a claimed marker is written when nothing is stored yet, so that a flush of
them racing the join cannot offer them to another process afterwards).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable

from canary.errors import StoreError
from canary.metrics import Metrics
from canary.observe.feedback import (
    ACCEPTED,
    DUPLICATE,
    EXPIRED,
    NO_PREDICTION,
    NO_ROLLOUT,
    UNKNOWN,
    Answer,
    FeedbackReport,
    FeedbackStore,
    ParsedFeedback,
    ValueRecorder,
    decode_answers,
    record_ripe,
    score,
)
from canary.signals import FEEDBACK
from canary.store import Store
from canary.store._protocol import (
    EXPIRED as STORE_EXPIRED,
)
from canary.store._protocol import (
    MARKED,
    TAKEN,
    UNMET,
    AnswerClaim,
    ClaimResult,
    StoredAnswer,
)

log = logging.getLogger("canary.controller")

BATCH = 500  # answers encoded and written per store call (the event loop runs between them)

FeedbackSource = Callable[[], Iterable[FeedbackStore]]
# An id this process holds: its store, the answer's Unix time, the user's and mirror's answers
_Held = tuple[FeedbackStore, float, Answer | None, Answer | None]


class FeedbackSharing:
    """This process's side of the answers shared through the state store.

    Parameters
    ----------
    store
        The state store every process shares.
    metrics
        ``canary_store_errors{operation="feedback"}`` counts failed writes.
    timeout
        Seconds a store call may take before it counts as failed.
    clock
        Unix seconds (the answers' times are compared across processes).
    """

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._timeout = timeout
        self._clock = clock
        self._source: FeedbackSource | None = None
        self._lock = asyncio.Lock()  # one flush at a time (a stop's flush may overlap the loop's)
        self._failing = False  # the last write failed (logged once per outage)

    def attach(self, source: FeedbackSource) -> None:
        """Where the answers come from: the proxy's feedback stores (one per rollout)."""
        self._source = source

    @property
    def attached(self) -> bool:
        return self._source is not None

    async def flush(self) -> None:
        """Write the answers added or changed since the last flush; failed ones are kept for
        the next (a store outage never reaches the proxy: its adds stay in memory, bounded)."""
        if self._source is None:
            return
        async with self._lock:
            for fs in list(self._source()):
                fs.share()
                while True:
                    batch = fs.take_outbox(BATCH)
                    if not batch:
                        break
                    answers = [StoredAnswer(*entry) for entry in batch]
                    try:
                        await asyncio.wait_for(
                            self._store.put_answers(
                                fs.shared_key,
                                answers,
                                ttl=fs.ttl,
                                max_entries=fs.max_entries,
                                now=self._clock(),
                            ),
                            self._timeout,
                        )
                    except (StoreError, TimeoutError) as exc:
                        fs.requeue(a.request_id for a in answers)
                        self._metrics.store_errors.labels("feedback").inc()
                        if not self._failing:
                            log.warning(
                                "writing answers for shared feedback failed (%s); retried at "
                                "the next flush, labels for them posted to other processes "
                                "read unknown meanwhile",
                                exc or type(exc).__name__,
                            )
                        self._failing = True
                        return
                    if self._failing:
                        log.info("answers for shared feedback are written again")
                        self._failing = False

    async def join(
        self,
        parsed: ParsedFeedback,
        stores: Iterable[FeedbackStore],
        recorder: ValueRecorder,
    ) -> FeedbackReport:
        """:func:`~canary.observe.feedback.join_feedback` over every process: one claim of
        every item's id in the store, then the values of the claimed answers recorded here
        (or held for their maturity).

        Raises
        ------
        StoreError, TimeoutError
            The store did not answer: nothing of this body was counted here (the caller
            answers 503; the client sends the body again).
        """
        found = list(stores)
        report = FeedbackReport(items=len(parsed.items) + len(parsed.errors))
        report.errors = list(parsed.errors)
        if parsed.errors:
            report.count(NO_ROLLOUT, "invalid", len(parsed.errors))
        by_key = {fs.shared_key: fs for fs in found}
        rollouts = {fs.shared_key: fs.ttl for fs in found}
        base = uuid.uuid4().hex
        claims: list[AnswerClaim] = []
        mine: list[_Held | None] = []
        for index, (_, item) in enumerate(parsed.items):
            held: _Held | None = None
            for fs in found:
                local = fs.local_answers(item.request_id)
                if local is not None:
                    held = (fs, *local)
                    break
            need, fallback = "predicted" if item.kind == "label" else "seen", None
            if held is not None and score(item, held[2], held[3])[0] == ACCEPTED:
                # Ours, and countable: claim it whatever the store holds of it (a flush
                # may not have written its newest part, e.g. the mirror's answer, yet).
                need, fallback = "", (held[0].shared_key, held[1])
            claims.append(AnswerClaim(item.request_id, f"{base}:{index}", need, fallback))
            mine.append(held)
        results: list[ClaimResult | None] = [None] * len(claims)
        if claims and rollouts:
            results = await asyncio.wait_for(
                self._store.claim_answers(rollouts, claims, now=self._clock()), self._timeout
            )
        for (_, item), held, res in zip(parsed.items, mine, results, strict=True):
            if res is None or res.rollout not in by_key:
                if held is None:
                    report.count(NO_ROLLOUT, UNKNOWN)
                else:  # held here, not stored yet, and nothing to count (no fallback given)
                    result, _ = score(item, held[2], held[3])
                    if result == ACCEPTED:  # not claimed (a store that ignored the fallback)
                        result = UNKNOWN
                    report.count(held[0].rollout if result != UNKNOWN else NO_ROLLOUT, result)
                continue
            fs = by_key[res.rollout]
            if res.status == TAKEN:
                if held is not None and held[0] is fs:  # claimed by another process
                    fs.mark_joined(item.request_id)
                report.count(fs.rollout, DUPLICATE)
                continue
            if res.status == STORE_EXPIRED:
                report.count(fs.rollout, EXPIRED)
                continue
            if held is not None and held[0] is fs:  # this process's own copy: the newest
                seen, mirror = held[2], held[3]
            elif res.data is not None:
                try:
                    seen, mirror = decode_answers(res.data)
                except (TypeError, ValueError, RecursionError) as exc:
                    log.warning("stored answers of %s are unreadable: %s", item.request_id, exc)
                    report.count(NO_ROLLOUT, UNKNOWN)
                    continue
            else:  # a marker whose answers this process no longer holds (a resend)
                report.count(fs.rollout, DUPLICATE)
                continue
            result, values = score(item, seen, mirror)
            if res.status == UNMET or result != ACCEPTED:
                if result == ACCEPTED:  # the store lacked what this process holds
                    result = NO_PREDICTION if item.kind == "label" else UNKNOWN
                report.count(fs.rollout if result != UNKNOWN else NO_ROLLOUT, result)
                continue
            assert res.status != MARKED or held is not None
            for arm, value, propensity, cluster in fs.settle(item.request_id, values, res.at):
                recorder.record_value(fs.rollout, arm, FEEDBACK, value, propensity, cluster)
            report.count(fs.rollout, ACCEPTED)
        for fs in found:
            record_ripe(fs, recorder)
        return report


__all__ = [
    "BATCH",
    "FeedbackSharing",
    "FeedbackSource",
]
