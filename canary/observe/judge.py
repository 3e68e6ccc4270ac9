"""Pairwise judging: both arms' answers to one request, posted to a judge, as a win rate.

In a shadow step every sampled request is answered by both arms (the user gets production's
answer, the candidate's is a mirror). :class:`Judge` pairs the two answers of a sampled
request, posts them with the request to the configured judge *off the request path*, and
records the verdict as the candidate's value of the ``judge`` signal: 1 when the candidate's
answer wins, 0 when production's does, 0.5 for a tie (or the judge's own probability). The
analysis tests the mean of these values, the candidate's win rate, against 50%
(:func:`canary.stats.win_rate_test`).

What the proxy does per request is O(1) and never waits: :meth:`Judge.open` (sampling, one
dict insert) when a mirror starts, :meth:`Judge.answer` (one dict pop) when an answer is
recorded. Judge calls run as tasks, at most ``max_concurrency`` at once and at most
``max_per_minute`` in any 60 seconds; a completed pair that finds the judge busy or the
minute's budget spent is dropped and counted, never queued. Sampled pairs waiting for their
second answer are bounded by ``max_pending`` (the oldest is dropped and counted).

Two kinds of judge (``judge.kind``):

- ``openai``: an OpenAI-compatible chat model asked which of answers A and B is better. Which
  arm's answer is A is decided by a fair coin per pair, so a judge that prefers the first
  (or second) position favours neither arm. Its reply must be exactly ``A``, ``B`` or ``tie``
  (case and surrounding whitespace aside, one trailing period allowed); anything else is
  counted ``unparsable`` and is no verdict.
- ``http``: any scorer; canary posts ``{"request", "production", "candidate"}`` and expects
  ``{"winner": "candidate" | "production" | "tie"}`` or ``{"score": P}`` with P in [0, 1] the
  candidate's probability of winning.

Transport failures and non-2xx answers count as ``error``, timeouts as ``timeout``: neither
is ever a verdict. Counts per result are in ``canary_judge_pairs_total`` and in the rollout's
status (``judge`` in ``GET /api/v1/rollouts/NAME``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from canary import __version__
from canary.config import JudgeConfig

__all__ = [
    "CANDIDATE_WINS",
    "DROPPED_BUSY",
    "DROPPED_PENDING",
    "DROPPED_RATE",
    "ERROR",
    "FORFEIT_CANDIDATE",
    "FORFEIT_PRODUCTION",
    "NO_ANSWER",
    "PRODUCTION_WINS",
    "RESULTS",
    "SCORED",
    "TIE",
    "TIMEOUT",
    "UNPARSABLE",
    "VERDICTS",
    "HttpJudgeClient",
    "Judge",
    "JudgeClient",
    "JudgeOutcome",
    "OpenAIJudgeClient",
    "http_verdict",
    "judge_prompt",
    "make_client",
    "parse_verdict",
    "render_request",
    "retire",
]

log = logging.getLogger("canary.judge")

# Results counted per pair (``canary_judge_pairs_total{result}``). A verdict is one of the
# first four; the rest are pairs that got none.
CANDIDATE_WINS = "candidate"
PRODUCTION_WINS = "production"
TIE = "tie"
SCORED = "scored"  # an http judge's probability
UNPARSABLE = "unparsable"
ERROR = "error"
TIMEOUT = "timeout"
DROPPED_BUSY = "dropped_busy"  # max_concurrency calls already in flight
DROPPED_RATE = "dropped_rate"  # max_per_minute calls made in the last 60 s
DROPPED_PENDING = "dropped_pending"  # max_pending pairs already waiting for answers
NO_ANSWER = "no_answer"  # neither arm gave an answer, one carried no text, or it never came
# One arm failed (an error) or answered with empty text while the other answered: the arm that
# gave nothing loses without a judge call (a candidate that fails on the hard prompts must not
# have those losses left out of its win rate).
FORFEIT_CANDIDATE = "forfeit_candidate"
FORFEIT_PRODUCTION = "forfeit_production"
RESULTS = (
    CANDIDATE_WINS, PRODUCTION_WINS, TIE, SCORED, UNPARSABLE, ERROR, TIMEOUT,
    FORFEIT_CANDIDATE, FORFEIT_PRODUCTION, DROPPED_BUSY, DROPPED_RATE, DROPPED_PENDING,
    NO_ANSWER,
)  # fmt: skip
VERDICTS = (CANDIDATE_WINS, PRODUCTION_WINS, TIE, SCORED, FORFEIT_CANDIDATE, FORFEIT_PRODUCTION)
_VALUE = {CANDIDATE_WINS: 1.0, PRODUCTION_WINS: 0.0, TIE: 0.5}

RATE_WINDOW = 60.0  # seconds over which max_per_minute is enforced
# Request bodies held by pending pairs, per rollout: max_pending pairs of bodies up to
# proxy.replay_buffer could otherwise hold gigabytes while a slow arm keeps them waiting.
PENDING_BYTES = 32 * 1024 * 1024
_READ_LIMIT = 64 * 1024  # bytes of a judge's answer read at most
_ERROR_SHOWN = 200  # characters of the last failure kept for status


@dataclass(frozen=True, slots=True)
class JudgeOutcome:
    """What one judge call gave: a result of :data:`RESULTS`, the candidate's value when it
    is a verdict (else None) and, for failures, why."""

    result: str
    value: float | None = None
    detail: str = ""


class JudgeClient(Protocol):
    """Asks a judge about one pair; never raises for what the judge does (that is an
    outcome), only when cancelled."""

    async def judge(self, request: bytes, production: str, candidate: str) -> JudgeOutcome: ...

    async def aclose(self) -> None: ...


# -- verdicts ---------------------------------------------------------------------------------

_VERDICT = re.compile(r"\s*(a|b|tie)\s*\.?\s*", re.IGNORECASE)


def parse_verdict(text: object) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from a judge model's reply; None for anything else.

    Strict on purpose: "A is better", "Answer: B" or "both" are not verdicts (a judge that
    writes prose is misconfigured, and guessing would bias the win rate)."""
    if not isinstance(text, str):
        return None
    m = _VERDICT.fullmatch(text)
    if m is None:
        return None
    word = m.group(1).lower()
    return "tie" if word == "tie" else word.upper()


