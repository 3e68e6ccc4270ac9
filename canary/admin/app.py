"""The admin port: /metrics, /healthz, /readyz and the read side of /api/v1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from canary.metrics import Metrics
from canary.proxy.routing import ARMS
from canary.proxy.server import Proxy

PROXY_KEY = web.AppKey("proxy", Proxy)
METRICS_KEY = web.AppKey("metrics", Metrics)
Readiness = Callable[[], tuple[bool, str]]
READY_KEY: web.AppKey[Readiness] = web.AppKey("ready")


async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS_KEY].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready, reason = request.app[READY_KEY]()
    return web.json_response(
        {"status": "ready" if ready else "not ready", "reason": reason},
        status=200 if ready else 503,
    )


def _rollout_summary(proxy: Proxy, name: str) -> dict[str, Any]:
    route = proxy.routes[name]
    cfg = route.config
    return {
        "name": name,
        "match": {"path_prefix": cfg.match.path_prefix, "host": cfg.match.host},
        "weights": {arm: route.weights.fraction(arm) for arm in ARMS},
        "shadow": route.weights.shadow,
        "endpoints": {arm: list(route.pools[arm].endpoints) for arm in ARMS},
        "healthy_endpoints": {arm: route.pools[arm].healthy_count() for arm in ARMS},
        "steps": len(cfg.steps),
    }


async def list_rollouts(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    return web.json_response({"rollouts": [_rollout_summary(proxy, n) for n in proxy.routes]})


async def get_rollout(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    name = request.match_info["name"]
    if name not in proxy.routes:
        return web.json_response({"error": f"no rollout named {name!r}"}, status=404)
    return web.json_response(_rollout_summary(proxy, name))


def make_admin_app(
    proxy: Proxy, metrics: Metrics, ready: Callable[[], tuple[bool, str]]
) -> web.Application:
    app = web.Application()
    app[PROXY_KEY] = proxy
    app[METRICS_KEY] = metrics
    app[READY_KEY] = ready
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/v1/rollouts", list_rollouts)
    app.router.add_get("/api/v1/rollouts/{name}", get_rollout)
    return app
