"""Cost per request from an arm's pricing, with fixed costs amortised over the request rate.

``cost = per_request + per_1k_tokens * tokens / 1000 + header cost
+ per_hour * replicas / 3600 / rate``, where ``rate`` is the rollout's total request rate
(both arms together) from a :class:`RateEstimator`. Amortising over the total rate, not the
arm's own, is deliberate: it prices each arm as if it served all traffic, so a candidate at
5% is not charged for idling 95% of the time (its replicas would be busy after promotion).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from canary.observe.extract import parse_number
from canary.signals import is_token

__all__ = ["ArmCost", "Pricing", "RateEstimator", "cost_per_1000"]

_LN2 = math.log(2.0)


@dataclass(frozen=True, slots=True)
class Pricing:
    """An arm's pricing (the ``cost:`` block of an arm; field names match the config).

    Zero means "not priced". ``header`` names a response header carrying the endpoint's own
    cost figure for the request, added to the rest.
    """

    per_request: float = 0.0
    per_1k_tokens: float = 0.0
    per_hour: float = 0.0
    replicas: int = 1
    header: str | None = None

    def __post_init__(self) -> None:
        for name in ("per_request", "per_1k_tokens", "per_hour"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.replicas, int) and self.replicas >= 1):
            raise ValueError(f"replicas must be an integer >= 1, got {self.replicas!r}")
        if self.header is not None and not is_token(self.header):
            raise ValueError(f"header must be an HTTP header name, got {self.header!r}")

    @property
    def needs_tokens(self) -> bool:
        """True when the cost depends on the response's token count."""
        return self.per_1k_tokens > 0.0

    @property
    def per_second(self) -> float:
        """Fixed cost per second of all replicas."""
        return self.per_hour * self.replicas / 3600.0


class RateEstimator:
    """Exponentially decayed request rate, O(1) per tick, exact for a constant rate.

    Each tick adds 1 to a sum that decays with half-life ``h`` (``λ = ln 2 / h``). At a
    constant rate ``r`` started ``T`` seconds ago the sum is ``r (1 - e^{-λT}) / λ``, so

    ``rate = sum · λ / (1 - e^{-λ max(T, min_elapsed)})``

    is unbiased at every age: early on (``λT ≪ 1``) it is the elapsed-time rate
    ``n / max(T, min_elapsed)``, later the usual decayed rate. The floor ``min_elapsed`` keeps
    the first requests from seeing an absurd rate (one request after 1 ms is not 1000/s);
    during that first ``min_elapsed`` seconds the rate is underestimated (fixed costs
    overstated) when traffic is heavier than one request per ``min_elapsed``.

    ``share`` is the fraction of the rollout's traffic this estimator sees (``1/N`` for N
    workers behind SO_REUSEPORT): the rate is divided by it so every worker estimates the
    whole rollout's rate. ``start`` defaults to the first tick.
    """

    __slots__ = ("_lambda", "_last", "_start", "_sum", "count", "half_life", "min_elapsed", "share")

    def __init__(
        self,
        half_life: float = 30.0,
        *,
        min_elapsed: float = 1.0,
        share: float = 1.0,
        start: float | None = None,
    ) -> None:
        if not half_life > 0:
            raise ValueError(f"half_life must be positive, got {half_life!r}")
        if not min_elapsed > 0:
            raise ValueError(f"min_elapsed must be positive, got {min_elapsed!r}")
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share!r}")
        self.half_life = half_life
        self.min_elapsed = min_elapsed
        self.share = share
        self.count = 0  # ticks so far
        self._lambda = _LN2 / half_life
        self._sum = 0.0
        self._last = start
        self._start = start

    def tick(self, now: float, n: int = 1) -> None:
        """Count ``n`` requests at monotonic time ``now`` (seconds)."""
        last = self._last
        if last is None:
            self._start = self._last = now
            self._sum = float(n)
        elif now > last:
            self._sum = self._sum * math.exp(-self._lambda * (now - last)) + n
            self._last = now
        else:  # same instant, or a clock that stepped back: no decay
            self._sum += n
        self.count += n

    def rate(self, now: float) -> float:
        """Requests per second of the whole rollout at ``now``; 0.0 before the first tick."""
        last = self._last
        start = self._start
        if last is None or start is None or self._sum <= 0.0:
            return 0.0
        lam = self._lambda
        decayed = self._sum * math.exp(-lam * (now - last)) if now > last else self._sum
        elapsed = max(now - start, self.min_elapsed)
        return decayed * lam / -math.expm1(-lam * elapsed) / self.share


class ArmCost:
    """Cost of one request to an arm: its :class:`Pricing` and the rollout's shared rate.

    The proxy ticks the rollout's :class:`RateEstimator` once per client request (not for
    shadow mirrors, which are not extra traffic) and calls :meth:`cost` per response, or
    lets :meth:`ResponseInspector.finish` do it.
    """

    __slots__ = ("_header", "_per_request", "_per_second", "_per_token", "pricing", "rate")

    def __init__(self, pricing: Pricing, rate: RateEstimator) -> None:
        self.pricing = pricing
        self.rate = rate
        self._per_request = pricing.per_request
        self._per_token = pricing.per_1k_tokens / 1000.0
        self._per_second = pricing.per_second
        self._header = pricing.header.lower() if pricing.header else None

    def cost(
        self, now: float, tokens: float | None = None, headers: Mapping[str, str] | None = None
    ) -> float | None:
        """Cost of one request, or None when a priced component cannot be computed.

        A component that is configured but missing for this response (no token count, no
        cost header, no rate yet) makes the cost absent rather than silently lower: an arm
        must not look cheaper by not reporting. ``headers`` must look up names
        case-insensitively or have lower-case keys.
        """
        c = self._per_request
        if self._per_token:
            if tokens is None:
                return None
            c += self._per_token * tokens
        if self._header is not None:
            raw = headers.get(self._header) if headers is not None else None
            v = parse_number(raw) if raw is not None else None
            if v is None:
                return None
            c += v
        if self._per_second:
            r = self.rate.rate(now)
            if r <= 0.0:
                return None
            c += self._per_second / r
        return c


def cost_per_1000(cost_per_request: float) -> float:
    """Cost per 1000 inferences, the unit cost is reported in."""
    return 1000.0 * cost_per_request
