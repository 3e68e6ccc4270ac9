"""Conformance of the upstream side (issue 12, findings 1, 4 and 5), on raw sockets.

A real canary forwards to :class:`~tests.upstream_harness.Upstream`, a scriptable upstream
that records every request it receives. Each test asserts what the client got AND how many
times each upstream received the request. The reference is nginx 1.22 (``proxy_next_upstream``
without ``non_idempotent``) and RFC 9110/9112:

- a request is delivered at most once unless it provably did not reach the upstream or its
  method is idempotent (RFC 9110 9.2.2); failover to production follows the same rule unless
  ``routing.failover_methods: all``;
- bytes from an upstream while no response is expected close the connection for good;
- response heads are bounded, status codes outside 100-599 and unsolicited 101s are 502s,
  interim 1xx answers are skipped.

Every test runs on asyncio and on uvloop (the loop ``canary run`` uses).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from canary.config import load_config_text
from canary.errors import ConfigError
from canary.proxy import AiohttpTransport, H1Transport
from canary.proxy.upstream import (
    IDEMPOTENT_METHODS,
    Timeouts,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamReset,
    never_sent,
)
from loadtest.scenarios import dead_url
from tests.conftest import Canary, rollout_config, running_canary
from tests.upstream_harness import (
    RawResponse,
    Received,
    Reply,
    Upstream,
    exchange,
    read_response,
    request,
)

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
Run = Callable[[Coroutine[Any, Any, None]], None]

METHODS = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST", "PATCH"]
WITH_BODY = {"POST", "PUT", "PATCH"}
CHARGE = b'{"amount": 1}'


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Run:
    """Run a coroutine on a fresh loop of the parametrised kind."""

    def runner(coro: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
            r.run(coro)

    return runner


def config(
    production: str,
    candidate: str,
    *,
    weight: int = 0,
    routing: dict[str, Any] | None = None,
    proxy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    cfg = rollout_config(
        [production],
        [candidate],
        steps=[{"weight": weight}],
        routing={"override_header": "X-Canary-Arm", "timeout": "5s", **(routing or {})},
    )
    cfg["proxy"].update(proxy or {})
    return cfg


def ok_for(req: Received, body: bytes = b"ok") -> Reply:
    """A good answer; no body bytes for HEAD (they would be bytes after the response)."""
    if req.method == "HEAD":
        return Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
    return Reply.ok(body)


def client_request(method: str, path: str = "/charge") -> bytes:
    if method in WITH_BODY:
        return request(method, path, CHARGE, "Content-Type: application/json\r\n")
    return request(method, path)


def is_json_error(r: RawResponse, status: int) -> bool:
    return r.status == status and "error" in json.loads(r.body)


async def settle(can: Canary) -> None:
    """Wait until the proxy forwards nothing (the inflight gauge is back to 0)."""
    for _ in range(200):
        if can.runtime.metrics.counters.inflight == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"inflight stays {can.runtime.metrics.counters.inflight}")


def port(can: Canary) -> int:
    assert can.runtime.proxy_port is not None
    return can.runtime.proxy_port


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- finding 1: at most one delivery unless safe --------------------------------------------


def _first_answered_then_drop(req: Received) -> Reply:
    """The issue's upstream: answers the first request of each connection, drops after
    reading the second (a crash, or its idle timeout racing ours)."""
    return ok_for(req, b"first") if req.seq == 0 else Reply.drop()


@pytest.mark.parametrize("method", METHODS)
def test_stale_pooled_connection_retries_only_idempotent_methods(run: Run, method: str) -> None:
    async def go() -> None:
        async with Upstream(_first_answered_then_drop) as prod, Upstream(ok_for) as cand:
            async with running_canary(config(prod.url, cand.url)) as can:
                warm = await exchange(port(can), request("GET", "/warm"))
                assert (warm.status, warm.body) == (200, b"first")
                r = await exchange(port(can), client_request(method), method)
                await settle(can)
        deliveries = [q for q in prod.requests if q.path == "/charge"]
        assert all(q.method == method for q in deliveries)
        if method in IDEMPOTENT_METHODS:
            # Once on the kept-alive connection (never answered), once on a fresh one.
            assert r.status == 200 and r.body == (b"" if method == "HEAD" else b"first")
            assert [(q.conn, q.seq) for q in deliveries] == [(0, 1), (1, 0)]
            assert deliveries[0].raw == deliveries[1].raw  # the same bytes, resent
        else:
            assert is_json_error(r, 502), r
            assert len(deliveries) == 1  # nginx: 502, delivered once
            assert "production" in json.loads(r.body)["error"]
        if method in WITH_BODY:
            assert all(q.body == CHARGE for q in deliveries)
        assert cand.count() == 0

    run(go())


def test_issue_repro_post_to_a_candidate_is_not_delivered_twice_nor_failed_over(
    run: Run,
) -> None:
    """Issue 12 finding 1, verbatim: with failover on, the POST reached the candidate twice
    and production once; now once, and the client gets 502."""

    async def go() -> None:
        async with Upstream(_first_answered_then_drop) as cand, Upstream(ok_for) as prod:
            async with running_canary(config(prod.url, cand.url, weight=100)) as can:
                warm = await exchange(port(can), request("GET", "/warm"))
                assert warm.status == 200 and warm.header("X-Canary-Arm") == "candidate"
                raw = (
                    b"POST /charge HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 13\r\n\r\n{"amount": 1}'
                )
                r = await exchange(port(can), raw, "POST")
                await settle(can)
        assert is_json_error(r, 502), r
        assert r.header("X-Canary-Arm") == "candidate"
        assert cand.count("POST", "/charge") == 1
        assert prod.count("POST", "/charge") == 0

    run(go())


@pytest.mark.parametrize("failover_methods", ["idempotent", "all"])
@pytest.mark.parametrize("method", METHODS)
def test_failover_of_a_candidate_that_reads_and_drops(
    run: Run, method: str, failover_methods: str
) -> None:
    async def go() -> None:
        async with Upstream(lambda q: Reply.drop()) as cand, Upstream(ok_for) as prod:
            cfg = config(
                prod.url, cand.url, weight=100, routing={"failover_methods": failover_methods}
            )
            async with running_canary(cfg) as can:
                r = await exchange(port(can), client_request(method), method)
                await settle(can)
        assert cand.count(method, "/charge") == 1  # a fresh connection: never resent
        if method in IDEMPOTENT_METHODS or failover_methods == "all":
            assert r.status == 200 and r.header("X-Canary-Arm") == "production"
            assert prod.count(method, "/charge") == 1
        else:
            assert is_json_error(r, 502), r
            assert r.header("X-Canary-Arm") == "candidate"
            assert prod.count() == 0

    run(go())


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH"])
def test_failover_after_a_candidate_error_status_follows_the_method_rule(
    run: Run, method: str
) -> None:
    """A 5xx means the candidate processed the request: a POST is not replayed by default."""

    async def go() -> None:
        def fail(q: Received) -> Reply:
            return Reply.ok(b'{"error": "boom"}', "500 Internal Server Error")

        async with Upstream(fail) as cand, Upstream(ok_for) as prod:
            async with running_canary(config(prod.url, cand.url, weight=100)) as can:
                r = await exchange(port(can), client_request(method), method)
                await settle(can)
        assert cand.count(method, "/charge") == 1
        if method in IDEMPOTENT_METHODS:
            assert r.status == 200 and r.header("X-Canary-Arm") == "production"
            assert prod.count() == 1
        else:
            assert r.status == 500 and r.body == b'{"error": "boom"}'
            assert prod.count() == 0

    run(go())


@pytest.mark.parametrize("method", METHODS)
def test_candidate_refusing_connections_fails_over_for_every_method(run: Run, method: str) -> None:
    async def go() -> None:
        async with Upstream(ok_for) as prod:
            async with running_canary(config(prod.url, dead_url(), weight=100)) as can:
                r = await exchange(port(can), client_request(method), method)
                await settle(can)
        assert r.status == 200 and r.header("X-Canary-Arm") == "production"
        assert prod.count(method, "/charge") == 1

    run(go())


def test_a_connection_closed_while_idle_is_not_written_to(run: Run) -> None:
    """The upstream closes each connection after answering: the next POST goes on a fresh
    connection (the closed one is detected before writing), so it is answered, once."""

    async def go() -> None:
        def answer_and_close(q: Received) -> Reply:
            return Reply(raw=ok_for(q).raw, close=True)

        async with Upstream(answer_and_close) as prod, Upstream(ok_for) as cand:
            async with running_canary(config(prod.url, cand.url)) as can:
                assert (await exchange(port(can), request("GET", "/warm"))).status == 200
                await asyncio.sleep(0.05)
                r = await exchange(port(can), client_request("POST"), "POST")
                await settle(can)
        assert r.status == 200
        assert prod.count("POST", "/charge") == 1 and prod.connections == 2

    run(go())


# -- finding 4: bytes after a complete response ---------------------------------------------

PHANTOM = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    b"HTTP/1.1 299 Phantom\r\nContent-Length: 12\r\n\r\n"
)


@pytest.mark.parametrize("when", ["same_write", "while_idle"])
def test_bytes_after_a_response_close_the_connection(run: Run, when: str) -> None:
    async def go() -> None:
        def script(q: Received) -> Reply:
            if q.conn == 0 and when == "same_write":
                return Reply(raw=PHANTOM, keep_open=10.0)
            if q.conn == 0:
                end = PHANTOM.index(b"hello") + 5
                return Reply(raw=PHANTOM[:end], later=PHANTOM[end:])
            return Reply.ok(b"second")

        async with Upstream(script) as prod:
            cfg = config(prod.url, dead_url(), routing={"read_timeout": "2s"})
            async with running_canary(cfg) as can:
                first = await exchange(port(can), request("GET", "/a"))
                await asyncio.sleep(0.1)  # the phantom bytes have arrived
                t0 = time.monotonic()
                second = await exchange(port(can), request("GET", "/b"))
                took = time.monotonic() - t0
                await settle(can)
        assert (first.status, first.body) == (200, b"hello")
        assert (second.status, second.body) == (200, b"second")
        assert took < 1.0
        # the second request went on a new connection; the first one was not reused
        assert [(q.path, q.conn) for q in prod.requests] == [("/a", 0), ("/b", 1)]

    run(go())


def test_timeouts_apply_after_a_response_with_extra_bytes(run: Run) -> None:
    """The issue saw a later request hang for 45 s past both timeouts: never again."""

    async def go() -> None:
        def script(q: Received) -> Reply:
            if q.conn == 0:
                return Reply(raw=PHANTOM, keep_open=10.0)
            return Reply(keep_open=10.0)  # a silent upstream

        async with Upstream(script) as prod, Upstream(ok_for) as cand:
            cfg = config(prod.url, cand.url, routing={"read_timeout": "300ms", "timeout": "1s"})
            async with running_canary(cfg) as can:
                assert (await exchange(port(can), request("GET", "/a"))).body == b"hello"
                t0 = time.monotonic()
                r = await exchange(port(can), request("GET", "/b"))
                took = time.monotonic() - t0
                await settle(can)
        assert is_json_error(r, 504) and took < 2.0

    run(go())


# -- finding 5: bounded, valid response heads -----------------------------------------------


def _endless(first: bytes, unit: bytes, cap: int = 64 * 1024 * 1024) -> Iterator[bytes]:
    yield first
    sent = 0
    while sent < cap:  # bounded, so a regression fails instead of eating the machine
        yield unit
        sent += len(unit)


@pytest.mark.parametrize("kind", ["huge_field", "many_fields", "huge_status_line"])
def test_endless_response_heads_get_502_with_bounded_memory(run: Run, kind: str) -> None:
    async def go() -> None:
        if kind == "huge_field":
            stream = _endless(b"HTTP/1.1 200 OK\r\nX-Big: ", b"a" * (1024 * 1024))
        elif kind == "many_fields":
            stream = _endless(b"HTTP/1.1 200 OK\r\n", b"X-N: v\r\n" * 100_000)
        else:
            stream = _endless(b"HTTP/1.1 200 ", b"O" * (1024 * 1024))
        async with Upstream(lambda q: Reply(stream=stream)) as prod, Upstream(ok_for) as cand:
            async with running_canary(config(prod.url, cand.url)) as can:
                before = rss()
                t0 = time.monotonic()
                r = await exchange(port(can), request("GET", "/big"))
                took = time.monotonic() - t0
                await settle(can)
                grown = rss() - before
                for _ in range(100):  # canary closed the upstream connection
                    if prod.open_connections == 0:
                        break
                    await asyncio.sleep(0.01)
        assert is_json_error(r, 502), r
        assert took < 3.0
        assert grown < 32 * 1024 * 1024, grown
        assert prod.open_connections == 0
        assert prod.bytes_written < 32 * 1024 * 1024  # it stopped reading: not 64 MiB

    run(go())


@pytest.mark.parametrize(("size", "status"), [(7_000, 200), (9_000, 502)])
def test_response_head_size_limit_is_configurable(run: Run, size: int, status: int) -> None:
    async def go() -> None:
        big = "x" * size
        answer = Reply.ok(b"ok", headers=f"X-Big: {big}\r\n")
        async with Upstream(lambda q: answer) as prod, Upstream(ok_for) as cand:
            cfg = config(prod.url, cand.url, proxy={"max_response_header_size": "8KiB"})
            async with running_canary(cfg) as can:
                r = await exchange(port(can), request("GET", "/"))
                await settle(can)
        assert r.status == status
        if status == 200:
            assert r.header("X-Big") == big and r.body == b"ok"

    run(go())


@pytest.mark.parametrize(("fields", "status"), [(100, 200), (101, 502)])
def test_response_field_count_limit(run: Run, fields: int, status: int) -> None:
    async def go() -> None:
        extra = "".join(f"X-F{i}: {i}\r\n" for i in range(fields - 1))  # + Content-Length
        answer = Reply.ok(b"ok", headers=extra)
        async with Upstream(lambda q: answer) as prod, Upstream(ok_for) as cand:
            async with running_canary(config(prod.url, cand.url)) as can:
                r = await exchange(port(can), request("GET", "/"))
                await settle(can)
        assert r.status == status
        if status == 200:
            assert r.header(f"X-F{fields - 2}") == str(fields - 2)

    run(go())


def test_endless_trailers_cut_the_client_connection(run: Run) -> None:
    """Trailers are bounded like heads; the head is already out, so the client connection
    is cut (no final chunk), as for any upstream failure mid-body."""

    async def go() -> None:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: "
        stream = _endless(head, b"a" * (1024 * 1024))
        async with Upstream(lambda q: Reply(stream=stream)) as prod, Upstream(ok_for) as cand:
            async with running_canary(config(prod.url, cand.url)) as can:
                before = rss()
                reader, writer = await asyncio.open_connection("127.0.0.1", port(can))
                writer.write(request("GET", "/"))
                data = await asyncio.wait_for(reader.read(), 5.0)  # until the proxy closes
                writer.close()
                await settle(can)
                grown = rss() - before
        assert data.startswith(b"HTTP/1.1 200 ")
        assert not data.endswith(b"0\r\n\r\n")  # cut, not ended
        assert grown < 32 * 1024 * 1024, grown
        assert prod.bytes_written < 32 * 1024 * 1024

    run(go())


@pytest.mark.parametrize("status", ["099", "000", "600", "999"])
def test_status_codes_outside_100_599_are_502(run: Run, status: str) -> None:
    async def go() -> None:
        answer = Reply(raw=f"HTTP/1.1 {status} Odd\r\nContent-Length: 2\r\n\r\nok".encode())
        async with Upstream(lambda q: answer) as prod, Upstream(ok_for) as cand:
            async with running_canary(config(prod.url, cand.url)) as can:
                r = await exchange(port(can), request("GET", "/"))
                again = await exchange(port(can), request("GET", "/"))
                await settle(can)
        assert is_json_error(r, 502), r
        assert is_json_error(again, 502)
        assert prod.connections == 2  # the connection of a bad answer is not reused
        assert prod.count("GET", "/") == 2  # and nothing was resent

    run(go())


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
    ],
)
def test_unsolicited_101_is_502(run: Run, answer: bytes) -> None:
    async def go() -> None:
        async with Upstream(lambda q: Reply(raw=answer, keep_open=1.0)) as prod:
            async with Upstream(ok_for) as cand, running_canary(config(prod.url, cand.url)) as can:
                upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                r = await exchange(port(can), request("GET", "/ws", headers=upgrade))
                await settle(can)
        assert is_json_error(r, 502), r
        # canary never asks for an upgrade: hop-by-hop headers are not forwarded
        assert prod.requests[0].header("Upgrade") is None

    run(go())


def test_interim_1xx_answers_are_skipped_not_forwarded(run: Run) -> None:
    async def go() -> None:
        answer = Reply(
            raw=b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 102 Processing\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nyes"
        )
        async with Upstream(lambda q: answer) as prod, Upstream(ok_for) as cand:
            async with running_canary(config(prod.url, cand.url)) as can:
                reader, writer = await asyncio.open_connection("127.0.0.1", port(can))
                writer.write(client_request("POST") + request("GET", "/next"))
                r = await asyncio.wait_for(read_response(reader, "POST"), 5.0)
                nxt = await asyncio.wait_for(read_response(reader), 5.0)
                writer.close()
                await settle(can)
        assert (r.status, r.body) == (201, b"yes")
        assert r.header("Link") is None
        assert (nxt.status, nxt.body) == (201, b"yes")
        assert prod.connections == 1  # the connection stayed good

    run(go())


def test_interim_heads_count_toward_the_head_limit(run: Run) -> None:
    async def go() -> None:
        stream = _endless(b"", b"HTTP/1.1 100 Continue\r\n\r\n" * 40_000)
        async with Upstream(lambda q: Reply(stream=stream)) as prod, Upstream(ok_for) as cand:
            async with running_canary(config(prod.url, cand.url)) as can:
                t0 = time.monotonic()
                r = await exchange(port(can), request("GET", "/"))
                took = time.monotonic() - t0
                await settle(can)
        assert is_json_error(r, 502), r
        assert took < 3.0

    run(go())


# -- configuration ------------------------------------------------------------------------


def _load(extra_routing: str = "", extra_proxy: str = "") -> Any:
    text = f"""
