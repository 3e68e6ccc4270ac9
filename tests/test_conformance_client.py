"""Conformance of the proxy port, client side: raw bytes in, and for each vector both what the
client got (status, whether the connection was closed) and exactly what the upstream received
(how many requests, their method, target and body bytes; never a request the client did not
send). nginx 1.22 and RFC 9112 are the reference (issue 12, DESIGN.md "Bad input and failure").

canary runs once per module, on uvloop in a background thread (tests/client_harness.py), in
front of a capturing upstream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from canary.proxy.h1_server import valid_host
from tests.client_harness import (
    UPSTREAM_BODY,
    CanaryThread,
    Captured,
    CapturingUpstream,
    RawClient,
    RawResponse,
)

PROBE = b"GET /probe HTTP/1.1\r\nHost: probe\r\n\r\n"


@pytest.fixture(scope="module")
def canary() -> Iterator[CanaryThread]:
    with CanaryThread() as c:
        yield c


@dataclass
class Outcome:
    responses: list[RawResponse]
    closed: bool  # the server closed the connection after the answers
    upstream: list[Captured]  # what the upstream received, the probe excluded
    incomplete: list[bytes]  # requests the upstream began to receive and never completed

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]

    @property
    def forwarded(self) -> list[tuple[str, str, bytes]]:
        return [(r.method, r.target, r.body) for r in self.upstream]


def talk(canary: CanaryThread, data: bytes, answers: int = 1, *, split: int = 0) -> Outcome:
    """Send ``data`` (in two writes when ``split``), read ``answers`` responses, then find out
    whether the connection is still usable: if the last answer said ``Connection: close`` the
    server must close it without sending more; otherwise a probe request must be answered by
    the upstream, on the same connection, in step."""
    canary.reset()
    with RawClient(canary.port, timeout=5.0) as c:
        if split:
            c.send(data[:split])
            c.send(data[split:])
        else:
            c.send(data)
        responses = [c.read_response() for _ in range(answers)]
        if responses[-1].closes:
            closed = c.closed(3.0)  # a 413 lingers 2 s reading what the client still sends
            assert closed, "Connection: close was announced but the connection stayed open"
        else:
            c.send(PROBE)
            probe = c.read_response()
            assert (probe.status, probe.body) == (200, UPSTREAM_BODY), "connection out of step"
            closed = False
    canary.settle()
    upstream = list(canary.upstream.requests)
    if not closed:
        last = upstream.pop()
        assert (last.method, last.target) == ("GET", "/probe")
    return Outcome(responses, closed, upstream, list(canary.upstream.incomplete))


def refused(canary: CanaryThread, data: bytes, status: int) -> Outcome:
    """``data`` is refused with ``status``, the connection closed, and nothing of it (nor of
    anything after it) reaches the upstream complete."""
    out = talk(canary, data)
    assert out.statuses == [status], out.responses[0].body
    assert out.closed
    assert out.upstream == []
    assert out.responses[0].header("content-type") == "application/json"
    return out


def served(canary: CanaryThread, data: bytes, method: str, target: str, body: bytes) -> Outcome:
    """``data`` is one request, forwarded once with exactly ``body``, answered 200, kept alive."""
    out = talk(canary, data)
    assert out.statuses == [200]
    assert out.responses[0].body == UPSTREAM_BODY
    assert out.forwarded == [(method, target, body)]
    assert not out.closed
    assert out.incomplete == []
    return out


def post(headers: bytes, body: bytes = b"", *, version: bytes = b"1.1") -> bytes:
    return b"POST /p HTTP/" + version + b"\r\n" + headers + b"\r\n" + body


CHUNKED_ABC = b"3\r\nabc\r\n0\r\n\r\n"
HOST = b"Host: t\r\n"


# -- well-formed requests ----------------------------------------------------------------------


def test_content_length_body_is_forwarded_once(canary: CanaryThread) -> None:
    out = served(canary, post(HOST + b"Content-Length: 3\r\n", b"abc"), "POST", "/p", b"abc")
    up = out.upstream[0]
    assert up.header_values("content-length") == ["3"]
    assert up.header("transfer-encoding") is None


def test_chunked_body_is_forwarded_once_with_its_bytes(canary: CanaryThread) -> None:
    data = post(HOST + b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n")
    out = served(canary, data, "POST", "/p", b"abcdefgh")
    up = out.upstream[0]
    assert up.header("content-length") is None or up.header("transfer-encoding") is None


@pytest.mark.parametrize(
    "value", [b"chunked", b"Chunked", b"CHUNKED", b"chunked ", b"\tchunked"], ids=repr
)
def test_transfer_encoding_chunked_in_any_case_and_with_ows_is_read(
    canary: CanaryThread, value: bytes
) -> None:
    data = post(HOST + b"Transfer-Encoding: " + value + b"\r\n", CHUNKED_ABC)
    served(canary, data, "POST", "/p", b"abc")


def test_chunk_extensions_are_read_and_not_forwarded(canary: CanaryThread) -> None:
    body = b'3;name=value;q="a b"\r\nabc\r\n0;last\r\n\r\n'
    out = served(canary, post(HOST + b"Transfer-Encoding: chunked\r\n", body), "POST", "/p", b"abc")
    assert b"name=value" not in out.upstream[0].raw


def test_trailer_fields_never_become_request_headers(canary: CanaryThread) -> None:
    body = b"3\r\nabc\r\n0\r\nX-Canary-Arm: candidate\r\nX-Smuggled: yes\r\n\r\n"
    out = served(canary, post(HOST + b"Transfer-Encoding: chunked\r\n", body), "POST", "/p", b"abc")
    up = out.upstream[0]
    assert up.header("x-smuggled") is None and up.header("x-canary-arm") is None
    assert b"X-Smuggled" not in up.raw
    assert out.responses[0].header("x-canary-arm") in ("production", "candidate")


def test_zero_content_length_and_no_body(canary: CanaryThread) -> None:
    served(canary, post(HOST + b"Content-Length: 0\r\n"), "POST", "/p", b"")
    served(canary, b"GET /g?x=1 HTTP/1.1\r\nHost: t\r\n\r\n", "GET", "/g?x=1", b"")


def test_content_length_with_surrounding_whitespace_is_read(canary: CanaryThread) -> None:
    served(canary, post(HOST + b"Content-Length:  3 \r\n", b"abc"), "POST", "/p", b"abc")


def test_request_split_inside_the_body_is_forwarded_once(canary: CanaryThread) -> None:
    data = post(HOST + b"Content-Length: 10\r\n", b"0123456789")
    out = talk(canary, data, split=len(data) - 4)
    assert out.statuses == [200]
    assert out.forwarded == [("POST", "/p", b"0123456789")]


def test_a_request_hidden_in_a_body_is_body_not_a_request(canary: CanaryThread) -> None:
    hidden = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
    data = post(HOST + b"Content-Length: %d\r\n" % len(hidden), hidden)
    served(canary, data, "POST", "/p", hidden)
    get = b"GET /g HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(hidden) + hidden
    served(canary, get, "GET", "/g", hidden)


def test_expect_continue_body_is_forwarded_once(canary: CanaryThread) -> None:
    canary.reset()
    with RawClient(canary.port) as c:
        c.send(post(HOST + b"Content-Length: 3\r\nExpect: 100-continue\r\n"))
        c.send(b"abc")
        r = c.read_response()
        assert r.interim in ([], [100])
        assert r.status == 200
    canary.settle()
    assert [(q.method, q.body) for q in canary.upstream.requests] == [("POST", b"abc")]
    # the proxy answers 100-continue itself: the upstream is not asked (nginx drops it too)
    assert canary.upstream.requests[0].header("expect") is None


def test_expect_continue_on_a_streamed_chunked_body(canary: CanaryThread) -> None:
    canary.reset()
    with RawClient(canary.port) as c:
        c.send(post(HOST + b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n"))
        c.send(CHUNKED_ABC)
        r = c.read_response()
        assert r.interim in ([], [100])
        assert r.status == 200
    canary.settle()
    assert [(q.method, q.body) for q in canary.upstream.requests] == [("POST", b"abc")]
    assert canary.upstream.requests[0].header("expect") is None


def test_upgrade_is_answered_plainly_and_nothing_after_it_is_read(canary: CanaryThread) -> None:
    data = (
        b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    out = talk(canary, data)
    assert out.statuses == [200] and out.closed
    assert out.forwarded == [("GET", "/ws", b"")]
    up = out.upstream[0]
    assert up.header("upgrade") is None and up.header("connection") is None


# -- Transfer-Encoding that nginx refuses (finding 6) ----------------------------------------


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        # a single field whose value is not exactly "chunked": 501 (nginx "unknown
        # Transfer-Encoding"; RFC 9112 section 6.1)
        (b"Transfer-Encoding: identity, chunked\r\n", 501),
        (b"Transfer-Encoding: gzip, chunked\r\n", 501),
        (b"Transfer-Encoding: chunked, chunked\r\n", 501),
        (b"Transfer-Encoding: chunked, identity\r\n", 501),
        (b"Transfer-Encoding: chunked,\r\n", 501),
        (b"Transfer-Encoding: identity\r\n", 501),
        (b"Transfer-Encoding: gzip\r\n", 501),
        (b"Transfer-Encoding: xchunked\r\n", 501),
        (b"Transfer-Encoding: chunkedx\r\n", 501),
        (b"Transfer-Encoding: \r\n", 501),
        # two fields: 400 (nginx: Transfer-Encoding is a unique header line)
        (b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n", 400),
        (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", 400),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 400),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", 400),
        (b"Transfer-Encoding: chunked\r\ntransfer-encoding: gzip\r\n", 400),
        # obfuscated field names and values
        (b"Transfer-Encoding : chunked\r\n", 400),
        (b"Transfer-Encoding:\x0bchunked\r\n", 400),
        (b"Transfer-Encoding: chunked\r\n\tidentity\r\n", 400),
    ],
    ids=repr,
)
def test_transfer_encoding_other_than_one_chunked_is_refused(
    canary: CanaryThread, fields: bytes, status: int
) -> None:
    refused(canary, post(HOST + fields, CHUNKED_ABC + b"GET /after HTTP/1.1\r\n\r\n"), status)


@pytest.mark.parametrize("keep_alive", [True, False])
def test_http10_with_transfer_encoding_is_faulty_framing(
    canary: CanaryThread, keep_alive: bool
) -> None:
    # RFC 9112 section 6.1; nginx: "client sent HTTP/1.0 request with Transfer-Encoding" 400
    conn = b"Connection: keep-alive\r\n" if keep_alive else b""
    data = post(HOST + conn + b"Transfer-Encoding: chunked\r\n", CHUNKED_ABC, version=b"1.0")
    refused(canary, data + b"GET /after HTTP/1.0\r\n\r\n", 400)


@pytest.mark.parametrize(
    "fields",
    [
        b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
        b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n",
    ],
    ids=["cl-te", "te-cl", "cl-te-classic"],
)
def test_content_length_with_transfer_encoding_is_refused(
    canary: CanaryThread, fields: bytes
) -> None:
    # the classic CL.TE / TE.CL smuggling: RFC 9112 section 6.3, nginx 400
    refused(canary, post(HOST + fields, b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"), 400)


# -- Content-Length ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        b"Content-Length: 3\r\nContent-Length: 3\r\n",
        b"Content-Length: 3\r\nContent-Length: 4\r\n",
        b"Content-Length: 3, 3\r\n",
        b"Content-Length: 3,4\r\n",
        b"Content-Length: +3\r\n",
        b"Content-Length: -3\r\n",
        b"Content-Length: 0x3\r\n",
        b"Content-Length: 3 3\r\n",
        b"Content-Length: 3a\r\n",
        b"Content-Length: \r\n",
        b"Content-Length: 99999999999999999999999\r\n",
        b"Content-Length : 3\r\n",
    ],
    ids=repr,
)
def test_bad_or_duplicate_content_length_is_refused(canary: CanaryThread, fields: bytes) -> None:
    refused(canary, post(HOST + fields, b"abcd"), 400)


def test_content_length_beyond_the_body_limit_gets_413(canary: CanaryThread) -> None:
    out = talk(canary, post(HOST + b"Content-Length: 999999999999\r\n", b"abc"))
    assert out.statuses == [413]
    assert out.closed and out.upstream == []


# -- bytes a head must not contain ---------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\nHost: t\n\n",  # bare LF
        b"GET / HTTP/1.1\r\nHost: t\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nX: a\nY: b\r\n\r\n",
        b"GET / HTTP/1.1\rHost: t\r\n\r\n",  # bare CR
        b"GET / HTTP/1.1\r\nHost: t\rX: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nX: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n",  # NUL
        b"GET /a\x00b HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\x00.evil\r\n\r\n",
        b"GET / HTTP/1.1\r\nX\x00: a\r\nHost: t\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nX: a\x01b\r\n\r\n",  # other controls
        b"GET / HTTP/1.1\r\nHost: t\r\nX: a\x7fb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n b\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n\tb\r\n\r\n",
        b"GET / HTTP/1.1\r\n Host: t\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\n: x\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /a\tb HTTP/1.1\r\nHost: t\r\n\r\n",
        b"get / HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET / HTTP/1.2\r\nHost: t\r\n\r\n",
        b"GET / HTTP/1.1 \r\nHost: t\r\n\r\n",
        b"GET / HTTP/0.9\r\nHost: t\r\n\r\n",
        b"GET /\r\n\r\n",  # HTTP/0.9
        b"GET a/b HTTP/1.1\r\nHost: t\r\n\r\n",
        b"CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\n\r\n",
    ],
    ids=repr,
)
def test_malformed_head_is_refused_with_400(canary: CanaryThread, data: bytes) -> None:
    refused(canary, data + b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n", 400)


def test_http2_request_line_gets_505(canary: CanaryThread) -> None:
    refused(canary, b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505)  # nginx


def test_trace_gets_405(canary: CanaryThread) -> None:
    refused(canary, b"TRACE / HTTP/1.1\r\nHost: t\r\n\r\n", 405)  # nginx


def test_obs_text_in_a_value_is_forwarded_unchanged(canary: CanaryThread) -> None:
    out = served(canary, b"GET / HTTP/1.1\r\nHost: t\r\nX-L: caf\xe9\r\n\r\n", "GET", "/", b"")
    assert out.upstream[0].header("x-l") == "caf\xe9"


# -- Host (RFC 9112 section 3.2; nginx ngx_http_process_host) ---------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        b"",  # HTTP/1.1 without Host
        b"Host: t\r\nHost: t\r\n",
        b"Host: a\r\nHost: b\r\n",
        b"Host: t\r\nhost: u\r\n",
        b"Host: a@b\r\n",
        b"Host: user:pw@b\r\n",
        b"Host: \r\n",
        b"Host: .\r\n",
        b"Host: :80\r\n",
        b"Host: a..b\r\n",
        b"Host: a/b\r\n",
        b"Host: a\\b\r\n",
        b"Host: a b\r\n",
        b"Host: a:b\r\n",
        b"Host: a:80:90\r\n",
        b"Host: [::1\r\n",
        b"Host: [::g]\r\n",
        b"Host: [::1]x\r\n",
        b"Host: ::1\r\n",
        b"Host: a?b\r\n",
        b"Host: a#b\r\n",
        b"Host: a%zz\r\n",
        b"Host: caf\xe9\r\n",
        b'Host: "t"\r\n',
    ],
    ids=repr,
)
def test_missing_duplicate_or_invalid_host_is_refused(canary: CanaryThread, fields: bytes) -> None:
    refused(canary, b"GET / HTTP/1.1\r\n" + fields + b"\r\n", 400)


@pytest.mark.parametrize(
    "host",
    [
        b"t",
        b"example.com",
        b"example.com.",
        b"example.com:8080",
        b"example.com:",
        b"127.0.0.1:80",
        b"[::1]",
        b"[::1]:8080",
        b"[2001:db8::1]:443",
        b"xn--caf-dma.example",
        b"a_b-c~d",
        b"a%41b",
    ],
    ids=repr,
)
def test_valid_hosts_are_served_and_never_reach_the_upstream_as_host(
    canary: CanaryThread, host: bytes
) -> None:
    out = served(canary, b"GET /h HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", "GET", "/h", b"")
    up = out.upstream[0]
    assert up.header_values("host") != [host.decode()]  # the upstream's own name, from config
    assert (up.header("host") or "").startswith("127.0.0.1:")


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("t", True),
        ("a.b.c:65535", True),
        ("a.b.", True),
        ("[::ffff:1.2.3.4]:80", True),
        ("[fe80::1%25eth0]", False),  # zone ids (RFC 6874) are not taken
        ("[v1.x]", False),  # IPvFuture is not taken
        ("a@b", False),
        ("@b", False),
        ("a:b@c", False),
        ("", False),
        (".", False),
        (".a", False),
        ("a..b", False),
        (":80", False),
        ("a:8o", False),
        ("a b", False),
        ("a%2", False),
    ],
)
def test_valid_host(value: str, ok: bool) -> None:
    assert valid_host(value) is ok


def test_http10_without_host_is_served(canary: CanaryThread) -> None:
    out = talk(canary, b"GET /old HTTP/1.0\r\n\r\n")
    assert out.statuses == [200] and out.closed
    assert out.forwarded == [("GET", "/old", b"")]


def test_http10_with_an_invalid_host_is_refused(canary: CanaryThread) -> None:
    refused(canary, b"GET / HTTP/1.0\r\nHost: a@b\r\n\r\n", 400)


# -- absolute-form (RFC 9112 section 3.2.2) ---------------------------------------------------


def test_absolute_form_is_forwarded_in_origin_form(canary: CanaryThread) -> None:
    data = b"GET http://example.com:8080/x?q=1 HTTP/1.1\r\nHost: other\r\n\r\n"
    out = served(canary, data, "GET", "/x?q=1", b"")
    assert (out.upstream[0].header("host") or "").startswith("127.0.0.1:")
    served(canary, b"GET http://example.com HTTP/1.1\r\nHost: e\r\n\r\n", "GET", "/", b"")


@pytest.mark.parametrize(
    "target",
    [
        b"http://a@b/x",
        b"http://u:p@example.com/",
        b"http:///x",
        b"http://:80/x",
        b"http://a..b/",
        b"ftp://example.com/",
        b"//example.com/x",
    ],
    ids=repr,
)
def test_absolute_form_with_a_bad_authority_is_refused(canary: CanaryThread, target: bytes) -> None:
    data = b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n"
    if target.startswith(b"//"):  # origin-form with an empty first segment: a path
        served(canary, data, "GET", target.decode(), b"")
    else:
        refused(canary, data, 400)


def test_absolute_form_without_host_in_http11_is_refused(canary: CanaryThread) -> None:
    refused(canary, b"GET http://example.com/ HTTP/1.1\r\n\r\n", 400)  # nginx


# -- chunked bodies that break ------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"3\r\nabc\r\nffffffffffffffffff\r\nabc\r\n0\r\n\r\n",  # chunk-size overflow
        b"3\r\nabc\r\n10000000000000003\r\nabc\r\n0\r\n\r\n",
        b"0x3\r\nabc\r\n0\r\n\r\n",
        b"-3\r\nabc\r\n0\r\n\r\n",
        b"3 \r\nabc\r\n0\r\n\r\n",
        b" 3\r\nabc\r\n0\r\n\r\n",
        b"3\nabc\r\n0\r\n\r\n",  # bare LF after the size
        b"3\r\nabc\n0\r\n\r\n",
        b"3\r\nabcd\r\n0\r\n\r\n",  # more data than the size
        b"3\r\nab\r\n0\r\n\r\n",
        b"3\r\nabcX0\r\n\r\n",
        b'3;a="b\r\nabc\r\n0\r\n\r\n',  # unterminated quoted extension
        b"3;a\x00=b\r\nabc\r\n0\r\n\r\n",
        b"3;a=b\nc\r\nabc\r\n0\r\n\r\n",
        b"zz\r\nabc\r\n0\r\n\r\n",
        # trailers with fields that would change the framing, obs-fold, bare LF
        b"3\r\nabc\r\n0\r\nContent-Length: 5\r\n\r\n",
        b"3\r\nabc\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"3\r\nabc\r\n0\r\nX: a\r\n b\r\n\r\n",
        b"3\r\nabc\r\n0\r\nX: a\nY: b\r\n\r\n",
    ],
    ids=repr,
)
def test_broken_chunked_body_is_never_delivered(canary: CanaryThread, body: bytes) -> None:
    data = post(HOST + b"Transfer-Encoding: chunked\r\n", body)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
    out = talk(canary, data + smuggled)
    assert out.statuses == [400], out.responses[0].body
    assert out.closed
    assert out.upstream == []  # at most a begun request, never completed
    for partial in out.incomplete:
        assert not partial.endswith(b"0\r\n\r\n")


def test_trailers_beyond_the_head_limit_void_the_request(canary: CanaryThread) -> None:
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 1000) for i in range(80))  # > 64 KiB
    body = b"3\r\nabc\r\n0\r\n" + trailers + b"\r\n"
    out = talk(canary, post(HOST + b"Transfer-Encoding: chunked\r\n", body))
    assert out.statuses == [400] and out.closed
    assert out.upstream == []


def test_trailers_with_host_or_routing_fields_are_ignored(canary: CanaryThread) -> None:
    body = b"3\r\nabc\r\n0\r\nHost: evil\r\nX-Canary-Arm: candidate\r\n\r\n"
    out = served(canary, post(HOST + b"Transfer-Encoding: chunked\r\n", body), "POST", "/p", b"abc")
    assert b"evil" not in out.upstream[0].raw


# -- pipelining and keep-alive ------------------------------------------------------------


def _rid(n: int) -> bytes:
    return b"X-Request-Id: req-%d\r\n" % n


def test_pipelined_requests_are_answered_in_order_and_forwarded_once(
    canary: CanaryThread,
) -> None:
    data = (
        b"GET /1 HTTP/1.1\r\nHost: t\r\n" + _rid(1) + b"\r\n"
        b"POST /2 HTTP/1.1\r\nHost: t\r\n" + _rid(2) + b"Content-Length: 3\r\n\r\nabc"
        b"POST /3 HTTP/1.1\r\nHost: t\r\n" + _rid(3) + b"Transfer-Encoding: chunked\r\n\r\n"
        b"2\r\nde\r\n0\r\n\r\n"
        b"HEAD /4 HTTP/1.1\r\nHost: t\r\n" + _rid(4) + b"\r\n"
    )
    canary.reset()
    with RawClient(canary.port) as c:
        c.send(data)
        got = [c.read_response(m) for m in ("GET", "POST", "POST", "HEAD")]
        c.send(PROBE)
        assert c.read_response().status == 200
    canary.settle()
    assert [r.header("x-request-id") for r in got] == ["req-1", "req-2", "req-3", "req-4"]
    assert [r.status for r in got] == [200] * 4
    up = canary.upstream.requests
    assert [(q.method, q.target, q.body) for q in up] == [
        ("GET", "/1", b""),
        ("POST", "/2", b"abc"),
        ("POST", "/3", b"de"),
        ("HEAD", "/4", b""),
        ("GET", "/probe", b""),
    ]
    assert [q.header("x-request-id") for q in up[:4]] == ["req-1", "req-2", "req-3", "req-4"]


def test_empty_lines_before_a_request_line_are_ignored(canary: CanaryThread) -> None:
    # RFC 9112 section 2.2 (nginx and llhttp skip CR and LF between requests)
    data = b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\n\r\n\r\nGET /2 HTTP/1.1\r\nHost: t\r\n\r\n"
    out = talk(canary, b"\r\n" + data, answers=2)
    assert out.statuses == [200, 200]
    assert out.forwarded == [("GET", "/1", b""), ("GET", "/2", b"")]


def test_pipelined_requests_ending_with_close_are_all_answered_then_closed(
    canary: CanaryThread,
) -> None:
    data = (
        b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\nGET /2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    out = talk(canary, data + b"GET /3 HTTP/1.1\r\nHost: t\r\n\r\n", answers=2)
    assert out.statuses == [200, 200] and out.closed
    assert out.forwarded == [("GET", "/1", b""), ("GET", "/2", b"")]


def test_a_bad_request_behind_a_good_one_closes_after_the_good_answer(
    canary: CanaryThread,
) -> None:
    data = (
        b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n"
        b"GET /3 HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    out = talk(canary, data)
    assert out.statuses == [200] and out.closed
    assert out.forwarded == [("GET", "/1", b"")]


def test_good_requests_before_a_bad_one_are_answered_and_nothing_after_it_is_read(
    canary: CanaryThread,
) -> None:
    data = (
        b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi"
        b"POST /3 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"
        b"GET /4 HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    out = talk(canary, data, answers=2)
    assert out.statuses == [200, 200] and out.closed
    assert out.forwarded == [("GET", "/1", b""), ("POST", "/2", b"hi")]


def test_http10_without_keep_alive_is_closed_after_its_answer(canary: CanaryThread) -> None:
    out = talk(canary, b"GET /a HTTP/1.0\r\nHost: t\r\n\r\nGET /b HTTP/1.0\r\nHost: t\r\n\r\n")
    assert out.statuses == [200] and out.closed
    assert out.responses[0].version == "HTTP/1.1"
    assert out.forwarded == [("GET", "/a", b"")]


def test_http10_with_keep_alive_stays_open(canary: CanaryThread) -> None:
    data = b"POST /a HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi"
    out = served(canary, data, "POST", "/a", b"hi")
    assert out.responses[0].header("connection") == "keep-alive"


def test_half_closed_client_gets_every_answer(canary: CanaryThread) -> None:
    canary.reset()
    with RawClient(canary.port) as c:
        c.send(b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\nGET /2 HTTP/1.1\r\nHost: t\r\n\r\n")
        c.shutdown_write()
        got = c.read_responses()
    canary.settle()
    assert [r.status for r in got] == [200, 200]
    assert [q.target for q in canary.upstream.requests] == ["/1", "/2"]


def test_incomplete_body_then_close_is_never_delivered(canary: CanaryThread) -> None:
    canary.reset()
    with RawClient(canary.port) as c:
        c.send(post(HOST + b"Content-Length: 10\r\n", b"abc"))
        c.shutdown_write()
        got = c.read_responses()
    canary.settle()
    assert [r.status for r in got] in ([], [408], [400])
    assert canary.upstream.requests == []
    canary.reset()
    with RawClient(canary.port) as c:
        c.send(post(HOST + b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n"))
        c.shutdown_write()
        got = c.read_responses()
    canary.settle()
    assert canary.upstream.requests == []


# -- the harness's own upstream hook (also issue 12 finding 1, seen from the client) ----------


def test_a_post_the_upstream_read_and_never_answered_is_delivered_once() -> None:
    def answer(req: Captured) -> bytes | None:
        if req.method == "POST":
            return None  # read the whole request, then the connection drops
        return b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nhi"

    upstream = CapturingUpstream(answer=answer)
    with CanaryThread(upstream=upstream) as c:
        with RawClient(c.port) as client:
            client.send(b"GET /warm HTTP/1.1\r\nHost: t\r\n\r\n")
            warm = client.read_response()
        with RawClient(c.port) as client:
            client.send(
                b"POST /charge HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b'Content-Length: 13\r\n\r\n{"amount": 1}'
            )
            charge = client.read_response()
        c.settle()
    assert (warm.status, warm.body) == (201, b"hi")
    assert charge.status == 502  # nginx: 502, and the POST is not sent again
    assert [(q.method, q.target, q.body) for q in upstream.requests] == [
        ("GET", "/warm", b""),
        ("POST", "/charge", b'{"amount": 1}'),
    ]
