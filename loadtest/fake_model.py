"""Fake model server for tests, scenarios, the demo and benchmarks.

One aiohttp app imitates a model endpoint with configurable latency, errors, accuracy, cost
headers, resource metrics and an OpenAI-compatible chat API, plus a few plain HTTP endpoints
that let proxy tests check exactly what was forwarded.

Run it as ``python -m loadtest.fake_model --port 8001 --model prod`` or, in tests::

    async with running_fake_model(FakeModelConfig(model="cand", slowdown=1.3)) as url:
        ...

Ground truth: :func:`true_label` derives the correct label from the request alone, so a load
generator can post feedback without talking to the server. Whether a given request is answered
correctly depends only on ``(seed, model, request key)``, not on arrival order, so runs are
reproducible under any concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import functools
import gzip
import hashlib
import json
import math
import os
import random
import signal
import statistics
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import uvloop
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "GZIP_BODY",
    "FakeModelConfig",
    "main",
    "make_app",
    "running_fake_model",
    "true_label",
]

LatencyKind = Literal["lognormal", "fixed"]
AnswerStyle = Literal["normal", "repeat", "truncate", "refuse", "empty"]
ANSWER_STYLES: tuple[str, ...] = ("normal", "repeat", "truncate", "refuse", "empty")

#: Uncompressed body of ``GET /gzip`` (the response carries it gzipped).
GZIP_BODY = json.dumps(
    {"message": "this body is gzip-compressed by the fake model", "pad": "abc" * 200},
    separators=(",", ":"),
).encode()
# mtime=0 makes the compressed bytes deterministic, so tests can compare them exactly.
_GZIP_BYTES = gzip.compress(GZIP_BODY, mtime=0)

_MAX_LATENCY_S = 120.0
_MAX_TOKENS = 4096
_MAX_STREAM_ITEMS = 10_000
_MAX_INTERVAL_S = 60.0
_MAX_SLEEP_S = 300.0
_MAX_BYTES = 64 * 1024 * 1024
_VOCAB = (
    " the", " model", " answers", " quickly", " and", " the", " canary", " watches",
    " every", " token", " it", " streams", " back", " to", " you", ".",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class FakeModelConfig:
    """Behaviour of one fake model server; times are in seconds."""

    model: str = "fake-model"
    latency: LatencyKind = "lognormal"
    latency_median: float = 0.005
    latency_sigma: float = 0.3
    slowdown: float = 1.0
    """Multiplier on every delay (inference, ttft, inter-token): 1.3 = 30% slower."""
    max_concurrency: int = 0
    """Requests served at once, the rest wait (``queue`` in Server-Timing); 0 = no limit."""
    error_rate: float = 0.0
    accuracy: float = 0.9
    report_correct: bool = False
    """Add ``"correct": 1 or 0`` (prediction == :func:`true_label`) to ``/predict`` answers, so a
    rollout can measure accuracy per request (``signal: json:correct``) without feedback."""
    cost: float = 0.001
    """Value of the ``X-Model-Cost`` header, per request."""
    ttft: float = 0.05
    inter_token: float = 0.01
    completion_tokens: int = 16
    """Tokens generated when the request has no ``max_tokens``."""
    memory_overhead_bytes: int = 0
    memory_overhead_ratio: float = 0.0
    """Reported RSS is ``real * (1 + ratio) + bytes``: 0.4 makes a candidate "use 40% more"."""
    cpu_overhead_per_request: float = 0.0
    """Synthetic CPU seconds added to ``process_cpu_seconds_total`` per request."""
    gpu_utilization: float = 0.3
    """Idle level of ``gpu_utilization_ratio``."""
    gpu_utilization_per_busy: float = 0.1
    """Added per unit of mean concurrent inference since the previous scrape."""
    user_latency_sigma: float = 0.0
    """Users differ persistently: a request with ``X-User-Id`` takes ``exp(sigma * z)`` times
    longer, z a standard normal fixed by the user id alone (the same on every server, so two
    servers with equal settings are identical arms with heterogeneous users)."""
    user_error_sigma: float = 0.0
    """Likewise for errors: the user's error rate is ``error_rate`` moved by ``sigma * z'``
    on the logit scale."""
    latency_trend: float = 1.0
    """Latency multiplier reached ``trend_seconds`` after the server started (log-linear from
    1, then constant): a drift over the day that both arms share."""
    trend_seconds: float = 60.0
    slow_band: tuple[float, float, float] = (0.0, 0.0, 1.0)
    """(lower, upper, factor): a latency draw whose own quantile lies in [lower, upper] takes
    factor times longer; a regression in one part of the distribution only (``(0.6, 0.8,
    1.2)``: the p60-p80 band 20% slower, p50 and p95 unchanged)."""
    answer_style: AnswerStyle = "normal"
    """How chat answers degrade (streamed or not): ``repeat`` loops on a short phrase after a
    few words, ``truncate`` ends with finish_reason ``length``, ``refuse`` answers with a
    refusal, ``empty`` with no text; ``normal`` as ever."""
    answer_share: float = 1.0
    """Share of chat answers given ``answer_style`` (drawn per request, seeded); the rest are
    normal."""
    seed: int = 0
    served_models: tuple[str, ...] = ()
    """Model names the OpenAI endpoints accept (vLLM ``--served-model-name``); a request naming
    another is answered with the OpenAI API's 404 ``model_not_found``. Empty: any name."""

    def __post_init__(self) -> None:
        if isinstance(self.served_models, str):  # one name, not its characters
            object.__setattr__(self, "served_models", (self.served_models,))
        object.__setattr__(self, "served_models", tuple(self.served_models))
        if any(not isinstance(m, str) or not m for m in self.served_models):
            raise ValueError(f"served_models must be non-empty names, got {self.served_models!r}")
        if not self.model:
            raise ValueError("model must be a non-empty string")
        if self.answer_style not in ANSWER_STYLES:
            raise ValueError(
                f"answer_style must be one of {', '.join(ANSWER_STYLES)}, got {self.answer_style!r}"
            )
        if self.latency not in ("lognormal", "fixed"):
            raise ValueError(f"latency must be 'lognormal' or 'fixed', got {self.latency!r}")
        checks: list[tuple[str, float, float, float]] = [
            ("latency_median", self.latency_median, 0.0, _MAX_LATENCY_S),
            ("latency_sigma", self.latency_sigma, 0.0, 5.0),
            ("slowdown", self.slowdown, 0.0, 1000.0),
            ("max_concurrency", self.max_concurrency, 0, 1_000_000),
            ("error_rate", self.error_rate, 0.0, 1.0),
            ("accuracy", self.accuracy, 0.0, 1.0),
            ("cost", self.cost, 0.0, math.inf),
            ("ttft", self.ttft, 0.0, _MAX_LATENCY_S),
            ("inter_token", self.inter_token, 0.0, _MAX_INTERVAL_S),
            ("completion_tokens", self.completion_tokens, 1, _MAX_TOKENS),
            ("memory_overhead_bytes", self.memory_overhead_bytes, 0, math.inf),
            ("memory_overhead_ratio", self.memory_overhead_ratio, 0.0, math.inf),
            ("cpu_overhead_per_request", self.cpu_overhead_per_request, 0.0, math.inf),
            ("gpu_utilization", self.gpu_utilization, 0.0, 1.0),
            ("gpu_utilization_per_busy", self.gpu_utilization_per_busy, 0.0, math.inf),
            ("user_latency_sigma", self.user_latency_sigma, 0.0, 3.0),
            ("user_error_sigma", self.user_error_sigma, 0.0, 5.0),
            ("latency_trend", self.latency_trend, 0.01, 100.0),
            ("trend_seconds", self.trend_seconds, 0.001, math.inf),
            ("answer_share", self.answer_share, 0.0, 1.0),
        ]
        for name, value, low, high in checks:
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
        lo, hi, factor = self.slow_band
        if not (0.0 <= lo <= hi <= 1.0 and 0.0 < factor <= 100.0):
            raise ValueError(
                f"slow_band must be (lower, upper, factor) with 0 <= lower <= upper <= 1 and "
                f"0 < factor <= 100, got {self.slow_band!r}"
            )


