"""Per-response signal extraction: headers, Server-Timing, JSON and SSE bodies, derived values.

A rollout names the signals it measures (``latency``, ``header:X-Model-Cost``,
``json:usage.total_tokens``, ...); their grammar is :func:`canary.signals.parse_signal`, the
same one the rollout file is validated with. A :class:`ResponseExtractor` is compiled once per
rollout from all of them and hands out one cheap :class:`ResponseInspector` per response::

    extractor = ResponseExtractor(rollout.signals(), prediction=rollout.prediction)
    inspector = extractor.start(content_type, content_encoding)   # once headers arrived
    for chunk in body:                                            # while streaming to the client
        inspector.feed(chunk)
    inspector.finish(headers, latency=latency, ttft=ttft, cost=arm_cost, now=now)
    Observation(..., signals=inspector.signals, prediction=inspector.prediction)

Everything here is O(1) per chunk and bounded in memory: a non-stream body is buffered only
up to ``body_limit`` bytes, an event stream is parsed incrementally and only its last value of
each JSON path is kept. A value that is missing or not a finite number simply leaves its signal
absent for that request; it is never an error.

LLM answer quality (``finish_reason:VALUE``, ``output_tokens``, ``empty_answer``, ``repetition``,
``refusal``) and the answer text kept for a judge (``keep_answer_chars``) are read from the same
parsed bodies and events by :mod:`canary.observe.answers`; without them, answers are not looked at.
"""

from __future__ import annotations

import functools
import json
import math
import re
import zlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final

from canary.observe.answers import AnswerPlan, AnswerRules, AnswerState
from canary.signals import (
    COST,
    ITL,
    TOKENS_PER_S,
    Signal,
    json_path_segments,
    parse_signal,
)

if TYPE_CHECKING:
    from canary.observe.cost import ArmCost

__all__ = [
    "COMPLETION_TOKENS_PATH",
    "DEFAULT_BODY_LIMIT",
    "TOTAL_TOKENS_PATH",
    "JsonPath",
    "ResponseExtractor",
    "ResponseInspector",
    "inter_token_latency",
    "is_event_stream",
    "json_number",
    "loads_utf8",
    "parse_number",
    "parse_server_timing",
    "tokens_per_s",
]


DEFAULT_BODY_LIMIT = 1 << 20  # bytes of a non-stream body (or of one SSE event) we inspect

# OpenAI-compatible usage fields (also used by vLLM, TGI, llama.cpp, LiteLLM).
TOTAL_TOKENS_PATH = "usage.total_tokens"
COMPLETION_TOKENS_PATH = "usage.completion_tokens"


_MISSING: Final = object()


class JsonPath:
    """A compiled dot path into parsed JSON: ``usage.total_tokens``, ``choices.0.score``.

    A segment of digits indexes a list (and is also tried as a key of an object).
    """

    __slots__ = ("needle", "segments", "text")

    def __init__(self, text: str) -> None:
        segments = [(seg, int(seg) if seg.isdigit() else -1) for seg in json_path_segments(text)]
        self.text = text
        self.segments = tuple(segments)
        # Bytes an event must contain for the path to resolve in it: its last key, quoted. Lets
        # the SSE scanner skip json.loads for most events (a key written with \u escapes is
        # missed; no server does that).
        keys = [s for s, i in segments if i < 0]
        self.needle: bytes | None = f'"{keys[-1]}"'.encode() if keys else None

    def resolve(self, obj: object) -> object:
        """Value at this path in ``obj``, or None when absent (JSON null counts as absent)."""
        for key, idx in self.segments:
            if type(obj) is dict:
                obj = obj.get(key)
            elif type(obj) is list and 0 <= idx < len(obj):
                obj = obj[idx]
            else:
                return None
        return obj

    def __repr__(self) -> str:
        return f"JsonPath({self.text!r})"


_RAW_DECODE = json.JSONDecoder().raw_decode


def loads_utf8(data: bytes) -> object:
    """``json.loads(data)`` for a UTF-8 body or event, about 4x faster on small events.

    ``json.loads`` on bytes first guesses the encoding in Python; SSE is UTF-8 by definition
    (and JSON bodies almost always are), so decode and run the C scanner directly. Anything
    unusual (surrounding whitespace, a BOM, another encoding, invalid JSON) falls back to
    ``json.loads``, which accepts or rejects it exactly as before.
    """
    try:
        text = data.decode()
        obj, end = _RAW_DECODE(text)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError included
        return json.loads(data)
    if end != len(text):
        return json.loads(data)
    return obj


