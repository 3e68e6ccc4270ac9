"""A lean HTTP/1.1 client for the proxy's upstream calls: asyncio.Protocol plus httptools.

The aiohttp client is general (redirects, cookies, tracing, decompression, proxies); the proxy
needs none of it, and its per-request machinery was a fifth of canary's CPU per request. This
transport keeps one pool of keep-alive connections per upstream origin and speaks plain
HTTP/1.1 on them; httptools (llhttp, the parser of Node.js) parses the responses. ``https``
endpoints go through :class:`~canary.proxy.aiohttp_transport.AiohttpTransport`.

Per request it does one write (head and a buffered body together), one parse per arriving
packet and, for a small response, no waiting beyond the first packet. Timeouts use one timer
per request that is re-armed lazily: arriving bytes only note the time, and the timer, when it
fires, checks whether the total or the read deadline has really passed.

Strictness (DESIGN.md "Bad input and failure", nginx 1.22 as the reference):

- A request is sent again on a fresh connection only when it provably did not reach the
  upstream (a kept-alive connection found closed, or with unexpected bytes, before writing is
  never written to) or when its method is idempotent (RFC 9110 9.2.2): a kept-alive
  connection that takes a POST and closes without a byte of answer gives an error, not a
  second delivery.
- Any byte that arrives while no response is expected (on an idle connection, or after the
  response ended, even in the same packet) marks the connection broken: it is closed, never
  reused, and the response already read stays as it was.
- Response heads are bounded (``Timeouts.max_head`` bytes for the status line, the fields and
  any interim 1xx heads together; ``Timeouts.max_fields`` fields), and so are trailers; a
  status outside 100-599 or an unsolicited ``101`` is a protocol error (502). Interim 1xx
  answers (100, 103, ...) are skipped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import select
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from canary.errors import CanaryError, ClientError, UpstreamError
from canary.proxy.aiohttp_transport import AiohttpTransport
from canary.proxy.upstream import (
    IDEMPOTENT_METHODS,
    Timeouts,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)

__all__ = ["H1Transport"]

_HIGH_WATER = 256 * 1024  # response bytes buffered before reading from the upstream pauses
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # send Content-Length: 0 when bodiless


class _Violation(CanaryError):
    """The upstream broke the protocol; the reason is in ``_Conn.failure``.

    Raised inside httptools' callbacks and caught in :meth:`_Conn.data_received`, where it
    becomes the response's :class:`UpstreamProtocolError`: it never leaves this module.
    """


class _Response:
    """One upstream response; fed by its :class:`_Conn`, read by the proxy."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_error",
        "_fields",
        "_framing",
        "_head",
        "_headers_waiter",
        "_interim",
        "_loop",
        "_raw",
        "_released",
        "_waiter",
        "complete",
        "deadline",
        "headers",
        "keep_alive",
        "last_activity",
        "progress",
        "reason",
        "received_any",
        "status",
        "timeouts",
    )

    def __init__(
        self,
        conn: _Conn,
        loop: asyncio.AbstractEventLoop,
        timeouts: Timeouts,
        head: bool,
    ) -> None:
        self._conn = conn
        self._loop = loop
        self.timeouts = timeouts
        now = loop.time()
        self.deadline = now + timeouts.total
        self.last_activity = now
        self._head = head
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = _EMPTY_HEADERS
        self._raw: list[tuple[str, str]] = []
        self._headers_waiter: asyncio.Future[None] | None = loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | ClientError | None = None  # ClientError: the body's
        self._interim = False
        self._released = False
        self.complete = False
        self.keep_alive = False
        self.received_any = False
        self._framing = 0  # bytes fed since the last progress (final head or body bytes)
        self._fields = 0  # header fields of the current head, or trailer fields
        self.progress = False

    # -- fed by the connection ------------------------------------------------------------

    def _headers_complete(self, status: int) -> None:
        self._fields = 0
        if 100 <= status < 200:  # 100 Continue, 103 Early Hints & co: the answer follows
            self._interim = True
            self._raw = []
            return
        self.progress = True
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict(self._raw))
        self._raw = []
        if self._head:  # a HEAD answer has no body, whatever its Content-Length says
            self.complete = True
        w = self._headers_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _body(self, data: bytes) -> None:
        if self.complete:
            return
        self.progress = True
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
        self._wake()

    def _fail(self, error: UpstreamError | ClientError) -> None:
        if self.complete or self._error is not None:
            return
        self._error = error
        w = self._headers_waiter
        if w is not None and not w.done():
            w.set_result(None)
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    # -- read by the proxy ----------------------------------------------------------------

    async def _wait_headers(self) -> None:
        w = self._headers_waiter
        if w is not None and not w.done():
            await w
        self._headers_waiter = None
        if self._error is not None and not self.status:
            raise self._error

    async def read(self) -> bytes:
        while not self.complete:
            if self._error is not None:
                raise self._error
            await self._wait_data()
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        chunks = self._chunks
        while True:
            if chunks:
                chunk = chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered <= _HIGH_WATER // 4:
                    self._conn.resume()
                yield chunk
            elif self.complete:
                return
            elif self._error is not None:
                raise self._error
            else:
                await self._wait_data()

    async def _wait_data(self) -> None:
        w = self._waiter = self._loop.create_future()
        await w

    def close(self) -> None:
        if self._released:
            return
        self._released = True
        self._conn.release(self)


