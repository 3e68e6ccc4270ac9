"""Every Prometheus metric canary exports, on an injected CollectorRegistry.

The hot path never calls prometheus_client: it bumps plain integers and floats in
:class:`ProxyCounters` (no locks, no label lookups), and :class:`ProxyCollector` turns them
into metric families when ``/metrics`` is scraped. Gauges that change only on the control
path (weights) are ordinary prometheus_client gauges. Labels are low-cardinality only:
``rollout``, ``arm``, ``code_class``, ``kind``, ``reason``, ``outcome``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

import canary
from canary.observe.inputs import RESULTS as INPUT_RESULTS
from canary.observe.inputs import TYPES as INPUT_TYPES
from canary.signals import ARMS, NO_ANSWER_CLASS

if TYPE_CHECKING:
    from canary.observe.inputs import InputMonitor

# Buckets for request latency and time to first byte: 1 ms .. 60 s, denser where models live.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip


class HistogramCounts:
    """Per-bucket counts (not cumulative) plus sum and count; ``observe`` is O(log buckets)."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.sum += value
        self.count += 1


class ArmCounters:
    __slots__ = (
        "cost_n",
        "cost_total",
        "errors",
        "forced",
        "latency",
        "request_bytes",
        "requests",
        "response_bytes",
        "ttft",
    )

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}  # by status class
        self.errors: dict[str, int] = {}  # by kind
        self.latency = HistogramCounts()
        self.ttft = HistogramCounts()
        self.request_bytes = 0
        self.response_bytes = 0
        self.cost_total = 0.0
        self.cost_n = 0
        self.forced = 0


class RolloutCounters:
    __slots__ = ("arms", "client_disconnects", "failovers", "judge", "shadow")

    def __init__(self) -> None:
        self.arms = {arm: ArmCounters() for arm in ARMS}
        self.failovers = 0
        self.client_disconnects = 0
        self.shadow: dict[str, int] = {}  # by outcome
        self.judge: dict[str, int] = {}  # judged pairs by result (canary/observe/judge.py)


class ProxyCounters:
    """The data plane's counters; they survive config reloads (Prometheus counters never drop)."""

    __slots__ = ("inflight", "rejected", "rollouts")

    def __init__(self) -> None:
        self.rollouts: dict[str, RolloutCounters] = {}
        self.rejected: dict[str, int] = {}
        self.inflight = 0

    def rollout(self, name: str) -> RolloutCounters:
        c = self.rollouts.get(name)
        if c is None:
            c = self.rollouts[name] = RolloutCounters()
        return c

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


