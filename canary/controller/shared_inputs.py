"""Input health merged over every process of a shared store (shared mode).

Each process's :class:`~canary.observe.inputs.InputMonitor` counts only the request bodies
it proxies. Every flush interval, :class:`InputSharing` writes this process's absolute counts
(:meth:`~canary.observe.inputs.InputMonitor.local_snapshot`, O(fields)) to the store under
(rollout, process) with the fingerprint of the rollout's ``inputs`` settings, and, at most
once per ``read_every`` seconds, reads every process's entry back and hands the other
processes' snapshots of the same fingerprint to the monitor
(:meth:`~canary.observe.inputs.InputMonitor.set_peers`). From then on the monitor's
snapshot (what the leader's analysis ships) and its report (``/metrics``, the admin API) are
of the merged counts (:func:`~canary.observe.inputs.merge_health`).

Absolute counts, not deltas: a write retried after a lost answer never counts twice. The
entries of processes that stopped are kept (their requests stay in the sequential tests),
at most :data:`~canary.observe.inputs.MAX_PROCESSES` per rollout (the oldest written go);
the leader drops a rollout's entries when the rollout starts anew, and entries of other
``inputs`` settings once they have not been written for :data:`STALE_OTHER_SETTINGS`
seconds (live processes still on the old settings keep theirs during a rolling reload).

A store that fails leaves the last merged view in place (logged once); the leader's holding
on a store that is down is the flush's and the sync's business
(:class:`~canary.controller.persistence.StoreGuard`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from canary.errors import StoreError
from canary.observe import Recorder
from canary.observe.inputs import MAX_PROCESSES, InputHealth, InputMonitor, inputs_fingerprint
from canary.store import Store

log = logging.getLogger("canary.controller")

READ_EVERY: Final = 1.0  # seconds between reads of the other processes' counts
STALE_OTHER_SETTINGS: Final = 60.0  # seconds after which another fingerprint's entry is dropped
REWRITE_EVERY: Final = 10.0  # seconds after which unchanged counts are written again


class InputSharing:
    """Writes this process's input counts to the store and merges the others' into its
    monitors (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        recorder: Recorder,
        process: Callable[[], str],
        *,
        timeout: float,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        read_every: float = READ_EVERY,
        keep: int = MAX_PROCESSES,
    ) -> None:
        """``process()``: this process's name in the store (its lease holder name, which no
        other process shares). ``timeout``: seconds a store call may take."""
        self._store = store
        self._recorder = recorder
        self._process = process
        self._timeout = timeout
        self._clock = clock
        self._monotonic = monotonic
        self.read_every = read_every
        self.keep = keep
        self._next_read: dict[str, float] = {}  # rollout -> monotonic time of the next read
        self._failing = False
        self._seq = 0  # numbers this process's writes
        # rollout -> (fingerprint, request counts, monotonic time) of the last write: counts
        # that did not change are written again only every REWRITE_EVERY seconds.
        self._written: dict[str, tuple[str, tuple[int, ...], float]] = {}
        # (rollout, process) -> (entry's write number, its snapshot): decoded once per write.
        self._decoded: dict[tuple[str, str], tuple[int, InputHealth]] = {}

    async def sync(self, rollouts: Iterable[str], *, leading: bool = False) -> None:
        """Write this process's counts of every rollout with ``inputs`` and, when due, merge
        the other processes'. ``leading``: also drop other settings' stale entries."""
        for name in rollouts:
            monitor = self._recorder.input_monitor(name)
            if monitor is None:
                continue
            try:
                await self._sync_one(name, monitor, leading)
            except (StoreError, TimeoutError) as exc:
                if not self._failing:
                    log.warning(
                        "input health: cannot share counts through the store (%s); the "
                        "last merged counts stay in use",
                        exc or "timed out",
                    )
                self._failing = True
                return
        if self._failing:
            log.info("input health: sharing counts through the store again")
        self._failing = False

    async def write(self, rollouts: Iterable[str]) -> None:
        """Write this process's counts only (a clean stop: nothing it counted is lost)."""
        for name in rollouts:
            monitor = self._recorder.input_monitor(name)
            if monitor is not None:
                await self._put(name, monitor, force=True)

    async def drop(self, rollout: str) -> None:
        """Forget every process's counts of ``rollout`` (it starts anew); live processes
        write theirs again at their next flush."""
        try:
            await asyncio.wait_for(self._store.drop_input_health(rollout), self._timeout)
            self._written.clear()  # write every rollout's counts again at the next sync
        except TimeoutError as exc:
            raise StoreError(f"dropping the input health of rollout {rollout!r} timed out") from exc
        self._decoded = {k: v for k, v in self._decoded.items() if k[0] != rollout}

    async def _put(self, name: str, monitor: InputMonitor, *, force: bool = False) -> str:
        fingerprint = inputs_fingerprint(monitor.config)
        local = monitor.local_snapshot()
        mono = self._monotonic()
        last = self._written.get(name)
        if (
            not force
            and last is not None
            and last[:2] == (fingerprint, local.requests)  # every request bumps a count
            and mono - last[2] < REWRITE_EVERY
        ):
            return fingerprint
        self._seq += 1
        entry = {
            "fingerprint": fingerprint,
            "seq": self._seq,
            "at": self._clock(),
            "health": local.to_dict(),
        }
        put = self._store.put_input_health(name, self._process(), entry, keep=self.keep)
        self._written.pop(name, None)  # until this write is known to have worked
        await asyncio.wait_for(put, self._timeout)
        self._written[name] = (fingerprint, local.requests, mono)
        return fingerprint

    async def _sync_one(self, name: str, monitor: InputMonitor, leading: bool) -> None:
        mono = self._monotonic()
        if mono < self._next_read.get(name, -math.inf):
            await self._put(name, monitor)
            return
        self._next_read[name] = mono + self.read_every
        entries = await asyncio.wait_for(self._store.input_health(name), self._timeout)
        if self._process() not in entries:  # dropped (a restarted rollout, the bound): rewrite
            self._written.pop(name, None)
        fingerprint = await self._put(name, monitor)
        me, now = self._process(), self._clock()
        peers: list[InputHealth] = []
        stale: list[str] = []
        seen: set[tuple[str, str]] = set()
        for process, entry in entries.items():
            if process == me:
                continue
            if entry.get("fingerprint") != fingerprint:
                at = _float(entry.get("at"))
                if leading and (at is None or now - at > STALE_OTHER_SETTINGS):
                    stale.append(process)
                continue
            health = self._health(name, process, entry)
            if health is not None:
                peers.append(health)
                seen.add((name, process))
        for key in [k for k in self._decoded if k[0] == name and k not in seen]:
            del self._decoded[key]
        monitor.set_peers(peers)
        if stale:
            await asyncio.wait_for(self._store.drop_input_health(name, stale), self._timeout)

    def _health(self, name: str, process: str, entry: dict[str, Any]) -> InputHealth | None:
        seq = entry.get("seq")
        kept = self._decoded.get((name, process))
        if kept is not None and isinstance(seq, int) and kept[0] == seq:
            return kept[1]
        try:
            health = InputHealth.from_dict(entry["health"])
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("input health: ignoring the unreadable counts of %s: %s", process, exc)
            return None
        if isinstance(seq, int):
            self._decoded[(name, process)] = (seq, health)
        return health


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


__all__ = ["READ_EVERY", "REWRITE_EVERY", "STALE_OTHER_SETTINGS", "InputSharing"]
