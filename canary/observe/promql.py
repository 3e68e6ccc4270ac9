"""``promql:`` signals: ask a Prometheus server for each arm's value, both at the same instant.

A rollout with ``promql:`` metrics gets one :class:`PromQLEvaluator` (a background task on the
leader, never on the proxy's request path). Every ``analysis.prometheus.every`` seconds it
runs each signal's query once per arm through ``/api/v1/query`` with the same ``time=`` for
both arms, after expanding ``{{arm}}``, ``{{endpoints}}`` and ``{{window}}``
(:func:`canary.signals.expand_promql`). A window with a finite value on both arms is recorded
by :class:`canary.observe.resources.PairedWindows`, the same code that records ``resource:``
windows, so the analysis compares it with the same paired test.

Each answer must be one number: a scalar or an instant vector of exactly one series. The
query says how series combine (``avg``, ``sum``, ``max``...): summing whatever came back would
silently turn an average into a total that grows with the number of pods or GPUs, so more
than one series is refused (``many_series``) rather than guessed at. Every other way a query
can fail (HTTP or connection error, a timeout, Prometheus' ``status: error``, no series,
NaN or ±Inf) is counted in ``canary_promql_queries_total{result}``, kept for the rollout's
status (:meth:`PromQLEvaluator.status`) and drops that window: it never becomes a verdict.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from canary.config import PrometheusConfig, RolloutConfig
from canary.errors import CanaryError
from canary.observe.accumulators import Recorder
from canary.observe.resources import (
    Incrementable,
    MetricFamily,
    PairedWindows,
    PerRollout,
    Settable,
    WindowMetric,
    WindowPoller,
    window_metrics,
)
from canary.signals import (
    ARMS,
    CANDIDATE,
    PRODUCTION,
    expand_promql,
    is_promql,
    promql_duration,
    promql_query_name,
)

__all__ = [
    "MAX_ANSWER_BYTES",
    "RESULTS",
    "PromQLEvaluator",
    "PromQLEvaluators",
    "PromQLMetrics",
    "QueryResult",
    "parse_answer",
    "promql_metrics",
]

log = logging.getLogger("canary.promql")

MAX_ANSWER_BYTES = 1024 * 1024
"""A larger answer is refused unread (it is many series, not one number)."""
RESULTS = ("ok", "error", "timeout", "bad_query", "empty", "many_series", "not_finite")
"""Values of the ``result`` label of ``canary_promql_queries_total``."""
_SHOWN_SERIES = 3  # label sets quoted when a query returns several series


class PromQLMetrics(Protocol):
    """The evaluators' own metrics (:class:`canary.metrics.Metrics` is one)."""

    @property
    def promql_queries(
        self,
    ) -> MetricFamily[Incrementable]: ...  # labels: rollout, arm, metric, result
    @property
    def promql_windows(self) -> MetricFamily[Incrementable]: ...  # labels: rollout, metric, outcome
    @property
    def promql_value(self) -> MetricFamily[Settable]: ...  # labels: rollout, arm, metric


@dataclass(frozen=True, slots=True)
class QueryResult:
    """One arm's answer to one query: ``result`` is one of :data:`RESULTS`; ``value`` is set
    for ``ok`` (and for ``not_finite``, the NaN or infinity); ``message`` says why not."""

    result: str
    value: float | None = None
    message: str = ""


def parse_answer(status: int, body: bytes) -> QueryResult:
    """Read a ``/api/v1/query`` answer (HTTP ``status``, raw ``body``) as one number."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        return QueryResult("error", message=f"HTTP {status}, not a Prometheus API answer")
    if answer.get("status") != "success":
        kind = str(answer.get("errorType", ""))
        text = str(answer.get("error", "")) or f"HTTP {status}"
        result = {"bad_data": "bad_query", "timeout": "timeout"}.get(kind, "error")
        return QueryResult(result, message=f"{kind}: {text}" if kind else text)
    data = answer.get("data")
    if not isinstance(data, dict):
        return QueryResult("error", message="answer without 'data'")
    rtype, found = data.get("resultType"), data.get("result")
    if rtype == "scalar":
        sample = found
    elif rtype == "vector" and isinstance(found, list):
        if not found:
            return QueryResult("empty", message="the query returned no series")
        if len(found) > 1:
            shown = ", ".join(
                json.dumps(s.get("metric", {}), sort_keys=True) for s in found[:_SHOWN_SERIES]
            )
            more = f" and {len(found) - _SHOWN_SERIES} more" if len(found) > _SHOWN_SERIES else ""
            return QueryResult(
                "many_series",
                message=f"{len(found)} series ({shown}{more}); aggregate them in the query "
                "with avg(...), sum(...) or max(...) so it returns one number",
            )
        sample = found[0].get("value") if isinstance(found[0], dict) else None
    else:
        return QueryResult(
            "bad_query",
            message=f"a {rtype} result; the query must return an instant vector of one series "
            "or a scalar (a range vector [..] needs a function such as avg_over_time or rate)",
        )
    raw: Any = sample[1] if isinstance(sample, list) and len(sample) == 2 else None  # [t, "v"]
    try:
        value = float(raw)  # None or a non-number: the except below
    except (TypeError, ValueError):
        return QueryResult("error", message=f"cannot read the sample {sample!r}")
    if not math.isfinite(value):  # Prometheus writes "NaN", "+Inf", "-Inf"
        return QueryResult("not_finite", value, f"the query returned {raw}")
    return QueryResult("ok", value)


def promql_metrics(rollout: RolloutConfig) -> list[str]:
    """Signals of the rollout's ``promql:`` metrics, in config order, without duplicates."""
    return list(window_metrics(rollout, is_promql))


