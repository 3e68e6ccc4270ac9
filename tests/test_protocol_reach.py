"""Protocol reach of the proxy port (issue 16, docs/protocols.md): what canary does with HTTP/2
(h2c prior knowledge, gRPC), HTTP/1.1 upgrades (``Upgrade: h2c``, WebSocket) and KServe v2 REST.

Raw bytes in, over real loopback sockets, checking both what the client got and exactly what
the upstream received. nginx 1.22 (measured, docs/protocols.md) is the reference; canary is at
least as strict:

* the h2c preface gets 505 as soon as its request line is read (nginx: 400), so a gRPC client
  fails at once with "Trying to connect an http1.x server (HTTP status 505)";
* a request asking for an upgrade is served as plain HTTP/1.1, its body included (nginx too),
  with every upgrade header dropped on the way up (``HTTP2-Settings`` too, which nginx
  forwards), and the connection is closed after the answer (nginx keeps it).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.client_harness import UPSTREAM_BODY, CanaryThread, RawClient, RawResponse
from tests.conftest import fake_pair, rollout_config, running_canary

# The first bytes a gRPC client (grpcio 1.85, insecure channel, unary call) sends: the HTTP/2
# connection preface, its SETTINGS and a WINDOW_UPDATE; then it waits for the server's
# SETTINGS before sending HEADERS, so the answer must come now, not at a timeout.
GRPC_OPENING = bytes.fromhex(
    "505249202a20485454502f322e300d0a0d0a534d0d0a0d0a"  # PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n
    "000024040000000000000200000000000300000000000400400000000500400000000600004000fe03"
    "00000001"  # SETTINGS (36 bytes of parameters)
    "000004080000000000003f0001"  # WINDOW_UPDATE
)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS = b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
H2C_UPGRADE = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n" + H2_SETTINGS
AFTER = b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n"
UPGRADE_FIELDS = ("upgrade", "connection", "http2-settings")


@pytest.fixture(scope="module")
def canary() -> Iterator[CanaryThread]:
    with CanaryThread() as c:  # client_timeout 3s
        yield c


def answer(
    canary: CanaryThread, *pieces: bytes, pause: float = 0.0
) -> tuple[RawResponse, bool, float]:
    """Send ``pieces`` (``pause`` seconds apart), read one response; return it, whether the
    server then closed the connection, and the seconds from the first byte to the answer."""
    canary.reset()
    with RawClient(canary.port, timeout=5.0) as c:
        t0 = time.monotonic()
        for i, piece in enumerate(pieces):
            if i and pause:
                time.sleep(pause)
            c.send(piece)
        resp = c.read_response()
        elapsed = time.monotonic() - t0
        closed = c.closed(2.0)
    canary.settle()
    return resp, closed, elapsed


def assert_no_h2_answer(resp: RawResponse, closed: bool, elapsed: float) -> None:
    assert resp.status == 505
    assert resp.version == "HTTP/1.1"  # what grpc-core recognises ("an http1.x server")
    assert resp.header("content-type") == "application/json"
    assert "HTTP/2" in json.loads(resp.body)["error"]
    assert resp.closes and closed
    assert elapsed < 1.0  # not the 3 s client_timeout


# -- HTTP/2 with prior knowledge (h2c, gRPC) ---------------------------------------------------


def test_grpc_clients_opening_gets_505_at_once_and_nothing_is_forwarded(
    canary: CanaryThread,
) -> None:
    resp, closed, elapsed = answer(canary, GRPC_OPENING)
    assert_no_h2_answer(resp, closed, elapsed)
    assert canary.upstream.requests == [] and canary.upstream.incomplete == []


@pytest.mark.parametrize(
    "pieces",
    [
        (PREFACE,),  # the preface alone: llhttp stops at it ("Pause on PRI/Upgrade")
        (b"PRI * HTTP/2.0\r\n",),  # the request line only: llhttp would wait for the rest
        (b"PRI * HT",),  # even before the version
        (b"PR", b"I * HTTP/2.0\r\n\r\n", b"SM\r\n\r\n"),  # split across reads
    ],
    ids=["preface", "request-line", "partial-line", "split"],
)
def test_h2c_preface_in_any_pieces_gets_505_without_waiting(
    canary: CanaryThread, pieces: tuple[bytes, ...]
) -> None:
    resp, closed, elapsed = answer(canary, *pieces, pause=0.05)
    assert_no_h2_answer(resp, closed, elapsed - 0.05 * (len(pieces) - 1))
    assert canary.upstream.requests == []


def test_http2_request_line_gets_505(canary: CanaryThread) -> None:
    resp, closed, _ = answer(canary, b"GET / HTTP/2.0\r\nHost: t\r\n\r\n" + AFTER)
    assert resp.status == 505 and resp.closes and closed  # nginx: 505
    assert canary.upstream.requests == []


def test_preface_after_a_keep_alive_request_answers_that_request_then_closes(
    canary: CanaryThread,
) -> None:
    canary.reset()
    with RawClient(canary.port) as c:
        c.send(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n" + GRPC_OPENING)
        responses = c.read_responses(timeout=5.0)
    canary.settle()
    # as for any bad request behind a pipelined one: that one is answered, the last, and the
    # connection closed (h1_server._reject)
    assert [(r.status, r.body, r.closes) for r in responses] == [(200, UPSTREAM_BODY, True)]
    assert [q.target for q in canary.upstream.requests] == ["/first"]


def test_refused_http2_is_counted_apart_in_metrics(canary: CanaryThread) -> None:
    rt = canary.runtime
    assert rt is not None
    before = rt.metrics.counters.rejected.get("http2", 0)
    answer(canary, GRPC_OPENING)
    answer(canary, b"GET / HTTP/2.0\r\nHost: t\r\n\r\n")
    assert rt.metrics.counters.rejected.get("http2", 0) == before + 2


# -- HTTP/1.1 upgrades: served plainly --------------------------------------------------------


def _upgrade_dropped(canary: CanaryThread) -> None:
    for q in canary.upstream.requests:
        for name in UPGRADE_FIELDS:
            assert q.header(name) is None, (name, q.headers)


def test_h2c_upgrade_is_served_as_http11_and_nothing_after_it_is_read(
    canary: CanaryThread,
) -> None:
    resp, closed, _ = answer(
        canary, b"GET /up HTTP/1.1\r\nHost: t\r\n" + H2C_UPGRADE + b"\r\n" + AFTER
    )
    assert (resp.status, resp.body) == (200, UPSTREAM_BODY)  # never 101
    assert resp.header("upgrade") is None
    assert resp.closes and closed
    assert [(q.method, q.target) for q in canary.upstream.requests] == [("GET", "/up")]
    _upgrade_dropped(canary)


def test_http2_settings_is_dropped_even_when_connection_does_not_list_it(
    canary: CanaryThread,
) -> None:
    data = b"GET /up HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n" + H2_SETTINGS
    resp, _, _ = answer(canary, data + b"\r\n")
    assert resp.status == 200
    _upgrade_dropped(canary)  # nginx forwards HTTP2-Settings here


def test_http2_settings_alone_is_dropped_on_a_keep_alive_request(canary: CanaryThread) -> None:
    canary.reset()
    with RawClient(canary.port) as c:
        c.send(b"GET /a HTTP/1.1\r\nHost: t\r\n" + H2_SETTINGS + b"\r\n" + AFTER)
        assert [r.status for r in (c.read_response(), c.read_response())] == [200, 200]
    canary.settle()
    assert [q.target for q in canary.upstream.requests] == ["/a", "/after"]
    _upgrade_dropped(canary)


@pytest.mark.parametrize(
    ("framing", "body_bytes"),
    [
        (b"Content-Length: 11\r\n", b'{"inputs":1}'[:11]),
        (b"Transfer-Encoding: chunked\r\n", b'5\r\n{"a":\r\n6\r\n[1,2]}\r\n0\r\n\r\n'),
    ],
    ids=["content-length", "chunked"],
)
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "split"])
def test_h2c_upgrade_with_a_body_is_served_with_its_body(
    canary: CanaryThread, framing: bytes, body_bytes: bytes, split: bool
) -> None:
    """Java's HttpClient (default version HTTP_2) and ``curl --http2 -d`` send the first POST
    of a connection with ``Upgrade: h2c``: it must reach the model with its body (it got 400
    before: httptools skips the body of an upgrade request)."""
    head = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: t\r\n" + H2C_UPGRADE + framing + b"\r\n"
    pieces = (head, body_bytes[:3], body_bytes[3:]) if split else (head + body_bytes + AFTER,)
    resp, closed, _ = answer(canary, *pieces, pause=0.05)
    assert (resp.status, resp.body) == (200, UPSTREAM_BODY)
    assert resp.closes and closed
    got = [(q.method, q.target, q.body) for q in canary.upstream.requests]
    expected = b'{"a":[1,2]}' if b"chunked" in framing else body_bytes
    assert got == [("POST", "/v2/models/m/infer", expected)]
    assert canary.upstream.incomplete == []
    _upgrade_dropped(canary)


def test_h2c_upgrade_with_expect_continue_gets_100_then_the_answer(canary: CanaryThread) -> None:
    canary.reset()
    head = b"POST /p HTTP/1.1\r\nHost: t\r\n" + H2C_UPGRADE + b"Expect: 100-continue\r\n"
    with RawClient(canary.port) as c:
        c.send(head + b"Content-Length: 3\r\n\r\n")
        time.sleep(0.1)
        c.send(b"abc")
        resp = c.read_response()
    canary.settle()
    assert resp.interim in ([], [100]) and resp.status == 200
    assert [q.body for q in canary.upstream.requests] == [b"abc"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_h2c_upgrade_with_a_body_over_the_limit_gets_413(chunked: bool) -> None:
    """The body read by the second parser is held to ``proxy.max_body_size`` like any other:
    413, the rest read and dropped (the client sees the answer, not a reset), nothing sent."""
    size = 64 * 1024
    with CanaryThread(proxy={"max_body_size": "16KiB"}) as can:
        head = b"POST /p HTTP/1.1\r\nHost: t\r\n" + H2C_UPGRADE
        if chunked:
            data = head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % size
            data += b"z" * size + b"\r\n0\r\n\r\n"
        else:
            data = head + b"Content-Length: %d\r\n\r\n" % size + b"z" * size
        resp, closed, _ = answer(can, data)
        assert resp.status == 413 and resp.closes and closed
        assert can.upstream.requests == []


def test_h2c_upgrade_with_a_malformed_chunked_body_is_refused_and_not_forwarded(
    canary: CanaryThread,
) -> None:
    data = b"POST /p HTTP/1.1\r\nHost: t\r\n" + H2C_UPGRADE + b"Transfer-Encoding: chunked\r\n\r\n"
    resp, closed, _ = answer(canary, data + b"zz\r\nabc\r\n0\r\n\r\n")
    assert resp.status == 400 and resp.closes and closed
    assert canary.upstream.requests == []  # a begun, never completed request at most


def test_websocket_upgrade_is_served_plainly(canary: CanaryThread) -> None:
    data = (
        b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    resp, closed, _ = answer(canary, data)
    assert resp.status == 200 and resp.header("upgrade") is None and closed  # never 101
    _upgrade_dropped(canary)


# -- KServe v2 REST through canary, over real fake models ------------------------------------

V2_REQUEST = {
    "id": "r1",
    "inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
}


async def test_kserve_v2_rest_infer_reaches_both_arms_and_is_measured() -> None:
    async with fake_pair() as (p, c):
        async with running_canary(rollout_config([p], [c], steps=[{"weight": 50}])) as can:
            arms: Counter[str] = Counter()
            async with httpx.AsyncClient() as client:
                for _ in range(40):
                    r = await client.post(can.url + "/v2/models/fraud/infer", json=V2_REQUEST)
                    assert r.status_code == 200
                    body = r.json()
                    arm = r.headers["x-canary-arm"]
                    assert body["model"] == arm  # answered by that arm's model
                    assert body["id"] == "r1"
                    arms[arm] += 1
            acc = await can.samples("m")
    assert arms["production"] > 0 and arms["candidate"] > 0
    assert acc.production.observed == arms["production"]
    assert acc.candidate.observed == arms["candidate"]


async def test_kserve_v2_infer_with_h2c_upgrade_reaches_the_model_with_its_body() -> None:
    """The request a Java HttpClient sends by default, raw, end to end."""
    body = json.dumps(V2_REQUEST).encode()
    head = (
        b"POST /v2/models/fraud/infer HTTP/1.1\r\nHost: models\r\n"
        + H2C_UPGRADE
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    async with fake_pair() as (p, c):
        async with running_canary(rollout_config([p], [c], steps=[{"weight": 0}])) as can:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", int(can.url.rsplit(":", 1)[1])
            )
            try:
                writer.write(head + body)
                raw = await asyncio.wait_for(reader.read(), 5.0)  # closed after the answer
            finally:
                writer.close()
            acc = await can.samples("m")
    status_line, _, rest = raw.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 200 OK"
    answer_body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert answer_body["model"] == "production" and answer_body["id"] == "r1"
    assert acc.production.observed == 1


def _curl_speaks_http2() -> bool:
    curl = shutil.which("curl")
    if curl is None:
        return False
    version = subprocess.run([curl, "--version"], capture_output=True, text=True, timeout=10)
    return "HTTP2" in version.stdout


@pytest.mark.skipif(
    not _curl_speaks_http2(), reason="no curl with HTTP/2: it would not ask for the upgrade"
)
async def test_curl_http2_post_is_served_over_http11() -> None:
    """A real client's h2c upgrade with a body (``curl --http2 -d``) gets the model's answer."""
    async with fake_pair() as (p, c):
        async with running_canary(rollout_config([p], [c], steps=[{"weight": 0}])) as can:
            proc = await asyncio.create_subprocess_exec(
                "curl", "-sS", "-v", "--http2", "-m", "10",
                "-H", "Content-Type: application/json",
                "-d", json.dumps(V2_REQUEST),
                "-w", "\n%{http_code} %{http_version}",
                can.url + "/v2/models/fraud/infer",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 15.0)
    assert b"Upgrade: h2c" in err  # curl did ask for the upgrade
    text, _, status = out.decode().rpartition("\n")
    assert status == "200 1.1"
    assert json.loads(text)["model"] == "production"