def json_number(value: object) -> float | None:
    """A JSON value as a signal value: finite int/float, bools as 0/1; else None."""
    if isinstance(value, bool):  # before int: bool is an int subclass
        return 1.0 if value else 0.0
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:  # an integer beyond the float range
            return None
    return None


def parse_number(text: str) -> float | None:
    """A header value as a finite float, or None."""
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


_COMMA_ITEMS = re.compile(r'(?:[^,"]+|"(?:[^"\\]|\\.)*"?)+')
_SEMI_ITEMS = re.compile(r'(?:[^;"]+|"(?:[^"\\]|\\.)*"?)+')
_QUOTED_PAIR = re.compile(r"\\(.)")


def parse_server_timing(value: str) -> dict[str, float]:
    """Durations in seconds by metric name from a ``Server-Timing`` header value.

    Follows the W3C Server Timing grammar (``name;dur=12.5;desc="x", other;dur=3``): entries
    are comma-separated, parameters semicolon-separated, values are tokens or quoted strings
    (which may contain ``,`` and ``;``). ``dur`` is in milliseconds. Parameter names are
    case-insensitive and the first ``dur`` of an entry wins, as in browsers. Metric names are
    tokens compared case-sensitively (the spec never folds them); when a name repeats, its
    first entry with a valid ``dur`` wins. Unlike browsers (which report 0), an entry without a
    numeric ``dur`` gives no value: a metric like ``cache;desc=miss`` has no duration to average.
    Pass repeated ``Server-Timing`` fields joined by ``", "`` (RFC 9110 field combination).
    """
    out: dict[str, float] = {}
    quoted = '"' in value
    entries = _COMMA_ITEMS.findall(value) if quoted else value.split(",")
    for entry in entries:
        params = _SEMI_ITEMS.findall(entry) if quoted else entry.split(";")
        if not params:
            continue
        name = params[0].strip()
        if not name or name in out:
            continue
        for param in params[1:]:
            pname, eq, pvalue = param.partition("=")
            if not eq or pname.strip().lower() != "dur":
                continue
            pvalue = pvalue.strip()
            if pvalue[:1] == '"':
                pvalue = _QUOTED_PAIR.sub(r"\1", pvalue[1:-1] if pvalue[-1:] == '"' else "")
            dur = parse_number(pvalue)
            if dur is not None:
                out[name] = dur / 1000.0
            break  # only the first dur counts, valid or not
    return out


def is_event_stream(content_type: str) -> bool:
    """True for ``text/event-stream`` (any parameters, any case)."""
    return content_type.partition(";")[0].strip().lower() == "text/event-stream"


def tokens_per_s(
    tokens: float | None, latency: float, ttft: float | None, stream: bool
) -> float | None:
    """Generation throughput of one response, or None when it cannot be computed.

    For a stream the tokens are spread over ``latency - ttft`` (the first token's wait is
    ``ttft``'s business); a non-stream response shows no generation interval, so its whole
    ``latency`` is used. Both arms serve the same mix of requests, so the comparison is fair.
    """
    if tokens is None or tokens < 0:
        return None
    span = latency - ttft if stream and ttft is not None else latency
    return tokens / span if span > 0.0 else None


def inter_token_latency(tokens: float | None, latency: float, ttft: float | None) -> float | None:
    """Mean seconds between tokens of a stream after the first, or None."""
    if tokens is None or tokens < 2 or ttft is None or latency < ttft:
        return None
    return (latency - ttft) / (tokens - 1)


class _Decoder:
    """Bounded incremental decoder for a gzip or deflate (zlib) body."""

    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d = zlib.decompressobj(wbits=47)  # 32 + 15: accept a gzip or a zlib header

    def pieces(self, data: bytes, piece: int = 65536) -> Iterable[bytes]:
        """Decompressed output of ``data``, at most ``piece`` bytes at a time (zip bombs)."""
        d = self._d
        while True:
            out = d.decompress(data, piece)
            if out:
                yield out
            data = d.unconsumed_tail
            if not data and len(out) < piece:
                return

    def decode(self, data: bytes, limit: int) -> bytes | None:
        """All of ``data`` decompressed, or None beyond ``limit`` bytes."""
        out = self._d.decompress(data, limit + 1)
        return None if len(out) > limit else out


