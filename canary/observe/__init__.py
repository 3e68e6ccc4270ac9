"""Observation layer: per-request records, signal extraction, cost, mergeable accumulators.

Pure Python on the proxy's hot path (no aiohttp types, no I/O, no locks, bounded memory).
The proxy compiles one :class:`ResponseExtractor` per rollout, inspects each response with
it, builds an :class:`Observation` and records it into the :class:`Recorder`; the controller
reads merged :class:`RolloutAccumulator` snapshots. The sources that are not per response
write through the same recorder from their own modules: :mod:`canary.observe.feedback`
(delayed labels), :mod:`canary.observe.resources` (scraped Prometheus metrics) and
:mod:`canary.observe.inputs` (input health). Signal and arm names are
:mod:`canary.signals`'s.
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
from canary.observe.extract import (
    JsonPath,
    ResponseExtractor,
    ResponseInspector,
    parse_server_timing,
)
from canary.observe.histogram import LogHistogram
from canary.observe.inputs import InputMonitor, InputReport
from canary.observe.record import CLUSTERS, ERROR_KINDS, NO_CLUSTER, Observation, Weights

__all__ = [
    "CLUSTERS",
    "COARSE_SHIFT",
    "ERROR_KINDS",
    "NO_CLUSTER",
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
    "SignalAccumulator",
    "Weights",
    "coarse_bucket",
    "coarse_upper",
    "cost_per_1000",
    "parse_server_timing",
]
