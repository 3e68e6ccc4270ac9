"""Decisions: analysis of a snapshot, the pure rollout policy and the rollout state."""

from canary.decision.analysis import Analysis, analyze, metric_alpha
from canary.decision.policy import (
    HARD_FAILURE_REQUESTS,
    HARD_FAILURE_SECONDS,
    MANUAL_ACTIONS,
    CommandRejected,
    StepProgress,
    command,
    decide,
    evidence,
    progress,
    transition,
)
from canary.decision.state import Action, Decision, Evidence, Phase, RolloutState, fingerprint

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
    "fingerprint",
    "metric_alpha",
    "progress",
    "transition",
]
