"""Observation layer: per-request records, signal extraction, cost, mergeable accumulators.

Pure Python on the proxy's hot path (no aiohttp types, no I/O, no locks, bounded memory).
The proxy compiles one :class:`ResponseExtractor` per rollout, inspects each response with
it, builds an :class:`Observation` and records it into the :class:`Recorder`; the controller
reads merged :class:`RolloutAccumulator` snapshots.
"""

from canary.observe.accumulators import (
    ArmAccumulator,
    Moments,
    Recorder,
    RolloutAccumulator,
    SignalAccumulator,
)
from canary.observe.cost import ArmCost, Pricing, RateEstimator, cost_per_1000
from canary.observe.histogram import LogHistogram
from canary.observe.inputs import InputMonitor, InputReport
from canary.observe.record import ARMS, CANDIDATE, ERROR_KINDS, PRODUCTION, Observation
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
    "ERROR_KINDS",
    "PRODUCTION",
    "ArmAccumulator",
    "ArmCost",
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
    "cost_per_1000",
    "parse_server_timing",
    "parse_signal",
]
