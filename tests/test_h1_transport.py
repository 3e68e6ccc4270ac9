"""The HTTP/1.1 upstream client against real loopback servers, well-behaved and not.

Every test runs on the default asyncio loop and on uvloop (the loop ``canary run`` uses; their
transports differ, see conftest's ``pytest_asyncio_loop_factories``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from canary.errors import UpstreamError
from canary.proxy import H1Transport, Timeouts
from canary.proxy.upstream import (
    RequestBodyTooLarge,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from loadtest.scenarios import dead_url

T = Timeouts(total=5.0, connect=2.0, read=None)


@contextlib.asynccontextmanager
async def app_server(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[tuple[str, set[object]]]:
    """An aiohttp server; yields its base URL and the set of client ports it has seen."""
    peers: set[object] = set()

    async def wrapped(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", wrapped)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", peers
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_server(
    respond: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A server that answers with whatever bytes ``respond`` writes (for broken upstreams)."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await respond(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def call(
    t: H1Transport,
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    timeouts: Timeouts = T,
    headers: list[tuple[str, str]] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    resp = await t.send(method, url, headers or [("Host", "upstream")], body, timeouts)
    try:
        data = b"".join([c async for c in resp.chunks()])
    finally:
        resp.close()
    return resp.status, dict(resp.headers), data


async def test_keep_alive_reuses_one_connection_and_forwards_bytes_exactly() -> None:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=body[::-1], headers={"X-Path": request.raw_path})

    t = H1Transport()
    async with app_server(echo) as (base, peers):
        for i in range(30):
            status, headers, data = await call(t, base + f"/p?q={i}&x=%2F", "POST", b"abc%d" % i)
            assert status == 200
            assert data == (b"abc%d" % i)[::-1]
            assert headers["X-Path"] == f"/p?q={i}&x=%2F"
    await t.close()
    assert len(peers) == 1  # every request on the same keep-alive connection


async def test_pool_limit_bounds_connections_under_concurrency() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.01)
        return web.Response(text="ok")

    t = H1Transport(limit_per_host=3)
    async with app_server(slow) as (base, peers):
        results = await asyncio.gather(*(call(t, base + "/") for _ in range(40)))
    await t.close()
    assert all(r[0] == 200 and r[2] == b"ok" for r in results)
    assert len(peers) <= 3


async def test_stale_idle_connection_is_retried_on_a_new_one() -> None:
    served = 0

    async def once_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await read_head(reader)
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # Keep-alive was promised, but the server drops the idle connection right away.

    t = H1Transport()
    async with raw_server(once_then_close) as base:
        assert (await call(t, base + "/"))[2] == b"ok"
        await asyncio.sleep(0.05)  # the close reaches the client while the connection is idle
        assert (await call(t, base + "/"))[2] == b"ok"
    await t.close()
    assert served == 2


async def test_body_delimited_by_connection_close() -> None:
    async def http10(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"part two")
        await writer.drain()

    t = H1Transport()
    async with raw_server(http10) as base:
        status, _, data = await call(t, base + "/")
    await t.close()
    assert (status, data) == (200, b"part one, part two")


async def test_chunked_stream_arrives_in_pieces_before_the_end() -> None:
    gate = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await gate.wait()
        await resp.write(b"data: second\n\n")
        await resp.write_eof()
        return resp

    t = H1Transport()
    async with app_server(stream) as (base, _):
        resp = await t.send("GET", base + "/", [("Host", "u")], None, T)
        it = resp.chunks().__aiter__()
        first = await asyncio.wait_for(it.__anext__(), 2.0)  # while the server still waits
        gate.set()
        rest = b"".join([c async for c in it])
        resp.close()
    await t.close()
    assert first == b"data: first\n\n"
    assert rest == b"data: second\n\n"


async def test_large_response_with_back_pressure_is_complete() -> None:
    payload = bytes(range(256)) * 16384  # 4 MiB: reading pauses and resumes many times

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=payload)

    t = H1Transport()
    async with app_server(big) as (base, peers):
        resp = await t.send("GET", base + "/", [("Host", "u")], None, T)
        got = bytearray()
        async for chunk in resp.chunks():
            got += chunk
            await asyncio.sleep(0)  # a slow consumer
        resp.close()
        assert (await call(t, base + "/"))[2] == payload  # and the connection is reusable
    await t.close()
    assert bytes(got) == payload
    assert len(peers) == 1


async def test_streamed_request_body_is_sent_chunked() -> None:
    async def count(request: web.Request) -> web.Response:
        data = await request.read()
        return web.Response(text=f"{len(data)} {request.headers.get('Transfer-Encoding')}")

    async def body() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 1000
            await asyncio.sleep(0)

    t = H1Transport()
    async with app_server(count) as (base, _):
        resp = await t.send("POST", base + "/", [("Host", "u")], body(), T)
        data = await resp.read()
        resp.close()
    await t.close()
    assert data == b"100000 chunked"


async def test_failing_request_body_fails_the_request_and_drops_the_connection() -> None:
    async def sink(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="ok")

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 100
        raise RequestBodyTooLarge("request body exceeds 100 bytes")

    t = H1Transport()
    async with app_server(sink) as (base, _):
        with pytest.raises(RequestBodyTooLarge):
            await t.send("POST", base + "/", [("Host", "u")], body(), T)
        assert (await call(t, base + "/"))[2] == b"ok"  # the pool is still usable
    await t.close()


async def test_head_response_has_no_body_despite_its_length() -> None:
    async def head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1.0)

    t = H1Transport()
    async with raw_server(head) as base:
        status, headers, data = await asyncio.wait_for(call(t, base + "/", "HEAD"), 0.5)
    await t.close()
    assert (status, headers["Content-Length"], data) == (200, "1234", b"")


async def test_interim_100_continue_is_skipped() -> None:
    async def cont(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nyes"
        )
        await writer.drain()

    t = H1Transport()
    async with raw_server(cont) as base:
        status, _, data = await call(t, base + "/", "POST", b"{}")
    await t.close()
    assert (status, data) == (201, b"yes")


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", UpstreamProtocolError),
        (b"", UpstreamReset),  # closed without a byte
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", UpstreamReset),
    ],
)
async def test_broken_upstreams_raise_the_right_error(
    reply: bytes, error: type[UpstreamError]
) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(reply)
        await writer.drain()

    t = H1Transport()
    async with raw_server(broken) as base:
        with pytest.raises(error):
            await call(t, base + "/")
    await t.close()


async def test_connect_error_names_the_upstream() -> None:
    t = H1Transport()
    with pytest.raises(UpstreamConnectError, match=r"cannot connect to 127\.0\.0\.1"):
        await call(t, dead_url() + "/")
    await t.close()


@pytest.mark.parametrize("which", ["read", "total"])
async def test_read_and_total_timeouts(which: str) -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(40):  # a byte every 50 ms: never silent for 0.2 s, never finished
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await asyncio.sleep(2.0)

    t = H1Transport()
    if which == "read":
        timeouts, respond, limit = Timeouts(total=5.0, connect=1.0, read=0.2), silent, 0.2
    else:
        timeouts, respond, limit = Timeouts(total=0.4, connect=1.0, read=0.2), trickle, 0.4
    async with raw_server(respond) as base:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamTimeout, match=which):
            await call(t, base + "/", timeouts=timeouts)
        elapsed = loop.time() - started
    await t.close()
    # uvloop rounds timers to the millisecond; a loaded CI machine is slow to wake
    assert limit - 0.005 <= elapsed < limit + 1.5


async def test_https_endpoints_go_through_aiohttp() -> None:
    t = H1Transport()
    # Nothing listens there: the point is which client reports the failure.
    with pytest.raises(UpstreamError):
        await call(t, "https" + dead_url()[4:] + "/")
    assert t._tls is not None
    await t.close()
