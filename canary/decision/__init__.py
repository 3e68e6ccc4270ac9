"""Decisions: analysis of a snapshot, the pure rollout policy and the rollout state."""

from canary.decision.analysis import Analysis, analyze, metric_alpha
from canary.decision.policy import (
    HARD_FAILURE_REQUESTS,
    HARD_FAILURE_SECONDS,
    MANUAL_ACTIONS,
    StepProgress,
    command,
    decide,
    evidence,
    failure_clock_moved,
    progress,
    resume_failures,
    track_failures,
    transition,
)
from canary.decision.state import (
    Action,
    Decision,
    Evidence,
    Phase,
    RolloutState,
    fingerprint,
    log_entry,
    step_fields,
    upgrade_entry,
)
from canary.errors import CommandRejected

__all__ = [
    "HARD_FAILURE_REQUESTS",
    "HARD_FAILURE_SECONDS",
    "MANUAL_ACTIONS",
    "Action",
    "Analysis",
    "CommandRejected",
    "Decision",
    "Evidence",
    "Phase",
    "RolloutState",
    "StepProgress",
    "analyze",
    "command",
    "decide",
    "evidence",
    "failure_clock_moved",
    "fingerprint",
    "log_entry",
    "metric_alpha",
    "progress",
    "resume_failures",
    "step_fields",
    "track_failures",
    "transition",
    "upgrade_entry",
]
