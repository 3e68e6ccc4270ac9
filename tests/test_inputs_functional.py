"""Input health over real loopback servers: JSON bodies through the proxy, /metrics read with
Prometheus' own parser, the admin API's rollout detail, and `on_drift: hold` in the controller."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from canary.admin.views import rollout_summary
from canary.config import load_config_text
from tests.conftest import fake_pair, rollout_config, running_canary

FIELDS = ["amount", "country", "features.age"]


def _docs(seed: int, n: int, mu: float = 50.0, p_null: float = 0.0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        amount = None if rng.random() < p_null else round(float(rng.normal(mu, 20.0)), 2)
        out.append(
            {
                "id": f"{seed}-{i}",
                "amount": amount,
                "country": ["DE", "FR", "US"][int(rng.integers(3))],
                "features": {"age": int(rng.integers(18, 80))},
            }
        )
    return out


async def _post_all(
    session: aiohttp.ClientSession, url: str, bodies: Iterable[Any], **kw: Any
) -> list[int]:
    sem = asyncio.Semaphore(32)

    async def one(body: Any) -> int:
        payload = {"json": body} if isinstance(body, dict) else {"data": body}
        async with sem, session.post(url, **payload, **kw) as r:
            await r.read()
            return r.status

    return list(await asyncio.gather(*(one(b) for b in bodies)))


async def _metrics(session: aiohttp.ClientSession, admin: str) -> dict[tuple[str, ...], float]:
    async with session.get(admin + "/metrics") as r:
        text = await r.text()
    out: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("canary_input_"):
                key = (s.name, *(f"{k}={v}" for k, v in sorted(s.labels.items())))
                out[key] = s.value
    return out


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_field_values_and_a_drift_flag_reach_metrics_and_the_admin_api(
    session: aiohttp.ClientSession,
) -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config([p], [c], inputs={"fields": FIELDS, "baseline": {"requests": 200}})
        async with running_canary(cfg) as can:
            base = _docs(1, 200, p_null=0.05)
            assert set(await _post_all(session, can.url + "/predict", base)) == {200}
            m = await _metrics(session, can.admin)
            assert m[("canary_input_baseline_learning", "rollout=m")] == 0
            assert m[("canary_input_drift", "field=amount", "rollout=m")] == 0
            assert ("canary_input_field_mean", "field=amount", "rollout=m") not in m  # no data

            shifted = _docs(2, 400, mu=70.0)  # +1 baseline std, and no more nulls
            assert set(await _post_all(session, can.url + "/predict", shifted)) == {200}
            m = await _metrics(session, can.admin)
            assert m[("canary_input_drift", "field=amount", "rollout=m")] == 0  # tested <1s ago
            await asyncio.sleep(1.05)  # the drift tests rerun at most once per second
            m = await _metrics(session, can.admin)
            async with session.get(can.admin + "/api/v1/rollouts/m") as r:
                detail = await r.json()

    def g(name: str, field: str, **labels: str) -> float:
        extra = [f"{k}={v}" for k, v in labels.items()]
        return m[(name, *sorted([f"field={field}", "rollout=m", *extra]))]

    assert m[("canary_input_requests_total", "result=inspected", "rollout=m")] == 600
    assert m[("canary_input_requests_total", "result=unparseable", "rollout=m")] == 0
    nulls = sum(d["amount"] is None for d in base)
    assert g("canary_input_field_values_total", "amount", type="null") == nulls
    assert g("canary_input_field_values_total", "amount", type="number") == 600 - nulls
    assert g("canary_input_field_values_total", "country", type="string") == 600
    assert g("canary_input_field_values_total", "features.age", type="number") == 600
    # The window since the baseline is exactly the second batch (the first was answered
    # before it was sent): exact figures.
    amounts = np.array([d["amount"] for d in shifted])
    assert g("canary_input_field_mean", "amount") == pytest.approx(amounts.mean())
    assert g("canary_input_field_min", "amount") == amounts.min()
    assert g("canary_input_field_max", "amount") == amounts.max()
    assert g("canary_input_field_null_ratio", "amount") == 0.0
    base_amounts = [d["amount"] for d in base if d["amount"] is not None]
    assert g("canary_input_baseline_mean", "amount") == pytest.approx(np.mean(base_amounts))
    assert g("canary_input_baseline_null_ratio", "amount") == pytest.approx(nulls / 200)
    assert g("canary_input_drift", "amount") == 1
    assert g("canary_input_drift", "country") == 0
    assert g("canary_input_drift", "features.age") == 0

    inputs = detail["inputs"]
    assert inputs["state"] == "monitoring" and inputs["drifted"] == ["amount"]
    assert inputs["baseline"] == {"source": "learned", "requests": 200, "target": 200}
    amount = inputs["fields"][0]
    assert amount["field"] == "amount" and amount["drifted"]
    mean = next(ch for ch in amount["checks"] if ch["check"] == "mean")
    assert mean["drifted"] and mean["lower"] > mean["tolerance"] > 0
    assert "shifted beyond" in mean["explain"]
    json.dumps(detail)  # JSON-safe: no NaN or inf


async def test_bodies_that_cannot_be_inspected_never_break_the_proxy(
    session: aiohttp.ClientSession,
) -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config([p], [c], inputs={"fields": FIELDS, "max_body": "16KiB"})
        cfg["proxy"]["replay_buffer"] = "64KiB"
        async with running_canary(cfg) as can:
            echo = can.url + "/echo"
            statuses = await _post_all(
                session,
                echo,
                [
                    b"plain text, not JSON",
                    b'{"amount": 1,',  # truncated JSON
                    b"\x00\xff\xfe binary",
                    b"[" * 8000 + b"]" * 8000,  # 16000 bytes, too deep for json.loads
                    b'{"amount": ' + b"7" * 5000 + b"}",  # an int longer than Python converts
                ],
                headers={"Content-Type": "application/json"},
            )
            big = json.dumps({"amount": 1, "pad": "x" * 30_000}).encode()
            statuses += await _post_all(session, echo, [big])  # over inputs.max_body

            async def chunks() -> AsyncIterator[bytes]:
                yield b'{"amount": '
                yield b"1}"

            async with session.post(echo, data=chunks()) as r:  # chunked: streamed upstream
                statuses.append(r.status)
                assert (await r.json())["body_length"] == len(b'{"amount": 1}')
            huge = b'{"amount": 1, "pad": "' + b"y" * 100_000 + b'"}'  # over replay_buffer
            statuses += await _post_all(session, echo, [huge])
            async with session.get(echo) as r:  # no body at all
                statuses.append(r.status)
            ok = await _post_all(session, can.url + "/predict", _docs(3, 20))
            m = await _metrics(session, can.admin)

    assert set(statuses) == {200} and set(ok) == {200}

    def result(name: str) -> float:
        return m[("canary_input_requests_total", f"result={name}", "rollout=m")]

    assert result("unparseable") == 5
    assert result("too_large") == 1
    assert result("not_inspected") == 3  # chunked, over the replay buffer, no body
    assert result("inspected") == 20
    assert m[("canary_input_field_values_total", "field=amount", "rollout=m", "type=number")] == 20


async def test_a_reload_keeps_the_baseline_unless_inputs_change(
    session: aiohttp.ClientSession,
) -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config([p], [c], inputs={"fields": FIELDS, "baseline": {"requests": 50}})
        async with running_canary(cfg) as can:
            await _post_all(session, can.url + "/predict", _docs(4, 60))
            monitor = can.proxy.routes["m"].inputs
            assert monitor is not None and not monitor.learning
            can.proxy.apply_config(load_config_text(json.dumps(cfg)))  # YAML is a JSON superset
            assert can.proxy.routes["m"].inputs is monitor
            cfg["rollouts"][0]["inputs"]["alpha"] = 0.001
            can.proxy.apply_config(load_config_text(json.dumps(cfg)))
            fresh = can.proxy.routes["m"].inputs
            assert fresh is not monitor and fresh is not None and fresh.learning
            m = await _metrics(session, can.admin)
            assert m[("canary_input_requests_total", "result=inspected", "rollout=m")] == 0


@pytest.mark.parametrize("on_drift", ["hold", "report"])
async def test_on_drift_hold_stops_the_controller_from_advancing(
    session: aiohttp.ClientSession, on_drift: str
) -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config(
            [p], [c],
            steps=[{"weight": 20, "min_duration": "3s"}, {"weight": 50}],
            analysis={"interval": "100ms", "burn_in": 0, "metrics": []},
            inputs={
                "fields": ["amount"],
                "baseline": {"fields": {"amount": {"mean": 50.0, "std": 20.0}}},
                "on_drift": on_drift,
            },
        )  # fmt: skip
        async with running_canary(cfg, controller=True) as can:
            started = time.monotonic()
            statuses = await _post_all(session, can.url + "/predict", _docs(5, 100, mu=90.0))
            monitor = can.proxy.routes["m"].inputs
            assert monitor is not None and monitor.drifted_fields(max_age=0) == ["amount"]
            assert time.monotonic() - started < 2.5, "the drift must show before min_duration"
            await asyncio.sleep(max(0.0, started + 4.0 - time.monotonic()))
            summary = rollout_summary(can.runtime.controller.view("m"))
            ok = await _post_all(session, can.url + "/predict", _docs(6, 10))
    assert set(statuses) == {200} and set(ok) == {200}
    if on_drift == "hold":
        assert summary["phase"] == "running" and summary["step"] == 1  # 1-based
        assert "input drift on fields amount" in summary["status"]
    else:
        assert summary["step"] == 2 or summary["phase"] == "promoted"
