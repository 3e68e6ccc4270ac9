"""Signal strings (canary.signals), Server-Timing, JSON paths, and body/SSE extraction of
canary.observe.extract."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canary.observe.extract import (
    JsonPath,
    ResponseExtractor,
    ResponseInspector,
    inter_token_latency,
    is_event_stream,
    json_number,
    parse_number,
    parse_server_timing,
    tokens_per_s,
)
from canary.signals import (
    SOURCE_DERIVED,
    SOURCE_EXTERNAL,
    SOURCE_PROXY,
    SOURCE_RESPONSE,
    parse_signal,
)

# --- signal strings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "arg", "key", "source"),
    [
        ("latency", "latency", "", "latency", SOURCE_PROXY),
        ("ttft", "ttft", "", "ttft", SOURCE_PROXY),
        ("error", "error", "", "error", SOURCE_PROXY),
        ("tokens_per_s", "tokens_per_s", "", "tokens_per_s", SOURCE_DERIVED),
        ("itl", "itl", "", "itl", SOURCE_DERIVED),
        ("cost", "cost", "", "cost", SOURCE_DERIVED),
        ("feedback", "feedback", "", "feedback", SOURCE_EXTERNAL),
        ("agreement", "agreement", "", "agreement", SOURCE_EXTERNAL),
        ("header:X-Model-Cost", "header", "x-model-cost", "header:x-model-cost", SOURCE_RESPONSE),
        ("server_timing:inference", "server_timing", "inference", "server_timing:inference",
         SOURCE_RESPONSE),
        ("server_timing:DB", "server_timing", "DB", "server_timing:DB", SOURCE_RESPONSE),
        ("json:usage.total_tokens", "json", "usage.total_tokens", "json:usage.total_tokens",
         SOURCE_RESPONSE),
        ("json:choices.0.score", "json", "choices.0.score", "json:choices.0.score",
         SOURCE_RESPONSE),
        ("json:predictions.0", "json", "predictions.0", "json:predictions.0", SOURCE_RESPONSE),
        ("resource:process_resident_memory_bytes", "resource",
         "process_resident_memory_bytes", "resource:process_resident_memory_bytes",
         SOURCE_EXTERNAL),
        ('resource:gpu_util{gpu="0"}', "resource", 'gpu_util{gpu="0"}',
         'resource:gpu_util{gpu="0"}', SOURCE_EXTERNAL),
    ],
)  # fmt: skip
def test_parse_signal_good(text: str, kind: str, arg: str, key: str, source: str) -> None:
    sig = parse_signal(text)
    assert (sig.kind, sig.arg, sig.key, sig.source) == (kind, arg, key, source)
    assert sig.per_request == (source != SOURCE_EXTERNAL)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("foo:bar", "unknown signal kind 'foo' in 'foo:bar'; expected one of latency, ttft"),
        ("foo", "unknown signal 'foo'; expected one of"),
        ("", "non-empty string"),
        ("header", "it needs a NAME"),
        ("header:", "needs a name after 'header:'"),
        ("header:X Cost", "not a valid HTTP header name"),
        ("server_timing:a;b", "not a valid Server-Timing metric name"),
        ("json:usage..total", "is not a JSON path"),
        ("json:.usage", "is not a JSON path"),
        ("json:usage.", "is not a JSON path"),
        ("json:a b", "is not a JSON path"),
        ("latency:p95", "takes no argument"),
        ("resource:9lives", "not a Prometheus metric name"),
        ("Latency", "unknown signal 'Latency'"),
    ],
)
def test_parse_signal_bad(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_signal(text)


def test_parse_signal_error_lists_every_kind() -> None:
    with pytest.raises(ValueError, match="expected one of") as exc:
        parse_signal("foo:bar")
    for expected in ("latency", "cost", "header:NAME", "server_timing:NAME", "json:NAME",
                     "resource:NAME", "feedback"):  # fmt: skip
        assert expected in str(exc.value)


# --- Server-Timing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("", {}),
        ("db;dur=53", {"db": 0.053}),
        ("db;dur=53, app;dur=47.5", {"db": 0.053, "app": 0.0475}),
        ("miss, db;dur=53", {"db": 0.053}),  # no dur: no value (browsers say 0)
        ('cache;desc="Cache Read";dur=23.5', {"cache": 0.0235}),
        ("db ; dur = 53 ,app;dur=1", {"db": 0.053, "app": 0.001}),  # optional whitespace
        ("db;DUR=53", {"db": 0.053}),  # parameter names are case-insensitive
        ("DB;dur=1, db;dur=2", {"DB": 0.001, "db": 0.002}),  # metric names are not
        ("db;dur=1;dur=2", {"db": 0.001}),  # the first dur of an entry wins
        ("db;dur=abc;dur=2", {}),  # ... even when it is invalid
        ("db;dur=1, db;dur=2", {"db": 0.001}),  # the first entry of a name wins
        ("db, db;dur=2", {"db": 0.002}),  # ... among those with a duration
        ('db;dur="12.5"', {"db": 0.0125}),  # quoted value
        ('db;desc="a, b; c=1";dur=7, app;dur=1', {"db": 0.007, "app": 0.001}),
        ('db;desc="say \\"hi\\", ok";dur=7', {"db": 0.007}),  # escaped quote in a quoted string
        ('db;desc="unterminated, app;dur=1', {}),  # garbage: nothing rather than a wrong value
        ("db;dur", {}),
        ("db;dur=", {}),
        ("db;dur=nan, app;dur=inf", {}),
        ("db;dur=-1", {"db": -0.001}),
        ("db;dur=1e3", {"db": 1.0}),
        (",,, ;dur=3, db;dur=4", {"db": 0.004}),
    ],
)
def test_parse_server_timing(header: str, expected: dict[str, float]) -> None:
    got = parse_server_timing(header)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v)


_names = st.text(alphabet="abcdefgXYZ_-0", min_size=1, max_size=6)
_entry = st.tuples(_names, st.one_of(st.none(), st.integers(0, 10**6)))


@given(st.lists(_entry, max_size=6), st.sampled_from([",", ", ", " ,  "]), st.booleans())
def test_server_timing_quoted_and_plain_paths_agree(
    entries: list[tuple[str, int | None]], sep: str, add_desc: bool
) -> None:
    # The fast split path (no quotes) and the quote-aware path give the same durations.
    def render(quote: bool) -> str:
        parts = []
        for name, dur in entries:
            s = name
            if quote and add_desc:
                s += ';desc="x, y; z"'
            if dur is not None:
                s += f';dur="{dur}"' if quote else f";dur={dur}"
            parts.append(s)
        return sep.join(parts)

    plain = parse_server_timing(render(False))
    assert parse_server_timing(render(True)) == plain
    expected: dict[str, float] = {}
    for name, dur in entries:
        if dur is not None and name not in expected:
            expected[name] = dur / 1000.0
    assert plain == expected


# --- JSON paths and values --------------------------------------------------------------------


def test_json_path_resolution() -> None:
    doc = {
        "usage": {"total_tokens": 12, "nested": {"x": [1, {"y": 2.5}]}},
        "choices": [{"score": 0.9}, {"score": 0.1}],
        "predictions": [3, 4],
        "0": {"k": 7},
        "flag": True,
        "none": None,
    }
    assert JsonPath("usage.total_tokens").resolve(doc) == 12
    assert JsonPath("choices.1.score").resolve(doc) == 0.1
    assert JsonPath("predictions.0").resolve(doc) == 3
    assert JsonPath("usage.nested.x.1.y").resolve(doc) == 2.5
    assert JsonPath("0.k").resolve(doc) == 7  # digits are keys of objects too
    assert JsonPath("flag").resolve(doc) is True
    assert JsonPath("usage").resolve(doc) == doc["usage"]
    for missing in ("none", "none.x", "choices.2.score", "usage.total_tokens.x", "nope",
                    "predictions.x", "choices.-1"[:9]):  # fmt: skip
        assert JsonPath(missing).resolve(doc) is None
    assert JsonPath("a").resolve([1]) is None
    assert JsonPath("0").resolve([5]) == 5
    assert JsonPath("usage.total_tokens").needle == b'"total_tokens"'
    assert JsonPath("predictions.0").needle == b'"predictions"'
    assert JsonPath("0.1").needle is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [(3, 3.0), (2.5, 2.5), (True, 1.0), (False, 0.0), (None, None), ("3", None), ([1], None),
     ({"a": 1}, None), (float("nan"), None), (float("inf"), None), (10**400, None)],
)  # fmt: skip
def test_json_number(value: object, expected: float | None) -> None:
    assert json_number(value) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.25", 0.25), (" 3 ", 3.0), ("1e-3", 0.001), ("-2", -2.0), ("abc", None), ("", None),
     ("nan", None), ("inf", None), ("1, 2", None), ("0.1 USD", None)],
)  # fmt: skip
def test_parse_number(text: str, expected: float | None) -> None:
    assert parse_number(text) == expected


def test_is_event_stream() -> None:
    assert is_event_stream("text/event-stream")
    assert is_event_stream("Text/Event-Stream; charset=utf-8")
    assert not is_event_stream("application/json")
    assert not is_event_stream("")


# --- extractor: headers, buffered bodies ------------------------------------------------------


def _run(
    ex: ResponseExtractor,
    body: bytes,
    *,
    content_type: str = "application/json",
    encoding: str = "",
    headers: dict[str, str] | None = None,
    chunk: int = 0,
    latency: float | None = None,
    ttft: float | None = None,
) -> ResponseInspector:
    ins = ex.start(content_type, encoding)
    step = chunk or max(len(body), 1)
    for i in range(0, len(body), step):
        ins.feed(body[i : i + step])
    ins.finish(headers or {}, latency=latency, ttft=ttft)
    assert ins.bytes_in == len(body)
    return ins


def test_counting_only_without_json_signals() -> None:
    ex = ResponseExtractor(["latency", "error", "header:X-Cost", "server_timing:inf", "feedback"])
    assert not ex.inspects_body
    ins = ex.start("application/json")
    assert type(ins) is ResponseInspector  # feed() only counts
    ins.feed(b'{"a": 1}')
    ins.finish({"x-cost": "0.5", "server-timing": "inf;dur=250, other;dur=1"})
    assert ins.bytes_in == 8
    assert ins.signals == {"header:x-cost": 0.5, "server_timing:inf": 0.25}
    # an event stream without tokens_per_s is not parsed either
    assert type(ex.start("text/event-stream")) is ResponseInspector


class _MultiDict(dict[str, str]):
    """Minimal stand-in for multidict.CIMultiDictProxy: repeated fields via getall."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        super().__init__()
        self.items_ = items
        for k, v in items:
            self.setdefault(k, v)

    def getall(self, key: str, default: tuple[str, ...] = ()) -> list[str]:
        return [v for k, v in self.items_ if k == key] or list(default)


