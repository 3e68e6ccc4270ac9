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
from canary.errors import UpstreamError
from canary.metrics import Metrics, RolloutCounters, bump
from canary.observe import (
    NO_CLUSTER,
    ArmCost,
    Observation,
    Pricing,
    RateEstimator,
    Recorder,
    ResponseExtractor,
    ResponseInspector,
    Weights,
)
from canary.observe.feedback import FeedbackStore, record_ripe, same_json, store_for
from canary.observe.inputs import InputMonitor
from canary.proxy.h1_server import NO_BODY_STATUSES, BadRequestBody, HttpRequest
from canary.proxy.headers import downstream_headers, request_id, upstream_headers
from canary.proxy.routing import ARMS, CANDIDATE, PRODUCTION, ArmChooser, RouteTable
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

log = logging.getLogger("canary.proxy")

_SMALL_BODY = 64 * 1024  # bodies up to this, of known length, are sent back in one write
_CODE_CLASS = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
_STATUS_FOR_ERROR = {"timeout": 504, "connect": 502, "reset": 502, "protocol": 502}
RIPE_INTERVAL = 1.0  # seconds between two recordings of matured labels (off the hot path)


class _ClientStalled(UpstreamError):
    """The client stopped sending its request body for longer than ``client_timeout``."""

    kind = "client_timeout"


class _ClientBodyFailed(UpstreamError):
    """The client's body broke off (it disconnected, or its chunked framing was malformed)."""

    kind = "client_body"


