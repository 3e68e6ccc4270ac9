"""LLM answer quality without labels: finish_reason, output_tokens, empty_answer, repetition,
refusal, and the answer text kept for a judge (canary.observe.answers via the extractor)."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from canary.config import AnswersConfig, load_config_text
from canary.errors import ConfigError
from canary.observe.answers import (
    DEFAULT_REFUSAL_PATTERNS,
    MAX_WORD_CHARS,
    AnswerPlan,
    AnswerRules,
    AnswerState,
)
from canary.observe.extract import ResponseExtractor, ResponseInspector, loads_utf8
from canary.signals import is_continuous, is_rate, parse_signal

QUALITY = ["finish_reason:length", "finish_reason:stop", "output_tokens", "empty_answer",
           "repetition", "refusal"]  # fmt: skip
SSE = "text/event-stream"


def chat_events(
    pieces: list[str], finish: str | None = "stop", usage: int | None = None, crlf: bool = False
) -> bytes:
    """An OpenAI chat completion stream of ``pieces`` as its content deltas."""
    nl = "\r\n" if crlf else "\n"
    out = []
    for i, p in enumerate(pieces):
        delta = {"role": "assistant", "content": p} if i == 0 else {"content": p}
        ev = {"object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
        out.append(f"data: {json.dumps(ev, ensure_ascii=False)}{nl}{nl}")
    last = {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
    out.append(f"data: {json.dumps(last)}{nl}{nl}")
    if usage is not None:
        out.append(
            f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': usage}})}{nl}{nl}"
        )
    out.append(f"data: [DONE]{nl}{nl}")
    return "".join(out).encode()


def chat_body(content: Any, finish: str | None = "stop", usage: int | None = 7) -> bytes:
    body: dict[str, Any] = {"object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content},
         "finish_reason": finish}]}  # fmt: skip
    if usage is not None:
        body["usage"] = {"prompt_tokens": 3, "completion_tokens": usage, "total_tokens": usage + 3}
    return json.dumps(body).encode()


def inspect(
    chunks: list[bytes] | bytes,
    content_type: str = SSE,
    encoding: str = "",
    signals: list[str] | None = None,
    **kw: Any,
) -> ResponseInspector:
    ex = ResponseExtractor(QUALITY if signals is None else signals, **kw)
    ins = ex.start(content_type, encoding)
    for c in [chunks] if isinstance(chunks, bytes) else chunks:
        ins.feed(c)
    ins.finish({}, latency=1.0, ttft=0.1)
    return ins


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


# -- per signal -------------------------------------------------------------------------------


def test_streamed_chat_answer_gives_every_signal() -> None:
    text = ["The", " cat", " sat", " on", " the", " mat", ". The", " cat", " sat", " on", " the",
            " mat", "."]  # fmt: skip
    ins = inspect(chat_events(text, finish="length", usage=13))
    s = ins.signals
    assert s["finish_reason:length"] == 1.0 and s["finish_reason:stop"] == 0.0
    assert s["output_tokens"] == 13.0  # usage wins over the counted chunks
    assert s["empty_answer"] == 0.0 and s["refusal"] == 0.0
    # words: the cat sat on the mat the cat sat on the mat -> 9 4-grams, the last 3 repeat
    # ("the cat sat on", "cat sat on the", "sat on the mat"); "on the mat the" etc. are new
    assert s["repetition"] == pytest.approx(3 / 9)


def test_output_tokens_counts_text_events_without_usage() -> None:
    ins = inspect(chat_events(["a", " b", "", " c"], usage=None))
    assert ins.signals["output_tokens"] == 3.0  # the empty delta carried no text


def test_body_without_usage_has_no_output_tokens() -> None:
    ins = inspect(chat_body("hello there", usage=None), "application/json")
    assert "output_tokens" not in ins.signals
    assert ins.signals["empty_answer"] == 0.0


def test_json_body_chat_and_completions() -> None:
    ins = inspect(chat_body("I'm sorry, but I can't help with that."), "application/json")
    assert ins.signals["refusal"] == 1.0 and ins.signals["finish_reason:stop"] == 1.0
    assert ins.signals["output_tokens"] == 7.0
    choice = {
        "index": 0,
        "text": "one two three four one two three four",
        "finish_reason": "length",
    }
    completion = {"choices": [choice], "usage": {"completion_tokens": 8}}
    ins = inspect(json.dumps(completion).encode(), "application/json; charset=utf-8")
    assert ins.signals["finish_reason:length"] == 1.0
    assert ins.signals["repetition"] == pytest.approx(1 / 5)


def test_streamed_completions_text() -> None:
    events = "".join(
        f"data: {json.dumps({'choices': [{'index': 0, 'text': t, 'finish_reason': f}]})}\n\n"
        for t, f in (("Hello", None), (" world", None), ("", "stop"))
    )
    ins = inspect((events + "data: [DONE]\n\n").encode(), keep_answer_chars=100)
    assert ins.answer_text == "Hello world"
    assert ins.signals["output_tokens"] == 2.0 and ins.signals["finish_reason:stop"] == 1.0


@pytest.mark.parametrize("content", ["", "   \n\t ", None])
def test_empty_answer(content: Any) -> None:
    ins = inspect(chat_body(content), "application/json")
    assert ins.signals["empty_answer"] == 1.0
    assert "repetition" not in ins.signals  # no n-gram: no score
    assert ins.signals["refusal"] == 0.0
    ins = inspect(chat_events([] if content is None else [content]))
    assert ins.signals["empty_answer"] == 1.0


def test_tool_call_is_not_an_empty_answer() -> None:
    body = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "c1", "type": "function",
                        "function": {"name": "f", "arguments": "{}"}}]}}]}  # fmt: skip
    ins = inspect(json.dumps(body).encode(), "application/json",
                  signals=["empty_answer", "finish_reason:tool_calls"])  # fmt: skip
    assert ins.signals == {"empty_answer": 0.0, "finish_reason:tool_calls": 1.0}
    # and it has no text a judge could compare: no answer text, not an empty one
    kept = inspect(json.dumps(body).encode(), "application/json", keep_answer_chars=100)
    assert kept.answer_text is None
    assert inspect(chat_body("  "), "application/json", keep_answer_chars=100).answer_text == "  "


def test_stream_that_ends_without_finish_reason_is_zero_for_every_value() -> None:
    data = chat_events(["partial", " answer"], finish=None)
    ins = inspect(data)
    assert ins.signals["finish_reason:length"] == 0.0 and ins.signals["finish_reason:stop"] == 0.0


def test_only_the_first_answer_of_n_is_scored() -> None:
    events = []
    for a, b in (("As an AI", "Fine"), (" model", " answer")):
        # another answer's delta first in the event, as servers interleave n > 1
        ev = {"choices": [{"index": 1, "delta": {"content": b}, "finish_reason": None},
                          {"index": 0, "delta": {"content": a}}]}  # fmt: skip
        events.append(f"data: {json.dumps(ev)}\n\n")
    events.append('data: {"choices": [{"index": 1, "delta": {}, "finish_reason": "length"}]}\n\n')
    events.append('data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n')
    ins = inspect("".join(events).encode(), keep_answer_chars=50)
    assert ins.answer_text == "As an AI model"
    assert ins.signals["refusal"] == 1.0 and ins.signals["finish_reason:stop"] == 1.0


def test_refusal_defaults_and_window() -> None:
    for text in ("I'm sorry, but I can’t help with that.", "I cannot assist with this request.",
                 "As an AI language model, I do not have opinions.",
                 "I apologize, but that is not something I can do.",
                 "Sure. I am unable to provide medical advice."):  # fmt: skip
        assert inspect(chat_body(text), "application/json").signals["refusal"] == 1.0, text
    for text in ("Sure! Here is the answer: 42.", "I can help with that: step one ...",
                 "The AI said sorry."):  # fmt: skip
        assert inspect(chat_body(text), "application/json").signals["refusal"] == 0.0, text
    late = "x " * 200 + "As an AI I cannot help with that."  # beyond the first 300 characters
    assert inspect(chat_body(late), "application/json").signals["refusal"] == 0.0
    rules = AnswerRules(refusal_patterns=[r"\bnope\b"], refusal_within=10)
    assert inspect(chat_body("Nope."), "application/json", answers=rules).signals["refusal"] == 1
    assert inspect(chat_body("As an AI"), "application/json", answers=rules).signals["refusal"] == 0


def test_repetition_of_a_loop_approaches_one() -> None:
    loop = " ".join(["and so on"] * 100)
    score = inspect(chat_body(loop), "application/json").signals["repetition"]
    # 300 words, 297 4-grams, only the first 3 are new
    assert score == pytest.approx(294 / 297)
    rules = AnswerRules(repetition_ngram=2)
    two = inspect(chat_body("a b a b c"), "application/json", answers=rules).signals
    assert two["repetition"] == pytest.approx(1 / 4)  # ab ba ab bc: one repeat


def test_repetition_ignores_case_and_punctuation_and_needs_n_words() -> None:
    s = inspect(chat_body("One two, three four. ONE TWO three FOUR!"), "application/json").signals
    assert s["repetition"] == pytest.approx(1 / 5)
    assert "repetition" not in inspect(chat_body("only three words"), "application/json").signals


def test_non_llm_responses_give_no_answer_values() -> None:
    for body, ctype in ((b'{"prediction": 1, "score": 0.9}', "application/json"),
                        (b'{"choices": "not a list"}', "application/json"),
                        (b"not json", "application/json"),
                        (b"plain text answer", "text/plain"),
                        (b'data: {"x": 1}\n\ndata: [DONE]\n\n', SSE)):  # fmt: skip
        ins = inspect(body, ctype, keep_answer_chars=10)
        assert ins.signals == {}, body
        assert ins.answer_text is None


def test_nothing_runs_without_quality_signals() -> None:
    ex = ResponseExtractor(["latency", "error"])
    assert type(ex.start(SSE)) is ResponseInspector  # only counts bytes
    assert type(ex.start("application/json")) is ResponseInspector
    assert not ex.inspects_body
    ins = ex.start("application/json")
    ins.feed(chat_body("hi"))
    ins.finish({}, latency=1.0)
    assert ins.answer_text is None and ins.signals == {}


def test_answer_text_is_off_by_default_and_bounded() -> None:
    data = chat_events(["Hello", " wörld", "!"])
    assert inspect(data).answer_text is None  # refusal keeps a prefix, but does not expose it
    assert inspect(data, signals=[], keep_answer_chars=8).answer_text == "Hello wö"
    assert inspect(data, signals=[], keep_answer_chars=100).answer_text == "Hello wörld!"
    body = chat_body("judge me")
    assert inspect(body, "application/json", signals=[], keep_answer_chars=5).answer_text == "judge"
    assert (
        inspect(chat_body(""), "application/json", signals=[], keep_answer_chars=5).answer_text
        == ""
    )
    with pytest.raises(ValueError, match="keep_answer_chars"):
        ResponseExtractor([], keep_answer_chars=-1)


def test_gzip_body_and_stream() -> None:
    text = "repeat after me " * 10
    body = gzip.compress(chat_body(text))
    plain = inspect(chat_body(text), "application/json").signals
    assert inspect(body, "application/json", "gzip").signals == plain
    stream = chat_events(text.split(" "))
    z = zlib.compressobj(wbits=31)
    packed = z.compress(stream) + z.flush()
    chunks = [packed[i : i + 7] for i in range(0, len(packed), 7)]
    assert inspect(chunks, SSE, "gzip").signals == inspect(stream).signals
    assert inspect(body, "application/json", "br").signals == {}  # undecodable: absent


# -- chunk boundaries, unicode, property tests -------------------------------------------------

UNICODE = ["Ça", " va", " très", " bien", ",", " 日本語", "の", "テキスト", " ça", " va", " très",
           " bien", " 🙂", " emoji", "🙂🙂", " fin"]  # fmt: skip


def test_split_anywhere_in_bytes_gives_the_same_answer() -> None:
    for crlf in (False, True):
        data = chat_events(UNICODE, usage=None, crlf=crlf)
        whole = inspect(data, keep_answer_chars=1000)
        assert whole.answer_text == "".join(UNICODE)
        for size in (1, 2, 3, 5, 13):
            chunks = [data[i : i + size] for i in range(0, len(data), size)]
            ins = inspect(chunks, keep_answer_chars=1000)
            assert ins.signals == whole.signals and ins.answer_text == whole.answer_text


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, 4000), max_size=30), crlf=st.booleans())
def test_property_chunking_never_changes_the_signals(cuts: list[int], crlf: bool) -> None:
    data = chat_events(UNICODE * 3, finish="length", crlf=crlf)
    whole = inspect(data, keep_answer_chars=64)
    ins = inspect(split_at(data, cuts), keep_answer_chars=64)
    assert ins.signals == whole.signals and ins.answer_text == whole.answer_text


words = st.text(alphabet="ab cé\n日-", min_size=0, max_size=12)


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(words, max_size=40), n=st.integers(1, 5), max_chars=st.integers(16, 200))
def test_property_score_is_a_share_and_split_invariant(
    pieces: list[str], n: int, max_chars: int
) -> None:
    text = "".join(pieces)
    rules = AnswerRules(repetition_ngram=n, max_chars=max_chars)
    plan = AnswerPlan(rules, [parse_signal("repetition")])

    def score(parts: list[str]) -> dict[str, float]:
        a = AnswerState(plan)
        a.answered = True
        for p in parts:
            if p:
                a.text(p)
        out: dict[str, float] = {}
        a.finish(out, stream=True)
        return out

    got = score(pieces)
    assert got == score([text])  # the word split never depends on the chunking
    if got:
        assert 0.0 <= got["repetition"] <= 1.0
    # reference: words of the scored prefix, n-grams counted naively
    ws = [w.strip("\"'“”‘’`.,;:!?()[]{}<>*_#-–—…").lower() for w in text[:max_chars].split()]
    ws = [w for w in ws if w]
    grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    if grams and all(len(w) <= MAX_WORD_CHARS for w in ws):
        repeats = sum(1 for i, g in enumerate(grams) if g in grams[:i])
        assert got["repetition"] == pytest.approx(repeats / len(grams))


def test_long_runs_without_spaces_are_cut_into_bounded_words() -> None:
    blob = "x" * (MAX_WORD_CHARS * 5 + 3)
    plan = AnswerPlan(AnswerRules(repetition_ngram=1), [parse_signal("repetition")])
    a = AnswerState(plan)
    a.answered = True
    for ch in blob:  # one character per delta: the held-back tail never exceeds a word
        a.text(ch)
        assert len(a._tail) <= MAX_WORD_CHARS
    out: dict[str, float] = {}
    a.finish(out, stream=True)
    assert out["repetition"] == pytest.approx(4 / 6)  # 5 equal pieces of 64 and one of 3
    for text in (blob, f"a b {blob} c", f"{blob} {blob}"):  # whole, as a body is scored
        whole, split = AnswerState(plan), AnswerState(plan)
        whole.answered = split.answered = True
        whole.text(text)
        for i in range(0, len(text), 7):
            split.text(text[i : i + 7])
        got: list[dict[str, float]] = [{}, {}]
        whole.finish(got[0], stream=False)
        split.finish(got[1], stream=False)
        assert got[0] == got[1] and whole.ngrams == split.ngrams, text


def test_huge_answer_keeps_bounded_state() -> None:
    # 2 MB streamed in 20k events: the score covers the first max_chars only.
    n_events = 20_000
    pieces = [f" w{i}x{i * 7919 % 100_003}" for i in range(n_events)]
    data = chat_events(pieces, usage=None)
    ex = ResponseExtractor(QUALITY, keep_answer_chars=256)
    ins = ex.start(SSE)
    tracemalloc.start()
    try:
        for i in range(0, len(data), 16384):
            ins.feed(data[i : i + 16384])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    ins.finish({}, latency=1.0)
    state = ins._answer
    assert state is not None and state._seen is not None
    assert len(state._seen) <= 8192 // 2 and state._kept_len <= 300
    assert ins.signals["output_tokens"] == n_events
    assert ins.signals["repetition"] == 0.0
    assert len(ins.answer_text or "") == 256
    assert peak < 2_000_000, peak  # bytes: the set, the kept prefix, one event at a time


def test_body_over_the_limit_gives_no_values() -> None:
    big = chat_body("word " * 5000)
    assert inspect(big, "application/json", body_limit=1000).signals == {}


# -- signal grammar and config -------------------------------------------------------------------


def test_signal_grammar() -> None:
    for name in ("finish_reason:length", "empty_answer", "refusal"):
        assert is_rate(name) and not is_continuous(name)
    for name in ("repetition", "output_tokens"):
        assert not is_rate(name) and is_continuous(name)
    assert parse_signal("finish_reason:content_filter").arg == "content_filter"
    with pytest.raises(ValueError, match="finish_reason"):
        parse_signal("finish_reason:a b")
    with pytest.raises(ValueError, match="takes no argument"):
        parse_signal("refusal:x")


def _rollout(metrics: list[dict[str, Any]], answers: dict[str, Any] | None = None) -> str:
    rollout: dict[str, Any] = {
        "name": "llm",
        "production": {"endpoints": ["http://127.0.0.1:9001"]},
        "candidate": {"endpoints": ["http://127.0.0.1:9002"]},
        "steps": [{"weight": 10}],
        "analysis": {"metrics": metrics},
    }
    if answers is not None:
        rollout["answers"] = answers
    return yaml.safe_dump({"rollouts": [rollout]}, sort_keys=False)


def test_config_accepts_quality_metrics() -> None:
    cfg = load_config_text(_rollout(
        [{"name": "trunc", "signal": "finish_reason:length", "stat": "rate",
          "max_increase": "2pp"},
         {"name": "empty", "signal": "empty_answer", "stat": "rate", "max_increase": "1pp"},
         {"name": "refusals", "signal": "refusal", "stat": "rate", "max_increase": "1pp"},
         {"name": "rep", "signal": "repetition", "stat": "mean", "max_increase": "5pp"},
         {"name": "tokens", "signal": "output_tokens", "stat": "p50", "max_decrease": "20%"}],
        {"refusal_patterns": [r"(?i)\bno way\b"], "repetition_ngram": 3, "max_chars": 4096},
    ))  # fmt: skip
    r = cfg.rollouts[0]
    assert r.answers.repetition_ngram == 3 and r.answers.refusal_patterns == [r"(?i)\bno way\b"]
    assert "finish_reason:length" in r.signals()
    assert AnswersConfig().refusal_patterns == list(DEFAULT_REFUSAL_PATTERNS)


@pytest.mark.parametrize(
    ("metrics", "answers", "message"),
    [
        ([{"name": "r", "signal": "repetition", "stat": "rate", "max_increase": "1pp"}], None,
         "stat 'rate' applies to"),
        ([{"name": "r", "signal": "finish_reason:len gth", "stat": "rate",
           "max_increase": "1pp"}], None, "not a finish_reason"),
        ([], {"refusal_patterns": ["ok", "(unclosed"]},
         r"rollouts\[0\]\.answers\.refusal_patterns: refusal_patterns\[1\] '\(unclosed' is not a "
         "regular expression"),
        ([], {"refusal_patterns": ["a|"]}, "matches the empty string"),
        ([], {"repetition_ngram": 0}, r"answers\.repetition_ngram"),
        ([], {"max_chars": 10**9}, r"answers\.max_chars"),
        ([], {"refusal_pattern": ["x"]}, r"answers\.refusal_pattern"),
        ([{"name": "r", "signal": "refusal", "stat": "rate", "max_increase": "1pp"}],
         {"refusal_patterns": []}, r"rollouts\[0\]: .*answers.refusal_patterns is empty"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(
    metrics: list[dict[str, Any]], answers: dict[str, Any] | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config_text(_rollout(metrics, answers))


# -- the faster JSON parse the extractor now uses ------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(value=json_values, pad=st.sampled_from(["", " ", "\n", " \r\n\t"]), ascii=st.booleans())
def test_loads_utf8_agrees_with_json_loads(value: Any, pad: str, ascii: bool) -> None:
    data = (pad + json.dumps(value, ensure_ascii=ascii) + pad).encode()
    assert loads_utf8(data) == json.loads(data)


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b'{"a": 1} x', b'{"a": 1}{"b": 2}', b"\xff\xfe", b"nan1", b'"\xc3"', b"[1,]"],
)
def test_loads_utf8_rejects_what_json_loads_rejects(data: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(data)
    with pytest.raises(ValueError):
        loads_utf8(data)
    assert loads_utf8('{"a": "é"}'.encode("utf-8-sig")) == {"a": "é"}  # a BOM, as before
