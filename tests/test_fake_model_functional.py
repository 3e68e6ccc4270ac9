"""Functional tests of the fake model server over real loopback HTTP."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.fake_model import GZIP_BODY, FakeModelConfig, running_fake_model, true_label

REPO = Path(__file__).resolve().parents[1]
# Zero delays keep tests fast; tests about timing set their own.
FAST = FakeModelConfig(
    model="prod", latency="fixed", latency_median=0.0, ttft=0.0, inter_token=0.0, seed=1
)


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with running_fake_model(FAST) as base:
        yield base


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def server_timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        out[name] = float(dur)
    return out


async def post_all(
    session: aiohttp.ClientSession, url: str, bodies: Sequence[Any], concurrency: int = 64
) -> list[tuple[int, dict[str, Any], dict[str, str]]]:
    gate = asyncio.Semaphore(concurrency)

    async def one(body: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        async with gate, session.post(url, json=body) as resp:
            return resp.status, await resp.json(), dict(resp.headers)

    return await asyncio.gather(*(one(b) for b in bodies))


async def scrape(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with session.get(base + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="accuracy"):
        FakeModelConfig(accuracy=1.5)
    with pytest.raises(ValueError, match="latency"):
        FakeModelConfig(latency="uniform")  # type: ignore[arg-type]


def test_true_label_depends_on_id_else_features() -> None:
    assert true_label({"id": "a", "features": [1]}) == true_label({"id": "a", "features": [2]})
    assert true_label({"features": [1, 2]}) == true_label({"features": [1, 2], "x": 0})
    labels = [true_label({"id": f"r{i}"}) for i in range(4000)]
    assert set(labels) == {0, 1}
    # Balanced labels: within 4 binomial standard deviations of one half.
    assert abs(sum(labels) - 2000) <= 4 * math.sqrt(4000 * 0.25)


@pytest.mark.parametrize("path", ["/predict", "/v1/models/fraud:predict", "/v2/models/fraud/infer"])
async def test_predict_endpoints(url: str, http: aiohttp.ClientSession, path: str) -> None:
    async with http.post(url + path, json={"id": "abc", "features": [0.1, 0.2]}) as resp:
        assert resp.status == 200
        data = await resp.json()
        assert resp.headers["X-Model-Name"] == "prod"
        assert float(resp.headers["X-Model-Cost"]) == FAST.cost
        assert set(server_timing(resp.headers["Server-Timing"])) == {"inference", "queue"}
    assert data["model"] == "prod"
    assert data["id"] == "abc"
    assert data["prediction"] in (0, 1)
    assert (data["score"] >= 0.5) == (data["prediction"] == 1)


async def test_predict_rejects_bad_json(url: str, http: aiohttp.ClientSession) -> None:
    async with http.post(url + "/predict", data=b"{nope") as resp:
        assert resp.status == 400
        assert "error" in await resp.json()


async def test_accuracy_is_binomial_and_reproducible(http: aiohttp.ClientSession) -> None:
    n, accuracy = 1500, 0.8
    bodies = [{"id": f"r{i}", "features": [i]} for i in range(n)]
    cfg = replace(FAST, accuracy=accuracy, seed=7)
    async with running_fake_model(cfg) as base:
        first = await post_all(http, base + "/predict", bodies)
    async with running_fake_model(cfg) as base:
        again = await post_all(http, base + "/predict", bodies[::-1])
    async with running_fake_model(replace(cfg, seed=8)) as base:
        other = await post_all(http, base + "/predict", bodies)
    preds = [data["prediction"] for _, data, _ in first]
    correct = sum(p == true_label(b) for p, b in zip(preds, bodies, strict=True))
    # Four binomial standard deviations: a failure means the accuracy knob is wrong, not noise.
    assert abs(correct - accuracy * n) <= 4 * math.sqrt(n * accuracy * (1 - accuracy))
    # Answers depend on (seed, request), not on arrival order.
    assert [data["prediction"] for _, data, _ in again[::-1]] == preds
    assert [data["prediction"] for _, data, _ in other] != preds


async def test_report_correct_matches_true_label(http: aiohttp.ClientSession) -> None:
    bodies = [{"id": f"r{i}", "features": [i]} for i in range(400)]
    async with running_fake_model(replace(FAST, accuracy=0.7, report_correct=True)) as base:
        results = await post_all(http, base + "/predict", bodies)
    flags = [d["correct"] for _, d, _ in results]
    assert set(flags) == {0, 1}
    for (_, data, _), body in zip(results, bodies, strict=True):
        assert data["correct"] == int(data["prediction"] == true_label(body))
    # Off by default: the answer shape other tests and users rely on does not change.
    async with running_fake_model(FAST) as base:
        (_, data, _), *_ = await post_all(http, base + "/predict", bodies[:1])
    assert "correct" not in data


@pytest.mark.parametrize("accuracy", [0.0, 1.0])
async def test_accuracy_extremes(http: aiohttp.ClientSession, accuracy: float) -> None:
    bodies = [{"features": [i, i + 1]} for i in range(200)]
    async with running_fake_model(replace(FAST, accuracy=accuracy)) as base:
        results = await post_all(http, base + "/predict", bodies)
    correct = [
        d["prediction"] == true_label(b) for (_, d, _), b in zip(results, bodies, strict=True)
    ]
    assert all(correct) if accuracy == 1.0 else not any(correct)


async def test_error_rate_and_error_counter(http: aiohttp.ClientSession) -> None:
    n, rate = 1000, 0.25
    async with running_fake_model(replace(FAST, error_rate=rate, seed=3)) as base:
        results = await post_all(http, base + "/predict", [{"id": i} for i in range(n)])
        metrics = await scrape(http, base)
    failed = [data for status, data, _ in results if status == 500]
    assert {status for status, _, _ in results} == {200, 500}
    assert abs(len(failed) - rate * n) <= 4 * math.sqrt(n * rate * (1 - rate))
    assert all("error" in data for data in failed)
    assert metrics["fake_model_errors_total"] == len(failed)
    assert metrics["fake_model_requests_total"] == n


async def test_lognormal_latency_and_slowdown(http: aiohttp.ClientSession) -> None:
    n, median, sigma, slowdown = 300, 0.004, 0.5, 1.5
    cfg = FakeModelConfig(latency_median=median, latency_sigma=sigma, slowdown=slowdown, seed=5)
    async with running_fake_model(cfg) as base:
        results = await post_all(http, base + "/predict", [{"id": i} for i in range(n)])
    logs = [math.log(server_timing(h["Server-Timing"])["inference"] / 1000) for _, _, h in results]
    # The sample median of log-latency has sd ~ 1.25 sigma / sqrt(n) = 0.036; allow 4 sd.
    assert abs(statistics.median(logs) - math.log(median * slowdown)) < 0.15
    # The sample sd of a normal has sd ~ sigma / sqrt(2n) = 0.02; allow 5 sd.
    assert abs(statistics.stdev(logs) - sigma) < 0.1


async def test_fixed_latency_slowdown_is_wall_clock(http: aiohttp.ClientSession) -> None:
    cfg = replace(FAST, latency_median=0.05, slowdown=2.0)
    async with running_fake_model(cfg) as base:
        t0 = time.perf_counter()
        async with http.post(base + "/predict", json={"id": 1}) as resp:
            assert server_timing(resp.headers["Server-Timing"])["inference"] == pytest.approx(100)
        assert time.perf_counter() - t0 >= 0.1


async def test_max_concurrency_queues_requests(http: aiohttp.ClientSession) -> None:
    cfg = replace(FAST, latency_median=0.02, max_concurrency=1)
    async with running_fake_model(cfg) as base:
        t0 = time.perf_counter()
        results = await post_all(http, base + "/predict", [{"id": i} for i in range(5)])
        elapsed = time.perf_counter() - t0
    queues = sorted(server_timing(h["Server-Timing"])["queue"] for _, _, h in results)
    assert elapsed >= 0.1
    assert queues[0] < 5
    assert queues[-1] >= 60


async def test_chat_completion_usage() -> None:
    async with running_fake_model(FAST) as base, httpx.AsyncClient() as client:
        body = {"model": "x", "messages": [{"role": "user", "content": "one two three"}]}
        resp = await client.post(base + "/v1/chat/completions", json={**body, "max_tokens": 7})
        default = await client.post(base + "/v1/chat/completions", json=body)
    assert resp.status_code == 200
    assert resp.headers["x-model-cost"] == str(FAST.cost)
    data = resp.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == "prod"
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert default.json()["usage"]["completion_tokens"] == FAST.completion_tokens


async def test_chat_stream_events_spread_over_time(http: aiohttp.ClientSession) -> None:
    cfg = replace(FAST, ttft=0.1, inter_token=0.02)
    body = {
        "model": "x",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 10,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with running_fake_model(cfg) as base:
        t0 = time.perf_counter()
        async with http.post(base + "/v1/chat/completions", json=body) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = [
                (time.perf_counter() - t0, line[6:].strip().decode())
                async for line in resp.content
                if line.startswith(b"data: ")
            ]
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 10
    content = [c for c in chunks if c["choices"] and "content" in c["choices"][0]["delta"]]
    assert len(content) == 10
    first, last = events[0][0], events[-1][0]
    assert first >= 0.09  # the time to first token
    assert last - first >= 0.8 * 9 * 0.02  # tokens did not arrive in one burst


async def test_openai_client_streams_with_usage() -> None:
    async with running_fake_model(replace(FAST, ttft=0.01, inter_token=0.002)) as base:
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        try:
            stream = await client.chat.completions.create(
                model="anything",
                messages=[{"role": "user", "content": "say five words"}],
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
            )
            text, usage, models = "", None, set()
            async for chunk in stream:
                models.add(chunk.model)
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if chunk.usage is not None:
                    usage = chunk.usage
            plain = await client.chat.completions.create(
                model="anything", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
        finally:
            await client.close()
    assert models == {"prod"}
    assert len(text.split()) == 5
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 5, 8)
    assert plain.usage is not None
    assert plain.usage.completion_tokens == 3
    assert plain.choices[0].message.content


async def test_metrics_resources(http: aiohttp.ClientSession) -> None:
    base_cfg = replace(FAST, gpu_utilization=0.2, gpu_utilization_per_busy=0.01)
    heavy_cfg = replace(
        base_cfg, model="cand", memory_overhead_ratio=0.4, cpu_overhead_per_request=10.0
    )
    async with running_fake_model(base_cfg) as prod, running_fake_model(heavy_cfg) as cand:
        idle = await scrape(http, prod)
        await post_all(http, cand + "/predict", [{"id": i} for i in range(3)])
        heavy = await scrape(http, cand)
        again = await scrape(http, prod)
    assert idle["process_cpu_seconds_total"] > 0
    assert idle["process_resident_memory_bytes"] > 1e6
    # Both servers share this process, so their real RSS is the same up to recent allocations.
    ratio = heavy["process_resident_memory_bytes"] / again["process_resident_memory_bytes"]
    assert ratio == pytest.approx(1.4, rel=0.05)
    assert heavy["process_cpu_seconds_total"] >= 30.0
    assert idle["gpu_utilization_ratio"] == pytest.approx(0.2)
    assert 0.0 <= heavy["gpu_utilization_ratio"] <= 1.0


async def test_gpu_utilization_rises_with_load(http: aiohttp.ClientSession) -> None:
    cfg = replace(FAST, latency_median=0.05, gpu_utilization=0.2, gpu_utilization_per_busy=0.05)
    async with running_fake_model(cfg) as base:
        await scrape(http, base)
        await post_all(http, base + "/predict", [{"id": i} for i in range(20)])
        loaded = await scrape(http, base)
        idle = await scrape(http, base)
    assert loaded["gpu_utilization_ratio"] > 0.3
    assert idle["gpu_utilization_ratio"] == pytest.approx(0.2)


async def test_memory_overhead_bytes(http: aiohttp.ClientSession) -> None:
    async with running_fake_model(replace(FAST, memory_overhead_bytes=10**10)) as base:
        assert (await scrape(http, base))["process_resident_memory_bytes"] > 10**10


async def test_healthz_and_model_header() -> None:
    async with (
        running_fake_model(FAST) as prod,
        running_fake_model(replace(FAST, model="cand")) as cand,
        httpx.AsyncClient() as client,
    ):
        p, c = await client.get(prod + "/healthz"), await client.get(cand + "/healthz")
    assert p.json() == {"status": "ok", "model": "prod"}
    assert (p.headers["x-model-name"], c.headers["x-model-name"]) == ("prod", "cand")


async def test_echo_reports_what_it_received(url: str, http: aiohttp.ClientSession) -> None:
    payload = os.urandom(300_000)
    headers = {"X-Test": "yes", "X-User-Id": "u1"}
    async with http.put(url + "/echo/a/b?x=1&x=2&y=z", data=payload, headers=headers) as resp:
        data = await resp.json()
    assert data["method"] == "PUT"
    assert data["path"] == "/echo/a/b"
    assert data["query"] == {"x": ["1", "2"], "y": ["z"]}
    assert data["query_string"] == "x=1&x=2&y=z"
    assert data["headers"]["X-Test"] == "yes"
    assert ["X-User-Id", "u1"] in data["raw_headers"]
    assert data["body_length"] == len(payload)
    assert data["body_sha256"] == hashlib.sha256(payload).hexdigest()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"abc"

    async with http.post(url + "/echo", data=chunks()) as resp:
        chunked = await resp.json()
    assert chunked["headers"]["Transfer-Encoding"] == "chunked"
    assert chunked["body_length"] == 9
    async with http.delete(url + "/echo") as resp:
        assert (await resp.json())["body_length"] == 0


async def test_stream_chunks_arrive_over_time(url: str, http: aiohttp.ClientSession) -> None:
    t0 = time.perf_counter()
    arrivals: list[float] = []
    body = b""
    async with http.get(url + "/stream?chunks=4&interval=0.1") as resp:
        assert resp.headers["Transfer-Encoding"] == "chunked"
        async for data in resp.content.iter_any():
            arrivals.append(time.perf_counter() - t0)
            body += data
    assert body == b"".join(f"chunk {i}\n".encode() for i in range(4))
    assert arrivals[0] < arrivals[-1] - 0.2


async def test_sse_events_arrive_over_time(url: str, http: aiohttp.ClientSession) -> None:
    t0 = time.perf_counter()
    async with http.get(url + "/sse?events=4&interval=0.1") as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        events = [
            time.perf_counter() - t0 async for line in resp.content if line.startswith(b"data: ")
        ]
    assert len(events) == 4
    assert events[0] < events[-1] - 0.2


async def test_bytes_are_seeded(url: str, http: aiohttp.ClientSession) -> None:
    async def get(query: str) -> tuple[bytes, dict[str, str]]:
        async with http.get(url + "/bytes?" + query) as resp:
            assert resp.status == 200
            return await resp.read(), dict(resp.headers)

    data, headers = await get("n=1000000")
    assert len(data) == 1_000_000
    assert hashlib.sha256(data).hexdigest() == headers["X-Content-Sha256"]
    assert (await get("n=1000000"))[0] == data
    chunked, chunked_headers = await get("n=1000000&chunked=1")
    assert chunked == data
    assert chunked_headers["Transfer-Encoding"] == "chunked"
    assert (await get("n=1000&seed=99"))[0] != data[:1000]
    async with http.get(url + "/bytes?n=1e12") as resp:
        assert resp.status == 400


async def test_gzip_body_is_really_gzipped(url: str) -> None:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as raw,
        raw.get(url + "/gzip") as resp,
    ):
        assert resp.headers["Content-Encoding"] == "gzip"
        body = await resp.read()
    assert body[:2] == b"\x1f\x8b"
    assert gzip.decompress(body) == GZIP_BODY
    async with httpx.AsyncClient() as client:
        assert (await client.get(url + "/gzip")).content == GZIP_BODY


@pytest.mark.parametrize("code", [200, 201, 404, 418, 503])
async def test_status(url: str, http: aiohttp.ClientSession, code: int) -> None:
    async with http.post(url + f"/status/{code}") as resp:
        assert resp.status == code
        assert (await resp.json())["status"] == code


async def test_status_edge_cases(url: str, http: aiohttp.ClientSession) -> None:
    async with http.get(url + "/status/204") as resp:
        assert resp.status == 204
        assert await resp.read() == b""
    for bad in ("99", "600", "abc"):
        async with http.get(url + f"/status/{bad}") as resp:
            assert resp.status == 400


async def test_sleep_and_client_timeout(url: str, http: aiohttp.ClientSession) -> None:
    t0 = time.perf_counter()
    async with http.get(url + "/sleep?s=0.05") as resp:
        assert (await resp.json())["slept"] == 0.05
    assert time.perf_counter() - t0 >= 0.05
    with pytest.raises(asyncio.TimeoutError):
        async with http.get(url + "/sleep?s=5", timeout=aiohttp.ClientTimeout(total=0.1)):
            pass
    async with http.get(url + "/sleep?s=100000") as resp:
        assert resp.status == 400


async def test_set_cookie(url: str) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(url + "/set-cookie") as resp:
            assert len(resp.headers.getall("Set-Cookie")) == 2
        async with http.get(url + "/set-cookie?a=1&b=2&c=3") as resp:
            cookies = resp.headers.getall("Set-Cookie")
    assert [c.split(";")[0] for c in cookies] == ["a=1", "b=2", "c=3"]


async def test_cli_serves_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest.fake_model",
        "--port=0",
        "--model=cli-model",
        "--latency=fixed",
        "--latency-median=1ms",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        base = line.rsplit(" ", 1)[-1].strip()
        assert base.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient() as client:
            resp = await client.post(base + "/predict", json={"id": 1})
        assert resp.json()["model"] == "cli-model"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_rejects_bad_config() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest.fake_model",
        "--accuracy=2",
        cwd=REPO,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 2
    assert b"accuracy" in err