def http_verdict(body: object) -> float | None:
    """The candidate's value from an http judge's JSON answer; None when it is not one.

    ``{"winner": "candidate"}`` 1, ``"production"`` 0, ``"tie"`` 0.5; ``{"score": P}`` P for
    a finite number in [0, 1] (not a boolean). One of the two keys, not both."""
    if not isinstance(body, dict) or ("winner" in body) == ("score" in body):
        return None
    if "winner" in body:
        return _VALUE.get(body["winner"]) if isinstance(body["winner"], str) else None
    score = body["score"]
    if isinstance(score, bool) or not isinstance(score, int | float):
        return None
    return float(score) if math.isfinite(score) and 0.0 <= score <= 1.0 else None


# -- the prompt -------------------------------------------------------------------------------

JUDGE_SYSTEM = (
    "You are an impartial judge. You compare two answers, A and B, to the same request and "
    "decide which one serves the request better: correct, complete, specific and not "
    "repetitive, truncated or evasive. The order of the answers is random; do not prefer a "
    "position or a length for itself. Reply with exactly one word: A, B or tie."
)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " [...]"


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return "\n".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return "" if content is None else json.dumps(content)


def render_request(body: bytes, limit: int) -> str:
    """The request as the judge model reads it: an OpenAI chat request's messages as
    ``role: content`` lines, a completion request's ``prompt``, else the body as text; its
    last ``limit`` characters (the latest turns matter most)."""
    text: str
    try:
        obj = json.loads(body) if body else None
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        lines = []
        for msg in obj["messages"]:
            if isinstance(msg, dict):
                role = msg.get("role") if isinstance(msg.get("role"), str) else "user"
                lines.append(f"{role}: {_content_text(msg.get('content'))}")
        text = "\n".join(lines)
    elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
        text = obj["prompt"]
    else:
        text = body.decode("utf-8", "replace")
    return text if len(text) <= limit else "[...] " + text[-limit:]


