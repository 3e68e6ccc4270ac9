"""The data plane: canary's own HTTP/1.1 server (:mod:`~canary.proxy.h1_server`) and upstream
client (:class:`H1Transport`), both on httptools (llhttp) under uvloop; the request handler
(:class:`Proxy`: route, arm choice, forwarding and streaming, failover, shadow mirroring, one
observation per request); upstream pools and the :class:`Transport` interface.

``https`` upstreams go through :class:`AiohttpTransport`, to which :class:`H1Transport` hands
them. Nothing here imports the controller or the admin API: the runtime wires them together.
"""

from canary.proxy.aiohttp_transport import AiohttpTransport
from canary.proxy.h1_server import HttpServer, ServerLimits
from canary.proxy.h1_transport import H1Transport
from canary.proxy.server import Proxy
from canary.proxy.upstream import Timeouts, Transport, UpstreamResponse

__all__ = [
    "AiohttpTransport",
    "H1Transport",
    "HttpServer",
    "Proxy",
    "ServerLimits",
    "Timeouts",
    "Transport",
    "UpstreamResponse",
]