def test_repeated_server_timing_fields_are_all_read() -> None:
    ex = ResponseExtractor(["server_timing:total", "server_timing:db"])
    headers = _MultiDict([("server-timing", "db;dur=5"), ("server-timing", "total;dur=9")])
    ins = _run(ex, b"", headers=headers)
    assert ins.signals == {"server_timing:db": 0.005, "server_timing:total": 0.009}


def test_header_signal_missing_or_not_numeric_is_absent() -> None:
    ex = ResponseExtractor(["header:X-A", "header:x-b", "header:x-c"])
    ins = _run(ex, b"", headers={"x-a": "abc", "x-b": "nan"})
    assert ins.signals == {}


def test_buffered_json_signals_and_prediction() -> None:
    ex = ResponseExtractor(
        ["json:usage.total_tokens", "json:scores.1", "json:ok", "json:label", "json:missing"],
        prediction="json:label",
        cost_tokens=True,
    )
    body = json.dumps(
        {"usage": {"total_tokens": 42}, "scores": [0.1, 0.7], "ok": True, "label": "fraud"}
    ).encode()
    ins = _run(ex, body, chunk=5)
    assert ins.signals == {"json:usage.total_tokens": 42.0, "json:scores.1": 0.7, "json:ok": 1.0}
    assert ins.prediction == "fraud"
    assert ins.total_tokens == 42.0
    assert ex.invalid == ex.truncated == 0