def judge_prompt(request: bytes, first: str, second: str, limit: int) -> list[dict[str, str]]:
    """The chat messages asking a judge model to compare answer A (``first``) and B."""
    user = (
        f"[Request]\n{render_request(request, limit)}\n\n"
        f"[Answer A]\n{_clip(first, limit)}\n\n"
        f"[Answer B]\n{_clip(second, limit)}\n\n"
        "Which answer is better? Reply with exactly A, B or tie."
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


# -- clients ----------------------------------------------------------------------------------


class _HttpClient:
    """What both judge kinds share: one pooled httpx client, the token, the error mapping."""

    def __init__(self, config: JudgeConfig, environ: dict[str, str] | None = None) -> None:
        self.config = config
        env = os.environ if environ is None else environ
        headers = {"User-Agent": f"canary/{__version__} judge"}
        self.problem = ""  # a configuration problem shown in status (the calls still go out)
        if config.token_env:
            token = env.get(config.token_env)
            if token:
                headers["Authorization"] = f"Bearer {token}"
            else:
                self.problem = f"environment variable {config.token_env} is not set"
                log.warning("judge token: %s; calling %s without one", self.problem, config.url)
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=config.timeout,
            limits=httpx.Limits(max_connections=config.max_concurrency),
            follow_redirects=False,
            trust_env=False,  # never route judge calls through a proxy from the environment
        )

    async def _post(self, payload: dict[str, Any]) -> tuple[JudgeOutcome | None, object]:
        """Post ``payload``; (failure outcome, None) or (None, the parsed JSON answer)."""
        try:
            async with asyncio.timeout(self.config.timeout):
                async with self._client.stream("POST", self.config.url, json=payload) as resp:
                    data = b""
                    async for chunk in resp.aiter_bytes():
                        data += chunk
                        if len(data) > _READ_LIMIT:
                            return JudgeOutcome(ERROR, None, "answer too large"), None
        except TimeoutError:
            return JudgeOutcome(TIMEOUT, None, f"no answer within {self.config.timeout:g}s"), None
        except httpx.TimeoutException:
            return JudgeOutcome(TIMEOUT, None, f"no answer within {self.config.timeout:g}s"), None
        except httpx.HTTPError as exc:
            return JudgeOutcome(ERROR, None, f"{type(exc).__name__}: {exc}"), None
        if not 200 <= resp.status_code < 300:
            shown = data[:_ERROR_SHOWN].decode("utf-8", "replace")
            return JudgeOutcome(ERROR, None, f"HTTP {resp.status_code}: {shown}"), None
        try:
            return None, json.loads(data)
        except ValueError:
            shown = data[:_ERROR_SHOWN].decode("utf-8", "replace")
            return JudgeOutcome(UNPARSABLE, None, f"not JSON: {shown!r}"), None

    async def aclose(self) -> None:
        await self._client.aclose()


