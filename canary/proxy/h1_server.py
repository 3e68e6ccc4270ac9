"""The proxy port's HTTP/1.1 server: an asyncio Protocol on httptools' parser.

The other half of :mod:`canary.proxy.h1_transport` (DESIGN.md "Data plane notes"): aiohttp's
server builds a request object, a stream reader, a response object and a payload writer per
request, and was a quarter of the proxy's CPU per request. This server keeps one
:class:`HttpRequest` per request (it is also the response writer), answers a small body with
one write, and still does what the proxy port needs:

* keep-alive and pipelining (requests on one connection are answered in order);
* request bodies buffered or streamed, with back-pressure (reading pauses while a body waits
  for its consumer), ``Expect: 100-continue``;
* responses with a Content-Length, chunked, or delimited by close (HTTP/1.0 clients), HEAD;
* limits: the request line and each header field are bounded by ``max_header_size``, the
  whole head by four times that (431, as nginx's default four large header buffers), a head
  that takes longer than ``client_timeout`` gets 408, idle keep-alive connections close after
  ``keepalive_timeout``; malformed requests get 400 and the connection is closed;
* framing as strict as nginx and RFC 9112 (see :func:`_check_head`): one Content-Length
  or one ``Transfer-Encoding: chunked`` and nothing else, no Transfer-Encoding in
  HTTP/1.0, exactly one valid Host in HTTP/1.1; every refusal closes the connection.
  httptools' llhttp runs strict (no ``set_dangerous_leniencies``) and refuses by itself bare
  LF or CR, obs-fold, NUL and other controls, bad tokens, a duplicate or malformed
  Content-Length, Content-Length with Transfer-Encoding, ``chunked`` not last, bad chunk
  sizes, extensions and trailers, and bytes after ``Connection: close``; it accepts what
  :func:`_check_head` refuses (a coding before a final ``chunked``, a second
  Transfer-Encoding or Host field, Transfer-Encoding in HTTP/1.0, no Host, HTTP/0.9 and 2.0
  request lines);
* HTTP/2 is not spoken here (docs/protocols.md): a prior-knowledge h2c or gRPC client's
  connection preface (``PRI * HTTP/2.0``) gets 505 as soon as its request line is read, which
  gRPC reports as "Trying to connect an http1.x server (HTTP status 505)"; a request asking
  for an upgrade (``Upgrade: h2c`` or ``websocket``) is served as plain HTTP/1.1 without it,
  its body included (Java's HttpClient and ``curl --http2`` send ``POST`` with a body and
  ``Upgrade: h2c``), and the connection is closed after the answer;
* a graceful stop: no new connections, idle ones closed, in-flight requests finish.

Nothing here knows about rollouts: the handler (``Proxy.handle``) gets the request and must
answer it through :meth:`HttpRequest.respond` or :meth:`HttpRequest.start` /
:meth:`HttpRequest.write` / :meth:`HttpRequest.finish`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast
from urllib.parse import unquote

import httptools

from canary.errors import ClientError
from canary.proxy.headers import request_id

__all__ = [
    "NO_BODY_STATUSES",
    "BadRequestBody",
    "Handler",
    "HttpRequest",
    "HttpServer",
    "HttpServerProtocol",
    "RequestHeaders",
    "ServerLimits",
    "error_body",
    "valid_host",
]

log = logging.getLogger("canary.proxy.server")

_BODY_HIGH_WATER = 256 * 1024  # buffered request body bytes before reading pauses
NO_BODY_STATUSES = frozenset({204, 304})  # never a body (RFC 9110 sections 15.3.5, 15.4.5)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LINGER = 2.0  # seconds an unread request body is read and dropped after the answer
_MAX_PIPELINED = 16  # requests waiting behind the one being answered before reading pauses
_NO_H2 = "HTTP/2 (h2c prior knowledge, gRPC) is not supported on this port: use HTTP/1.1"


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _head(status: int, reason: str, headers: Iterable[tuple[str, str]], extra: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason or _reason(status)}"]
    lines.extend(f"{k}: {v}" for k, v in headers)
    return "\r\n".join(lines).encode("latin-1", "replace") + b"\r\n" + extra + b"\r\n"


def error_body(status: int, message: str, rid: str) -> bytes:
    """The small JSON body of every answer the proxy gives itself."""
    return json.dumps({"error": message, "status": status, "request_id": rid}).encode()


def _error_headers(rid: str, arm: str | None = None) -> list[tuple[str, str]]:
    headers = [("Content-Type", "application/json"), ("X-Request-Id", rid)]
    if arm is not None:
        headers.append(("X-Canary-Arm", arm))
    return headers


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_header_size: int = 16 * 1024  # the request line, each header field; the head: 4x
    client_timeout: float = 60.0  # to receive a request's head
    keepalive_timeout: float = 75.0  # an idle keep-alive connection is closed after this


class RequestHeaders:
    """A request's headers in arrival order, with a case-insensitive :meth:`get`."""

    __slots__ = ("_first", "_items")

    def __init__(self, items: list[tuple[str, str]], first: dict[str, str]) -> None:
        self._items = items
        self._first = first

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._first.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._first

    def items(self) -> list[tuple[str, str]]:
        return self._items

    def __len__(self) -> int:
        return len(self._items)


