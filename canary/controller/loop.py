"""The controller's loop: flush, analyse, decide, apply; operator commands; reloads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

from canary.analyzer import AnalysisJob, Analyzer, InlineAnalyzer
from canary.config import Config, RolloutConfig, WebhookConfig
from canary.controller.gates import GATED, GateAsker, Gates, gate_event
from canary.controller.gauges import Gauges
from canary.controller.history import HistoryWriter, history_point
from canary.controller.leadership import Leadership, admin_url_of
from canary.controller.persistence import StoreGuard, StoreWriter
from canary.controller.rollout import DECISIONS_SHOWN, Rollout, RolloutView
from canary.controller.shared_feedback import FeedbackSharing, FeedbackSource
from canary.controller.shared_inputs import InputSharing
from canary.decision import (
    Action,
    Analysis,
    Decision,
    RolloutState,
    command,
    decide,
    fingerprint,
    resume_failures,
    step_fields,
    transition,
    upgrade_entry,
)
from canary.errors import (
    CommandRejected,
    FencedError,
    NotLeader,
    StoreDataLost,
    StoreError,
    UnknownRollout,
)
from canary.metrics import Metrics
from canary.observe import Recorder, RolloutAccumulator, Weights
from canary.observe.inputs import InputHealth
from canary.store import FileBackedStore, Store, check_identity

log = logging.getLogger("canary.controller")  # one logger for the whole controller package


FLUSH_INTERVAL = 0.25  # seconds of samples a crash can lose (DESIGN.md: "~250 ms")
STORE_TIMEOUT = 5.0  # a store call running longer than this marks the store as down
_EVENTS = {
    Action.ADVANCE: "advance",
    Action.PROMOTE: "promote",
    Action.ROLLBACK: "rollback",
    Action.PAUSE: "pause",
    Action.RESUME: "resume",
    Action.HOLD: "hold",
    Action.START: "start",
    Action.RETRY: "start",  # a retried rollout starts again (its log entry says RETRY)
}
RETRY_KEEPS_DECISIONS = 1000  # decision-log entries a retry writes back after the reset


class WeightSink(Protocol):
    def __call__(self, rollout: str, weights: Weights) -> None: ...


class Notifier(Protocol):
    def fire(
        self,
        rollout: str,
        event: str,
        hooks: Sequence[WebhookConfig],
        payload: Mapping[str, Any],
    ) -> int: ...


class Controller:
    """Runs every rollout of a config against its store and recorder."""

    def __init__(
        self,
        config: Config,
        store: Store,
        recorder: Recorder,
        metrics: Metrics,
        apply_weights: WeightSink,
        *,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        flush_interval: float = FLUSH_INTERVAL,
        analyzer: Analyzer | None = None,
        input_health: Callable[[str], InputHealth | None] | None = None,
        store_timeout: float | None = None,
        leadership: Leadership | None = None,
        on_leading: Callable[[bool], Awaitable[None]] | None = None,
        on_share: Callable[[str, float], None] | None = None,
        gate_asker: GateAsker | None = None,
    ) -> None:
        """``analyzer`` runs the statistics (``canary run``: a
        :class:`~canary.analyzer.WorkerAnalyzer`, so that the proxy's requests never wait for
        them; default: in the event loop). ``input_health(rollout)`` is the rollout's input
        health, handed to the analysis. ``store_timeout``: a store call running longer marks
        the store as down (default :data:`STORE_TIMEOUT`).

        ``leadership``: the store is shared with other canary processes (``--workers``,
        replicas). Every process flushes its samples to it; only the holder of the store's
        lease analyses, decides and writes (fenced); every process serves the weights of
        the state stored (:meth:`_sync`, every flush interval), and the analysis reads the
        merged samples back from the store. None: this process is alone (the default).
        ``on_leading(leading)`` is awaited when this process becomes or stops being the
        leader (the runtime runs the resource scrapers on the leader only).
        ``on_share(rollout, share)``: this process's estimated share of the rollout's requests,
        once per analysis interval (the proxy amortises ``per_hour`` costs over the total).
        ``gate_asker`` asks the URLs of the rollouts' gates (``confirm-advance``,
        ``confirm-promotion``; :mod:`canary.controller.gates`); None: a gate with a URL
        stays shut (only an operator's approval opens it)."""
        self.config = config
        self.analyzer: Analyzer = analyzer if analyzer is not None else InlineAnalyzer()
        self._input_health = input_health
        self._store = store
        self._guard = StoreGuard(
            store, metrics, STORE_TIMEOUT if store_timeout is None else store_timeout
        )
        self._gauges = Gauges(metrics, lambda: self._rollouts, self._acting)
        self._recorder = recorder
        self._metrics = metrics
        self._apply_weights = apply_weights
        self._notifier = notifier
        self._clock = clock
        self._monotonic = monotonic
        self.flush_interval = flush_interval
        self._rollouts: dict[str, Rollout] = {}
        self._leadership = leadership
        self._led = False  # took over as leader (and adopted the rollouts) this term
        self._on_leading = on_leading
        self._on_share = on_share
        self._served: dict[str, Weights] = {}  # shared: the weights handed to the proxy
        self._writer = StoreWriter(
            store, self._guard, metrics, recorder, lambda: self._rollouts, leadership
        )
        # Shared: input health merged over every process (controller/shared_inputs.py).
        self._inputs = (
            InputSharing(
                store,
                recorder,
                lambda: leadership.holder,
                timeout=self._guard.timeout,
                clock=clock,
                monotonic=monotonic,
            )
            if leadership is not None
            else None
        )
        # Shared: answers for feedback posted to any process (controller/shared_feedback.py).
        self._feedback = (
            FeedbackSharing(store, metrics, timeout=self._guard.timeout)
            if leadership is not None
            else None
        )
        # Metric history for the dashboard and reports: queued here, written by each flush.
        self._history = HistoryWriter(
            store, metrics, timeout=self._guard.timeout, fence=self._fence
        )
        self._lock = asyncio.Lock()  # control path only: evaluation vs operator commands
        self._gates = Gates(gate_asker, metrics, monotonic=monotonic, on_open=self._gate_opened)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()  # the loop ends after the round it is in
        self._eval_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None

    @property
    def feedback_sharing(self) -> FeedbackSharing | None:
        """Shared mode: feedback joined over every process (None: this process alone)."""
        return self._feedback

    def share_feedback(self, source: FeedbackSource) -> None:
        """Shared mode: the proxy's feedback stores, whose answers each flush writes to the
        store so that labels posted to any process join them (a no-op when alone)."""
        if self._feedback is not None:
            self._feedback.attach(source)

    @property
    def leadership(self) -> Leadership | None:
        """This process's view of the lease (None: it is alone on its store)."""
        return self._leadership

    @property
    def store_ok(self) -> bool:
        """The store works: the last operation succeeded and its health check is clean."""
        return self._guard.ok

    @property
    def store_error(self) -> str:
        """Why the store is considered down ("" when it is not)."""
        return self._guard.error

    # -- lifecycle ------------------------------------------------------------------------

    async def load(self) -> dict[str, Weights]:
        """Restore (or start) every configured rollout; return the weights to serve.

        Also warms the analyzer (e.g. starts the worker process) before the proxy serves.
        """
        if self._leadership is not None:
            self._led = await self._leadership.renew()
        for r in self.config.rollouts:
            self._rollouts[r.name] = await (self._adopt(r) if self._acting() else self._watch(r))
        self.analyzer.warm()
        weights = self.weights()
        if self._leadership is not None:
            self._served = dict(weights)
        return weights

    def _acting(self) -> bool:
        """This process may decide and write: it is alone, or it leads now."""
        return self._leadership is None or self._leadership.leading

    def _fence(self) -> int | None:
        return self._leadership.token if self._leadership is not None else None

    def weights(self) -> dict[str, Weights]:
        return {n: ro.state.weights(ro.config) for n, ro in self._rollouts.items()}

    async def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            await self.analyzer.start()
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run(), name="controller")
            if self._watch_task is None and isinstance(self._store, FileBackedStore):
                every = max(self.flush_interval, 0.1)
                watch = self._guard.watch(every, self._writer.reopen_deleted)
                self._watch_task = loop.create_task(watch, name="store-watch")

    async def stop(self) -> None:
        """Stop the loop and write the last samples (a clean stop loses nothing).

        The loop finishes the round it is in (within the store timeout) rather than being
        cancelled in it: a write cancelled after the store applied it, but before the loop
        marked it written, would be written again by the last flush (counted twice)."""
        if self._task is not None:
            self._stopping.set()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), self._guard.timeout + 1.0)
        for task in (self._task, self._eval_task, self._watch_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._eval_task = self._watch_task = None
        await self._gates.close()
        await self.analyzer.close()
        await self.flush()
        if self._inputs is not None:  # this process's last input counts stay in the merge
            with contextlib.suppress(StoreError, TimeoutError):
                await self._inputs.write(list(self._rollouts))
        if self._leadership is not None:
            await self._leadership.release()  # another process takes over at once

    async def _run(self) -> None:
        while not self._stopping.is_set():
            started = self._monotonic()
            try:
                await self.flush()
                if self._leadership is not None:
                    await self._lead_or_follow()
                    await self._share_inputs()
                if self._acting():
                    self._start_evaluation()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the controller for good
                log.exception("controller iteration failed")
            elapsed = self._monotonic() - started
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._stopping.wait(), max(0.0, self.flush_interval - elapsed)
                )

    async def tick(self) -> None:
        """One round of the loop, awaited to its end: flush, lead or follow, and (when this
        process acts) every due analysis. Tests and simulations drive time with it."""
        await self.flush()
        if self._leadership is not None:
            await self._lead_or_follow()
            await self._share_inputs()
        if self._acting():
            await self.evaluate()

    # -- samples and the store ------------------------------------------------------------

    async def flush(self) -> None:
        """Move the proxy's deltas into the totals and the store; retry unsaved writes."""
        await self._writer.flush()
        if self._feedback is not None:
            await self._feedback.flush()
        await self._history.flush()

    async def check_store(self) -> None:
        """One health check of the store (the watchdog's step; tests call it directly)."""
        await self._guard.check(self._writer.reopen_deleted)

    # -- shared store: leading and following ----------------------------------------------

    async def _lead_or_follow(self) -> None:
        """Renew or take the lease; a new leader adopts every rollout from the store (its
        persisted state, decision log, hard-failure clock and merged samples); then serve
        the stored weights."""
        assert self._leadership is not None
        try:
            await check_identity(self._store)
        except StoreDataLost as exc:  # no process may act on (or serve) what is left
            self._guard.lost_data(exc)
            if self._leadership.leading:
                await self._leadership.release()
            self._led = False
            return
        except StoreError as exc:  # unreachable: hold; the lease runs out by itself
            self._guard.failed("lease", exc)
            return
        leading = await self._leadership.renew()
        if leading and not self._led:
            async with self._lock:
                try:
                    for r in self.config.rollouts:
                        adopted = await self._adopt(r)
                        _keep_unflushed(self._rollouts.get(r.name), adopted)
                        self._rollouts[r.name] = adopted
                except StoreError as exc:
                    self._guard.failed("take over", exc)
                    return  # tried again at the next flush
        changed, self._led = leading != self._led, leading
        if changed and not leading:
            for name in list(self._rollouts):  # the new leader asks the gates
                self._gates.clear(name)
        if changed and self._on_leading is not None:
            try:
                await self._on_leading(leading)
            except Exception:  # e.g. a scraper that cannot start: leading goes on
                log.exception("acting on the change of leadership failed")
        await self._sync()

    async def _sync(self) -> None:
        """Serve the weights of what the store holds (within one flush interval of a
        decision, in every process); a follower also keeps its view of each rollout (state,
        decision log, samples) current for the admin API."""
        mono = self._monotonic()
        for name, ro in list(self._rollouts.items()):
            try:
                if not self._acting():
                    await self._follow(ro, mono)
                elif ro.state_dirty or ro.unsaved:
                    continue  # the leader's newest state is not stored yet: not served yet
            except StoreError as exc:
                self._guard.failed("sync", exc)
                return
            weights = ro.state.weights(ro.config)
            if self._served.get(name) != weights:
                self._served[name] = weights
                self._apply_weights(name, weights)
        self._guard.recovered()  # the store answered this round (a flush may not have asked)

    async def _follow(self, ro: Rollout, mono: float) -> None:
        name = ro.config.name
        data = await self._store.get_state(name)
        if data is not None and data != ro.stored:
            state = RolloutState.from_dict(data)
            if state.fingerprint == ro.state.fingerprint:
                if state.attempt != ro.state.attempt:  # retried by the leader: samples
                    self._recorder.remove(name)  # taken here before it must not count
                    ro.pending = RolloutAccumulator(ro.totals.accuracy)
                    ro.batch, ro.waiting = None, None
                ro.stored, ro.state = data, state
                self._gauges.state(ro.config, state)  # the phase and step it serves now
                stored = await self._store.decisions(name, DECISIONS_SHOWN)
                ro.decisions.clear()
                ro.decisions.extend(upgrade_entry(e, len(ro.config.steps)) for e in stored)
        if mono >= ro.next_eval:  # the merged samples, for the admin API's counts
            ro.next_eval = mono + ro.config.analysis.interval
            totals = await self._store.get_samples(name)
            if totals is not None:
                ro.totals = totals
                self._share(ro)
        leader = self._leadership.leader if self._leadership is not None else None
        ro.status = f"following: {leader or 'no process'} leads the rollouts"
        last = ro.decisions[-1] if ro.decisions else None
        if last is not None and last.get("action") == "WAIT":  # the leader waits at a gate
            ro.status = f"{last.get('reason')} ({ro.status})"

    async def _share_inputs(self) -> None:
        """Shared: write this process's input counts, merge the other processes'."""
        if self._inputs is not None:
            await self._inputs.sync(list(self._rollouts), leading=self._acting())

    def _share(self, ro: Rollout) -> None:
        share = ro.traffic_share()
        if share is not None and self._on_share is not None:
            self._on_share(ro.config.name, share)

    async def _watch(self, r: RolloutConfig) -> Rollout:
        """A rollout as a follower first sees it: as stored (when the leader runs it with
        these endpoints), else as it would start (served until the leader writes it)."""
        now = self._clock()
        data = await self._store.get_state(r.name)
        state = RolloutState.from_dict(data) if data is not None else None
        if state is None or state.fingerprint != fingerprint(r):
            data, state = None, RolloutState.start(r, now)
        ro = Rollout.fresh(
            r, state, await self._store.get_samples(r.name), [], self._recorder.accuracy
        )
        ro.stored = data
        return ro

    # -- decisions ------------------------------------------------------------------------

    def _start_evaluation(self) -> None:
        """Run the due analyses in their own task, unless the last round is still running.

        An analysis takes as long as the analyzer needs (in a worker process: longer when the
        proxy keeps the CPU busy); flushes and operator commands go on meanwhile.
        """
        if self._eval_task is None or self._eval_task.done():
            self._eval_task = asyncio.get_running_loop().create_task(
                self._evaluate_logged(), name="controller-analysis"
            )

    async def _evaluate_logged(self) -> None:
        try:
            await self.evaluate()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not stop the controller for good
            log.exception("controller analysis failed")

    async def evaluate(self, *, force: bool = False) -> None:
        """Analyze and decide every rollout whose interval has come (all with ``force``)."""
        await self.analyzer.check()
        mono = self._monotonic()
        for ro in list(self._rollouts.values()):
            if not force and mono < ro.next_eval:
                continue
            ro.next_eval = mono + ro.config.analysis.interval
            await self._evaluate(ro)

    async def _evaluate(self, ro: Rollout) -> None:
        cfg, name = ro.config, ro.config.name
        now = self._clock()
        t0 = time.perf_counter()
        shared = self._leadership is not None
        if shared:  # the merged samples of every process
            totals = await self._store.get_samples(name)
            ro.totals = totals if totals is not None else RolloutAccumulator(ro.totals.accuracy)
            self._share(ro)
        ro.track_failures(now)
        failing_for, failing_requests = ro.state.failing_for(now), ro.state.failing_requests
        health = self._input_health(name) if self._input_health is not None else None
        made_of = (ro.version, cfg, health.requests if health is not None else None)
        fresh = True
        # Shared: other processes' samples are not counted in ``version``: analyse each time.
        if not shared and ro.analysis is not None and ro.analysed == made_of:
            # No sample (and no request body) since the last analysis of this config: the
            # tests would say the same (they are functions of the totals and the input
            # counts); only the hard-failure clock moves on.
            analysis = replace(
                ro.analysis, failing_for=failing_for, failing_requests=failing_requests
            )
            fresh = False
        else:
            job = AnalysisJob(cfg, ro.totals, failing_for, failing_requests, health)
            analysis = await self.analyzer.analyze(job)
        async with self._lock:  # the state may not change between decide and apply
            if self._rollouts.get(name) is not ro or ro.config is not cfg:
                return  # reloaded meanwhile: the next interval analyses the new config
            ro.analysed = made_of
            await self._decide(ro, analysis, t0, export=fresh)

    async def _decide(
        self, ro: Rollout, analysis: Analysis, t0: float, *, export: bool = True
    ) -> None:
        cfg, name = ro.config, ro.config.name
        now = self._clock()
        ro.analysis = analysis
        if export:
            self._gauges.analysis(name, analysis)
            if analysis.inputs:  # drift starting or ending is logged, scraped or not
                monitor = self._recorder.input_monitor(name)
                if monitor is not None:
                    monitor.log_changes(analysis.inputs)
            await asyncio.sleep(0)  # the gauges and the decision: two short turns of the loop
        if not self.store_ok and not ro.state.phase.terminal:
            ro.status = f"holding: the state store is unavailable ({self.store_error})"
            return
        if not self._acting():
            return  # the lease ran out meanwhile: the new leader decides
        decision = decide(cfg, ro.state, analysis, now)
        self._metrics.analysis_seconds.labels(name).set(time.perf_counter() - t0)
        # An automatic ADVANCE or PROMOTE waits at its gate (never a rollback: the gates
        # check only those two, and forget a transition the policy no longer wants).
        payload = ro.entry(decision, now) if decision.action in GATED else {}
        gate = self._gates.check(cfg, ro.state, decision.action, payload, now)
        if gate is not None and not gate.open:
            ro.status = gate.reason
            if gate.log:  # once per wait, when it starts
                with contextlib.suppress(FencedError):
                    await self._apply(ro, Decision(Action.WAIT, gate.reason), ro.state, now)
            elif export and not ro.state.phase.terminal:
                self._record_history(ro, now)
            return
        if gate is not None:
            decision = replace(decision, reason=f"{decision.reason}; {gate.reason}")
        new = transition(cfg, ro.state, decision, analysis.candidate_observed, now)
        if gate is not None and gate.approved:  # an approval opens one transition
            new = new.with_(approved_step=None, approved_gate="", approved_reason="")
        ro.status = decision.reason
        if new is not ro.state:
            with contextlib.suppress(FencedError):  # the new leader decides
                await self._apply(ro, decision, new, now)
        elif export and not ro.state.phase.terminal:
            self._record_history(ro, now)

    def _commanded(self, name: str) -> Rollout:
        """The rollout an operator's command is for; UnknownRollout, or NotLeader when this
        process does not decide (shared mode: the admin API forwards it to the leader)."""
        ro = self._rollouts.get(name)
        if ro is None:
            raise UnknownRollout(name)
        if not self._acting():
            assert self._leadership is not None
            leader = self._leadership.leader
            raise NotLeader(
                f"this canary process does not lead the rollouts (the leader is "
                f"{leader or 'not known yet'}); send the command to it",
                leader=leader,
                admin_url=admin_url_of(leader, self._leadership.key),
            )
        return ro

    async def command(self, name: str, action: str, reason: str | None = None) -> dict[str, Any]:
        """Carry out an operator's command (one of ``MANUAL_ACTIONS``: pause, resume,
        promote, advance, rollback, retry); raise CommandRejected (StoreError: a retry could
        not reset the store, nothing changed)."""
        ro = self._commanded(name)
        async with self._lock:
            ro = self._rollouts.get(name, ro)  # replaced meanwhile (a reload, a retry)
            decision = command(ro.state, action, reason, ro.config)
            now = self._clock()
            try:
                if decision.action is Action.RETRY:
                    ro = await self._retry(ro, decision, now)
                else:
                    observed = ro.totals.candidate.observed
                    new = transition(ro.config, ro.state, decision, observed, now)
                    ro.status = decision.reason
                    await self._apply(ro, decision, new, now)
            except FencedError as exc:
                raise _lost_leadership(exc) from exc
        weight, shadow = ro.state.weights(ro.config)
        index = min(ro.state.step, len(ro.config.steps) - 1)
        return {
            "name": name,
            "phase": ro.state.phase.value,
            "action": decision.action.value,
            "reason": decision.reason,
            **step_fields(ro.state.step, len(ro.config.steps)),
            "step_kind": "shadow" if ro.config.steps[index].is_shadow else "weight",
            "weights": {"production": 100.0 - weight, "candidate": weight},
            "shadow": shadow,
            "attempt": ro.state.attempt,
        }

    def _gate_opened(self, name: str) -> None:
        """A gate's URLs said yes: evaluate the rollout at the next flush, not an interval
        later (the policy must still want the transition)."""
        ro = self._rollouts.get(name)
        if ro is not None:
            ro.next_eval = 0.0

    async def approve(self, name: str, reason: str | None = None) -> dict[str, Any]:
        """An operator opens the gate of the transition pending at the current step (the
        one waiting now, else the step's own: confirm-advance, or confirm-promotion at the
        last step), once; kept in the state (a restart keeps it). Raise UnknownRollout,
        NotLeader (shared mode: the admin API forwards it to the leader) or CommandRejected
        (finished, or nothing gated at this step)."""
        ro = self._commanded(name)
        async with self._lock:
            ro = self._rollouts.get(name, ro)
            cfg, state = ro.config, ro.state
            if state.phase.terminal:
                phase = state.phase.value
                raise CommandRejected(f"rollout {name!r} is {phase}; nothing to approve")
            event = self._gates.pending(name) or gate_event(cfg, state)
            if event is None:
                where = step_fields(state.step, len(cfg.steps))
                raise CommandRejected(
                    f"rollout {name!r} has no gate at step {where['step']}/{where['steps']}: "
                    "no webhooks entry lists "
                    + (
                        "confirm-promotion"
                        if where["step"] == where["steps"]
                        else "confirm-advance"
                    )
                    + "; nothing to approve"
                )
            who = "approved by an operator" + (f": {reason}" if reason else "")
            now = self._clock()
            decision = Decision(Action.APPROVE, f"{event} {who}", manual=True)
            new = state.with_(
                approved_step=state.step, approved_gate=event, approved_reason=who, updated_at=now
            )
            try:
                await self._apply(ro, decision, new, now)
            except FencedError as exc:
                raise _lost_leadership(exc) from exc
            self._gates.approved(name, event)
            ro.status = decision.reason
            ro.next_eval = 0.0  # acted on at the next flush, if the policy wants it
        weight, shadow = ro.state.weights(ro.config)
        return {
            "name": name,
            "phase": ro.state.phase.value,
            "action": decision.action.value,
            "reason": decision.reason,
            "gate": event,
            **step_fields(ro.state.step, len(ro.config.steps)),
            "step_kind": "shadow" if shadow else "weight",
            "weights": {"production": 100.0 - weight, "candidate": weight},
            "shadow": shadow,
            "attempt": ro.state.attempt,
        }

    async def _retry(self, ro: Rollout, decision: Decision, now: float) -> Rollout:
        """Start rolled-back ``ro`` again (an operator's retry; ``self._lock`` held): the
        same arms from step 1 with fresh samples, as :meth:`_begin` starts a rollout (the
        store's state, samples and input counts reset, the proxy's unflushed samples
        dropped), except that the decision log stays: its stored entries are written back
        after the reset, then RETRY. Returns the rollout that replaced ``ro``.

        Raises StoreError (FencedError: not the leader) when the store could not be read or
        reset; nothing changed then. A crash between the reset and the write of the new
        state restarts the rollout as new (START) without its earlier log.
        """
        cfg, name = ro.config, ro.config.name
        if not self.store_ok:
            raise StoreError(
                f"the state store is unavailable ({self.store_error}); a retry resets the "
                "rollout's samples in it: retry when it is back"
            )
        timeout, fence = self._guard.timeout, self._fence()
        new = transition(cfg, ro.state, decision, 0, now)
        # No write of the old samples, log or history lands after the reset.
        async with self._writer.exclusive(), self._history.exclusive():
            await check_identity(self._store)
            stored = await asyncio.wait_for(
                self._store.decisions(name, RETRY_KEEPS_DECISIONS), timeout
            )
            history = [upgrade_entry(e, len(cfg.steps)) for e in stored]
            history += [e for e in ro.unsaved if e not in history]  # not stored yet
            await asyncio.wait_for(self._store.reset(name, fence=fence), timeout)
            self._history.forget(name)  # the store's history went with the reset
            # From here on the retry happens: the store holds nothing of the rollout until
            # the save below (or, if it fails, the next flush) writes the new attempt.
            self._recorder.remove(name)  # samples taken before the retry must not count
            fresh = Rollout.fresh(cfg, ro.state, None, history, self._recorder.accuracy)
            fresh.unsaved = list(history)  # written back by the save of the new state
            fresh.status = decision.reason
            self._rollouts[name] = fresh
            if self._inputs is not None:  # stopped processes' input counts go
                try:
                    await asyncio.wait_for(self._inputs.drop(name), timeout)
                except (StoreError, TimeoutError) as exc:
                    log.warning("rollout %s: retry kept older input counts: %s", name, exc)
        log.info(
            "rollout %s: retried; attempt %d starts at step 1/%d", name, new.attempt, len(cfg.steps)
        )
        await self._apply(fresh, decision, new, now)
        return fresh

    async def _apply(self, ro: Rollout, decision: Decision, new: RolloutState, now: float) -> None:
        """Carry out a decision (FencedError: another process leads; nothing was done)."""
        cfg, name = ro.config, ro.config.name
        old = ro.state
        ro.state = new
        weights = new.weights(cfg)
        candidate, shadow = weights
        if self._leadership is None:
            self._apply_weights(name, weights)  # the data plane acts first
        entry = ro.entry(decision, now)
        ro.decisions.append(entry)
        self._metrics.decisions.labels(name, decision.action.value).inc()
        self._gauges.state(cfg, new)
        log.info(
            "rollout %s: %s%s -> %s, candidate %g%%%s: %s",
            name,
            decision.action.value,
            " (manual)" if decision.manual else "",
            new.phase.value,
            candidate,
            " (shadow)" if shadow else "",
            decision.reason,
        )
        ro.state_dirty = True
        ro.unsaved.append(entry)
        try:
            await self._writer.save_bounded(ro)
        except FencedError:  # undone: the new leader works from the store, not from us
            ro.state = old
            if ro.decisions and ro.decisions[-1] is entry:
                ro.decisions.pop()
            ro.status = "not the leader any more: the decision was neither stored nor acted on"
            raise
        self._record_history(ro, now, decision)
        if self._leadership is not None and not (ro.state_dirty or ro.unsaved):
            self._served[name] = weights  # stored: every process serves it from the store
            self._apply_weights(name, weights)
        event = _EVENTS.get(decision.action)
        if event is not None and self._notifier is not None and cfg.webhooks:
            self._notifier.fire(name, event, cfg.webhooks, entry)

    # -- configuration --------------------------------------------------------------------

    async def apply_config(self, config: Config) -> dict[str, Weights]:
        """Adopt a reloaded config; return every rollout's weights for the proxy.

        A rollout whose endpoints changed starts over (new samples, step 1); one whose
        thresholds, steps or webhooks changed keeps its state and samples.
        """
        async with self._lock:
            rollouts: dict[str, Rollout] = {}
            for r in config.rollouts:
                old = self._rollouts.get(r.name)
                if old is not None and old.state.fingerprint == fingerprint(r):
                    old.state = _retime(old.state, old.config, r)
                    old.config = r
                    old.next_eval = 0.0
                    rollouts[r.name] = old
                elif self._acting():
                    rollouts[r.name] = await self._adopt(r)
                else:  # a follower never writes: it waits for the leader's state
                    rollouts[r.name] = await self._watch(r)
            for gone in set(self._rollouts) - set(rollouts):
                log.info("rollout %s: no longer configured; its state stays in the store", gone)
                self._gates.clear(gone)
            self._rollouts = rollouts
            self.config = config
            for ro in rollouts.values():
                self._gauges.state(ro.config, ro.state)
            return self.weights()

    async def _adopt(self, r: RolloutConfig) -> Rollout:
        """Resume ``r`` from the store, or start it (nothing stored, or other endpoints)."""
        now = self._clock()
        data = await self._store.get_state(r.name)
        state: RolloutState | None = None
        if data is not None:
            try:
                state = RolloutState.from_dict(data)
            except (KeyError, TypeError, ValueError) as exc:
                raise StoreError(f"state of rollout {r.name!r} is unreadable: {exc}") from exc
            if state.fingerprint != fingerprint(r):
                log.info("rollout %s: endpoints changed; starting a new rollout", r.name)
                state = None
        ro = await (self._begin(r, now) if state is None else self._resume(r, state))
        self._gauges.state(ro.config, ro.state)
        return ro

    async def _begin(self, r: RolloutConfig, now: float) -> Rollout:
        await check_identity(self._store)  # no fresh start over a store that lost its data
        fence = self._fence()
        async with self._history.exclusive():  # no old point lands after the reset
            await self._store.reset(r.name, fence=fence)
            self._history.forget(r.name)  # the store's history went with the reset
        if self._inputs is not None:  # stopped processes' input counts go; live ones rewrite
            await self._inputs.drop(r.name)
        self._recorder.remove(r.name)  # samples of the old arms must not leak in
        ro = Rollout.fresh(r, RolloutState.start(r, now), None, [], self._recorder.accuracy)
        entry = ro.entry(Decision(Action.START, "rollout started"), now)
        ro.decisions.append(entry)
        await self._store.put_state(r.name, ro.state.to_dict(), fence=fence)
        await self._store.append_decision(r.name, entry, fence=fence)
        self._record_history(ro, now, Decision(Action.START, "rollout started"))
        log.info("rollout %s: started at step 1/%d", r.name, len(r.steps))
        # Once per rollout: a restart that resumes it (_resume) sends nothing.
        if self._notifier is not None and r.webhooks:
            self._notifier.fire(r.name, _EVENTS[Action.START], r.webhooks, entry)
        return ro

    async def _resume(self, r: RolloutConfig, state: RolloutState) -> Rollout:
        totals = await self._store.get_samples(r.name)
        stored = await self._store.decisions(r.name, DECISIONS_SHOWN)
        history = [upgrade_entry(e, len(r.steps)) for e in stored]
        now = self._clock()
        state = resume_failures(state, now)  # the time canary was down is not failing time
        ro = Rollout.fresh(r, state, totals, history, self._recorder.accuracy)
        log.info(
            "rollout %s: resumed %s at step %d/%d with %d/%d samples",
            r.name,
            state.phase.value,
            min(state.step, len(r.steps) - 1) + 1,
            len(r.steps),
            ro.totals.production.observed,
            ro.totals.candidate.observed,
        )
        return ro

    # -- read side ------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._rollouts)

    def view(self, name: str) -> RolloutView:
        """Rollout ``name`` as it is now; raise UnknownRollout."""
        ro = self._rollouts.get(name)
        if ro is None:
            raise UnknownRollout(name)
        view = ro.view(self._clock(), self.store_ok)
        gate = self._gates.pending(name)
        return replace(view, gate=gate) if gate is not None else view

    def _record_history(self, ro: Rollout, now: float, decision: Decision | None = None) -> None:
        """Queue the history point of ``ro`` now (a decision point with ``decision``)."""
        samples = (ro.totals.production.observed, ro.totals.candidate.observed)
        point = history_point(ro.config, ro.state, ro.analysis, now, samples, decision)
        self._history.record(ro.config.name, point, keep=decision is not None)

    async def history(self, name: str, since: float | None = None) -> list[dict[str, Any]]:
        """The metric history of rollout ``name`` (points after Unix time ``since``), oldest
        first, as the store keeps it (the same on every process) plus the points this process
        has not written yet; raise UnknownRollout, StoreError or TimeoutError."""
        if name not in self._rollouts:
            raise UnknownRollout(name)
        points = await asyncio.wait_for(self._store.history(name, since), self._guard.timeout)
        tail = points[-50:]
        for p in self._history.pending(name):
            if (since is None or p["t"] > since) and p not in tail:
                points.append(p)
        return points

    def views(self) -> list[RolloutView]:
        """Every configured rollout, in config order."""
        return [self.view(name) for name in self._rollouts]

    def state(self, name: str) -> RolloutState:
        return self._rollouts[name].state

    def totals(self, name: str) -> RolloutAccumulator:
        return self._rollouts[name].totals