proxy:
  listen: 127.0.0.1:0
{extra_proxy}
rollouts:
  - name: m
    production: {{endpoints: ["http://127.0.0.1:1"]}}
    candidate: {{endpoints: ["http://127.0.0.1:2"]}}
    routing:
      timeout: 5s
{extra_routing}
    steps: [{{weight: 5}}]
"""
    return load_config_text(text)


def test_config_keys_defaults_and_validation() -> None:
    cfg = _load()
    assert cfg.rollouts[0].routing.failover_methods == "idempotent"
    assert cfg.proxy.max_response_header_size == 64 * 1024
    assert cfg.proxy.max_response_headers == 100
    cfg = _load(
        "      failover_methods: all",
        "  max_response_header_size: 16KiB\n  max_response_headers: 50",
    )
    assert cfg.rollouts[0].routing.failover_methods == "all"
    assert (cfg.proxy.max_response_header_size, cfg.proxy.max_response_headers) == (16384, 50)
    for routing, proxy in [
        ("      failover_methods: post", ""),
        ("", "  max_response_header_size: 10"),
        ("", "  max_response_headers: 0"),
    ]:
        with pytest.raises(ConfigError):
            _load(routing, proxy)


def test_routes_carry_the_response_limits(run: Run) -> None:
    async def go() -> None:
        cfg = config(dead_url(), dead_url(), proxy={"max_response_header_size": "32KiB"})
        async with running_canary(cfg) as can:
            t = can.proxy.routes["m"].timeouts
        assert t == Timeouts(total=5.0, connect=5.0, read=None, max_head=32768, max_fields=100)

    run(go())


# -- both transports directly (aiohttp carries the https endpoints) --------------------------

TRANSPORTS: dict[str, Callable[[], Any]] = {"h1": H1Transport, "aiohttp": AiohttpTransport}
T = Timeouts(total=5.0, connect=2.0, read=None, max_head=8192, max_fields=20)


async def _call(t: Any, url: str, method: str = "GET", body: bytes | None = None) -> bytes:
    resp = await t.send(method, url, [("Host", "u")], body, T)
    try:
        return await resp.read()
    finally:
        resp.close()


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("method", ["GET", "PUT", "POST", "PATCH"])
def test_transport_stale_connection_rule(run: Run, transport: str, method: str) -> None:
    async def go() -> None:
        t = TRANSPORTS[transport]()
        async with Upstream(_first_answered_then_drop) as up:
            assert await _call(t, up.url + "/warm") == b"first"
            body = CHARGE if method in WITH_BODY else None
            if method in IDEMPOTENT_METHODS:
                assert await _call(t, up.url + "/charge", method, body) == b"first"
            else:
                with pytest.raises(UpstreamReset) as err:
                    await _call(t, up.url + "/charge", method, body)
                assert not never_sent(err.value)
        await t.close()
        assert up.count(method, "/charge") == (2 if method in IDEMPOTENT_METHODS else 1)

    run(go())


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 099 Odd\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 9000 + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-F: 1\r\n" * 30 + b"Content-Length: 0\r\n\r\n",
    ],
    ids=["999", "099", "101", "huge_field", "many_fields"],
)
def test_transport_refuses_bad_heads(run: Run, transport: str, answer: bytes) -> None:
    async def go() -> None:
        t = TRANSPORTS[transport]()
        async with Upstream(lambda q: Reply(raw=answer, keep_open=2.0)) as up:
            with pytest.raises(UpstreamProtocolError):
                await asyncio.wait_for(_call(t, up.url + "/"), 3.0)
        await t.close()
        assert up.count() == 1

    run(go())


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_transport_never_reuses_a_connection_with_extra_bytes(run: Run, transport: str) -> None:
    async def go() -> None:
        def script(q: Received) -> Reply:
            return Reply(raw=PHANTOM, keep_open=5.0) if q.conn == 0 else Reply.ok(b"second")

        t = TRANSPORTS[transport]()
        async with Upstream(script) as up:
            assert await _call(t, up.url + "/a") == b"hello"
            await asyncio.sleep(0.05)
            assert await asyncio.wait_for(_call(t, up.url + "/b"), 3.0) == b"second"
        await t.close()
        assert [(q.path, q.conn) for q in up.requests] == [("/a", 0), ("/b", 1)]

    run(go())


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_transport_connect_refused_is_never_sent(run: Run, transport: str) -> None:
    async def go() -> None:
        t = TRANSPORTS[transport]()
        with pytest.raises(UpstreamConnectError) as err:
            await _call(t, dead_url() + "/", "POST", CHARGE)
        assert never_sent(err.value)
        await t.close()

    run(go())


def test_transport_checks_an_idle_connection_before_writing(run: Run) -> None:
    """The upstream closed a kept-alive connection, and the close is in the kernel but the
    loop has not seen it yet: the POST must not be written there (it would be lost, and a
    POST is not sent twice), it goes on a fresh connection and is delivered once."""

    received: list[bytes] = []
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5.0)

    def serve() -> None:  # a thread: it closes while the client's loop is blocked
        for _ in range(2):
            conn, _addr = server.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(body) < length:
                    body += conn.recv(65536)
                received.append(head.split(b" ")[0])
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"

    async def go() -> None:
        t = H1Transport()
        assert await _call(t, url + "/a", "POST", b"{}") == b"ok"
        time.sleep(0.2)  # blocks the loop: the close arrives but is not processed
        assert await _call(t, url + "/b", "POST", CHARGE) == b"ok"
        await t.close()

    try:
        run(go())
    finally:
        thread.join(5.0)
        server.close()
    assert received == [b"POST", b"POST"]
