"""A scriptable raw-TCP HTTP/1.1 upstream on 127.0.0.1 for conformance tests of the proxy.

It records the exact bytes of every request it receives (head and body, as delivered) and
answers each one as a script says: well, badly, late, or not at all. A script is a function of
the :class:`Received` request that returns a :class:`Reply`::

    async with Upstream(lambda req: Reply.ok(b"hello")) as up:
        ...  # point canary at up.url
    up.count("POST", "/charge")  # how many times that request was delivered

Misbehaviours are data: ``Reply(close=True)`` closes after reading the request without a
byte of answer, ``Reply(raw=...)`` writes arbitrary bytes (phantom responses, bad status
lines), ``Reply(stream=...)`` writes an iterator of chunks (an endless header), ``delay``
answers late, ``keep_open`` leaves the connection silent, ``later`` sends bytes while the
connection is idle.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

_MAX_HEAD = 1024 * 1024


@dataclass(frozen=True)
class Received:
    """One request as the upstream received it."""

    conn: int  # connection number, from 0, in the order they were accepted
    seq: int  # request number on its connection, from 0
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    raw: bytes  # the exact bytes: head and body with its framing

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


@dataclass
class Reply:
    """What the upstream does with one request."""

    raw: bytes = b""  # written at once (after ``delay``)
    stream: Iterable[bytes] | None = None  # then these, one write (and drain) each
    delay: float = 0.0  # seconds before answering
    close: bool = False  # close the connection after the answer (or without one)
    keep_open: float = 0.0  # stay silent this long (after ``raw``) before going on
    later: bytes = b""  # written ``later_delay`` seconds after the answer (while idle)
    later_delay: float = 0.05

    @staticmethod
    def ok(body: bytes = b"ok", status: str = "200 OK", headers: str = "") -> Reply:
        head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n"
        return Reply(raw=head.encode("latin-1") + body)

    @staticmethod
    def drop() -> Reply:
        """Read the whole request, then close without a byte of answer."""
        return Reply(close=True)


Script = Callable[[Received], Reply]


@dataclass
class Upstream:
    """The server; ``requests`` lists every request received, in order."""

    script: Script
    requests: list[Received] = field(default_factory=list)
    connections: int = 0
    open_connections: int = 0
    bytes_written: int = 0
    _server: asyncio.Server | None = None
    _closing: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, method: str | None = None, path: str | None = None) -> int:
        """Deliveries of requests with this method and path (None: any)."""
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method) and (path is None or r.path == path)
        )

    async def __aenter__(self) -> Upstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=_MAX_HEAD)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self._closing.set()  # ends every pause
        for w in list(self._writers):
            w.transport.abort()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _pause(self, seconds: float) -> None:
        """Sleep, cut short when the server is closing."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)
        if self._closing.is_set():
            raise ConnectionResetError("upstream harness closing")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        conn = self.connections
        self.connections += 1
        self.open_connections += 1
        try:
            seq = 0
            while True:
                req = await _read_request(reader, conn, seq)
                if req is None:
                    return
                self.requests.append(req)
                seq += 1
                reply = self.script(req)
                if reply.delay:
                    await self._pause(reply.delay)
                if reply.raw:
                    writer.write(reply.raw)
                    self.bytes_written += len(reply.raw)
                    await writer.drain()
                if reply.stream is not None:
                    for chunk in reply.stream:
                        writer.write(chunk)
                        self.bytes_written += len(chunk)
                        await writer.drain()
                if reply.keep_open:
                    await self._pause(reply.keep_open)
                if reply.later:
                    await self._pause(reply.later_delay)
                    writer.write(reply.later)
                    self.bytes_written += len(reply.later)
                    await writer.drain()
                if reply.close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.open_connections -= 1
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()


async def _read_request(reader: asyncio.StreamReader, conn: int, seq: int) -> Received | None:
    """One request with its exact bytes; None at a clean end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    lines = head[:-4].decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers = tuple(
        (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])
    )
    fields = {k.lower(): v for k, v in headers}
    raw = bytearray(head)
    body = bytearray()
    if fields.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            raw += size_line
            size = int(size_line.split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            raw += data
            if size == 0:
                while data != b"\r\n":  # trailers until the empty line
                    data = await reader.readuntil(b"\r\n")
                    raw += data
                break
            body += data[:-2]
    elif "content-length" in fields:
        data = await reader.readexactly(int(fields["content-length"]))
        raw += data
        body += data
    return Received(conn, seq, method, target, headers, bytes(body), bytes(raw))


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    closed: bool  # the proxy closed the connection after this response

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


async def read_response(reader: asyncio.StreamReader, method: str = "GET") -> RawResponse:
    """Read one HTTP/1.1 response from a client socket (Content-Length, chunked or close)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].decode("latin-1").split("\r\n")
    _version, status, reason = [*lines[0].split(" ", 2), ""][:3]
    headers = [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:])]
    fields = {k.lower(): v for k, v in headers}
    code = int(status)
    body = b""
    if method == "HEAD" or code in (204, 304) or code < 200:
        pass
    elif fields.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(data[:-2])
        body = b"".join(parts)
    elif "content-length" in fields:
        body = await reader.readexactly(int(fields["content-length"]))
    else:
        body = await reader.read()
    closed = fields.get("connection", "").lower() == "close"
    return RawResponse(code, reason, headers, body, closed)


async def exchange(
    port: int, data: bytes, method: str = "GET", timeout: float = 10.0
) -> RawResponse:
    """Send ``data`` on a new client connection to 127.0.0.1:``port``; read one response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader, method), timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def request(method: str, path: str, body: bytes | None = None, headers: str = "") -> bytes:
    """The bytes of a simple client request (``Content-Length`` framing when there is a body)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\n{headers}"
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n").encode("latin-1") + (body or b"")
