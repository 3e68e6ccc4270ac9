"""Fake pairwise judge for tests and demos: an OpenAI-compatible judge model and an HTTP scorer.

One aiohttp app serves both kinds canary's ``judge`` speaks (canary/observe/judge.py):

- ``POST /v1/chat/completions``: reads ``[Answer A]`` and ``[Answer B]`` from the prompt
  canary sends and replies ``A``, ``B`` or ``tie`` as the chat message content;
- ``POST /judge``: reads ``{"request", "production", "candidate"}`` and answers
  ``{"winner": ...}`` (or ``{"score": P}`` with ``mode="score"``).

Which answer it prefers follows :attr:`FakeJudgeConfig.prefer` (the longer one, the shorter
one, the less repetitive one, or a coin), blurred by ``noise`` (that share of verdicts is a
fair coin) and, for the chat judge, ``position_bias`` (that share of replies is ``A`` whatever
the answers: the bias canary's A/B randomisation must cancel). Randomness is seeded. It counts
what it received (:class:`JudgeCounters`), so tests can check that canary sent what it says.

Run it as ``python -m loadtest.fake_judge --port 8100 --prefer longer`` or, in tests::

    async with running_fake_judge(FakeJudgeConfig(prefer="longer")) as (url, counters):
        ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

__all__ = [
    "FakeJudgeConfig",
    "JudgeCounters",
    "make_app",
    "preference",
    "repetition",
    "running_fake_judge",
]

Prefer = Literal["longer", "shorter", "distinct", "coin"]
_ANSWER = re.compile(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]\n(.*?)\n\nWhich answer", re.DOTALL)
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class FakeJudgeConfig:
    prefer: Prefer = "longer"
    """``longer``/``shorter``: more/fewer words wins; ``distinct``: the smaller share of
    repeated words wins; ``coin``: a fair coin (``bias`` tilts it, HTTP scorer only)."""
    noise: float = 0.0
    """Share of pairs given a fair-coin verdict instead of the preference."""
    bias: float = 0.5
    """With ``prefer="coin"``: the HTTP scorer's probability that the candidate wins."""
    position_bias: float = 0.0
    """Share of chat replies that are ``A`` whatever the answers (a judge that favours the
    first position)."""
    mode: Literal["winner", "score"] = "winner"
    """HTTP scorer: answer ``{"winner": ...}`` or ``{"score": P}`` (P = 0.9/0.1/0.5)."""
    reply: str | None = None
    """Reply with this exact text instead of a verdict (e.g. prose, to test strict parsing)."""
    status: int = 200
    """HTTP status of every answer (500: a broken judge)."""
    delay: float = 0.0
    """Seconds before answering (a slow judge: timeouts, concurrency bounds)."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("noise", "bias", "position_bias"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {v!r}")
        if self.prefer not in ("longer", "shorter", "distinct", "coin"):
            raise ValueError(
                f"prefer must be longer, shorter, distinct or coin, got {self.prefer!r}"
            )
        if self.delay < 0 or self.delay > 600:
            raise ValueError(f"delay must be within 0..600 s, got {self.delay!r}")


@dataclass
class JudgeCounters:
    """What the fake judge received and answered."""

    chat: int = 0  # requests to /v1/chat/completions
    http: int = 0  # requests to /judge
    bad: int = 0  # requests it could not read (400)
    replies: dict[str, int] = field(default_factory=dict)  # A, B, tie / candidate, ...
    inflight: int = 0
    max_inflight: int = 0
    models: set[str] = field(default_factory=set)  # chat: the `model` asked for
    authorization: set[str] = field(default_factory=set)  # Authorization headers seen
    last: dict[str, Any] | None = None  # the last request body it read

    def count(self, reply: str) -> None:
        self.replies[reply] = self.replies.get(reply, 0) + 1


_CONFIG = web.AppKey("config", FakeJudgeConfig)
_COUNTERS = web.AppKey("counters", JudgeCounters)
_RNG = web.AppKey("rng", random.Random)


def repetition(text: str) -> float:
    """Share of words that repeat an earlier word of the text (0 for none, toward 1)."""
    words = _WORD.findall(text.lower())
    return 1.0 - len(set(words)) / len(words) if words else 0.0


def preference(cfg: FakeJudgeConfig, first: str, second: str, rng: random.Random) -> int:
    """+1 when ``first`` is preferred, -1 for ``second``, 0 for a tie."""
    if cfg.noise and rng.random() < cfg.noise:
        return 1 if rng.random() < 0.5 else -1
    if cfg.prefer == "coin":
        return 1 if rng.random() < 0.5 else -1
    if cfg.prefer == "distinct":
        a, b = -repetition(first), -repetition(second)
    else:
        a, b = len(_WORD.findall(first)), len(_WORD.findall(second))
        if cfg.prefer == "shorter":
            a, b = -a, -b
    return (a > b) - (a < b)


async def _answer(request: web.Request) -> tuple[JudgeCounters, FakeJudgeConfig, Any]:
    counters, cfg = request.app[_COUNTERS], request.app[_CONFIG]
    auth = request.headers.get("Authorization")
    if auth is not None:
        counters.authorization.add(auth)
    try:
        body = await request.json()
    except ValueError:
        body = None
    counters.last = body if isinstance(body, dict) else None
    if cfg.delay:
        await asyncio.sleep(cfg.delay)
    return counters, cfg, body


@contextlib.asynccontextmanager
async def _busy(counters: JudgeCounters) -> AsyncIterator[None]:
    counters.inflight += 1
    counters.max_inflight = max(counters.max_inflight, counters.inflight)
    try:
        yield
    finally:
        counters.inflight -= 1


async def _chat(request: web.Request) -> web.Response:
    counters = request.app[_COUNTERS]
    counters.chat += 1
    async with _busy(counters):
        counters, cfg, body = await _answer(request)
    if cfg.status != 200:
        return web.json_response({"error": {"message": "judge failed"}}, status=cfg.status)
    messages = body.get("messages") if isinstance(body, dict) else None
    prompt = messages[-1].get("content") if isinstance(messages, list) and messages else None
    m = _ANSWER.search(prompt) if isinstance(prompt, str) else None
    if m is None:
        counters.bad += 1
        return web.json_response({"error": {"message": "no [Answer A]/[Answer B]"}}, status=400)
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        counters.models.add(body["model"])
    rng = request.app[_RNG]
    if cfg.reply is not None:
        reply = cfg.reply
    elif cfg.position_bias and rng.random() < cfg.position_bias:
        reply = "A"
    else:
        reply = {1: "A", -1: "B", 0: "tie"}[preference(cfg, m.group(1), m.group(2), rng)]
    counters.count(reply)
    return web.json_response(
        {
            "id": "chatcmpl-judge",
            "object": "chat.completion",
            "model": body.get("model", "fake-judge") if isinstance(body, dict) else "fake-judge",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply},
                    "finish_reason": "stop",
                }
            ],
        }
    )


async def _http(request: web.Request) -> web.Response:
    counters = request.app[_COUNTERS]
    counters.http += 1
    async with _busy(counters):
        counters, cfg, body = await _answer(request)
    if cfg.status != 200:
        return web.json_response({"error": "judge failed"}, status=cfg.status)
    if cfg.reply is not None:
        counters.count("reply")
        return web.Response(text=cfg.reply, content_type="application/json")
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("production"), str)
        or not isinstance(body.get("candidate"), str)
        or "request" not in body
    ):
        counters.bad += 1
        return web.json_response({"error": "expected request, production, candidate"}, status=400)
    rng = request.app[_RNG]
    if cfg.prefer == "coin" and not (cfg.noise and rng.random() < cfg.noise):
        pref = 1 if rng.random() < cfg.bias else -1
    else:
        pref = preference(cfg, body["candidate"], body["production"], rng)
    winner = {1: "candidate", -1: "production", 0: "tie"}[pref]
    counters.count(winner)
    if cfg.mode == "score":
        return web.json_response({"score": {1: 0.9, -1: 0.1, 0: 0.5}[pref]})
    return web.json_response({"winner": winner})


def make_app(cfg: FakeJudgeConfig | None = None) -> tuple[web.Application, JudgeCounters]:
    """The fake judge's app and its counters."""
    cfg = cfg if cfg is not None else FakeJudgeConfig()
    app = web.Application()
    counters = JudgeCounters()
    app[_CONFIG] = cfg
    app[_COUNTERS] = counters
    app[_RNG] = random.Random(cfg.seed)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/judge", _http)
    return app, counters


@contextlib.asynccontextmanager
async def running_fake_judge(
    cfg: FakeJudgeConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[tuple[str, JudgeCounters]]:
    """Serve a fake judge on ``host:port`` (0 = ephemeral); yield its base URL and counters.

    The chat judge is at ``URL/v1/chat/completions``, the HTTP scorer at ``URL/judge``."""
    app, counters = make_app(cfg)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        yield f"http://{host}:{runner.addresses[0][1]}", counters
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--prefer", choices=["longer", "shorter", "distinct", "coin"], default="longer")
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--bias", type=float, default=0.5)
    p.add_argument("--position-bias", type=float, default=0.0)
    p.add_argument("--mode", choices=["winner", "score"], default="winner")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = FakeJudgeConfig(
        prefer=a.prefer,
        noise=a.noise,
        bias=a.bias,
        position_bias=a.position_bias,
        mode=a.mode,
        seed=a.seed,
    )
    app, _ = make_app(cfg)
    web.run_app(app, host=a.host, port=a.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
