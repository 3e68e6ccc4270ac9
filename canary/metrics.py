"""Every Prometheus object canary exports, on an injected CollectorRegistry.

Labels are low-cardinality only: ``rollout``, ``arm``, ``code_class``, ``kind``, ``reason``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

import canary

# Buckets for request latency and time to first token: 1 ms .. 60 s, denser where models live.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip


class Metrics:
    """The exported metrics. Create one per process (or per test) with its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.build_info = Info("canary_build", "canary version.", registry=r)
        self.build_info.info({"version": canary.__version__})
        self.requests = Counter(
            "canary_requests_total",
            "Requests answered per rollout and arm, by HTTP status class of the upstream answer.",
            ["rollout", "arm", "code_class"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "canary_upstream_errors_total",
            "Failed upstream requests per rollout and arm, by kind "
            "(connect, timeout, reset, protocol, status).",
            ["rollout", "arm", "kind"],
            registry=r,
        )
        self.latency = Histogram(
            "canary_request_duration_seconds",
            "Seconds from sending a request upstream to its last response byte.",
            ["rollout", "arm"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "canary_time_to_first_byte_seconds",
            "Seconds from sending a request upstream to the first response body byte "
            "(time to first token for streams).",
            ["rollout", "arm"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_bytes = Counter(
            "canary_request_bytes_total",
            "Request body bytes sent upstream.",
            ["rollout", "arm"],
            registry=r,
        )
        self.response_bytes = Counter(
            "canary_response_bytes_total",
            "Response body bytes received from upstream.",
            ["rollout", "arm"],
            registry=r,
        )
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
        self.cost_per_1k = Gauge(
            "canary_cost_per_1k_requests",
            "Cost of 1000 requests per arm from its pricing, averaged since start "
            "(currency of the pricing config).",
            ["rollout", "arm"],
            registry=r,
        )
        self.cost = Counter(
            "canary_cost_total",
            "Accumulated cost of the requests each arm answered.",
            ["rollout", "arm"],
            registry=r,
        )
        self.failovers = Counter(
            "canary_failovers_total",
            "Candidate requests that failed and were answered by production instead.",
            ["rollout"],
            registry=r,
        )
        self.forced = Counter(
            "canary_override_requests_total",
            "Requests whose arm was forced by the override header (kept out of the analysis).",
            ["rollout", "arm"],
            registry=r,
        )
        self.shadow = Counter(
            "canary_shadow_requests_total",
            "Mirrored shadow requests by outcome (sent, dropped_busy, dropped_body, failed).",
            ["rollout", "outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "canary_proxy_rejected_total",
            "Requests the proxy answered itself, by reason (no_route, body_too_large, "
            "bad_request, client_timeout).",
            ["reason"],
            registry=r,
        )
        self.client_disconnects = Counter(
            "canary_client_disconnects_total",
            "Clients that went away before their response was complete.",
            ["rollout"],
            registry=r,
        )
        self.inflight = Gauge(
            "canary_inflight_requests",
            "Requests the proxy is forwarding right now.",
            registry=r,
        )
