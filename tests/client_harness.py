"""Raw-socket harness for the proxy port's conformance suite and fuzzer.

* :class:`CapturingUpstream`: an asyncio HTTP/1.1 server on 127.0.0.1 that parses every request
  it receives (httptools, strict), records what it got (method, target, headers, the decoded
  body and the raw bytes), answers ``200`` with a small body, and counts deliveries. A request
  that starts but never completes (a streamed body the proxy abandoned) is recorded apart, in
  :attr:`CapturingUpstream.incomplete`: it was not delivered.
* :class:`CanaryThread`: canary's :class:`~canary.runtime.Runtime` in front of a capturing
  upstream (production and candidate both point at it), on uvloop (the loop ``canary run``
  uses) in a background thread, so tests drive it with plain blocking sockets and hypothesis
  needs no event loop of its own.
* :class:`RawClient`: a blocking socket that sends bytes, reads one response at a time exactly
  as a client would frame it (Content-Length, chunked, or until the close), and tells whether
  the server closed the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httptools
import uvloop
import yaml

from canary.config import load_config_text
from canary.runtime import Runtime

T = TypeVar("T")

UPSTREAM_BODY = b"upstream-ok"


# -- the capturing upstream -------------------------------------------------------------------


@dataclass
class Captured:
    """One complete request the upstream received."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]  # as received, in order
    body: bytes  # decoded (de-chunked)
    raw: bytes  # the bytes received for it on its connection
    connection: int  # which upstream connection carried it (0, 1, ...)

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]


class _UpstreamConn(asyncio.Protocol):
    def __init__(self, owner: CapturingUpstream, number: int) -> None:
        self._owner = owner
        self._number = number
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._raw = bytearray()  # received since the last complete request
        self._url = bytearray()
        self._headers: list[tuple[str, str]] = []
        self._body = bytearray()
        self._in_message = False
        self._broken = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._owner._open.add(self)

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        self._raw += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken = True
            self._owner.errors.append(f"{type(exc).__name__}: {exc}: {bytes(self._raw)[:200]!r}")
            if self._transport is not None:
                self._transport.write(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._open.discard(self)
        if self._in_message or (self._raw and not self._broken):
            self._owner.incomplete.append(bytes(self._raw))

    @property
    def busy(self) -> bool:
        return self._in_message

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._in_message = True
        self._url.clear()
        self._headers = []
        self._body.clear()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self._in_message = False
        method = self._parser.get_method().decode("ascii")
        captured = Captured(
            method=method,
            target=self._url.decode("latin-1"),
            version=self._parser.get_http_version(),
            headers=self._headers,
            body=bytes(self._body),
            raw=bytes(self._raw),
            connection=self._number,
        )
        self._raw.clear()
        owner = self._owner
        owner.requests.append(captured)
        if self._transport is None:
            return
        keep = self._parser.should_keep_alive()
        if owner.answer is not None:
            answer = owner.answer(captured)
            if answer is None:
                self._transport.close()  # read the whole request, answered nothing
                return
            self._transport.write(answer)
            if not keep:
                self._transport.close()
            return
        body = b"" if method == "HEAD" else owner.body
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(
            owner.body
        )
        if not keep:
            head += b"Connection: close\r\n"
        self._transport.write(head + b"\r\n" + body)
        if not keep:
            self._transport.close()


class CapturingUpstream:
    """Records every request it receives and answers ``200 upstream-ok``; may listen on several
    ports (one record for all of them).

    ``answer``, when given, decides instead: it gets each complete request (already recorded)
    and returns the raw bytes to send back, or None to close the connection without answering
    (a crashed upstream, or one whose idle timeout raced the proxy's reuse).
    """

    def __init__(
        self,
        body: bytes = UPSTREAM_BODY,
        answer: Callable[[Captured], bytes | None] | None = None,
    ) -> None:
        self.body = body
        self.answer = answer
        self.requests: list[Captured] = []
        self.incomplete: list[bytes] = []  # requests begun but never completed
        self.errors: list[str] = []  # bytes it could not parse as HTTP/1.1
        self.connections = 0
        self._open: set[_UpstreamConn] = set()
        self._servers: list[asyncio.Server] = []

    @property
    def deliveries(self) -> int:
        return len(self.requests)

    @property
    def busy(self) -> bool:
        """A request is being received on some connection."""
        return any(c.busy for c in self._open)

    def reset(self) -> None:
        self.requests = []
        self.incomplete = []
        self.errors = []

    def _protocol(self) -> _UpstreamConn:
        number = self.connections
        self.connections += 1
        return _UpstreamConn(self, number)

    async def listen(self, host: str = "127.0.0.1") -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._protocol, host, 0)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for conn in list(self._open):
            if conn._transport is not None:
                conn._transport.abort()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()


