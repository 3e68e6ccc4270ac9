"""Property-based fuzzing of the proxy port: request heads and chunked bodies, well-formed and
broken, sent on one connection to canary in front of a capturing upstream.

Each generated request carries its index in its target (``?r=K``), so what the upstream
receives is matched to what the client sent. A model of the framing says, for each request,
whether a server may serve it (and then with exactly which body) or must refuse it (BAD: the
framing or head is faulty per RFC 9112 / nginx, or the request is incomplete), and which
requests a server can reach at all (nothing after a BAD request, a ``Connection: close`` or an
HTTP/1.0 request without keep-alive). Properties:

* canary never forwards a request the client did not send: every forwarded request is a
  reachable, non-BAD client request, with the same method, the same target (origin-form) and
  exactly the body bytes the framing gives;
* each client request is forwarded at most once and in order, so never more than were sent;
* a request is never answered twice: responses on the connection <= requests sent, and each is
  a well-formed HTTP/1.1 response;
* the client always gets its answers or the close within a bounded time.

The CI form runs ~200 derandomized examples; ``-m slow`` runs a longer one.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.client_harness import CanaryThread, ProtocolViolation, RawClient, RawResponse

BOUND = 10.0  # seconds for the whole exchange (canary's client_timeout here is 3 s)


@pytest.fixture(scope="module")
def canary() -> Iterator[CanaryThread]:
    with CanaryThread() as c:
        yield c


# -- the model --------------------------------------------------------------------------------


@dataclass
class Req:
    index: int
    method: str
    target: str  # the origin-form target the upstream must receive
    head: bytes
    body_wire: bytes  # the bytes sent after the head
    bad: bool  # must be refused (never forwarded, nothing after it either)
    closes: bool  # a server reads nothing after it
    declared: int | None = None  # Content-Length when it may differ from len(body_wire)
    body: bytes = b""  # the body a correct server reads (for chunked: decoded)


OK_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
BAD_METHODS = ["TRACE", "get", "G\x00T", "FOO"]
PATHS = ["/", "/v1/predict", "/a/b/", "/%2e%2e/x", "/q;p=1", "/caf%C3%A9", "//x"]
BAD_TARGET_SHAPES = ["/a b", "/a\x00b", "/a\tb", "a/b", "*", "/a\x7f", "http://a@b/x"]
OK_HOSTS = [b"t", b"example.com", b"example.com:8080", b"[::1]:80", b"127.0.0.1", b"a-b.c."]
BAD_HOSTS = [b"a@b", b"", b"a b", b"a/b", b"a..b", b"[::1", b"a:b", b"\x00"]
TE_BAD = [
    b"identity, chunked",
    b"gzip, chunked",
    b"chunked, chunked",
    b"chunked, gzip",
    b"identity",
    b"gzip",
    b"",
    b"xchunked",
    b"chunked;q=1",
]
CL_BAD = [b"+%d", b"%d, %d", b"0x%x", b"-%d", b"%d %d", b"%da", b" "]
# bodies never contain an upper-case letter: a piece of one, read as a request, is never valid
BODY = st.binary(max_size=40).map(lambda b: bytes(c for c in b if not 65 <= c <= 90))
TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=12,
).map(lambda s: s.encode("latin-1"))
HIDDEN = b"GET /hidden?r=999 HTTP/1.1\r\nHost: t\r\n\r\n"


CHUNK_FAULTS = ["short", "hex", "overflow", "space", "lf", "noend", "ext", "trailer_cl", "fold"]


@st.composite
def chunked_body(draw: st.DrawFn, broken: bool = False) -> tuple[bytes, bytes, bool]:
    """(wire bytes, decoded body, bad); with ``broken``, one fault somewhere."""
    chunks = draw(st.lists(st.binary(min_size=1, max_size=20), max_size=4))
    if draw(st.booleans()):
        chunks.append(HIDDEN)
    fault = draw(st.sampled_from(CHUNK_FAULTS)) if broken else "none"
    wire = b""
    bad = fault not in ("none", "ext", "trailer_cl")
    where = draw(st.integers(0, max(0, len(chunks) - 1)))
    for i, data in enumerate(chunks):
        size = b"%x" % len(data)
        ext = b""
        if draw(st.booleans()):
            ext = draw(st.sampled_from([b";a=b", b';n="v w"', b";x", b";a=b;c=d"]))
        if i == where:
            if fault == "short" and len(data) >= 2 and data[len(data) - 1 :] != b"\r":
                size = b"%x" % (len(data) - 1)
            elif fault == "short":
                size = b"zz"
            elif fault == "hex":
                size = draw(st.sampled_from([b"0x" + size, b"-" + size, b"g", b"+" + size]))
            elif fault == "overflow":
                size = b"1" + b"0" * 16 + size
            elif fault == "space":
                size = draw(st.sampled_from([b" " + size, size + b" ", size + b"\t"]))
            elif fault == "lf":
                wire += size + ext + b"\n" + data + b"\r\n"
                continue
        wire += size + ext + b"\r\n" + data + b"\r\n"
    if fault in ("short", "hex", "overflow", "space", "lf") and not chunks:
        wire += b"zz\r\n"  # the fault needs a chunk: a bad size line alone
    if fault == "noend":
        return wire, b"".join(chunks), True
    trailer = b""
    if fault == "trailer_cl":
        trailer = b"Content-Length: 5\r\n"
    elif fault == "fold":
        trailer = b"X-T: a\r\n b\r\n"
    elif draw(st.booleans()):
        trailer = b"X-Trailer: v\r\n"
    if fault == "ext" and chunks:
        wire = wire.replace(b"\r\n", b';e="x\r\n', 1)
        bad = True
    return wire + b"0\r\n" + trailer + b"\r\n", b"".join(chunks), bad


FAULTS = ["version", "method", "target", "host", "header", "framing", "chunk", "eol"]


@st.composite
def request(draw: st.DrawFn, index: int) -> Req:
    """One request; a quarter of them have one fault (of the kind ``fault``)."""
    fault: str | None = draw(st.sampled_from([None] * 24 + FAULTS))
    bad = fault is not None and fault != "chunk"  # chunk faults: chunked_body decides
    version = draw(st.sampled_from(["1.1"] * 4 + ["1.0"]))
    if fault == "version":
        version = draw(st.sampled_from(["0.9", "2.0", "1.2", "3.0"]))
    method = draw(st.sampled_from(OK_METHODS))
    if fault == "method":
        method = draw(st.sampled_from(BAD_METHODS))
    path = draw(st.sampled_from(PATHS))
    target = f"{path}?r={index}"
    wire_target = target
    if fault == "target":
        wire_target = draw(st.sampled_from(BAD_TARGET_SHAPES)) + f"?r={index}"
    elif draw(st.integers(0, 5)) == 0:
        wire_target = "http://h.example" + target  # absolute-form

    fields: list[bytes] = []
    if fault == "host":
        kind = draw(st.sampled_from(["none", "dup", "bad"]))
        if kind == "dup":
            fields += [b"Host: t", b"Host: " + draw(st.sampled_from(OK_HOSTS))]
        elif kind == "bad":
            fields.append(b"Host: " + draw(st.sampled_from(BAD_HOSTS)))
        else:
            version = "1.1"  # HTTP/1.1 without Host
    elif version == "1.1" or draw(st.booleans()):
        fields.append(b"Host: " + draw(st.sampled_from(OK_HOSTS)))

    names = [b"A", b"Trace", b"User", b"Canary-Arm", b"Request-Id"]
    n_fields = draw(st.integers(1 if fault == "header" else 0, 3))
    broken_field = draw(st.integers(0, n_fields - 1)) if fault == "header" else -1
    for i in range(n_fields):
        name = b"X-" + draw(st.sampled_from(names))
        value = draw(TEXT)
        if i == broken_field:
            how = draw(st.sampled_from(["value", "name", "fold"]))
            if how == "value":
                value += draw(st.sampled_from([b"\x00", b"\x01", b"\x7f", b"\x0b", b"\rx"]))
            elif how == "name":
                name += draw(st.sampled_from([b" ", b"\x00", b"(", b"@", b"\t"]))
            else:
                value += b"\r\n " + draw(TEXT)  # obs-fold
        fields.append(name + b": " + value)

    closes = version == "1.0"
    conn = draw(st.sampled_from([None] * 6 + ["close", "keep-alive"]))
    if conn is not None:
        fields.append(b"Connection: " + conn.encode())
        closes = conn == "close" or (version == "1.0" and conn != "keep-alive")

    if fault == "framing":
        framing = draw(st.sampled_from(["te_bad", "te_dup", "cl_te", "cl_dup", "cl_bad", "te10"]))
    elif fault == "chunk":
        framing = "chunked"
    else:
        framing = draw(st.sampled_from(["none", "cl", "chunked"] * 3 + ["cl_off"]))
    body = draw(BODY)
    declared: int | None = None
    body_wire = b""
    if framing == "cl":
        if draw(st.integers(0, 4)) == 0:
            body = HIDDEN
        fields.append(b"Content-Length: %d" % len(body))
        body_wire = body
    elif framing == "cl_off":
        declared = max(0, len(body) + draw(st.sampled_from([-3, -1, 1, 5, 100_000])))
        fields.append(b"Content-Length: %d" % declared)
        body_wire = body
    elif framing == "chunked":
        if version == "1.0":
            version = "1.1"
            closes = conn == "close"
        te = draw(st.sampled_from([b"chunked"] * 4 + [b"Chunked", b"chunked ", b"\tchunked"]))
        fields.append(b"Transfer-Encoding: " + te)
        body_wire, body, chunk_bad = draw(chunked_body(broken=fault == "chunk"))
        bad |= chunk_bad
    elif framing == "none":
        body = b""
    else:
        body_wire, _, _ = draw(chunked_body())
        n = len(body_wire)
        if framing == "te_bad":
            fields.append(b"Transfer-Encoding: " + draw(st.sampled_from(TE_BAD)))
        elif framing == "te_dup":
            fields += [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"]
        elif framing == "cl_te":
            fields += [b"Content-Length: %d" % n, b"Transfer-Encoding: chunked"]
        elif framing == "cl_dup":
            extra = draw(st.sampled_from([0, 1]))
            fields += [b"Content-Length: %d" % n, b"Content-Length: %d" % (n + extra)]
        elif framing == "te10":
            version = "1.0"  # RFC 9112 section 6.1: faulty framing
            fields.append(b"Transfer-Encoding: chunked")
        else:
            form = draw(st.sampled_from(CL_BAD))
            value = form % ((n,) * form.count(b"%")) if b"%" in form else form
            fields.append(b"Content-Length: " + value)
    fields = draw(st.permutations(fields)) if fields else fields

    eol = b"\r\n"
    lines = [f"{method} {wire_target} HTTP/{version}".encode("latin-1"), *fields]
    if version == "0.9" and draw(st.booleans()):
        lines[0] = f"{method} {wire_target}".encode("latin-1")  # an HTTP/0.9 request line
    if fault == "eol":
        where = draw(st.integers(0, len(lines)))
        head = b""
        for i, line in enumerate([*lines, b""]):
            # a bare CR ending the head could meet a body beginning with LF: bare LF there
            bare = b"\n" if i == len(lines) else draw(st.sampled_from([b"\n", b"\r"]))
            head += line + (bare if i == where else eol)
    else:
        head = eol.join(lines) + eol + eol
    return Req(index, method, target, head, body_wire, bad, closes, declared, body)


@st.composite
def script(draw: st.DrawFn) -> list[Req]:
    n = draw(st.integers(1, 4))
    return [draw(request(i)) for i in range(n)]


CUTS = st.lists(st.floats(0.0, 1.0), max_size=3)


def reachable(reqs: list[Req]) -> dict[int, bytes]:
    """Index -> body, for the requests a correct server may forward (framed from the wire)."""
    wire = b"".join(r.head + r.body_wire for r in reqs)
    starts = []
    offset = 0
    for r in reqs:
        starts.append(offset)
        offset += len(r.head) + len(r.body_wire)
    out: dict[int, bytes] = {}
    i = 0
    while i < len(reqs):
        r = reqs[i]
        if r.bad:
            break
        body_start = starts[i] + len(r.head)
        if r.declared is not None:
            end = body_start + r.declared
            if end > len(wire):
                break  # incomplete: never delivered
            out[i] = wire[body_start:end]
        else:
            end = body_start + len(r.body_wire)
            out[i] = r.body
        while end < len(wire) and end not in starts and wire[end] in b"\r\n":
            end += 1  # empty lines before a request line are ignored (RFC 9112 section 2.2)
        if r.closes or end not in starts:
            break  # nothing more is read, or the next bytes are not a request's start
        i = starts.index(end)
    return out


# -- the property -----------------------------------------------------------------------------

_INDEX = re.compile(r"[?&]r=(\d+)$")


def exchange(canary: CanaryThread, reqs: list[Req], cuts: list[float]) -> list[RawResponse]:
    """Send the script (in pieces cut at the fractions ``cuts``, so that the server reads it
    in several parts), half-close, and read every answer until the server closes."""
    wire = b"".join(r.head + r.body_wire for r in reqs)
    points = sorted({int(f * len(wire)) for f in cuts} - {0, len(wire)})
    pieces = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    canary.reset()
    began = time.monotonic()
    with RawClient(canary.port, timeout=BOUND) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i, piece in enumerate(pieces):
            if i:
                time.sleep(0.003)
            c.send(piece)
        c.shutdown_write()
        responses: list[RawResponse] = []
        while True:
            remaining = BOUND - (time.monotonic() - began)
            try:
                responses.append(c.read_response(timeout=remaining))
            except EOFError:
                break
            except TimeoutError:
                raise AssertionError("no answer and no close within the bound") from None
            except ProtocolViolation:
                raise
            assert len(responses) <= len(reqs), "more answers than requests"
    canary.settle()
    return responses


def check(canary: CanaryThread, reqs: list[Req], cuts: list[float]) -> None:
    responses = exchange(canary, reqs, cuts)
    may = reachable(reqs)
    forwarded = list(canary.upstream.requests)
    assert len(forwarded) <= len(reqs)
    assert len(responses) <= len(reqs)
    last = -1
    for up in forwarded:
        m = _INDEX.search(up.target)
        assert m is not None, f"forwarded a request the client did not send: {up.raw[:300]!r}"
        k = int(m.group(1))
        assert k < len(reqs), f"forwarded a request the client did not send: {up.raw[:300]!r}"
        assert k > last, f"request {k} forwarded twice or out of order"
        last = k
        assert k in may, f"request {k} is faulty or unreachable but was forwarded: {up.raw!r}"
        r = reqs[k]
        assert (up.method, up.target, up.body) == (r.method, r.target, may[k])
    assert canary.upstream.errors == []  # canary never sends the upstream malformed bytes
    event(f"requests sent {len(reqs)}, forwarded {len(forwarded)}, answered {len(responses)}")
    event("has a faulty request" if any(q.bad for q in reqs) else "all well-formed")
    for resp in responses:
        event(f"status {resp.status}")


def _settings(max_examples: int, derandomize: bool) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=derandomize,  # the CI form: the same examples every run
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@_settings(200, derandomize=True)
@given(reqs=script(), cuts=CUTS)
def test_canary_forwards_only_what_the_client_sent_and_answers_once(
    canary: CanaryThread, reqs: list[Req], cuts: list[float]
) -> None:
    check(canary, reqs, cuts)


@pytest.mark.slow
@_settings(3000, derandomize=False)
@given(reqs=script(), cuts=CUTS)
def test_canary_forwards_only_what_the_client_sent_long(
    canary: CanaryThread, reqs: list[Req], cuts: list[float]
) -> None:
    check(canary, reqs, cuts)
