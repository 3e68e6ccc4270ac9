"""The data plane: pick an arm, forward, stream the answer back, record one observation.

This is the hot path. Per request it does a route lookup, one arm choice, one upstream call
and O(1) bookkeeping: no locks, no I/O besides the upstream, nothing that grows with history.
The controller changes a rollout's split by replacing its immutable :class:`Weights`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

from canary.config import Config, ProxyConfig, RolloutConfig
from canary.errors import ClientError, UpstreamError
from canary.metrics import Metrics, RolloutCounters, bump
from canary.observe import (
    ArmCost,
    Observation,
    Pricing,
    RateEstimator,
    Recorder,
    ResponseExtractor,
    ResponseInspector,
    Weights,
)
from canary.observe.answers import AnswerRules
from canary.observe.feedback import FeedbackStore, record_ripe, same_json, store_for
from canary.observe.inputs import InputMonitor
from canary.observe.judge import NO_ANSWER, Judge, make_client, retire
from canary.proxy.h1_server import NO_BODY_STATUSES, BadRequestBody, HttpRequest
from canary.proxy.headers import downstream_headers, request_id, upstream_headers
from canary.proxy.openai import (
    ModelError,
    ModelField,
    is_model_path,
    model_json,
)
from canary.proxy.openai import resolve as resolve_model
from canary.proxy.openai import respond as respond_model_error
from canary.proxy.routing import NEEDS_MODEL, ArmChooser, RouteTable
from canary.proxy.upstream import (
    IDEMPOTENT_METHODS,
    RequestBodyTooLarge,
    Timeouts,
    Transport,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamResponse,
    never_sent,
)
from canary.signals import (
    AGREEMENT,
    ARMS,
    CANDIDATE,
    JUDGE,
    NO_ANSWER_CLASS,
    PRODUCTION,
    status_class_labels,
)

__all__ = [
    "RIPE_INTERVAL",
    "Proxy",
    "RolloutRoute",
    "initial_weights",
]

log = logging.getLogger("canary.proxy")

_SMALL_BODY = 64 * 1024  # bodies up to this, of known length, are sent back in one write
_CODE_CLASS = status_class_labels(NO_ANSWER_CLASS)  # "none" (index 0): no answer
_STATUS_FOR_ERROR = {"timeout": 504, "connect": 502, "reset": 502, "protocol": 502}
RIPE_INTERVAL = 1.0  # seconds between two recordings of matured labels (off the hot path)


class _ClientStalled(ClientError):
    """The client stopped sending its request body for longer than ``client_timeout``."""

    status = 408
    kind = "client_timeout"


class _ClientBodyFailed(ClientError):
    """The client's body broke off (it disconnected, or its chunked framing was malformed)."""

    status = 400
    kind = "client_body"


# The rejection counter's label for each way a streamed request body fails.
_REJECTED_AS: dict[type[ClientError], str] = {
    RequestBodyTooLarge: "body_too_large",
    _ClientStalled: "client_timeout",
    _ClientBodyFailed: "bad_request",
}


class _BodyStream:
    """A request body streamed upstream as it arrives, with the size and stall limits enforced.

    The transport may wrap errors raised while it sends a body (aiohttp does), so the reason
    is also kept in ``failure`` for the proxy to answer 413 or 408 instead of 502.
    """

    __slots__ = ("_limit", "_request", "_timeout", "failure")

    def __init__(self, request: HttpRequest, limit: int, timeout: float) -> None:
        self._request = request
        self._limit = limit
        self._timeout = timeout
        self.failure: ClientError | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        total = 0
        while True:
            try:
                async with asyncio.timeout(self._timeout):
                    chunk = await self._request.read_chunk()
            except TimeoutError:
                self.failure = _ClientStalled("client stalled while sending the request body")
                raise self.failure from None
            except (ConnectionError, BadRequestBody) as exc:
                self.failure = _ClientBodyFailed(f"bad request body: {exc}")
                raise self.failure from None
            if not chunk:
                return
            total += len(chunk)
            if total > self._limit:
                self.failure = RequestBodyTooLarge(f"request body exceeds {self._limit} bytes")
                raise self.failure
            yield chunk


MIN_TRAFFIC_SHARE = 0.01  # a share below this is an estimate too noisy to divide by


