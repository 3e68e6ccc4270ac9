"""Runtime's start and stop: each part stops once, in the order that loses nothing, and a start
that fails stops exactly what it had started, in reverse."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import yaml
from aiohttp import web

from canary.admin.app import CONTEXT
from canary.config import load_config_text
from canary.proxy import HttpServer
from canary.runtime import Runtime
from tests.conftest import rollout_config

# A clean stop: scrapers, then the controller (its loop, a flush), the proxy port's drain, the
# proxy's background work and connections, the flush of what the drained requests recorded,
# the admin app, webhooks, the store.
FULL_STOP = [
    "resources.close",
    "controller.stop",
    "controller.flush",
    "proxy_server.close",
    "proxy.close",
    "transport.close",
    "controller.flush",
    "admin.cleanup",
    "webhooks.close",
    "store.close",
]


def _runtime(**proxy: Any) -> Runtime:
    cfg = rollout_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"])
    cfg["proxy"].update(proxy)
    return Runtime(load_config_text(yaml.safe_dump(cfg)), run_controller=False)


def _record(
    calls: list[str], name: str, method: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    async def recorded(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return await method(*args, **kwargs)

    return recorded


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the stop of the parts made inside start() (the proxy port and the admin app)."""
    seen: list[str] = []
    close, cleanup = HttpServer.close, web.AppRunner.cleanup

    async def server_close(self: HttpServer, grace: float = 30.0) -> None:
        seen.append("proxy_server.close")
        await close(self, grace)

    async def runner_cleanup(self: web.AppRunner) -> None:
        if CONTEXT in self.app:
            seen.append("admin.cleanup")
        await cleanup(self)

    monkeypatch.setattr(HttpServer, "close", server_close)
    monkeypatch.setattr(web.AppRunner, "cleanup", runner_cleanup)
    return seen


def _watch(rt: Runtime, calls: list[str]) -> None:
    """Record the stop of the parts the runtime made in __init__."""
    parts = {
        "resources": rt.resources,
        "controller": rt.controller,
        "proxy": rt.proxy,
        "transport": rt.transport,
        "webhooks": rt.webhooks,
        "store": rt.store,
    }
    for part, obj in parts.items():
        for method in ("close", "stop", "flush"):
            if hasattr(obj, method) and not (part == "store" and method != "close"):
                setattr(obj, method, _record(calls, f"{part}.{method}", getattr(obj, method)))


async def test_stop_stops_every_part_once_in_order(calls: list[str]) -> None:
    rt = _runtime()
    _watch(rt, calls)
    await rt.start()
    assert calls == [] and rt.readiness() == (True, "serving")
    await rt.stop()
    assert calls == FULL_STOP
    assert rt.readiness() == (False, "starting")
    await rt.stop()  # a second stop has nothing left to stop
    assert calls == FULL_STOP


async def test_a_failed_start_stops_what_started_in_reverse(calls: list[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        rt = _runtime(listen=f"127.0.0.1:{taken.getsockname()[1]}")
        _watch(rt, calls)
        with pytest.raises(OSError):
            await rt.start()
    # The proxy port never listened: no drain, no controller to stop, no last flush.
    assert calls == ["admin.cleanup", "webhooks.close", "store.close", "proxy.close",
                     "transport.close"]  # fmt: skip
    assert rt._analysis_pool is None  # shut down


async def test_a_store_that_cannot_open_stops_only_the_proxy(
    calls: list[str], tmp_path: Any
) -> None:
    cfg = rollout_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"])
    cfg["state"] = {"backend": "sqlite", "path": str(tmp_path / "missing" / "state.db")}
    rt = Runtime(load_config_text(yaml.safe_dump(cfg)))
    _watch(rt, calls)
    with pytest.raises(Exception, match="missing"):
        await rt.start()
    assert calls == ["proxy.close", "transport.close"]
    assert rt._analysis_pool is None


async def test_a_runtime_never_started_still_stops_what_it_made(calls: list[str]) -> None:
    cfg = rollout_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"])
    rt = Runtime(load_config_text(yaml.safe_dump(cfg)))  # with an analysis pool
    _watch(rt, calls)
    assert rt._analysis_pool is not None
    await rt.stop()
    assert calls == ["proxy.close", "transport.close"]
    assert rt._analysis_pool is None  # shut down, not left running
    await rt.stop()
    assert calls == ["proxy.close", "transport.close"]