class _BodyStream:
    """A request body streamed upstream as it arrives, with the size and stall limits enforced.

    The transport wraps errors raised while it sends a body, so the reason is also kept in
    ``failure`` for the proxy to answer 413 or 408 instead of 502.
    """

    __slots__ = ("_limit", "_request", "_timeout", "failure")

    def __init__(self, request: HttpRequest, limit: int, timeout: float) -> None:
        self._request = request
        self._limit = limit
        self._timeout = timeout
        self.failure: UpstreamError | None = None

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
        "name",
        "pools",
        "rate",
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
    ) -> None:
        self.name = rollout.name
        self.config = rollout
        self.chooser = ArmChooser(rollout)
        arms = {PRODUCTION: rollout.production, CANDIDATE: rollout.candidate}
        self.pools = {arm: UpstreamPool(cfg.endpoints) for arm, cfg in arms.items()}
        self.hosts = {
            arm: tuple(urlsplit(u).netloc for u in cfg.endpoints) for arm, cfg in arms.items()
        }
        self.extractor = ResponseExtractor(
            rollout.signals(),
            prediction=rollout.prediction,
            cost_tokens=any(
                cfg.cost is not None and cfg.cost.per_1k_tokens > 0 for cfg in arms.values()
            ),
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
        # Input health of the request bodies (per process, in memory); None without `inputs`.
        # A reload that leaves `inputs` unchanged keeps the learned baseline and the counts.
        self.inputs: InputMonitor | None = None
        if rollout.inputs is not None:
            old = previous.inputs if previous is not None else None
            keep = old is not None and old.config == rollout.inputs
            self.inputs = old if keep else InputMonitor(rollout.name, rollout.inputs)
        # Predictions waiting for labels; None when the rollout cannot use feedback. A reload
        # that keeps the arms keeps the waiting entries.
        self.feedback: FeedbackStore | None = store_for(
            rollout, previous.feedback if previous is not None else None
        )


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
        for r in config.rollouts:
            w = weights.get(r.name)
            if w is None:
                old = self.routes.get(r.name)
                w = old.weights if old is not None else initial_weights(r)
            routes[r.name] = RolloutRoute(
                r, self._counters.rollout(r.name), w, self.routes.get(r.name), config.proxy
            )
            self._export_weights(r.name, w)
        self._proxy_cfg = config.proxy
        self.routes = routes
        self._metrics.inputs = {n: rt.inputs for n, rt in routes.items() if rt.inputs is not None}
        self._table = RouteTable([(r.match, r.name) for r in config.rollouts])
        if self._ripening is None and any(r.feedback is not None for r in routes.values()):
            with contextlib.suppress(RuntimeError):  # no loop yet: the next apply starts it
                self._ripening = asyncio.get_running_loop().create_task(
                    self._record_ripe_labels(), name="feedback-maturity"
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

    def _export_weights(self, name: str, weights: Weights) -> None:
        for arm in ARMS:
            self._metrics.weight.labels(name, arm).set(weights.fraction(arm))
        self._metrics.shadow_active.labels(name).set(1 if weights.shadow else 0)

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

    # -- the hot path -------------------------------------------------------------------------

    async def handle(self, request: HttpRequest) -> None:
        """Answer one request of the proxy port (:mod:`canary.proxy.h1_server` calls this)."""
        rid = request_id(request.headers.get("X-Request-Id"))
        route_name = self._table.lookup(request.host, request.path)
        if route_name is None:
            self._counters.reject("no_route")
            return request.respond_error(404, "no rollout matches this request", rid)
        route = self.routes[route_name]
        cfg = self._proxy_cfg

        length = request.content_length
        if length is not None and length > cfg.max_body_size:
            self._counters.reject("body_too_large")
            msg = f"request body exceeds {cfg.max_body_size} bytes"
            return request.respond_error(413, msg, rid)
        body: bytes | _BodyStream | None
        replayable = True
        if not request.body_exists:
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
        if route.inputs is not None:
            if isinstance(body, bytes):
                route.inputs.observe(body)
            else:
                route.inputs.not_inspected()

        choice = route.chooser.choose(request.headers, route.weights)
        counters = self._counters
        counters.inflight += 1
        try:
            await self._forward(
                request,
                route,
                choice.arm,
                choice.propensity,
                choice.forced,
                choice.mirror,
                body,
                replayable,
                rid,
                choice.cluster,
            )
        finally:
            counters.inflight -= 1

    async def _forward(
        self,
        request: HttpRequest,
        route: RolloutRoute,
        arm: str,
        propensity: float,
        forced: bool,
        mirror: bool,
        body: bytes | _BodyStream | None,
        replayable: bool,
        rid: str,
        cluster: int = NO_CLUSTER,
    ) -> None:
        clock = self._clock
        analysed = not forced
        if forced:
            route.counters.arms[arm].forced += 1
        try:
            if mirror:
                mirrored = body if replayable else _NOT_REPLAYABLE
                self._start_mirror(request, route, mirrored, rid, cluster)
            started = clock()
            if route.costs:  # only the amortised per-hour price needs the request rate
                route.rate.tick(started)
            resp, err = await self._send(request, route, arm, body, rid)
            if (
                arm == CANDIDATE
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
                kind = err.kind if err is not None else "status"
                self._record_failure(
                    route, arm, propensity, rid, status, kind, started, body, analysed, cluster
                )
                route.counters.failovers += 1
                arm, analysed = PRODUCTION, False  # a failover is not a randomised assignment
                started = clock()
                resp, err = await self._send(request, route, arm, body, rid)

            if err is not None or resp is None:
                kind = err.kind if err is not None else "protocol"
                if isinstance(err, RequestBodyTooLarge):
                    self._counters.reject("body_too_large")
                    return request.respond_error(413, str(err), rid, arm)
                if isinstance(err, _ClientStalled):
                    self._counters.reject("client_timeout")
                    return request.respond_error(408, str(err), rid, arm)
                if isinstance(err, _ClientBodyFailed):
                    self._counters.reject("bad_request")
                    return request.respond_error(400, str(err), rid, arm)
                self._record_failure(
                    route, arm, propensity, rid, 0, kind, started, body, analysed, cluster
                )
                status = _STATUS_FOR_ERROR.get(kind, 502)
                return request.respond_error(status, f"upstream {arm} failed: {kind}", rid, arm)
            await self._stream_back(
                request, route, arm, propensity, resp, started, body, rid, analysed, cluster
            )
        except BaseException:
            # Cancelled, or the client went away, before the randomised arm's observation was
            # recorded: count the loss, so an arm that makes users give up shows in the ratio
            # check. (Every path that records the observation returns without raising.)
            if analysed:
                self._recorder.record_lost(route.name, arm, propensity)
            raise

    async def _send(
        self,
        request: HttpRequest,
        route: RolloutRoute,
        arm: str,
        body: bytes | _BodyStream | None,
        rid: str,
    ) -> tuple[UpstreamResponse | None, UpstreamError | None]:
        pool = route.pools[arm]
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
                rid=rid,
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
        return None, err

    async def _stream_back(
        self,
        request: HttpRequest,
        route: RolloutRoute,
        arm: str,
        propensity: float,
        resp: UpstreamResponse,
        started: float,
        body: bytes | _BodyStream | None,
        rid: str,
        analysed: bool,
        cluster: int = NO_CLUSTER,
    ) -> None:
        clock = self._clock
        headers, length = downstream_headers(tuple(resp.headers.items()), rid=rid, arm=arm)
        content_type = resp.headers.get("Content-Type", "")
        encoding = resp.headers.get("Content-Encoding", "")
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
            except UpstreamError as exc:
                resp.close()
                self._record_failure(
                    route, arm, propensity, rid, resp.status, exc.kind, started, body, analysed,
                    cluster,
                )  # fmt: skip
                status = _STATUS_FOR_ERROR.get(exc.kind, 502)
                msg = f"upstream {arm} failed: {exc.kind}"
                return request.respond_error(status, msg, rid, arm)
            resp.close()
            latency = clock() - started
            # The answer first: the client does not wait for the bookkeeping below.
            request.respond(resp.status, resp.reason, headers, data)
            inspector = route.extractor.start(content_type, encoding)
            inspector.feed(data)
            failed = "status" if route.is_error_status(resp.status) else None
            self._finish(route, arm, inspector, resp.headers, latency, latency, failed)
            self._record(route, arm, propensity, False, rid, resp.status, failed, latency,
                         latency, len(data), body, inspector, analysed, cluster)  # fmt: skip
            return
        inspector = route.extractor.start(content_type, encoding)
        ttft: float | None = None
        received = 0
        error: str | None = None
        try:
            await request.start(resp.status, resp.reason, headers, length)
            if request.method != "HEAD" and resp.status not in NO_BODY_STATUSES:
                async for chunk in resp.chunks():
                    if ttft is None:
                        ttft = clock() - started
                    received += len(chunk)
                    inspector.feed(chunk)
                    await request.write(chunk)
            await request.finish()
        except UpstreamError as exc:
            # Headers are out: the only honest signal left is to cut the client's connection.
            error = exc.kind
            request.abort()
        except (ConnectionError, asyncio.CancelledError):
            route.counters.client_disconnects += 1
            raise
        finally:
            resp.close()
        latency = clock() - started
        if error is None and route.is_error_status(resp.status):
            error = "status"
        self._finish(route, arm, inspector, resp.headers, latency, ttft, error)
        self._record(
            route,
            arm,
            propensity,
            False,
            rid,
            resp.status,
            error,
            latency,
            ttft,
            received,
            body,
            inspector,
            analysed,
            cluster,
        )

    def _record(
        self,
        route: RolloutRoute,
        arm: str,
        propensity: float,
        shadow: bool,
        rid: str,
        status: int,
        error: str | None,
        latency: float,
        ttft: float | None,
        received: int,
        body: object,
        inspector: Any,
        analysed: bool,
        cluster: int = NO_CLUSTER,
    ) -> None:
        sent = len(body) if isinstance(body, bytes) else 0
        signals: dict[str, float] = inspector.signals if inspector is not None else {}
        prediction = inspector.prediction if inspector is not None else None
        obs = Observation(
            rollout=route.name,
            arm=arm,
            propensity=propensity,
            shadow=shadow,
            request_id=rid,
            status=status,
            error=error,
            latency=latency,
            ttft=ttft,
            bytes_out=sent,
            bytes_in=received,
            signals=signals,
            prediction=prediction,
            cluster=cluster,
        )
        if analysed:
            self._recorder.record(obs)
            try:
                if route.feedback is not None:  # O(1): keep the answer for a label
                    if error is None:
                        pair = route.feedback.add(rid, arm, propensity, prediction, shadow, cluster)
                        if pair is not None and route.config.prediction is not None:
                            self._agreement(route, prediction, pair[2], cluster)
                    elif shadow and route.config.prediction is not None:
                        bump(route.counters.shadow, "not_compared")  # a failed mirror
            except Exception:
                # Never fail the user's request for side bookkeeping, and never let it count
                # this request a second time as "lost" (the observation is recorded).
                log.exception("shadow/feedback bookkeeping failed for request %s", rid)
        c = route.counters.arms[arm]
        bump(c.requests, _CODE_CLASS[status // 100] if 100 <= status < 600 else "none")
        if error is not None:
            bump(c.errors, error)
        c.latency.observe(latency)
        if ttft is not None:
            c.ttft.observe(ttft)
        c.request_bytes += sent
        c.response_bytes += received

    def _record_failure(
        self,
        route: RolloutRoute,
        arm: str,
        propensity: float,
        rid: str,
        status: int,
        kind: str,
        started: float,
        body: object,
        analysed: bool,
        cluster: int = NO_CLUSTER,
    ) -> None:
        """Record an upstream attempt that produced no usable response body."""
        self._record(route, arm, propensity, False, rid, status, kind, self._clock() - started,
                     None, 0, body, None, analysed, cluster)  # fmt: skip

    def _finish(
        self,
        route: RolloutRoute,
        arm: str,
        inspector: ResponseInspector,
        headers: Any,
        latency: float,
        ttft: float | None,
        error: str | None,
    ) -> None:
        """Compute the response's signals; price it when its arm has a pricing."""
        arm_cost = route.costs.get(arm)
        now = self._clock()
        inspector.finish(headers, latency=latency, ttft=ttft, cost=arm_cost, now=now)
        if arm_cost is None or error is not None:
            return
        if route.cost_is_signal:
            cost = inspector.signals.get("cost")
        else:
            cost = arm_cost.cost(now, inspector.total_tokens, headers)
        if cost is not None:
            c = route.counters.arms[arm]
            c.cost_total += cost
            c.cost_n += 1

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
        record(route.name, CANDIDATE, "agreement", 1.0 if same else 0.0, 1.0, cluster)
        # Production agrees with itself by definition: the rate test compares against 1.
        record(route.name, PRODUCTION, "agreement", 1.0, 1.0, cluster)

    def _start_mirror(
        self, request: HttpRequest, route: RolloutRoute, body: object, rid: str, cluster: int
    ) -> None:
        shadow = route.counters.shadow
        if body is _NOT_REPLAYABLE:
            bump(shadow, "dropped_body")
            return
        if self._mirror_inflight >= self._proxy_cfg.mirror_concurrency:
            bump(shadow, "dropped_busy")
            return
        assert body is None or isinstance(body, bytes)  # _NOT_REPLAYABLE was handled above
        self._mirror_inflight += 1
        headers = tuple(request.headers.items())
        task = asyncio.get_running_loop().create_task(
            self._mirror(
                route,
                request.method,
                request.raw_path,
                headers,
                request.remote,
                request.scheme,
                body,
                rid,
                cluster,
            )
        )
        self._mirrors.add(task)
        task.add_done_callback(self._mirror_done)

    def _mirror_done(self, task: asyncio.Task[None]) -> None:
        self._mirrors.discard(task)
        self._mirror_inflight -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("shadow request failed unexpectedly", exc_info=task.exception())

    async def _mirror(
        self,
        route: RolloutRoute,
        method: str,
        raw_path: str,
        client_headers: tuple[tuple[str, str], ...],
        remote: str | None,
        scheme: str,
        body: bytes | None,
        rid: str,
        cluster: int,
    ) -> None:
        clock = self._clock
        pool = route.pools[CANDIDATE]
        i = pool.pick()
        headers = upstream_headers(
            client_headers,
            upstream_host=route.hosts[CANDIDATE][i],
            client_ip=remote,
            scheme=scheme,
            rid=rid,
        )
        bump(route.counters.shadow, "sent")
        started = clock()
        inspector: ResponseInspector | None = None
        ttft = None
        received = 0
        status = 0
        error: str | None = None
        try:
            resp = await self._transport.send(
                method, pool.endpoints[i] + raw_path, headers, body, route.timeouts
            )
        except asyncio.CancelledError:
            self._recorder.record_lost(route.name, CANDIDATE, 1.0)
            raise
        except UpstreamError as exc:
            error = exc.kind
            bump(route.counters.shadow, "failed")
        else:
            status = resp.status
            inspector = route.extractor.start(
                resp.headers.get("Content-Type", ""), resp.headers.get("Content-Encoding", "")
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
            latency = clock() - started
            self._finish(route, CANDIDATE, inspector, resp.headers, latency, ttft, error)
        self._record(
            route,
            CANDIDATE,
            1.0,
            True,
            rid,
            status,
            error,
            clock() - started,
            ttft,
            received,
            body,
            inspector,
            True,
            cluster,
        )


_NOT_REPLAYABLE = object()


def initial_weights(rollout: RolloutConfig) -> Weights:
    """The split a new rollout starts with: its first step."""
    first = rollout.steps[0]
    return Weights(candidate=first.candidate_weight, shadow=first.is_shadow)
