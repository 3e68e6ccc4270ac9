"""The aiohttp implementation of :class:`~canary.proxy.upstream.Transport`: canary's client
for ``https`` upstreams.

In production it serves only ``https`` endpoints: :class:`~canary.proxy.h1_transport.H1Transport`
speaks plain HTTP/1.1 itself and hands every other URL to one instance of this transport
(TLS verified against the system's trust store, aiohttp's default). The conformance tests
run both transports on the same upstream scenarios, so this one is also the reference the
lean client is checked against.

aiohttp's client defaults corrupt a pass-through proxy (DESIGN.md "Data plane notes"): it
asks for gzip by itself, decompresses and leaves ``Content-Encoding`` in place, adds its own
User-Agent and Content-Type, and shares cookies between users. All of that is turned off here.

Strictness as in :mod:`canary.proxy.h1_transport`: aiohttp repeats a request on a fresh
connection only for idempotent methods (RFC 9110 9.2.2), closes a connection that received
bytes beyond its response, and skips interim 1xx answers; here the response head is bounded
(``max_fields`` fields of at most ``max_head`` bytes each, aiohttp bounds per field) and a
status outside 100-599 or an unsolicited 101 is refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Sequence

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from canary.errors import UpstreamError
from canary.proxy.upstream import (
    Timeouts,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)

__all__ = ["AiohttpTransport"]


def _translate(exc: BaseException) -> UpstreamError:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # nothing reached the upstream
        return UpstreamConnectTimeout(str(exc) or "connect to the upstream timed out")
    if isinstance(exc, asyncio.TimeoutError):  # also aiohttp.ServerTimeoutError
        return UpstreamTimeout(str(exc) or "upstream timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectError(str(exc))
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return UpstreamReset(str(exc) or "upstream closed the connection")
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamProtocolError(str(exc))
    if isinstance(exc, aiohttp.ClientOSError | ConnectionError):
        return UpstreamReset(str(exc))
    return UpstreamProtocolError(f"{type(exc).__name__}: {exc}")


class _Response:
    __slots__ = ("_done", "_resp", "headers", "reason", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.reason = resp.reason or ""
        self.headers = resp.headers
        self._done = False

    async def read(self) -> bytes:
        try:
            data = await self._resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _translate(exc) from exc
        self._done = True
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        content = self._resp.content
        try:
            while True:
                # readany() returns whatever has arrived: no re-chunking, no waiting for more
                chunk = await content.readany()
                if not chunk:
                    break
                yield chunk
            self._done = True
        except UpstreamError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _translate(exc) from exc

    def close(self) -> None:
        if self._done:
            self._resp.release()
        else:
            self._resp.close()  # body not read to the end: the connection cannot be reused


class AiohttpTransport:
    """One ClientSession with a bounded keep-alive connection pool, shared by all arms."""

    def __init__(self, limit: int = 1024, limit_per_host: int = 256) -> None:
        self._limit = limit
        self._limit_per_host = limit_per_host
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}
        self._urls: dict[str, URL] = {}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._limit,
                limit_per_host=self._limit_per_host,
                ttl_dns_cache=60,
                keepalive_timeout=30,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None),
                raise_for_status=False,
            )
        return self._session

    def _url(self, url: str) -> URL:
        """Parsed upstream URL, cached: model endpoints see a handful of distinct paths."""
        target = self._urls.get(url)
        if target is None:
            if len(self._urls) >= 1024:
                self._urls.clear()
            target = self._urls[url] = URL(url, encoded=True)
        return target

    async def send(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None,
        timeouts: Timeouts,
    ) -> _Response:
        session = self._get_session()
        timeout = self._timeouts.get(timeouts)
        if timeout is None:  # one per distinct config, not one per request
            timeout = self._timeouts[timeouts] = aiohttp.ClientTimeout(
                total=timeouts.total, sock_connect=timeouts.connect, sock_read=timeouts.read
            )
        try:
            resp = await session.request(
                method,
                self._url(url),  # forward the path's bytes exactly as the client sent them
                headers=CIMultiDict(headers),
                data=body,
                timeout=timeout,
                allow_redirects=False,
                compress=None,
                chunked=None,
                max_line_size=timeouts.max_head,
                max_field_size=timeouts.max_head,
                max_headers=timeouts.max_fields,
            )
        except UpstreamError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _translate(exc) from exc
        if not 100 <= resp.status <= 599 or resp.status == 101:
            resp.close()  # the connection is not reused
            if resp.status == 101:
                raise UpstreamProtocolError("upstream switched protocols (101) unasked")
            raise UpstreamProtocolError(f"upstream sent an invalid status code {resp.status:03d}")
        return _Response(resp)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