_CODINGS = {"": False, "identity": False, "gzip": True, "x-gzip": True, "deflate": True}


class ResponseExtractor:
    """Per-rollout compiled extraction of response signals; hands out one inspector per response.

    Parameters
    ----------
    signals
        The rollout's signal strings (or parsed :class:`Signal` values). Only response
        (``header:``, ``server_timing:``, ``json:``) and derived (``cost``, ``tokens_per_s``,
        ``itl``) signals matter here; the rest are accepted and ignored.
    prediction
        The rollout's ``prediction: json:PATH`` (or a bare PATH), or None.
    cost_tokens
        True when either arm prices tokens (``per_1k_tokens``): ``usage.total_tokens`` is then
        extracted for :class:`~canary.observe.cost.ArmCost` even if no signal names it.
    body_limit
        Bytes of a non-stream body buffered for JSON signals, and the largest SSE event kept.
    answers
        How LLM answers are scored (:class:`~canary.observe.answers.AnswerRules`) for the
        answer-quality signals (``finish_reason:VALUE``, ``output_tokens``, ``empty_answer``,
        ``repetition``, ``refusal``); the defaults when None.
    keep_answer_chars
        Keep the first this many characters of each LLM answer's text in
        :attr:`ResponseInspector.answer_text` (for a judge); 0 keeps nothing.

    With neither an answer-quality signal nor ``keep_answer_chars``, answers are not looked at.

    Attributes ``responses``, ``truncated``, ``invalid`` and ``undecodable`` count responses
    inspected, bodies or events over ``body_limit``, bodies/events that were not JSON, and
    bodies in an unsupported ``Content-Encoding`` (export them as metrics).
    """

    __slots__ = (
        "_answers",
        "_completion",
        "_cost",
        "_events",
        "_headers",
        "_itl",
        "_json_signals",
        "_measures_answers",
        "_paths",
        "_prediction",
        "_timings",
        "_total",
        "_tps",
        "body_limit",
        "invalid",
        "keep_answer_chars",
        "responses",
        "signals",
        "truncated",
        "undecodable",
    )

    def __init__(
        self,
        signals: Iterable[str | Signal],
        *,
        prediction: str | None = None,
        cost_tokens: bool = False,
        body_limit: int = DEFAULT_BODY_LIMIT,
        answers: AnswerRules | None = None,
        keep_answer_chars: int = 0,
    ) -> None:
        if body_limit < 1:
            raise ValueError(f"body_limit must be positive, got {body_limit!r}")
        parsed: dict[str, Signal] = {}
        for s in signals:
            sig = s if isinstance(s, Signal) else parse_signal(s)
            parsed.setdefault(sig.key, sig)
        self.signals = tuple(parsed.values())
        self.body_limit = body_limit
        self.responses = 0
        self.truncated = 0
        self.invalid = 0
        self.undecodable = 0

        paths: dict[str, int] = {}

        def path_index(text: str) -> int:
            if text not in paths:
                JsonPath(text)
                paths[text] = len(paths)
            return paths[text]

        self._headers = tuple((s.key, s.arg) for s in self.signals if s.kind == "header")
        self._timings = tuple((s.key, s.arg) for s in self.signals if s.kind == "server_timing")
        self._json_signals = tuple(
            (s.key, path_index(s.arg)) for s in self.signals if s.kind == "json"
        )
        if prediction is not None and prediction.startswith("json:"):
            prediction = prediction[5:]  # the rollout file's json:PATH (parse_prediction)
        self._prediction = path_index(prediction) if prediction is not None else -1
        kinds = {s.kind for s in self.signals}
        self._tps = TOKENS_PER_S in kinds
        self._itl = ITL in kinds
        self._cost = COST in kinds
        self._total = path_index(TOTAL_TOKENS_PATH) if cost_tokens else -1
        self._completion = path_index(COMPLETION_TOKENS_PATH) if self._tps or self._itl else -1
        self._paths = tuple(JsonPath(p) for p in paths)
        # Events are counted (the token count of a stream without usage) only when needed.
        self._events = self._tps or self._itl
        plan = AnswerPlan(
            answers if answers is not None else _default_rules(), self.signals, keep_answer_chars
        )
        self._answers = plan if plan.active else None
        # answer-quality signals are measured on every response; the text is kept (for a
        # judge) only on the responses :meth:`start` is asked to keep it for
        self._measures_answers = bool(plan.want or plan.finish_keys)
        self.keep_answer_chars = keep_answer_chars

    @property
    def inspects_body(self) -> bool:
        """True when responses' bodies are parsed (JSON paths configured)."""
        return bool(self._paths) or self._answers is not None

    def start(
        self, content_type: str = "", content_encoding: str = "", *, keep_answer: bool = True
    ) -> ResponseInspector:
        """Begin inspecting one response, given its ``Content-Type`` and ``Content-Encoding``.

        ``keep_answer=False``: this response's answer text is not wanted (no judge waits for
        it), so without answer-quality signals its answer is not parsed at all."""
        self.responses += 1
        stream = is_event_stream(content_type)
        answers = self._answers if keep_answer or self._measures_answers else None
        if not self._paths and not (stream and self._events) and answers is None:
            return ResponseInspector(self, stream)
        coding = _CODINGS.get(content_encoding.strip().lower())
        if coding is None:
            self.undecodable += 1  # br, zstd, stacked codings: count bytes only
            return ResponseInspector(self, stream)
        decoder = _Decoder() if coding else None
        inspector: ResponseInspector
        if stream:
            inspector = _EventStreamInspector(self, decoder)
        else:
            inspector = _BufferedInspector(self, decoder)
        if answers is not None:
            inspector._answer = AnswerState(answers)
        return inspector