class OpenAIJudgeClient(_HttpClient):
    """A judge model behind an OpenAI-compatible ``/v1/chat/completions`` (``kind: openai``)."""

    def __init__(
        self,
        config: JudgeConfig,
        rng: random.Random | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        super().__init__(config, environ)
        self._rng = rng if rng is not None else random.Random()

    def payload(
        self, request: bytes, production: str, candidate: str
    ) -> tuple[dict[str, Any], bool]:
        """The chat request for one pair, and whether the candidate's answer is A (a fair
        coin per pair: position bias then favours neither arm)."""
        candidate_first = self._rng.random() < 0.5
        first, second = (candidate, production) if candidate_first else (production, candidate)
        limit = self.config.max_answer_chars
        return {
            "model": self.config.model,
            "messages": judge_prompt(request, first, second, limit),
            "temperature": 0,
            "max_tokens": 4,
            "stream": False,
        }, candidate_first

    async def judge(self, request: bytes, production: str, candidate: str) -> JudgeOutcome:
        payload, candidate_first = self.payload(request, production, candidate)
        failed, body = await self._post(payload)
        if failed is not None:
            return failed
        text: object = None
        if isinstance(body, dict):
            choices = body.get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                message = choices[0].get("message")
                if isinstance(message, dict):
                    text = message.get("content")
        verdict = parse_verdict(text)
        if verdict is None:
            shown = text[:_ERROR_SHOWN] if isinstance(text, str) else repr(body)[:_ERROR_SHOWN]
            return JudgeOutcome(UNPARSABLE, None, f"reply is not A, B or tie: {shown!r}")
        if verdict == "tie":
            return JudgeOutcome(TIE, 0.5)
        candidate_won = (verdict == "A") == candidate_first
        return (
            JudgeOutcome(CANDIDATE_WINS, 1.0)
            if candidate_won
            else JudgeOutcome(PRODUCTION_WINS, 0.0)
        )


class HttpJudgeClient(_HttpClient):
    """Any HTTP scorer (``kind: http``): ``{"request", "production", "candidate"}`` in,
    ``{"winner": ...}`` or ``{"score": P}`` out."""

    def payload(self, request: bytes, production: str, candidate: str) -> dict[str, Any]:
        try:
            req: object = json.loads(request) if request else None
        except ValueError:
            req = render_request(request, self.config.max_answer_chars)
        limit = self.config.max_answer_chars
        return {
            "request": req,
            "production": _clip(production, limit),
            "candidate": _clip(candidate, limit),
        }

    async def judge(self, request: bytes, production: str, candidate: str) -> JudgeOutcome:
        failed, body = await self._post(self.payload(request, production, candidate))
        if failed is not None:
            return failed
        value = http_verdict(body)
        if value is None:
            shown = repr(body)[:_ERROR_SHOWN]
            return JudgeOutcome(
                UNPARSABLE, None, f'expected {{"winner": ...}} or {{"score": 0..1}}, got {shown}'
            )
        if isinstance(body, dict) and "winner" in body:
            return JudgeOutcome(str(body["winner"]), value)
        return JudgeOutcome(SCORED, value)


def make_client(config: JudgeConfig, rng: random.Random | None = None) -> JudgeClient:
    """The client for ``config.kind``."""
    if config.kind == "openai":
        return OpenAIJudgeClient(config, rng)
    return HttpJudgeClient(config)


# -- pairing and bounds -----------------------------------------------------------------------


class _Pair:
    __slots__ = ("at", "body", "cluster", "keys", "nothing", "size", "texts")

    def __init__(self, body: bytes, cluster: int, keys: tuple[object, object], at: float) -> None:
        self.body = body
        self.size = len(body)  # bytes it holds while pending (0 once released)
        self.cluster = cluster
        self.keys = keys  # (production's exchange, the mirror's exchange)
        self.texts: list[str | None] = [None, None]  # production, candidate
        self.nothing = [False, False]  # the arm failed or answered with empty text
        self.at = at


Record = Callable[[float, int], None]  # (the candidate's value, cluster)


class Judge:
    """One rollout's pairwise judging: sampling, pairing, bounded calls, counts.

    Parameters
    ----------
    config
        The rollout's ``judge`` section.
    client
        Asks the judge (:func:`make_client`; a fake in unit tests).
    record
        Records one verdict: the candidate's value and the request's cluster.
    counts
        Where results are counted (the proxy's per-rollout counters, exported as
        ``canary_judge_pairs_total``).
    max_age
        Seconds a sampled pair may wait for its second answer before it is dropped (counted
        ``no_answer``): longer than any upstream attempt can take.
    """

    def __init__(
        self,
        config: JudgeConfig,
        client: JudgeClient,
        record: Record,
        counts: dict[str, int],
        *,
        max_age: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self._record = record
        self.counts = counts
        self.max_age = max_age
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        # exchange -> (pair, 0 production | 1 candidate); two entries per pair
        self.pending: dict[object, tuple[_Pair, int]] = {}
        self.pending_bytes = 0  # request bodies the pending pairs hold (<= PENDING_BYTES)
        self._calls: collections.deque[float] = collections.deque()  # start times, last 60 s
        self._tasks: set[asyncio.Task[None]] = set()
        self.last_error = getattr(client, "problem", "")
        self.sampled = 0  # pairs opened (shadow and live)
        self.live = 0  # of which live requests also sent to the other arm (live_share)

    # -- the request path: O(1), no awaiting ----------------------------------------------------

    def open(
        self,
        production_key: object,
        candidate_key: object,
        body: bytes,
        cluster: int,
        *,
        sampled: bool = False,
    ) -> bool:
        """Sample a mirrored request for judging (with probability ``share``, unless already
        ``sampled``) and wait for its two answers; True when it is to be judged."""
        if not sampled:
            share = self.config.share
            if share <= 0.0 or (share < 1.0 and self._rng.random() >= share):
                return False
        now = self._clock()
        self._evict(now, len(body))
        pair = _Pair(body, cluster, (production_key, candidate_key), now)
        self.pending[production_key] = (pair, 0)
        self.pending[candidate_key] = (pair, 1)
        self.pending_bytes += pair.size
        self.sampled += 1
        return True

    def wants_live(self) -> bool:
        """Sample a live request of a weighted step (with probability ``live_share``) to be
        sent to the other arm as well, for the judge: only while the judge has room for one
        more call now (a second upstream call whose pair would be dropped is not made)."""
        share = self.config.live_share
        if share <= 0.0 or (share < 1.0 and self._rng.random() >= share):
            return False
        if len(self._tasks) >= self.config.max_concurrency:
            return False
        calls, now = self._calls, self._clock()
        while calls and now - calls[0] >= RATE_WINDOW:
            calls.popleft()
        if len(calls) >= self.config.max_per_minute:
            return False
        self.live += 1
        return True

    def answer(self, key: object, text: str | None, *, failed: bool = False) -> None:
        """An answer of a sampled request was recorded: ``text`` is its answer text (None when
        it carried none), ``failed`` when the arm failed (an error or an error status). The
        second answer of a pair submits it to the judge.

        An arm that failed or answered with empty text while the other answered loses the
        pair without a judge call (:data:`FORFEIT_CANDIDATE`, :data:`FORFEIT_PRODUCTION`):
        leaving those pairs out would bias the win rate towards an arm that fails on the hard
        requests. A pair where neither answered, or whose answer is no LLM answer at all
        (no text and no failure), is counted :data:`NO_ANSWER` and gives no verdict.
        """
        entry = self.pending.pop(key, None)
        if entry is None:
            return
        pair, side = entry
        other = pair.keys[1 - side]
        nothing = failed or (text is not None and not text.strip())
        if text is None and not nothing:  # nothing to compare: not an LLM answer
            self.pending.pop(other, None)
            self._release(pair)
            self._count(NO_ANSWER)
            return
        pair.texts[side] = None if nothing else text
        pair.nothing[side] = nothing
        if other in self.pending:
            return  # the other answer is still on its way
        self._release(pair)
        production, candidate = pair.texts
        p_nothing, c_nothing = pair.nothing
        if p_nothing and c_nothing:
            self._count(NO_ANSWER)
        elif c_nothing and production is not None:
            self._count(FORFEIT_CANDIDATE)
            self._record(0.0, pair.cluster)
        elif p_nothing and candidate is not None:
            self._count(FORFEIT_PRODUCTION)
            self._record(1.0, pair.cluster)
        elif production is not None and candidate is not None:
            self._submit(pair, production, candidate)
        # else: its partner was dropped meanwhile (counted when it was)

    def _evict(self, now: float, incoming: int = 0) -> None:
        pending = self.pending
        # Entries are in insertion order, two per pair: drop stale pairs from the front, and
        # the oldest ones while the table (or its byte budget) is full.
        while pending:
            key = next(iter(pending))
            pair, side = pending[key]
            stale = now - pair.at > self.max_age
            if (
                not stale
                and len(pending) < 2 * self.config.max_pending
                and self.pending_bytes + incoming <= PENDING_BYTES
            ):
                return
            del pending[key]
            other = pair.keys[1 - side]
            if other in pending:
                del pending[other]
            self._release(pair)
            self._count(NO_ANSWER if stale else DROPPED_PENDING)

    def _release(self, pair: _Pair) -> None:
        self.pending_bytes -= pair.size
        pair.size = 0

    def _submit(self, pair: _Pair, production: str, candidate: str) -> None:
        if len(self._tasks) >= self.config.max_concurrency:
            self._count(DROPPED_BUSY)
            return
        now = self._clock()
        calls = self._calls
        while calls and now - calls[0] >= RATE_WINDOW:
            calls.popleft()
        if len(calls) >= self.config.max_per_minute:
            self._count(DROPPED_RATE)
            return
        calls.append(now)
        task = asyncio.get_running_loop().create_task(
            self._call(pair.body, production, candidate, pair.cluster), name="judge"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- off the request path -------------------------------------------------------------------

    async def _call(self, body: bytes, production: str, candidate: str, cluster: int) -> None:
        try:
            outcome = await self.client.judge(body, production, candidate)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a client must not kill the judging
            log.exception("judge call failed unexpectedly")
            outcome = JudgeOutcome(ERROR, None, f"{type(exc).__name__}: {exc}")
        self._count(outcome.result if outcome.result in RESULTS else SCORED)
        if outcome.value is not None:
            self._record(outcome.value, cluster)
        elif outcome.detail:
            self.last_error = f"{outcome.result}: {outcome.detail}"[:_ERROR_SHOWN]

    def count(self, result: str) -> None:
        """Count a pair's result (the proxy counts the twins it could not send)."""
        self._count(result)

    def _count(self, result: str) -> None:
        self.counts[result] = self.counts.get(result, 0) + 1

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    def status(self) -> dict[str, Any]:
        """The judge's part of the rollout's status (JSON-ready)."""
        c = self.config
        verdicts = sum(self.counts.get(r, 0) for r in VERDICTS)
        return {
            "kind": c.kind,
            "url": c.url,
            "model": c.model,
            "share": c.share,
            "live_share": c.live_share,
            "sampled": self.sampled,
            "live_pairs": self.live,
            "verdicts": verdicts,
            "results": {r: self.counts.get(r, 0) for r in RESULTS},
            "inflight": self.inflight,
            "pending": len(self.pending) // 2,
            "max_concurrency": c.max_concurrency,
            "max_per_minute": c.max_per_minute,
            "last_error": self.last_error or None,
        }

    async def close(self) -> None:
        """Cancel the calls in flight and close the connections."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.pending.clear()
        self.pending_bytes = 0
        await self.client.aclose()


_CLOSING: set[asyncio.Task[None]] = set()


def retire(judge: Judge) -> None:
    """Close a judge replaced by a config reload, without waiting (from sync code)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    task = loop.create_task(judge.close(), name="judge-close")
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)
