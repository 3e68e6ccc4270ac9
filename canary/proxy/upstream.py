"""Upstream pools, the transport interface the proxy forwards through, and its errors.

The proxy's logic (routing, failover, observation) talks to a :class:`Transport`, never to a
client library: :class:`~canary.proxy.h1_transport.H1Transport` (canary's own HTTP/1.1
client) in production, and the aiohttp one it hands ``https`` endpoints to, are tested
against the same conformance suite (DESIGN.md "Data plane notes").
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from multidict import CIMultiDictProxy

from canary.errors import ClientError, UpstreamError

__all__ = [
    "DEFAULT_MAX_FIELDS",
    "DEFAULT_MAX_HEAD",
    "IDEMPOTENT_METHODS",
    "RequestBodyTooLarge",
    "Timeouts",
    "Transport",
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamReset",
    "UpstreamResponse",
    "UpstreamTimeout",
    "never_sent",
]


class UpstreamConnectError(UpstreamError):
    """No connection could be made (refused, unreachable, DNS): nothing reached the upstream."""

    kind = "connect"


class UpstreamTimeout(UpstreamError):
    """Connect, read or total timeout."""

    kind = "timeout"


class UpstreamConnectTimeout(UpstreamTimeout):
    """The connection was not made in time: nothing reached the upstream."""


class UpstreamReset(UpstreamError):
    """The upstream closed the connection before or while answering."""

    kind = "reset"


class UpstreamProtocolError(UpstreamError):
    """The upstream answered with something that is not valid HTTP."""

    kind = "protocol"


class RequestBodyTooLarge(ClientError):
    """The client's request body exceeded the configured limit while it was streamed.

    Raised by the body iterator the proxy hands a transport; the transport raises it as it is
    (or the proxy finds it again, when a client library wraps it): the upstream is not at fault.
    """

    status = 413
    kind = "too_large"


# RFC 9110 9.2.2: a client may repeat these automatically (aiohttp and nginx use this set).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

DEFAULT_MAX_HEAD = 64 * 1024  # bytes of a response head (status line, fields, interim heads)
DEFAULT_MAX_FIELDS = 100  # header fields of one response head (and of its trailers)


def never_sent(exc: BaseException) -> bool:
    """True when ``exc`` proves that no byte of the request reached the upstream.

    Only then may any request, whatever its method, be sent again elsewhere (a failover of a
    POST); after a reset, a timeout or an answer the upstream may have processed it.
    """
    return isinstance(exc, UpstreamConnectError | UpstreamConnectTimeout)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Timeouts and response limits of one upstream call (one value per route, hashable)."""

    total: float
    connect: float
    read: float | None
    max_head: int = DEFAULT_MAX_HEAD  # a bigger response head is a protocol error (502)
    max_fields: int = DEFAULT_MAX_FIELDS  # more header (or trailer) fields: protocol error


class UpstreamResponse(Protocol):
    """A response whose headers have arrived; the body is read with :meth:`chunks`."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]  # case-insensitive, repeated fields kept in order

    async def read(self) -> bytes:
        """The whole body (for small bodies of known length); raises like :meth:`chunks`."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; raises an :class:`UpstreamError` subclass on failure."""
        ...

    def close(self) -> None:
        """Release the connection (drop it when the body was not read to the end)."""
        ...


class Transport(Protocol):
    """Send one HTTP request upstream."""

    async def send(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None,
        timeouts: Timeouts,
    ) -> UpstreamResponse:
        """Send a request; raise an :class:`UpstreamError` subclass when no response arrives.

        A :class:`~canary.errors.ClientError` that iterating a streamed ``body`` raises (the
        client's body failed) is raised as it is, or wrapped in an :class:`UpstreamError`;
        after the response head, :meth:`UpstreamResponse.chunks` may raise it too.
        A transport may send the request again on a fresh connection only when it provably
        did not reach the upstream, or when ``method`` is in :data:`IDEMPOTENT_METHODS`.
        """
        ...

    async def close(self) -> None: ...


class UpstreamPool:
    """Round-robin over one arm's endpoints, skipping endpoints that just failed to connect.

    Passive health only: an endpoint that refused a connection is skipped for ``cooldown``
    seconds unless every endpoint is cooling down (then all are tried, so that a recovered
    pool is found again without waiting).
    """

    __slots__ = ("_down_until", "_next", "cooldown", "endpoints")

    def __init__(self, endpoints: Sequence[str], cooldown: float = 2.0) -> None:
        if not endpoints:
            raise ValueError("an upstream pool needs at least one endpoint")
        self.endpoints = tuple(endpoints)
        self.cooldown = cooldown
        self._next = 0
        self._down_until = [0.0] * len(self.endpoints)

    def pick(self) -> int:
        n = len(self.endpoints)
        if n == 1:
            return 0
        now = time.monotonic()
        for _ in range(n):
            i = self._next
            self._next = (i + 1) % n
            if self._down_until[i] <= now:
                return i
        i = self._next
        self._next = (i + 1) % n
        return i

    def mark_down(self, index: int) -> None:
        self._down_until[index] = time.monotonic() + self.cooldown

    def healthy_count(self) -> int:
        now = time.monotonic()
        return sum(1 for t in self._down_until if t <= now)