@functools.cache
def _default_rules() -> AnswerRules:
    """The default :class:`AnswerRules`, compiled once per process."""
    return AnswerRules()


class ResponseInspector:
    """Observes one response's body as it streams; :meth:`finish` computes its signals.

    The base class only counts bytes; the extractor hands out a buffering or an SSE-parsing
    subclass when the rollout's signals need the body.
    """

    __slots__ = (
        "_answer",
        "_ex",
        "bytes_in",
        "completion_tokens",
        "events",
        "prediction",
        "signals",
        "stream",
        "total_tokens",
    )
    _counts_events = False  # True where ``events`` is a real count

    def __init__(self, extractor: ResponseExtractor, stream: bool) -> None:
        self._ex = extractor
        self.stream = stream  # the response is text/event-stream
        self.bytes_in = 0  # body bytes fed (as received, before any decompression)
        self.events = 0  # SSE events with data, other than [DONE] (counted only when needed)
        self.signals: dict[str, float] = {}
        self.prediction: object | None = None
        self.total_tokens: float | None = None  # usage.total_tokens, when extracted
        self.completion_tokens: float | None = None  # usage.completion_tokens, when extracted
        self._answer: AnswerState | None = None  # set by the extractor when answers matter

    @property
    def answer_text(self) -> str | None:
        """The first ``keep_answer_chars`` characters of the LLM answer's text (the chat
        ``content`` or completion ``text`` of its first choice), or None when the response
        carried no answer (or none is kept). An answer that calls a tool has no text to
        compare (None), as it is not an empty answer either. Complete once :meth:`finish`
        ran."""
        a = self._answer
        keep = self._ex.keep_answer_chars
        if a is None or not keep or not a.answered or (a.tool and not a.nonblank):
            return None
        return a.kept_text[:keep]

    def feed(self, chunk: bytes) -> None:
        """Observe the next body chunk (bytes the caller will not mutate)."""
        self.bytes_in += len(chunk)

    def _values(self) -> list[object] | None:
        """Last value of each of the extractor's JSON paths (None where absent)."""
        return None

    def finish(
        self,
        headers: Mapping[str, str],
        *,
        latency: float | None = None,
        ttft: float | None = None,
        cost: ArmCost | None = None,
        now: float = 0.0,
    ) -> None:
        """Compute :attr:`signals` (and :attr:`prediction`) once the body is complete.

        ``headers`` must look up names case-insensitively (aiohttp's ``CIMultiDictProxy``
        does) or have lower-case keys; with a ``getall`` method (a multidict), repeated
        ``Server-Timing`` fields are all read. Derived signals need ``latency`` (and
        ``ttft``); ``cost`` also needs the arm's :class:`~canary.observe.cost.ArmCost` and the
        monotonic ``now`` its rate estimator is ticked with.
        """
        ex = self._ex
        signals = self.signals
        for key, name in ex._headers:
            raw = headers.get(name)
            if raw is not None:
                v = parse_number(raw)
                if v is not None:
                    signals[key] = v
        if ex._timings:
            getall = getattr(headers, "getall", None)
            if getall is not None:
                raw = ", ".join(getall("server-timing", ()))
            else:
                raw = headers.get("server-timing") or ""
            if raw:
                timings = parse_server_timing(raw)
                for key, name in ex._timings:
                    v = timings.get(name)
                    if v is not None:
                        signals[key] = v
        values = self._values()
        if values is not None:
            for key, i in ex._json_signals:
                v = json_number(values[i])
                if v is not None:
                    signals[key] = v
            if ex._prediction >= 0:
                self.prediction = values[ex._prediction]
            if ex._total >= 0:
                self.total_tokens = json_number(values[ex._total])
            if ex._completion >= 0:
                self.completion_tokens = json_number(values[ex._completion])
        if self._answer is not None:
            self._answer.finish(signals, self.stream)
        if latency is None:
            return
        if ex._tps or ex._itl:
            tokens = self.completion_tokens
            if tokens is None and self._counts_events:
                tokens = float(self.events)
            if ex._tps:
                v = tokens_per_s(tokens, latency, ttft, self.stream)
                if v is not None:
                    # TOKENS_PER_S, ITL and COST written as literals: constants, not global
                    # lookups, once per response
                    signals["tokens_per_s"] = v
            if ex._itl and self.stream:
                v = inter_token_latency(tokens, latency, ttft)
                if v is not None:
                    signals["itl"] = v
        if ex._cost and cost is not None:
            v = cost.cost(now, self.total_tokens, headers)
            if v is not None:
                signals["cost"] = v