def test_buffered_invalid_json_is_counted_not_raised() -> None:
    ex = ResponseExtractor(["json:a"])
    for body in (b"<html>oops</html>", b"", b"[" * 100_000, b'{"a": 1'):
        ins = _run(ex, body)
        assert ins.signals == {}
    assert ex.invalid == 4


def test_buffer_limit() -> None:
    ex = ResponseExtractor(["json:a"], body_limit=64)
    fits = json.dumps({"a": 1, "pad": "x" * (64 - 19)}).encode()
    assert len(fits) == 64
    assert _run(ex, fits, chunk=10).signals == {"json:a": 1.0}
    over = json.dumps({"a": 1, "pad": "x" * (65 - 19)}).encode()
    ins = _run(ex, over, chunk=10)
    assert ins.signals == {}
    assert ex.truncated == 1
    assert ins._chunks is None  # type: ignore[attr-defined]  # buffer released


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate", "GZIP"])
def test_compressed_body(encoding: str) -> None:
    ex = ResponseExtractor(["json:a"], body_limit=1000)
    raw = json.dumps({"a": 5, "pad": " " * 500}).encode()
    body = zlib.compress(raw) if encoding == "deflate" else gzip.compress(raw)
    assert _run(ex, body, encoding=encoding, chunk=7).signals == {"json:a": 5.0}
    # a small body that inflates beyond the limit counts as truncated
    bomb = gzip.compress(json.dumps({"a": 5, "pad": " " * 5000}).encode())
    assert len(bomb) < 1000
    assert _run(ex, bomb, encoding=encoding).signals == {}
    assert ex.truncated == 1
    assert _run(ex, b"not gzip", encoding=encoding).signals == {}
    assert ex.invalid == 1


