"""The rollout controller: snapshot -> analyze -> decide -> apply, on a timer.

A thin async loop around the pure parts (:mod:`canary.decision`). Every ``flush_interval`` it
takes the proxy's accumulator deltas (:meth:`Recorder.swap`), adds them to each rollout's
totals and to the store; every ``analysis.interval`` of a rollout it runs the tests and the
policy, and carries out the decision: an atomic weight swap through ``apply_weights`` (the
proxy reads it on its next request), the new state and a decision-log entry in the store,
webhooks (fire and forget) and gauges. Operator commands (:meth:`command`) go through the same
path. The controller never imports the proxy: the runtime wires the two together.

When the store fails, the proxy keeps its weights, the controller holds every rollout (no
decisions on data it could not persist) and retries on the next flush; ``/readyz`` and
``canary_store_up`` say so. "Fails" includes a store call that has not finished within
``store_timeout`` (a hung disk) and a state file deleted or replaced under the running
process (a watchdog task asks the store's ``health()``; a deleted file is opened again and
everything the controller holds is written back to it).

A dead analysis worker falls back to the event loop and is started again with back-off
(1 s doubling to at most ``WORKER_RETRY_MAX``), logged and counted in
``canary_analysis_worker_restarts_total`` / ``canary_analysis_worker_up``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from canary.analyzer import worker
from canary.analyzer.channel import AnalysisChannel, AnalysisFailed, ChannelBroken
from canary.config import Config, RolloutConfig, WebhookConfig
from canary.decision import (
    Action,
    Analysis,
    CommandRejected,
    Decision,
    Phase,
    RolloutState,
    analyze,
    command,
    decide,
    fingerprint,
    progress,
    transition,
)
from canary.errors import StoreError, UnknownRollout
from canary.metrics import Metrics
from canary.observe import Recorder, RolloutAccumulator, Weights
from canary.stats import MetricResult, Verdict
from canary.store import FileBackedStore, Store

log = logging.getLogger("canary.controller")

FLUSH_INTERVAL = 0.25  # seconds of samples a crash can lose (DESIGN.md: "~250 ms")
STORE_TIMEOUT = 5.0  # a store call running longer than this marks the store as down
WORKER_RETRY_FIRST = 1.0  # seconds before the first restart of a failed analysis worker
WORKER_RETRY_MAX = 60.0  # longest wait between restarts (the back-off doubles up to this)
WORKER_START_TIMEOUT = 30.0  # a restarted worker must answer its warm-up job within this
DECISIONS_SHOWN = 100  # decision-log entries kept in memory for the admin API
_VERDICT_VALUE = {Verdict.OK: 1, Verdict.UNKNOWN: 0, Verdict.WORSE: -1}
_EVENTS = {
    Action.ADVANCE: "advance",
    Action.PROMOTE: "promote",
    Action.ROLLBACK: "rollback",
    Action.PAUSE: "pause",
    Action.RESUME: "resume",
    Action.HOLD: "hold",
    Action.START: "start",
}


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


@dataclass
class _Rollout:
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
    last_obs: int = 0
    last_err: int = 0
    last_eval_wall: float = 0.0
    failing_since: float | None = None
    failing_requests: int = 0
    version: int = 0  # counts the deltas merged into totals
    analysed: tuple[int, RolloutConfig] | None = None  # (version, config) of ``analysis``
    shipped: tuple[RolloutConfig, bytes, frozenset[str]] | None = None  # see shipping()

    def shipping(self) -> tuple[bytes, frozenset[str]]:
        """The pickled config and the signal keys its analysis reads, once per config."""
        cfg = self.config
        if self.shipped is None or self.shipped[0] is not cfg:
            self.shipped = (cfg, worker.pack_config(cfg), worker.analysed_keys(cfg))
        return self.shipped[1], self.shipped[2]


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
        executor: Executor | None = None,
        input_drift: Callable[[str], Sequence[str]] | None = None,
        executor_factory: Callable[[], Executor] | None = None,
        store_timeout: float | None = None,
    ) -> None:
        """``executor`` runs the statistics off the event loop (a process pool in ``canary
        run``: the tests take milliseconds that the proxy's requests would otherwise wait);
        None runs them inline. ``input_drift(rollout)`` names the request fields whose input
        health flags drift (the runtime reads the proxy's monitors; the policy holds on them
        with ``inputs.on_drift: hold``). ``executor_factory`` makes a new executor when the
        analysis worker dies (default: a process pool like ``executor`` when it is one).
        ``store_timeout``: a store call running longer marks the store as down (default
        :data:`STORE_TIMEOUT`)."""
        self.config = config
        self._executor = executor
        if executor_factory is None and isinstance(executor, ProcessPoolExecutor):
            executor_factory = _pool_like(executor)
        self._executor_factory = executor_factory
        self._own_executors: list[Executor] = []  # made by the factory: shut down in stop()
        self._base_executor = executor  # reused for restarts when there is no factory
        self._restart_task: asyncio.Task[None] | None = None
        self._worker_failures = 0  # consecutive failures of the analysis worker
        self._worker_retry_at: float | None = None  # monotonic time of the next restart
        self._store_timeout = STORE_TIMEOUT if store_timeout is None else store_timeout
        self._save_lock = asyncio.Lock()  # one writer of a rollout's state and decisions
        self._watch_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._health_probe: asyncio.Future[str | None] | None = None
        self._reopening = False  # a deleted state file is being opened again
        self._input_drift = input_drift
        self._store = store
        self._recorder = recorder
        self._metrics = metrics
        self._apply_weights = apply_weights
        self._notifier = notifier
        self._clock = clock
        self._monotonic = monotonic
        self.flush_interval = flush_interval
        self._rollouts: dict[str, _Rollout] = {}
        self._lock = asyncio.Lock()  # control path only: evaluation vs operator commands
        self._flush_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._eval_task: asyncio.Task[None] | None = None
        self._warming: asyncio.Future[None] | None = None
        self._channel: AnalysisChannel | None = None  # from start() to stop()
        # Gauge children by (rollout, result name): ``labels()`` costs a lock and a lookup.
        self._gauges: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._op_error = ""  # the last store operation failed with this ("" = it worked)
        self._health_issue = ""  # what the store's health() said ("" = nothing wrong)
        self._store_was_ok = True
        metrics.store_up.set(1)
        metrics.analysis_worker_up.set(1 if executor is not None else 0)

    @property
    def store_ok(self) -> bool:
        """The store works: the last operation succeeded and its health check is clean."""
        return not self._op_error and not self._health_issue

    @property
    def store_error(self) -> str:
        """Why the store is considered down ("" when it is not)."""
        return self._health_issue or self._op_error

    # -- lifecycle ------------------------------------------------------------------------

    async def load(self) -> dict[str, Weights]:
        """Restore (or start) every configured rollout; return the weights to serve.

        Also starts the analysis process: the pool starts it at its first job, which takes tens
        of milliseconds on the event loop, and the worker then spends most of a CPU-second
        importing the statistics; better before the proxy serves than at the first analysis.
        """
        for r in self.config.rollouts:
            self._rollouts[r.name] = await self._adopt(r)
        if self._executor is not None and self._warming is None:
            try:
                self._warming = asyncio.get_running_loop().run_in_executor(
                    self._executor, worker.warm
                )
                self._warming.add_done_callback(_ignore_failure)  # the first analysis says it
            except Exception:  # e.g. a pool already shut down: the first analysis falls back
                log.exception("could not start the analysis process")
        return self.weights()

    def weights(self) -> dict[str, Weights]:
        return {n: ro.state.weights(ro.config) for n, ro in self._rollouts.items()}

    async def start(self) -> None:
        if self._task is None:
            await self._open_channel()
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run(), name="controller")
            if self._watch_task is None and isinstance(self._store, FileBackedStore):
                self._watch_task = loop.create_task(self._watch_store(), name="store-watch")

    async def _open_channel(self) -> None:
        """Serve analyses over a socket to the pool's worker (see :mod:`canary.analyzer.channel`).

        Opened here, not in :meth:`load`: the job holds the worker until :meth:`stop` closes
        the channel, and only a started controller is sure to be stopped before the pool is
        shut down (which waits for its jobs).
        """
        if self._executor is None or self._channel is not None:
            return
        try:
            self._channel = await AnalysisChannel.open(self._executor)
        except Exception as exc:  # e.g. no file descriptor left: jobs go through the executor
            log.error("could not open the analysis channel (%s); using executor jobs", exc)

    async def stop(self) -> None:
        """Stop the loop and write the last samples (a clean stop loses nothing)."""
        for task in (self._task, self._eval_task, self._watch_task, self._restart_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._eval_task = self._watch_task = self._restart_task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        for own in self._own_executors:  # pools made for a restarted worker
            await asyncio.to_thread(own.shutdown, True, cancel_futures=True)
        self._own_executors.clear()
        await self.flush()

    async def _run(self) -> None:
        while True:
            started = self._monotonic()
            try:
                await self.flush()
                self._start_evaluation()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the controller for good
                log.exception("controller iteration failed")
            elapsed = self._monotonic() - started
            await asyncio.sleep(max(0.0, self.flush_interval - elapsed))

    # -- samples --------------------------------------------------------------------------

    async def flush(self) -> None:
        """Move the proxy's deltas into the totals and the store; retry unsaved writes.

        The merges into the totals and the store's write are separate turns of the event loop
        (each a fraction of a millisecond that requests arriving meanwhile wait for); a lock
        keeps a second flush from writing the same pending samples meanwhile.
        """
        async with self._flush_lock:
            self._merge_deltas()
            for name, ro in list(self._rollouts.items()):
                try:
                    await self._save_decisions(ro)
                    if not ro.pending.empty:
                        await asyncio.sleep(0)
                        if self._rollouts.get(name) is not ro:
                            continue  # restarted by a reload meanwhile: old arms' samples
                        await self._store.add_samples(name, ro.pending)
                        ro.pending = RolloutAccumulator(ro.totals.accuracy)
                except StoreError as exc:
                    self._store_failed("flush", exc)
                    return
            self._store_recovered()

    def _merge_deltas(self) -> None:
        for name, delta in self._recorder.swap().items():
            ro = self._rollouts.get(name)
            if ro is None or delta.empty:
                continue
            ro.totals.merge(delta)
            ro.version += 1
            if ro.pending.empty:
                ro.pending = delta  # the recorder gave it away: no copy needed
            else:  # the store failed last time: these wait too
                ro.pending.merge(delta)

    def _store_failed(self, operation: str, exc: StoreError) -> None:
        self._metrics.store_errors.labels(operation).inc()
        self._op_error = str(exc) or type(exc).__name__
        self._store_health_changed(operation)

    def _store_recovered(self) -> None:
        self._op_error = ""
        self._store_health_changed()

    def _store_health_changed(self, operation: str = "") -> None:
        """Log a change of :attr:`store_ok` once, and set ``canary_store_up``."""
        ok = self.store_ok
        if ok != self._store_was_ok:
            if ok:
                log.info("state store is back; decisions resume")
            else:
                what = f" ({operation})" if operation else ""
                log.error("state store failed%s: %s; holding every rollout", what, self.store_error)
        self._store_was_ok = ok
        self._metrics.store_up.set(1 if ok else 0)

    async def _watch_store(self) -> None:
        """Ask the store's ``health()`` every flush interval (in a thread: ``stat`` of a file
        on a hung disk may block), so that a hang or a deleted file shows in ``/readyz`` and
        ``canary_store_up`` even while no write returns to say so."""
        every = max(self.flush_interval, 0.1)
        while True:
            try:
                await self.check_store()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end the watch for good
                log.exception("state store health check failed")
            await asyncio.sleep(every)

    async def check_store(self) -> None:
        """One health check of the store (the watchdog's step; tests call it directly)."""
        store = self._store
        if not isinstance(store, FileBackedStore):
            return
        probe = self._health_probe
        if probe is None or probe.done():
            probe = self._health_probe = asyncio.ensure_future(
                asyncio.to_thread(store.health, self._store_timeout)
            )
        try:
            issue = await asyncio.wait_for(asyncio.shield(probe), self._store_timeout)
        except TimeoutError:
            issue = f"the state store's file does not answer within {self._store_timeout:g}s"
        if issue and store.deleted():
            self._health_issue = issue
            self._store_health_changed("health")
            issue = await self._reopen_deleted(store, issue)
        self._health_issue = issue or ""
        self._store_health_changed("health")

    async def _reopen_deleted(self, store: FileBackedStore, issue: str) -> str | None:
        """Open a deleted state file again and write back everything held in memory; return
        what is still wrong (None: the new file holds it all)."""
        if not self._reopening:  # once, not at every retry
            log.error("%s: opening it again and writing back every rollout's state", issue)
        self._reopening = True
        async with self._flush_lock, self._save_lock:
            try:
                await asyncio.wait_for(store.reopen(), self._store_timeout)
            except (StoreError, TimeoutError) as exc:
                self._metrics.store_errors.labels("reopen").inc()
                return f"{issue}; opening it again failed: {exc}"
            for ro in self._rollouts.values():
                ro.state_dirty = True
                ro.unsaved = [e for e in ro.decisions if e not in ro.unsaved] + ro.unsaved
                ro.pending = ro.totals.snapshot()  # the totals include the pending samples
        try:
            await asyncio.wait_for(self.flush(), self._store_timeout)
        except TimeoutError:
            return f"{issue}; writing the state back to a new file timed out"
        if self._op_error:
            return f"{issue}; writing the state back failed: {self._op_error}"
        log.info("state written back to a new file %s", getattr(store, "path", ""))
        self._reopening = False
        return None

    # -- decisions ------------------------------------------------------------------------

    def _start_evaluation(self) -> None:
        """Run the due analyses in their own task, unless the last round is still running.

        An analysis takes as long as the worker process needs (longer when the proxy keeps
        the CPU busy); flushes and operator commands go on meanwhile.
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
        channel = self._channel
        if channel is not None and not channel.closed and not channel.alive:
            await self._retire_worker()  # it died between analyses: say so now
            self._worker_failed(f"the analysis process died ({channel.ended()})")
        self._maybe_restart_worker()
        mono = self._monotonic()
        for ro in list(self._rollouts.values()):
            if not force and mono < ro.next_eval:
                continue
            ro.next_eval = mono + ro.config.analysis.interval
            await self._evaluate(ro)

    async def _evaluate(self, ro: _Rollout) -> None:
        cfg, name = ro.config, ro.config.name
        now = self._clock()
        t0 = time.perf_counter()
        self._track_failures(ro, now)
        failing_for = 0.0 if ro.failing_since is None else now - ro.failing_since
        fresh = True
        if ro.analysis is not None and ro.analysed == (ro.version, cfg):
            # No sample since the last analysis of this config: the tests would say the same
            # (they are functions of the totals); only the hard-failure clock moves on.
            analysis = replace(
                ro.analysis, failing_for=failing_for, failing_requests=ro.failing_requests
            )
            version, fresh = ro.version, False
        else:
            version, analysis = await self._run_analysis(ro, failing_for)
        async with self._lock:  # the state may not change between decide and apply
            if self._rollouts.get(name) is not ro or ro.config is not cfg:
                return  # reloaded meanwhile: the next interval analyses the new config
            ro.analysed = (version, cfg)
            await self._decide(ro, analysis, t0, export=fresh)

    async def _decide(
        self, ro: _Rollout, analysis: Analysis, t0: float, *, export: bool = True
    ) -> None:
        cfg, name = ro.config, ro.config.name
        now = self._clock()
        ro.analysis = analysis
        if export:
            self._export_analysis(name, analysis)
            await asyncio.sleep(0)  # the gauges and the decision: two short turns of the loop
        if not self.store_ok and not ro.state.phase.terminal:
            ro.status = f"holding: the state store is unavailable ({self.store_error})"
            return
        drift = self._input_drift(name) if self._input_drift is not None else ()
        decision = decide(cfg, ro.state, analysis, now, input_drift=drift)
        self._metrics.analysis_seconds.labels(name).set(time.perf_counter() - t0)
        new = transition(cfg, ro.state, decision, analysis.candidate_observed, now)
        ro.status = decision.reason
        if new is not ro.state:
            await self._apply(ro, decision, new, now)

    async def _run_analysis(self, ro: _Rollout, failing_for: float) -> tuple[int, Analysis]:
        """Analyse ``ro``'s totals as they are now; return their version and the analysis.

        In the worker process when there is one (through the channel once started, else as an
        executor job), else here; a worker that failed is started again in the background,
        with back-off (:meth:`_restart_worker`), and analyses run here meanwhile.
        """
        if self._channel is not None or self._executor is not None:
            config, keys = ro.shipping()
            version, inputs = ro.version, worker.pack_inputs(ro.totals, keys)  # bytes: a snapshot
            job = (config, inputs, failing_for, ro.failing_requests)
            analysis = await (self._in_channel(*job) if self._channel else self._in_executor(*job))
            if analysis is not None:
                return version, analysis
        # Synchronous: no flush can change the totals meanwhile, so no copy is needed.
        analysis = analyze(
            ro.config,
            ro.totals,
            failing_for=failing_for,
            failing_requests=ro.failing_requests,
        )
        return ro.version, analysis

    async def _in_channel(
        self, config: bytes, inputs: bytes, failing_for: float, failing_requests: int
    ) -> Analysis | None:
        assert self._channel is not None
        try:
            return await self._channel.analyze(config, inputs, failing_for, failing_requests)
        except ChannelBroken as exc:
            reason = f"the analysis process died ({exc})"
        except AnalysisFailed as exc:
            reason = f"the analysis process failed:\n{exc}"
        await self._retire_worker()
        self._worker_failed(reason)
        return None

    async def _in_executor(
        self, config: bytes, inputs: bytes, failing_for: float, failing_requests: int
    ) -> Analysis | None:
        assert self._executor is not None
        run = functools.partial(
            worker.analyze_packed,
            config,
            inputs,
            failing_for=failing_for,
            failing_requests=failing_requests,
        )
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, run)
        except asyncio.CancelledError:
            raise
        except BrokenProcessPool as exc:
            reason = f"the analysis process died ({exc})"
        except Exception as exc:
            # e.g. no file descriptor left to start the process, or a program embedding
            # canary without an `if __name__ == "__main__"` guard, which a forkserver worker
            # cannot import: analyse here rather than never.
            log.debug("analysis process failure", exc_info=True)
            reason = f"the analysis process failed ({type(exc).__name__}: {exc})"
        await self._retire_worker()
        self._worker_failed(reason)
        return None

    # -- the analysis worker's failures and restarts ---------------------------------------

    async def _retire_worker(self) -> None:
        """Drop the channel and the executor after a failure (pools made here are shut down;
        the one given to the constructor belongs to the caller)."""
        channel, self._channel = self._channel, None
        executor, self._executor = self._executor, None
        if channel is not None:
            await channel.close(timeout=1.0)
        if executor is not None and executor in self._own_executors:
            self._own_executors.remove(executor)
            executor.shutdown(wait=False, cancel_futures=True)

    def _worker_failed(self, reason: str) -> None:
        self._worker_failures += 1
        delay = min(WORKER_RETRY_MAX, WORKER_RETRY_FIRST * 2 ** (self._worker_failures - 1))
        self._worker_retry_at = self._monotonic() + delay
        self._metrics.analysis_worker_up.set(0)
        log.error(
            "%s; analysing in the event loop, starting the worker again in %gs "
            "(failure %d in a row)",
            reason,
            delay,
            self._worker_failures,
        )

    def _maybe_restart_worker(self) -> None:
        retry_at = self._worker_retry_at
        if retry_at is None or self._monotonic() < retry_at or self._restarting():
            return
        if self._executor_factory is None and self._base_executor is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._restart_worker(), name="analysis-worker-restart"
        )
        self._restart_task = task

    def _restarting(self) -> bool:
        return self._restart_task is not None and not self._restart_task.done()

    async def _restart_worker(self) -> None:
        """Start the analysis worker again (in the background: analyses go on meanwhile)."""
        attempt = self._worker_failures
        executor: Executor | None = None
        try:
            if self._executor_factory is not None:
                executor = self._executor_factory()
                self._own_executors.append(executor)
            else:
                executor = self._base_executor
            assert executor is not None
            job = asyncio.get_running_loop().run_in_executor(executor, worker.warm)
            await asyncio.wait_for(job, WORKER_START_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._metrics.analysis_worker_restarts.labels("failed").inc()
            if executor is not None and executor in self._own_executors:
                self._own_executors.remove(executor)
                executor.shutdown(wait=False, cancel_futures=True)
            self._worker_failed(
                f"starting the analysis worker again failed ({type(exc).__name__}: {exc})"
            )
            return
        self._executor = executor
        await self._open_channel()
        self._worker_failures = 0
        self._worker_retry_at = None
        self._metrics.analysis_worker_restarts.labels("ok").inc()
        self._metrics.analysis_worker_up.set(1)
        log.warning(
            "analysis worker started again after %d failure(s); analyses leave the event loop",
            attempt,
        )

    def _track_failures(self, ro: _Rollout, now: float) -> None:
        cand = ro.totals.candidate
        d_obs, d_err = cand.observed - ro.last_obs, cand.errors - ro.last_err
        if d_obs > 0:
            if d_err >= d_obs:
                if ro.failing_since is None:
                    ro.failing_since = ro.last_eval_wall or now
                ro.failing_requests += d_obs
            else:
                ro.failing_since = None
                ro.failing_requests = 0
        ro.last_obs, ro.last_err, ro.last_eval_wall = cand.observed, cand.errors, now

    async def command(self, name: str, action: str, reason: str | None = None) -> dict[str, Any]:
        """Carry out an operator's pause/resume/promote/rollback; raise CommandRejected."""
        ro = self._rollouts.get(name)
        if ro is None:
            raise UnknownRollout(name)
        async with self._lock:
            decision = command(ro.state, action, reason)
            now = self._clock()
            observed = ro.totals.candidate.observed
            new = transition(ro.config, ro.state, decision, observed, now)
            ro.status = decision.reason
            await self._apply(ro, decision, new, now)
        return {
            "name": name,
            "phase": ro.state.phase.value,
            "action": decision.action.value,
            "reason": decision.reason,
        }

    async def _apply(self, ro: _Rollout, decision: Decision, new: RolloutState, now: float) -> None:
        cfg, name = ro.config, ro.config.name
        ro.state = new
        weights = new.weights(cfg)
        candidate, shadow = weights
        self._apply_weights(name, weights)  # the data plane acts first
        entry = self._entry(ro, decision, now)
        ro.decisions.append(entry)
        self._metrics.decisions.labels(name, decision.action.value).inc()
        self._export_state(ro)
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
        # Bounded: on a hung disk the operator's call answers (and the write goes on; the
        # save lock keeps the next flush from writing the same entries twice).
        save = asyncio.ensure_future(self._save_decisions(ro))
        self._background.add(save)
        save.add_done_callback(self._saved)
        try:
            await asyncio.wait_for(asyncio.shield(save), self._store_timeout)
        except StoreError as exc:  # kept dirty: the next flush retries
            self._store_failed("apply", exc)
        except TimeoutError:
            self._store_failed(
                "apply",
                StoreError(f"writing a decision took longer than {self._store_timeout:g}s"),
            )
        event = _EVENTS.get(decision.action)
        if event is not None and self._notifier is not None and cfg.webhooks:
            self._notifier.fire(name, event, cfg.webhooks, entry)

    def _saved(self, task: asyncio.Future[None]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: _apply or the next flush reports store errors

    async def _save_decisions(self, ro: _Rollout) -> None:
        """Write the state and decision-log entries not yet in the store (StoreError: retry)."""
        name = ro.config.name
        async with self._save_lock:
            if ro.state_dirty:
                ro.state_dirty = False
                try:
                    await self._store.put_state(name, ro.state.to_dict())
                except BaseException:
                    ro.state_dirty = True
                    raise
            while ro.unsaved:
                await self._store.append_decision(name, ro.unsaved[0])
                ro.unsaved.pop(0)

    def _entry(self, ro: _Rollout, decision: Decision, now: float) -> dict[str, Any]:
        candidate, shadow = ro.state.weights(ro.config)
        entry: dict[str, Any] = {
            "at": now,
            "action": decision.action.value,
            "reason": decision.reason,
            "manual": decision.manual,
            "phase": ro.state.phase.value,
            **_step_fields(ro.state.step, len(ro.config.steps)),
            "weights": {"production": 100.0 - candidate, "candidate": candidate},
            "shadow": shadow,
            "samples": {
                "production": ro.totals.production.observed,
                "candidate": ro.totals.candidate.observed,
            },
        }
        if decision.evidence is not None:
            entry["evidence"] = decision.evidence.to_dict()
        return entry

    # -- configuration --------------------------------------------------------------------

    async def apply_config(self, config: Config) -> dict[str, Weights]:
        """Adopt a reloaded config; return every rollout's weights for the proxy.

        A rollout whose endpoints changed starts over (new samples, step 1); one whose
        thresholds, steps or webhooks changed keeps its state and samples.
        """
        async with self._lock:
            rollouts: dict[str, _Rollout] = {}
            for r in config.rollouts:
                old = self._rollouts.get(r.name)
                if old is not None and old.state.fingerprint == fingerprint(r):
                    old.state = _retime(old.state, old.config, r)
                    old.config = r
                    old.next_eval = 0.0
                    rollouts[r.name] = old
                else:
                    rollouts[r.name] = await self._adopt(r)
            for gone in set(self._rollouts) - set(rollouts):
                log.info("rollout %s: no longer configured; its state stays in the store", gone)
            self._rollouts = rollouts
            self.config = config
            for ro in rollouts.values():
                self._export_state(ro)
            return self.weights()

    async def _adopt(self, r: RolloutConfig) -> _Rollout:
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
        if state is None:
            await self._store.reset(r.name)
            self._recorder.remove(r.name)  # samples of the old arms must not leak in
            state = RolloutState.start(r, now)
            ro = _Rollout(
                r,
                state,
                RolloutAccumulator(self._recorder.accuracy),
                RolloutAccumulator(self._recorder.accuracy),
                deque(maxlen=DECISIONS_SHOWN),
            )
            entry = self._entry(ro, Decision(Action.START, "rollout started"), now)
            ro.decisions.append(entry)
            await self._store.put_state(r.name, state.to_dict())
            await self._store.append_decision(r.name, entry)
            log.info("rollout %s: started at step 1/%d", r.name, len(r.steps))
            # Once per rollout: a restart that resumes it (the branch below) sends nothing.
            if self._notifier is not None and r.webhooks:
                self._notifier.fire(r.name, _EVENTS[Action.START], r.webhooks, entry)
        else:
            totals = await self._store.get_samples(r.name)
            history = [
                _upgrade_entry(e, len(r.steps))
                for e in await self._store.decisions(r.name, DECISIONS_SHOWN)
            ]
            ro = _Rollout(
                r,
                state,
                totals or RolloutAccumulator(self._recorder.accuracy),
                RolloutAccumulator(self._recorder.accuracy),
                deque(history, maxlen=DECISIONS_SHOWN),
            )
            log.info(
                "rollout %s: resumed %s at step %d/%d with %d/%d samples",
                r.name,
                state.phase.value,
                min(state.step, len(r.steps) - 1) + 1,
                len(r.steps),
                ro.totals.production.observed,
                ro.totals.candidate.observed,
            )
        ro.last_obs, ro.last_err = ro.totals.candidate.observed, ro.totals.candidate.errors
        self._export_state(ro)
        return ro

    # -- read side ------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._rollouts)

    def summary(self, name: str) -> dict[str, Any]:
        ro = self._rollouts.get(name)
        if ro is None:
            raise UnknownRollout(name)
        cfg, state = ro.config, ro.state
        now = self._clock()
        candidate, shadow = state.weights(cfg)
        step_index = min(state.step, len(cfg.steps) - 1)
        step = cfg.steps[step_index]
        analysis = ro.analysis
        step_samples = max(0, ro.totals.candidate.observed - state.step_base)
        if analysis is not None and not state.phase.terminal:
            p = progress(cfg, state, analysis, now)
            step_samples = p.samples
        last = ro.decisions[-1] if ro.decisions else None
        return {
            "name": name,
            "phase": state.phase.value,
            **_step_fields(step_index, len(cfg.steps)),
            "step_kind": "shadow" if step.is_shadow else "weight",
            "weights": {"production": 100.0 - candidate, "candidate": candidate},
            "shadow": shadow,
            "samples": {
                "production": ro.totals.production.observed,
                "candidate": ro.totals.candidate.observed,
            },
            "step_samples": step_samples,
            "step_required": step.required_requests,
            "step_elapsed": max(0.0, now - state.step_started_at),
            "step_min_duration": step.required_duration,
            "elapsed": max(0.0, now - state.started_at),
            "deadline_in": state.deadline - now,
            "status": ro.status,
            "store_ok": self.store_ok,
            "last_decision": None
            if last is None
            else {"action": last["action"], "reason": last["reason"], "at": last["at"]},
        }

    def detail(self, name: str) -> dict[str, Any]:
        out = self.summary(name)
        ro = self._rollouts[name]
        a = ro.analysis
        out["metrics"] = [] if a is None else [_result_dict(r) for r in a.metrics]
        out["guards"] = [] if a is None else [_result_dict(a.srm)]
        out["net_value"] = None if a is None or a.net is None else _result_dict(a.net)
        out["decisions"] = list(ro.decisions)
        out["endpoints"] = {
            "production": list(ro.config.production.endpoints),
            "candidate": list(ro.config.candidate.endpoints),
        }
        return out

    def state(self, name: str) -> RolloutState:
        return self._rollouts[name].state

    def totals(self, name: str) -> RolloutAccumulator:
        return self._rollouts[name].totals

    # -- gauges ---------------------------------------------------------------------------

    def _export_state(self, ro: _Rollout) -> None:
        name = ro.config.name
        for phase in Phase:
            self._metrics.phase.labels(name, phase.value).set(1 if ro.state.phase is phase else 0)
        self._metrics.step.labels(name).set(min(ro.state.step, len(ro.config.steps) - 1) + 1)

    def _export_analysis(self, name: str, analysis: Analysis) -> None:
        for r in analysis.all_results():
            estimate, lower, upper, tolerance, verdict, n_prod, n_cand = self._result_gauges(
                name, r.name
            )
            estimate.set(r.estimate)
            lower.set(r.lower)
            upper.set(r.upper)
            tolerance.set(r.tolerance)
            verdict.set(_VERDICT_VALUE[r.verdict])
            n_prod.set(r.n_production)
            n_cand.set(r.n_candidate)

    def _result_gauges(self, name: str, result: str) -> tuple[Any, ...]:
        """The gauges of one result, looked up once (the label sets never change)."""
        key = (name, result)
        gauges = self._gauges.get(key)
        if gauges is None:
            m = self._metrics
            gauges = self._gauges[key] = (
                m.metric_estimate.labels(name, result),
                m.metric_lower.labels(name, result),
                m.metric_upper.labels(name, result),
                m.metric_tolerance.labels(name, result),
                m.metric_verdict.labels(name, result),
                m.metric_samples.labels(name, result, "production"),
                m.metric_samples.labels(name, result, "candidate"),
            )
        return gauges


def _step_fields(step: int, steps: int) -> dict[str, int]:
    """How users see a step: ``step`` 1-based of ``steps`` (as the CLI, the logs and
    ``canary_rollout_step`` show it), and ``step_index``, the 0-based index into ``steps:``."""
    index = max(0, min(step, steps - 1))
    return {"step": index + 1, "steps": steps, "step_index": index}


def _upgrade_entry(entry: dict[str, Any], steps: int) -> dict[str, Any]:
    """A decision-log entry as stored by a canary before ``step`` was 1-based (it has no
    ``step_index``), in today's form; newer entries unchanged."""
    if "step_index" in entry or not isinstance(entry.get("step"), int):
        return entry
    return {**entry, **_step_fields(entry["step"], steps)}


def _pool_like(pool: ProcessPoolExecutor) -> Callable[[], Executor]:
    """A factory of process pools made like ``pool`` (for restarting a dead worker)."""
    workers: int = getattr(pool, "_max_workers", 1)
    context = getattr(pool, "_mp_context", None)
    initializer = getattr(pool, "_initializer", None)
    initargs: tuple[Any, ...] = getattr(pool, "_initargs", ())

    def make() -> Executor:
        return ProcessPoolExecutor(
            workers, mp_context=context, initializer=initializer, initargs=initargs
        )

    return make


def _ignore_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: a failed warm-up is not an error worth a log line


def _retime(state: RolloutState, old: RolloutConfig, new: RolloutConfig) -> RolloutState:
    """Keep the deadline consistent when a reload changes max_duration."""
    delta = new.analysis.max_duration - old.analysis.max_duration
    return state.with_(deadline=state.deadline + delta) if delta else state


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _result_dict(r: MetricResult) -> dict[str, Any]:
    return {
        "name": r.name,
        "kind": r.kind.value,
        "verdict": r.verdict.value.upper(),
        "estimate": _num(r.estimate),
        "lower": _num(r.lower),
        "upper": _num(r.upper),
        "margin": r.margin,
        "relative": r.relative,
        "direction": r.direction.value,
        "tolerance": _num(r.tolerance),
        "n_production": r.n_production,
        "n_candidate": r.n_candidate,
        "alpha": r.alpha,
        "detail": r.detail,
        "explain": r.explain(),
    }


__all__ = ["CommandRejected", "Controller", "Notifier", "UnknownRollout", "WeightSink"]
