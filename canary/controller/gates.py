"""Gates: an automatic ADVANCE or PROMOTE waits until its gate opens (docs/gates.md).

A rollout's ``webhooks`` entries that list ``confirm-advance`` or ``confirm-promotion`` gate
that transition. An entry with a ``url`` opens when the URL answers 2xx; one without waits for
an operator (``canary approve NAME``). An operator's approval opens every gate of the step's
pending transition, once (it is kept in the rollout's state: a restart keeps it).

The controller never waits on a gate: :meth:`Gates.check` answers at once from what it knows
and, when the gate's URLs must be asked (again), starts one round of questions in a task of
its own, at most one round per rollout at a time and no sooner than :data:`MIN_GAP` seconds
after the last one ended. The round's answers are read by the next check; a round that opens
the gate asks for an evaluation at once (``on_open``) so that the transition follows within a
flush interval rather than an analysis interval. Rollbacks and operator commands are never
gated: the controller checks only automatic ADVANCE and PROMOTE decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from canary.config import RolloutConfig, WebhookConfig
from canary.decision import Action, RolloutState
from canary.metrics import Metrics

log = logging.getLogger("canary.controller")

MIN_GAP = 1.0  # seconds between the end of one round of questions to a gate and the next
_SLACK = 1.0  # seconds a round may outlast its slowest gate's timeout before it is abandoned

GATED = {Action.ADVANCE: "confirm-advance", Action.PROMOTE: "confirm-promotion"}


class GateReply(Protocol):
    """One gate's answer (:class:`canary.webhooks.GateAnswer` is one)."""

    @property
    def open(self) -> bool:
        """It answered 2xx in time."""
        ...

    @property
    def reason(self) -> str:
        """What it answered, for ``status`` and the log."""
        ...

    @property
    def result(self) -> str:
        """yes, no, timeout or error (the label of ``canary_gate_answers_total``)."""
        ...


@dataclass(frozen=True, slots=True)
class GateAnswer:
    """A reply made here: no gate was asked, or the round failed as a whole."""

    open: bool
    reason: str
    result: str


class GateAsker(Protocol):
    """Asks one gate once (:meth:`canary.webhooks.WebhookSender.ask`)."""

    async def ask(
        self, rollout: str, event: str, hook: WebhookConfig, payload: Mapping[str, Any]
    ) -> GateReply: ...


@dataclass(frozen=True, slots=True)
class GateCheck:
    """What :meth:`Gates.check` found: the transition may happen (``open``) or waits.

    ``reason`` says why (``waiting for confirm-promotion: http://h/gate answered 403 'change
    freeze'``, or what opened it); ``log`` is true exactly once per wait, when it starts: the
    controller writes one WAIT entry to the decision log then.
    """

    open: bool
    event: str
    reason: str
    log: bool = False
    approved: bool = False  # opened by an operator's approval (the state's approval is spent)


@dataclass
class _Waiting:
    key: tuple[str, int, int, str]  # (event, step, attempt, fingerprint): one pending transition
    since: float  # wall time the wait started
    task: asyncio.Task[list[GateReply]] | None = None
    ended_at: float | None = None  # monotonic: when the last round of questions ended
    rounds: int = 0
    answers: list[GateReply] | None = None  # of the last round that ended
    logged: bool = False
    urls: list[str] = field(default_factory=list)


def gate_event(cfg: RolloutConfig, state: RolloutState) -> str | None:
    """The gate an approval at the current step opens: the pending transition's, else the
    step's own (confirm-promotion at the last step, confirm-advance before it); None when
    no entry of ``webhooks`` gates it."""
    last = state.step >= len(cfg.steps) - 1
    event = "confirm-promotion" if last else "confirm-advance"
    return event if any(event in h.on for h in cfg.webhooks) else None