_NORMAL = statistics.NormalDist()
USER_HEADER = "X-User-Id"  # what loadtest.loadgen sends for sticky users


@functools.lru_cache(maxsize=65536)
def user_effect(user: str, which: int) -> float:
    """A standard normal value fixed by the user id (``which`` picks independent ones)."""
    digest = hashlib.blake2b(f"{which}:{user}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / 2.0**64
    return statistics.NormalDist().inv_cdf(u)


def _request_key(request_json: Any) -> bytes:
    if isinstance(request_json, dict):
        rid = request_json.get("id")
        if rid is not None:
            return b"id:" + str(rid).encode()
        for field in ("features", "instances", "inputs"):
            if field in request_json:
                dumped = json.dumps(request_json[field], separators=(",", ":"), sort_keys=True)
                return b"f:" + dumped.encode()
    return b"j:" + json.dumps(request_json, separators=(",", ":"), sort_keys=True).encode()


def true_label(request_json: Any) -> int:
    """Return the ground-truth label (0 or 1) of a predict request.

    The label is the low bit of a BLAKE2b hash of the request's ``"id"`` (as a string) when
    present, else of the canonical JSON of its ``"features"`` (or ``"instances"``/``"inputs"``),
    else of the whole request. It needs nothing but the request body.
    """
    return hashlib.blake2b(_request_key(request_json), digest_size=8).digest()[0] & 1


class _ModelState:
    """Per-app mutable state: rng, counters and the concurrency gate."""

    def __init__(self, cfg: FakeModelConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.style_rng = random.Random(f"{cfg.seed}:answer_style")  # leaves rng's draws alone
        self.answer_key = hashlib.blake2b(
            f"{cfg.seed}:{cfg.model}".encode(), digest_size=16
        ).digest()
        self.gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency > 0 else None
        self.log_median = math.log(cfg.latency_median) if cfg.latency_median > 0 else -math.inf
        self.cost_header = repr(cfg.cost)
        self.requests = 0
        self.errors = 0
        self.in_flight = 0
        self.busy_seconds = 0.0
        self.last_scrape = (time.monotonic(), 0.0)
        self.started = time.monotonic()
        lo, hi, factor = cfg.slow_band
        self.band = (
            (
                _NORMAL.inv_cdf(lo) if lo > 0 else -math.inf,
                _NORMAL.inv_cdf(hi) if hi < 1 else math.inf,
            )
            if factor != 1.0 and hi > lo
            else None
        )

    def sample_latency(self, user: str | None = None) -> float:
        cfg = self.cfg
        if cfg.latency == "fixed" or cfg.latency_sigma == 0.0 or cfg.latency_median == 0.0:
            base = cfg.latency_median
        else:
            z = self.rng.gauss(0.0, 1.0)
            base = math.exp(self.log_median + cfg.latency_sigma * z)
            if self.band is not None and self.band[0] <= z <= self.band[1]:
                base *= cfg.slow_band[2]
        if user is not None and cfg.user_latency_sigma:
            base *= math.exp(cfg.user_latency_sigma * user_effect(user, 0))
        if cfg.latency_trend != 1.0:
            done = min((time.monotonic() - self.started) / cfg.trend_seconds, 1.0)
            base *= cfg.latency_trend**done
        return min(base * cfg.slowdown, _MAX_LATENCY_S)

    def should_fail(self, user: str | None = None) -> bool:
        rate = self.cfg.error_rate
        if rate > 0.0 and user is not None and self.cfg.user_error_sigma and rate < 1.0:
            logit = math.log(rate / (1.0 - rate)) + self.cfg.user_error_sigma * user_effect(user, 1)
            rate = 1.0 / (1.0 + math.exp(-logit))
        return rate > 0.0 and self.rng.random() < rate

    def answer(self, request_json: Any) -> tuple[int, float]:
        """Return (prediction, score); correct with probability ``accuracy``, per request key."""
        digest = hashlib.blake2b(_request_key(request_json), digest_size=16, key=self.answer_key)
        raw = digest.digest()
        u_correct = int.from_bytes(raw[:8], "little") / 2.0**64
        u_score = int.from_bytes(raw[8:], "little") / 2.0**64
        label = true_label(request_json)
        prediction = label if u_correct < self.cfg.accuracy else 1 - label
        margin = 0.5 * u_score
        return prediction, 0.5 + margin if prediction == 1 else 0.5 - margin

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[float]:
        """Hold a concurrency slot; yield the seconds spent queueing for it."""
        self.requests += 1
        self.in_flight += 1
        try:
            if self.gate is None:
                yield 0.0
            else:
                t0 = time.perf_counter()
                async with self.gate:
                    yield time.perf_counter() - t0
        finally:
            self.in_flight -= 1

    async def infer(self, seconds: float) -> None:
        if seconds > 0.0:
            await asyncio.sleep(seconds)
        self.busy_seconds += seconds

    def gpu_ratio(self) -> float:
        now = time.monotonic()
        then, busy_then = self.last_scrape
        self.last_scrape = (now, self.busy_seconds)
        mean_busy = (self.busy_seconds - busy_then) / max(now - then, 1e-3)
        level = self.cfg.gpu_utilization + self.cfg.gpu_utilization_per_busy * mean_busy
        return min(1.0, level)


STATE = web.AppKey("fake_model_state", _ModelState)
_REGISTRY = web.AppKey("fake_model_registry", CollectorRegistry)

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        import resource  # not on Windows; only reached off Linux

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is KiB on Linux but bytes on macOS; it is the peak, the best available here.
        return peak if sys.platform == "darwin" else peak * 1024


class _ResourceCollector(Collector):
    def __init__(self, state: _ModelState) -> None:
        self._state = state

    def collect(self) -> Iterable[Metric]:
        st, cfg = self._state, self._state.cfg
        times = os.times()
        cpu = times.user + times.system + cfg.cpu_overhead_per_request * st.requests
        yield CounterMetricFamily(
            "process_cpu_seconds", "Total user and system CPU time spent in seconds.", value=cpu
        )
        rss = _rss_bytes() * (1.0 + cfg.memory_overhead_ratio) + cfg.memory_overhead_bytes
        yield GaugeMetricFamily(
            "process_resident_memory_bytes", "Resident memory size in bytes.", value=rss
        )
        yield GaugeMetricFamily(
            "gpu_utilization_ratio",
            "Synthetic GPU utilisation: base level plus a load-dependent part.",
            value=st.gpu_ratio(),
        )
        yield CounterMetricFamily(
            "fake_model_requests", "Model requests received.", value=st.requests
        )
        yield CounterMetricFamily(
            "fake_model_errors", "Model requests answered with an injected error.", value=st.errors
        )
        yield GaugeMetricFamily(
            "fake_model_in_flight_requests", "Model requests being served.", value=st.in_flight
        )


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=_dumps(obj), status=status, content_type="application/json", headers=headers
    )


def _bad_request(message: str) -> web.Response:
    return _json({"error": {"message": message, "type": "invalid_request_error"}}, status=400)


def _server_timing(inference_s: float, queue_s: float) -> str:
    return f"inference;dur={inference_s * 1000.0:.3f}, queue;dur={queue_s * 1000.0:.3f}"


def _query_number(
    request: web.Request, name: str, default: float, low: float, high: float
) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise web.HTTPBadRequest(text=f"{name} must be in [{low}, {high}], got {raw!r}")
    return value


async def _read_json_object(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        payload = json.loads(await request.read())
    except ValueError:
        return _bad_request("body must be JSON")
    if not isinstance(payload, dict):
        return _bad_request("body must be a JSON object")
    return payload


_INJECTED_ERROR = _dumps({"error": {"message": "injected failure", "type": "server_error"}})


def _injected_error(st: _ModelState, headers: dict[str, str] | None = None) -> web.Response:
    st.errors += 1
    return web.Response(
        body=_INJECTED_ERROR, status=500, content_type="application/json", headers=headers
    )


async def _predict(request: web.Request) -> web.Response:
    st = request.app[STATE]
    payload = await _read_json_object(request)
    if isinstance(payload, web.Response):
        return payload
    user = request.headers.get(USER_HEADER)
    async with st.serving() as queue_s:
        inference_s = st.sample_latency(user)
        await st.infer(inference_s)
    headers = {"Server-Timing": _server_timing(inference_s, queue_s)}
    if st.should_fail(user):
        return _injected_error(st, headers)
    headers["X-Model-Cost"] = st.cost_header
    prediction, score = st.answer(payload)
    body: dict[str, Any] = {"prediction": prediction, "model": st.cfg.model, "score": score}
    if st.cfg.report_correct:
        body["correct"] = int(prediction == true_label(payload))
    if "id" in payload:
        body["id"] = payload["id"]
    return _json(body, headers=headers)


def _prompt_tokens(messages: Any) -> int:
    words = 0
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else message
            text = content if isinstance(content, str) else json.dumps(content)
            words += len(text.split())
    return max(1, words)


def _completion_tokens(payload: dict[str, Any], default: int) -> int | None:
    raw = payload.get("max_completion_tokens", payload.get("max_tokens"))
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        return None
    return min(raw, _MAX_TOKENS)


_REFUSAL_TOKENS = (
    "I", "'m", " sorry", ",", " but", " I", " can", "'t", " help", " with", " that", ".",
)  # fmt: skip
_LOOP_TOKENS = (" and", " so", " on")


def styled_answer(
    st: _ModelState, tokens: list[str], finish_reason: str
) -> tuple[list[str], str, int]:
    """Apply the server's ``answer_style`` to one answer: (tokens, finish_reason, usage
    completion_tokens). ``tokens`` is the normal answer; a share of answers is styled."""
    cfg = st.cfg
    style = cfg.answer_style
    if style == "normal" or (cfg.answer_share < 1.0 and st.style_rng.random() >= cfg.answer_share):
        return tokens, finish_reason, len(tokens)
    n = len(tokens)
    if style == "repeat":  # degenerate: a short opening, then the same phrase over and over
        head = min(4, n)
        loop = [_LOOP_TOKENS[i % len(_LOOP_TOKENS)] for i in range(n - head)]
        return tokens[:head] + loop, finish_reason, n
    if style == "truncate":
        return tokens, "length", n
    if style == "refuse":
        return list(_REFUSAL_TOKENS), "stop", len(_REFUSAL_TOKENS)
    return [], "stop", 0  # empty


def _delays(cfg: FakeModelConfig) -> tuple[float, float]:
    """Seconds to the first token and between tokens, after ``slowdown``."""
    return (
        min(cfg.ttft * cfg.slowdown, _MAX_LATENCY_S),
        min(cfg.inter_token * cfg.slowdown, _MAX_INTERVAL_S),
    )


def _include_usage(payload: dict[str, Any]) -> bool:
    """The request asks for a final usage event (``stream_options.include_usage``)."""
    options = payload.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


async def _answer_whole(st: _ModelState, generation_s: float, body: Any) -> web.Response:
    """A non-streamed answer after the whole generation (or an injected error)."""
    async with st.serving() as queue_s:
        await st.infer(generation_s)
    headers = {"Server-Timing": _server_timing(generation_s, queue_s)}
    if st.should_fail():
        return _injected_error(st, headers)
    headers["X-Model-Cost"] = st.cost_header
    return _json(body, headers=headers)


async def _open_stream(
    request: web.Request, st: _ModelState, ttft: float, generation_s: float, queue_s: float
) -> web.StreamResponse:
    """An injected error (not prepared) or a prepared event stream, after the time to the
    first token."""
    if st.should_fail():
        # A streamed request fails before its first byte, as real servers do on overload.
        await st.infer(ttft)
        return _injected_error(st)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Model-Cost": st.cost_header,
            # The header goes out before generation, so it can only promise the plan.
            "Server-Timing": _server_timing(generation_s, queue_s),
        }
    )
    await response.prepare(request)
    await st.infer(ttft)
    return response


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    cfg = st.cfg
    payload = await _read_json_object(request)
    if isinstance(payload, web.Response):
        return payload
    if (refused := _check_model(cfg, payload)) is not None:
        return refused
    n_tokens = _completion_tokens(payload, cfg.completion_tokens)
    if n_tokens is None:
        return _bad_request("max_tokens must be a positive integer")
    finish_reason = (
        "length" if "max_tokens" in payload or "max_completion_tokens" in payload else "stop"
    )
    usage = {
        "prompt_tokens": _prompt_tokens(payload.get("messages")),
        "completion_tokens": n_tokens,
        "total_tokens": 0,
    }
    usage["total_tokens"] = usage["prompt_tokens"] + n_tokens
    ttft, gap = _delays(cfg)
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    tokens = [_VOCAB[i % len(_VOCAB)] for i in range(n_tokens)]
    tokens, finish_reason, usage["completion_tokens"] = styled_answer(st, tokens, finish_reason)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    generation_s = ttft + gap * max(len(tokens) - 1, 0)

    if not payload.get("stream"):
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(tokens)},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        body = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": cfg.model,
            "choices": [choice],
            "usage": usage,
        }
        return await _answer_whole(st, generation_s, body)

    include_usage = _include_usage(payload)
    base: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": cfg.model,
    }
    if include_usage:
        base["usage"] = None

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + _dumps({**base, "choices": choices, **extra}) + b"\n\n"

    async with st.serving() as queue_s:
        response = await _open_stream(request, st, ttft, generation_s, queue_s)
        if not response.prepared:
            return response  # the injected error
        if not tokens:  # an empty answer: the role alone, as servers send it
            await response.write(
                event(
                    [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            )
        for i, token in enumerate(tokens):
            if i:
                await st.infer(gap)
            delta = {"role": "assistant", "content": token} if i == 0 else {"content": token}
            await response.write(
                event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])
            )
        await response.write(
            event([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}])
        )
        if include_usage:
            await response.write(event([], usage=usage))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    return response