def _lost_leadership(exc: FencedError) -> CommandRejected:
    """An operator's command that a lost lease stopped half way: nothing was applied."""
    return CommandRejected(
        f"this canary process lost the leadership of the rollouts ({exc}); "
        "send the command to the leader"
    )


def _keep_unflushed(old: Rollout | None, new: Rollout) -> None:
    """A rollout this process adopts from the store when it takes the lease keeps what this
    process recorded and has not written yet (after a store outage, the whole outage's
    requests): the stored totals do not hold them. Not when the adopted rollout is another
    one (new endpoints, or retried): those samples are of the old one."""
    if old is None or old is new:
        return
    if (old.state.fingerprint, old.state.attempt) != (new.state.fingerprint, new.state.attempt):
        return
    if new.pending.empty and new.batch is None:
        new.pending, new.batch, new.waiting = old.pending, old.batch, old.waiting
    new.own, new.share_at, new.share = old.own, old.share_at, old.share


def _retime(state: RolloutState, old: RolloutConfig, new: RolloutConfig) -> RolloutState:
    """Keep the deadline consistent when a reload changes max_duration."""
    delta = new.analysis.max_duration - old.analysis.max_duration
    return state.with_(deadline=state.deadline + delta) if delta else state


__all__ = [
    "FLUSH_INTERVAL",
    "STORE_TIMEOUT",
    "Controller",
    "Notifier",
    "WeightSink",
]
