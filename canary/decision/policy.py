"""The rollout policy: pure functions from (config, state, analysis, now) to a decision.

:func:`decide` says what the data calls for; :func:`command` validates an operator's
command; :func:`transition` turns either into the next state. None of them does I/O or reads
a clock, so every rule is tested with plain values (tests/test_decision_policy.py).

Order of the rules (DESIGN.md "Decision semantics"):

1. A paused or held rollout takes no automatic action; a finished one stays finished.
2. Guards roll back at once: sample-ratio mismatch, then hard failure (the candidate failed
   every request for a few seconds), then any metric WORSE, then a provably negative net value.
3. ``max_duration`` over: ``on_inconclusive`` (rollback, hold or promote; not promote while
   held by input drift).
3a. Input drift (the analysis's input-health checks) with ``inputs.on_drift: hold``: CONTINUE
   (no advance, no promotion) while the drift lasts.
4. The step's ``min_requests``, ``min_duration`` and the analysis ``burn_in`` met: ADVANCE,
   or at the last step PROMOTE once every metric (or the net value) is OK.
5. Otherwise CONTINUE, saying what it waits for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from canary.config import RolloutConfig, StepConfig
from canary.decision.analysis import Analysis
from canary.decision.state import Action, Decision, Evidence, Phase, RolloutState
from canary.errors import CommandRejected
from canary.stats import MetricResult, Verdict

# The candidate "fails hard" when every one of its requests failed for this long and at least
# this many of them: a dead candidate is rolled back in seconds, without waiting for burn-in.
HARD_FAILURE_SECONDS = 2.0
HARD_FAILURE_REQUESTS = 5

# The operator commands of ``POST /api/v1/rollouts/{name}/{action}`` (see :func:`command`).
MANUAL_ACTIONS = ("pause", "resume", "promote", "advance", "rollback", "retry")


@dataclass(frozen=True)
class StepProgress:
    """How far the current step is towards its requirements."""

    index: int
    total: int
    kind: str  # "shadow" | "weight"
    weight: float
    samples: int
    required_samples: int
    elapsed: float
    required_duration: float
    burn_in_samples: int
    burn_in: int

    @property
    def met(self) -> bool:
        return (
            self.samples >= self.required_samples
            and self.elapsed >= self.required_duration
            and self.burn_in_samples >= self.burn_in
        )

    @property
    def last(self) -> bool:
        return self.index == self.total - 1

    def describe(self) -> str:
        what = "shadow" if self.kind == "shadow" else f"weight {self.weight:g}%"
        parts = [f"step {self.index + 1}/{self.total} ({what})"]
        if self.required_samples:
            parts.append(f"{self.samples}/{self.required_samples} candidate requests")
        if self.required_duration:
            parts.append(f"{_dur(self.elapsed)} of {_dur(self.required_duration)}")
        if self.burn_in_samples < self.burn_in:
            parts.append(f"burn-in {self.burn_in_samples}/{self.burn_in}")
        return ", ".join(parts)


def progress(
    rollout: RolloutConfig, state: RolloutState, analysis: Analysis, now: float
) -> StepProgress:
    index = min(state.step, len(rollout.steps) - 1)
    step = rollout.steps[index]
    return StepProgress(
        index=index,
        total=len(rollout.steps),
        kind="shadow" if step.is_shadow else "weight",
        weight=step.candidate_weight,
        samples=max(0, analysis.candidate_observed - state.step_base),
        required_samples=step.required_requests,
        elapsed=max(0.0, now - state.step_started_at),
        required_duration=step.required_duration,
        burn_in_samples=analysis.candidate_observed,
        burn_in=rollout.analysis.burn_in,
    )


def decide(
    rollout: RolloutConfig,
    state: RolloutState,
    analysis: Analysis,
    now: float,
    *,
    input_drift: Sequence[str] | None = None,
) -> Decision:
    """What the data calls for now (operator commands are :func:`command`).

    The request-body fields whose input-health check flags a shift
    (``analysis.drifted_inputs``; ``input_drift`` names them instead when given) stop
    automatic advances and promotions with ``inputs.on_drift: hold`` (never rollbacks); with
    ``report`` they never hold.
    """
    if state.phase is Phase.PROMOTED:
        return Decision(Action.CONTINUE, "promoted: the candidate serves 100%")
    if state.phase is Phase.ROLLED_BACK:
        return Decision(Action.CONTINUE, "rolled back: production serves 100%")
    if state.phase is Phase.PAUSED:
        return Decision(Action.HOLD, "paused by an operator: resume, promote or rollback")
    if state.phase is Phase.HOLDING:
        return Decision(
            Action.HOLD,
            "max_duration ended with no verdict (on_inconclusive: hold): "
            "resume, promote or rollback",
        )

    if analysis.srm.verdict is Verdict.WORSE:
        return _rollback(f"sample-ratio mismatch: {analysis.srm.explain()}", analysis.srm)
    if (
        analysis.failing_for >= HARD_FAILURE_SECONDS
        and analysis.failing_requests >= HARD_FAILURE_REQUESTS
    ):
        return Decision(
            Action.ROLLBACK,
            f"candidate failed hard: all of its last {analysis.failing_requests} requests "
            f"failed over {analysis.failing_for:.1f}s",
        )
    for r in analysis.metrics:
        if r.verdict is Verdict.WORSE:
            return _rollback(f"{r.name} is worse than allowed: {r.explain()}", r)
    if analysis.net is not None and analysis.net.verdict is Verdict.WORSE:
        return _rollback(f"the trade-off is net negative: {analysis.net.explain()}", analysis.net)

    held = _input_hold(rollout, analysis.drifted_inputs if input_drift is None else input_drift)
    if now >= state.deadline and not (held and rollout.analysis.on_inconclusive == "promote"):
        policy = rollout.analysis.on_inconclusive
        why = (
            f"max_duration {_dur(rollout.analysis.max_duration)} ended with no verdict "
            f"({_waiting_for(rollout, analysis) or 'nothing pending'}); "
            f"on_inconclusive: {policy}"
        )
        if policy == "rollback":
            return Decision(Action.ROLLBACK, why)
        if policy == "promote":
            return Decision(Action.PROMOTE, why)
        return Decision(Action.HOLD, why)
    if held:
        return Decision(Action.CONTINUE, held)

    step = progress(rollout, state, analysis, now)
    if not step.met:
        return Decision(Action.CONTINUE, step.describe())
    if not step.last:
        nxt = rollout.steps[step.index + 1]
        what = "shadow" if nxt.is_shadow else f"weight {nxt.candidate_weight:g}%"
        return Decision(
            Action.ADVANCE,
            f"step {step.index + 1}/{step.total} done ({step.samples} candidate requests in "
            f"{_dur(step.elapsed)}, no metric worse): next {what}",
        )
    pending = _waiting_for(rollout, analysis)
    if pending:
        return Decision(Action.CONTINUE, f"{step.describe()}: waiting for {pending} to be OK")
    if not rollout.analysis.metrics:
        return Decision(Action.PROMOTE, "last step done; no metrics configured, no guard fired")
    shown = ([analysis.net] if analysis.net is not None else []) + [
        r
        for r in analysis.metrics
        if rollout.analysis.tradeoff is None or r.name not in rollout.analysis.tradeoff
    ]
    return Decision(
        Action.PROMOTE,
        "every metric is within tolerance: " + "; ".join(r.explain() for r in shown),
    )


def _input_hold(rollout: RolloutConfig, input_drift: Sequence[str]) -> str:
    """Why automatic steps wait for the inputs ('' when they do not)."""
    if not input_drift or rollout.inputs is None or rollout.inputs.on_drift != "hold":
        return ""
    return (
        f"holding: input drift on fields {', '.join(input_drift)} (inputs.on_drift: hold); "
        "no advance or promotion while the inputs differ from their baseline"
    )


def _waiting_for(rollout: RolloutConfig, analysis: Analysis) -> str:
    """Names of the results that must still become OK before a promotion."""
    tradeoff = rollout.analysis.tradeoff or {}
    names = [
        r.name for r in analysis.metrics if r.name not in tradeoff and r.verdict is not Verdict.OK
    ]
    if analysis.net is not None and analysis.net.verdict is not Verdict.OK:
        names.append(analysis.net.name)
    return ", ".join(names)


def _rollback(reason: str, r: MetricResult) -> Decision:
    return Decision(Action.ROLLBACK, reason, evidence=evidence(r))


def evidence(r: MetricResult) -> Evidence:
    return Evidence(
        metric=r.name,
        verdict=r.verdict.value.upper(),
        estimate=r.estimate,
        lower=r.lower,
        upper=r.upper,
        n_production=r.n_production,
        n_candidate=r.n_candidate,
        explain=r.explain(),
    )


def track_failures(
    state: RolloutState,
    observed: int,
    errors: int,
    now: float,
    *,
    previous_check: float | None = None,
) -> RolloutState:
    """The hard-failure clock after a check of the candidate's cumulative ``observed`` and
    ``errors`` counts at ``now`` (the same object when nothing changed).

    New requests that all failed start the clock (at ``previous_check``, the last check of
    this process, when the first of them may have been sent; else at ``now``) or add to it;
    one success among them stops it. The clock lives in the persisted state, so a restart
    keeps it (:func:`resume_failures` takes the time canary was down out of it).
    """
    if state.failure_observed is None:  # stored by a canary that kept the clock in memory
        return state.with_(failure_observed=observed, failure_errors=errors)
    since, count = state.failing_since, state.failing_requests
    new_obs, new_err = observed - state.failure_observed, errors - state.failure_errors
    if new_obs < 0 or new_err < 0:
        # Totals restored behind the stored counts (a crash between writing the state and
        # the samples): count again from here.
        return state.with_(failure_observed=observed, failure_errors=errors)
    if new_obs > 0:
        if new_err >= new_obs:
            if since is None:
                since = previous_check or now
            count += new_obs
        else:
            since, count = None, 0
    if (since, count, observed, errors) == (
        state.failing_since,
        state.failing_requests,
        state.failure_observed,
        state.failure_errors,
    ):
        return state
    return state.with_(
        failing_since=since,
        failing_requests=count,
        failure_observed=observed,
        failure_errors=errors,
        failure_checked_at=now,
    )


def resume_failures(state: RolloutState, now: float) -> RolloutState:
    """The hard-failure clock of a rollout resumed at ``now`` by a new process: a running
    clock moves its start forward by the time since its last stored check, so that the time
    canary was down never counts as time the candidate failed."""
    since, checked = state.failing_since, state.failure_checked_at
    if since is None or checked is None or now <= checked:
        return state
    return state.with_(failing_since=since + (now - checked), failure_checked_at=now)


def failure_clock_moved(old: RolloutState, new: RolloutState) -> bool:
    """Whether a check changed what the policy reads of the clock (worth a state write; the
    counts alone are not: a restart that diffs against older counts stops or keeps the clock
    just the same)."""
    return (old.failing_since, old.failing_requests) != (new.failing_since, new.failing_requests)


def command(
    state: RolloutState,
    action: str,
    reason: str | None = None,
    rollout: RolloutConfig | None = None,
) -> Decision:
    """Validate an operator command against the current phase; raise CommandRejected.

    ``action`` is one of :data:`MANUAL_ACTIONS`:

    - ``pause`` / ``resume``: freeze every automatic action / let the policy act again.
    - ``promote``: the candidate gets 100% now, from any step (the API's full promotion).
    - ``advance``: the next step now, exactly as an automatic ADVANCE (a fresh step: its
      samples and ``min_duration`` count from now); from the last step it promotes. A shadow
      step advances like any other: the next step's weight sends real users to the
      candidate. The phase stays: a paused or held rollout advances and stays paused or held.
    - ``rollback``: production gets 100% now.
    - ``retry``: a rolled-back rollout starts again from step 1 with the same arms; the
      caller starts its samples afresh (:func:`transition` gives the new attempt's state).

    ``rollout`` (the rollout's config) is needed by ``advance`` and ``retry``, which name the
    steps in their reasons.
    """
    phase = state.phase
    who = f"by an operator{': ' + reason if reason else ''}"
    if action == "pause":
        if phase is Phase.PAUSED:
            raise CommandRejected(f"rollout {state.name!r} is already paused")
        if phase.terminal:
            raise CommandRejected(f"rollout {state.name!r} is {phase.value}; nothing to pause")
        return Decision(Action.PAUSE, f"paused {who}", manual=True)
    if action == "resume":
        if phase not in (Phase.PAUSED, Phase.HOLDING):
            raise CommandRejected(
                f"rollout {state.name!r} is {phase.value}; only a paused or held rollout resumes"
            )
        return Decision(Action.RESUME, f"resumed {who}", manual=True)
    if action in ("promote", "advance"):
        if phase is Phase.PROMOTED:
            raise CommandRejected(f"rollout {state.name!r} is already promoted")
        if phase is Phase.ROLLED_BACK:
            raise CommandRejected(
                f"rollout {state.name!r} is rolled_back; retry it to start again from step 1 "
                "with the same candidate and fresh samples, or deploy a new candidate (change "
                "its endpoints) and reload to start a new rollout"
            )
        if action == "promote":
            return Decision(Action.PROMOTE, f"promoted {who}", manual=True)
        steps = _steps_of(rollout, action)
        index = min(state.step, len(steps) - 1)
        if index >= len(steps) - 1:
            return Decision(
                Action.PROMOTE,
                f"promoted {who} (advanced past the last step {index + 1}/{len(steps)})",
                manual=True,
            )
        nxt = steps[index + 1]
        what = "shadow" if nxt.is_shadow else f"weight {nxt.candidate_weight:g}%"
        return Decision(
            Action.ADVANCE,
            f"advanced {who} from step {index + 1}/{len(steps)} to step "
            f"{index + 2}/{len(steps)} ({what})",
            manual=True,
        )
    if action == "rollback":
        if phase is Phase.ROLLED_BACK:
            raise CommandRejected(f"rollout {state.name!r} is already rolled back")
        return Decision(Action.ROLLBACK, f"rolled back {who}", manual=True)
    if action == "retry":
        if phase is not Phase.ROLLED_BACK:
            raise CommandRejected(
                f"rollout {state.name!r} is {phase.value}; only a rolled-back rollout can be "
                "retried"
            )
        steps = _steps_of(rollout, action)
        first = steps[0]
        what = "shadow" if first.is_shadow else f"weight {first.candidate_weight:g}%"
        return Decision(
            Action.RETRY,
            f"retried {who}: attempt {state.attempt + 1} with the same candidate and fresh "
            f"samples, from step 1/{len(steps)} ({what})",
            manual=True,
        )
    raise CommandRejected(f"unknown action {action!r}; expected one of {', '.join(MANUAL_ACTIONS)}")


def _steps_of(rollout: RolloutConfig | None, action: str) -> Sequence[StepConfig]:
    if rollout is None:
        raise ValueError(f"command {action!r} needs the rollout's config")
    return rollout.steps


def transition(
    rollout: RolloutConfig,
    state: RolloutState,
    decision: Decision,
    candidate_observed: int,
    now: float,
) -> RolloutState:
    """The state after carrying out ``decision`` (the same object when nothing changes).

    RETRY gives the state of the rollout's next attempt, as a new rollout starts (step 1,
    fresh step and ``max_duration`` clocks, no samples counted: ``candidate_observed`` is not
    read); the caller starts the samples afresh and keeps the decision log.
    """
    a = decision.action
    if a is Action.RETRY:
        return RolloutState.start(rollout, now).with_(
            attempt=state.attempt + 1, last_action=a.value, reason=decision.reason
        )
    common = {"last_action": a.value, "reason": decision.reason, "updated_at": now}
    if a is Action.ADVANCE:
        return state.with_(
            step=min(state.step + 1, len(rollout.steps) - 1),
            step_started_at=now,
            step_base=candidate_observed,
            **common,
        )
    if a is Action.PROMOTE:
        return state.with_(phase=Phase.PROMOTED, paused_at=None, **common)
    if a is Action.ROLLBACK:
        return state.with_(phase=Phase.ROLLED_BACK, paused_at=None, **common)
    if a is Action.PAUSE:
        return state.with_(phase=Phase.PAUSED, paused_at=now, **common)
    if a is Action.RESUME:
        if state.phase is Phase.HOLDING:
            # A held rollout ran out of time: give it a fresh max_duration.
            deadline = now + rollout.analysis.max_duration
        else:
            deadline = state.deadline + (now - (state.paused_at or now))
        return state.with_(phase=Phase.RUNNING, paused_at=None, deadline=deadline, **common)
    if a is Action.HOLD and state.phase is Phase.RUNNING:
        return state.with_(phase=Phase.HOLDING, **common)
    return state


def _dur(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 1 or seconds == 0 else f"{seconds:.1f}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


__all__ = [
    "HARD_FAILURE_REQUESTS",
    "HARD_FAILURE_SECONDS",
    "MANUAL_ACTIONS",
    "StepProgress",
    "command",
    "decide",
    "evidence",
    "failure_clock_moved",
    "progress",
    "resume_failures",
    "track_failures",
    "transition",
]
