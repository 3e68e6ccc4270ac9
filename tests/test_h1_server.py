"""The proxy port's HTTP/1.1 server at its own boundary: a small test handler (not the Proxy)
and real loopback connections, raw where the bytes on the wire matter.

Every test runs on the default asyncio loop and on uvloop (conftest's
``pytest_asyncio_loop_factories``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from canary.proxy.h1_server import (
    BadRequestBody,
    HttpRequest,
    HttpServer,
    ServerLimits,
    error_body,
)

Handler = Callable[[HttpRequest], Awaitable[None]]

LIMITS = ServerLimits(max_header_size=4096, client_timeout=5.0, keepalive_timeout=5.0)
FAST = ServerLimits(max_header_size=4096, client_timeout=0.3, keepalive_timeout=0.3)


@dataclass
class Served:
    server: HttpServer
    port: int
    rejected: list[int] = field(default_factory=list)
    seen: list[HttpRequest] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def serving(handler: Handler, limits: ServerLimits = LIMITS) -> AsyncIterator[Served]:
    rejected: list[int] = []
    seen: list[HttpRequest] = []

    async def wrapped(request: HttpRequest) -> None:
        seen.append(request)
        await handler(request)

    server = HttpServer(wrapped, limits, rejected.append)
    port = await server.listen("127.0.0.1", 0)
    try:
        yield Served(server, port, rejected, seen)
    finally:
        await server.close(grace=0.5)


@contextlib.asynccontextmanager
async def connection(
    port: int,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.transport.abort()


def request(
    method: str = "GET",
    target: str = "/",
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
    version: str = "1.1",
) -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: test"]
    if body and not any(k.lower() == "transfer-encoding" for k, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    lines.extend(f"{k}: {v}" for k, v in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]  # names lower-cased, in order
    body: bytes
    head: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def json(self) -> dict[str, object]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data


async def read_response(
    reader: asyncio.StreamReader, method: str = "GET", timeout: float = 2.0
) -> Response:
    """One response, framed as a client would (Content-Length, chunked, or until EOF)."""

    async def read() -> Response:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].decode("latin-1").split("\r\n")
        version, status_text, _ = (lines[0] + " ").split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        status = int(status_text)
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            assert sep, line
            headers.append((name.strip().lower(), value.strip()))
        fields = dict(headers)
        if method == "HEAD" or status in (204, 304) or status < 200:
            body = b""
        elif "content-length" in fields:
            body = await reader.readexactly(int(fields["content-length"]))
        elif fields.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                if size == 0:
                    assert await reader.readexactly(2) == b"\r\n"
                    break
                parts.append(await reader.readexactly(size))
                assert await reader.readexactly(2) == b"\r\n"
            body = b"".join(parts)
        else:
            body = await reader.read()  # delimited by the end of the connection
        return Response(status, headers, body, head)

    return await asyncio.wait_for(read(), timeout)


async def closed(reader: asyncio.StreamReader, timeout: float = 1.0) -> bool:
    """True if the server closes the connection within ``timeout`` without sending more."""
    try:
        data = await asyncio.wait_for(reader.read(1), timeout)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    assert data == b"", f"unexpected bytes after the response: {data!r}"
    return True


async def echo(request: HttpRequest) -> None:
    """Answers with what it saw, as JSON."""
    body = await request.read_body()
    info = {
        "method": request.method,
        "path": request.path,
        "raw_path": request.raw_path,
        "version": request.version,
        "body": body.decode("latin-1"),
        "headers": request.headers.items(),
    }
    request.respond(200, "", [("Content-Type", "application/json")], json.dumps(info).encode())


def ok(body: bytes = b"ok") -> Handler:
    async def handler(request: HttpRequest) -> None:
        request.respond(200, "", [("Content-Type", "text/plain")], body)

    return handler


# -- keep-alive -------------------------------------------------------------------------------


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async with serving(echo) as s, connection(s.port) as (reader, writer):
        for i in range(5):
            writer.write(request("POST", f"/r{i}", body=b"n%d" % i))
            resp = await read_response(reader)
            assert resp.status == 200
            assert resp.header("connection") is None  # HTTP/1.1 keeps the connection
            assert resp.json()["raw_path"] == f"/r{i}"
            assert resp.json()["body"] == f"n{i}"
        assert not await closed(reader, 0.1)
        assert len(s.server.connections) == 1


async def test_keep_alive_with_a_real_client() -> None:
    async with serving(echo) as s:
        async with httpx.AsyncClient(base_url=s.url) as client:
            for i in range(4):
                r = await client.post(f"/x?i={i}", content=b"abc")
                assert r.status_code == 200
                assert r.json()["body"] == "abc"
                assert r.json()["path"] == "/x"
            assert len(s.server.connections) == 1


async def test_http10_without_keep_alive_is_closed_after_the_answer() -> None:
    async with serving(ok(b"hello")) as s, connection(s.port) as (reader, writer):
        writer.write(request(version="1.0"))
        resp = await read_response(reader)
        assert (resp.status, resp.body) == (200, b"hello")
        assert resp.header("connection") == "close"
        assert await closed(reader)


async def test_http10_with_keep_alive_stays_open() -> None:
    async with serving(ok(b"hello")) as s, connection(s.port) as (reader, writer):
        for _ in range(2):
            writer.write(request(version="1.0", headers=(("Connection", "keep-alive"),)))
            resp = await read_response(reader)
            assert (resp.status, resp.body) == (200, b"hello")
            assert resp.header("connection") == "keep-alive"
        assert not await closed(reader, 0.1)


async def test_connection_close_request_is_answered_and_closed() -> None:
    async with serving(ok()) as s, connection(s.port) as (reader, writer):
        writer.write(request(headers=(("Connection", "close"),)))
        resp = await read_response(reader)
        assert resp.status == 200
        assert resp.header("connection") == "close"
        assert await closed(reader)


# -- pipelining -------------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order() -> None:
    async def slow_first(request: HttpRequest) -> None:
        body = await request.read_body()
        await asyncio.sleep({"/1": 0.1, "/2": 0.05}.get(request.path, 0))
        request.respond(200, "", [("X-Path", request.path)], body.upper())

    async with serving(slow_first) as s, connection(s.port) as (reader, writer):
        writer.write(
            request("POST", "/1", body=b"one")
            + request("POST", "/2", body=b"two")
            + request("POST", "/3", body=b"three")
        )
        got = [await read_response(reader) for _ in range(3)]
        assert [(r.header("x-path"), r.body) for r in got] == [
            ("/1", b"ONE"),
            ("/2", b"TWO"),
            ("/3", b"THREE"),
        ]
        assert not await closed(reader, 0.1)


async def test_pipelined_requests_ending_with_connection_close_are_all_answered() -> None:
    async with serving(echo) as s, connection(s.port) as (reader, writer):
        writer.write(
            request(target="/1")
            + request(target="/2")
            + request(target="/3", headers=(("Connection", "close"),))
        )
        got = []
        with contextlib.suppress(asyncio.IncompleteReadError, TimeoutError):
            for _ in range(3):
                got.append(await read_response(reader, timeout=1.0))
        assert [r.json()["raw_path"] for r in got] == ["/1", "/2", "/3"]
        assert [r.header("connection") for r in got] == [None, None, "close"]


async def test_pipelined_requests_then_half_close_are_all_answered() -> None:
    async with serving(echo) as s, connection(s.port) as (reader, writer):
        writer.write(request(target="/1") + request(target="/2") + request(target="/3"))
        writer.write_eof()  # the client has sent everything and waits for the answers
        got = []
        with contextlib.suppress(asyncio.IncompleteReadError, TimeoutError):
            for _ in range(3):
                got.append(await read_response(reader, timeout=1.0))
        assert [r.json()["raw_path"] for r in got] == ["/1", "/2", "/3"]


async def test_many_pipelined_requests_split_across_reads_are_all_answered() -> None:
    limits = ServerLimits(max_header_size=1024, client_timeout=5.0, keepalive_timeout=5.0)
    reqs = b"".join(request(target=f"/{i}") for i in range(60))
    async with serving(ok(), limits) as s, connection(s.port) as (reader, writer):
        # two writes, each ending inside a request head, the second over 1 KiB
        cut1, cut2 = 30, len(reqs) - 30
        for part in (reqs[:cut1], reqs[cut1:cut2], reqs[cut2:]):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.05)  # separate reads on the server
        statuses = []
        with contextlib.suppress(asyncio.IncompleteReadError, TimeoutError):
            for _ in range(60):
                statuses.append((await read_response(reader, timeout=0.5)).status)
        assert statuses == [200] * 60
        assert s.rejected == []


async def test_request_completed_in_a_read_that_ends_inside_the_next_head_is_answered() -> None:
    limits = ServerLimits(max_header_size=1024, client_timeout=0.5, keepalive_timeout=5.0)
    async with serving(echo, limits) as s, connection(s.port) as (reader, writer):
        writer.write(b"POST /1 HTTP/1.1\r\nHost: test\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        # the rest of the head, a 2 KiB body, and the start of the next request's head
        writer.write(b"Content-Length: 2000\r\n\r\n" + b"b" * 2000 + b"GET /2 HTTP/1.1\r\nHo")
        resp = await read_response(reader, timeout=1.0)
        assert resp.status == 200
        assert resp.json()["raw_path"] == "/1"


async def test_pipelined_requests_from_a_client_that_does_not_read_are_throttled() -> None:
    payload = b"x" * (128 * 1024)
    n = 200  # 25 MiB of answers

    async with serving(ok(payload)) as s, connection(s.port) as (_reader, writer):
        writer.write(b"".join(request(target=f"/{i}") for i in range(n)))
        await asyncio.sleep(0.5)  # the client reads nothing
        assert len(s.seen) < n // 2


# -- request bodies ---------------------------------------------------------------------------


async def test_content_length_body_that_came_with_the_head_is_complete() -> None:
    got: list[tuple[bool, bytes]] = []

    async def handler(request: HttpRequest) -> None:
        got.append((request.body_complete(), request.take_body()))
        request.respond(200, "", [], b"")

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(request("POST", body=b"0123456789"))
        assert (await read_response(reader)).status == 200
    assert got == [(True, b"0123456789")]


async def test_body_arriving_in_pieces_is_read_whole() -> None:
    complete_at_start: list[bool] = []

    async def handler(request: HttpRequest) -> None:
        complete_at_start.append(request.body_complete())
        body = await request.read_body()
        request.respond(200, "", [], body)

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\n")
        for piece in (b"abc", b"def", b"ghi"):
            await asyncio.sleep(0.05)
            writer.write(piece)
        resp = await read_response(reader)
        assert (resp.status, resp.body) == (200, b"abcdefghi")
    assert complete_at_start == [False]


async def test_chunked_upload_is_read_with_read_chunk_until_empty() -> None:
    pieces: list[bytes] = []

    async def handler(request: HttpRequest) -> None:
        assert request.body_exists and request.content_length is None
        while chunk := await request.read_chunk():
            pieces.append(chunk)
        request.respond(200, "", [], b"".join(pieces))

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        await asyncio.sleep(0.05)
        writer.write(b"1\r\n \r\n")
        await asyncio.sleep(0.05)
        writer.write(b"5\r\nworld\r\n0\r\n\r\n")
        resp = await read_response(reader)
        assert (resp.status, resp.body) == (200, b"hello world")
        assert len(pieces) >= 2  # it came in pieces, before its end
        assert not await closed(reader, 0.1)  # and the connection is reusable


async def test_large_body_is_streamed_with_back_pressure() -> None:
    size = 5 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)
    buffered_after_pause: list[int] = []
    total = 0
    digest = hashlib.sha256()

    async def handler(request: HttpRequest) -> None:
        nonlocal total
        await asyncio.sleep(0.3)  # the client keeps sending; the server must stop reading
        first = request.take_body()
        buffered_after_pause.append(len(first))
        total += len(first)
        digest.update(first)
        while chunk := await request.read_chunk():
            total += len(chunk)
            digest.update(chunk)
            await asyncio.sleep(0)
        request.respond(200, "", [], b"done")

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        for i in range(0, size, 64 * 1024):
            writer.write(payload[i : i + 64 * 1024])
            await writer.drain()

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        sender = asyncio.create_task(send(writer))
        resp = await read_response(reader, timeout=10.0)
        await sender
        assert (resp.status, resp.body) == (200, b"done")
    assert total == size
    assert digest.digest() == hashlib.sha256(payload).digest()
    # memory bounded: the 256 KiB high-water mark plus at most one read, not the 5 MiB sent
    assert 0 < buffered_after_pause[0] <= 768 * 1024


async def test_expect_continue_is_sent_only_when_the_handler_asks_for_the_body() -> None:
    asked = asyncio.Event()

    async def handler(request: HttpRequest) -> None:
        await asyncio.sleep(0.2)
        asked.set()
        body = await request.read_body()
        request.respond(200, "", [], body[::-1])

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(request("PUT", headers=(("Content-Length", "4"), ("Expect", "100-continue"))))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.1)  # nothing before the handler asks
        assert not asked.is_set()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1.0)
        assert asked.is_set()
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"abcd")
        resp = await read_response(reader)
        assert (resp.status, resp.body) == (200, b"dcba")


async def test_expect_continue_is_not_sent_when_the_handler_answers_without_the_body() -> None:
    async def handler(request: HttpRequest) -> None:
        request.respond(417, "", [], b"no")

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(request("PUT", headers=(("Content-Length", "4"), ("Expect", "100-continue"))))
        resp = await read_response(reader)
        assert (resp.status, resp.body) == (417, b"no")  # no 100 Continue before it
        assert resp.header("connection") == "close"  # the body was never sent


async def test_expect_continue_is_ignored_for_http10() -> None:
    async with serving(echo) as s, connection(s.port) as (reader, writer):
        writer.write(
            request(
                "PUT",
                version="1.0",
                headers=(("Content-Length", "4"), ("Expect", "100-continue")),
            )
        )
        await asyncio.sleep(0.1)
        writer.write(b"abcd")
        resp = await read_response(reader)
        assert resp.status == 200


# -- responses --------------------------------------------------------------------------------


async def test_respond_sends_content_length_and_body() -> None:
    async def handler(request: HttpRequest) -> None:
        request.respond(201, "Made", [("X-A", "1"), ("X-A", "2")], b"created!")

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(request())
        resp = await read_response(reader)
        assert resp.head.startswith(b"HTTP/1.1 201 Made\r\n")
        assert resp.header("content-length") == "8"
        assert [v for k, v in resp.headers if k == "x-a"] == ["1", "2"]
        assert resp.body == b"created!"


async def test_streamed_response_without_length_is_chunked_for_http11() -> None:
    async def handler(request: HttpRequest) -> None:
        await request.start(200, "", [("Content-Type", "text/event-stream")], None)
        for part in (b"data: 1\n\n", b"", b"data: 2\n\n"):
            await request.write(part)
        await request.finish()

    async with serving(handler) as s:
        async with connection(s.port) as (reader, writer):
            writer.write(request())
            resp = await read_response(reader)
            assert resp.header("transfer-encoding") == "chunked"
            assert resp.header("content-length") is None
            assert resp.body == b"data: 1\n\ndata: 2\n\n"
            assert not await closed(reader, 0.1)
        async with httpx.AsyncClient() as client:
            r = await client.get(s.url + "/")
            assert r.content == b"data: 1\n\ndata: 2\n\n"


async def test_streamed_response_without_length_is_close_delimited_for_http10() -> None:
    async def handler(request: HttpRequest) -> None:
        await request.start(200, "", [], None)
        await request.write(b"part one, ")
        await asyncio.sleep(0.02)
        await request.write(b"part two")
        await request.finish()

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(request(version="1.0", headers=(("Connection", "keep-alive"),)))
        resp = await read_response(reader)
        assert resp.header("transfer-encoding") is None
        assert resp.header("content-length") is None
        assert resp.header("connection") == "close"
        assert resp.body == b"part one, part two"  # read until the server closed


async def test_streamed_response_with_length() -> None:
    async def handler(request: HttpRequest) -> None:
        await request.start(200, "", [], 10)
        await request.write(b"01234")
        await request.write(b"56789")
        await request.finish()

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        for _ in range(2):
            writer.write(request())
            resp = await read_response(reader)
            assert resp.header("content-length") == "10"
            assert resp.header("transfer-encoding") is None
            assert resp.body == b"0123456789"


async def test_head_gets_the_head_only_with_content_length_kept() -> None:
    async def handler(request: HttpRequest) -> None:
        request.respond(200, "", [("Content-Type", "text/plain")], b"hello")

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(request("HEAD"))
        resp = await read_response(reader, method="HEAD")
        assert resp.header("content-length") == "5"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.1)  # no body bytes on the wire
        writer.write(request("GET"))  # the connection is still in step
        resp = await read_response(reader)
        assert resp.body == b"hello"


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
async def test_streamed_body_is_dropped_when_the_response_has_none(
    method: str, status: int
) -> None:
    async def handler(request: HttpRequest) -> None:
        await request.start(status, "", [], 5 if status == 200 else None)
        await request.write(b"hello")
        await request.finish()

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(request(method))
        resp = await read_response(reader, method=method)
        assert resp.status == status
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.1)


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_statuses_have_no_body(status: int) -> None:
    async def handler(request: HttpRequest) -> None:
        request.respond(status, "", [("ETag", '"x"')], b"must not be sent")

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(request())
        resp = await read_response(reader)
        assert resp.status == status
        assert resp.header("content-length") is None
        assert resp.header("transfer-encoding") is None
        writer.write(request())  # the next answer starts right after the head
        assert (await read_response(reader)).status == status


async def test_start_with_204_has_no_framing_headers() -> None:
    async def handler(request: HttpRequest) -> None:
        await request.start(204, "", [], None)
        await request.finish()

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        for _ in range(2):
            writer.write(request())
            resp = await read_response(reader)
            assert resp.status == 204
            assert resp.header("transfer-encoding") is None
            assert resp.header("content-length") is None


async def test_abort_mid_body_cuts_the_connection() -> None:
    async def handler(request: HttpRequest) -> None:
        await request.start(200, "", [], 100)
        await request.write(b"x" * 10)
        await asyncio.sleep(0.05)
        request.abort()

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(request())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1.0)
        assert b"Content-Length: 100\r\n" in head
        with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)) as info:
            await asyncio.wait_for(reader.readexactly(100), 1.0)
        if isinstance(info.value, asyncio.IncompleteReadError):
            assert info.value.partial == b"x" * 10


# -- limits and bad input ---------------------------------------------------------------------


async def expect_rejection(port: int, data: bytes, status: int) -> Response:
    async with connection(port) as (reader, writer):
        writer.write(data)
        resp = await read_response(reader)
        assert resp.status == status
        assert resp.header("content-type") == "application/json"
        assert resp.header("connection") == "close"
        info = resp.json()
        assert info["status"] == status
        rid = info["request_id"]
        assert isinstance(rid, str) and len(rid) == 32
        assert resp.header("x-request-id") == rid
        assert await closed(reader)
        return resp


async def test_single_huge_header_gets_431() -> None:
    async with serving(echo) as s:
        await expect_rejection(s.port, request(headers=(("X-Big", "a" * 5000),)), 431)
        assert s.seen == []
        assert s.rejected == [431]


async def test_many_headers_over_the_limit_get_431() -> None:
    # each field is small; the head is over four times max_header_size (16 KiB)
    headers = tuple((f"X-H{i}", "v" * 50) for i in range(300))
    async with serving(echo) as s:
        await expect_rejection(s.port, request(headers=headers), 431)
        assert s.rejected == [431]


async def test_head_of_many_fields_up_to_four_times_the_limit_is_served() -> None:
    # max_header_size bounds each line (as aiohttp and nginx do); the whole head gets 4x
    headers = tuple((f"X-H{i}", "v" * 50) for i in range(200))  # ~12 KiB, fields < 4 KiB
    async with serving(echo) as s, connection(s.port) as (reader, writer):
        writer.write(request(headers=headers))
        assert (await read_response(reader)).status == 200
        assert s.rejected == []


async def test_head_just_under_the_limit_is_served() -> None:
    async with serving(echo) as s, connection(s.port) as (reader, writer):
        writer.write(request(headers=(("X-Big", "a" * 3900),)))
        assert (await read_response(reader)).status == 200
        assert s.rejected == []


async def test_head_dribbled_in_small_writes_is_rejected_once_over_the_limit() -> None:
    async with serving(echo) as s, connection(s.port) as (reader, writer):
        answer = asyncio.create_task(read_response(reader, timeout=5.0))
        sent = 0
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        with contextlib.suppress(ConnectionError):
            while not answer.done() and sent < 256 * 1024:
                writer.write(b"a" * 64)  # a header value that never ends
                sent += 64
                await asyncio.sleep(0.001)
        resp = await answer
        assert resp.status == 431
        assert sent <= 5 * 4096  # rejected near the 16 KiB head limit, not buffered for ever
        assert s.rejected == [431]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GET / HTTX/1.1\r\nHost: t\r\n\r\n", id="bad-version"),
        pytest.param(b"this is not http\r\n\r\n", id="garbage-line"),
        pytest.param(b"FOO / HTTP/1.1\r\nHost: t\r\n\r\n", id="invalid-method"),
        pytest.param(b"GET /a\x00b HTTP/1.1\r\nHost: t\r\n\r\n", id="nul-in-url"),
        pytest.param(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", id="space-in-name"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            id="length-and-chunked",
        ),
        pytest.param(
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32)) + b"\x00" * 40,
            id="tls-client-hello",
        ),
        pytest.param(b"GET a/b HTTP/1.1\r\nHost: t\r\n\r\n", id="relative-target"),
    ],
)
async def test_malformed_request_gets_400_and_close(data: bytes) -> None:
    async with serving(echo) as s:
        await expect_rejection(s.port, data, 400)
        assert s.seen == []
        assert s.rejected == [400]


async def test_head_not_received_in_time_gets_408() -> None:
    async with serving(echo, FAST) as s:
        async with connection(s.port) as (reader, writer):
            began = time.monotonic()
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n")  # and nothing more
            resp = await read_response(reader)
            waited = time.monotonic() - began
            assert resp.status == 408
            assert resp.json()["status"] == 408
            assert resp.header("connection") == "close"
            assert await closed(reader)
        assert 0.25 <= waited < 1.0
        assert s.rejected == [408]


async def test_idle_keep_alive_connection_is_closed_after_the_timeout() -> None:
    async with serving(ok(), FAST) as s, connection(s.port) as (reader, writer):
        writer.write(request())
        assert (await read_response(reader)).status == 200
        answered = time.monotonic()
        assert await closed(reader, 1.5)
        assert 0.25 <= time.monotonic() - answered < 1.0
        assert s.rejected == []  # closed quietly, without a 408


async def test_a_busy_connection_is_not_closed_by_the_idle_timeout() -> None:
    async def slow(request: HttpRequest) -> None:
        await asyncio.sleep(0.5)  # longer than both timeouts
        request.respond(200, "", [], b"late")

    async with serving(slow, FAST) as s, connection(s.port) as (reader, writer):
        writer.write(request())
        resp = await read_response(reader)
        assert resp.body == b"late"


async def test_head_started_during_a_slow_answer_keeps_its_client_timeout() -> None:
    limits = ServerLimits(max_header_size=4096, client_timeout=2.0, keepalive_timeout=0.3)

    async def slow(request: HttpRequest) -> None:
        await asyncio.sleep(0.1)
        request.respond(200, "", [], b"ok")

    async with serving(slow, limits) as s, connection(s.port) as (reader, writer):
        writer.write(request(target="/1") + b"GET /2 HTTP/1.1\r\n")  # the 2nd head, partly
        assert (await read_response(reader)).status == 200
        await asyncio.sleep(0.5)  # within client_timeout
        writer.write(b"Host: t\r\n\r\n")
        assert (await read_response(reader)).status == 200


async def test_bad_chunked_body_makes_read_chunk_raise() -> None:
    errors: list[Exception] = []

    async def handler(request: HttpRequest) -> None:
        try:
            while await request.read_chunk():
                pass
        except BadRequestBody as exc:
            errors.append(exc)
            request.respond(400, "", [], b"bad body")
            return
        request.respond(200, "", [], b"")

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        await asyncio.sleep(0.05)
        writer.write(b"3\r\nabc\r\nzz-not-hex\r\n")
        resp = await read_response(reader)
        assert (resp.status, resp.body) == (400, b"bad body")
        assert resp.header("connection") == "close"
    assert len(errors) == 1
    assert s.rejected == []  # the handler answered it, not the server


async def test_chunked_trailers_do_not_become_request_headers() -> None:
    seen: list[bool] = []

    async def handler(request: HttpRequest) -> None:
        await request.read_body()
        seen.append("x-canary-arm" in request.headers)
        request.respond(200, "", [], b"")

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Canary-Arm: candidate\r\n\r\n"
        )
        assert (await read_response(reader)).status == 200
    assert seen == [False]


async def test_chunked_coding_in_a_second_transfer_encoding_header_is_a_body() -> None:
    seen: list[tuple[bool, bytes]] = []

    async def handler(request: HttpRequest) -> None:
        exists = request.body_exists
        body = await request.read_body()
        seen.append((exists, body))
        request.respond(200, "", [], body)

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        await asyncio.sleep(0.05)
        writer.write(b"3\r\nabc\r\n0\r\n\r\n")
        resp = await read_response(reader)
        assert resp.status in (200, 400)  # either served with its body, or refused
        if resp.status == 200:
            assert seen == [(True, b"abc")]


async def test_upgrade_request_is_answered_plainly_and_nothing_after_it_is_read() -> None:
    async with serving(echo) as s, connection(s.port) as (reader, writer):
        writer.write(
            request("GET", "/ws", headers=(("Connection", "Upgrade"), ("Upgrade", "websocket")))
            + request("GET", "/after")
        )
        resp = await read_response(reader)
        assert (resp.status, resp.json()["raw_path"]) == (200, "/ws")
        assert resp.header("connection") == "close"
        assert resp.header("upgrade") is None
        assert await closed(reader)
    assert [r.raw_path for r in s.seen] == ["/ws"]


async def test_upgrade_request_with_a_body_is_not_served_without_it() -> None:
    async with serving(echo) as s, connection(s.port) as (reader, writer):
        writer.write(
            request(
                "POST",
                "/up",
                headers=(("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c")),
                body=b"abc",
            )
        )
        resp = await read_response(reader)
        assert resp.status in (200, 400)  # served with its body, or refused
        if resp.status == 200:
            assert resp.json()["body"] == "abc"


async def test_early_answer_to_a_large_body_reaches_the_client() -> None:
    size = 32 * 1024 * 1024

    async def too_large(request: HttpRequest) -> None:
        assert request.content_length == size
        request.respond(413, "", [("Content-Type", "text/plain")], b"too large")

    async with serving(too_large) as s, connection(s.port) as (reader, writer):
        # Like most clients, send the whole body before reading: the server must read and drop
        # it (lingering close), or the client's writes reset the connection and lose the 413.
        writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        piece = b"z" * (256 * 1024)
        for _ in range(size // len(piece)):
            writer.write(piece)
            await asyncio.wait_for(writer.drain(), 2.0)
        resp = await read_response(reader, timeout=2.0)
        assert (resp.status, resp.body) == (413, b"too large")
        assert resp.header("connection") == "close"
        assert await closed(reader, 3.0)


# -- handler failures -------------------------------------------------------------------------


async def test_handler_that_raises_gets_500_and_the_server_keeps_serving() -> None:
    async def handler(request: HttpRequest) -> None:
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        request.respond(200, "", [], b"fine")

    async with serving(handler) as s:
        async with connection(s.port) as (reader, writer):
            writer.write(request(target="/boom"))
            resp = await read_response(reader)
            assert resp.status == 500
            assert resp.header("content-type") == "application/json"
            assert resp.header("connection") == "close"
            info = resp.json()
            assert info["status"] == 500 and len(str(info["request_id"])) == 32
            assert await closed(reader)
        async with httpx.AsyncClient() as client:
            r = await client.get(s.url + "/fine")
            assert (r.status_code, r.content) == (200, b"fine")


async def test_handler_that_raises_after_the_head_cuts_the_connection() -> None:
    async def handler(request: HttpRequest) -> None:
        await request.start(200, "", [], None)
        await request.write(b"partial")
        raise RuntimeError("upstream went away")

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(request())
        with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
            await read_response(reader)  # the chunked body never ends properly


async def test_handler_that_returns_without_answering_closes_the_connection() -> None:
    async def silent(request: HttpRequest) -> None:
        return None

    async with serving(silent) as s, connection(s.port) as (reader, writer):
        writer.write(request())
        assert await closed(reader)


# -- client disconnects -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_gone_while_the_handler_awaits_the_body(how: str) -> None:
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def handler(request: HttpRequest) -> None:
        try:
            await request.read_body()
        except BaseException as exc:
            outcome.set_result(exc)
            raise
        outcome.set_result(None)
        request.respond(200, "", [], b"")

    async with serving(handler) as s, connection(s.port) as (_reader, writer):
        writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
        await asyncio.sleep(0.05)
        if how == "close":
            writer.close()
        else:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
            writer.transport.abort()
        exc = await asyncio.wait_for(outcome, 1.0)
        assert isinstance(exc, ConnectionError)


async def test_client_gone_during_a_streamed_response_makes_write_raise() -> None:
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def handler(request: HttpRequest) -> None:
        await request.start(200, "", [], None)
        try:
            for _ in range(1000):
                await request.write(b"e" * 65536)
                await asyncio.sleep(0.005)
        except BaseException as exc:
            outcome.set_result(exc)
            raise
        outcome.set_result(None)

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(request())
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1.0)
        await asyncio.wait_for(reader.read(1000), 1.0)
        writer.close()
        exc = await asyncio.wait_for(outcome, 2.0)
        assert isinstance(exc, ConnectionError)


# -- graceful stop ----------------------------------------------------------------------------


async def test_close_drops_idle_connections_and_finishes_in_flight_requests() -> None:
    entered = asyncio.Event()

    async def handler(request: HttpRequest) -> None:
        if request.path == "/slow":
            entered.set()
            await asyncio.sleep(0.3)
        request.respond(200, "", [], request.path.encode())

    async with serving(handler) as s:
        async with connection(s.port) as (idle_r, idle_w), connection(s.port) as (busy_r, busy_w):
            idle_w.write(request(target="/quick"))
            assert (await read_response(idle_r)).body == b"/quick"
            busy_w.write(request(target="/slow"))
            await asyncio.wait_for(entered.wait(), 1.0)

            stopping = asyncio.create_task(s.server.close(grace=5.0))
            assert await closed(idle_r, 0.2)  # at once
            assert not stopping.done()  # the slow request is still in flight
            resp = await read_response(busy_r)
            assert (resp.status, resp.body) == (200, b"/slow")
            assert resp.header("connection") == "close"
            assert await closed(busy_r)
            await asyncio.wait_for(stopping, 1.0)

        with pytest.raises(OSError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", s.port), 1.0)


async def test_close_aborts_requests_still_running_after_the_grace() -> None:
    async def stuck(request: HttpRequest) -> None:
        await asyncio.sleep(30)

    async with serving(stuck) as s, connection(s.port) as (reader, writer):
        writer.write(request())
        await asyncio.sleep(0.05)
        began = time.monotonic()
        await asyncio.wait_for(s.server.close(grace=0.2), 2.0)
        assert time.monotonic() - began < 1.0
        assert await closed(reader)


async def test_close_waits_while_an_in_flight_answer_is_flushed() -> None:
    size = 8 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)

    async def handler(request: HttpRequest) -> None:
        await asyncio.sleep(0.1)
        request.respond(200, "", [], payload)

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(request())
        await asyncio.sleep(0.02)
        stopping = asyncio.create_task(s.server.close(grace=5.0))
        resp = await read_response(reader, timeout=5.0)  # read while the server stops
        assert resp.body == payload
        assert resp.header("connection") == "close"
        await asyncio.wait_for(stopping, 1.0)


async def test_close_does_not_cut_an_answer_still_being_sent_on_an_idle_connection() -> None:
    size = 32 * 1024 * 1024

    async with serving(ok(b"p" * size)) as s, connection(s.port) as (reader, writer):
        writer.write(request())
        await asyncio.sleep(0.1)  # answered; the client has not read it yet
        stopping = asyncio.create_task(s.server.close(grace=5.0))
        await asyncio.sleep(0.1)
        assert not stopping.done()  # waits for the buffered answer to be sent
        resp = await read_response(reader, timeout=5.0)  # the client reads while it stops
        assert len(resp.body) == size
        await asyncio.wait_for(stopping, 2.0)


# -- the request's path -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ("/v1/models", "/v1/models"),
        ("/a/%2e%2e/b", "/b"),
        ("/a/%2E%2E/b", "/b"),
        ("/v1/../admin", "/admin"),
        ("/v1/./x/../y", "/v1/y"),
        ("/a/b/..", "/a/"),
        ("/../../etc", "/etc"),
        ("/a%20b/c%3Fd", "/a b/c?d"),
        ("/v1/chat?x=/../y&z=%2e%2e", "/v1/chat"),
        ("/q?", "/q"),
    ],
)
async def test_path_is_decoded_and_resolved_and_raw_path_untouched(raw: str, path: str) -> None:
    async with serving(echo) as s, connection(s.port) as (reader, writer):
        writer.write(request(target=raw))
        info = (await read_response(reader)).json()
        assert info["path"] == path
        assert info["raw_path"] == raw


@pytest.mark.parametrize("raw", ["/..", "/a/..", "/."])
async def test_dot_segments_resolving_to_the_root_give_slash(raw: str) -> None:
    async with serving(echo) as s, connection(s.port) as (reader, writer):
        writer.write(request(target=raw))
        assert (await read_response(reader)).json()["path"] == "/"


# -- misc -------------------------------------------------------------------------------------


async def test_headers_keep_order_and_get_is_case_insensitive() -> None:
    seen: list[object] = []

    async def handler(request: HttpRequest) -> None:
        h = request.headers
        seen.extend([h.get("x-dup"), h.get("X-DUP"), "X-Dup" in h, h.get("nope", "d"), len(h)])
        seen.append(request.host)
        request.respond(200, "", [], b"")

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(request(headers=(("X-Dup", "1"), ("x-dup", "2"))))
        assert (await read_response(reader)).status == 200
    assert seen == ["1", "1", True, "d", 3, "test"]
    assert [k for k, _ in s.seen[0].headers.items()] == ["Host", "X-Dup", "x-dup"]


def test_error_body_is_json_with_the_request_id() -> None:
    assert json.loads(error_body(404, "no route", "abc")) == {
        "error": "no route",
        "status": 404,
        "request_id": "abc",
    }


async def test_absolute_form_target_is_served_with_its_authority_as_host() -> None:
    # RFC 9112 section 3.2.2: a server must accept absolute-form; its authority replaces Host.
    seen_host: list[str] = []

    async def handler(req: HttpRequest) -> None:
        seen_host.append(req.host)
        await echo(req)

    async with serving(handler) as s, connection(s.port) as (reader, writer):
        writer.write(b"GET http://example.com:8080/v1/x?q=1 HTTP/1.1\r\nHost: other\r\n\r\n")
        resp = await read_response(reader)
        writer.write(b"GET ftp://example.com/ HTTP/1.1\r\nHost: t\r\n\r\n")
        bad = await read_response(reader)
    assert resp.status == 200
    assert resp.json()["raw_path"] == "/v1/x?q=1" and resp.json()["path"] == "/v1/x"
    assert seen_host == ["example.com:8080"]
    assert bad.status == 400
