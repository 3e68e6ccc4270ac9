"""Functional tests of the open-loop load generator against real loopback servers."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from loadtest.fake_model import FakeModelConfig, running_fake_model, true_label
from loadtest.loadgen import (
    LatencySummary,
    LoadConfig,
    NonLoopbackURLError,
    ResponseRecord,
    check_loopback_url,
    run_load,
)

REPO = Path(__file__).resolve().parents[1]
QUICK = FakeModelConfig(model="prod", latency="fixed", latency_median=0.001, seed=2)


def fixed(latency: float, **changes: Any) -> FakeModelConfig:
    return replace(FakeModelConfig(latency="fixed", latency_median=latency), **changes)


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with running_fake_model(QUICK) as base:
        yield base


@pytest.mark.parametrize(
    "bad",
    [
        "http://10.0.0.1:8080/predict",
        "http://example.com/predict",
        "http://[2001:db8::1]/",
        "http://127.0.0.1.example.com/",
        "http://0.0.0.0:8080/",
        "ftp://127.0.0.1/",
    ],
)
def test_refuses_non_loopback(bad: str) -> None:
    with pytest.raises(NonLoopbackURLError):
        LoadConfig(url=bad, requests=1)


@pytest.mark.parametrize(
    "good",
    [
        "http://127.0.0.1:1/",
        "http://127.3.2.1/",
        "http://localhost:8080/x",
        "http://[::1]:1/",
        "http://[::ffff:127.0.0.1]/",
    ],
)
def test_accepts_loopback(good: str) -> None:
    assert check_loopback_url(good).port is not None


@pytest.mark.parametrize(
    "changes",
    [
        {"duration": None},
        {"rate": 0.0},
        {"duration": 1e6},
        {"requests": 0},
        {"max_in_flight": 0},
    ],
)
def test_config_must_be_bounded(changes: dict[str, float | None]) -> None:
    with pytest.raises(ValueError):  # each case has its own message
        LoadConfig(url="http://127.0.0.1:1/", **changes)  # type: ignore[arg-type]


def test_latency_summary_nearest_rank() -> None:
    summary = LatencySummary.of([float(i) for i in range(1, 101)])
    assert (summary.p50, summary.p90, summary.p99, summary.max) == (50.0, 90.0, 99.0, 100.0)
    assert math.isnan(LatencySummary.of([]).p50)


async def test_achieves_poisson_rate(url: str) -> None:
    rate, duration = 400.0, 1.5
    report = await run_load(LoadConfig(url=url + "/predict", rate=rate, duration=duration, seed=1))
    expected = rate * duration
    # Poisson count: 4 standard deviations is about 16% here.
    assert abs(report.sent - expected) <= 4 * math.sqrt(expected)
    assert report.achieved_rate == pytest.approx(rate, rel=0.2)
    assert report.send_window == pytest.approx(duration, abs=0.2)
    assert report.completed == report.ok == report.sent
    assert report.errors == {}
    assert report.dropped == 0
    assert report.status_counts == {200: report.sent}
    assert report.latency.p50 >= 0.001
    assert report.latency.p50 <= report.latency.p90 <= report.latency.p99 <= report.latency.max
    assert report.schedule_lag.p99 < 0.25


async def test_open_loop_does_not_wait_for_responses() -> None:
    async with running_fake_model(fixed(0.3)) as base:
        report = await run_load(LoadConfig(url=base + "/predict", rate=100, requests=40))
    # Closed loop would take 40 x 0.3 s = 12 s; open loop takes the ~0.4 s window plus 0.3 s.
    assert report.duration < 2.0
    assert report.completed == 40
    assert report.latency.p50 >= 0.3


async def test_in_flight_cap_drops_arrivals() -> None:
    async with running_fake_model(fixed(0.2)) as base:
        cfg = LoadConfig(url=base + "/predict", rate=200, requests=60, max_in_flight=3)
        report = await run_load(cfg)
    assert report.sent + report.dropped == 60
    assert report.dropped >= 40
    assert report.completed == report.sent


async def test_counts_http_errors_by_class() -> None:
    n, rate = 200, 0.5
    async with running_fake_model(fixed(0.0, error_rate=rate, seed=4)) as base:
        report = await run_load(LoadConfig(url=base + "/predict", rate=2000, requests=n))
    assert report.completed == n
    assert report.errors == {"5xx": report.status_counts[500]}
    assert abs(report.error_count - rate * n) <= 4 * math.sqrt(n * rate * (1 - rate))
    assert report.ok + report.error_count == n


async def test_counts_connection_errors_and_timeouts(url: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    refused = await run_load(LoadConfig(url=f"http://127.0.0.1:{closed_port}/", requests=5))
    assert refused.sent == 5
    assert refused.completed == 0
    assert sum(refused.errors.values()) == 5
    assert "timeout" not in refused.errors

    cfg = LoadConfig(url=url + "/sleep?s=5", body="empty", rate=50, requests=3, timeout=0.2)
    slow = await run_load(cfg)
    assert slow.errors == {"timeout": 3}
    assert slow.duration < 2.0


async def test_counts_arms_from_header() -> None:
    seen = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal seen
        seen += 1
        arm = "candidate" if seen % 4 == 0 else "production"
        return web.Response(text="{}", headers={"X-Canary-Arm": arm})

    app = web.Application()
    app.router.add_post("/predict", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        cfg = LoadConfig(url=f"http://127.0.0.1:{port}/predict", rate=1000, requests=100)
        report = await run_load(cfg)
    finally:
        await runner.cleanup()
    assert report.arms == {"production": 75, "candidate": 25}


async def test_sticky_users_reach_the_server(url: str) -> None:
    records: list[ResponseRecord] = []
    cfg = LoadConfig(
        url=url + "/echo", rate=1000, requests=100, users=5, on_response=records.append
    )
    report = await run_load(cfg)
    assert report.ok == 100
    users = set()
    for record in records:
        echoed = json.loads(record.body)
        assert echoed["headers"]["X-User-Id"] == record.user
        assert echoed["headers"]["Content-Type"] == "application/json"
        assert echoed["body_length"] == len(json.dumps(record.request_json, separators=(",", ":")))
        users.add(record.user)
    assert users <= {f"user-{i}" for i in range(5)}
    assert len(users) > 1


async def test_async_callback_can_score_feedback() -> None:
    n, accuracy = 400, 0.7
    correct: list[bool] = []

    async def feedback(record: ResponseRecord) -> None:
        await asyncio.sleep(0)
        prediction = json.loads(record.body)["prediction"]
        correct.append(prediction == true_label(record.request_json))

    async with running_fake_model(fixed(0.0, accuracy=accuracy, seed=9)) as base:
        cfg = LoadConfig(url=base + "/predict", rate=2000, requests=n, on_response=feedback)
        report = await run_load(cfg)
    assert report.callback_errors == 0
    assert len(correct) == n
    assert abs(sum(correct) - accuracy * n) <= 4 * math.sqrt(n * accuracy * (1 - accuracy))
    assert json.loads(json.dumps(report.to_dict()))["sent"] == n


async def test_callback_errors_are_counted_not_raised(url: str) -> None:
    def broken(record: ResponseRecord) -> None:
        raise RuntimeError("scenario bug")

    report = await run_load(
        LoadConfig(url=url + "/predict", rate=1000, requests=10, on_response=broken)
    )
    assert report.callback_errors == 10
    assert report.ok == 10


async def test_chat_stream_ttfb_is_measured() -> None:
    cfg = FakeModelConfig(ttft=0.05, inter_token=0.005, latency="fixed")
    async with running_fake_model(cfg) as base:
        load = LoadConfig(
            url=base + "/v1/chat/completions",
            body="chat-stream",
            max_tokens=5,
            rate=200,
            requests=20,
        )
        report = await run_load(load)
    assert report.ok == 20
    assert report.ttfb.p50 >= 0.045
    assert report.latency.p50 >= report.ttfb.p50 + 0.015


async def test_progress_lines_on_stderr(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    await run_load(LoadConfig(url=url + "/predict", rate=50, duration=1.3, progress=True))
    err = capsys.readouterr().err
    assert "sent" in err
    assert "p99" in err


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest.loadgen",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_json_and_summary(url: str) -> None:
    code, out, _ = await _cli(
        "--url", url + "/predict", "--rate", "200", "--requests", "40", "--json"
    )
    assert code == 0
    data = json.loads(out)
    assert data["sent"] == 40
    assert data["status_counts"] == {"200": 40}
    code, out, _ = await _cli("--url", url + "/predict", "--rate", "200", "--requests", "20")
    assert code == 0
    assert "latency  p50" in out


async def test_cli_refuses_non_loopback() -> None:
    code, _, err = await _cli("--url", "http://192.0.2.1/predict", "--requests", "1")
    assert code == 2
    assert "loopback" in err
