"""Open-loop load generator for loopback targets.

Requests arrive as a Poisson process at a fixed rate and are sent at their arrival time whatever
happened to earlier ones (open loop), so a slow server faces a growing queue instead of a politely
slowing client. Runs are bounded by duration and/or request count and only ever target loopback.

API: ``report = await run_load(LoadConfig(url=..., rate=200, duration=10))``.
CLI: ``python -m loadtest.loadgen --url http://127.0.0.1:8080/predict --rate 200 --duration 10``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import ipaddress
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

import aiohttp
import uvloop
from yarl import URL

__all__ = [
    "MAX_DURATION",
    "MAX_REQUESTS",
    "LatencySummary",
    "LoadConfig",
    "LoadReport",
    "NonLoopbackURLError",
    "ResponseRecord",
    "check_loopback_url",
    "main",
    "run_load",
]

MAX_RATE = 100_000.0
MAX_DURATION = 3600.0
MAX_REQUESTS = 5_000_000
BodyKind = Literal["predict", "chat", "chat-stream", "empty"]


class NonLoopbackURLError(ValueError):
    """The target URL is not on loopback (127.0.0.0/8, ::1 or localhost)."""


def check_loopback_url(url: str) -> URL:
    """Return ``url`` parsed; raise :class:`NonLoopbackURLError` unless it targets loopback."""
    parsed = URL(url)
    if parsed.scheme not in ("http", "https"):
        raise NonLoopbackURLError(f"url must be http(s)://, got {url!r}")
    host = (parsed.host or "").strip("[]").lower()
    if host == "localhost":
        return parsed
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise NonLoopbackURLError(
            f"url must target loopback (127.0.0.0/8, ::1, localhost), got host {host!r}"
        ) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not ip.is_loopback:
        raise NonLoopbackURLError(
            f"url must target loopback (127.0.0.0/8, ::1, localhost), got host {host!r}"
        )
    return parsed


@dataclass(frozen=True, slots=True)
class ResponseRecord:
    """One finished request, as handed to ``LoadConfig.on_response``."""

    index: int
    request_json: Any
    """The JSON body sent (None for empty bodies)."""
    user: str | None
    status: int | None
    """HTTP status, or None when the request failed without a response."""
    headers: Mapping[str, str]
    body: bytes
    latency: float
    """Seconds from sending to the last body byte."""
    ttfb: float | None
    """Seconds from sending to the first body byte."""
    arm: str | None
    error: str | None
    """Error class ("5xx", "4xx", "timeout" or an exception name), None on success."""


OnResponse = Callable[[ResponseRecord], Awaitable[None] | None]
BodyFactory = Callable[[int, random.Random], Any]


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """One load run; times are in seconds. At least one of ``duration``/``requests`` is needed."""

    url: str
    rate: float = 100.0
    """Mean arrivals per second (Poisson)."""
    duration: float | None = 10.0
    requests: int | None = None
    """Arrivals to schedule (sent plus dropped); the run ends at whichever bound comes first."""
    max_in_flight: int = 1000
    """Arrivals beyond this many outstanding requests are dropped and counted."""
    timeout: float = 10.0
    method: str | None = None
    """Default: GET for ``body="empty"``, else POST."""
    body: BodyKind = "predict"
    features: int = 4
    max_tokens: int = 16
    """Completion tokens asked for by chat bodies."""
    users: int = 0
    """Population for the sticky user header, drawn uniformly; 0 sends no user header."""
    user_header: str = "X-User-Id"
    headers: Mapping[str, str] = field(default_factory=dict)
    body_factory: BodyFactory | None = None
    """``(index, rng) -> JSON body``; replaces the ``body`` template."""
    on_response: OnResponse | None = None
    """Called (or awaited) after every request; its time is not part of the latency."""
    arm_header: str = "X-Canary-Arm"
    progress: bool = False
    """Print a progress line to stderr once a second."""
    id_prefix: str = "req"
    seed: int = 0

    def __post_init__(self) -> None:
        check_loopback_url(self.url)
        if not 0.0 < self.rate <= MAX_RATE:
            raise ValueError(f"rate must be in (0, {MAX_RATE:g}], got {self.rate!r}")
        if self.duration is None and self.requests is None:
            raise ValueError("set duration or requests (or both) so the run is bounded")
        if self.duration is not None and not 0.0 < self.duration <= MAX_DURATION:
            raise ValueError(f"duration must be in (0, {MAX_DURATION:g}], got {self.duration!r}")
        if self.requests is not None and not 1 <= self.requests <= MAX_REQUESTS:
            raise ValueError(f"requests must be in [1, {MAX_REQUESTS}], got {self.requests!r}")
        if not 1 <= self.max_in_flight <= 100_000:
            raise ValueError(f"max_in_flight must be in [1, 100000], got {self.max_in_flight!r}")
        if not 0.0 < self.timeout <= 600.0:
            raise ValueError(f"timeout must be in (0, 600], got {self.timeout!r}")
        if self.body not in ("predict", "chat", "chat-stream", "empty"):
            raise ValueError(f"body must be predict|chat|chat-stream|empty, got {self.body!r}")
        if self.users < 0 or self.features < 0 or self.max_tokens < 1:
            raise ValueError("users and features must be >= 0 and max_tokens >= 1")


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Exact order statistics of a sample, in seconds (NaN when empty)."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> LatencySummary:
        """Summarise ``samples`` with nearest-rank percentiles."""
        if not samples:
            nan = math.nan
            return cls(0, nan, nan, nan, nan, nan)
        ordered = sorted(samples)
        n = len(ordered)

        def rank(q: float) -> float:
            return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))]

        return cls(n, math.fsum(ordered) / n, rank(0.5), rank(0.9), rank(0.99), ordered[-1])


@dataclass(frozen=True, slots=True)
class LoadReport:
    """Outcome of a load run; rates are per second, times in seconds."""

    url: str
    target_rate: float
    sent: int
    completed: int
    """Requests that got an HTTP response, whatever its status."""
    ok: int
    """Responses with status below 400."""
    dropped: int
    """Arrivals not sent because ``max_in_flight`` requests were outstanding."""
    errors: dict[str, int]
    status_counts: dict[int, int]
    arms: dict[str, int]
    send_window: float
    duration: float
    achieved_rate: float
    """Arrivals (sent plus dropped) per second of the send window."""
    throughput: float
    """Completed requests per second of the whole run."""
    latency: LatencySummary
    ttfb: LatencySummary
    schedule_lag: LatencySummary
    """How late requests left compared with their arrival time (load generator health)."""
    callback_errors: int

    @property
    def error_count(self) -> int:
        """Return the number of failed requests (4xx, 5xx and exceptions)."""
        return sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready builtins."""
        out = dataclasses.asdict(self)
        out["error_count"] = self.error_count
        out["status_counts"] = {str(k): v for k, v in self.status_counts.items()}
        return out

    def format(self) -> str:
        """Return a readable multi-line summary."""

        def ms(value: float) -> str:
            return f"{value * 1000.0:.2f}ms"

        lat = self.latency
        lines = [
            f"target   {self.url} at {self.target_rate:g}/s",
            f"sent     {self.sent} in {self.send_window:.2f}s "
            f"(achieved {self.achieved_rate:.1f}/s), dropped {self.dropped}",
            f"done     {self.completed} responses, {self.ok} ok, {self.error_count} errors, "
            f"throughput {self.throughput:.1f}/s over {self.duration:.2f}s",
            f"latency  p50 {ms(lat.p50)}  p90 {ms(lat.p90)}  p99 {ms(lat.p99)}  "
            f"max {ms(lat.max)}  mean {ms(lat.mean)}",
            f"ttfb     p50 {ms(self.ttfb.p50)}  p99 {ms(self.ttfb.p99)}",
            f"lag      p99 {ms(self.schedule_lag.p99)}  max {ms(self.schedule_lag.max)}",
        ]
        if self.errors:
            lines.append(
                "errors   " + ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items()))
            )
        if self.status_counts:
            codes = ", ".join(f"{k}={v}" for k, v in sorted(self.status_counts.items()))
            lines.append(f"status   {codes}")
        if self.arms:
            lines.append("arms     " + ", ".join(f"{k}={v}" for k, v in sorted(self.arms.items())))
        if self.callback_errors:
            lines.append(f"callback errors {self.callback_errors}")
        return "\n".join(lines)