def test_unsupported_encoding_counts_bytes_only() -> None:
    ex = ResponseExtractor(["json:a"])
    ins = _run(ex, b"\x8b\x00garbage", encoding="br")
    assert type(ins) is ResponseInspector
    assert ins.signals == {}
    assert ex.undecodable == 1


def test_prediction_accepts_bare_path_and_rejects_other_kinds() -> None:
    ex = ResponseExtractor([], prediction="predictions.0")
    assert _run(ex, b'{"predictions": [[1, 2]]}').prediction == [1, 2]
    with pytest.raises(ValueError, match="not a JSON path"):
        ResponseExtractor([], prediction="header:x")
    with pytest.raises(ValueError, match="unknown signal"):
        ResponseExtractor(["nope"])


# --- extractor: event streams -----------------------------------------------------------------


def _openai_stream(n: int, sep: bytes = b"\n\n", usage: bool = True) -> bytes:
    out = []
    for i in range(n):
        chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "choices": [
                {"index": 0, "delta": {"content": f"tok{i} \u00e9"}, "finish_reason": None}
            ],
            "usage": None,
        }
        out.append(b"data: " + json.dumps(chunk).encode() + sep)
    if usage:
        final = {
            "id": "chatcmpl-1",
            "choices": [],
            "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": n + 7},
        }
        out.append(b"data: " + json.dumps(final).encode() + sep)
    out.append(b"data: [DONE]" + sep)
    return b"".join(out)


_STREAM_SIGNALS = ["json:usage.total_tokens", "json:usage.completion_tokens", "tokens_per_s", "itl"]


def _feed_split(body: bytes, cuts: list[int], encoding: str = "") -> ResponseInspector:
    ex = ResponseExtractor(_STREAM_SIGNALS, cost_tokens=True, body_limit=4096)
    ins = ex.start("text/event-stream", encoding)
    prev = 0
    for cut in [*sorted(cuts), len(body)]:
        ins.feed(body[prev:cut])
        prev = cut
    ins.finish({}, latency=2.0, ttft=0.5)
    assert ex.truncated == ex.invalid == 0
    return ins


def test_sse_openai_usage_in_last_chunk() -> None:
    ins = _feed_split(_openai_stream(30), [])
    assert ins.signals["json:usage.total_tokens"] == 37.0
    assert ins.signals["json:usage.completion_tokens"] == 30.0
    assert ins.completion_tokens == 30.0
    assert ins.total_tokens == 37.0
    assert ins.events == 31  # 30 content chunks + the usage chunk; [DONE] is not an event
    assert ins.signals["tokens_per_s"] == pytest.approx(30 / 1.5)
    assert ins.signals["itl"] == pytest.approx(1.5 / 29)


