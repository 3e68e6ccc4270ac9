"""WebhookSender against real loopback HTTP servers: delivery, retries, timeouts, back-pressure."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from canary import __version__
from canary.config import WebhookConfig
from canary.webhooks import WebhookSender

Behaviour = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    at: float  # time.monotonic() when the request arrived
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class HookServer:
    url: str
    seen: list[Seen] = field(default_factory=list)
    active: int = 0
    max_active: int = 0


async def _ok(request: web.Request, n: int) -> web.StreamResponse:
    return web.json_response({"ok": True})


@contextlib.asynccontextmanager
async def hook_server(
    behaviour: Behaviour = _ok, release: asyncio.Event | None = None
) -> AsyncIterator[HookServer]:
    """A webhook receiver at ``/hook``; ``behaviour(request, n)`` answers the n-th request.

    ``release`` is set on exit so handlers that wait on it finish before the server stops.
    """
    release = release or asyncio.Event()
    state = HookServer(url="")

    async def handle(request: web.Request) -> web.StreamResponse:
        n = len(state.seen)
        state.seen.append(
            Seen(time.monotonic(), dict(request.headers), json.loads(await request.read()))
        )
        state.active += 1
        state.max_active = max(state.max_active, state.active)
        try:
            return await behaviour(request, n)
        finally:
            state.active -= 1

    app = web.Application()
    app.router.add_post("/hook", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.url = str(server.make_url("/hook"))
    try:
        yield state
    finally:
        release.set()
        await server.close()


def hanging(release: asyncio.Event) -> Behaviour:
    async def behave(request: web.Request, n: int) -> web.StreamResponse:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 30)
        return web.json_response({})

    return behave


def hook(url: str, on: list[str] | None = None, timeout: str = "2s") -> WebhookConfig:
    return WebhookConfig.model_validate({"on": on or ["rollback"], "url": url, "timeout": timeout})


class Results:
    """``on_result`` recorder that tests can await."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self._changed = asyncio.Event()

    def __call__(self, rollout: str, result: str) -> None:
        self.items.append((rollout, result))
        self._changed.set()

    async def wait(self, n: int, timeout: float = 5.0) -> list[str]:
        async with asyncio.timeout(timeout):
            while len(self.items) < n:
                self._changed.clear()
                await self._changed.wait()
        return [r for _, r in self.items]


@contextlib.asynccontextmanager
async def sender(
    close_timeout: float = 1.0, **kwargs: Any
) -> AsyncIterator[tuple[WebhookSender, Results]]:
    results = Results()
    s = WebhookSender(on_result=results, **kwargs)
    await s.start()
    try:
        yield s, results
    finally:
        await s.close(timeout=close_timeout)


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_delivered_with_body_and_headers() -> None:
    async with hook_server() as srv, sender() as (s, results):
        before = time.time()
        assert s.fire("fraud", "rollback", [hook(srv.url)], {"reason": "p95 +12%", "step": 2}) == 1
        assert await results.wait(1) == ["delivered"]
    assert results.items == [("fraud", "delivered")]
    [req] = srv.seen
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["User-Agent"] == f"canary/{__version__}"
    assert req.headers["X-Canary-Event"] == "rollback"
    assert req.body["rollout"] == "fraud" and req.body["event"] == "rollback"
    assert before <= req.body["at"] <= time.time()
    assert req.body["reason"] == "p95 +12%" and req.body["step"] == 2


async def test_payload_cannot_replace_rollout_or_event_and_nan_is_null() -> None:
    async with hook_server() as srv, sender() as (s, results):
        s.fire("a", "rollback", [hook(srv.url)], {"rollout": "b", "at": 1.5, "x": float("nan")})
        await results.wait(1)
    body = srv.seen[0].body
    assert body == {"rollout": "a", "event": "rollback", "at": 1.5, "x": None}


async def test_only_hooks_subscribed_to_the_event() -> None:
    async with hook_server() as on_rb, hook_server() as on_promote, sender() as (s, results):
        hooks = [hook(on_rb.url, ["rollback", "hold"]), hook(on_promote.url, ["promote"])]
        assert s.fire("m", "advance", hooks, {}) == 0
        assert s.fire("m", "rollback", hooks, {}) == 1
        assert await results.wait(1) == ["delivered"]
        await asyncio.sleep(0.05)  # a wrongly queued second delivery would land by now
    assert len(on_rb.seen) == 1 and on_promote.seen == []


async def test_retried_after_two_503s_then_delivered() -> None:
    async def flaky(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=503) if n < 2 else web.json_response({})

    async with hook_server(flaky) as srv, sender(backoff=0.01) as (s, results):
        s.fire("m", "rollback", [hook(srv.url)], {})
        assert await results.wait(1) == ["delivered"]
    assert len(srv.seen) == 3
    assert srv.seen[0].body == srv.seen[2].body  # a retry sends the same event, same "at"


async def test_429_is_retried() -> None:
    async def limited(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=429) if n == 0 else web.Response(status=204)

    async with hook_server(limited) as srv, sender(backoff=0.01) as (s, results):
        s.fire("m", "rollback", [hook(srv.url)], {})
        assert await results.wait(1) == ["delivered"]
    assert len(srv.seen) == 2


async def test_400_is_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    async def bad(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=400)

    async with hook_server(bad) as srv, sender(backoff=0.01) as (s, results):
        s.fire("m", "rollback", [hook(srv.url)], {"secret_payload": "xyzzy"})
        assert await results.wait(1) == ["failed"]
        await asyncio.sleep(0.05)
    assert len(srv.seen) == 1
    [rec] = [r for r in caplog.records if r.name == "canary.webhooks"]
    assert rec.levelno == logging.WARNING
    assert "HTTP 400" in rec.getMessage() and "attempt 1/5" in rec.getMessage()
    assert "xyzzy" not in rec.getMessage()