class _BufferedInspector(ResponseInspector):
    """Buffers a non-stream body up to the limit and parses it as JSON at finish."""

    __slots__ = ("_chunks", "_decoder", "_size")

    def __init__(self, extractor: ResponseExtractor, decoder: _Decoder | None) -> None:
        super().__init__(extractor, False)
        self._chunks: list[bytes] | None = []
        self._size = 0
        self._decoder = decoder

    def feed(self, chunk: bytes) -> None:
        n = len(chunk)
        self.bytes_in += n
        chunks = self._chunks
        if chunks is None:
            return
        self._size += n
        if self._size > self._ex.body_limit:
            self._chunks = None  # over the limit: JSON signals are absent for this response
            self._ex.truncated += 1
            return
        chunks.append(chunk)

    def _values(self) -> list[object] | None:
        chunks = self._chunks
        if chunks is None:
            return None
        ex = self._ex
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = None
        if self._decoder is not None:
            try:
                decoded = self._decoder.decode(body, ex.body_limit)
            except zlib.error:
                ex.invalid += 1
                return None
            if decoded is None:
                ex.truncated += 1
                return None
            body = decoded
        try:
            obj = loads_utf8(body)
        except (ValueError, RecursionError):  # not JSON (or absurdly nested)
            ex.invalid += 1
            return None
        if self._answer is not None:
            self._answer.event(obj)
        return [p.resolve(obj) for p in ex._paths]


