"""The analysis worker process that ``canary run`` runs the statistics in, and what it is sent.

:class:`~canary.analyzer.WorkerAnalyzer` ships each analysis as two byte strings it builds on
the event loop: the rollout's config, pickled once per config object, and :func:`pack_inputs`
of its totals: only the parts of the accumulators that
:func:`~canary.decision.analysis.analyze` reads, as plain tuples and dicts (the small rest of
the job, the hard-failure clock and the input health, travels as it is). Bytes cost the
executor's feeder thread a copy, not a pickling of the object graph (which held the GIL, and
so the proxy's requests, for about half a millisecond per analysis), and they are a snapshot:
flushes may go on while they travel.
"""

from __future__ import annotations

import os
import pickle
import threading
import time

from canary.config import RolloutConfig
from canary.decision.analysis import Analysis, analyze
from canary.observe import (
    ArmAccumulator,
    ClusterCells,
    LogHistogram,
    Moments,
    RolloutAccumulator,
    SignalAccumulator,
)
from canary.observe.inputs import InputHealth
from canary.signals import paired_key, parse_signal
from canary.stats import DEFAULT_BATCH_SIZES

WORKER_NICE = 19  # lowest priority: the proxy's requests come first on a shared core
_CONFIGS_KEPT = 8  # configs unpickled in the worker, by their bytes (one per reload at most)
_configs: dict[bytes, RolloutConfig] = {}

# One histogram as shipped: positive and negative buckets, zero and total counts.
_PackedHist = tuple[dict[int, int], dict[int, int], int, int]
# One signal as shipped: strata {propensity: (n, total, total_sq)}, a histogram per stratum,
# cluster cells per stratum {propensity: (n, total, coarse hist)}, and the min and max.
_PackedSignal = tuple[
    dict[float, tuple[int, float, float]],
    dict[float, _PackedHist],
    dict[float, tuple[list[int], list[float], dict[int, int]]],
    float,
    float,
]
# One arm: routing {propensity: [routed, observed]}, observed, and the analysed signals.
_PackedArm = tuple[dict[float, list[int]], int, dict[str, _PackedSignal]]


def init_worker(parent: int) -> None:
    """Process-pool initializer: lower this worker's priority and watch its parent.

    The statistics are background work. Where canary shares one core with its worker, a
    worker at normal priority delays requests that arrive while it runs; at nice 19 they
    preempt it. (``SCHED_IDLE`` was tried too: no clearer gain in p99, and at saturation it
    starved the analysis for seconds, delaying the controller's flushes and commands.)
    """
    try:
        os.nice(WORKER_NICE)
    except OSError:  # not allowed here (a hardened container): run at normal priority
        pass
    watch_parent(parent)


def warm() -> None:
    """Nothing: submitted once at start-up so that the pool starts its process (and the worker
    imports the statistics) before the proxy serves, not at the first analysis."""


def watch_parent(pid: int, every: float = 1.0) -> None:
    """Exit this worker when process ``pid`` (the canary that started it) is gone.

    A SIGKILLed canary cannot shut its process pool down, and the forkserver's own liveness
    pipe is held open by the worker itself, so without this the worker (and the forkserver and
    resource tracker waiting on it) would live forever.
    """

    def run() -> None:
        while True:
            time.sleep(every)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:  # alive, owned by someone else (cannot happen for a parent)
                pass

    threading.Thread(target=run, name="canary-parent-watch", daemon=True).start()


# -- what the worker is sent ---------------------------------------------------------------


def pack_config(rollout: RolloutConfig) -> bytes:
    return pickle.dumps(rollout, pickle.HIGHEST_PROTOCOL)


def analysed_keys(rollout: RolloutConfig) -> frozenset[str]:
    """Signal keys :func:`analyze` may read for this config (any other signal is not sent)."""
    keys = {"latency", "error"}
    for m in rollout.analysis.metrics:
        key = parse_signal(m.signal).key
        keys.add(key)
        rel = m.margin.relative
        keys.add(paired_key(key, rel))
        keys.add(paired_key(key, rel, changes=True))
        keys.update(paired_key(key, rel, batch=b) for b in DEFAULT_BATCH_SIZES)
    return frozenset(keys)


def pack_inputs(acc: RolloutAccumulator, keys: frozenset[str]) -> bytes:
    """The parts of ``acc`` that :func:`analyze` reads (signals in ``keys``), as bytes.

    Synchronous on purpose: the bytes are taken before the next flush changes ``acc``.
    """
    data = (acc.accuracy, _pack_arm(acc.production, keys), _pack_arm(acc.candidate, keys))
    return pickle.dumps(data, pickle.HIGHEST_PROTOCOL)


def _pack_arm(arm: ArmAccumulator, keys: frozenset[str]) -> _PackedArm:
    signals = {k: _pack_signal(s) for k, s in arm.signals.items() if k in keys}
    return (arm.routing, arm.observed, signals)


def _pack_signal(s: SignalAccumulator) -> _PackedSignal:
    strata = {p: (m.n, m.total, m.total_sq) for p, m in s.strata.items()}
    hists = {p: (h.pos, h.neg, h.zero, h.count) for p, h in s.hists.items()}
    clusters = {p: (c.n, c.total, c.hist) for p, c in s.clusters.items()}
    return (strata, hists, clusters, s.min, s.max)


def unpack_inputs(data: bytes) -> RolloutAccumulator:
    """The accumulator :func:`pack_inputs` shipped (only the fields the analysis reads)."""
    accuracy, production, candidate = pickle.loads(data)
    out = RolloutAccumulator(accuracy)
    _unpack_arm(out.production, production)
    _unpack_arm(out.candidate, candidate)
    return out


def _unpack_arm(arm: ArmAccumulator, packed: _PackedArm) -> None:
    routing, observed, signals = packed
    arm.routing = routing
    arm.observed = observed
    for key, (strata, hists, clusters, lo, hi) in signals.items():
        s = SignalAccumulator(arm.accuracy)
        s.strata = {p: Moments(*m) for p, m in strata.items()}
        for p, (pos, neg, zero, count) in hists.items():
            h = s.hists[p] = LogHistogram(arm.accuracy)
            h.pos, h.neg, h.zero, h.count = pos, neg, zero, count
        for p, (n, total, chist) in clusters.items():
            c = s.clusters[p] = ClusterCells()
            c.n, c.total, c.hist = n, total, chist
        s.min, s.max = lo, hi
        arm.signals[key] = s


def analyze_packed(
    config: bytes,
    inputs: bytes,
    *,
    failing_for: float = 0.0,
    failing_requests: int = 0,
    input_health: InputHealth | None = None,
) -> Analysis:
    """:func:`analyze` of what the controller shipped (runs in the worker)."""
    rollout = _configs.get(config)
    if rollout is None:
        if len(_configs) >= _CONFIGS_KEPT:
            _configs.clear()
        rollout = _configs[config] = pickle.loads(config)
    return analyze(
        rollout,
        unpack_inputs(inputs),
        failing_for=failing_for,
        failing_requests=failing_requests,
        input_health=input_health,
    )


__all__ = [
    "WORKER_NICE",
    "analysed_keys",
    "analyze_packed",
    "init_worker",
    "pack_config",
    "pack_inputs",
    "unpack_inputs",
    "warm",
    "watch_parent",
]