_EMPTY_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class _Conn(asyncio.Protocol):
    """One keep-alive connection to an upstream origin."""

    __slots__ = (
        "_drain",
        "_paused_reading",
        "_paused_writing",
        "_poller",
        "_timer",
        "closed",
        "failure",
        "idle_since",
        "loop",
        "parser",
        "pool",
        "resp",
        "transport",
        "writing",
    )

    def __init__(self, pool: _Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: _Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._paused_reading = False
        self._paused_writing = False
        self._drain: asyncio.Future[None] | None = None
        self._poller: select.poll | None = None
        self.writing = False  # a streamed request body is still being sent
        self.failure = ""  # why the upstream's bytes were refused (for the error message)

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._poller = select.poll()
            self._poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)

    def data_received(self, data: bytes) -> None:
        r = self.resp
        if r is None or r.complete:
            # Bytes nobody asked for (while idle, or after the response ended): the
            # connection's framing is lost. The response already read stays as it was.
            self.abort()
            return
        r.last_activity = self.loop.time()
        r.received_any = True
        try:
            self._feed(r, data)
        except httptools.HttpParserUpgrade:
            r._fail(UpstreamProtocolError("upstream switched protocols"))
            self.abort()
        except (httptools.HttpParserError, _Violation) as exc:
            r._fail(UpstreamProtocolError(self.failure or f"invalid HTTP response: {exc}"))
            self.abort()

    def _feed(self, r: _Response, data: bytes) -> None:
        """Parse ``data``, never holding more than ``max_head`` bytes of a head or trailers.

        httptools buffers a header field until it ends, so the limit is enforced on what is
        fed: at most the room left since the last progress (the end of the final head, or
        body bytes) is parsed before the head or trailers must have made progress.
        """
        limit = r.timeouts.max_head
        parser = self.parser
        while data:
            room = limit - r._framing
            piece = data if len(data) <= room else data[:room]
            r.progress = False
            parser.feed_data(piece)
            if r.progress:
                r._framing = 0
            else:
                r._framing += len(piece)
                if r._framing >= limit:
                    self._violation(f"upstream response head exceeds {limit} bytes")
            data = data[len(piece) :]
            if data and (r.complete or self.closed or r._error is not None):
                self.abort()  # bytes after the end of the response: never reuse it
                return

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        self.pool.lost(self)
        r = self.resp
        if r is not None and not r.complete:
            if r.status and r._error is None and _delimited_by_close(r.headers):
                r._message_complete()  # llhttp cannot be told about EOF: the close is the end
            else:
                r._fail(UpstreamReset(str(exc) if exc else "upstream closed the connection"))
        d = self._drain
        if d is not None and not d.done():
            d.set_result(None)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        d = self._drain
        if d is not None and not d.done():
            d.set_result(None)

    # -- httptools callbacks --------------------------------------------------------------

    def _violation(self, reason: str) -> None:
        """Refuse the upstream's bytes: the response fails with ``reason`` (a 502)."""
        self.failure = reason
        raise _Violation(reason)

    def on_message_begin(self) -> None:
        r = self.resp
        if r is None or r.complete or r.status:
            # A second response to one request (bytes after the end of the answer)
            self._violation("upstream sent bytes after the end of its response")

    def on_status(self, status: bytes) -> None:
        if self.resp is not None:
            self.resp.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        r = self.resp
        if r is not None:
            r._fields += 1
            if r._fields > r.timeouts.max_fields:
                self._violation(f"upstream response has more than {r.timeouts.max_fields} fields")
            r._raw.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        r = self.resp
        if r is None:
            return
        status = self.parser.get_status_code()
        if not 100 <= status <= 599:
            self._violation(f"upstream sent an invalid status code {status:03d}")
        if status == 101:  # canary never forwards Upgrade: nobody asked to switch
            self._violation("upstream switched protocols (101) unasked")
        r._headers_complete(status)

    def on_body(self, body: bytes) -> None:
        if self.resp is not None:
            self.resp._body(body)

    def on_message_complete(self) -> None:
        if self.resp is not None:
            # llhttp answers this only while the message is current, not after it
            self.resp.keep_alive = self.parser.should_keep_alive()
            self.resp._message_complete()

    # -- used by the transport and the response -------------------------------------------

    async def drain(self) -> None:
        if self._paused_writing and not self.closed:
            self._drain = self.loop.create_future()
            await self._drain

    def pause(self) -> None:
        if not self._paused_reading and self.transport is not None and not self.closed:
            self._paused_reading = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused_reading and self.transport is not None and not self.closed:
            self._paused_reading = False
            self.transport.resume_reading()

    def start_timer(self) -> None:
        r = self.resp
        assert r is not None
        self._timer = self.loop.call_at(self._due(r), self._on_timer)

    def _due(self, r: _Response) -> float:
        read = r.timeouts.read
        if read is None:
            return r.deadline
        return min(r.deadline, r.last_activity + read)

    def _on_timer(self) -> None:
        self._timer = None
        r = self.resp
        if r is None or (r.complete and r.status):
            return
        now = self.loop.time()
        due = self._due(r)
        if now + 0.001 < due:  # bytes arrived since: the read deadline moved on
            self._timer = self.loop.call_at(due, self._on_timer)
            return
        what = "total" if now + 0.001 >= r.deadline else "read"  # timers may fire 1 ms early
        r._fail(UpstreamTimeout(f"upstream {what} timeout"))
        self.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def release(self, r: _Response) -> None:
        """The proxy is done with ``r``: keep the connection when it can carry another."""
        self._cancel_timer()
        if self.resp is not r:
            return
        self.resp = None
        if (
            self.closed
            or not r.complete
            or r._error is not None
            or r._head
            or self.writing
            or not r.keep_alive
        ):
            self.abort()
            return
        self.resume()
        self.pool.put_back(self)

    def usable(self) -> bool:
        """True when an idle kept-alive connection can take a request: nothing arrived on it
        while idle, neither bytes nor a close. The socket itself is asked (one ``poll``), as
        the loop may not have seen a close that is already there; a connection found closed
        here was never written to, so any request may go on another one."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        poller = self._poller
        return poller is None or not poller.poll(0)

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()  # no lingering: a half-read response is worthless
        self.closed = True


class _Pool:
    """Keep-alive connections to one origin, at most ``limit`` open at once."""

    __slots__ = ("_idle", "_waiters", "host", "idle_timeout", "limit", "loop", "open", "port")

    def __init__(
        self, host: str, port: int, limit: int, idle_timeout: float, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.host = host
        self.port = port
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.loop = loop
        self.open = 0
        self._idle: list[_Conn] = []
        self._waiters: collections.deque[asyncio.Future[_Conn | None]] = collections.deque()

    async def acquire(self, connect_timeout: float, fresh: bool) -> tuple[_Conn, bool]:
        """A connection and whether it was reused; ``fresh`` skips idle ones."""
        idle = self._idle
        now = self.loop.time()
        while idle and not fresh:
            conn = idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > self.idle_timeout or not conn.usable():
                conn.abort()
                continue
            return conn, True
        while self.open >= self.limit:
            waiter: asyncio.Future[_Conn | None] = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    got = waiter.result()
                    if got is not None:
                        self.put_back(got)
                raise
            if handed is not None:
                if handed.usable():
                    return handed, True
                handed.abort()
        self.open += 1
        try:
            async with asyncio.timeout(connect_timeout):
                _, proto = await self.loop.create_connection(
                    lambda: _Conn(self, self.loop), self.host, self.port
                )
        except BaseException as exc:
            self.open -= 1
            self._wake_one()
            if isinstance(exc, TimeoutError):
                raise UpstreamConnectTimeout(
                    f"connect to {self.host}:{self.port} timed out after {connect_timeout:g}s"
                ) from None
            if isinstance(exc, OSError):
                raise UpstreamConnectError(
                    f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"
                ) from None
            raise
        return proto, False

    def put_back(self, conn: _Conn) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(conn)
                return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)

    def lost(self, conn: _Conn) -> None:
        self.open -= 1
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)  # a slot is free: the waiter opens a connection
                return

    def close(self) -> None:
        for conn in self._idle:
            conn.abort()
        self._idle.clear()


class H1Transport:
    """:class:`~canary.proxy.upstream.Transport` over plain HTTP/1.1 keep-alive connections."""

    def __init__(self, limit_per_host: int = 256, idle_timeout: float = 30.0) -> None:
        self._limit = limit_per_host
        self._idle_timeout = idle_timeout
        self._pools: dict[str, _Pool] = {}
        self._tls: AiohttpTransport | None = None

    def _pool(self, origin: str) -> _Pool:
        pool = self._pools.get(origin)
        if pool is None:
            parts = urlsplit("http://" + origin)
            pool = self._pools[origin] = _Pool(
                parts.hostname or origin,
                parts.port or 80,
                self._limit,
                self._idle_timeout,
                asyncio.get_running_loop(),
            )
        return pool

    async def send(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None,
        timeouts: Timeouts,
    ) -> _Response:
        if not url.startswith("http://"):
            if self._tls is None:
                self._tls = AiohttpTransport(limit_per_host=self._limit)
            return await self._tls.send(method, url, headers, body, timeouts)  # type: ignore[return-value]
        slash = url.find("/", 7)
        origin, target = (url[7:], "/") if slash < 0 else (url[7:slash], url[slash:])
        pool = self._pool(origin)
        lines = [f"{method} {target} HTTP/1.1\r\n"]
        lines.extend(f"{k}: {v}\r\n" for k, v in headers)
        streamed = body is not None and not isinstance(body, bytes)
        if isinstance(body, bytes):
            if body or method in _BODY_METHODS:
                lines.append(f"Content-Length: {len(body)}\r\n")
        elif body is None:
            if method in _BODY_METHODS:
                lines.append("Content-Length: 0\r\n")
        else:
            lines.append("Transfer-Encoding: chunked\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        is_head = method == "HEAD"
        idempotent = method in IDEMPOTENT_METHODS
        loop = asyncio.get_running_loop()
        fresh = False
        while True:
            conn, reused = await pool.acquire(timeouts.connect, fresh)
            resp = conn.resp = _Response(conn, loop, timeouts, is_head)
            conn.start_timer()
            writer: asyncio.Task[None] | None = None
            assert conn.transport is not None
            if streamed:
                conn.transport.write(head)
                assert body is not None and not isinstance(body, bytes)
                writer = loop.create_task(_write_chunked(conn, resp, body))
            else:
                conn.transport.write(head + body if isinstance(body, bytes) else head)
            try:
                await resp._wait_headers()
            except BaseException as exc:
                resp.close()
                if writer is not None:
                    writer.cancel()
                if isinstance(exc, UpstreamReset) and reused and not resp.received_any:
                    # A kept-alive connection closed without a byte of answer: the upstream
                    # may have closed it while idle, or read the request and died. Only an
                    # idempotent request may be sent again (once, on a new connection).
                    if idempotent and not streamed and not fresh:
                        fresh = True
                        continue
                    if not idempotent:
                        raise UpstreamReset(
                            f"{exc} (a kept-alive connection took the request and closed; "
                            f"{method} is not idempotent, so it is not sent again)"
                        ) from None
                raise
            return resp

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        if self._tls is not None:
            await self._tls.close()
            self._tls = None


async def _write_chunked(conn: _Conn, resp: _Response, body: AsyncIterable[bytes]) -> None:
    """Send a streamed request body with chunked framing, honouring the socket's back-pressure."""
    transport = conn.transport
    assert transport is not None
    conn.writing = True
    try:
        async for chunk in body:
            if conn.closed:
                return
            if chunk:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                await conn.drain()
        if not conn.closed:
            transport.write(b"0\r\n\r\n")
    except (ClientError, UpstreamError) as exc:  # the client's body failed: the request is void
        resp._fail(exc)
        conn.abort()
    except (ConnectionError, OSError) as exc:
        resp._fail(UpstreamReset(f"client body stream failed: {exc}"))
        conn.abort()
    finally:
        conn.writing = False


def _delimited_by_close(headers: CIMultiDictProxy[str]) -> bool:
    """True when a response body has no length and is not chunked: it ends with the connection."""
    if "Content-Length" in headers:
        return False
    return "chunked" not in headers.get("Transfer-Encoding", "").lower()