class _Exchange:
    """One upstream attempt of a request, or one shadow mirror: what its observation says.

    Made once per request (a failover reuses it for production's attempt) and once per
    mirror, it carries what forwarding, streaming back and recording share, instead of a
    dozen positional arguments passed from method to method. Slots only, no methods: one
    small allocation per request, besides the observation it ends in.
    """

    __slots__ = (
        "analysed",
        "arm",
        "cluster",
        "model",
        "propensity",
        "rid",
        "route",
        "sent",
        "shadow",
        "started",
    )

    def __init__(
        self,
        route: RolloutRoute,
        arm: str,
        propensity: float,
        rid: str,
        cluster: int,
        sent: int,
        analysed: bool,
        shadow: bool = False,
        model: ModelField | None = None,
    ) -> None:
        self.route = route
        self.arm = arm
        self.propensity = propensity  # the arm's probability for this request; 1.0 when forced
        self.rid = rid
        self.cluster = cluster
        self.sent = sent  # request body bytes (0 when streamed: they are not counted)
        self.analysed = analysed  # a randomised assignment (not forced, not a failover)
        self.shadow = shadow  # a mirrored copy whose answer nobody sees
        self.started = 0.0  # clock reading when this attempt was sent
        self.model = model  # the body's OpenAI `model` span, when each arm gets its own name


class RolloutRoute:
    """Everything the hot path needs for one rollout, built once per config (re)load."""

    __slots__ = (
        "chooser",
        "config",
        "cost_is_signal",
        "costs",
        "counters",
        "extractor",
        "failover",
        "failover_any_method",
        "feedback",
        "hosts",
        "inputs",
        "is_error_status",
        "judge",
        "model_json",
        "name",
        "pools",
        "rate",
        "rewrites_model",
        "timeouts",
        "weights",
    )

    def __init__(
        self,
        rollout: RolloutConfig,
        counters: RolloutCounters,
        weights: Weights,
        previous: RolloutRoute | None = None,
        proxy: ProxyConfig | None = None,
        inputs: InputMonitor | None = None,
    ) -> None:
        self.name = rollout.name
        self.config = rollout
        self.chooser = ArmChooser(rollout)
        arms = {PRODUCTION: rollout.production, CANDIDATE: rollout.candidate}
        self.pools = {arm: UpstreamPool(cfg.endpoints) for arm, cfg in arms.items()}
        # Each arm's served model name as the JSON string spliced into OpenAI request bodies
        self.model_json = {
            arm: model_json(cfg.model) if cfg.model is not None else None
            for arm, cfg in arms.items()
        }
        self.rewrites_model = any(v is not None for v in self.model_json.values())
        self.hosts = {
            arm: tuple(urlsplit(u).netloc for u in cfg.endpoints) for arm, cfg in arms.items()
        }
        self.extractor = ResponseExtractor(
            rollout.signals(),
            prediction=rollout.prediction,
            cost_tokens=any(
                cfg.cost is not None and cfg.cost.per_1k_tokens > 0 for cfg in arms.values()
            ),
            answers=AnswerRules.from_config(rollout.answers),
            # The judge reads both arms' answer texts (canary/observe/judge.py).
            keep_answer_chars=rollout.judge.max_answer_chars if rollout.judge is not None else 0,
        )
        self.cost_is_signal = "cost" in rollout.signals()
        self.rate = RateEstimator()
        self.costs = {
            arm: ArmCost(
                Pricing(
                    per_request=cfg.cost.per_request,
                    per_1k_tokens=cfg.cost.per_1k_tokens,
                    per_hour=cfg.cost.per_hour,
                    replicas=cfg.cost.replicas,
                    header=cfg.cost.header,
                ),
                self.rate,
            )
            for arm, cfg in arms.items()
            if cfg.cost is not None
        }
        self.weights = weights
        r = rollout.routing
        proxy = proxy if proxy is not None else ProxyConfig()
        self.timeouts = Timeouts(
            total=r.timeout,
            connect=r.connect_timeout,
            read=r.read_timeout,
            max_head=proxy.max_response_header_size,
            max_fields=proxy.max_response_headers,
        )
        errors = frozenset(s for s in range(100, 600) if r.is_error_status(s))
        self.is_error_status = errors.__contains__  # a set lookup per request, not a parse
        self.failover = r.failover
        # Replay on production a request the candidate may have processed, whatever its method
        self.failover_any_method = r.failover_methods == "all"
        self.counters = counters
        # Input health of the request bodies: the recorder's monitor for this rollout (None
        # without `inputs`); the controller ships its snapshots to the analysis.
        self.inputs = inputs
        # Predictions waiting for labels; None when the rollout cannot use feedback. A reload
        # that keeps the arms keeps the waiting entries.
        self.feedback: FeedbackStore | None = store_for(
            rollout, previous.feedback if previous is not None else None
        )
        # Pairwise judging of mirrored pairs; set by Proxy.apply_config (it has the recorder).
        self.judge: Judge | None = None