async def test_connection_refused_fails_after_max_attempts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"http://127.0.0.1:{unused_port()}/hook"
    async with sender(max_attempts=3, backoff=0.01) as (s, results):
        s.fire("fraud", "promote", [hook(url, ["promote"])], {"reason": "secret-reason"})
        assert await results.wait(1) == ["failed"]
    logs = [r.getMessage() for r in caplog.records if r.name == "canary.webhooks"]
    assert len(logs) == 3
    for i, msg in enumerate(logs, 1):
        assert f"attempt {i}/3" in msg
        assert "fraud" in msg and "promote" in msg and url in msg
        assert "ConnectError" in msg
        assert "secret-reason" not in msg
    assert "giving up" in logs[-1]


async def test_slow_hook_times_out_and_is_retried() -> None:
    release = asyncio.Event()

    async def slow_once(request: web.Request, n: int) -> web.StreamResponse:
        if n == 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), 10)
        return web.json_response({})

    async with hook_server(slow_once, release) as srv, sender(backoff=0.01) as (s, results):
        t0 = time.monotonic()
        s.fire("m", "rollback", [hook(srv.url, timeout="200ms")], {})
        assert await results.wait(1) == ["delivered"]
        elapsed = time.monotonic() - t0
    assert len(srv.seen) == 2
    assert 0.2 <= elapsed < 2.0


async def test_one_slow_hook_does_not_delay_another() -> None:
    release = asyncio.Event()
    async with hook_server(hanging(release), release) as slow, hook_server() as fast:
        async with sender() as (s, results):
            t0 = time.monotonic()
            # the slow hook first, so a serial sender would make the fast one wait 5s
            s.fire("m", "rollback", [hook(slow.url, timeout="5s"), hook(fast.url)], {})
            assert await results.wait(1) == ["delivered"]
            assert len(fast.seen) == 1
            assert fast.seen[0].at - t0 < 0.5
            assert slow.active == 1  # still hanging
            release.set()
            assert await results.wait(2) == ["delivered", "delivered"]


async def test_in_flight_deliveries_are_bounded() -> None:
    release = asyncio.Event()
    async with hook_server(hanging(release), release) as srv:
        async with sender(concurrency=2) as (s, results):
            assert s.fire("m", "rollback", [hook(srv.url, timeout="5s")] * 6, {}) == 6
            await asyncio.sleep(0.2)
            assert srv.active == 2 and s.pending() == 6
            release.set()
            assert await results.wait(6) == ["delivered"] * 6
    assert srv.max_active == 2


async def test_queue_full_drops() -> None:
    results = Results()
    s = WebhookSender(queue_size=2, on_result=results)  # not started: nothing leaves the queue
    hooks = [hook("http://127.0.0.1:1/hook")] * 3
    assert s.fire("m", "rollback", hooks, {}) == 2
    assert results.items == [("m", "dropped")]
    await s.close(timeout=0.1)  # never started: what is still queued is dropped, not lost
    assert results.items == [("m", "dropped")] * 3


async def test_fire_returns_at_once_when_the_hook_hangs() -> None:
    release = asyncio.Event()
    async with hook_server(hanging(release), release) as srv:
        async with sender(queue_size=10_000, close_timeout=0.1) as (s, results):
            hooks = [hook(srv.url, timeout="10s")]
            s.fire("m", "rollback", hooks, {})
            await asyncio.sleep(0.1)  # the first delivery is now waiting on the server
            t0 = time.perf_counter()
            for i in range(1000):
                assert s.fire("m", "rollback", hooks, {"i": i}) == 1
            assert time.perf_counter() - t0 < 0.5
            assert results.items == []


async def test_close_with_a_hanging_hook_returns_within_its_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()
    async with hook_server(hanging(release), release) as srv:
        results = Results()
        s = WebhookSender(on_result=results)
        await s.start()
        s.fire("m", "rollback", [hook(srv.url, timeout="30s")] * 3, {})
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        await s.close(timeout=0.3)
        elapsed = time.monotonic() - t0
        assert 0.3 <= elapsed < 1.0
        assert results.items == [("m", "dropped")] * 3
        assert s.fire("m", "rollback", [hook(srv.url)], {}) == 0  # closed: dropped at once
        assert results.items[-1] == ("m", "dropped")
    assert not [r for r in caplog.records if r.name == "asyncio"]  # no "Task was destroyed"


async def test_close_waits_for_deliveries_in_flight() -> None:
    async def slowish(request: web.Request, n: int) -> web.StreamResponse:
        await asyncio.sleep(0.2)
        return web.json_response({})

    async with hook_server(slowish) as srv:
        results = Results()
        s = WebhookSender(on_result=results)
        await s.start()
        s.fire("m", "rollback", [hook(srv.url)], {})
        await s.close(timeout=5.0)
        assert results.items == [("m", "delivered")]


async def test_a_failing_on_result_callback_does_not_stop_deliveries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []

    def broken(rollout: str, result: str) -> None:
        calls.append(result)
        raise RuntimeError("boom")

    async with hook_server() as srv:
        s = WebhookSender(on_result=broken, concurrency=1)
        await s.start()
        s.fire("m", "rollback", [hook(srv.url)] * 2, {})
        async with asyncio.timeout(5):
            while len(calls) < 2:
                await asyncio.sleep(0.01)
        await s.close()
    assert calls == ["delivered", "delivered"]
    assert "on_result callback failed" in caplog.text


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="max_attempts must be at least 1, got 0"):
        WebhookSender(max_attempts=0)
    with pytest.raises(ValueError, match="backoff"):
        WebhookSender(backoff=-1)
    with pytest.raises(ValueError, match="queue_size"):
        WebhookSender(queue_size=0)