def test_sse_without_usage_counts_events() -> None:
    ins = _feed_split(_openai_stream(12, usage=False), [])
    assert "json:usage.total_tokens" not in ins.signals
    assert ins.total_tokens is None
    assert ins.events == 12
    assert ins.signals["tokens_per_s"] == pytest.approx(12 / 1.5)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 10_000), max_size=40),
    st.sampled_from([b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r\n"]),
    st.integers(1, 20),
)
def test_sse_split_anywhere_finds_same_usage(cuts: list[int], sep: bytes, n: int) -> None:
    body = _openai_stream(n, sep)
    ins = _feed_split(body, [c % (len(body) + 1) for c in cuts])
    assert ins.signals["json:usage.total_tokens"] == n + 7
    assert ins.events == n + 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 10_000), max_size=30), st.integers(1, 10))
def test_sse_gzip_split_anywhere(cuts: list[int], n: int) -> None:
    body = gzip.compress(_openai_stream(n))
    ins = _feed_split(body, [c % (len(body) + 1) for c in cuts], encoding="gzip")
    assert ins.signals["json:usage.total_tokens"] == n + 7


@st.composite
def _event_streams(draw: st.DrawFn) -> tuple[bytes, int, int | None]:
    """A stream of events with comments, other fields, multi-line data and mixed line ends."""
    ends = st.sampled_from([b"\n", b"\r\n", b"\r"])
    out: list[bytes] = []
    prev = b""

    def eol() -> bytes:
        # "\r" then "\n" would be one CRLF terminator, not two: avoid generating that pair
        nonlocal prev
        end = draw(ends)
        if prev == b"\r" and end == b"\n":
            end = b"\r\n"
        prev = end
        return end

    events = 0
    last: int | None = None
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.booleans()):
            out.append(b": keep-alive" + eol())
        if draw(st.booleans()):
            out.append(b"event: message" + eol() + b"id: 7" + eol())
        value = draw(st.one_of(st.none(), st.integers(0, 1000)))
        doc = json.dumps({"x": "a;b", "usage": None if value is None else {"total_tokens": value}})
        # JSON may be split into several data lines at whitespace: they are joined with "\n"
        pieces = doc.split(", ") if draw(st.booleans()) else [doc]
        for j, piece in enumerate(pieces):
            space = b" " if draw(st.booleans()) else b""
            tail = b"," if j < len(pieces) - 1 else b""
            out.append(b"data:" + space + piece.encode() + tail + eol())
        out.append(eol())
        events += 1
        if value is not None:
            last = value
    return b"".join(out), events, last


@settings(max_examples=300, deadline=None)
@given(_event_streams(), st.lists(st.integers(0, 10_000), max_size=30))
def test_sse_general_streams(stream: tuple[bytes, int, int | None], cuts: list[int]) -> None:
    body, events, last = stream
    ex = ResponseExtractor(["json:usage.total_tokens", "tokens_per_s"], body_limit=4096)
    ins = ex.start("text/event-stream")
    prev = 0
    for cut in [*sorted(c % (len(body) + 1) for c in cuts), len(body)]:
        ins.feed(body[prev:cut])
        prev = cut
    ins.finish({}, latency=1.0, ttft=0.0)
    assert ins.events == events
    assert ins.signals.get("json:usage.total_tokens") == (None if last is None else float(last))
    assert ex.invalid == 0


def test_sse_last_event_without_blank_line_is_used() -> None:
    ex = ResponseExtractor(["json:usage.total_tokens"])
    ins = _run(ex, b'data: {"usage": {"total_tokens": 3}}', content_type="text/event-stream")
    assert ins.signals == {"json:usage.total_tokens": 3.0}
    ins = _run(ex, b'data: {"usage": {"total_tokens": 4}}\r', content_type="text/event-stream")
    assert ins.signals == {"json:usage.total_tokens": 4.0}


def test_sse_later_null_does_not_erase_earlier_value() -> None:
    ex = ResponseExtractor(["json:usage.total_tokens"])
    body = b'data: {"usage": {"total_tokens": 5}}\n\ndata: {"usage": null}\n\n'
    assert _run(ex, body, content_type="text/event-stream").signals == {
        "json:usage.total_tokens": 5.0
    }


