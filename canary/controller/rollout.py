"""One rollout as the controller holds it (:class:`Rollout`), and what it shows of it
(:class:`RolloutView`, turned into JSON by :mod:`canary.admin.views`)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from canary.config import RolloutConfig
from canary.decision import (
    Analysis,
    Decision,
    RolloutState,
    StepProgress,
    failure_clock_moved,
    log_entry,
    progress,
    track_failures,
)
from canary.observe import RolloutAccumulator

DECISIONS_SHOWN = 100  # decision-log entries kept in memory for the admin API
SHARE_SMOOTHING = 0.7  # weight of the previous traffic-share estimate (per analysis interval)


@dataclass(frozen=True, slots=True)
class RolloutView:
    """One rollout as the controller holds it at ``at`` (its wall clock): what the admin API
    and the CLI show, without reaching into the controller.

    ``progress`` is the current step's progress by the latest analysis (None before the
    first one and once the rollout finished); ``decisions`` the latest decision-log entries,
    oldest first.
    """

    config: RolloutConfig
    state: RolloutState
    analysis: Analysis | None
    progress: StepProgress | None
    decisions: tuple[dict[str, Any], ...]
    status: str
    production_samples: int
    candidate_samples: int
    store_ok: bool
    at: float
    gate: str | None = None  # the gate an automatic transition waits at (confirm-advance, ...)


@dataclass
class Rollout:
    config: RolloutConfig
    state: RolloutState
    totals: RolloutAccumulator
    pending: RolloutAccumulator  # added to totals, not yet to the store
    decisions: deque[dict[str, Any]]
    unsaved: list[dict[str, Any]] = field(default_factory=list)
    state_dirty: bool = False
    analysis: Analysis | None = None
    status: str = "starting"
    next_eval: float = 0.0  # monotonic
    last_check: float | None = None  # wall time of this process's last hard-failure check
    version: int = 0  # counts the deltas merged into totals
    stored: dict[str, Any] | None = None  # shared store: the state as a follower last read it
    own: int = 0  # shared store: requests this process flushed (its share of the totals)
    share_at: tuple[int, int] | None = None  # (own, merged total) at the last share estimate
    share: float = 1.0  # this process's smoothed share of the rollout's requests
    # A write of ``pending`` failed: its batch number (the retry sends the same, so a write
    # whose answer was lost after it landed is not merged twice), and the deltas recorded
    # since, which wait for the next batch.
    batch: int | None = None
    waiting: RolloutAccumulator | None = None
    # (samples version, config, input-health requests) that ``analysis`` was made from
    analysed: tuple[int, RolloutConfig, tuple[int, ...] | None] | None = None

    @classmethod
    def fresh(
        cls,
        config: RolloutConfig,
        state: RolloutState,
        totals: RolloutAccumulator | None,
        history: list[dict[str, Any]],
        accuracy: float,
    ) -> Rollout:
        """A rollout as loaded: its stored totals (None: none yet) and last decisions."""
        return cls(
            config,
            state,
            totals or RolloutAccumulator(accuracy),
            RolloutAccumulator(accuracy),
            deque(history, maxlen=DECISIONS_SHOWN),
        )

    def track_failures(self, now: float) -> None:
        """Move the persisted hard-failure clock on by the candidate's new requests (not once
        the rollout finished: the policy no longer reads it, and the store is spared a write
        per interval)."""
        if self.state.phase.terminal:
            return
        cand = self.totals.candidate
        new = track_failures(
            self.state, cand.observed, cand.errors, now, previous_check=self.last_check
        )
        self.last_check = now
        if new is not self.state:
            if failure_clock_moved(self.state, new):
                self.state_dirty = True  # the next flush writes it: a restart keeps the clock
            self.state = new

    def traffic_share(self) -> float | None:
        """This process's share of the rollout's requests since the last estimate, smoothed
        (shared store: ``totals`` are every process's merged samples); None when unchanged."""
        total = self.totals.production.observed + self.totals.candidate.observed
        last, self.share_at = self.share_at, (self.own, total)
        if last is None:
            return None
        d_own, d_total = self.own - last[0], total - last[1]
        if d_total <= 0 or d_own < 0:
            return None
        estimate = min(1.0, d_own / d_total)
        self.share = SHARE_SMOOTHING * self.share + (1.0 - SHARE_SMOOTHING) * estimate
        return self.share

    def view(self, now: float, store_ok: bool) -> RolloutView:
        state, analysis = self.state, self.analysis
        step = None
        if analysis is not None and not state.phase.terminal:
            step = progress(self.config, state, analysis, now)
        return RolloutView(
            config=self.config,
            state=state,
            analysis=analysis,
            progress=step,
            decisions=tuple(self.decisions),
            status=self.status,
            production_samples=self.totals.production.observed,
            candidate_samples=self.totals.candidate.observed,
            store_ok=store_ok,
            at=now,
        )

    def entry(self, decision: Decision, now: float) -> dict[str, Any]:
        """The decision-log entry of ``decision`` (``state`` already the state after it)."""
        return log_entry(
            self.config,
            self.state,
            decision,
            now,
            production=self.totals.production.observed,
            candidate=self.totals.candidate.observed,
        )

    def unsave_everything(self) -> None:
        """Have the next flush write all of this rollout again (its store file was lost)."""
        self.state_dirty = True
        self.unsaved = [e for e in self.decisions if e not in self.unsaved] + self.unsaved
        self.pending = self.totals.snapshot()  # the totals include the pending samples
        self.batch, self.waiting = None, None  # a new file: nothing of it is in doubt


__all__ = [
    "DECISIONS_SHOWN",
    "SHARE_SMOOTHING",
    "Rollout",
    "RolloutView",
]