def _encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class _Run:
    """Mutable bookkeeping of one run."""

    def __init__(self, cfg: LoadConfig, session: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.session = session
        self.url = URL(cfg.url)
        self.method = cfg.method or ("GET" if cfg.body == "empty" else "POST")
        self.body_rng = random.Random(f"{cfg.seed}:body")
        self.base_headers = dict(cfg.headers)
        if cfg.body != "empty" or cfg.body_factory is not None:
            self.base_headers.setdefault("Content-Type", "application/json")
        self.tasks: set[asyncio.Task[None]] = set()
        self.sent = 0
        self.dropped = 0
        self.completed = 0
        self.ok = 0
        self.callback_errors = 0
        self.errors: Counter[str] = Counter()
        self.status_counts: Counter[int] = Counter()
        self.arms: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.ttfbs: list[float] = []
        self.lags: list[float] = []

    def make_body(self, index: int) -> Any:
        cfg, rng = self.cfg, self.body_rng
        if cfg.body_factory is not None:
            return cfg.body_factory(index, rng)
        if cfg.body == "predict":
            features = [round(rng.random(), 4) for _ in range(cfg.features)]
            return {"id": f"{cfg.id_prefix}-{cfg.seed}-{index}", "features": features}
        if cfg.body in ("chat", "chat-stream"):
            body: dict[str, Any] = {
                "model": "fake",
                "messages": [{"role": "user", "content": f"question {index}: what comes next?"}],
                "max_tokens": cfg.max_tokens,
            }
            if cfg.body == "chat-stream":
                body["stream"] = True
                body["stream_options"] = {"include_usage": True}
            return body
        return None

    def launch(self, index: int) -> None:
        payload = self.make_body(index)
        headers = self.base_headers
        user = None
        if self.cfg.users:
            user = f"user-{self.body_rng.randrange(self.cfg.users)}"
            headers = {**headers, self.cfg.user_header: user}
        data = None if payload is None else _encode(payload)
        task = asyncio.create_task(self.request(index, payload, data, headers, user))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        self.sent += 1

    async def request(
        self,
        index: int,
        payload: Any,
        data: bytes | None,
        headers: Mapping[str, str],
        user: str | None,
    ) -> None:
        cfg = self.cfg
        status: int | None = None
        error: str | None = None
        resp_headers: Mapping[str, str] = {}
        body = b""
        ttfb: float | None = None
        t0 = time.perf_counter()
        try:
            async with self.session.request(
                self.method, self.url, data=data, headers=headers, allow_redirects=False
            ) as resp:
                first = await resp.content.readany()
                ttfb = time.perf_counter() - t0
                rest = await resp.content.read()
                body = first + rest if rest else first
                status = resp.status
                resp_headers = resp.headers
        except TimeoutError:
            error = "timeout"
        except (aiohttp.ClientError, OSError) as exc:
            error = type(exc).__name__
        latency = time.perf_counter() - t0
        arm = None
        if status is not None:
            self.completed += 1
            self.status_counts[status] += 1
            self.latencies.append(latency)
            if ttfb is not None:
                self.ttfbs.append(ttfb)
            if status < 400:
                self.ok += 1
            else:
                error = f"{status // 100}xx"
            arm = resp_headers.get(cfg.arm_header)
            if arm is not None:
                self.arms[arm] += 1
        if error is not None:
            self.errors[error] += 1
        if cfg.on_response is not None:
            record = ResponseRecord(
                index, payload, user, status, resp_headers, body, latency, ttfb, arm, error
            )
            try:
                result = cfg.on_response(record)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # a scenario's callback must not kill the run; it is counted
                self.callback_errors += 1

    async def report_progress(self, start: float, out: TextIO) -> None:
        seen = 0
        while True:
            await asyncio.sleep(1.0)
            recent = LatencySummary.of(self.latencies[seen:])
            seen = len(self.latencies)
            elapsed = time.perf_counter() - start
            print(
                f"[{elapsed:6.1f}s] sent {self.sent} ({self.sent / elapsed:.1f}/s) "
                f"done {self.completed} in-flight {len(self.tasks)} dropped {self.dropped} "
                f"errors {sum(self.errors.values())} "
                f"p50 {recent.p50 * 1000:.1f}ms p99 {recent.p99 * 1000:.1f}ms",
                file=out,
                flush=True,
            )


async def run_load(cfg: LoadConfig) -> LoadReport:
    """Send open-loop Poisson load as ``cfg`` says and return the report."""
    check_loopback_url(cfg.url)
    limit = min(cfg.requests or MAX_REQUESTS, MAX_REQUESTS)
    arrivals = random.Random(f"{cfg.seed}:arrivals")
    connector = aiohttp.TCPConnector(limit=cfg.max_in_flight, limit_per_host=0)
    # trust_env=False: an HTTP(S)_PROXY variable must never send this traffic off the host.
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=cfg.timeout),
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        run = _Run(cfg, session)
        start = time.perf_counter()
        progress = (
            asyncio.create_task(run.report_progress(start, sys.stderr)) if cfg.progress else None
        )
        offset = 0.0
        by_time = False
        try:
            for index in range(limit):
                offset += arrivals.expovariate(cfg.rate)
                if cfg.duration is not None and offset >= cfg.duration:
                    by_time = True
                    break
                delay = start + offset - time.perf_counter()
                if delay > 0.0:
                    await asyncio.sleep(delay)
                run.lags.append(max(0.0, time.perf_counter() - start - offset))
                if len(run.tasks) >= cfg.max_in_flight:
                    run.dropped += 1
                else:
                    run.launch(index)
            if by_time and cfg.duration is not None:
                # Wait out the quiet tail so the window, and so the rate, matches the config.
                await asyncio.sleep(max(0.0, start + cfg.duration - time.perf_counter()))
            send_window = max(time.perf_counter() - start, 1e-9)
            if run.tasks:
                _, pending = await asyncio.wait(set(run.tasks), timeout=cfg.timeout + 5.0)
                for task in pending:
                    task.cancel()
                if pending:
                    run.errors["unfinished"] += len(pending)
                    await asyncio.wait(pending)
        finally:
            if progress is not None:
                progress.cancel()
            for task in run.tasks:
                task.cancel()
        duration = time.perf_counter() - start
    return LoadReport(
        url=cfg.url,
        target_rate=cfg.rate,
        sent=run.sent,
        completed=run.completed,
        ok=run.ok,
        dropped=run.dropped,
        errors=dict(run.errors),
        status_counts=dict(sorted(run.status_counts.items())),
        arms=dict(run.arms),
        send_window=send_window,
        duration=duration,
        achieved_rate=(run.sent + run.dropped) / send_window,
        throughput=run.completed / duration,
        latency=LatencySummary.of(run.latencies),
        ttfb=LatencySummary.of(run.ttfbs),
        schedule_lag=LatencySummary.of(run.lags),
        callback_errors=run.callback_errors,
    )


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"header must be 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    """Return the CLI parser."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.loadgen",
        description="Open-loop Poisson load against a loopback URL.",
    )
    parser.add_argument(
        "--url", required=True, help="loopback target, e.g. http://127.0.0.1:8080/predict"
    )
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--duration", type=float, help="seconds (default 10 without --requests)")
    parser.add_argument("--requests", type=int, help="number of arrivals to schedule")
    parser.add_argument("--max-in-flight", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    parser.add_argument("--method", help="default GET for --body empty, else POST")
    parser.add_argument(
        "--body", choices=("predict", "chat", "chat-stream", "empty"), default="predict"
    )
    parser.add_argument("--features", type=int, default=4, help="feature vector length")
    parser.add_argument("--max-tokens", type=int, default=16, help="for chat bodies")
    parser.add_argument("--users", type=int, default=0, help="sticky user population (0 = none)")
    parser.add_argument("--user-header", default="X-User-Id")
    parser.add_argument(
        "-H", "--header", type=_header, action="append", default=[], help="'Name: value'"
    )
    parser.add_argument("--arm-header", default="X-Canary-Arm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    return parser


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """Build the config from parsed CLI arguments."""
    duration = args.duration
    if duration is None and args.requests is None:
        duration = 10.0
    expected = duration if duration is not None else args.requests / args.rate
    return LoadConfig(
        url=args.url,
        rate=args.rate,
        duration=duration,
        requests=args.requests,
        max_in_flight=args.max_in_flight,
        timeout=args.timeout,
        method=args.method,
        body=args.body,
        features=args.features,
        max_tokens=args.max_tokens,
        users=args.users,
        user_header=args.user_header,
        headers=dict(args.header),
        arm_header=args.arm_header,
        progress=not args.no_progress and expected > 2.0,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI: send the load, print the summary (or JSON) to stdout."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        report = runner.run(run_load(cfg))
    if args.json:
        # NaN is not JSON; report missing percentiles as null.
        print(json.dumps(_nan_to_none(report.to_dict())))
    else:
        print(report.format())


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    return obj


if __name__ == "__main__":
    main()