def test_sse_invalid_event_json_is_counted() -> None:
    ex = ResponseExtractor(["json:usage.total_tokens"])
    body = b'data: {"total_tokens": oops\n\ndata: {"usage": {"total_tokens": 2}}\n\n'
    ins = _run(ex, body, content_type="text/event-stream", chunk=3)
    assert ins.signals == {"json:usage.total_tokens": 2.0}
    assert ex.invalid == 1  # per response


def test_sse_needle_skips_parsing_irrelevant_events() -> None:
    ex = ResponseExtractor(["json:usage.total_tokens"])
    # Not JSON, but it cannot contain the path, so it is never parsed (and not counted invalid).
    body = b"data: not json at all\n\n" + _openai_stream(2)
    ins = _run(ex, body, content_type="text/event-stream")
    assert ins.signals == {"json:usage.total_tokens": 9.0}
    assert ex.invalid == 0


@pytest.mark.parametrize("chunk", [1, 7, 1000, 0])
def test_sse_oversized_event_is_dropped_with_bounded_memory(chunk: int) -> None:
    limit = 256
    ex = ResponseExtractor(["json:usage.total_tokens"], body_limit=limit)
    big_line = b'data: {"usage": {"total_tokens": 1}, "pad": "' + b"x" * 1000 + b'"}\n\n'
    many_lines = b"".join(b'data: "' + b"y" * 50 + b'"\n' for _ in range(20)) + b"\n"
    good = b'data: {"usage": {"total_tokens": 9}}\n\n'
    body = good + big_line + many_lines + good.replace(b"9", b"8") + big_line
    ins = ex.start("text/event-stream")
    step = chunk or len(body)
    line_peak = event_peak = 0
    for i in range(0, len(body), step):
        ins.feed(body[i : i + step])
        line_peak = max(line_peak, ins._partial_len)  # type: ignore[attr-defined]
        event_peak = max(event_peak, ins._size)  # type: ignore[attr-defined]
    ins.finish({})
    assert ins.signals == {"json:usage.total_tokens": 8.0}
    assert ex.truncated == 3
    # an open line holds at most the limit plus the chunk in hand; an open event the limit
    assert line_peak <= limit + step
    assert event_peak <= limit
    assert ins.events == 2


def test_sse_oversized_line_at_end_of_stream() -> None:
    ex = ResponseExtractor(["json:usage.total_tokens"], body_limit=64)
    body = b'data: {"usage": {"total_tokens": 9}}\n\n' + b"data: " + b"z" * 500
    ins = _run(ex, body, content_type="text/event-stream", chunk=16)
    assert ins.signals == {"json:usage.total_tokens": 9.0}
    assert ex.truncated == 1


def test_non_stream_tokens_per_s_uses_latency() -> None:
    ex = ResponseExtractor(["tokens_per_s", "itl"])
    ins = _run(ex, b'{"usage": {"completion_tokens": 50}}', latency=2.0, ttft=1.9)
    assert ins.signals == {"tokens_per_s": 25.0}  # itl is for streams only


def test_derived_signals_need_latency() -> None:
    ex = ResponseExtractor(["tokens_per_s"])
    ins = _run(ex, b'{"usage": {"completion_tokens": 50}}')
    assert ins.signals == {}
    assert ins.completion_tokens == 50.0


def test_tokens_per_s_and_itl_helpers() -> None:
    assert tokens_per_s(10, 2.0, 1.0, True) == 10.0
    assert tokens_per_s(10, 2.0, 1.0, False) == 5.0
    assert tokens_per_s(10, 2.0, None, True) == 5.0
    assert tokens_per_s(10, 1.0, 1.0, True) is None
    assert tokens_per_s(None, 1.0, 0.5, True) is None
    assert tokens_per_s(0, 1.0, 0.5, True) == 0.0
    assert inter_token_latency(11, 2.0, 1.0) == pytest.approx(0.1)
    assert inter_token_latency(1, 2.0, 1.0) is None
    assert inter_token_latency(5, 2.0, None) is None


def test_duplicate_signals_are_compiled_once() -> None:
    ex = ResponseExtractor(["header:X-A", "header:x-a", "json:a", "json:a", "latency"])
    assert [s.key for s in ex.signals] == ["header:x-a", "json:a", "latency"]
    with pytest.raises(ValueError, match="body_limit"):
        ResponseExtractor([], body_limit=0)
