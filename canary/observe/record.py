"""The per-request record the proxy appends for every routed or mirrored request.

One :class:`Observation` per upstream request (a shadow mirror is its own observation). The
proxy builds it once the response is complete (or has failed) and hands it to
:meth:`canary.observe.accumulators.Recorder.record`; nothing keeps it after that, except a
feedback join that may keep ``request_id``, ``arm`` and ``prediction`` for a bounded time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from canary.signals import CANDIDATE

__all__ = [
    "CLUSTERS",
    "ERROR_CONNECT",
    "ERROR_KINDS",
    "ERROR_PROTOCOL",
    "ERROR_RESET",
    "ERROR_STATUS",
    "ERROR_TIMEOUT",
    "NO_CLUSTER",
    "Observation",
    "Weights",
]


class _Split(NamedTuple):
    candidate: float
    shadow: bool


class Weights(_Split):
    """Traffic split of one rollout: percent of live traffic the candidate answers.

    ``shadow`` mirrors production's requests to the candidate while users keep getting
    production's answers (``candidate`` is then 0). The one type the split travels as, from
    the rollout state (:meth:`canary.decision.RolloutState.weights`) through the controller
    to the proxy, which reads the current value once per request (immutable: nothing to
    lock). A tuple, so ``candidate, shadow = weights`` unpacks it.
    """

    __slots__ = ()

    def __new__(cls, candidate: float = 0.0, shadow: bool = False) -> Weights:
        if not 0.0 <= candidate <= 100.0:
            raise ValueError(f"candidate weight must be within 0..100, got {candidate!r}")
        if shadow and candidate:
            raise ValueError("a shadow split sends no live traffic to the candidate")
        return super().__new__(cls, candidate, shadow)

    def fraction(self, arm: str) -> float:
        """Probability with which a randomly routed request goes to ``arm``."""
        c = self.candidate / 100.0
        return c if arm == CANDIDATE else 1.0 - c


# Values of Observation.error; None means a complete response outside the error classes.
ERROR_CONNECT = "connect"  # could not connect to the upstream
ERROR_TIMEOUT = "timeout"  # connect, read or total timeout
ERROR_RESET = "reset"  # the connection broke before the response was complete
ERROR_STATUS = "status"  # a complete response whose status is in the configured error classes
ERROR_PROTOCOL = "protocol"  # the upstream spoke invalid HTTP
ERROR_KINDS = (ERROR_CONNECT, ERROR_TIMEOUT, ERROR_RESET, ERROR_STATUS, ERROR_PROTOCOL)

# With sticky routing the randomised unit is the user, not the request: every observation
# carries the user's cluster, a hash bucket of the sticky key independent of the arm choice,
# and the accumulators keep per-cluster sums so the tests can treat clusters (not requests)
# as the independent units. Bounded: the state is O(CLUSTERS), never O(users).
CLUSTERS = 64
NO_CLUSTER = -1  # randomised per request


@dataclass(slots=True)
class Observation:
    """What the proxy measured for one upstream request.

    Attributes
    ----------
    rollout
        Name of the rollout that owns the request.
    arm
        ``"production"`` or ``"candidate"``.
    propensity
        Probability with which this arm was chosen for this request (0.05 for the candidate at
        weight 5, 0.95 for production); 1.0 when forced by the override header; for a shadow
        mirror, whatever the caller passes. The analysis weights samples by it.
    shadow
        True for a mirrored request whose answer the user never saw.
    request_id
        The ``X-Request-Id`` returned to the client (feedback joins on it).
    status
        HTTP status of the upstream response; 0 when there was none.
    error
        None, or one of :data:`ERROR_KINDS`.
    latency
        Seconds from sending the request upstream to the last response byte (or the failure).
    ttft
        Seconds to the first response body byte (for event streams, the first event); None
        when no body byte arrived.
    bytes_out, bytes_in
        Request body bytes sent upstream; response body bytes received.
    signals
        Values of the rollout's configured response and derived signals for this request,
        keyed by the canonical signal string (``Signal.key``): ``"header:x-model-cost"``,
        ``"server_timing:inference"``, ``"json:usage.total_tokens"``, ``"cost"``,
        ``"tokens_per_s"``. A signal that could not be measured is absent. Never contains
        ``latency``, ``ttft`` or ``error``: those come from the fields above.
    prediction
        The value at the rollout's ``prediction: json:PATH``, kept for feedback joins.
    cluster
        With sticky routing, the user's cluster in ``0 .. CLUSTERS - 1`` (a hash of the sticky
        key independent of the arm choice); :data:`NO_CLUSTER` when the request was randomised
        on its own (or had no sticky key).
    """

    rollout: str
    arm: str
    propensity: float
    shadow: bool
    request_id: str
    status: int
    error: str | None
    latency: float
    ttft: float | None = None
    bytes_out: int = 0
    bytes_in: int = 0
    signals: dict[str, float] = field(default_factory=dict)
    prediction: object | None = None
    cluster: int = NO_CLUSTER
