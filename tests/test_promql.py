"""``promql:`` signals without a Prometheus: the signal grammar (named vs inline, placeholders),
the rollout file's validation, reading ``/api/v1/query`` answers, and the evaluator against a
loopback HTTP server that records what it was asked (the real Prometheus is in
``test_promql_functional.py``)."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from canary.config import load_config_text
from canary.errors import ConfigError
from canary.metrics import Metrics
from canary.observe import Recorder
from canary.observe.promql import PromQLEvaluator, PromQLEvaluators, parse_answer
from canary.signals import (
    CANDIDATE,
    PRODUCTION,
    expand_promql,
    is_continuous,
    is_promql,
    is_windowed,
    paired_key,
    parse_signal,
    promql_duration,
    promql_endpoints,
    promql_query_name,
)
from canary.stats import DEFAULT_BATCH_SIZES

# -- the signal grammar ---------------------------------------------------------------------


def _promql_string(literal: str) -> str:
    """What PromQL makes of a double-quoted string's body (Go escapes: ``\\\\`` is ``\\``)."""
    return re.sub(r"\\(.)", r"\1", literal)


def test_endpoints_expand_to_an_anchored_alternation_that_matches_only_these_instances() -> None:
    text = promql_endpoints(["http://127.0.0.1:8001", "http://10.0.0.7:9000/v1"])
    assert text == "127\\\\.0\\\\.0\\\\.1:8001|10\\\\.0\\\\.0\\\\.7:9000"
    rx = re.compile(_promql_string(text))  # Prometheus anchors regex matchers: fullmatch
    assert rx.fullmatch("127.0.0.1:8001") and rx.fullmatch("10.0.0.7:9000")
    for other in ("127x0.0.1:8001", "127.0.0.1:80011", "127.0.0.1:800", "10.0.0.7:9001"):
        assert not rx.fullmatch(other), other


def test_endpoint_without_port_matches_with_and_without_the_default_port() -> None:
    rx = re.compile(_promql_string(promql_endpoints(["https://model-a.svc"])))
    assert rx.fullmatch("model-a.svc") and rx.fullmatch("model-a.svc:443")
    assert not rx.fullmatch("model-a.svc:80") and not rx.fullmatch("model-aXsvc")
    ipv6 = re.compile(_promql_string(promql_endpoints(["http://[::1]:8001"])))
    assert ipv6.fullmatch("[::1]:8001")


@pytest.mark.parametrize(
    ("seconds", "text"), [(15, "15s"), (1, "1s"), (0.5, "500ms"), (1.5, "1500ms"), (120, "120s")]
)
def test_window_is_a_promql_duration(seconds: float, text: str) -> None:
    assert promql_duration(seconds) == text


def test_every_placeholder_is_expanded_per_arm_with_or_without_spaces() -> None:
    query = 'rate(x{arm="{{ arm }}", instance=~"{{endpoints}}"}[{{window}}])'
    got = {
        arm: expand_promql(query, arm=arm, endpoints=[url], window=15.0)
        for arm, url in ((PRODUCTION, "http://a:1"), (CANDIDATE, "http://b:2"))
    }
    assert got[PRODUCTION] == 'rate(x{arm="production", instance=~"a:1"}[15s])'
    assert got[CANDIDATE] == 'rate(x{arm="candidate", instance=~"b:2"}[15s])'


def test_a_bare_identifier_is_a_name_anything_else_an_inline_query() -> None:
    assert promql_query_name("promql:gpu") == "gpu"
    assert promql_query_name("promql:gpu_cache_2") == "gpu_cache_2"
    for inline in ('promql:avg(x{arm="{{arm}}"})', "promql:vllm:x{arm='{{arm}}'}"):
        assert promql_query_name(inline) is None
    sig = parse_signal('promql:avg(x{arm="{{arm}}"})')
    assert (sig.kind, sig.key, sig.per_request) == ("promql", 'promql:avg(x{arm="{{arm}}"})', False)
    assert is_promql(sig.key) and is_windowed(sig.key) and not is_continuous(sig.key)