def bump(counts: dict[str, int], key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


class ProxyCollector(Collector):
    """Exposes :class:`ProxyCounters` at scrape time."""

    def __init__(self, counters: ProxyCounters) -> None:
        self._c = counters

    def collect(self) -> Iterator[Metric]:
        c = self._c
        requests = CounterMetricFamily(
            "canary_requests",
            "Requests answered per rollout and arm, by HTTP status class of the upstream "
            f"answer ('{NO_ANSWER_CLASS}' when there was no answer).",
            labels=["rollout", "arm", "code_class"],
        )
        errors = CounterMetricFamily(
            "canary_upstream_errors",
            "Failed upstream requests per rollout and arm, by kind "
            "(connect, timeout, reset, protocol, status).",
            labels=["rollout", "arm", "kind"],
        )
        latency = HistogramMetricFamily(
            "canary_request_duration_seconds",
            "Seconds from sending a request upstream to its last response byte.",
            labels=["rollout", "arm"],
        )
        ttft = HistogramMetricFamily(
            "canary_time_to_first_byte_seconds",
            "Seconds from sending a request upstream to the first response body byte "
            "(time to first token for streams).",
            labels=["rollout", "arm"],
        )
        req_bytes = CounterMetricFamily(
            "canary_request_bytes", "Request body bytes sent upstream.", labels=["rollout", "arm"]
        )
        resp_bytes = CounterMetricFamily(
            "canary_response_bytes",
            "Response body bytes received from upstream.",
            labels=["rollout", "arm"],
        )
        cost = CounterMetricFamily(
            "canary_cost",
            "Accumulated cost of the requests each arm answered (currency of the pricing).",
            labels=["rollout", "arm"],
        )
        priced = CounterMetricFamily(
            "canary_priced_requests",
            "Requests whose cost is in canary_cost (answered without error, with a price): "
            "1000 * rate(canary_cost_total) / rate(canary_priced_requests_total) is the cost "
            "per 1000 inferences over any window, summed over processes first.",
            labels=["rollout", "arm"],
        )
        cost_1k = GaugeMetricFamily(
            "canary_cost_per_1k_requests",
            "Cost of 1000 requests per arm from its pricing, averaged since start.",
            labels=["rollout", "arm"],
        )
        forced = CounterMetricFamily(
            "canary_override_requests",
            "Requests whose arm was forced by the override header (kept out of the analysis).",
            labels=["rollout", "arm"],
        )
        failovers = CounterMetricFamily(
            "canary_failovers",
            "Candidate requests that failed and were answered by production instead.",
            labels=["rollout"],
        )
        disconnects = CounterMetricFamily(
            "canary_client_disconnects",
            "Clients that went away before their response was complete.",
            labels=["rollout"],
        )
        shadow = CounterMetricFamily(
            "canary_shadow_requests",
            "Mirrored shadow requests by outcome (sent, failed, dropped_busy, dropped_body).",
            labels=["rollout", "outcome"],
        )
        judge = CounterMetricFamily(
            "canary_judge_pairs",
            "Pairs of answers (both arms, one request) sampled for the judge, by result: a "
            "verdict (candidate, production, tie, scored; forfeit_candidate, forfeit_production: "
            "that arm failed or answered empty while the other answered) or none (unparsable, "
            "error, timeout, dropped_busy, dropped_rate, dropped_pending, no_answer).",
            labels=["rollout", "result"],
        )
        for name, rc in c.rollouts.items():
            for arm, a in rc.arms.items():
                for code_class, n in a.requests.items():
                    requests.add_metric([name, arm, code_class], n)
                for kind, n in a.errors.items():
                    errors.add_metric([name, arm, kind], n)
                for family, h in ((latency, a.latency), (ttft, a.ttft)):
                    cumulative, buckets = 0, []
                    for bound, n in zip((*LATENCY_BUCKETS, float("inf")), h.buckets, strict=True):
                        cumulative += n
                        buckets.append((_le(bound), cumulative))
                    family.add_metric([name, arm], buckets, h.sum)
                req_bytes.add_metric([name, arm], a.request_bytes)
                resp_bytes.add_metric([name, arm], a.response_bytes)
                cost.add_metric([name, arm], a.cost_total)
                priced.add_metric([name, arm], a.cost_n)
                if a.cost_n:
                    cost_1k.add_metric([name, arm], 1000.0 * a.cost_total / a.cost_n)
                forced.add_metric([name, arm], a.forced)
            failovers.add_metric([name], rc.failovers)
            disconnects.add_metric([name], rc.client_disconnects)
            for outcome, n in rc.shadow.items():
                shadow.add_metric([name, outcome], n)
            for result, n in rc.judge.items():
                judge.add_metric([name, result], n)
        rejected = CounterMetricFamily(
            "canary_proxy_rejected",
            "Requests the proxy answered itself, by reason "
            "(no_route, body_too_large, client_timeout, bad_request, head_too_large, http2; "
            "OpenAI routing: model_not_found, model_missing, model_bad_json, "
            "model_duplicate, model_body_too_large).",
            labels=["reason"],
        )
        for reason, n in c.rejected.items():
            rejected.add_metric([reason], n)
        inflight = GaugeMetricFamily(
            "canary_inflight_requests", "Requests the proxy is forwarding right now.", c.inflight
        )
        yield from (requests, errors, latency, ttft, req_bytes, resp_bytes, cost, priced, cost_1k)
        yield from (forced, failovers, disconnects, shadow, rejected, inflight, judge)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class InputCollector(Collector):
    """Input health (:mod:`canary.observe.inputs`) of every rollout with ``inputs``, read at
    scrape time: the proxy only bumps the monitors' counters, and the drift tests run here at
    most once per second. Labels: ``rollout``, ``field`` (a configured path), ``type``."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "canary_input_requests",
            "Requests of rollouts with input health, by result: inspected (a JSON object or "
            "array body), unparseable, not_inspected (streamed or no body), too_large.",
            labels=["rollout", "result"],
        )
        values = CounterMetricFamily(
            "canary_input_field_values",
            "Inspected requests per field by the JSON type of its value (number, string, bool, "
            "null, missing, object, array).",
            labels=["rollout", "field", "type"],
        )
        gauges = {
            key: GaugeMetricFamily(name, text, labels=["rollout", "field"])
            for key, name, text in (
                ("null_rate", "canary_input_field_null_ratio",
                 "Share of requests since the baseline where the field is null or missing."),
                ("mean", "canary_input_field_mean",
                 "Mean of the field's numeric values since the baseline."),
                ("min", "canary_input_field_min",
                 "Smallest numeric value of the field since the baseline."),
                ("max", "canary_input_field_max",
                 "Largest numeric value of the field since the baseline."),
                ("base_mean", "canary_input_baseline_mean",
                 "Mean of the field's numeric values in the baseline (learned or given)."),
                ("base_null_rate", "canary_input_baseline_null_ratio",
                 "Null-or-missing share of the field in the baseline (learned or given)."),
            )
        }  # fmt: skip
        drift = GaugeMetricFamily(
            "canary_input_drift",
            "1 while the field's sequential drift test flags a shift from the baseline beyond "
            "the tolerance (mean, null rate or type mix), 0 otherwise.",
            labels=["rollout", "field"],
        )
        learning = GaugeMetricFamily(
            "canary_input_baseline_learning",
            "1 while the input baseline is still being learned (no drift test yet).",
            labels=["rollout"],
        )
        monitors: Mapping[str, InputMonitor] = self._metrics.inputs
        for name, monitor in monitors.items():
            report = monitor.report()
            # The two counters are this process's own requests (several processes sum up);
            # the gauges and the drift test are of every process's (the analysis's view).
            own = monitor.local_snapshot()
            for result, n in zip(INPUT_RESULTS, own.requests, strict=True):
                requests.add_metric([name, result], n)
            learning.add_metric([name], 1 if report.learning else 0)
            for counts in own.fields:
                for i, t in enumerate(INPUT_TYPES):
                    n = counts.baseline.types[i] + counts.current.types[i]
                    if n:
                        values.add_metric([name, counts.path, t], n)
            for f in report.fields:
                for key, value in (
                    ("null_rate", f.current.null_rate),
                    ("mean", f.current.mean),
                    ("min", f.current.min),
                    ("max", f.current.max),
                    ("base_mean", f.baseline.mean),
                    ("base_null_rate", f.baseline.null_rate),
                ):
                    if value is not None:  # no sample until there is data
                        gauges[key].add_metric([name, f.field], value)
                drift.add_metric([name, f.field], 1 if f.drifted else 0)
        yield from (requests, values, *gauges.values(), drift, learning)


QuantileRow = tuple[str, str, float, float]
"""``(arm, signal, quantile level, value)``: one per-arm quantile of a rollout's signal."""


class ControllerCollector(Collector):
    """What the controller computes when ``/metrics`` is scraped (never on the hot path):
    each arm's quantiles of the rollouts' quantile-judged signals as the analysis sees them
    (``Metrics.quantile_source``, see :mod:`canary.controller.gauges`) and whether this process
    leads (``Metrics.leading_source``). Nothing is exported until a controller registers."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        source, leading = self._metrics.quantile_source, self._metrics.leading_source
        quantile = GaugeMetricFamily(
            "canary_signal_quantile",
            "Each arm's quantile of a signal (latency and ttft in seconds, and every signal a "
            "pNN or distribution metric judges) at the analysis' resolution (0.5% relative "
            "error): over the arm's samples since the rollout started, post-stratified over "
            "the traffic splits both arms have samples in, as the quantile test compares "
            "them (candidate/production at a metric's quantile = canary_metric_estimate).",
            labels=["rollout", "arm", "signal", "quantile"],
        )
        if source is not None:
            for rollout, rows in source():
                for arm, signal, q, value in rows:
                    quantile.add_metric([rollout, arm, signal, _level(q)], value)
        yield quantile
        if leading is not None:
            yield GaugeMetricFamily(
                "canary_leader",
                "1 while this process analyses and decides the rollouts (it holds the state "
                "store's lease, or it is alone on its store), 0 while it follows. Analysis "
                "gauges of a follower may be stale: read them where this is 1.",
                1 if leading() else 0,
            )


def _level(q: float) -> str:
    """A quantile level as a label value: 0.5, 0.95, 0.999 (as Prometheus summaries)."""
    return repr(round(q, 6))


class Metrics:
    """The exported metrics of one process (or one test), on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.counters = ProxyCounters()
        r.register(ProxyCollector(self.counters))
        # Input health monitors by rollout; the proxy swaps in the current ones on (re)load.
        self.inputs: dict[str, InputMonitor] = {}
        r.register(InputCollector(self))
        # Set by the controller (controller/gauges.py), read at scrape time.
        self.quantile_source: Callable[[], Iterable[tuple[str, list[QuantileRow]]]] | None = None
        self.leading_source: Callable[[], bool] | None = None
        r.register(ControllerCollector(self))
        self.build_info = Info("canary_build", "canary version.", registry=r)
        self.build_info.info({"version": canary.__version__})
        self.weight = Gauge(
            "canary_traffic_weight_ratio",
            "Share of live traffic routed to each arm (0..1).",
            ["rollout", "arm"],
            registry=r,
        )
        self.shadow_active = Gauge(
            "canary_shadow_active",
            "1 while the rollout mirrors production traffic to the candidate.",
            ["rollout"],
            registry=r,
        )
        # -- controller (control path only: ordinary prometheus_client objects) ------------
        self.phase = Gauge(
            "canary_rollout_phase",
            "1 for the rollout's current phase (running, paused, holding, promoted, "
            "rolled_back), 0 for the others.",
            ["rollout", "phase"],
            registry=r,
        )
        self.step = Gauge(
            "canary_rollout_step",
            "Current step of the rollout, 1-based.",
            ["rollout"],
            registry=r,
        )
        self.metric_estimate = Gauge(
            "canary_metric_estimate",
            "Point estimate of candidate vs production for each analysis metric (a ratio for "
            "relative tolerances, a difference for absolute ones).",
            ["rollout", "metric"],
            registry=r,
        )
        self.metric_lower = Gauge(
            "canary_metric_interval_lower",
            "Lower bound of the metric's anytime-valid confidence interval.",
            ["rollout", "metric"],
            registry=r,
        )
        self.metric_upper = Gauge(
            "canary_metric_interval_upper",
            "Upper bound of the metric's anytime-valid confidence interval.",
            ["rollout", "metric"],
            registry=r,
        )
        self.metric_tolerance = Gauge(
            "canary_metric_tolerance",
            "The tolerance line the interval is compared with.",
            ["rollout", "metric"],
            registry=r,
        )
        self.metric_verdict = Gauge(
            "canary_metric_verdict",
            "Verdict of each metric: 1 ok (provably within tolerance), 0 unknown, "
            "-1 worse (provably beyond it).",
            ["rollout", "metric"],
            registry=r,
        )
        self.metric_samples = Gauge(
            "canary_metric_samples",
            "Samples per arm behind each metric's interval.",
            ["rollout", "metric", "arm"],
            registry=r,
        )
        self.decisions = Counter(
            "canary_decisions",
            "Decisions taken by the controller or an operator, by action.",
            ["rollout", "decision"],
            registry=r,
        )
        self.store_up = Gauge(
            "canary_store_up",
            "1 when the state store works: the last write succeeded, no call has been stuck "
            "longer than the store timeout and the state file is still the one opened; while "
            "0 the controller holds every rollout (no decisions on stale data) and /readyz "
            "answers 503.",
            registry=r,
        )
        self.store_errors = Counter(
            "canary_store_errors",
            "Failed state-store operations.",
            ["operation"],
            registry=r,
        )
        self.analysis_worker_up = Gauge(
            "canary_analysis_worker_up",
            "1 while the statistics run in the analysis worker process; 0 while they run in "
            "the event loop because the worker failed (it is restarted with back-off).",
            registry=r,
        )
        self.analysis_worker_restarts = Counter(
            "canary_analysis_worker_restarts",
            "Attempts to start the analysis worker again after it failed, by result (ok, failed).",
            ["result"],
            registry=r,
        )
        self.analysis_seconds = Gauge(
            "canary_analysis_duration_seconds",
            "Time the last analysis of a rollout took (statistics and policy).",
            ["rollout"],
            registry=r,
        )
        self.webhooks = Counter(
            "canary_webhook_deliveries",
            "Webhook deliveries by result (delivered, failed after retries, dropped when the "
            "queue was full).",
            ["rollout", "result"],
            registry=r,
        )
        # -- feedback intake (admin path) ---------------------------------------------------
        self.feedback = Counter(
            "canary_feedback",
            "Feedback items posted to /api/v1/feedback by result (accepted, unknown, expired, "
            "duplicate, invalid, no_prediction); rollout is empty when no rollout knows the id.",
            ["rollout", "result"],
            registry=r,
        )
        self.feedback_entries = Gauge(
            "canary_feedback_entries",
            "Answers kept for joining delayed labels (request ids, joined ones included until "
            "they expire).",
            ["rollout"],
            registry=r,
        )
        # -- resource scraper (background task, see canary/observe/resources.py) -------------------
        self.resource_scrapes = Counter(
            "canary_resource_scrapes",
            "Scrapes of the arms' Prometheus endpoints by result (ok, error, timeout, parse, "
            "missing_metric).",
            ["rollout", "arm", "result"],
            registry=r,
        )
        self.resource_windows = Counter(
            "canary_resource_windows",
            "Resource windows per analysis metric by outcome: recorded, or dropped "
            "(scrape_failed, no_baseline, few_requests, not_positive).",
            ["rollout", "metric", "outcome"],
            registry=r,
        )
        self.resource_value = Gauge(
            "canary_resource_value",
            "Each arm's value of a resource metric in the latest complete window (per replica "
            "for gauges, per request for counters).",
            ["rollout", "arm", "metric"],
            registry=r,
        )
        # -- promql evaluator (background task on the leader, see canary/observe/promql.py) ---
        self.promql_queries = Counter(
            "canary_promql_queries",
            "promql: metric queries to analysis.prometheus by result (ok, error, timeout, "
            "bad_query, empty, many_series, not_finite).",
            ["rollout", "arm", "metric", "result"],
            registry=r,
        )
        self.promql_windows = Counter(
            "canary_promql_windows",
            "promql: windows per analysis metric by outcome: recorded, or dropped "
            "(query_failed: an arm had no value; not_positive: a ratio of values <= 0).",
            ["rollout", "metric", "outcome"],
            registry=r,
        )
        self.promql_value = Gauge(
            "canary_promql_value",
            "Each arm's value of a promql: metric in the latest complete window.",
            ["rollout", "arm", "metric"],
            registry=r,
        )
        # -- gates (canary/controller/gates.py, docs/gates.md) -------------------------------
        self.gate_waiting = Gauge(
            "canary_gate_waiting",
            "1 while an automatic advance or promotion waits at its gate (confirm-advance, "
            "confirm-promotion), else 0.",
            ["rollout", "gate"],
            registry=r,
        )
        self.gate_answers = Counter(
            "canary_gate_answers",
            "Answers of gates by result: yes (2xx), no (another status), timeout, error (not "
            "reached), approved (an operator's canary approve).",
            ["rollout", "gate", "result"],
            registry=r,
        )


__all__ = [
    "LATENCY_BUCKETS",
    "ArmCounters",
    "ControllerCollector",
    "HistogramCounts",
    "InputCollector",
    "Metrics",
    "ProxyCollector",
    "ProxyCounters",
    "QuantileRow",
    "RolloutCounters",
    "bump",
]