class Proxy:
    """The proxy port's request handler and the state it reads."""

    def __init__(
        self,
        config: Config,
        transport: Transport,
        recorder: Recorder,
        metrics: Metrics,
        weights: dict[str, Weights] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._transport = transport
        self._recorder = recorder
        self._metrics = metrics
        self._counters = metrics.counters
        self._clock = clock or time.perf_counter
        self._mirrors: set[asyncio.Task[None]] = set()
        self._ripening: asyncio.Task[None] | None = None  # records matured labels
        self._mirror_inflight = 0
        self.routes: dict[str, RolloutRoute] = {}
        self._table = RouteTable([])
        self._proxy_cfg: ProxyConfig = config.proxy
        self.apply_config(config, weights or {})

    # -- control (called by the runtime / controller, never per request) -------------------

    def apply_config(self, config: Config, weights: dict[str, Weights] | None = None) -> None:
        """Swap in a new configuration; rollouts keep their current weights unless given."""
        weights = dict(weights or {})
        routes = {}
        monitors = self._recorder.apply_inputs(config.rollouts)
        for r in config.rollouts:
            w = weights.get(r.name)
            if w is None:
                old = self.routes.get(r.name)
                w = old.weights if old is not None else initial_weights(r)
            routes[r.name] = RolloutRoute(
                r,
                self._counters.rollout(r.name),
                w,
                self.routes.get(r.name),
                config.proxy,
                monitors.get(r.name),
            )
            routes[r.name].judge = self._judge_for(r, self.routes.get(r.name))
            self._export_weights(r.name, w)
        self._proxy_cfg = config.proxy
        kept = {id(route.judge) for route in routes.values() if route.judge is not None}
        for route in self.routes.values():
            if route.judge is not None and id(route.judge) not in kept:
                retire(route.judge)  # its calls in flight are cancelled, its pairs dropped
        self.routes = routes
        self._metrics.inputs = monitors
        self._table = RouteTable([(r.match, r.name) for r in config.rollouts])
        if self._ripening is None and any(r.feedback is not None for r in routes.values()):
            with contextlib.suppress(RuntimeError):  # no loop yet: the next apply starts it
                self._ripening = asyncio.get_running_loop().create_task(
                    self._record_ripe_labels(), name="feedback-maturity"
                )

    def _judge_for(self, rollout: RolloutConfig, old: RolloutRoute | None) -> Judge | None:
        """The rollout's judge: the running one when its ``judge`` section is unchanged."""
        cfg = rollout.judge
        if cfg is None:
            return None
        if (
            old is not None
            and old.judge is not None
            and old.judge.config == cfg
            # new arms (endpoints, model names) start a new rollout: pairs in flight are not
            # its answers
            and old.config.production == rollout.production
            and old.config.candidate == rollout.candidate
        ):
            return old.judge
        name, record = rollout.name, self._recorder.record_value

        def verdict(value: float, cluster: int) -> None:
            # Both arms answered the judged request: the verdict is the candidate's value,
            # with propensity 1 (a shadow pair), in the request's user cluster.
            record(name, CANDIDATE, JUDGE, value, 1.0, cluster)

        return Judge(
            cfg,
            make_client(cfg),
            verdict,
            self._counters.rollout(name).judge,
            max_age=2.0 * rollout.routing.timeout + 10.0,  # longer than any upstream attempt
        )

    async def _record_ripe_labels(self) -> None:
        """Record the labels of answers that matured (``feedback.count_at: maturity``) once
        a second, so they count even while no request or feedback arrives to expire them."""
        while True:
            await asyncio.sleep(RIPE_INTERVAL)
            for route in list(self.routes.values()):
                if route.feedback is not None:
                    try:
                        record_ripe(route.feedback, self._recorder)
                    except Exception:  # never stop the ticker: the next second retries
                        log.exception("recording matured feedback of %s failed", route.name)

    def set_weights(self, name: str, weights: Weights) -> None:
        self.routes[name].weights = weights
        self._export_weights(name, weights)

    def set_traffic_share(self, name: str, share: float) -> None:
        """The fraction of rollout ``name``'s requests this process serves (several processes
        behind one load balancer): its request rate is divided by it, so that ``per_hour``
        costs are amortised over the rollout's total rate."""
        route = self.routes.get(name)
        if route is not None:
            route.rate.share = min(1.0, max(MIN_TRAFFIC_SHARE, share))

    def _export_weights(self, name: str, weights: Weights) -> None:
        for arm in ARMS:
            self._metrics.weight.labels(name, arm).set(weights.fraction(arm))
        self._metrics.shadow_active.labels(name).set(1 if weights.shadow else 0)

    # -- read by the admin API (its RolloutRouting and FeedbackStores protocols) -------------

    def routing(self, rollout: str) -> dict[str, Any] | None:
        """Where ``rollout``'s requests go, as JSON: its match, each arm's endpoints and how
        many of them take connections; None when no such rollout is served."""
        route = self.routes.get(rollout)
        if route is None:
            return None
        match = route.config.match
        shown: dict[str, Any] = {"path_prefix": match.path_prefix, "host": match.host}
        if match.model:
            shown["model"] = match.model
        out: dict[str, Any] = {
            "match": shown,
            "endpoints": {arm: list(route.pools[arm].endpoints) for arm in ARMS},
            "healthy_endpoints": {arm: route.pools[arm].healthy_count() for arm in ARMS},
        }
        if route.judge is not None:  # pairwise judging: counts by result, calls in flight
            out["judge"] = route.judge.status()
        return out

    def input_health(self, rollout: str) -> dict[str, Any] | None:
        """``rollout``'s input-health report as JSON (per-field summaries, drift checks);
        None when it has no ``inputs`` or is not served."""
        route = self.routes.get(rollout)
        if route is None or route.inputs is None:
            return None
        return route.inputs.report().to_dict()

    def feedback_stores(self) -> list[FeedbackStore]:
        """The answers waiting for labels, one store per rollout that takes feedback."""
        return [r.feedback for r in self.routes.values() if r.feedback is not None]

    def feedback_entries(self) -> dict[str, int]:
        """How many answers wait for a label, per rollout that takes feedback."""
        return {n: len(r.feedback) for n, r in self.routes.items() if r.feedback is not None}

    async def close(self) -> None:
        if self._ripening is not None:
            self._ripening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ripening
            self._ripening = None
        for task in list(self._mirrors):
            task.cancel()
        if self._mirrors:
            await asyncio.gather(*self._mirrors, return_exceptions=True)
        for route in self.routes.values():
            if route.judge is not None:
                await route.judge.close()

    # -- the hot path -------------------------------------------------------------------------

    async def handle(self, request: HttpRequest) -> None:
        """Answer one request of the proxy port (:mod:`canary.proxy.h1_server` calls this)."""
        rid = request_id(request.headers.get("X-Request-Id"))
        path = request.path
        # One config for the whole request: a reload while its body is read (OpenAI routing
        # awaits it below) must not leave it a rollout name the new config lacks.
        routes, table = self.routes, self._table
        found = table.lookup(request.host, path)
        route_name = found if isinstance(found, str) else None
        cfg = self._proxy_cfg
        model: ModelField | None = None
        buffered: bytes | None = None
        if found is NEEDS_MODEL or (
            route_name is not None and routes[route_name].rewrites_model and is_model_path(path)
        ):
            # OpenAI routing: the body's `model` picks the rollout or is rewritten per arm
            try:
                route_name, buffered, model = await resolve_model(
                    request,
                    path,
                    route_name,
                    table,
                    lambda name: routes[name].rewrites_model,
                    (cfg.replay_buffer, cfg.max_body_size, cfg.client_timeout),
                )
            except ModelError as exc:
                self._counters.reject(exc.reason)
                return respond_model_error(request, exc, rid)
        if route_name is None:
            self._counters.reject("no_route")
            return request.respond_error(404, "no rollout matches this request", rid)
        route = routes[route_name]

        length = request.content_length
        if length is not None and length > cfg.max_body_size:
            self._counters.reject("body_too_large")
            msg = f"request body exceeds {cfg.max_body_size} bytes"
            return request.respond_error(413, msg, rid)
        body: bytes | _BodyStream | None
        replayable = True
        if buffered is not None:
            body = buffered or None  # read whole above, within replay_buffer
            if not route.rewrites_model:
                model = None  # routed by it (or the rollout has no model): forwarded as is
        elif not request.body_exists:
            body = None
        elif length is not None and length <= cfg.replay_buffer:
            try:
                if request.body_complete():  # it came with the head: no timer needed
                    body = request.take_body()
                else:
                    async with asyncio.timeout(cfg.client_timeout):
                        body = await request.read_body()
            except (TimeoutError, ConnectionError):
                self._counters.reject("client_timeout")
                return request.respond_error(408, "request body was not received in time", rid)
            except BadRequestBody as exc:
                self._counters.reject("bad_request")
                return request.respond_error(400, f"bad request body: {exc}", rid)
        else:
            body = _BodyStream(request, cfg.max_body_size, cfg.client_timeout)
            replayable = False
        sent = 0
        if isinstance(body, bytes):
            sent = len(body)
            if route.inputs is not None:
                route.inputs.observe(body)
        elif route.inputs is not None:
            route.inputs.not_inspected()

        choice = route.chooser.choose(request.headers, route.weights)
        ex = _Exchange(
            route,
            choice.arm,
            choice.propensity,
            rid,
            choice.cluster,
            sent,
            not choice.forced,
            model=model,
        )
        counters = self._counters
        counters.inflight += 1
        try:
            await self._forward(request, ex, body, replayable, choice.mirror)
        finally:
            counters.inflight -= 1

    async def _forward(
        self,
        request: HttpRequest,
        ex: _Exchange,
        body: bytes | _BodyStream | None,
        replayable: bool,
        mirror: bool,
    ) -> None:
        route = ex.route
        if not ex.analysed:
            route.counters.arms[ex.arm].forced += 1
        try:
            if mirror:
                if ex.model is not None:  # the copy carries the candidate's model name
                    body_c: object = ex.model.with_model(route.model_json[CANDIDATE])
                else:
                    body_c = body if replayable else _NOT_REPLAYABLE
                self._start_mirror(request, ex, body_c)
            elif (
                route.judge is not None
                and ex.analysed
                and ex.propensity < 1.0  # a weighted step: not after a rollback or promotion
                and route.judge.wants_live()
            ):
                self._start_twin(request, ex, body if replayable else _NOT_REPLAYABLE)
            ex.started = started = self._clock()
            if route.costs:  # only the amortised per-hour price needs the request rate
                route.rate.tick(started)
            resp, err = await self._send(request, ex, body)
            if (
                ex.arm == CANDIDATE
                and route.failover
                and replayable
                and (err is not None or (resp is not None and route.is_error_status(resp.status)))
                and (
                    # Sent once more only if the candidate provably never got it, or if a
                    # second delivery is harmless (RFC 9110 9.2.2), or the config says so.
                    (err is not None and never_sent(err))
                    or request.method in IDEMPOTENT_METHODS
                    or route.failover_any_method
                )
            ):
                # The user gets production's answer; the candidate's failure still counts.
                status = resp.status if resp is not None else 0
                if resp is not None:
                    resp.close()
                self._failed(ex, status, err.kind if err is not None else "status")
                route.counters.failovers += 1
                ex.arm, ex.analysed = PRODUCTION, False  # a failover is no randomised assignment
                ex.started = self._clock()
                resp, err = await self._send(request, ex, body)

            if err is not None or resp is None:
                if isinstance(err, ClientError):  # the client's streamed body failed: 413/408/400
                    self._counters.reject(_REJECTED_AS.get(type(err), "bad_request"))
                    return request.respond_error(err.status, str(err), ex.rid, ex.arm)
                kind = err.kind if err is not None else "protocol"
                self._failed(ex, 0, kind)
                status = _STATUS_FOR_ERROR.get(kind, 502)
                msg = f"upstream {ex.arm} failed: {kind}"
                return request.respond_error(status, msg, ex.rid, ex.arm)
            await self._stream_back(request, ex, resp)
        except BaseException:
            # Cancelled, or the client went away, before the randomised arm's observation was
            # recorded: count the loss, so an arm that makes users give up shows in the ratio
            # check. (Every path that records the observation returns without raising.)
            if ex.analysed:
                self._recorder.record_lost(route.name, ex.arm, ex.propensity)
            raise

    async def _send(
        self, request: HttpRequest, ex: _Exchange, body: bytes | _BodyStream | None
    ) -> tuple[UpstreamResponse | None, UpstreamError | ClientError | None]:
        route, arm = ex.route, ex.arm
        pool = route.pools[arm]
        if ex.model is not None:  # this arm's model name (a failover: production's)
            body = ex.model.with_model(route.model_json[arm])
        attempts = len(pool.endpoints) if isinstance(body, bytes | None) else 1
        err: UpstreamError | None = None
        client_headers = request.headers.items()
        for _ in range(min(attempts, 2)):
            i = pool.pick()
            headers = upstream_headers(
                client_headers,
                upstream_host=route.hosts[arm][i],
                client_ip=request.remote,
                scheme=request.scheme,
                rid=ex.rid,
            )
            try:
                resp = await self._transport.send(
                    request.method,
                    pool.endpoints[i] + request.raw_path,
                    headers,
                    body,
                    route.timeouts,
                )
                return resp, None
            except UpstreamConnectError as exc:
                pool.mark_down(i)  # nothing reached it: safe to try another endpoint
                err = exc
            except UpstreamError as exc:
                if isinstance(body, _BodyStream) and body.failure is not None:
                    return None, body.failure  # the client's body was at fault, not the upstream
                return None, exc
            except ClientError as exc:  # the streamed body's own failure, raised as it is
                return None, exc
        return None, err

    async def _stream_back(
        self, request: HttpRequest, ex: _Exchange, resp: UpstreamResponse
    ) -> None:
        clock = self._clock
        route, arm, rid = ex.route, ex.arm, ex.rid
        headers, length = downstream_headers(tuple(resp.headers.items()), rid=rid, arm=arm)
        content_type = resp.headers.get("Content-Type", "")
        encoding = resp.headers.get("Content-Encoding", "")
        judge = route.judge
        keep = judge is not None and ex in judge.pending  # a judged pair waits for its text
        if (
            length is not None
            and length <= _SMALL_BODY
            and request.method != "HEAD"
            and resp.status not in NO_BODY_STATUSES
        ):
            # A small body of known length arrives in one piece: answer with one write
            # instead of prepare/write/write_eof. Nothing has reached the client yet, so an
            # upstream failure here can still get a clean 502/504.
            try:
                data = await resp.read()
            except (UpstreamError, ClientError) as exc:  # ClientError: the streamed body's
                resp.close()
                self._failed(ex, resp.status, exc.kind)
                status = _STATUS_FOR_ERROR.get(exc.kind, 502)
                msg = f"upstream {arm} failed: {exc.kind}"
                return request.respond_error(status, msg, rid, arm)
            resp.close()
            latency = clock() - ex.started
            # The answer first: the client does not wait for the bookkeeping below.
            request.respond(resp.status, resp.reason, headers, data)
            inspector = route.extractor.start(content_type, encoding, keep_answer=keep)
            inspector.feed(data)
            failed = "status" if route.is_error_status(resp.status) else None
            self._record(ex, resp.status, failed, latency, latency, len(data), inspector, resp)
            return
        inspector = route.extractor.start(content_type, encoding, keep_answer=keep)
        ttft: float | None = None
        received = 0
        error: str | None = None
        try:
            await request.start(resp.status, resp.reason, headers, length)
            if request.method != "HEAD" and resp.status not in NO_BODY_STATUSES:
                async for chunk in resp.chunks():
                    if ttft is None:
                        ttft = clock() - ex.started
                    received += len(chunk)
                    inspector.feed(chunk)
                    await request.write(chunk)
            await request.finish()
        except (UpstreamError, ClientError) as exc:
            # Headers are out: the only honest signal left is to cut the client's connection.
            error = exc.kind
            request.abort()
        except (ConnectionError, asyncio.CancelledError):
            route.counters.client_disconnects += 1
            raise
        finally:
            resp.close()
        latency = clock() - ex.started
        if error is None and route.is_error_status(resp.status):
            error = "status"
        self._record(ex, resp.status, error, latency, ttft, received, inspector, resp)

    def _failed(self, ex: _Exchange, status: int, kind: str) -> None:
        """Record an upstream attempt that produced no usable response body."""
        self._record(ex, status, kind, self._clock() - ex.started, None, 0, None, None)

    def _record(
        self,
        ex: _Exchange,
        status: int,
        error: str | None,
        latency: float,
        ttft: float | None,
        received: int,
        inspector: ResponseInspector | None,
        resp: UpstreamResponse | None,
    ) -> None:
        """Finish an exchange: the response's signals and price (when a response was read,
        ``inspector`` and ``resp`` given), its observation, its feedback entry, its counters."""
        route, arm, rid = ex.route, ex.arm, ex.rid
        c = route.counters.arms[arm]
        if inspector is not None and resp is not None:
            arm_cost = route.costs.get(arm)
            now = self._clock()
            inspector.finish(resp.headers, latency=latency, ttft=ttft, cost=arm_cost, now=now)
            if arm_cost is not None and error is None:
                if route.cost_is_signal:
                    cost = inspector.signals.get("cost")
                else:
                    cost = arm_cost.cost(now, inspector.total_tokens, resp.headers)
                if cost is not None:
                    c.cost_total += cost
                    c.cost_n += 1
            signals = inspector.signals
            prediction = inspector.prediction
        else:
            signals = {}
            prediction = None
        obs = Observation(
            rollout=route.name,
            arm=arm,
            propensity=ex.propensity,
            shadow=ex.shadow,
            request_id=rid,
            status=status,
            error=error,
            latency=latency,
            ttft=ttft,
            bytes_out=ex.sent,
            bytes_in=received,
            signals=signals,
            prediction=prediction,
            cluster=ex.cluster,
        )
        if ex.analysed:
            self._recorder.record(obs)
            try:
                if route.feedback is not None:  # O(1): keep the answer for a label
                    if error is None:
                        pair = route.feedback.add(
                            rid, arm, ex.propensity, prediction, ex.shadow, ex.cluster
                        )
                        if pair is not None and route.config.prediction is not None:
                            self._agreement(route, prediction, pair[2], ex.cluster)
                    elif ex.shadow and route.config.prediction is not None:
                        bump(route.counters.shadow, "not_compared")  # a failed mirror
                judge = route.judge
                if judge is not None and judge.pending:  # O(1): one answer of a judged pair
                    usable = error is None and inspector is not None
                    text = inspector.answer_text if usable and inspector else None
                    judge.answer(ex, text, failed=error is not None)
            except Exception:
                # Never fail the user's request for side bookkeeping, and never let it count
                # this request a second time as "lost" (the observation is recorded).
                log.exception("shadow/feedback bookkeeping failed for request %s", rid)
        bump(c.requests, _CODE_CLASS[status // 100 if 100 <= status < 600 else 0])
        if error is not None:
            bump(c.errors, error)
        c.latency.observe(latency)
        if ttft is not None:
            c.ttft.observe(ttft)
        c.request_bytes += ex.sent
        c.response_bytes += received

    # -- shadow mirroring ---------------------------------------------------------------------

    def _agreement(
        self, route: RolloutRoute, prediction: object, other: object, cluster: int
    ) -> None:
        """Record whether a mirrored request's two answers (paired by the feedback store,
        which keeps both by request id) predicted the same."""
        if prediction is None or other is None:
            bump(route.counters.shadow, "not_compared")  # an answer without a prediction
            return
        bump(route.counters.shadow, "compared")
        record = self._recorder.record_value
        same = same_json(prediction, other)  # the equality labels are judged by
        record(route.name, CANDIDATE, AGREEMENT, 1.0 if same else 0.0, 1.0, cluster)
        # Production agrees with itself by definition: the rate test compares against 1.
        record(route.name, PRODUCTION, AGREEMENT, 1.0, 1.0, cluster)

    def _start_mirror(self, request: HttpRequest, ex: _Exchange, body: object) -> None:
        route = ex.route
        shadow = route.counters.shadow
        if body is _NOT_REPLAYABLE:
            bump(shadow, "dropped_body")
            return
        if self._mirror_inflight >= self._proxy_cfg.mirror_concurrency:
            bump(shadow, "dropped_busy")
            return
        assert body is None or isinstance(body, bytes)  # _NOT_REPLAYABLE was handled above
        self._mirror_inflight += 1
        # The copy is measured as the candidate's answer with probability 1, never shown.
        mirror = _Exchange(route, CANDIDATE, 1.0, ex.rid, ex.cluster, ex.sent, True, True)
        if route.judge is not None:  # O(1): sample the pair, await its two answers
            route.judge.open(ex, mirror, body or b"", ex.cluster)
        headers = tuple(request.headers.items())
        task = asyncio.get_running_loop().create_task(
            self._mirror(
                mirror,
                request.method,
                request.raw_path,
                headers,
                request.remote,
                request.scheme,
                body,
            )
        )
        self._mirrors.add(task)
        task.add_done_callback(self._mirror_done)

    def _start_twin(self, request: HttpRequest, ex: _Exchange, body: object) -> None:
        """Send a live request sampled by ``judge.live_share`` to the other arm too: the
        twin's answer is for the judge only (never recorded, never shown)."""
        route = ex.route
        judge = route.judge
        assert judge is not None
        if body is _NOT_REPLAYABLE or self._mirror_inflight >= self._proxy_cfg.mirror_concurrency:
            judge.count(NO_ANSWER)  # the pair cannot be made
            return
        assert body is None or isinstance(body, bytes)
        other = CANDIDATE if ex.arm == PRODUCTION else PRODUCTION
        sent = body
        if ex.model is not None:  # the twin carries the other arm's model name
            sent = ex.model.with_model(route.model_json[other])
        twin = _Exchange(route, other, 1.0, ex.rid, ex.cluster, ex.sent, False, True)
        keys = (ex, twin) if other == CANDIDATE else (twin, ex)
        judge.open(*keys, body or b"", ex.cluster, sampled=True)
        self._mirror_inflight += 1
        task = asyncio.get_running_loop().create_task(
            self._twin(
                twin,
                request.method,
                request.raw_path,
                tuple(request.headers.items()),
                request.remote,
                request.scheme,
                sent,
            )
        )
        self._mirrors.add(task)
        task.add_done_callback(self._mirror_done)

    async def _twin(
        self,
        ex: _Exchange,
        method: str,
        raw_path: str,
        client_headers: tuple[tuple[str, str], ...],
        remote: str | None,
        scheme: str,
        body: bytes | None,
    ) -> None:
        """The other arm's answer to a judged live request. Not an observation: it is no
        randomised assignment and no user saw it; it is not in canary_requests either."""
        route, judge = ex.route, ex.route.judge
        text: str | None = None
        failed = True
        resp: UpstreamResponse | None
        try:
            resp = await self._send_copy(ex, method, raw_path, client_headers, remote, scheme, body)
        except UpstreamError:
            resp = None
        if resp is not None:
            inspector = route.extractor.start(
                resp.headers.get("Content-Type", ""), resp.headers.get("Content-Encoding", "")
            )
            ok = not route.is_error_status(resp.status)
            try:
                async for chunk in resp.chunks():
                    inspector.feed(chunk)
            except UpstreamError:
                ok = False
            finally:
                resp.close()
            if ok:
                inspector.finish(resp.headers)
                text, failed = inspector.answer_text, False
        if judge is not None:
            judge.answer(ex, text, failed=failed)

    async def _send_copy(
        self,
        ex: _Exchange,
        method: str,
        raw_path: str,
        client_headers: tuple[tuple[str, str], ...],
        remote: str | None,
        scheme: str,
        body: bytes | None,
    ) -> UpstreamResponse:
        """Send a copy of the user's request (a shadow mirror, a judge's twin) to one
        endpoint of ``ex.arm``, once: no retry, no failover. Raises UpstreamError."""
        route, arm = ex.route, ex.arm
        pool = route.pools[arm]
        i = pool.pick()
        headers = upstream_headers(
            client_headers,
            upstream_host=route.hosts[arm][i],
            client_ip=remote,
            scheme=scheme,
            rid=ex.rid,
        )
        return await self._transport.send(
            method, pool.endpoints[i] + raw_path, headers, body, route.timeouts
        )

    def _mirror_done(self, task: asyncio.Task[None]) -> None:
        self._mirrors.discard(task)
        self._mirror_inflight -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("shadow request failed unexpectedly", exc_info=task.exception())

    async def _mirror(
        self,
        ex: _Exchange,
        method: str,
        raw_path: str,
        client_headers: tuple[tuple[str, str], ...],
        remote: str | None,
        scheme: str,
        body: bytes | None,
    ) -> None:
        clock = self._clock
        route = ex.route
        bump(route.counters.shadow, "sent")
        ex.started = started = clock()
        inspector: ResponseInspector | None = None
        resp: UpstreamResponse | None = None
        ttft = None
        received = 0
        status = 0
        error: str | None = None
        try:
            resp = await self._send_copy(ex, method, raw_path, client_headers, remote, scheme, body)
        except asyncio.CancelledError:
            self._recorder.record_lost(route.name, CANDIDATE, 1.0)
            raise
        except UpstreamError as exc:
            error = exc.kind
            bump(route.counters.shadow, "failed")
        else:
            status = resp.status
            judge = route.judge
            inspector = route.extractor.start(
                resp.headers.get("Content-Type", ""),
                resp.headers.get("Content-Encoding", ""),
                keep_answer=judge is not None and ex in judge.pending,
            )
            try:
                async for chunk in resp.chunks():
                    if ttft is None:
                        ttft = clock() - started
                    received += len(chunk)
                    inspector.feed(chunk)
            except UpstreamError as exc:
                error = exc.kind
            except asyncio.CancelledError:
                self._recorder.record_lost(route.name, CANDIDATE, 1.0)
                raise
            finally:
                resp.close()
            if error is None and route.is_error_status(status):
                error = "status"
        self._record(ex, status, error, clock() - started, ttft, received, inspector, resp)


_NOT_REPLAYABLE = object()


def initial_weights(rollout: RolloutConfig) -> Weights:
    """The split a new rollout starts with: its first step."""
    first = rollout.steps[0]
    return Weights(candidate=first.candidate_weight, shadow=first.is_shadow)
