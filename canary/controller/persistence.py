"""The controller's side of the state store: whether it works (:class:`StoreGuard`) and
what is written to it when (:class:`StoreWriter`)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

from canary.controller.leadership import Leadership
from canary.controller.rollout import Rollout
from canary.errors import FencedError, StoreError
from canary.metrics import Metrics
from canary.observe import Recorder, RolloutAccumulator
from canary.store import FileBackedStore, Store

log = logging.getLogger("canary.controller")  # one logger for the whole controller package


# Opens a deleted state file again and writes everything back; returns what is still wrong.
Reopener = Callable[[FileBackedStore, str], Awaitable[str | None]]


class StoreGuard:
    """Whether the state store works, for ``/readyz``, ``canary_store_up`` and the decisions:
    the last operation succeeded (:meth:`failed`, :meth:`recovered`) and a file-backed
    store's ``health()`` is clean (:meth:`check`, every flush interval by :meth:`watch`)."""

    def __init__(self, store: Store, metrics: Metrics, timeout: float) -> None:
        self.store = store
        self.timeout = timeout  # a store call running longer marks the store as down
        self._metrics = metrics
        self._op_error = ""  # the last store operation failed with this ("" = it worked)
        self._health_issue = ""  # what the store's health() said ("" = nothing wrong)
        self._was_ok = True
        self._probe: asyncio.Future[str | None] | None = None
        metrics.store_up.set(1)

    @property
    def ok(self) -> bool:
        """The store works: the last operation succeeded and its health check is clean."""
        return not self._op_error and not self._health_issue

    @property
    def error(self) -> str:
        """Why the store is considered down ("" when it is not)."""
        return self._health_issue or self._op_error

    @property
    def operation_error(self) -> str:
        """How the last store operation failed ("" when it worked)."""
        return self._op_error

    def lost_data(self, exc: StoreError) -> None:
        """The store lost its data behind canary's back: down until canary restarts (a
        flush that works again does not make what was lost come back)."""
        self._metrics.store_errors.labels("identity").inc()
        self._health_issue = str(exc)
        self._changed("identity")

    def failed(self, operation: str, exc: StoreError) -> None:
        self._metrics.store_errors.labels(operation).inc()
        self._op_error = str(exc) or type(exc).__name__
        self._changed(operation)

    def recovered(self) -> None:
        self._op_error = ""
        self._changed()

    def _changed(self, operation: str = "") -> None:
        """Log a change of :attr:`ok` once, and set ``canary_store_up``."""
        ok = self.ok
        if ok != self._was_ok:
            if ok:
                log.info("state store is back; decisions resume")
            else:
                what = f" ({operation})" if operation else ""
                log.error("state store failed%s: %s; holding every rollout", what, self.error)
        self._was_ok = ok
        self._metrics.store_up.set(1 if ok else 0)

    async def watch(self, every: float, reopen: Reopener) -> None:
        """Ask the store's ``health()`` every ``every`` seconds (in a thread: ``stat`` of a
        file on a hung disk may block), so that a hang or a deleted file shows in ``/readyz``
        and ``canary_store_up`` even while no write returns to say so."""
        while True:
            try:
                await self.check(reopen)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end the watch for good
                log.exception("state store health check failed")
            await asyncio.sleep(every)

    async def check(self, reopen: Reopener) -> None:
        """One health check of a file-backed store; a deleted file goes to ``reopen``."""
        store = self.store
        if not isinstance(store, FileBackedStore):
            return
        probe = self._probe
        if probe is None or probe.done():
            probe = self._probe = asyncio.ensure_future(
                asyncio.to_thread(store.health, self.timeout)
            )
        try:
            issue = await asyncio.wait_for(asyncio.shield(probe), self.timeout)
        except TimeoutError:
            issue = f"the state store's file does not answer within {self.timeout:g}s"
        if issue and store.deleted():
            self._health_issue = issue
            self._changed("health")
            issue = await reopen(store, issue)
        self._health_issue = issue or ""
        self._changed("health")