@dataclass(frozen=True)
class _Query:
    signal: str  # the accumulator key: promql:QUERY or promql:NAME
    metrics: tuple[WindowMetric, ...]
    exprs: Mapping[str, str]  # per arm, placeholders expanded


@dataclass
class _ArmStatus:
    result: str = "pending"
    message: str = "not queried yet"
    value: float | None = None
    at: float | None = None


class PromQLEvaluator(WindowPoller):
    """Queries one rollout's ``promql:`` signals for both arms every ``every`` seconds.

    :meth:`tick` does one round (tests call it directly); :meth:`start` runs it on a fixed
    schedule in a background task until :meth:`stop`.
    """

    def __init__(
        self,
        rollout: RolloutConfig,
        recorder: Recorder,
        metrics: PromQLMetrics,
        *,
        clock: Callable[[], float] = time.time,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        prom = rollout.analysis.prometheus
        if prom is None:
            raise CanaryError(
                f"rollout {rollout.name!r}: promql metrics need analysis.prometheus.url"
            )
        self.name = rollout.name
        self.every = prom.every
        self.timeout = prom.query_timeout
        self.url = prom.url + "/api/v1/query"
        self.headers, self._auth_problem = _headers(
            prom, os.environ if environ is None else environ
        )
        arms = {PRODUCTION: rollout.production, CANDIDATE: rollout.candidate}
        queries: list[_Query] = []
        for signal, ms in window_metrics(rollout, is_promql).items():
            name = promql_query_name(signal)
            exprs = {
                arm: expand_promql(
                    cfg.queries[name] if name is not None else signal.partition(":")[2],
                    arm=arm,
                    endpoints=cfg.endpoints,
                    window=self.every,
                )
                for arm, cfg in arms.items()
            }
            queries.append(_Query(signal, tuple(ms), exprs))
        self.queries = tuple(queries)
        self._metrics = metrics
        self._windows = PairedWindows(
            self.name, recorder, metrics.promql_windows, metrics.promql_value
        )
        self._clock = clock
        super().__init__()
        self.what = "promql round"
        self.rounds = 0
        self._status = {q.signal: {a: _ArmStatus() for a in ARMS} for q in self.queries}
        self._counts = {
            q.signal: {a: dict.fromkeys(RESULTS, 0) for a in ARMS} for q in self.queries
        }
        self._windows_recorded = dict.fromkeys((q.signal for q in self.queries), 0)

    # -- lifecycle --------------------------------------------------------------------------

    def _new_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers=self.headers,
            connector=aiohttp.TCPConnector(limit=8),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    # -- one round ----------------------------------------------------------------------------

    async def tick(self) -> None:
        """Query every signal for both arms at one instant and record the windows."""
        at = round(self._clock(), 3)  # the same evaluation time for both arms
        async with self._round_session() as session:
            jobs = [(q, arm) for q in self.queries for arm in ARMS]
            answers = await asyncio.gather(
                *(self._query(session, q.exprs[arm], at) for q, arm in jobs)
            )
        by_query: dict[str, dict[str, QueryResult]] = {}
        for (q, arm), res in zip(jobs, answers, strict=True):
            by_query.setdefault(q.signal, {})[arm] = res
            self._note(q, arm, res, at)
        for q in self.queries:
            values = {
                arm: r.value
                for arm, r in by_query[q.signal].items()
                if r.result == "ok" and r.value is not None
            }
            if len(values) == len(ARMS):
                self._windows.record(self.rounds, q.signal, q.metrics, values)
                self._windows_recorded[q.signal] += 1
            else:
                self._windows.dropped(q.metrics, "query_failed")
        self.rounds += 1

    def _note(self, q: _Query, arm: str, res: QueryResult, at: float) -> None:
        for m in q.metrics:
            self._metrics.promql_queries.labels(self.name, arm, m.name, res.result).inc()
        self._counts[q.signal][arm][res.result] += 1
        st = self._status[q.signal][arm]
        if res.result != "ok" and st.result in ("ok", "pending"):
            log.warning(
                "rollout %s: promql %s for %s gives no value (%s): %s; query: %s",
                self.name, q.signal, arm, res.result, res.message, q.exprs[arm],
            )  # fmt: skip
        elif res.result == "ok" and st.result not in ("ok", "pending"):
            log.info("rollout %s: promql %s for %s works again", self.name, q.signal, arm)
        st.result, st.message, st.value, st.at = res.result, res.message, res.value, at

    async def _query(self, session: aiohttp.ClientSession, expr: str, at: float) -> QueryResult:
        if self._auth_problem is not None:
            return QueryResult("error", message=self._auth_problem)
        form = {"query": expr, "time": f"{at:.3f}", "timeout": promql_duration(self.timeout)}
        try:
            async with session.post(self.url, data=form) as resp:
                if (resp.content_length or 0) > MAX_ANSWER_BYTES:
                    return _too_big()
                body = await resp.content.read(MAX_ANSWER_BYTES + 1)
                if len(body) > MAX_ANSWER_BYTES:
                    return _too_big()
                status = resp.status
        except TimeoutError:
            return QueryResult("timeout", message=f"no answer within {self.timeout:.3g} s")
        except (aiohttp.ClientError, OSError) as exc:
            return QueryResult("error", message=f"{type(exc).__name__}: {exc}")
        return parse_answer(status, body)

    # -- what the status shows ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Per metric: its signal, the windows recorded so far and, per arm, the expanded
        query, the last result (with why it gave no value) and the count of each result."""
        out: dict[str, Any] = {}
        for q in self.queries:
            arms: dict[str, Any] = {}
            for arm in ARMS:
                st = self._status[q.signal][arm]
                value = st.value if st.value is not None and math.isfinite(st.value) else None
                arms[arm] = {
                    "query": q.exprs[arm],
                    "result": st.result,
                    "message": st.message,
                    "value": value,
                    "at": st.at,
                    "counts": {k: n for k, n in self._counts[q.signal][arm].items() if n},
                }
            entry = {
                "signal": q.signal,
                "every": self.every,
                "windows": self._windows_recorded[q.signal],
                "arms": arms,
            }
            for m in q.metrics:
                out[m.name] = entry
        return out


def _too_big() -> QueryResult:
    return QueryResult(
        "many_series", message=f"an answer larger than {MAX_ANSWER_BYTES} bytes is many series"
    )


def _headers(
    prom: PrometheusConfig, environ: Mapping[str, str]
) -> tuple[dict[str, str], str | None]:
    """Request headers, and why queries cannot be sent (a token variable that is not set)."""
    headers = {"Accept": "application/json", **prom.headers}
    env = prom.bearer_token_env
    if env is None:
        return headers, None
    token = environ.get(env, "").strip()
    if not token:
        return headers, (
            f"analysis.prometheus.bearer_token_env names ${env}, which is not set or empty"
        )
    headers["Authorization"] = f"Bearer {token}"
    return headers, None


def _spec(rollout: RolloutConfig) -> object:
    """What an evaluator depends on: a change of any of it restarts the evaluator."""
    return (
        rollout.analysis.prometheus,
        tuple(rollout.production.endpoints),
        tuple(sorted(rollout.production.queries.items())),
        tuple(rollout.candidate.endpoints),
        tuple(sorted(rollout.candidate.queries.items())),
        tuple(
            (m.name, m.signal, m.margin.relative)
            for m in rollout.analysis.metrics
            if is_promql(m.signal)
        ),
    )


class PromQLEvaluators(PerRollout[PromQLEvaluator]):
    """The evaluators of every rollout with ``promql:`` metrics (owned by the runtime, run on
    the leader only, like the resource scrapers)."""

    def __init__(
        self,
        recorder: Recorder,
        metrics: PromQLMetrics,
        *,
        factory: Callable[[RolloutConfig], PromQLEvaluator] | None = None,
    ) -> None:
        super().__init__(factory or (lambda r: PromQLEvaluator(r, recorder, metrics)))

    def wanted(self, rollout: RolloutConfig) -> bool:
        return rollout.analysis.prometheus is not None and bool(promql_metrics(rollout))

    def spec(self, rollout: RolloutConfig) -> object:
        return _spec(rollout)

    def started(self, name: str, task: PromQLEvaluator) -> None:
        log.info(
            "rollout %s: querying %s every %gs: %s",
            name,
            task.url,
            task.every,
            ", ".join(q.signal for q in task.queries),
        )

    def status(self, rollout: str) -> dict[str, Any] | None:
        """:meth:`PromQLEvaluator.status` of ``rollout``; None when this process does not
        query for it (no promql metrics, or not the leader)."""
        task = self.tasks.get(rollout)
        return None if task is None else task.status()
