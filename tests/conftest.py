"""Shared fixtures: fake model servers and a canary runtime on loopback ephemeral ports."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop
import yaml

from canary.config import Config, load_config_text
from canary.runtime import Runtime
from loadtest.fake_model import FakeModelConfig, running_fake_model
from tests.browser_harness import browser  # noqa: F401  (headless Chromium, for the pages)
from tests.redis_harness import redis_server  # noqa: F401  (the fixture, for every test)

FAST = {"latency": "fixed", "latency_median": 0.0005}

# Modules whose async tests also run on uvloop, the loop `canary run` uses: its transports
# are not asyncio's classes and behave differently at the edges (the upstream client found it).
_ALSO_ON_UVLOOP = ("test_h1_server.py", "test_h1_transport.py", "test_proxy_functional.py")


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Callable[[], Any]]:
    if item.path.name in _ALSO_ON_UVLOOP:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@dataclass
class Canary:
    runtime: Runtime
    url: str  # proxy base URL
    admin: str  # admin base URL

    @property
    def proxy(self) -> Any:
        return self.runtime.proxy

    async def samples(self, rollout: str = "m") -> Any:
        """Everything recorded for ``rollout`` so far (flushes the proxy's deltas first)."""
        await self.runtime.controller.flush()
        return self.runtime.controller.totals(rollout)


def rollout_config(
    production: list[str], candidate: list[str], *, name: str = "m", **overrides: Any
) -> dict[str, Any]:
    """A rollout-file dict on loopback ephemeral ports; ``overrides`` replace rollout keys."""
    rollout: dict[str, Any] = {
        "name": name,
        "production": {"endpoints": production},
        "candidate": {"endpoints": candidate},
        "routing": {"override_header": "X-Canary-Arm", "timeout": "5s"},
        "steps": [{"weight": 5}],
    }
    rollout.update(overrides)
    return {
        "proxy": {"listen": "127.0.0.1:0"},
        "admin": {"listen": "127.0.0.1:0"},
        "state": {"backend": "memory"},
        "rollouts": [rollout],
    }


@contextlib.asynccontextmanager
async def running_canary(
    config: Config | dict[str, Any], *, controller: bool = False, path: Any = None
) -> AsyncIterator[Canary]:
    """A canary on loopback; the controller loop runs only with ``controller=True`` (data-plane
    tests keep the weights they configured)."""
    if isinstance(config, dict):
        config = load_config_text(yaml.safe_dump(config))
    runtime = Runtime(config, path, run_controller=controller)
    await runtime.start()
    try:
        yield Canary(
            runtime,
            f"http://127.0.0.1:{runtime.proxy_port}",
            f"http://127.0.0.1:{runtime.admin_port}",
        )
    finally:
        await runtime.stop()


@contextlib.asynccontextmanager
async def fake_pair(
    production: dict[str, Any] | None = None, candidate: dict[str, Any] | None = None
) -> AsyncIterator[tuple[str, str]]:
    p = FakeModelConfig(model="production", **{**FAST, **(production or {})})
    c = FakeModelConfig(model="candidate", seed=1, **{**FAST, **(candidate or {})})
    async with running_fake_model(p) as pu, running_fake_model(c) as cu:
        yield pu, cu


@pytest.fixture
def canary_factory() -> Callable[..., Any]:
    return running_canary