class HttpRequest:
    """One request on a connection, and the writer of its response.

    The body is buffered by the connection as it arrives; the handler takes it whole
    (:meth:`body_complete` / :meth:`take_body` / :meth:`read_body`) or in pieces
    (:meth:`read_chunk`).
    """

    __slots__ = (
        "_body",
        "_body_done",
        "_body_size",
        "_chunked",
        "_conn",
        "_continue",
        "_discard",
        "_error",
        "_length",
        "_no_body",
        "_waiter",
        "_written",
        "body_exists",
        "content_length",
        "headers",
        "host",
        "keep_alive",
        "method",
        "raw_path",
        "remote",
        "response_state",
        "version",
    )

    scheme = "http"  # the proxy port does not terminate TLS

    def __init__(
        self,
        conn: HttpServerProtocol,
        method: str,
        raw_path: str,
        version: str,
        headers: RequestHeaders,
        keep_alive: bool,
        content_length: int | None,
        chunked: bool,
    ) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.headers = headers
        self.host = (headers.get("host") or "").rstrip(" \t")  # llhttp keeps trailing OWS
        self.remote = conn.remote
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.body_exists = chunked or bool(content_length)
        self._body: list[bytes] = []
        self._body_size = 0
        self._body_done = not self.body_exists
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None  # why the rest of the body will never come
        expect = headers.get("expect")
        self._continue = (
            expect is not None and expect.lower() == "100-continue" and version != "1.0"
        )
        self._discard = False  # answered already: the rest of the body is dropped
        self._chunked = False  # the response's framing
        self._no_body = False
        self._length: int | None = None  # the streamed response's Content-Length
        self._written = 0
        self.response_state = 0  # 0 not started, 1 head sent, 2 done

    @property
    def path(self) -> str:
        """The path without the query, percent-decoded and with dot segments resolved (what
        routing matches; the upstream gets :attr:`raw_path` untouched)."""
        path = self.raw_path.partition("?")[0]
        if "%" in path or "/." in path:
            path = _normalise(unquote(path))
        return path

    # -- the request body ---------------------------------------------------------------

    def body_complete(self) -> bool:
        return self._body_done

    def take_body(self) -> bytes:
        """Everything buffered so far (the whole body once :meth:`body_complete`)."""
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body.clear()
        self._consumed()
        return body

    async def read_body(self) -> bytes:
        """The whole body; ConnectionError if the client goes away first."""
        while not self._body_done:
            await self._wait()
        return self.take_body()

    async def read_chunk(self) -> bytes:
        """The next piece of the body; b"" at its end; ConnectionError if the client goes."""
        while not self._body and not self._body_done:
            await self._wait()
        if not self._body:
            return b""
        return self.take_body()

    async def _wait(self) -> None:
        conn = self._conn
        if self._error is not None:
            raise self._error
        if conn.lost or conn.eof:
            raise ConnectionResetError("client disconnected while sending the request body")
        if self._continue and self.response_state == 0:
            self._continue = False
            conn.write(_CONTINUE)
        conn.resume_body()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _consumed(self) -> None:
        self._body_size = 0  # everything buffered was taken
        self._conn.resume_body()

    def _feed(self, data: bytes) -> None:
        if self._discard:
            return
        self._body.append(data)
        self._body_size += len(data)
        if self._body_size >= _BODY_HIGH_WATER:
            self._conn.pause_body()
        self._wake()

    def _done(self) -> None:
        self._body_done = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _lost(self) -> None:
        self._fail(ConnectionResetError("client disconnected while sending the request body"))

    def _fail(self, error: Exception) -> None:
        if self._body_done or self._error is not None:
            return
        self._error = error
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(error)

    # -- the response -------------------------------------------------------------------

    def respond(
        self, status: int, reason: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> None:
        """The whole response in one write (Content-Length added)."""
        if self.response_state != 0:
            raise RuntimeError("response already started")
        self.response_state = 2
        conn = self._conn
        if conn.lost:
            return  # nobody to answer; the caller has recorded what it needed
        if status in NO_BODY_STATUSES or status < 200:
            conn.write(_head(status, reason, headers, self._connection_header()))
            return
        extra = b"Content-Length: %d\r\n" % len(body) + self._connection_header()
        head = _head(status, reason, headers, extra)
        conn.write(head if self.method == "HEAD" else head + body)

    def respond_error(self, status: int, message: str, rid: str, arm: str | None = None) -> None:
        """One of the proxy's own answers: a small JSON body with the request id."""
        self.respond(status, "", _error_headers(rid, arm), error_body(status, message, rid))

    async def start(
        self, status: int, reason: str, headers: Iterable[tuple[str, str]], length: int | None
    ) -> None:
        """Send the head of a streamed response; the body follows with :meth:`write`.

        ``length`` is the body's size when known; otherwise the body is sent chunked, or
        delimited by closing the connection for an HTTP/1.0 client.
        """
        if self.response_state != 0:
            raise RuntimeError("response already started")
        conn = self._conn
        if conn.lost:
            raise ConnectionResetError("client disconnected")
        self.response_state = 1
        no_body = self.method == "HEAD" or status in NO_BODY_STATUSES or status < 200
        self._no_body = no_body
        self._length = None if no_body else length
        if length is not None and status != 204 and status >= 200:
            extra = b"Content-Length: %d\r\n" % length
        elif no_body:
            extra = b""
        elif self.version == "1.1":
            extra = b"Transfer-Encoding: chunked\r\n"
            self._chunked = True
        else:
            extra = b""
            self.keep_alive = False  # the end of the body is the end of the connection
        conn.write(_head(status, reason, headers, extra + self._connection_header()))
        await conn.drain()

    async def write(self, data: bytes) -> None:
        if not data or self._no_body:
            return  # HEAD, 204, 304: whatever the upstream sent, the client gets no body
        conn = self._conn
        if conn.lost:
            raise ConnectionResetError("client disconnected")
        self._written += len(data)
        if self._chunked:
            conn.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            conn.write(data)
        await conn.drain()

    async def finish(self) -> None:
        if self.response_state != 1:
            raise RuntimeError("response not started or already finished")
        self.response_state = 2
        conn = self._conn
        if self._length is not None and self._written != self._length:
            # fewer (or more) bytes than the Content-Length said: the connection is out of step
            self.abort()
            return
        if self._chunked and not conn.lost:
            conn.write(b"0\r\n\r\n")
        await conn.drain()

    def abort(self) -> None:
        """Cut the connection: the only signal left once the head is out and the body fails."""
        self.keep_alive = False
        self.response_state = 2
        self._conn.abort()

    def _connection_header(self) -> bytes:
        if not self.keep_alive or not self._body_done or self._conn.last_answer():
            # An unread body would be read as the next request: close after this answer.
            self.keep_alive = False
            return b"Connection: close\r\n"
        if self.version == "1.0":
            return b"Connection: keep-alive\r\n"
        return b""


def _origin_form(target: str) -> tuple[str, str]:
    """``http://host/p?q`` -> (``/p?q``, ``host``); a server must accept absolute-form."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise httptools.HttpParserError("the request target must be a path or an http URL")
    slash = rest.find("/")
    query = rest.find("?")
    cut = min(i for i in (slash, query, len(rest)) if i >= 0)
    path = rest[cut:]
    if not path.startswith("/"):
        path = "/" + path
    return path, rest[:cut]


def _normalise(path: str) -> str:
    """Resolve ``.`` and ``..`` segments (RFC 3986 section 5.2.4) for route matching."""
    out: list[str] = []
    for seg in path.split("/")[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    tail = "/" if out and path.endswith(("/.", "/..")) else ""
    return "/" + "/".join(out) + tail


# Fields a request carries at most once: a second one is refused with 400 (nginx 1.22
# ngx_http_process_host / ngx_http_process_unique_header_line; RFC 9112 sections 3.2 and 6.1).
# llhttp refuses a second Content-Length itself.
_SINGLE_FIELDS = frozenset({"host", "transfer-encoding"})
_OWS = " \t"
# RFC 9110 section 7.2 / RFC 3986 section 3.2: Host = uri-host [ ":" port ], without userinfo;
# uri-host an IP-literal (IPv6 only here, checked by ipaddress) or a reg-name (which covers
# IPv4 addresses): unreserved / pct-encoded / sub-delims. Stricter than nginx, which takes
# anything but controls, spaces and "/" (so "a@b" too).
_HOST = re.compile(
    r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<name>(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*))"
    r"(?::[0-9]*)?"
)


_HOSTS_SEEN: dict[str, bool] = {}  # Host values already judged (a few per deployment)
_HOSTS_SEEN_MAX = 4096


def _host_ok(value: str) -> bool:
    """:func:`valid_host` of a Host field value (trailing OWS dropped), remembered: the regex
    costs microseconds and a keep-alive client sends the same Host every time."""
    ok = _HOSTS_SEEN.get(value)
    if ok is None:
        ok = valid_host(value.strip(_OWS))
        if len(_HOSTS_SEEN) >= _HOSTS_SEEN_MAX:
            _HOSTS_SEEN.clear()  # many different values (a scan): bounded, judged afresh
        _HOSTS_SEEN[value] = ok
    return ok


def valid_host(value: str) -> bool:
    """A Host field value (or an absolute-form target's authority) a server may accept:
    RFC 3986 authority syntax without userinfo, and, as nginx, not empty, a bare ".", or
    with an empty label (``a..b``)."""
    m = _HOST.fullmatch(value)
    if m is None:
        return False
    ip6 = m.group("ip6")
    if ip6 is not None:
        try:
            ipaddress.IPv6Address(ip6)
        except ValueError:
            return False
        return True
    name = m.group("name")
    return name not in ("", ".") and ".." not in name and not name.startswith(".")


def _check_head(
    version: str, first: dict[str, str], duplicate: str | None, authority: str | None
) -> None:
    """Refuse a request head whose framing or Host nginx 1.22 (ngx_http_process_request_header)
    and RFC 9112 refuse, with nginx's status; the connection is closed after the answer.

    * HTTP/2 and later in an HTTP/1 request line: 505 (nginx); HTTP/0.9: 400.
    * A second Host or Transfer-Encoding field: 400 (nginx; RFC 9112 section 3.2).
    * HTTP/1.1 without Host, or a Host / absolute-form authority that is not a valid
      ``uri-host [":" port]``: 400 (RFC 9112 section 3.2, RFC 9110 section 4.2.1).
    * Transfer-Encoding in an HTTP/1.0 request: 400 (RFC 9112 section 6.1: faulty framing;
      nginx "client sent HTTP/1.0 request with Transfer-Encoding").
    * Transfer-Encoding other than exactly ``chunked`` (``identity, chunked``, ``gzip,
      chunked``, ``identity``...): 501 (nginx; RFC 9112 section 6.1: a server that receives a
      coding it does not understand responds 501). With Content-Length: 400 (RFC 9112 6.3).
    """
    if version != "1.1" and version != "1.0":
        if version[:1].isdigit() and int(version[0]) >= 2:
            raise _Refused(505, f"HTTP/{version} is not supported on this port")
        raise _Refused(400, f"HTTP/{version} requests are not served")
    if duplicate is not None:
        raise _Refused(400, f"more than one {duplicate} header")
    host = first.get("host")
    if host is None:
        if version == "1.1":
            raise _Refused(400, "an HTTP/1.1 request without Host")
    elif not _host_ok(host):
        raise _Refused(400, "invalid Host header")
    if authority is not None and not valid_host(authority):
        raise _Refused(400, "invalid host in the request target")
    te = first.get("transfer-encoding")
    if te is not None:
        if version != "1.1":
            raise _Refused(400, "Transfer-Encoding in an HTTP/1.0 request")
        if te.strip(_OWS).lower() != "chunked":
            raise _Refused(501, "Transfer-Encoding other than chunked is not implemented")
        if "content-length" in first:
            raise _Refused(400, "both Content-Length and Transfer-Encoding")


Handler = Callable[[HttpRequest], Awaitable[None]]


class HttpServerProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._handler = server.handler
        self._limits = server.limits
        self._loop = server.loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.lost = False
        self.eof = False  # the client has sent all it will send
        self.closing = False  # answer what is in flight, then close
        self._read_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        # the request whose head/body is being parsed, the one being answered, and the
        # complete ones waiting behind it (pipelining)
        self._parsing: HttpRequest | None = None
        self._current: HttpRequest | None = None
        self._queue: deque[HttpRequest] = deque()
        self._task: asyncio.Task[None] | None = None
        self._start_pending = False
        # the head being parsed
        self._url: list[bytes] = []
        self._header_items: list[tuple[str, str]] = []
        self._header_first: dict[str, str] = {}
        self._duplicate: str | None = None  # a field that must appear once, seen again
        self._head_size = 0
        self._in_head = False
        self._began = False  # a head began during the current read
        self._head_chunks = 0  # bytes of reads that fell wholly inside the current head
        # one lazy timer per connection: the head deadline, or the idle deadline
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._lingering = False
        self._head_limit = 4 * self._limits.max_header_size
        self._period = min(self._limits.client_timeout, self._limits.keepalive_timeout)
        # the framing of the body of a request that asked for an upgrade (httptools skips it)
        self._upgrade_framing: bytes | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, tuple) and peer else None
        self._server.connections.add(self)
        self._set_deadline(self._limits.keepalive_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for req in (self._parsing, self._current, *self._queue):
            if req is not None:
                req._lost()
        self._queue.clear()
        d = self._drain
        if d is not None and not d.done():
            d.set_exception(ConnectionResetError("client disconnected"))

    def data_received(self, data: bytes) -> None:
        if self.closing and self._current is None:
            return
        self._began = False
        try:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                # An Upgrade (WebSocket, h2c) or CONNECT: answered as a plain request, without
                # the upgrade (hop-by-hop), and nothing after it is read.
                self.closing = True
                if self._upgrade_framing is not None:
                    self._read_upgrade_body(data[upgrade.args[0] :])
        except httptools.HttpParserError as exc:
            cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
            if self.closing and self._parsing is None and not self._in_head:
                # bytes after a request that closes the connection (llhttp: "Data after
                # Connection: close"): not read, the requests before them are still answered
                # (RFC 9112 section 9.6)
                pass
            elif isinstance(cause, _HeadTooLarge):
                self._reject(431, self._too_large())
            elif isinstance(cause, _Refused):
                self._reject(cause.status, str(cause))
            elif self._h2_preface():
                self._reject(505, _NO_H2)  # llhttp: "Pause on PRI/Upgrade"
            else:
                self._reject(self._parse_error_status(cause), f"malformed request: {cause}")
            # a request whose head was complete is still answered (its body has failed)
        if self._in_head and not self._began and not self.closing:
            # the whole read belongs to a head still incomplete (httptools buffers it)
            self._head_chunks += len(data)
            if self._head_chunks > self._head_limit:
                self._reject(431, self._too_large())
        if self._in_head and not self.closing and self._h2_preface():
            # answered at once: llhttp waits for the rest of the preface (and an h2 client
            # may wait for the server's SETTINGS first), which would take client_timeout
            self._reject(505, _NO_H2)
        if self._start_pending:
            self._start_pending = False
            self._start_next()

    def eof_received(self) -> bool:
        # The client will send nothing more; keep the connection to answer what it asked.
        self.eof = True
        if self._current is None and self._parsing is None:
            return False
        if self._parsing is not None and not self._parsing._body_done:
            self._parsing._lost()
        self.closing = True
        return True

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        d = self._drain
        if d is not None and not d.done():
            d.set_result(None)

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._began = True
        self._in_head = True
        self._head_chunks = 0
        self._url = []
        self._header_items = []
        self._header_first = {}
        self._duplicate = None
        self._head_size = 0
        self._set_deadline(self._limits.client_timeout)

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._head_size += len(url)
        if self._head_size > self._limits.max_header_size:  # so far only the request line
            raise _HeadTooLarge

    def _parse_error_status(self, exc: BaseException | None) -> int:
        """The status for an error llhttp found itself: 400, except a Transfer-Encoding it
        refuses in one field of an HTTP/1.1 request (``chunked, gzip``, ``chunked, chunked``,
        empty), which nginx answers 501 (HTTP/1.0 or a second field: 400, as :func:`_check_head`).
        """
        if not self._in_head or "transfer-encoding" in self._header_first:
            return 400
        message = str(exc)
        if "Transfer-Encoding" not in message or "Content-Length" in message:
            return 400
        try:
            version = self._parser.get_http_version()
        except Exception:  # the request line was not complete
            return 400
        return 501 if version == "1.1" else 400

    def _too_large(self) -> str:
        n = self._limits.max_header_size
        return f"request line or a header field exceeds {n} bytes, or the head {4 * n}"

    def on_header(self, name: bytes, value: bytes) -> None:
        field = len(name) + len(value) + 4
        self._head_size += field
        if field > self._limits.max_header_size or self._head_size > self._head_limit:
            raise _HeadTooLarge
        if not self._in_head:
            return  # a chunked body's trailer: never a request header (it comes after routing)
        k = name.decode("latin-1")
        v = value.decode("latin-1")
        self._header_items.append((k, v))
        lk = k.lower()
        if lk not in self._header_first:
            self._header_first[lk] = v
        elif lk in _SINGLE_FIELDS:
            self._duplicate = k  # refused once the head is complete (llhttp does Content-Length)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._deadline = None  # the handler bounds the body; the response ends the request
        parser = self._parser
        first = self._header_first
        raw = b"".join(self._url).decode("latin-1")
        authority = None
        if not raw.startswith("/"):
            raw, authority = _origin_form(raw)
        version = parser.get_http_version()
        _check_head(version, first, self._duplicate, authority)
        method = parser.get_method().decode("ascii")
        if method == "TRACE":
            raise _Refused(405, "TRACE is not allowed")  # nginx: 405; it would echo cookies
        length: int | None = None
        cl = first.get("content-length")
        if cl is not None:
            length = int(cl)  # llhttp has checked it is a number
        # Transfer-Encoding is exactly "chunked" (checked above; llhttp frames the body by it)
        chunked = "transfer-encoding" in first
        framing = None  # of the body of a request that asks for an upgrade
        if parser.should_upgrade():
            if chunked:
                framing = b"Transfer-Encoding: chunked"
            elif length:
                framing = b"Content-Length: %d" % length
        req = HttpRequest(
            self,
            method,
            raw,
            version,
            RequestHeaders(self._header_items, first),
            parser.should_keep_alive(),
            None if chunked else length,
            chunked,
        )
        if authority is not None:
            req.host = authority  # RFC 9112 section 3.2.2: the target's authority wins
        if self.closing:
            return  # after a "Connection: close" or while stopping, nothing more is served
        if framing is not None:
            # httptools skips the body of a request that asks for an upgrade and stops after
            # its head: the body is read by a second parser (_read_upgrade_body)
            self._upgrade_framing = framing
        self._parsing = req
        if self._current is None:
            self._current = req
            self._start_pending = True
        else:
            self._queue.append(req)
            if len(self._queue) >= _MAX_PIPELINED:
                self.pause_body()  # read no more until the client takes its answers

    def on_body(self, body: bytes) -> None:
        req = self._parsing
        if req is not None:
            req._feed(body)

    def on_message_complete(self) -> None:
        if self._upgrade_framing is not None:
            return  # the body httptools skipped is still to come (_read_upgrade_body)
        req = self._parsing
        self._parsing = None
        if req is None:
            return
        req._done()
        if self._lingering:
            self.close()  # the unread body has been dropped: the answer is out
            return
        if not req.keep_alive:
            self.closing = True  # a request that asked for close is the last one read
            self.pause_body()

    def _h2_preface(self) -> bool:
        """The request line read so far is HTTP/2's connection preface (``PRI * HTTP/2.0``,
        RFC 9113 section 3.4; PRI is reserved for it): a prior-knowledge h2c or gRPC client."""
        return self._in_head and bool(self._url) and self._parser.get_method() == b"PRI"

    def _read_upgrade_body(self, rest: bytes) -> None:
        """Read the body of the request that asked for an upgrade with a fresh parser, primed
        with a head of the same framing; llhttp checks the body as strictly as any other.
        Nothing after the body is read (the connection closes after the answer)."""
        framing = self._upgrade_framing
        assert framing is not None
        self._upgrade_framing = None
        self._parser = httptools.HttpRequestParser(_UpgradeBody(self))
        counted = self._head_size  # the primed head's fields are not the client's
        self._parser.feed_data(b"POST / HTTP/1.1\r\nHost: b\r\n" + framing + b"\r\n\r\n")
        self._head_size = counted
        if rest:
            self._parser.feed_data(rest)

    # -- requests ---------------------------------------------------------------------------

    def _start_next(self) -> None:
        req = self._current
        if req is None or self._task is not None:
            return
        self._task = self._loop.create_task(self._serve(req))

    async def _serve(self, req: HttpRequest) -> None:
        try:
            await self._handler(req)
        except asyncio.CancelledError:
            self.abort()
            raise
        except ConnectionError:
            self.abort()
        except Exception:
            log.exception("request handler failed for %s %s", req.method, req.raw_path[:200])
            if req.response_state == 0 and not self.lost:
                req.keep_alive = False
                rid = request_id(req.headers.get("X-Request-Id"))
                req.respond_error(500, "internal error in the proxy", rid)
            else:
                self.abort()
        finally:
            self._task = None
        if self._write_paused and not self.lost:
            with contextlib.suppress(ConnectionError):
                await self.drain()  # the client takes this answer before the next is made
        if req.response_state != 2:
            log.error("request handler left the response unfinished: closing the connection")
            self.abort()
            return
        self._finished(req)

    def _finished(self, req: HttpRequest) -> None:
        if self.lost:
            return
        if not req._body_done:
            if self.eof or isinstance(req._error, BadRequestBody):
                self.close()  # nothing more can usefully be read
            else:
                self._linger(req)
            return
        if not req.keep_alive:
            self.close()
            return
        self._current = self._queue.popleft() if self._queue else None
        if self._current is not None:
            self._start_next()  # accepted before any close: still answered, in order
            if len(self._queue) < _MAX_PIPELINED:
                self.resume_body()
        elif self.closing:
            self.close()
        else:
            self.resume_body()
            if not self._in_head:  # a head already begun keeps its own deadline
                self._set_deadline(self._limits.keepalive_timeout)

    def _linger(self, req: HttpRequest) -> None:
        """Answered before the body was read (413, say): read and drop the rest of it for a
        moment before closing, so the client sees the answer rather than a reset."""
        self.closing = True
        self._lingering = True
        req._discard = True
        req._body.clear()
        self._queue.clear()
        self.resume_body(force=True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._set_deadline(_LINGER)

    def _reject(self, status: int, message: str) -> None:
        """Answer a request that cannot be parsed, and close. Complete requests received before
        it (pipelined) keep their answers, in order, the last with ``Connection: close``; the
        bad one behind them only closes the connection, and nothing after it is read."""
        self.closing = True
        bad = self._parsing
        if bad is not None:
            bad._fail(BadRequestBody(message))
            if self._queue and self._queue[-1] is bad:
                self._queue.pop()  # its head was read, its body is broken: never served
        self._parsing = None
        if self._current is None and not self.lost:
            rid = request_id(None)  # the head could not be read: no client id to trust
            self._server.rejected(status)
            body = error_body(status, message, rid)
            extra = b"Content-Length: %d\r\nConnection: close\r\n" % len(body)
            self.write(_head(status, "", _error_headers(rid), extra) + body)
            self.close()
        self.pause_body()

    # -- transport helpers ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        t = self._transport
        if t is not None and not self.lost:
            t.write(data)

    def writelines(self, data: Iterable[bytes]) -> None:
        t = self._transport
        if t is not None and not self.lost:
            t.writelines(data)

    async def drain(self) -> None:
        if self.lost:
            raise ConnectionResetError("client disconnected")
        if not self._write_paused:
            return
        self._drain = self._loop.create_future()
        try:
            await self._drain
        finally:
            self._drain = None

    def pause_body(self) -> None:
        if not self._read_paused and self._transport is not None and not self.lost:
            self._read_paused = True
            self._transport.pause_reading()

    def resume_body(self, force: bool = False) -> None:
        if self._read_paused and self._transport is not None and not self.lost:
            if self.closing and not force and self._parsing is None:
                return  # nothing more will be read on this connection
            self._read_paused = False
            self._transport.resume_reading()

    def close(self) -> None:
        self.closing = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self.closing = True
        if self._transport is not None:
            self._transport.abort()

    def idle(self) -> bool:
        return self._current is None and self._parsing is None

    def last_answer(self) -> bool:
        """No request is read after the one being answered (the connection is closing and
        nothing waits behind it)."""
        return self.closing and not self._queue and self._parsing in (None, self._current)

    # -- the connection's one timer ---------------------------------------------------------

    # Setting a deadline is a float store per request; the timer fires at least every
    # min(client_timeout, keepalive_timeout), so a deadline set after it was armed is never
    # more than that away from a firing that re-arms for it: each deadline is kept exactly.

    def _set_deadline(self, after: float) -> None:
        self._deadline = self._loop.time() + after
        if self._timer is None and not self.lost:
            self._arm()

    def _arm(self) -> None:
        assert self._deadline is not None
        due = min(self._deadline, self._loop.time() + self._period)
        self._timer = self._loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self.lost:
            return
        if self._loop.time() < deadline:
            self._arm()
            return
        if self._lingering:
            self.close()
        elif self._in_head:
            self._reject(408, "the request head was not received in time")
        elif self.idle():
            self.close()  # idle keep-alive connection


class _UpgradeBody:
    """The callbacks of :meth:`HttpServerProtocol._read_upgrade_body`'s parser: the body and
    its trailer go to the connection as for any request; the primed head is not reported."""

    __slots__ = ("on_body", "on_header", "on_message_complete")

    def __init__(self, conn: HttpServerProtocol) -> None:
        self.on_body = conn.on_body
        self.on_header = conn.on_header
        self.on_message_complete = conn.on_message_complete


class _HeadTooLarge(ClientError):
    """The request line, a header field or the whole head exceeds its limit (431).

    Like :class:`_Refused`, raised inside httptools' callbacks and caught (as the parser
    error's context) in :meth:`HttpServerProtocol.data_received`: it never leaves this module.
    """

    status = 431
    kind = "head_too_large"


class _Refused(ClientError):
    """A request head refused with ``status`` (the connection is closed after the answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BadRequestBody(ClientError):
    """The request body could not be parsed (bad chunked framing, say): the request is void."""

    status = 400
    kind = "bad_request"


class HttpServer:
    """The listening socket and its connections."""

    def __init__(
        self,
        handler: Handler,
        limits: ServerLimits,
        on_reject: Callable[[int], None] | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self._on_reject = on_reject
        self.connections: set[HttpServerProtocol] = set()
        self._server: asyncio.Server | None = None
        self.loop = asyncio.get_running_loop()

    async def listen(
        self, host: str, port: int, backlog: int = 2048, *, reuse_port: bool = False
    ) -> int:
        """Listen on ``host:port``; return the port. ``reuse_port``: SO_REUSEPORT, so that the
        processes of ``canary run --workers N`` each listen on the same port and the kernel
        spreads new connections over them."""
        self._server = await self.loop.create_server(
            lambda: HttpServerProtocol(self),
            host,
            port,
            backlog=backlog,
            reuse_address=True,
            reuse_port=reuse_port,
        )
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    def rejected(self, status: int) -> None:
        if self._on_reject is not None:
            self._on_reject(status)

    async def close(self, grace: float = 30.0) -> None:
        """Stop accepting; close idle connections; give in-flight requests ``grace`` seconds."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.closing = True
            if conn.idle():
                conn.close()  # after what is buffered for it has been sent
        deadline = self.loop.time() + grace
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)  # busy ones close after their answers
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
