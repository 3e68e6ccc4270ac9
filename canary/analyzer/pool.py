"""The analyzer of ``canary run``: the statistics in a worker process, never on the proxy's loop.

Analyses go to the worker over a socket (:mod:`canary.analyzer.channel`) once :meth:`start`
opened it, else as jobs of the executor. A worker that dies or fails is dropped: that
analysis, and every one until the worker is back, runs in the event loop instead, and the
worker is started again in the background with back-off (1 s doubling to at most
``WORKER_RETRY_MAX``), logged and counted in ``canary_analysis_worker_restarts_total`` /
``canary_analysis_worker_up``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

from canary.analyzer import worker
from canary.analyzer.base import AnalysisJob, analyze_here
from canary.analyzer.channel import AnalysisChannel, AnalysisFailed, ChannelBroken
from canary.config import RolloutConfig
from canary.decision import Analysis
from canary.observe.inputs import InputHealth

if TYPE_CHECKING:  # not imported at run time: the worker process imports this package too
    from canary.metrics import Metrics

log = logging.getLogger("canary.controller")  # the controller's log, as before the split

WORKER_RETRY_FIRST = 1.0  # seconds before the first restart of a failed analysis worker
WORKER_RETRY_MAX = 60.0  # longest wait between restarts (the back-off doubles up to this)
WORKER_START_TIMEOUT = 30.0  # a restarted worker must answer its warm-up job within this

# What a worker is sent besides the inputs: the pickled config, the failing clock, the health.
_Packed = tuple[bytes, bytes, float, int, InputHealth | None]


class WorkerAnalyzer:
    """Analyses in the worker process of ``executor`` (a process pool in ``canary run``)."""

    def __init__(
        self,
        executor: Executor,
        metrics: Metrics,
        *,
        executor_factory: Callable[[], Executor] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``executor_factory`` makes a new executor when the worker dies (default: a process
        pool like ``executor`` when it is one; else ``executor`` itself is tried again)."""
        self._executor: Executor | None = executor
        if executor_factory is None and isinstance(executor, ProcessPoolExecutor):
            executor_factory = _pool_like(executor)
        self._executor_factory = executor_factory
        self._base_executor = executor  # reused for restarts when there is no factory
        self._own_executors: list[Executor] = []  # made by the factory: shut down in close()
        self._metrics = metrics
        self._monotonic = monotonic
        self._channel: AnalysisChannel | None = None  # from start() to close()
        self._warming: asyncio.Future[None] | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._failures = 0  # consecutive failures of the worker
        self._retry_at: float | None = None  # monotonic time of the next restart
        # The pickled config and the signal keys its analysis reads, by rollout, once per
        # config object (a reload makes a new one).
        self._shipped: dict[str, tuple[RolloutConfig, bytes, frozenset[str]]] = {}
        metrics.analysis_worker_up.set(1)

    def warm(self) -> None:
        """Start the worker process now: the pool starts it at its first job, which takes tens
        of milliseconds on the event loop, and the worker then spends most of a CPU-second
        importing the statistics; better before the proxy serves than at the first analysis."""
        if self._executor is None or self._warming is not None:
            return
        try:
            self._warming = asyncio.get_running_loop().run_in_executor(self._executor, worker.warm)
            self._warming.add_done_callback(_ignore_failure)  # the first analysis says it
        except Exception:  # e.g. a pool already shut down: the first analysis falls back
            log.exception("could not start the analysis process")

    async def start(self) -> None:
        """Serve analyses over a socket to the pool's worker (see :mod:`canary.analyzer.channel`).

        Not in :meth:`warm`: the job holds the worker until :meth:`close` closes the channel,
        and only a started controller is sure to be stopped before the pool is shut down (which
        waits for its jobs).
        """
        if self._executor is None or self._channel is not None:
            return
        try:
            self._channel = await AnalysisChannel.open(self._executor)
        except Exception as exc:  # e.g. no file descriptor left: jobs go through the executor
            log.error("could not open the analysis channel (%s); using executor jobs", exc)

    async def close(self) -> None:
        """Stop a restart under way, close the channel and shut the pools made here down (the
        executor given to the constructor belongs to the caller)."""
        task, self._restart_task = self._restart_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        for own in self._own_executors:  # pools made for a restarted worker
            await asyncio.to_thread(own.shutdown, True, cancel_futures=True)
        self._own_executors.clear()

    async def check(self) -> None:
        """Say now that the worker died between analyses; start it again when that is due."""
        channel = self._channel
        if channel is not None and not channel.closed and not channel.alive:
            await self._retire()
            self._failed(f"the analysis process died ({channel.ended()})")
        retry_at = self._retry_at
        if retry_at is None or self._monotonic() < retry_at or self._restarting():
            return
        if self._executor_factory is None and self._base_executor is None:
            return
        self._restart_task = asyncio.get_running_loop().create_task(
            self._restart(), name="analysis-worker-restart"
        )

    async def analyze(self, job: AnalysisJob) -> Analysis:
        """In the worker (through the channel once started, else as an executor job); here
        when there is none or it fails."""
        if self._channel is not None or self._executor is not None:
            packed = self._pack(job)  # before any await: a snapshot of the totals
            if self._channel is not None:
                analysis = await self._in_channel(packed)
            else:
                analysis = await self._in_executor(packed)
            if analysis is not None:
                return analysis
        return analyze_here(job)

    def _pack(self, job: AnalysisJob) -> _Packed:
        cfg = job.config
        shipped = self._shipped.get(cfg.name)
        if shipped is None or shipped[0] is not cfg:
            shipped = self._shipped[cfg.name] = (
                cfg,
                worker.pack_config(cfg),
                worker.analysed_keys(cfg),
            )
        inputs = worker.pack_inputs(job.totals, shipped[2])
        return (shipped[1], inputs, job.failing_for, job.failing_requests, job.input_health)

    async def _in_channel(self, packed: _Packed) -> Analysis | None:
        assert self._channel is not None
        try:
            return await self._channel.analyze(*packed)
        except ChannelBroken as exc:
            reason = f"the analysis process died ({exc})"
        except AnalysisFailed as exc:
            reason = f"the analysis process failed:\n{exc}"
        await self._retire()
        self._failed(reason)
        return None

    async def _in_executor(self, packed: _Packed) -> Analysis | None:
        assert self._executor is not None
        config, inputs, failing_for, failing_requests, input_health = packed
        run = functools.partial(
            worker.analyze_packed,
            config,
            inputs,
            failing_for=failing_for,
            failing_requests=failing_requests,
            input_health=input_health,
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
        await self._retire()
        self._failed(reason)
        return None

    # -- failures and restarts --------------------------------------------------------------

    async def _retire(self) -> None:
        """Drop the channel and the executor after a failure (pools made here are shut down;
        the one given to the constructor belongs to the caller)."""
        channel, self._channel = self._channel, None
        executor, self._executor = self._executor, None
        if channel is not None:
            await channel.close(timeout=1.0)
        if executor is not None and executor in self._own_executors:
            self._own_executors.remove(executor)
            executor.shutdown(wait=False, cancel_futures=True)

    def _failed(self, reason: str) -> None:
        self._failures += 1
        delay = min(WORKER_RETRY_MAX, WORKER_RETRY_FIRST * 2 ** (self._failures - 1))
        self._retry_at = self._monotonic() + delay
        self._metrics.analysis_worker_up.set(0)
        log.error(
            "%s; analysing in the event loop, starting the worker again in %gs "
            "(failure %d in a row)",
            reason,
            delay,
            self._failures,
        )

    def _restarting(self) -> bool:
        return self._restart_task is not None and not self._restart_task.done()

    async def _restart(self) -> None:
        """Start the worker again (in the background: analyses go on here meanwhile)."""
        attempt = self._failures
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
            self._failed(f"starting the analysis worker again failed ({type(exc).__name__}: {exc})")
            return
        self._executor = executor
        await self.start()
        self._failures = 0
        self._retry_at = None
        self._metrics.analysis_worker_restarts.labels("ok").inc()
        self._metrics.analysis_worker_up.set(1)
        log.warning(
            "analysis worker started again after %d failure(s); analyses leave the event loop",
            attempt,
        )


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


__all__ = [
    "WORKER_RETRY_FIRST",
    "WORKER_RETRY_MAX",
    "WORKER_START_TIMEOUT",
    "WorkerAnalyzer",
]