def _check_model(cfg: FakeModelConfig, payload: dict[str, Any]) -> web.Response | None:
    """vLLM's answers to a missing model (400) and to a name it does not serve (404), in the
    OpenAI error format; None when the request may go on."""
    model = payload.get("model")
    if not cfg.served_models:
        return None
    if not isinstance(model, str) or not model:
        return _json(
            {
                "error": {
                    "message": "you must provide a model parameter",
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": None,
                }
            },
            status=400,
        )
    if model not in cfg.served_models:
        return _json(
            {
                "error": {
                    "message": f"The model `{model}` does not exist.",
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": "model_not_found",
                }
            },
            status=404,
        )
    return None


def _prompt_words(prompt: Any) -> int | None:
    """Whitespace-separated words of a completions ``prompt`` (a string or a list of them,
    or token ids); None when it is none of these."""
    if isinstance(prompt, str):
        return max(1, len(prompt.split()))
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return max(1, sum(len(p.split()) for p in prompt))
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return len(prompt)
    return None


async def _completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions`` (legacy text completions), streamed or not, as vLLM answers."""
    st = request.app[STATE]
    cfg = st.cfg
    payload = await _read_json_object(request)
    if isinstance(payload, web.Response):
        return payload
    if (refused := _check_model(cfg, payload)) is not None:
        return refused
    prompt_tokens = _prompt_words(payload.get("prompt"))
    if prompt_tokens is None:
        return _bad_request("prompt must be a string, a list of strings or of token ids")
    n_tokens = _completion_tokens(payload, cfg.completion_tokens)
    if n_tokens is None:
        return _bad_request("max_tokens must be a positive integer")
    finish_reason = "length" if "max_tokens" in payload else "stop"
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": n_tokens,
        "total_tokens": prompt_tokens + n_tokens,
    }
    ttft, gap = _delays(cfg)
    generation_s = ttft + gap * (n_tokens - 1)
    base: dict[str, Any] = {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": cfg.model,
    }
    tokens = [_VOCAB[i % len(_VOCAB)] for i in range(n_tokens)]

    def choice(text: str, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    if not payload.get("stream"):
        body = {**base, "choices": [choice("".join(tokens), finish_reason)], "usage": usage}
        return await _answer_whole(st, generation_s, body)

    include_usage = _include_usage(payload)

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + _dumps({**base, "choices": choices, **extra}) + b"\n\n"

    async with st.serving() as queue_s:
        response = await _open_stream(request, st, ttft, generation_s, queue_s)
        if not response.prepared:
            return response  # the injected error
        for i, token in enumerate(tokens):
            if i:
                await st.infer(gap)
            last = i == len(tokens) - 1
            await response.write(event([choice(token, finish_reason if last else None)]))
        if include_usage:
            await response.write(event([], usage=usage))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    return response


_EMBEDDING_DIMENSIONS = 8
_MAX_EMBEDDING_INPUTS = 2048


def _embedding(model: str, item: Any, dimensions: int) -> list[float]:
    """A unit vector fixed by (model, input): the same text embeds the same on one model."""
    seed = hashlib.blake2b(f"{model}\x00{json.dumps(item)}".encode(), digest_size=8).digest()
    rng = random.Random(seed)
    v = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]


async def _embeddings(request: web.Request) -> web.Response:
    """``POST /v1/embeddings``: deterministic unit vectors, as floats or base64 float32 (the
    ``openai`` client asks for base64 by default)."""
    st = request.app[STATE]
    cfg = st.cfg
    payload = await _read_json_object(request)
    if isinstance(payload, web.Response):
        return payload
    if (refused := _check_model(cfg, payload)) is not None:
        return refused
    raw = payload.get("input")
    if isinstance(raw, str) or (
        isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw)
    ):
        items: list[Any] = [raw]
    elif isinstance(raw, list) and 0 < len(raw) <= _MAX_EMBEDDING_INPUTS:
        items = raw
    else:
        return _bad_request("input must be a string, a list of strings or of token ids")
    encoding = payload.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        return _bad_request("encoding_format must be 'float' or 'base64'")
    dimensions = payload.get("dimensions", _EMBEDDING_DIMENSIONS)
    if (
        isinstance(dimensions, bool)
        or not isinstance(dimensions, int)
        or not 1 <= dimensions <= 4096
    ):
        return _bad_request("dimensions must be an integer in [1, 4096]")
    data = []
    tokens = 0
    for i, item in enumerate(items):
        vector = _embedding(cfg.model, item, dimensions)
        tokens += len(item) if isinstance(item, list) else max(1, len(str(item).split()))
        value: Any = vector
        if encoding == "base64":
            value = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    body = {
        "object": "list",
        "data": data,
        "model": cfg.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return await _answer_whole(st, st.sample_latency(), body)


async def _healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok", "model": request.app[STATE].cfg.model})


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _echo(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    length = 0
    # Read in chunks so bodies of any size (and chunked uploads) are hashed without buffering.
    async for chunk in request.content.iter_chunked(1 << 16):
        digest.update(chunk)
        length += len(chunk)
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    body = {
        "method": request.method,
        "path": request.path,
        "query_string": request.query_string,
        "query": {key: request.query.getall(key) for key in request.query},
        "headers": headers,
        "raw_headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "body_length": length,
        "body_sha256": digest.hexdigest(),
        "model": request.app[STATE].cfg.model,
    }
    return _json(body)


async def _stream(request: web.Request) -> web.StreamResponse:
    chunks = int(_query_number(request, "chunks", 5, 0, _MAX_STREAM_ITEMS))
    interval = _query_number(request, "interval", 0.1, 0.0, _MAX_INTERVAL_S)
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for i in range(chunks):
        if i and interval:
            await asyncio.sleep(interval)
        await response.write(f"chunk {i}\n".encode())
    await response.write_eof()
    return response


async def _sse(request: web.Request) -> web.StreamResponse:
    events = int(_query_number(request, "events", 5, 0, _MAX_STREAM_ITEMS))
    interval = _query_number(request, "interval", 0.1, 0.0, _MAX_INTERVAL_S)
    model = request.app[STATE].cfg.model
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for i in range(events):
        if i and interval:
            await asyncio.sleep(interval)
        data = _dumps({"index": i, "model": model, "time": time.time()})
        await response.write(b"id: %d\ndata: %s\n\n" % (i, data))
    await response.write_eof()
    return response


async def _bytes(request: web.Request) -> web.StreamResponse:
    n = int(_query_number(request, "n", 1024, 0, _MAX_BYTES))
    seed = int(_query_number(request, "seed", request.app[STATE].cfg.seed, 0, 2**63))
    data = random.Random(seed).randbytes(n)
    headers = {
        "Content-Type": "application/octet-stream",
        "X-Content-Sha256": hashlib.sha256(data).hexdigest(),
    }
    if request.query.get("chunked") not in (None, "0", "false"):
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        view = memoryview(data)
        for start in range(0, n, 1 << 16):
            await response.write(view[start : start + (1 << 16)])
        await response.write_eof()
        return response
    return web.Response(body=data, headers=headers)


async def _gzip(request: web.Request) -> web.Response:
    headers = {
        "Content-Encoding": "gzip",
        "Content-Type": "application/json",
        "X-Identity-Sha256": hashlib.sha256(GZIP_BODY).hexdigest(),
    }
    return web.Response(body=_GZIP_BYTES, headers=headers)


async def _status(request: web.Request) -> web.Response:
    raw = request.match_info["code"]
    code = int(raw) if raw.isdigit() else 0
    if not 200 <= code <= 599:
        return _bad_request(f"status code must be in [200, 599], got {raw!r}")
    if code in (204, 304):
        return web.Response(status=code)
    return _json({"status": code, "model": request.app[STATE].cfg.model}, status=code)


async def _sleep(request: web.Request) -> web.Response:
    seconds = _query_number(request, "s", 1.0, 0.0, _MAX_SLEEP_S)
    await asyncio.sleep(seconds)
    return _json({"slept": seconds})


async def _set_cookie(request: web.Request) -> web.Response:
    """Set each query parameter as a cookie, or two default ones."""
    pairs = list(request.query.items()) or [
        ("session", request.app[STATE].cfg.model),
        ("uid", "fake-user"),
    ]
    response = _json({"cookies": dict(pairs)})
    for name, value in pairs:
        response.set_cookie(name, value, path="/", httponly=True)
    return response


async def _add_model_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Model-Name"] = request.app[STATE].cfg.model


def make_app(cfg: FakeModelConfig | None = None) -> web.Application:
    """Build the fake model app; every app has its own state and Prometheus registry."""
    cfg = cfg or FakeModelConfig()
    # Request bodies are small JSON; /echo streams its body and ignores this limit.
    app = web.Application(client_max_size=16 * 1024 * 1024)
    state = _ModelState(cfg)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ResourceCollector(state))
    app[STATE] = state
    app[_REGISTRY] = registry
    app.on_response_prepare.append(_add_model_header)
    app.router.add_post("/predict", _predict)
    app.router.add_post("/v1/models/{name}:predict", _predict)
    app.router.add_post("/v2/models/{name}/infer", _predict)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_route("*", "/echo", _echo)
    app.router.add_route("*", "/echo/{tail:.*}", _echo)
    app.router.add_get("/stream", _stream)
    app.router.add_get("/sse", _sse)
    app.router.add_get("/bytes", _bytes)
    app.router.add_get("/gzip", _gzip)
    app.router.add_route("*", "/status/{code}", _status)
    app.router.add_get("/sleep", _sleep)
    app.router.add_get("/set-cookie", _set_cookie)
    return app


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def running_fake_model(
    cfg: FakeModelConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve a fake model on ``host:port`` (0 = ephemeral) and yield its base URL."""
    runner = web.AppRunner(
        make_app(cfg), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1]
        yield _url(host, bound_port)
    finally:
        await runner.cleanup()


