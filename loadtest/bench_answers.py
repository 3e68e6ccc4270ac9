"""Microbenchmark: the hot-path cost of the LLM answer-quality signals.

Feeds pre-built OpenAI chat answers (a stream of one-token events, and a JSON body) through
:class:`~canary.observe.extract.ResponseExtractor` as the proxy does (start, feed every chunk,
finish) under three configurations, and prints the median over repeats of the time per chunk
and per answer (and the minimum, which a busy machine disturbs least):

* ``none``: no body signal at all (the proxy only counts bytes);
* ``tokens``: ``tokens_per_s`` (what an LLM rollout already parses today);
* ``quality``: ``tokens_per_s`` plus every answer-quality signal.

Run: ``python -m loadtest.bench_answers [--repeats 7] [--answers 2000] [--tokens 200]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence

from canary.observe.extract import ResponseExtractor

CONFIGS: dict[str, list[str]] = {
    "none": ["latency"],
    "tokens": ["tokens_per_s"],
    "quality": ["tokens_per_s", "finish_reason:length", "output_tokens", "empty_answer",
                "repetition", "refusal"],
}  # fmt: skip
_WORDS = (
    "the", "model", "answers", "quickly", "and", "canary", "watches", "every", "token",
    "it", "streams", "back", "to", "you", "while", "users", "wait", "for", "text",
)  # fmt: skip


def answer_tokens(n: int) -> list[str]:
    """``n`` tokens of plausible, mostly non-repeating text (a word each)."""
    return [f" {_WORDS[(i * 7 + i // 19) % len(_WORDS)]}" for i in range(n)]


def stream_chunks(tokens: Sequence[str]) -> list[bytes]:
    """One SSE event per token, as vLLM sends them, then finish, usage and [DONE]."""
    out = []
    for t in tokens:
        ev = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
              "choices": [{"index": 0, "delta": {"content": t}, "logprobs": None,
                           "finish_reason": None}]}  # fmt: skip
        out.append(b"data: " + json.dumps(ev).encode() + b"\n\n")
    last = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    out.append(b"data: " + json.dumps(last).encode() + b"\n\n")
    usage = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": len(tokens)}}
    out.append(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
    return out


def json_body(tokens: Sequence[str]) -> bytes:
    body = {"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "".join(tokens)}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": len(tokens)}}  # fmt: skip
    return json.dumps(body).encode()


def run_once(signals: list[str], chunks: list[bytes], ctype: str, answers: int) -> float:
    """Seconds to inspect ``answers`` responses made of ``chunks``."""
    ex = ResponseExtractor(signals)
    t0 = time.perf_counter()
    for _ in range(answers):
        ins = ex.start(ctype)
        for c in chunks:
            ins.feed(c)
        ins.finish({}, latency=1.0, ttft=0.1)
    return time.perf_counter() - t0


def bench(repeats: int, answers: int, tokens: int) -> list[dict[str, object]]:
    toks = answer_tokens(tokens)
    cases = {
        "stream": (stream_chunks(toks), "text/event-stream"),
        "json": ([json_body(toks)], "application/json"),
    }
    rows: list[dict[str, object]] = []
    for kind, (chunks, ctype) in cases.items():
        for name, signals in CONFIGS.items():
            run_once(signals, chunks, ctype, max(1, answers // 10))  # warm-up
            times = [run_once(signals, chunks, ctype, answers) for _ in range(repeats)]
            per_answer = statistics.median(times) / answers
            rows.append({
                "body": kind, "config": name, "chunks": len(chunks), "repeats": repeats,
                "us_per_answer": per_answer * 1e6,
                "us_per_chunk": per_answer * 1e6 / len(chunks),
                "min_us_per_chunk": min(times) / answers * 1e6 / len(chunks),
                "spread": (max(times) - min(times)) / statistics.median(times),
            })  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_answers", description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--answers", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=200, help="tokens (events) per answer")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.answers < 1 or args.tokens < 1:
        parser.error("--repeats, --answers and --tokens must be positive")
    rows = bench(args.repeats, args.answers, args.tokens)
    print(
        f"{'body':7} {'config':8} {'chunks':>6} {'us/answer':>10} {'us/chunk':>9} "
        f"{'min':>6} {'spread':>7}"
    )
    for r in rows:
        print(f"{r['body']:7} {r['config']:8} {r['chunks']:>6} {r['us_per_answer']:>10.1f} "
              f"{r['us_per_chunk']:>9.2f} {r['min_us_per_chunk']:>6.2f} "
              f"{r['spread']:>7.0%}")  # fmt: skip
    print(f"median of {args.repeats} repeats x {args.answers} answers of {args.tokens} tokens")


if __name__ == "__main__":
    main()