# -- canary in a background thread ------------------------------------------------------------


def canary_config(
    production: str,
    candidate: str,
    proxy: dict[str, Any] | None = None,
    rollout: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A rollout file: every path goes to the capturing upstream (5% via the candidate URL);
    ``proxy`` and ``rollout`` override keys of those sections."""
    return {
        "proxy": {"listen": "127.0.0.1:0", "client_timeout": "3s", **(proxy or {})},
        "admin": {"listen": "127.0.0.1:0"},
        "state": {"backend": "memory"},
        "rollouts": [
            {
                "name": "m",
                "match": {"path_prefix": "/"},
                "production": {"endpoints": [production]},
                "candidate": {"endpoints": [candidate]},
                "routing": {"timeout": "5s", "failover": False},
                "steps": [{"weight": 5}],
                **(rollout or {}),
            }
        ],
    }


class CanaryThread:
    """Canary and its capturing upstream on a uvloop loop in a daemon thread (production and
    candidate both point at ``upstream``, on two ports)."""

    def __init__(
        self,
        *,
        proxy: dict[str, Any] | None = None,
        rollout: dict[str, Any] | None = None,
        upstream: CapturingUpstream | None = None,
    ) -> None:
        self._proxy = proxy
        self._rollout = rollout
        self.upstream = upstream if upstream is not None else CapturingUpstream()
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="canary-under-test", daemon=True)
        self.runtime: Runtime | None = None
        self.port = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        up = self.upstream
        p, c = await up.listen(), await up.listen()
        cfg = canary_config(
            f"http://127.0.0.1:{p}", f"http://127.0.0.1:{c}", self._proxy, self._rollout
        )
        self.runtime = Runtime(load_config_text(yaml.safe_dump(cfg)), run_controller=False)
        await self.runtime.start()
        assert self.runtime.proxy_port is not None
        self.port = self.runtime.proxy_port

    async def _stop(self) -> None:
        if self.runtime is not None:
            await self.runtime.stop()
        await self.upstream.close()

    def start(self) -> CanaryThread:
        self._thread.start()
        self.call(self._start())
        return self

    def stop(self) -> None:
        try:
            self.call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5.0)
            self.loop.close()

    def __enter__(self) -> CanaryThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observing it ---------------------------------------------------------------------

    async def _quiet(self) -> bool:
        rt = self.runtime
        assert rt is not None
        server = rt._proxy_server
        conns = len(server.connections) if server is not None else 0
        inflight = rt.proxy._counters.inflight
        return conns == 0 and inflight == 0 and not self.upstream.busy

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until canary holds no client connection, forwards nothing, and the upstream is
        receiving nothing (call it after closing the client): the record is then final."""
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            if self.call(self._quiet()):
                if quiet_since is None:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= 0.03:
                    return
            else:
                quiet_since = None
            time.sleep(0.005)
        raise AssertionError("canary did not settle: a connection or a request is still open")

    async def _reset(self) -> None:
        self.upstream.reset()

    def reset(self) -> None:
        """Forget what the upstream received so far (call it between tests)."""
        self.call(self._reset())


# -- the raw client ---------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]  # names lower-cased, in order
    body: bytes
    interim: list[int] = field(default_factory=list)  # 1xx answers before this one

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name.lower()), None)

    @property
    def closes(self) -> bool:
        return (self.header("connection") or "").lower() == "close"


class ProtocolViolation(AssertionError):
    """The server sent bytes that are not a well-formed HTTP/1.1 response."""