class _EventStreamInspector(ResponseInspector):
    """Parses ``text/event-stream`` incrementally and keeps each JSON path's last value.

    Lines may end in ``\\n``, ``\\r\\n`` or ``\\r`` and be split anywhere across chunks; an
    event ends at a blank line (WHATWG HTML, "Server-sent events", parsing an event stream).
    Memory is bounded by ``body_limit``: a longer line or event is dropped. An event still
    open when the stream ends is dispatched too (the spec discards it; a server that omits
    the final blank line should not lose its usage figures).
    """

    __slots__ = (
        "_decoder",
        "_discard",
        "_drop_line",
        "_found",
        "_invalid",
        "_partial",
        "_partial_len",
        "_parts",
        "_size",
    )
    _counts_events = True

    def __init__(self, extractor: ResponseExtractor, decoder: _Decoder | None) -> None:
        super().__init__(extractor, True)
        self._partial: list[bytes] = []  # the current unterminated line, in pieces
        self._partial_len = 0
        self._drop_line = False  # the current line is over the limit: skip to its end
        self._parts: list[bytes] = []  # data lines of the current event
        self._size = 0
        self._discard = False  # the current event is over the limit: drop it when it ends
        self._found: list[object] = [None] * len(extractor._paths)
        self._decoder = decoder
        self._invalid = False

    def feed(self, chunk: bytes) -> None:
        self.bytes_in += len(chunk)
        if self._decoder is None:
            self._text(chunk)
            return
        try:
            for piece in self._decoder.pieces(chunk):
                self._text(piece)
        except zlib.error:
            self._invalid = True
            self._decoder = _BROKEN

    def _text(self, data: bytes) -> None:
        if self._drop_line:
            cut = _line_end(data)
            if cut < 0:
                return
            self._drop_line = False
            data = data[cut:]
        if b"\n" not in data and b"\r" not in data:
            self._partial.append(data)
            self._partial_len += len(data)
            if self._partial_len > self._ex.body_limit:
                self._overflow()
            return
        partial = self._partial
        if partial:
            partial.append(data)
            data = b"".join(partial)
            partial.clear()
            self._partial_len = 0
        lines = data.splitlines(True)
        tail = lines[-1]
        held = tail[-1] != 10  # not "\n": unterminated, or a "\r" whose "\n" may come next
        if held:
            lines.pop()
        for line in lines:
            self._line(line.rstrip(b"\r\n"))
        if held:
            partial.append(tail)
            self._partial_len = len(tail)
            if self._partial_len > self._ex.body_limit:
                self._overflow()

    def _line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
        elif line[:5] == b"data:":
            if self._discard:
                return
            value = line[6:] if line[5:6] == b" " else line[5:]
            self._size += len(value) + 1
            if self._size > self._ex.body_limit:
                self._drop_event()
            else:
                self._parts.append(value)
        # comments (":...") and the event/id/retry fields carry nothing we measure

    def _overflow(self) -> None:
        # Keep a comment line as a placeholder so the terminator that ends the dropped line
        # is not mistaken for a blank line.
        self._partial.clear()
        self._partial.append(b":")
        self._partial_len = 1
        self._drop_line = True
        self._drop_event()

    def _drop_event(self) -> None:
        if not self._discard:
            self._discard = True
            self._ex.truncated += 1
        self._parts.clear()
        self._size = 0

    def _dispatch(self) -> None:
        parts = self._parts
        if self._discard:
            self._discard = False
            return
        if not parts:
            return
        data = parts[0] if len(parts) == 1 else b"\n".join(parts)
        parts.clear()
        self._size = 0
        if data == b"[DONE]":
            return
        self.events += 1
        obj: object = _MISSING
        found = self._found
        for i, path in enumerate(self._ex._paths):
            needle = path.needle
            if needle is not None and needle not in data:
                continue
            if obj is _MISSING:
                try:
                    obj = loads_utf8(data)
                except (ValueError, RecursionError):
                    self._invalid = True
                    return
            v = path.resolve(obj)
            if v is not None:
                found[i] = v
        answer = self._answer
        if answer is not None and (b'"choices"' in data or b'"usage"' in data):
            if obj is _MISSING:
                try:
                    obj = loads_utf8(data)
                except (ValueError, RecursionError):
                    self._invalid = True
                    return
            answer.event(obj)

    def _values(self) -> list[object] | None:
        if self._partial and not self._drop_line:
            self._line(b"".join(self._partial).rstrip(b"\r\n"))
            self._partial.clear()
        self._dispatch()
        if self._invalid:
            self._ex.invalid += 1
        return self._found if self._ex._paths else None


class _BrokenDecoder(_Decoder):
    """Stands in after a decoding error: the rest of the stream is ignored."""

    def pieces(self, data: bytes, piece: int = 65536) -> Iterable[bytes]:
        return ()


_BROKEN = _BrokenDecoder()


def _line_end(data: bytes) -> int:
    """Index of the first ``\\r`` or ``\\n`` in ``data``, or -1."""
    n = data.find(b"\n")
    r = data.find(b"\r")
    if n < 0:
        return r
    return n if r < 0 or n < r else r
