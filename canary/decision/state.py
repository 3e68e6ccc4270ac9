"""Rollout state, actions and decisions: plain values that the policy reads and returns.

The state is what survives a restart (the store keeps :meth:`RolloutState.to_dict`); the
weights the proxy serves are a function of it (:meth:`RolloutState.weights`), so nothing
else needs persisting for the data plane to come back exactly where it was.
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from canary.config import RolloutConfig
from canary.observe.record import Weights

STATE_VERSION = 1


class Phase(enum.StrEnum):
    RUNNING = "running"  # the policy steps the rollout forward on its own
    PAUSED = "paused"  # an operator froze it: weights stay, no automatic action
    HOLDING = "holding"  # max_duration ended inconclusive with on_inconclusive: hold
    PROMOTED = "promoted"  # the candidate serves 100% (terminal)
    ROLLED_BACK = "rolled_back"  # production serves 100% (terminal)

    @property
    def terminal(self) -> bool:
        return self in (Phase.PROMOTED, Phase.ROLLED_BACK)


class Action(enum.StrEnum):
    CONTINUE = "CONTINUE"  # nothing changes; keep collecting evidence
    ADVANCE = "ADVANCE"  # next step
    PROMOTE = "PROMOTE"  # the candidate gets 100%
    ROLLBACK = "ROLLBACK"  # production gets 100%
    HOLD = "HOLD"  # stay where we are and take no automatic action
    # Operator commands and lifecycle entries that appear in the decision log.
    PAUSE = "PAUSE"
    RESUME = "RESUME"
    START = "START"
    RETRY = "RETRY"  # an operator started a rolled-back rollout again: same arms, new samples
    # Gates (canary/controller/gates.py): an automatic ADVANCE or PROMOTE waits at a gate
    # (logged once when the wait starts), and an operator approved the current step's gate.
    WAIT = "WAIT"
    APPROVE = "APPROVE"


@dataclass(frozen=True)
class Evidence:
    """The metric behind a decision: what the decision log and webhooks show."""

    metric: str
    verdict: str
    estimate: float
    lower: float
    upper: float
    n_production: int
    n_candidate: int
    explain: str

    def to_dict(self) -> dict[str, Any]:
        return {k: _finite_or_none(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Decision:
    """What the policy (or an operator) decided, and why."""

    action: Action
    reason: str
    evidence: Evidence | None = None
    manual: bool = False


@dataclass(frozen=True)
class RolloutState:
    """Where one rollout is. Times are wall-clock seconds (``time.time()``).

    Attributes
    ----------
    fingerprint
        Hash of both arms' endpoints: a rollout whose endpoints change is a new rollout.
    step
        0-based index into the rollout's steps.
    started_at, deadline
        When the rollout started and when ``max_duration`` runs out (pushed back by pauses
        and by resuming a held rollout).
    step_started_at, step_base
        When the current step started, and the candidate's observation count at that moment
        (the step's own samples are the count now minus this).
    paused_at
        When an operator paused it (None when not paused).
    failing_since, failing_requests
        The hard-failure clock (:func:`~canary.decision.policy.track_failures`): since when,
        and over how many requests, every candidate request has failed (None and 0 when the
        last one succeeded). Kept here so that a restart does not reset it.
    failure_observed, failure_errors
        The candidate's observation and error counts at the last check of that clock (the
        next check diffs against them). None: not counted yet, a state stored by a canary that
        kept the clock in memory; its next check only takes the counts.
    """

    name: str
    fingerprint: str
    phase: Phase
    step: int
    started_at: float
    deadline: float
    step_started_at: float
    step_base: int = 0
    paused_at: float | None = None
    last_action: str = Action.START.value
    reason: str = "rollout started"
    updated_at: float = 0.0
    failing_since: float | None = None
    failing_requests: int = 0
    failure_observed: int | None = None
    failure_errors: int = 0
    failure_checked_at: float | None = None  # wall time of the check that last moved the clock
    attempt: int = 1  # 1 + the times an operator retried it (each retry starts its samples anew)
    # `canary approve`: the gate of the transition pending at this step (0-based) is open,
    # once; None: nothing approved. Persisted, so an approval survives a restart and reaches
    # the leader's successor; a canary without gates ignores it (unknown keys are dropped).
    approved_step: int | None = None
    approved_gate: str = ""  # the gate event approved (confirm-advance / confirm-promotion)
    approved_reason: str = ""

    @classmethod
    def start(cls, rollout: RolloutConfig, now: float) -> RolloutState:
        return cls(
            name=rollout.name,
            fingerprint=fingerprint(rollout),
            phase=Phase.RUNNING,
            step=0,
            started_at=now,
            deadline=now + rollout.analysis.max_duration,
            step_started_at=now,
            step_base=0,
            updated_at=now,
            failure_observed=0,  # counted from the first request on
        )

    def weights(self, rollout: RolloutConfig) -> Weights:
        """The split the proxy should serve in this state."""
        if self.phase is Phase.PROMOTED:
            return Weights(100.0, False)
        if self.phase is Phase.ROLLED_BACK:
            return Weights(0.0, False)
        step = rollout.steps[min(self.step, len(rollout.steps) - 1)]
        return Weights(step.candidate_weight, step.is_shadow)

    def failing_for(self, now: float) -> float:
        """How long every candidate request has failed (0 when the last one succeeded)."""
        return 0.0 if self.failing_since is None else now - self.failing_since

    def with_(self, **changes: Any) -> RolloutState:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["phase"] = self.phase.value
        out["version"] = STATE_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutState:
        version = data.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"unsupported rollout state version {version!r}")
        # Keys this version does not know (a field an older canary wrote, since removed) are
        # dropped: the state stays readable across upgrades and downgrades.
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["phase"] = Phase(values["phase"])
        return cls(**values)


def step_fields(step: int, steps: int) -> dict[str, int]:
    """How users see a step: ``step`` 1-based of ``steps`` (as the CLI, the logs and
    ``canary_rollout_step`` show it), and ``step_index``, the 0-based index into ``steps:``."""
    index = max(0, min(step, steps - 1))
    return {"step": index + 1, "steps": steps, "step_index": index}


def log_entry(
    rollout: RolloutConfig,
    state: RolloutState,
    decision: Decision,
    now: float,
    *,
    production: int,
    candidate: int,
) -> dict[str, Any]:
    """The decision-log record of ``decision`` taken at ``now`` (``state`` is the state after
    it; ``production``/``candidate`` the arms' observation counts): what the store keeps, the
    admin API lists and webhooks send, so its keys are a persisted format."""
    weight, shadow = state.weights(rollout)
    entry: dict[str, Any] = {
        "at": now,
        "action": decision.action.value,
        "reason": decision.reason,
        "manual": decision.manual,
        "phase": state.phase.value,
        **step_fields(state.step, len(rollout.steps)),
        "weights": {"production": 100.0 - weight, "candidate": weight},
        "shadow": shadow,
        "samples": {"production": production, "candidate": candidate},
    }
    if decision.evidence is not None:
        entry["evidence"] = decision.evidence.to_dict()
    return entry


def upgrade_entry(entry: dict[str, Any], steps: int) -> dict[str, Any]:
    """A decision-log entry as stored by a canary before ``step`` was 1-based (it has no
    ``step_index``), in today's form; newer entries unchanged."""
    if "step_index" in entry or not isinstance(entry.get("step"), int):
        return entry
    return {**entry, **step_fields(entry["step"], steps)}


def fingerprint(rollout: RolloutConfig) -> str:
    """Identity of a rollout's arms: changing an endpoint, or an arm's served model name,
    starts a new rollout."""
    text = "|".join(
        [
            ",".join(sorted(rollout.production.endpoints)),
            ",".join(sorted(rollout.candidate.endpoints)),
        ]
    )
    models = (rollout.production.model, rollout.candidate.model)
    if models != (None, None):  # only then: fingerprints stored without models stay valid
        text += f"|model:{models[0] or ''}|{models[1] or ''}"
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


__all__ = [
    "STATE_VERSION",
    "Action",
    "Decision",
    "Evidence",
    "Phase",
    "RolloutState",
    "fingerprint",
    "log_entry",
    "step_fields",
    "upgrade_entry",
]
