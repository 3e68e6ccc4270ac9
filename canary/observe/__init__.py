"""Observation layer: per-request records, signal extraction, cost, mergeable accumulators.

Pure Python on the proxy's hot path (no aiohttp types, no I/O, no locks, bounded memory).
The proxy compiles one :class:`ResponseExtractor` per rollout, inspects each response with
it, builds an :class:`Observation` and records it into the :class:`Recorder`; the controller
reads merged :class:`RolloutAccumulator` snapshots.
"""

from canary.observe.accumulators import (
    COARSE_SHIFT,
    ArmAccumulator,
    ClusterCells,
    Moments,
    Recorder,
    RolloutAccumulator,
    SignalAccumulator,
    coarse_bucket,
    coarse_upper,
)
from canary.observe.cost import ArmCost, Pricing, RateEstimator, cost_per_1000
from canary.observe.histogram import LogHistogram
from canary.observe.inputs import InputMonitor, InputReport
from canary.observe.record import (
    ARMS,
    CANDIDATE,
    CLUSTERS,
    ERROR_KINDS,
    NO_CLUSTER,
    PRODUCTION,
    Observation,
    Weights,
)
from canary.observe.signals import (
    JsonPath,
    ResponseExtractor,
    ResponseInspector,
    Signal,
    parse_server_timing,
    parse_signal,
)

__all__ = [
    "ARMS",
    "CANDIDATE",
    "CLUSTERS",
    "COARSE_SHIFT",
    "ERROR_KINDS",
    "NO_CLUSTER",
    "PRODUCTION",
    "ArmAccumulator",
    "ArmCost",
    "ClusterCells",
    "InputMonitor",
    "InputReport",
    "JsonPath",
    "LogHistogram",
    "Moments",
    "Observation",
    "Pricing",
    "RateEstimator",
    "Recorder",
    "ResponseExtractor",
    "ResponseInspector",
    "RolloutAccumulator",
    "Signal",
    "SignalAccumulator",
    "Weights",
    "coarse_bucket",
    "coarse_upper",
    "cost_per_1000",
    "parse_server_timing",
    "parse_signal",
]