class StoreWriter:
    """Writes the rollouts to the store: samples merged but not yet added, state and
    decision-log entries not yet saved (one writer at a time; what failed stays marked for the
    next flush), and everything again to a state file opened anew after it was deleted."""

    def __init__(
        self,
        store: Store,
        guard: StoreGuard,
        metrics: Metrics,
        recorder: Recorder,
        rollouts: Callable[[], Mapping[str, Rollout]],
        leadership: Leadership | None = None,
    ) -> None:
        """``leadership``: the store is shared by several processes (their merged samples
        are read back for the analysis, so this process's deltas only go to the store), and
        state and decision writes carry the lease's fencing token."""
        self._store = store
        self._guard = guard
        self._metrics = metrics
        self._recorder = recorder
        self._rollouts = rollouts  # the controller's, replaced by a reload
        self._leadership = leadership
        self._flush_lock = asyncio.Lock()
        self._save_lock = asyncio.Lock()  # one writer of a rollout's state and decisions
        self._background: set[asyncio.Future[None]] = set()
        self._reopening = False  # a deleted state file is being opened again
        # Sample batches: this writer's name and numbers, so that a store that applied a
        # batch whose answer was lost (a dropped connection after EXEC) does not apply its
        # retry again (Store.add_samples ``batch``).
        self._writer = uuid.uuid4().hex
        self._batches = itertools.count(1)

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """No flush and no save runs meanwhile: a caller that replaces a rollout's samples and
        decision log in the store (an operator's retry) holds it, so that no write of the old
        ones lands after the replacement."""
        async with self._flush_lock, self._save_lock:
            yield

    async def flush(self) -> None:
        """Move the proxy's deltas into the totals and the store; retry unsaved writes.

        The merges into the totals and the store's write are separate turns of the event loop
        (each a fraction of a millisecond that requests arriving meanwhile wait for); a lock
        keeps a second flush from writing the same pending samples meanwhile.
        """
        async with self._flush_lock:
            self._merge_deltas()
            wrote = False
            for name, ro in list(self._rollouts().items()):
                try:
                    wrote = wrote or ro.state_dirty or bool(ro.unsaved)
                    with contextlib.suppress(FencedError):  # another process leads: its
                        await self.save(ro)  # writes count, ours were dropped
                    if not ro.pending.empty:
                        await asyncio.sleep(0)
                        if self._rollouts().get(name) is not ro:
                            continue  # restarted by a reload meanwhile: old arms' samples
                        wrote = True
                        while not ro.pending.empty:  # a batch resent, then what waited
                            if ro.batch is None:
                                ro.batch = next(self._batches)
                            await self._store.add_samples(
                                name, ro.pending, batch=(self._writer, ro.batch)
                            )
                            ro.pending = ro.waiting or RolloutAccumulator(ro.totals.accuracy)
                            ro.batch, ro.waiting = None, None
                except StoreError as exc:
                    self._guard.failed("flush", exc)
                    return
            # Shared: a flush that asked the store nothing proves nothing (the follower's
            # sync, which reads it every round, says when it is back).
            if wrote or self._leadership is None:
                self._guard.recovered()

    def _merge_deltas(self) -> None:
        rollouts = self._rollouts()
        for name, delta in self._recorder.swap().items():
            ro = rollouts.get(name)
            if ro is None or delta.empty:
                continue
            if self._leadership is None:  # shared: the totals are read from the store
                ro.totals.merge(delta)
            else:  # this process's part of them (its share of the traffic)
                ro.own += delta.production.observed + delta.candidate.observed
            ro.version += 1
            if ro.batch is not None:  # a write of pending failed: it is retried as it was
                if ro.waiting is None:
                    ro.waiting = delta
                else:
                    ro.waiting.merge(delta)
            elif ro.pending.empty:
                ro.pending = delta  # the recorder gave it away: no copy needed
            else:
                ro.pending.merge(delta)

    async def save(self, ro: Rollout) -> None:
        """Write the state and decision-log entries not yet in the store (StoreError: retry).

        With shared leadership only the leader writes, with its fencing token; a write the
        store fences (another process leads now) drops what this process still had to write:
        the new leader works from the store, not from us.
        """
        name = ro.config.name
        lead = self._leadership
        async with self._save_lock:
            if lead is not None and not lead.leading:
                return
            fence = lead.token if lead is not None else None
            try:
                if ro.state_dirty:
                    ro.state_dirty = False
                    try:
                        await self._store.put_state(name, ro.state.to_dict(), fence=fence)
                    except BaseException:
                        ro.state_dirty = True
                        raise
                while ro.unsaved:
                    await self._store.append_decision(name, ro.unsaved[0], fence=fence)
                    ro.unsaved.pop(0)
            except FencedError:
                ro.state_dirty, ro.unsaved = False, []
                if lead is not None:
                    lead.lost()
                raise

    async def save_bounded(self, ro: Rollout) -> None:
        """:meth:`save`, waiting at most the store timeout: on a hung disk the operator's call
        answers (and the write goes on; the save lock keeps the next flush from writing the
        same entries twice)."""
        save = asyncio.ensure_future(self.save(ro))
        self._background.add(save)
        save.add_done_callback(self._saved)
        timeout = self._guard.timeout
        try:
            await asyncio.wait_for(asyncio.shield(save), timeout)
        except FencedError:
            raise  # not the leader: the caller must not act on the decision
        except StoreError as exc:  # kept dirty: the next flush retries
            self._guard.failed("apply", exc)
        except TimeoutError:
            self._guard.failed(
                "apply", StoreError(f"writing a decision took longer than {timeout:g}s")
            )

    def _saved(self, task: asyncio.Future[None]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: save_bounded or the next flush reports store errors

    async def reopen_deleted(self, store: FileBackedStore, issue: str) -> str | None:
        """Open a deleted state file again and write back everything held in memory; return
        what is still wrong (None: the new file holds it all)."""
        timeout = self._guard.timeout
        if not self._reopening:  # once, not at every retry
            log.error("%s: opening it again and writing back every rollout's state", issue)
        self._reopening = True
        async with self._flush_lock, self._save_lock:
            try:
                await asyncio.wait_for(store.reopen(), timeout)
            except (StoreError, TimeoutError) as exc:
                self._metrics.store_errors.labels("reopen").inc()
                return f"{issue}; opening it again failed: {exc}"
            for ro in self._rollouts().values():
                ro.unsave_everything()
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            return f"{issue}; writing the state back to a new file timed out"
        if self._guard.operation_error:
            return f"{issue}; writing the state back failed: {self._guard.operation_error}"
        log.info("state written back to a new file %s", getattr(store, "path", ""))
        self._reopening = False
        return None


__all__ = [
    "Reopener",
    "StoreGuard",
    "StoreWriter",
]
