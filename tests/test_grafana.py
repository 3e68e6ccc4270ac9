"""The Grafana dashboard (deploy/grafana/canary-dashboard.json) against a live canary.

Every PromQL expression in the dashboard must name only metrics a running canary exports (its
``/metrics`` after real traffic, errors, priced requests and decisions, so that every labelled
series exists). With Debian's ``prometheus`` on PATH, a real Prometheus scrapes that canary
and runs every query through its HTTP API: none may fail, every panel's must return data, and
the quantile panels must show the candidate's +30% ttft that the classic buckets hide.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from loadtest.crash_loss import canary_process
from loadtest.loadgen import LoadConfig, run_load
from tests.conftest import fake_pair, rollout_config, running_canary
from tests.prometheus_harness import (
    MISSING,
    histogram_quantile,
    running_prometheus,
    samples,
    scraped_buckets,
)
from tests.redis_harness import free_port

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "canary-dashboard.json"

# PromQL words that are not metric names (functions are recognised by the "(" after them).
KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "atan2", "inf", "nan",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def expressions(board: dict[str, Any]) -> list[tuple[str, str]]:
    """``(where, expr)`` of every PromQL expression: panel targets, template variable queries
    (``label_values(METRIC, label)``: the metric) and annotation queries."""
    out = []
    for p in _panels(board["panels"]):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
    for v in board["templating"]["list"]:
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
        assert m, f"variable {v['name']}: not a label_values(...) query: {query!r}"
        out.append((f"variable {v['name']}", m.group(1)))
    for a in board["annotations"]["list"]:
        if "expr" in a:
            out.append((f"annotation {a['name']}", a["expr"]))
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers outside label matchers ``{...}``,
    ranges ``[...]``, strings and grouping clauses, that are not functions (followed by
    ``(``), keywords or numbers. Grafana variables (``$rollout``) are dropped first."""
    s = re.sub(r"\$\{?\w+\}?", "", expr)
    s = _STRING.sub('""', s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _GROUPING.sub(" ", s)
    names = set()
    for m in _IDENT.finditer(s):
        if s[m.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        word = m.group()
        if word.lower() in KEYWORDS:
            continue
        if m.start() and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # the exponent or suffix of a number (1e3)
        names.add(word)
    return names


def test_the_tokenizer_finds_metric_names_only() -> None:
    expr = (
        'max without (worker, instance) (canary_metric_estimate{rollout="$rollout", '
        'metric=~"a|b"} and on (worker, instance) (canary_leader == 1)) / ignoring (arm) '
        'histogram_quantile(0.95, sum by (le, arm) (rate(x_bucket{rollout="it\'s"}[5m]))) '
        "* 1e3 + sum(increase(c_total[$__rate_interval] offset 1m)) > bool 0"
    )
    assert metric_names(expr) == {"canary_metric_estimate", "canary_leader", "x_bucket", "c_total"}


def test_the_dashboard_is_importable() -> None:
    board = dashboard()
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 30
    assert board["uid"] and board["title"]
    (ds,) = board["__inputs"]
    assert ds["name"] == "DS_PROMETHEUS" and ds["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    rollout = variables["rollout"]
    assert rollout["query"]["query"] == "label_values(canary_rollout_phase, rollout)"
    ids = [p["id"] for p in _panels(board["panels"])]
    assert len(ids) == len(set(ids))
    for p in _panels(board["panels"]):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
            # every per-rollout query follows the rollout picker
            if "rollout" in json.dumps(t["expr"]):
                assert 'rollout="$rollout"' in t["expr"], (p["title"], t["expr"])
    titles = " | ".join(p["title"] for p in _panels(board["panels"])).lower()
    for what in ("weights", "phase", "step", "verdict", "interval", "latency", "ttft",
                 "error", "cost per 1k", "store", "leader"):  # fmt: skip
        assert what in titles or what in json.dumps(board).lower(), what


# -- against a live canary ----------------------------------------------------------------

PRODUCTION = {"ttft": 0.050, "completion_tokens": 2, "error_rate": 0.02}
CANDIDATE = {"ttft": 0.065, "completion_tokens": 2, "error_rate": 0.05}


def _config(p: str, c: str) -> dict[str, Any]:
    cfg = rollout_config(
        [p], [c],
        steps=[{"weight": 50, "min_duration": "10m"}],
        analysis={
            "interval": "200ms",
            "burn_in": 20,
            "metrics": [
                {"name": "ttft_p50", "signal": "ttft", "stat": "p50", "max_increase": "60%"},
                {"name": "latency_p95", "signal": "latency", "stat": "p95",
                 "max_increase": "60%"},
                {"name": "errors", "signal": "error", "stat": "rate", "max_increase": "20pp"},
            ],
        },
    )  # fmt: skip
    for arm, price in (("production", 0.50), ("candidate", 0.35)):
        cfg["rollouts"][0][arm]["cost"] = {"per_1k_tokens": price}
    return cfg


def _load(url: str, requests: int, rate: float = 60.0) -> LoadConfig:
    return LoadConfig(
        url=url + "/v1/chat/completions", rate=rate, requests=requests, body="chat-stream",
        max_tokens=2, timeout=5.0,
    )  # fmt: skip


def _substitute(expr: str) -> str:
    """The dashboard's Grafana variables as Grafana would fill them for this canary."""
    return (
        expr.replace("$__rate_interval", "5s")
        .replace("$__interval", "5s")
        .replace("$rollout", "m")
        .replace("$metric", "ttft_p50|latency_p95|errors")
    )


async def test_every_query_names_an_exported_metric_and_runs_in_prometheus() -> None:
    board = dashboard()
    async with fake_pair(PRODUCTION, CANDIDATE) as (p, c):
        async with running_canary(_config(p, c), controller=True) as can:
            async with httpx.AsyncClient() as client:
                report = await run_load(_load(can.url, 200, rate=100))
                assert report.ok > 150, report
                # a decision, so that canary_decisions_total has its series
                admin = can.admin + "/api/v1/rollouts/m"
                assert (await client.post(admin + "/pause", json={})).status_code == 200
                assert (await client.post(admin + "/resume", json={})).status_code == 200
                await asyncio.sleep(0.6)  # an analysis or two
                exported = {
                    s.name for s in samples((await client.get(can.admin + "/metrics")).text)
                }
            missing = [
                (where, name)
                for where, expr in expressions(board)
                for name in sorted(metric_names(expr))
                if name not in exported
            ]
            assert not missing, f"dashboard queries name metrics canary does not export: {missing}"
            assert all(metric_names(e) for _, e in expressions(board))

            async with running_prometheus(f"127.0.0.1:{can.runtime.admin_port}") as prom:
                # traffic while Prometheus scrapes every second, so that every rate has data
                load = asyncio.create_task(run_load(_load(can.url, 480, rate=60)))
                await prom.wait_for('canary_requests_total{rollout="m"}')
                await asyncio.sleep(6.0)
                results: dict[str, dict[str, Any]] = {}
                for where, expr in expressions(board):
                    answer = await prom.query(_substitute(expr))
                    assert answer["status"] == "success", (where, expr, answer)
                    results[where] = answer
                assert (await load).ok > 400
                empty = [
                    where
                    for where, answer in results.items()
                    if where.startswith("panel") and not answer["data"]["result"]
                ]
                assert not empty, f"dashboard panels without data: {empty}"

                # the quantile panels show the +30% ttft; the classic buckets do not
                ratio_query = next(
                    e
                    for w, e in expressions(board)
                    if w.startswith("panel 'Candidate / production")
                )
                ratios = {
                    (r["metric"]["signal"], r["metric"]["quantile"]): float(r["value"][1])
                    for r in (await prom.query(_substitute(ratio_query)))["data"]["result"]
                }
                classic = {
                    arm: float(
                        (
                            await prom.wait_for(
                                "histogram_quantile(0.5, canary_time_to_first_byte_seconds_bucket"
                                f'{{rollout="m", arm="{arm}"}})'
                            )
                        )[0]["value"][1]
                    )
                    for arm in ("production", "candidate")
                }
                print(
                    f"Prometheus: gauge ttft p50 ratio x{ratios[('ttft', '0.5')]:.3f}, "
                    f"histogram_quantile p50 {classic['production'] * 1e3:.2f} / "
                    f"{classic['candidate'] * 1e3:.2f} ms "
                    f"(x{classic['candidate'] / classic['production']:.3f})"
                )
                assert ratios[("ttft", "0.5")] == pytest.approx(1.3, rel=0.05)
                assert classic["candidate"] / classic["production"] < 1.05

                # the test's histogram_quantile is Prometheus': the same buckets, the same value
                async with httpx.AsyncClient() as client:
                    await asyncio.sleep(1.5)  # no traffic now: the next scrape sees these
                    text = (await client.get(can.admin + "/metrics")).text
                await asyncio.sleep(2.5)
                ours = histogram_quantile(
                    0.9,
                    scraped_buckets(
                        samples(text),
                        "canary_request_duration_seconds",
                        rollout="m",
                        arm="candidate",
                    ),
                )
                (theirs,) = await prom.wait_for(
                    "histogram_quantile(0.9, canary_request_duration_seconds_bucket"
                    '{rollout="m", arm="candidate"})'
                )
                assert math.isclose(float(theirs["value"][1]), ours, rel_tol=1e-9)


async def test_the_queries_aggregate_over_workers(tmp_path: Path) -> None:
    """``canary run --workers 2``: the supervisor's /metrics has every series once per worker
    (label ``worker``); every panel query gives one series per arm (or metric, phase...), never
    one per worker, from the worker that leads."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(MISSING)
    board = dashboard()
    async with fake_pair(PRODUCTION, CANDIDATE) as (p, c):
        proxy, admin_port = free_port(), free_port()
        cfg = _config(p, c)
        cfg["proxy"]["listen"] = f"127.0.0.1:{proxy}"
        cfg["admin"]["listen"] = f"127.0.0.1:{admin_port}"
        cfg["state"] = {"backend": "sqlite", "path": str(tmp_path / "state.db")}
        cfg["rollouts"][0]["analysis"]["interval"] = "1s"
        path = tmp_path / "rollout.yaml"
        path.write_text(yaml.safe_dump(cfg))
        admin = f"http://127.0.0.1:{admin_port}"
        async with canary_process(path, admin, args=["--workers", "2"]):
            async with running_prometheus(f"127.0.0.1:{admin_port}") as prom:
                # new connections, so that the kernel spreads them over both workers
                load = _load(f"http://127.0.0.1:{proxy}", 600, rate=60)
                load = dataclasses.replace(load, headers={"Connection": "close"})
                task = asyncio.create_task(run_load(load))
                up = await prom.wait_for("count(count by (worker) (canary_requests_total))")
                assert float(up[0]["value"][1]) == 2.0  # both workers served requests
                await prom.wait_for('canary_signal_quantile{signal="ttft"}')
                async with httpx.AsyncClient(timeout=10) as client:  # to the leader
                    for action in ("pause", "resume"):
                        url = f"{admin}/api/v1/rollouts/m/{action}"
                        assert (await client.post(url, json={})).status_code == 200
                await asyncio.sleep(4.0)
                leaders = await prom.wait_for("sum(canary_leader)")
                assert float(leaders[0]["value"][1]) == 1.0  # one worker leads
                for where, expr in expressions(board):
                    answer = await prom.query(_substitute(expr))
                    assert answer["status"] == "success", (where, expr, answer)
                    if not where.startswith("panel"):
                        continue
                    result = answer["data"]["result"]
                    assert result, f"{where}: no data over workers: {expr}"
                    if where.startswith("panel 'Leader'"):
                        assert len(result) == 1 and "worker" in result[0]["metric"]
                        continue
                    for r in result:
                        assert "worker" not in r["metric"], (where, r["metric"])
                    if "by (arm)" in expr or where == "panel 'Traffic weights' A":
                        assert len(result) == 2, (where, result)  # one per arm
                phase = await prom.query(_substitute(expressions(board)[0][1]))
                assert [r["metric"]["phase"] for r in phase["data"]["result"]] == ["running"]
                ratio_query = next(
                    e
                    for w, e in expressions(board)
                    if w.startswith("panel 'Candidate / production")
                )
                ratios = {
                    (r["metric"]["signal"], r["metric"]["quantile"]): float(r["value"][1])
                    for r in (await prom.query(_substitute(ratio_query)))["data"]["result"]
                }
                print(f"--workers 2: gauge ttft p50 ratio x{ratios[('ttft', '0.5')]:.3f}")
                assert ratios[("ttft", "0.5")] == pytest.approx(1.3, rel=0.05)
                assert (await task).ok > 500