class Gates:
    """The gates of every rollout of one controller (leader-only, like every decision)."""

    def __init__(
        self,
        asker: GateAsker | None,
        metrics: Metrics,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        on_open: Callable[[str], None] | None = None,
    ) -> None:
        self._asker = asker
        self._metrics = metrics
        self._monotonic = monotonic
        self._on_open = on_open
        self._waiting: dict[str, _Waiting] = {}

    def pending(self, name: str) -> str | None:
        """The gate rollout ``name`` waits at now (None: it waits at none)."""
        w = self._waiting.get(name)
        return w.key[0] if w is not None else None

    def check(
        self,
        cfg: RolloutConfig,
        state: RolloutState,
        action: Action,
        payload: Mapping[str, Any],
        now: float,
    ) -> GateCheck | None:
        """Whether the automatic ``action`` may happen now; None when nothing gates it.

        ``payload`` is what the gate's URLs are sent (the decision and where the rollout is).
        Call :meth:`clear` when the policy wants something else: a transition the policy no
        longer wants waits at no gate (a later one asks afresh)."""
        name = cfg.name
        event = GATED.get(action)
        hooks = [h for h in cfg.webhooks if event is not None and event in h.on]
        if event is None or not hooks:
            self.clear(name)
            return None
        key = (event, state.step, state.attempt, state.fingerprint)
        w = self._waiting.get(name)
        if w is None or w.key != key:
            self.clear(name)
            w = _Waiting(key, now, urls=[h.url for h in hooks if h.url is not None])
            self._waiting[name] = w
            self._metrics.gate_waiting.labels(name, event).set(1)
        if state.approved_step == state.step and state.approved_gate == event:
            self.clear(name)
            why = state.approved_reason or "approved by an operator"
            return GateCheck(True, event, f"{event} {why}", approved=True)
        manual = [h for h in hooks if h.url is None]
        if manual:
            return self._hold(
                w,
                f"waiting for {event}: an operator's approval (canary approve {name})",
            )
        answers = w.answers
        if answers is not None and all(a.open for a in answers):
            self.clear(name)
            return GateCheck(True, event, f"{event} open: " + "; ".join(a.reason for a in answers))
        self._maybe_ask(name, event, hooks, w, payload)
        if answers is None:
            return GateCheck(False, event, f"waiting for {event}: asking {', '.join(w.urls)}")
        said = "; ".join(a.reason for a in answers if not a.open)
        again = "asking again" if w.task is not None else "asks again at the next analysis"
        return self._hold(
            w,
            f"waiting for {event}: {said} ({again}; or approve: canary approve {name})",
        )

    def _hold(self, w: _Waiting, reason: str) -> GateCheck:
        first = not w.logged
        w.logged = True
        return GateCheck(False, w.key[0], reason, log=first)

    def _maybe_ask(
        self,
        name: str,
        event: str,
        hooks: list[WebhookConfig],
        w: _Waiting,
        payload: Mapping[str, Any],
    ) -> None:
        if w.task is not None:
            return  # one round at a time: a slow gate is never asked twice at once
        mono = self._monotonic()
        if w.ended_at is not None and mono - w.ended_at < MIN_GAP:
            return
        if self._asker is None:
            w.answers = [GateAnswer(False, "no webhook client to ask the gate with", "error")]
            return
        asked = [h for h in hooks if h.url is not None]
        w.task = asyncio.get_running_loop().create_task(
            self._round(name, event, asked, dict(payload)), name=f"canary-gate-{name}"
        )
        w.task.add_done_callback(lambda task: self._ended(name, w, task))

    async def _round(
        self, name: str, event: str, hooks: list[WebhookConfig], payload: dict[str, Any]
    ) -> list[GateReply]:
        asker = self._asker
        assert asker is not None
        bound = max(h.timeout for h in hooks) + _SLACK
        try:
            async with asyncio.timeout(bound):
                return list(
                    await asyncio.gather(*(asker.ask(name, event, h, payload) for h in hooks))
                )
        except TimeoutError:
            return [GateAnswer(False, f"the gates did not answer within {bound:g}s", "timeout")]

    def _ended(self, name: str, w: _Waiting, task: asyncio.Task[list[GateReply]]) -> None:
        w.task = None
        w.ended_at = self._monotonic()
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # a bug: the gate stays shut, the next analysis asks again
            log.error("rollout %s: asking gate %s failed", name, w.key[0], exc_info=exc)
            w.answers = [GateAnswer(False, f"asking failed: {exc!r}", "error")]
            return
        w.answers = task.result()
        w.rounds += 1
        for a in w.answers:
            self._metrics.gate_answers.labels(name, w.key[0], a.result).inc()
        if self._waiting.get(name) is w and all(a.open for a in w.answers):
            log.info("rollout %s: gate %s opens: %s", name, w.key[0], w.answers[0].reason)
            if self._on_open is not None:
                self._on_open(name)

    def approved(self, name: str, event: str) -> None:
        """Count an operator's approval of rollout ``name``'s gate ``event``."""
        self._metrics.gate_answers.labels(name, event, "approved").inc()

    def clear(self, name: str) -> None:
        """Rollout ``name`` waits at no gate now (a round still asking is cancelled)."""
        w = self._waiting.pop(name, None)
        if w is None:
            return
        self._metrics.gate_waiting.labels(name, w.key[0]).set(0)
        if w.task is not None:
            w.task.cancel()

    async def close(self) -> None:
        """Cancel every round still asking (the controller stops)."""
        tasks = [w.task for w in self._waiting.values() if w.task is not None]
        for name in list(self._waiting):
            self.clear(name)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


__all__ = ["GATED", "MIN_GAP", "GateAsker", "GateCheck", "Gates", "gate_event"]