class RawClient:
    """A blocking TCP connection to the proxy port."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self._buf = bytearray()
        self.eof = False  # the server closed (or reset) the connection

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    def shutdown_write(self) -> None:
        """Half-close: the client has sent everything (the server still answers)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def _fill(self, deadline: float) -> bool:
        """Read more into the buffer; False at the end of the connection."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no answer in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        except TimeoutError:
            raise TimeoutError("no answer in time") from None
        if not data:
            self.eof = True
            return False
        self._buf += data
        return True

    def _line(self, deadline: float) -> bytes | None:
        while True:
            i = self._buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 2]
                return line
            if not self._fill(deadline):
                return None

    def _exactly(self, n: int, deadline: float) -> bytes:
        while len(self._buf) < n:
            if not self._fill(deadline):
                raise ProtocolViolation(f"connection closed {n - len(self._buf)} bytes short")
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def read_response(self, method: str = "GET", timeout: float | None = None) -> RawResponse:
        """The next final response (1xx ones are kept in ``interim``). Raises EOFError when the
        connection ends before one begins, TimeoutError when none comes in time."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        interim: list[int] = []
        while True:
            while not self._buf and self._fill(deadline):
                pass
            if not self._buf:
                raise EOFError("connection closed")
            status_line = self._line(deadline)
            if status_line is None:
                raise ProtocolViolation(f"truncated status line: {bytes(self._buf)!r}")
            parts = status_line.decode("latin-1").split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise ProtocolViolation(f"bad status line {status_line!r}")
            version, status = parts[0], int(parts[1])
            reason = parts[2] if len(parts) > 2 else ""
            headers: list[tuple[str, str]] = []
            while True:
                line = self._line(deadline)
                if line is None:
                    raise ProtocolViolation("connection closed inside a response head")
                if not line:
                    break
                name, sep, value = line.decode("latin-1").partition(":")
                if not sep or not name or name != name.strip():
                    raise ProtocolViolation(f"bad header line {line!r}")
                headers.append((name.lower(), value.strip()))
            if 100 <= status < 200:
                interim.append(status)
                continue
            fields = dict(headers)
            if method == "HEAD" or status in (204, 304):
                body = b""
            elif "transfer-encoding" in fields:
                if fields["transfer-encoding"].lower() != "chunked":
                    raise ProtocolViolation(f"transfer-encoding {fields['transfer-encoding']}")
                parts_ = []
                while True:
                    size_line = self._line(deadline)
                    if size_line is None:
                        raise ProtocolViolation("connection closed inside a chunked body")
                    size = int(size_line.split(b";")[0], 16)
                    if size == 0:
                        while self._line(deadline):  # trailer fields, up to the empty line
                            pass
                        break
                    parts_.append(self._exactly(size, deadline))
                    if self._exactly(2, deadline) != b"\r\n":
                        raise ProtocolViolation("chunk not followed by CRLF")
                body = b"".join(parts_)
            elif "content-length" in fields:
                body = self._exactly(int(fields["content-length"]), deadline)
            else:
                while self._fill(deadline):
                    pass
                body = bytes(self._buf)
                self._buf.clear()
            return RawResponse(status, reason, version, headers, body, interim)

    def read_responses(self, timeout: float | None = None) -> list[RawResponse]:
        """Every response until the connection ends (or ``timeout``: TimeoutError)."""
        out = []
        while True:
            try:
                out.append(self.read_response(timeout=timeout))
            except EOFError:
                return out

    def closed(self, timeout: float = 1.0) -> bool:
        """True if the server ends the connection within ``timeout`` without sending more."""
        if self._buf:
            raise ProtocolViolation(f"unexpected bytes after the response: {bytes(self._buf)!r}")
        try:
            more = self._fill(time.monotonic() + timeout)
        except TimeoutError:
            return False
        if more:
            raise ProtocolViolation(f"unexpected bytes after the response: {bytes(self._buf)!r}")
        return True


def exchange(
    port: int, data: bytes, *, half_close: bool = True, timeout: float = 5.0
) -> tuple[list[RawResponse], bool]:
    """Send ``data`` on a new connection, read every answer; (answers, closed by the server)."""
    with RawClient(port, timeout) as c:
        c.send(data)
        if half_close:
            c.shutdown_write()
        responses = c.read_responses()
        return responses, c.eof
