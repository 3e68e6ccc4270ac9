"""The admin port's live dashboard: ``GET /dashboard`` and its own script and style.

The page is one small HTML document; ``dashboard.js`` and ``dashboard.css`` come from this
package's ``static/`` directory at ``GET /dashboard/static/{file}`` (read once, at start: only
the files found there are served, by exact name, so no path reaches outside it). The script
polls the same JSON API as the CLI (``/api/v1/rollouts``, a rollout's detail, ``history`` and
``distributions``), draws its charts as SVG itself and posts operator commands with the bearer
token the person types in. Nothing comes from any other host: the page's
Content-Security-Policy allows this origin only. The routes are read-only like the rest of the
``GET`` API; the commands go through the API's own checks (token, Origin, JSON).

``GET /api/v1/rollouts/{name}/distributions`` (registered here, next to its only reader) gives
each arm's latency and ttft distribution from the controller's log-bucket histograms.
"""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from canary.controller import Controller
from canary.decision import MANUAL_ACTIONS
from canary.observe.distributions import (
    DISTRIBUTION_BINS,
    DISTRIBUTION_SIGNALS,
    distributions,
)

__all__ = [
    "CONTENT_TYPES",
    "DISTRIBUTION_BINS",
    "DISTRIBUTION_SIGNALS",
    "add_dashboard",
    "distributions",
    "static_files",
]

CONTENT_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}

# The page may load and fetch from this origin only, and be framed by none (clickjacking of
# the operator buttons).
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_COMMON = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # revalidated by ETag: a new canary's files show at once
}

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>canary dashboard</title>
<link rel="icon" href="/dashboard/static/favicon.svg?v={favicon}">
<link rel="stylesheet" href="/dashboard/static/dashboard.css?v={css}">
<script src="/dashboard/static/dashboard.js?v={js}" defer></script>
</head>
<body data-token-required="{token_required}" data-actions="{actions}">
<header class="top">
  <h1><span class="logo" aria-hidden="true">&#9650;</span> canary</h1>
  <p id="conn" class="conn" data-state="connecting" role="status">connecting&hellip;</p>
  <form id="token-form" class="token" autocomplete="off">
    <label for="token">Admin token</label>
    <input id="token" type="password" placeholder="bearer token" spellcheck="false">
    <button type="submit">Use</button>
    <button type="button" id="token-forget">Forget</button>
    <span id="token-state" class="muted"></span>
  </form>
</header>
<div id="errors" class="errors" role="alert" hidden></div>
<main>
  <section aria-labelledby="rollouts-h">
    <h2 id="rollouts-h" class="visually-hidden">Rollouts</h2>
    <table id="rollouts" class="rollouts">
      <thead><tr><th>Rollout</th><th>Phase</th><th>Step</th><th>Candidate weight</th>
      <th>Samples (prod / cand)</th><th>Waiting for</th><th>Last decision</th></tr></thead>
      <tbody><tr><td colspan="7" class="muted">loading&hellip;</td></tr></tbody>
    </table>
  </section>
  <section id="detail" class="detail" hidden></section>
</main>
<noscript>The dashboard needs JavaScript; the same data is at /api/v1/rollouts.</noscript>
</body>
</html>
"""


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


def _etag(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:16]


def static_files() -> dict[str, StaticFile]:
    """Every file of ``canary/admin/static`` with a known type, by name (read now)."""
    out: dict[str, StaticFile] = {}
    folder = resources.files("canary.admin") / "static"
    for entry in folder.iterdir():
        dot = entry.name.rfind(".")
        kind = CONTENT_TYPES.get(entry.name[dot:]) if dot > 0 else None
        if kind is None or not entry.is_file():
            continue
        body = entry.read_bytes()
        out[entry.name] = StaticFile(body, kind, _etag(body))
    return out


def add_dashboard(
    app: web.Application, controller: Controller | None, *, token_required: bool
) -> None:
    """Register ``/dashboard``, ``/dashboard/static/{file}`` and the distributions view."""
    files = static_files()
    versions = {
        "js": files["dashboard.js"].etag,
        "css": files["dashboard.css"].etag,
        "favicon": files["favicon.svg"].etag,
    }
    page = _PAGE.format(
        token_required="true" if token_required else "false",
        actions=html.escape(" ".join((*MANUAL_ACTIONS, "approve"))),  # approve: docs/gates.md
        **versions,
    ).encode()
    page_etag = _etag(page)

    async def dashboard(request: web.Request) -> web.Response:
        return _answer(request, page, "text/html", page_etag, {"Content-Security-Policy": _CSP})

    async def to_dashboard(request: web.Request) -> web.Response:
        raise web.HTTPFound("/dashboard")

    async def static(request: web.Request) -> web.Response:
        found = files.get(request.match_info["file"])
        if found is None:
            return web.json_response({"error": "no such dashboard file"}, status=404)
        return _answer(request, found.body, found.content_type, found.etag, {})

    async def rollout_distributions(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if controller is None or name not in controller.names():
            return web.json_response({"error": f"no rollout named {name!r}"}, status=404)
        return web.json_response({"name": name, "signals": distributions(controller.totals(name))})

    app.router.add_get("/dashboard", dashboard)
    app.router.add_get("/dashboard/", to_dashboard)
    app.router.add_get("/dashboard/static/{file}", static)
    app.router.add_get("/api/v1/rollouts/{name}/distributions", rollout_distributions)


def _answer(
    request: web.Request, body: bytes, kind: str, etag: str, extra: dict[str, str]
) -> web.Response:
    headers = {**_COMMON, **extra, "ETag": f'"{etag}"'}
    if request.headers.get("If-None-Match") == f'"{etag}"':
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type=kind, charset="utf-8", headers=headers)