@pytest.mark.parametrize(
    ("signal", "why"),
    [
        ('promql:avg(x{a="{{arms}}"})', "unknown placeholder '{{arms}}'"),
        ('promql:avg(x{a="{{arm"})', "'{{' without a matching '}}'"),
        ("promql:   ", "must not be empty"),
        ("promql:vllm:num_requests_waiting", "uses neither {{arm}} nor {{endpoints}}"),
        ("promql:avg(x[{{window}}])", "both arms would get the same answer"),
    ],
)
def test_bad_inline_queries_are_refused_saying_why(signal: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        parse_signal(signal)


# -- the rollout file -----------------------------------------------------------------------

GPU_P = 'avg(DCGM_FI_DEV_GPU_UTIL{pod=~"llama-prod-.*"})'
GPU_C = 'avg(DCGM_FI_DEV_GPU_UTIL{pod=~"llama-canary-.*"})'


def _rollout(
    metrics: list[dict[str, Any]],
    *,
    prometheus: dict[str, Any] | None = None,
    production: dict[str, Any] | None = None,
    candidate: dict[str, Any] | None = None,
) -> str:
    analysis: dict[str, Any] = {"metrics": metrics}
    if prometheus is not None:
        analysis["prometheus"] = prometheus
    rollout = {
        "name": "m",
        "production": {"endpoints": ["http://127.0.0.1:8001"], **(production or {})},
        "candidate": {"endpoints": ["http://127.0.0.1:8002"], **(candidate or {})},
        "steps": [{"weight": 5}],
        "analysis": analysis,
    }
    return yaml.safe_dump({"rollouts": [rollout]}, sort_keys=False)


PROM = {"url": "http://127.0.0.1:9090"}
GPU = {"name": "gpu", "signal": "promql:gpu", "max_increase": "10%"}


def _issues(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text)
    return [(i.path, i.message) for i in info.value.issues]


def test_named_and_inline_queries_load() -> None:
    inline = {
        "name": "waiting",
        "signal": 'promql:avg(vllm:num_requests_waiting{instance=~"{{endpoints}}"})',
        "max_increase": "20%",
    }
    cfg = load_config_text(
        _rollout(
            [GPU, inline],
            prometheus={**PROM, "every": "30s", "bearer_token_env": "PROM_TOKEN"},
            production={"queries": {"gpu": GPU_P}},
            candidate={"queries": {"gpu": GPU_C}},
        )
    )
    r = cfg.rollouts[0]
    prom = r.analysis.prometheus
    assert prom is not None
    assert (prom.every, prom.query_timeout, prom.bearer_token_env) == (30.0, 10.0, "PROM_TOKEN")
    assert r.production.queries == {"gpu": GPU_P}
    assert r.analysis.metrics[0].signal == "promql:gpu"


def test_a_promql_metric_without_a_prometheus_url_names_the_fix() -> None:
    [(path, msg)] = _issues(
        _rollout(
            [GPU], production={"queries": {"gpu": GPU_P}}, candidate={"queries": {"gpu": GPU_C}}
        )
    )
    assert path == "rollouts[0]"
    assert "add 'prometheus: {url: http://prometheus:9090}' under analysis" in msg


def test_a_name_defined_on_one_arm_only_is_refused_even_unused() -> None:
    [(_, msg)] = _issues(_rollout([], prometheus=PROM, production={"queries": {"gpu": GPU_P}}))
    assert "query 'gpu' is defined under production.queries but not under candidate.queries" in msg
    [(_, msg)] = _issues(_rollout([], prometheus=PROM, candidate={"queries": {"x": GPU_C}}))
    assert "defined under candidate.queries but not under production.queries" in msg


def test_an_undefined_name_lists_the_defined_ones() -> None:
    [(_, msg)] = _issues(
        _rollout(
            [{**GPU, "signal": "promql:gpu_util"}],
            prometheus=PROM,
            production={"queries": {"gpu": GPU_P}},
            candidate={"queries": {"gpu": GPU_C}},
        )
    )
    assert "no query 'gpu_util' is defined" in msg and "(defined: gpu)" in msg


def test_the_same_named_query_on_both_arms_must_select_each_arm() -> None:
    same = {"queries": {"gpu": GPU_P}}
    [(_, msg)] = _issues(_rollout([GPU], prometheus=PROM, production=same, candidate=same))
    assert "same on both arms" in msg
    shared = {"queries": {"gpu": 'avg(gpu{instance=~"{{endpoints}}"})'}}
    load_config_text(_rollout([GPU], prometheus=PROM, production=shared, candidate=shared))


@pytest.mark.parametrize(
    ("queries", "path", "why"),
    [
        ({"gpu": "  "}, "rollouts[0].production.queries", "must not be empty"),
        ({"gpu": "avg(x{a='{{pod}}'})"}, "rollouts[0].production.queries", "unknown placeholder"),
        ({"gpu-util": GPU_P}, "rollouts[0].production.queries", "must be an identifier"),
    ],
)
def test_bad_named_queries_are_refused_with_their_key(
    queries: dict[str, str], path: str, why: str
) -> None:
    found = _issues(_rollout([], prometheus=PROM, production={"queries": queries}))
    assert any(p == path and why in m for p, m in found), found


@pytest.mark.parametrize(
    ("prometheus", "path", "why"),
    [
        ({"url": "localhost:9090"}, ".url", "http(s) URL"),
        ({**PROM, "every": "50ms"}, ".every", "at least 100ms"),
        ({**PROM, "every": "5s", "timeout": "6s"}, "", "at most"),
        ({**PROM, "headers": {"Authorization": "Bearer x"}}, ".headers", "bearer_token_env"),
        ({**PROM, "bearer_token_env": "PROM-TOKEN"}, ".bearer_token_env", "environment variable"),
        ({**PROM, "step": "1m"}, ".step", ""),  # unknown keys are errors
    ],
)
def test_bad_prometheus_settings_are_refused_with_their_key(
    prometheus: dict[str, Any], path: str, why: str
) -> None:
    found = _issues(_rollout([], prometheus=prometheus))
    path = "rollouts[0].analysis.prometheus" + path
    assert any(p == path and why in m for p, m in found), found


def test_a_promql_metric_is_compared_as_a_mean() -> None:
    inline = 'promql:avg(x{instance=~"{{endpoints}}"})'
    [(_, msg)] = _issues(
        _rollout(
            [{"name": "g", "signal": inline, "stat": "p95", "max_increase": "10%"}], prometheus=PROM
        )
    )
    assert "use stat: mean" in msg


# -- answers ---------------------------------------------------------------------------------


def _answer(data: Any, status: str = "success", **extra: Any) -> bytes:
    return json.dumps({"status": status, "data": data, **extra}).encode()


def _error(kind: str, message: str) -> bytes:
    return _answer(None, "error", errorType=kind, error=message)


def _vector(*values: str) -> dict[str, Any]:
    return {
        "resultType": "vector",
        "result": [{"metric": {"pod": f"p{i}"}, "value": [1.0, v]} for i, v in enumerate(values)],
    }


@pytest.mark.parametrize(
    ("status", "body", "result", "value", "why"),
    [
        (200, _answer(_vector("0.42")), "ok", 0.42, ""),
        (200, _answer({"resultType": "scalar", "result": [1.0, "7"]}), "ok", 7.0, ""),
        (200, _answer(_vector()), "empty", None, "no series"),
        (200, _answer(_vector("1", "2")), "many_series", None, '2 series ({"pod": "p0"}'),
        (200, _answer(_vector(*"12345")), "many_series", None, "and 2 more"),
        (200, _answer(_vector("NaN")), "not_finite", None, "NaN"),
        (200, _answer(_vector("+Inf")), "not_finite", None, "+Inf"),
        (400, _error("bad_data", "parse error"), "bad_query", None, "bad_data: parse error"),
        (503, _error("timeout", "query timed out"), "timeout", None, "timed out"),
        (422, _error("execution", "many samples"), "error", None, "execution"),
        (200, _answer({"resultType": "matrix", "result": []}), "bad_query", None, "range vector"),
        (502, b"<html>bad gateway</html>", "error", None, "HTTP 502"),
        (200, _answer(_vector("x")), "error", None, "cannot read"),
    ],
)  # fmt: skip
def test_answers_are_one_number_or_a_reason(
    status: int, body: bytes, result: str, value: float | None, why: str
) -> None:
    got = parse_answer(status, body)
    assert got.result == result, got
    if result == "ok":
        assert got.value == value
    assert why in got.message, got


# -- the evaluator against a loopback server ---------------------------------------------------


@contextlib.asynccontextmanager
async def answering(
    answer: Callable[[dict[str, str]], tuple[int, bytes]],
) -> AsyncIterator[tuple[str, list[tuple[dict[str, str], dict[str, str]]]]]:
    """An HTTP server on loopback answering /api/v1/query with ``answer(form)``; yields its URL
    and the (form, headers) of every request."""
    seen: list[tuple[dict[str, str], dict[str, str]]] = []

    async def query(request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        seen.append((form, dict(request.headers)))
        status, body = answer(form)
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/prom/api/v1/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/prom", seen
    finally:
        await runner.cleanup()


def _config(url: str, **prometheus: Any) -> Any:
    return load_config_text(
        _rollout(
            [GPU, {"name": "gpu_abs", "signal": "promql:gpu", "max_increase": "5pp"}],
            prometheus={"url": url, "every": "1s", **prometheus},
            production={"queries": {"gpu": 'avg(gpu{arm="{{arm}}"}[{{window}}])'}},
            candidate={"queries": {"gpu": 'avg(gpu{arm="{{arm}}"}[{{window}}])'}},
        )
    )


def _by_arm(form: dict[str, str]) -> tuple[int, bytes]:
    value = "0.39" if 'arm="candidate"' in form["query"] else "0.30"
    return 200, _answer(_vector(value))


async def test_both_arms_are_asked_at_one_instant_and_windows_feed_the_paired_keys() -> None:
    recorder, metrics = Recorder(), Metrics(CollectorRegistry())
    async with answering(_by_arm) as (url, seen):
        cfg = _config(url, headers={"X-Scope-OrgID": "team-a"}, bearer_token_env="PQ_TOKEN")
        ev = PromQLEvaluator(
            cfg.rollouts[0], recorder, metrics, clock=iter([1000.0, 1001.0, 1002.5]).__next__,
            environ={"PQ_TOKEN": "s3cret"},
        )  # fmt: skip
        for _ in range(3):
            await ev.tick()
    assert len(seen) == 6  # one query per arm and round, not per metric
    times = [form["time"] for form, _ in seen]
    assert times == ["1000.000"] * 2 + ["1001.000"] * 2 + ["1002.500"] * 2
    queries = sorted(form["query"] for form, _ in seen[:2])
    assert queries == ['avg(gpu{arm="candidate"}[1s])', 'avg(gpu{arm="production"}[1s])']
    assert {form["timeout"] for form, _ in seen} == {"800ms"}
    for _, headers in seen:
        assert headers["Authorization"] == "Bearer s3cret"
        assert headers["X-Scope-OrgID"] == "team-a"
    acc = recorder.live("m")
    log_ratio = acc.candidate.signals[paired_key("promql:gpu", True)]
    diff = acc.candidate.signals[paired_key("promql:gpu", False)]
    changes = acc.candidate.signals[paired_key("promql:gpu", True, changes=True)]
    assert log_ratio.n == 3 and diff.n == 3 and changes.n == 2
    assert log_ratio.mean == pytest.approx(0.262364264, rel=1e-6)  # log(0.39 / 0.30)
    assert diff.mean == pytest.approx(0.09)
    assert acc.production.signals["promql:gpu"].mean == pytest.approx(0.30)
    status = ev.status()
    assert status["gpu"] is status["gpu_abs"]
    assert status["gpu"]["windows"] == 3
    assert status["gpu"]["arms"]["candidate"]["counts"] == {"ok": 3}
    assert status["gpu"]["arms"]["candidate"]["value"] == pytest.approx(0.39)
    got = metrics.promql_queries.labels("m", "candidate", "gpu_abs", "ok")._value.get()
    assert got == 3


async def test_a_failed_arm_drops_the_window_and_breaks_the_run_of_consecutive_windows() -> None:
    recorder, metrics = Recorder(), Metrics(CollectorRegistry())
    rounds = iter([_by_arm, _by_arm, lambda f: (200, _answer(_vector()))] + [_by_arm] * 2)
    current: list[Callable[[dict[str, str]], tuple[int, bytes]]] = [_by_arm]

    def answer(form: dict[str, str]) -> tuple[int, bytes]:
        return current[0](form)

    async with answering(answer) as (url, _):
        ev = PromQLEvaluator(_config(url).rollouts[0], recorder, metrics)
        for step in rounds:
            current[0] = step
            await ev.tick()
    acc = recorder.live("m").candidate.signals
    assert acc[paired_key("promql:gpu", True)].n == 4
    # changes need consecutive windows: rounds 0-1 and 3-4, not across the empty round 2
    assert acc[paired_key("promql:gpu", True, changes=True)].n == 2
    assert paired_key("promql:gpu", True, batch=DEFAULT_BATCH_SIZES[0]) not in acc
    shown = ev.status()["gpu"]["arms"]["production"]
    assert shown["counts"] == {"ok": 4, "empty": 1}
    dropped = metrics.promql_windows.labels("m", "gpu", "query_failed")._value.get()
    assert dropped == 1


async def test_a_token_variable_that_is_not_set_fails_every_query_without_sending_it() -> None:
    recorder, metrics = Recorder(), Metrics(CollectorRegistry())
    async with answering(_by_arm) as (url, seen):
        cfg = _config(url, bearer_token_env="PQ_TOKEN")
        ev = PromQLEvaluator(cfg.rollouts[0], recorder, metrics, environ={})
        await ev.tick()
    assert seen == []
    shown = ev.status()["gpu"]["arms"]["candidate"]
    assert shown["result"] == "error" and "$PQ_TOKEN, which is not set" in shown["message"]


async def test_evaluators_follow_the_config_and_restart_when_a_query_changes() -> None:
    recorder, metrics = Recorder(), Metrics(CollectorRegistry())
    async with answering(_by_arm) as (url, _):
        evaluators = PromQLEvaluators(recorder, metrics)
        try:
            await evaluators.apply(_config(url))
            first = evaluators.tasks["m"]
            assert evaluators.status("m") is not None and evaluators.status("x") is None
            await evaluators.apply(_config(url))
            assert evaluators.tasks["m"] is first  # unchanged: keeps running
            await evaluators.apply(_config(url, every="2s"))
            assert evaluators.tasks["m"] is not first
            await evaluators.apply(load_config_text(_rollout([])))
            assert evaluators.tasks == {}
        finally:
            await evaluators.close()
