"""The admin port: /metrics, /healthz, /readyz and /api/v1 (rollouts, operator commands, reload,
feedback).

Mutating calls (every ``POST``: operator commands, reload, feedback) are refused in this
order: 403 when an ``Origin`` header names another origin than the admin API's own (a web page
on another site posting through a browser: CSRF), 401 without ``Authorization: Bearer TOKEN``
when ``admin.token_env`` is set (compared in constant time), 415 unless ``Content-Type`` is
``application/json`` (which a browser cannot send cross-origin without a CORS preflight, and
canary answers no preflight). Request bodies are JSON nested at most ``MAX_JSON_DEPTH`` deep.
Every error is a small JSON object ``{"error": ...}``; nothing an admin client sends can stop
the proxy.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from canary.admin.dashboard import add_dashboard
from canary.admin.views import leader_view, rollout_detail, rollout_history, rollout_summary
from canary.config import AdminConfig
from canary.controller import Controller
from canary.decision import MANUAL_ACTIONS
from canary.errors import CommandRejected, ConfigError, NotLeader, StoreError, UnknownRollout
from canary.metrics import Metrics
from canary.observe import Recorder
from canary.observe.feedback import (
    FeedbackBodyError,
    FeedbackStore,
    join_feedback,
    parse_feedback,
)

__all__ = [
    "MAX_ADMIN_BODY",
    "MAX_JSON_DEPTH",
    "FeedbackStores",
    "Readiness",
    "Reloader",
    "RolloutRouting",
    "json_depth",
    "make_admin_app",
    "warn_if_public",
]

log = logging.getLogger("canary.admin")

Readiness = Callable[[], tuple[bool, str]]
Reloader = Callable[[], Awaitable[list[str]]]  # raises ConfigError when the file is invalid
# A rollout's promql: query status (canary.observe.promql); None where it is not queried.
PromQLStatus = Callable[[str], dict[str, Any] | None]
MAX_ADMIN_BODY = 64 * 1024
MAX_JSON_DEPTH = 64  # arrays and objects inside each other in one request body
# The bytes that matter for nesting: brackets, and quotes and backslashes (strings).
_JSON_TOKEN = re.compile(rb'[\[\]{}"\\]')


class RolloutRouting(Protocol):
    """What the admin API shows of the data plane per rollout, as JSON-ready values.

    The runtime hands the proxy (:class:`canary.proxy.Proxy` implements it); the admin API
    never sees the proxy's per-rollout objects, so either side can change them alone.
    """

    def routing(self, rollout: str) -> dict[str, Any] | None:
        """``{"match", "endpoints", "healthy_endpoints"}``; None when it is not served."""
        ...

    def input_health(self, rollout: str) -> dict[str, Any] | None:
        """The input-health report; None without ``inputs`` (or when it is not served)."""
        ...


class FeedbackStores(Protocol):
    """Where ``POST /api/v1/feedback`` finds the answers its labels are about."""

    def feedback_stores(self) -> list[FeedbackStore]:
        """One store per rollout that takes feedback."""
        ...

    def feedback_entries(self) -> dict[str, int]:
        """Answers waiting for a label, per rollout that takes feedback (for /metrics)."""
        ...


@dataclass
class AdminContext:
    routing: RolloutRouting
    metrics: Metrics
    ready: Readiness
    controller: Controller | None = None
    reload: Reloader | None = None
    token: str | None = None
    feedback: FeedbackStores | None = None  # the stores labels are joined to
    recorder: Recorder | None = None  # where joined feedback goes
    promql: PromQLStatus | None = None  # the last promql: answers, for the rollout detail


CONTEXT = web.AppKey("context", AdminContext)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def warn_if_public(admin: AdminConfig, log_to: logging.Logger = log) -> bool:
    """Log a loud warning when the admin API is served on a non-loopback address without a
    token (``admin.allow_public_without_token: true``); return whether it is."""
    if not admin.public_without_token:
        return False
    host, port = admin.listen
    log_to.warning(
        "\n%s\nWARNING: the admin API listens on %s:%s WITHOUT A TOKEN "
        "(admin.allow_public_without_token: true): anyone who can reach this address can "
        "promote, roll back, pause, reload and post feedback. Set admin.token_env.\n%s",
        "!" * 78,
        host,
        port,
        "!" * 78,
    )
    return True


def json_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in ``raw`` (JSON text; no full parse, no recursion).

    Linear in ``len(raw)`` whatever the text (a regular expression for whole strings
    backtracks quadratically on ``"\\"\\"...``). Unbalanced or invalid text gives some
    number; the parser reports what is wrong with it.
    """
    depth = deepest = 0
    in_string = False
    escaped_at = -1  # the position a backslash in a string escapes
    for match in _JSON_TOKEN.finditer(raw):
        at = match.start()
        if at == escaped_at:
            continue
        token = raw[at]
        if in_string:
            if token == 0x5C:  # backslash: the next byte is escaped
                escaped_at = at + 1
            elif token == 0x22:  # quote
                in_string = False
        elif token == 0x22:
            in_string = True
        elif token in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif token in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def _too_deep(raw: bytes) -> web.Response | None:
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return None  # cannot nest deeper than it has brackets (counted at C speed)
    if json_depth(raw) > MAX_JSON_DEPTH:
        return _error(400, f"request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    return None


def _same_origin(request: web.Request, origin: str) -> bool:
    """Whether ``Origin`` names this server: scheme, host and port as the request reached it."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
        return False
    default = 443 if parts.scheme == "https" else 80
    try:
        own = urlsplit(f"{request.scheme}://{request.host}")
        own_port = own.port
    except ValueError:
        return False
    return (
        parts.scheme == request.scheme
        and parts.hostname == own.hostname
        and (port or default) == (own_port or default)
    )


def _refuse_mutation(request: web.Request) -> web.Response | None:
    """The checks of every mutating call: 403 cross-origin, 401 no token, 415 not JSON."""
    origin = request.headers.get("Origin")
    if origin is not None and not _same_origin(request, origin):
        return _error(
            403,
            f"cross-origin request refused (Origin {origin[:100]!r} is not this admin API's "
            "own); admin calls come from the CLI, scripts or the admin API's own pages",
        )
    if not _authorized(request):
        return _error(401, "a valid bearer token is required for this call")
    if request.content_type != "application/json":
        given = request.headers.get("Content-Type")
        return _error(
            415,
            "this call needs Content-Type: application/json"
            + (f" (got {given[:100]!r})" if given else " (none was sent)")
            + "; with curl: -H 'Content-Type: application/json' -d '{}'",
        )
    return None


async def metrics_handler(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    entries = ctx.metrics.feedback_entries
    entries.clear()  # read at scrape time, so rollouts removed by a reload disappear
    if ctx.feedback is not None:
        for name, n in ctx.feedback.feedback_entries().items():
            entries.labels(name).set(n)
    body = generate_latest(ctx.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready, reason = request.app[CONTEXT].ready()
    return web.json_response(
        {"status": "ready" if ready else "not ready", "reason": reason},
        status=200 if ready else 503,
    )


def _summary(ctx: AdminContext, name: str, detail: bool) -> dict[str, Any]:
    assert ctx.controller is not None
    view = ctx.controller.view(name)
    out = rollout_detail(view) if detail else rollout_summary(view)
    routing = ctx.routing.routing(name)
    if routing is not None:
        out.update(routing)
        if detail:  # input health: per-field summaries, drift checks (None without `inputs`)
            out["inputs"] = ctx.routing.input_health(name)
    if detail and ctx.promql is not None:
        # Per promql: metric, each arm's last answer and why it gave no value (null where
        # this process does not query: no promql metrics, or not the leader).
        out["promql"] = ctx.promql(name)
    return out


async def leader(request: web.Request) -> web.Response:
    """``GET /api/v1/leader``: which process acts on the rollouts (see ``leader_view``)."""
    ctx = request.app[CONTEXT]
    if ctx.controller is None:
        return _error(404, "this admin app has no controller")
    return web.json_response(leader_view(ctx.controller.leadership))


async def list_rollouts(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    if ctx.controller is None:
        return web.json_response({"rollouts": []})
    return web.json_response(
        {"rollouts": [_summary(ctx, n, False) for n in ctx.controller.names()]}
    )


async def get_rollout(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    name = request.match_info["name"]
    if ctx.controller is None or name not in ctx.controller.names():
        return _error(404, f"no rollout named {name!r}")
    return web.json_response(_summary(ctx, name, True))


async def get_history(request: web.Request) -> web.Response:
    """``GET /api/v1/rollouts/{name}/history[?since=UNIX_SECONDS]``: the rollout's metric
    history as the state store keeps it (the same on every process), oldest first."""
    ctx = request.app[CONTEXT]
    name = request.match_info["name"]
    if ctx.controller is None or name not in ctx.controller.names():
        return _error(404, f"no rollout named {name!r}")
    since: float | None = None
    raw = request.query.get("since")
    if raw is not None:
        try:
            since = float(raw)
        except ValueError:
            since = math.nan
        if not math.isfinite(since):
            return _error(400, f"since must be a number of Unix seconds, got {raw[:50]!r}")
    try:
        points = await ctx.controller.history(name, since)
        config = ctx.controller.view(name).config
    except UnknownRollout:  # removed by a reload meanwhile
        return _error(404, f"no rollout named {name!r}")
    except (StoreError, TimeoutError) as exc:
        return _error(503, f"the state store did not answer: {exc or 'timed out'}")
    body = rollout_history(config, points)
    if len(points) <= 50:
        return web.json_response(body)
    # A whole history (hundreds of KB): encoded off the event loop the proxy shares.
    text = await asyncio.to_thread(json.dumps, body)
    return web.Response(text=text, content_type="application/json")


def _authorized(request: web.Request) -> bool:
    token = request.app[CONTEXT].token
    if token is None:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


async def _json_body(request: web.Request) -> dict[str, Any] | web.Response:
    if not request.body_exists:
        return {}
    if request.content_length is not None and request.content_length > MAX_ADMIN_BODY:
        return _error(413, f"request body exceeds {MAX_ADMIN_BODY} bytes")
    raw = await request.content.read(MAX_ADMIN_BODY + 1)
    if len(raw) > MAX_ADMIN_BODY:
        return _error(413, f"request body exceeds {MAX_ADMIN_BODY} bytes")
    if not raw.strip():
        return {}
    too_deep = _too_deep(raw)
    if too_deep is not None:
        return too_deep
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return _error(400, f"request body is not valid JSON: {exc}")
    except RecursionError:  # json_depth bounds nesting; this is a second line of defence
        return _error(400, "request body is nested too deeply")
    if not isinstance(data, dict):
        return _error(400, "request body must be a JSON object")
    return data


async def rollout_action(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    refused = _refuse_mutation(request)
    if refused is not None:
        return refused
    name, action = request.match_info["name"], request.match_info["action"]
    if action not in MANUAL_ACTIONS and action != "approve":  # approve: open a gate
        return _error(
            404,
            f"unknown action {action!r}; expected one of {', '.join(MANUAL_ACTIONS)}, approve",
        )
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        return _error(400, "'reason' must be a string")
    if reason is not None:
        reason = reason.strip()[:500] or None
    if ctx.controller is None:
        return _error(404, f"no rollout named {name!r}")
    try:
        if action == "approve":  # docs/gates.md
            result = await ctx.controller.approve(name, reason)
        else:
            result = await ctx.controller.command(name, action, reason)
    except UnknownRollout:
        return _error(404, f"no rollout named {name!r}")
    except NotLeader as exc:
        if exc.admin_url is None:
            return _error(409, str(exc))
        if FORWARDED in request.headers:  # one hop only: two stale views never ping-pong
            return _error(
                409,
                f"this command was forwarded here as to the leader, but this process does not "
                f"lead (the lease is changing hands); retry: {exc}",
            )
        return await _forward_to_leader(request, exc.admin_url, body)
    except CommandRejected as exc:
        return _error(409, str(exc))
    except (StoreError, TimeoutError) as exc:  # a retry that could not reset the store
        return _error(503, f"rollout {name!r}: {action} not done: {exc or 'store timed out'}")
    log.info("rollout %s: %s by an operator via the admin API", name, action)
    return web.json_response(result)


FORWARD_TIMEOUT = 10.0  # seconds a command forwarded to the leader may take
FORWARDED = "X-Canary-Forwarded"  # on a command a follower forwarded: never forwarded again


async def _forward_to_leader(
    request: web.Request, leader: str, body: dict[str, Any]
) -> web.Response:
    """Send an operator command this follower received to the leader's admin API (with the
    caller's credentials, which this process has already checked) and answer what it answers.
    The leader checks the token and the command again; nothing is decided here."""
    url = f"{leader.rstrip('/')}{request.rel_url.path}"
    headers = {"Content-Type": "application/json", FORWARDED: "1"}
    if "Authorization" in request.headers:
        headers["Authorization"] = request.headers["Authorization"]
    try:
        timeout = aiohttp.ClientTimeout(total=FORWARD_TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(
                url, data=json.dumps(body), headers=headers, allow_redirects=False
            ) as answer,
        ):
            text = await answer.text()
            status = answer.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return _error(
            502,
            f"this canary process does not lead the rollouts and the leader at {leader} "
            f"did not answer the forwarded command: {type(exc).__name__}: {exc}",
        )
    log.info("forwarded %s to the leader at %s: %d", request.rel_url.path, leader, status)
    return web.Response(
        status=status,
        text=text,
        content_type="application/json",
        headers={"X-Canary-Leader": leader},
    )


async def reload_handler(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    refused = _refuse_mutation(request)
    if refused is not None:
        return refused
    body = await _json_body(request)  # none is needed; a bad one is still an error
    if isinstance(body, web.Response):
        return body
    if ctx.reload is None:
        return _error(409, "canary was not started from a file; there is nothing to reload")
    try:
        names = await ctx.reload()
    except ConfigError as exc:
        return _error(
            400,
            f"configuration rejected, the running one stays: {len(exc.issues)} error(s)",
            issues=[{"path": i.path, "message": i.message, "line": i.line} for i in exc.issues],
        )
    return web.json_response({"reloaded": True, "rollouts": names})


async def feedback_handler(request: web.Request) -> web.Response:
    """Join delayed labels to the answers they are about; 200 with counts per result.

    Invalid items are listed (``{"index", "error"}``) and counted, the rest still count: only
    a body that is not JSON or not an object/array (400) or too large (413) is refused.
    """
    ctx = request.app[CONTEXT]
    refused = _refuse_mutation(request)
    if refused is not None:
        return refused
    if ctx.recorder is None or ctx.feedback is None:
        return _error(409, "this admin app has no recorder to record feedback into")
    if request.content_length is not None and request.content_length > MAX_ADMIN_BODY:
        return _error(413, f"request body exceeds {MAX_ADMIN_BODY} bytes; send smaller batches")
    try:
        raw = await request.content.read(MAX_ADMIN_BODY + 1)
    except ConnectionError:  # the client gave up while sending: nobody is left to answer
        return _error(400, "the request body was cut off")
    if len(raw) > MAX_ADMIN_BODY:
        return _error(413, f"request body exceeds {MAX_ADMIN_BODY} bytes; send smaller batches")
    too_deep = _too_deep(raw)
    if too_deep is not None:
        return too_deep
    try:
        parsed = parse_feedback(raw)
    except FeedbackBodyError as exc:
        return _error(exc.status, str(exc))
    sharing = ctx.controller.feedback_sharing if ctx.controller is not None else None
    if sharing is None:
        report = join_feedback(parsed, ctx.feedback.feedback_stores(), ctx.recorder)
    else:  # shared mode: claimed through the store, so any process's answers join
        try:
            report = await sharing.join(parsed, ctx.feedback.feedback_stores(), ctx.recorder)
        except (StoreError, TimeoutError) as exc:
            return _error(
                503,
                "the state store shared with the other canary processes did not answer, so "
                f"no label of this body was counted: send it again ({exc or 'timed out'})",
            )
    for (rollout, result), n in report.counts.items():
        ctx.metrics.feedback.labels(rollout, result).inc(n)
    return web.json_response(report.to_json())


def make_admin_app(
    routing: RolloutRouting,
    metrics: Metrics,
    ready: Readiness,
    *,
    controller: Controller | None = None,
    reload: Reloader | None = None,
    token: str | None = None,
    feedback: FeedbackStores | None = None,
    recorder: Recorder | None = None,
    promql: PromQLStatus | None = None,
) -> web.Application:
    """The admin app; ``feedback`` and ``recorder`` together enable ``POST /api/v1/feedback``."""
    app = web.Application(client_max_size=MAX_ADMIN_BODY)
    app[CONTEXT] = AdminContext(
        routing, metrics, ready, controller, reload, token, feedback=feedback, recorder=recorder
    )
    app[CONTEXT].promql = promql
    if controller is not None and feedback is not None:  # shared mode: flushes write answers
        controller.share_feedback(feedback.feedback_stores)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/v1/leader", leader)
    app.router.add_get("/api/v1/rollouts", list_rollouts)
    app.router.add_get("/api/v1/rollouts/{name}", get_rollout)
    app.router.add_get("/api/v1/rollouts/{name}/history", get_history)
    app.router.add_post("/api/v1/rollouts/{name}/{action}", rollout_action)
    app.router.add_post("/api/v1/reload", reload_handler)
    app.router.add_post("/api/v1/feedback", feedback_handler)
    add_dashboard(app, controller, token_required=token is not None)  # /dashboard, its files
    return app
