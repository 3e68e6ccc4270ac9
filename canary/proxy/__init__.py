"""aiohttp data plane: routing, forwarding and streaming, upstream pools, failover."""

from canary.observe import Weights
from canary.proxy.aiohttp_transport import AiohttpTransport
from canary.proxy.h1_transport import H1Transport
from canary.proxy.routing import CANDIDATE, PRODUCTION, Choice, sticky_point
from canary.proxy.server import Proxy, initial_weights
from canary.proxy.upstream import Timeouts, Transport, UpstreamPool, UpstreamResponse

__all__ = [
    "CANDIDATE",
    "PRODUCTION",
    "AiohttpTransport",
    "Choice",
    "H1Transport",
    "Proxy",
    "Timeouts",
    "Transport",
    "UpstreamPool",
    "UpstreamResponse",
    "Weights",
    "initial_weights",
    "sticky_point",
]