def _duration(text: str) -> float:
    """Parse ``5ms``, ``0.2s`` or a bare number of seconds."""
    raw = text.strip().lower()
    scale = 1.0
    if raw.endswith("ms"):
        raw, scale = raw[:-2], 1e-3
    elif raw.endswith("s"):
        raw = raw[:-1]
    try:
        return float(raw) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """Return the CLI parser; flags mirror :class:`FakeModelConfig` fields."""
    defaults = FakeModelConfig()
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.fake_model",
        description="Serve a fake ML model (predict, OpenAI chat, /metrics) for canary tests.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument(
        "--model", default=defaults.model, help="name in responses and X-Model-Name"
    )
    parser.add_argument("--latency", choices=("lognormal", "fixed"), default=defaults.latency)
    parser.add_argument(
        "--latency-median", type=_duration, default=defaults.latency_median, help="e.g. 5ms"
    )
    parser.add_argument("--latency-sigma", type=float, default=defaults.latency_sigma)
    parser.add_argument(
        "--slowdown", type=float, default=defaults.slowdown, help="1.3 = 30%% slower"
    )
    parser.add_argument("--max-concurrency", type=int, default=defaults.max_concurrency)
    parser.add_argument("--error-rate", type=float, default=defaults.error_rate)
    parser.add_argument("--accuracy", type=float, default=defaults.accuracy)
    parser.add_argument(
        "--report-correct", action="store_true", help='add "correct": 0|1 to /predict answers'
    )
    parser.add_argument("--cost", type=float, default=defaults.cost, help="X-Model-Cost value")
    parser.add_argument("--ttft", type=_duration, default=defaults.ttft)
    parser.add_argument("--inter-token", type=_duration, default=defaults.inter_token)
    parser.add_argument("--completion-tokens", type=int, default=defaults.completion_tokens)
    parser.add_argument("--memory-overhead-bytes", type=int, default=defaults.memory_overhead_bytes)
    parser.add_argument(
        "--memory-overhead-ratio", type=float, default=defaults.memory_overhead_ratio
    )
    parser.add_argument(
        "--cpu-overhead-per-request", type=float, default=defaults.cpu_overhead_per_request
    )
    parser.add_argument("--gpu-utilization", type=float, default=defaults.gpu_utilization)
    parser.add_argument(
        "--gpu-utilization-per-busy", type=float, default=defaults.gpu_utilization_per_busy
    )
    parser.add_argument(
        "--answer-style",
        choices=ANSWER_STYLES,
        default=defaults.answer_style,
        help="how chat answers degrade: repeat, truncate, refuse, empty (default normal)",
    )
    parser.add_argument(
        "--answer-share",
        type=float,
        default=defaults.answer_share,
        help="share of chat answers given --answer-style (default 1.0)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--served-model-name",
        dest="served_models",
        nargs="+",
        default=list(defaults.served_models),
        help="model names the OpenAI endpoints accept (default: any)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> FakeModelConfig:
    """Build the config from parsed CLI arguments."""
    names = {f.name for f in dataclasses.fields(FakeModelConfig)}
    return FakeModelConfig(**{k: v for k, v in vars(args).items() if k in names})


async def _serve(cfg: FakeModelConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running_fake_model(cfg, host, port) as url:
        print(f"fake model {cfg.model!r} listening on {url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Run the fake model server until SIGINT or SIGTERM."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(cfg, args.host, args.port))


if __name__ == "__main__":
    main()
