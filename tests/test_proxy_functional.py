"""The data plane end to end: real fake-model servers, a real canary, real HTTP clients."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import math
import time
from collections import Counter

import aiohttp
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from canary.observe import Weights
from canary.proxy.routing import sticky_hash
from loadtest.fake_model import GZIP_BODY, FakeModelConfig, running_fake_model
from tests.conftest import fake_pair, rollout_config, running_canary


async def _arms(session: aiohttp.ClientSession, url: str, n: int, **kw: object) -> Counter[str]:
    sem = asyncio.Semaphore(32)
    counts: Counter[str] = Counter()

    async def one(i: int) -> None:
        async with sem, session.post(url, json={"id": str(i), "features": [i]}, **kw) as r:  # type: ignore[arg-type]
            await r.read()
            assert r.status == 200
            counts[r.headers["X-Canary-Arm"]] += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    return counts


async def test_split_follows_weight_within_binomial_bounds() -> None:
    n, weight = 2000, 25
    async with fake_pair() as (p, c):
        async with running_canary(rollout_config([p], [c], steps=[{"weight": weight}])) as can:
            async with aiohttp.ClientSession() as s:
                counts = await _arms(s, can.url + "/predict", n)
            acc = await can.samples("m")
    expected = n * weight / 100
    sd = math.sqrt(n * 0.25 * 0.75)
    assert abs(counts["candidate"] - expected) < 4.5 * sd, counts  # false failure ~7e-6
    assert counts["candidate"] + counts["production"] == n
    # every randomised request is recorded for the analysis, with its arm's probability
    assert acc.candidate.routed == counts["candidate"] == acc.candidate.observed
    assert set(acc.candidate.signals["latency"].strata) == {0.25}
    assert set(acc.production.signals["latency"].strata) == {0.75}


async def test_sticky_users_keep_their_arm_and_only_move_to_the_candidate() -> None:
    users = [f"user-{i}" for i in range(400)]
    cfg = rollout_config([], [], steps=[{"weight": 10}])
    async with fake_pair() as (p, c):
        cfg = rollout_config(
            [p], [c], steps=[{"weight": 10}, {"weight": 40}],
            routing={"sticky": {"header": "X-User-Id"}},
        )  # fmt: skip
        async with running_canary(cfg) as can, aiohttp.ClientSession() as s:

            async def arm_of(user: str) -> str:
                async with s.get(can.url + "/echo", headers={"X-User-Id": user}) as r:
                    return r.headers["X-Canary-Arm"]

            first = {u: await arm_of(u) for u in users}
            again = {u: await arm_of(u) for u in users}
            assert first == again  # sticky
            can.proxy.set_weights("m", Weights(candidate=40))
            later = {u: await arm_of(u) for u in users}
    moved_back = [u for u in users if first[u] == "candidate" and later[u] != "candidate"]
    assert moved_back == []  # raising the weight never moves a user back to production
    share_before = sum(a == "candidate" for a in first.values()) / len(users)
    share_after = sum(a == "candidate" for a in later.values()) / len(users)
    assert 0.04 < share_before < 0.17 and 0.31 < share_after < 0.49


async def test_sticky_requests_are_recorded_with_their_users_cluster() -> None:
    users = [f"user-{i}" for i in range(120)]
    async with fake_pair() as (p, c):
        cfg = rollout_config(
            [p], [c], steps=[{"weight": 30}], routing={"sticky": {"header": "X-User-Id"}}
        )
        async with running_canary(cfg) as can, aiohttp.ClientSession() as s:
            for u in users * 2:
                async with s.post(can.url + "/predict", json={"features": [1]},
                                  headers={"X-User-Id": u}) as r:  # fmt: skip
                    assert r.status == 200
            async with s.post(can.url + "/predict", json={"features": [1]}) as r:
                assert r.status == 200  # no sticky key: randomised, recorded without a cluster
            acc = await can.samples("m")
    expected: dict[str, Counter[int]] = {"production": Counter(), "candidate": Counter()}
    for u in users:
        point, cluster = sticky_hash("m", u)
        expected["candidate" if point < 30 else "production"][cluster] += 2
    for arm in ("production", "candidate"):
        lat = acc.arms[arm].signals["latency"]
        (p_arm,) = lat.clusters  # one stratum
        got = Counter({g: n for g, n in enumerate(lat.clusters[p_arm].n) if n})
        assert got == expected[arm]
    total = acc.production.observed + acc.candidate.observed
    assert total == 2 * len(users) + 1


async def test_sticky_cookie() -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config(
            [p], [c], steps=[{"weight": 50}], routing={"sticky": {"cookie": "uid"}}
        )
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            arms = set()
            for _ in range(20):
                r = await client.get(can.url + "/echo", headers={"Cookie": "a=1; uid=alice; b=2"})
                arms.add(r.headers["x-canary-arm"])
            assert len(arms) == 1


async def test_override_header_forces_an_arm_and_stays_out_of_the_analysis() -> None:
    async with fake_pair() as (p, c):
        async with running_canary(rollout_config([p], [c], steps=[{"weight": 0}])) as can:
            async with httpx.AsyncClient() as client:
                r = await client.get(can.url + "/echo", headers={"X-Canary-Arm": "candidate"})
                assert r.headers["x-canary-arm"] == "candidate"
                assert r.headers["x-model-name"] == "candidate"
                r = await client.get(can.url + "/echo", headers={"X-Canary-Arm": "bogus"})
                assert r.headers["x-canary-arm"] == "production"  # unknown values are ignored
            acc = await can.samples("m")
            assert acc.candidate.observed == 0 and acc.production.observed == 1


async def test_forwarding_rewrites_only_what_a_proxy_must() -> None:
    async with fake_pair() as (p, c):
        async with running_canary(rollout_config([p], [c], steps=[{"weight": 0}])) as can:
            async with httpx.AsyncClient() as client:
                r = await client.post(
                    can.url + "/echo/a%2Fb?x=1&y=%20z",
                    content=b"hello",
                    headers={
                        "X-Request-Id": "req-123",
                        "X-Forwarded-For": "10.1.1.1",
                        "Connection": "keep-alive, X-Secret-Hop",
                        "X-Secret-Hop": "drop me",
                        "Keep-Alive": "timeout=5",
                        "X-Custom": "kept",
                        "Host": "models.example.com",
                        "Content-Type": "text/plain",
                    },
                )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "req-123"
    echo = r.json()
    h = {k.lower(): v for k, v in echo["headers"].items()}
    assert echo["method"] == "POST"
    assert echo["path"] == "/echo/a%2Fb" or echo["path"] == "/echo/a/b"
    assert echo["query"] == {"x": ["1"], "y": [" z"]}
    assert echo["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert h["x-custom"] == "kept" and h["content-type"] == "text/plain"
    assert "x-secret-hop" not in h and "keep-alive" not in h
    assert h["x-forwarded-for"] == "10.1.1.1, 127.0.0.1"
    assert h["x-forwarded-host"] == "models.example.com"
    assert h["x-forwarded-proto"] == "http"
    assert h["x-request-id"] == "req-123"
    assert h["host"] == p.removeprefix("http://")  # upstream chosen by config, not Host
    assert "accept-encoding" not in h or h["accept-encoding"] == "gzip, deflate"
    assert "user-agent" not in h or "aiohttp" not in h["user-agent"].lower()


async def test_new_request_id_when_client_sends_none_or_garbage() -> None:
    async with fake_pair() as (p, c), running_canary(rollout_config([p], [c])) as can:
        async with httpx.AsyncClient() as client:
            a = await client.get(can.url + "/echo")
            b = await client.get(can.url + "/echo", headers={"X-Request-Id": "bad id; drop table"})
    assert len(a.headers["x-request-id"]) == 32
    assert len(b.headers["x-request-id"]) == 32
    assert a.headers["x-request-id"] != b.headers["x-request-id"]


async def test_gzip_body_passes_through_byte_for_byte() -> None:
    async with fake_pair() as (p, c), running_canary(rollout_config([p], [c])) as can:
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.get(can.url + "/gzip", headers={"Accept-Encoding": "gzip"}) as r:
                raw = await r.read()
                assert r.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(raw) == GZIP_BODY


async def test_sse_first_event_arrives_while_upstream_is_still_sending() -> None:
    async with fake_pair() as (p, c), running_canary(rollout_config([p], [c])) as can:
        async with aiohttp.ClientSession() as s:
            t0 = time.perf_counter()
            async with s.get(can.url + "/sse?events=5&interval=0.3") as r:
                assert r.headers["Content-Type"].startswith("text/event-stream")
                first = await r.content.readuntil(b"\n\n")
                t_first = time.perf_counter() - t0
                rest = await r.read()
                t_all = time.perf_counter() - t0
    assert first.startswith(b"data:") or first.startswith(b"id:") or b"data:" in first
    assert rest.count(b"data:") >= 3
    assert t_all > 1.1  # the upstream took ~1.2 s to send all events
    assert t_first < 0.5, (t_first, t_all)  # ...and the first reached the client long before


async def test_chunked_response_is_not_buffered() -> None:
    async with fake_pair() as (p, c), running_canary(rollout_config([p], [c])) as can:
        async with aiohttp.ClientSession() as s:
            t0 = time.perf_counter()
            async with s.get(can.url + "/stream?chunks=4&interval=0.25") as r:
                assert "Content-Length" not in r.headers
                first = await r.content.readany()
                t_first = time.perf_counter() - t0
                body = first + await r.read()
    assert first and t_first < 0.3
    assert len(body) > len(first)


async def test_candidate_down_fails_over_to_production() -> None:
    async with running_fake_model(FakeModelConfig(model="production", latency="fixed")) as p:
        dead = "http://127.0.0.1:9"  # discard port: nothing listens
        cfg = rollout_config([p], [dead], steps=[{"weight": 100}])
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            rs = [await client.post(can.url + "/predict", json={"id": str(i)}) for i in range(10)]
            metrics = (await client.get(can.admin + "/metrics")).text
            acc = await can.samples("m")
    assert all(r.status_code == 200 for r in rs)
    assert {r.headers["x-canary-arm"] for r in rs} == {"production"}
    assert {r.headers["x-model-name"] for r in rs} == {"production"}
    assert acc.candidate.errors == 10 and acc.candidate.error_kinds == {"connect": 10}
    assert acc.production.observed == 0  # failover answers are not randomised: not analysed
    assert 'canary_failovers_total{rollout="m"} 10.0' in metrics


async def test_candidate_5xx_fails_over_and_counts_as_candidate_error() -> None:
    # A 5xx means the candidate may have processed the POST: it is replayed on production
    # only with `failover_methods: all` (tests/test_conformance_upstream.py has the default).
    routing = {"override_header": "X-Canary-Arm", "timeout": "5s", "failover_methods": "all"}
    async with fake_pair(candidate={"error_rate": 1.0}) as (p, c):
        cfg = rollout_config([p], [c], steps=[{"weight": 100}], routing=routing)
        async with running_canary(cfg) as can:
            async with httpx.AsyncClient() as client:
                r = await client.post(can.url + "/predict", json={"id": "1"})
            acc = await can.samples("m")
    assert r.status_code == 200 and r.headers["x-model-name"] == "production"
    assert acc.candidate.error_kinds == {"status": 1}


async def test_no_failover_when_disabled() -> None:
    async with fake_pair(candidate={"error_rate": 1.0}) as (p, c):
        cfg = rollout_config(
            [p], [c], steps=[{"weight": 100}], routing={"failover": False, "timeout": "5s"}
        )
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            r = await client.post(can.url + "/predict", json={"id": "1"})
    assert r.status_code == 500 and r.headers["x-canary-arm"] == "candidate"


async def test_production_down_answers_502_with_json_and_request_id() -> None:
    cfg = rollout_config(["http://127.0.0.1:9"], ["http://127.0.0.1:19"], steps=[{"weight": 0}])
    async with running_canary(cfg) as can, httpx.AsyncClient() as client:
        r = await client.get(can.url + "/anything", headers={"X-Request-Id": "abc"})
        health = await client.get(can.admin + "/healthz")
    assert r.status_code == 502
    body = r.json()
    assert body["request_id"] == "abc" and "production" in body["error"]
    assert health.status_code == 200


async def test_round_robin_and_dead_endpoint_in_pool() -> None:
    async with fake_pair() as (p, c):
        pool = ["http://127.0.0.1:9", p]  # one dead endpoint, one live
        async with running_canary(rollout_config(pool, [c], steps=[{"weight": 0}])) as can:
            async with httpx.AsyncClient() as client:
                rs = [await client.get(can.url + "/echo") for _ in range(6)]
    assert all(r.status_code == 200 for r in rs)  # a refused connect is retried elsewhere


async def test_upstream_timeout_answers_504() -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config(
            [p], [c], steps=[{"weight": 0}], routing={"timeout": "300ms", "failover": True}
        )
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            t0 = time.perf_counter()
            r = await client.get(can.url + "/sleep?s=3")
            took = time.perf_counter() - t0
            acc = await can.samples("m")
    assert r.status_code == 504 and took < 2.0
    assert acc.production.error_kinds == {"timeout": 1}


async def test_large_bodies_stream_both_ways() -> None:
    big = bytes(range(256)) * (5 * 4096)  # 5 MiB: above the replay buffer, streamed up
    async with fake_pair() as (p, c), running_canary(rollout_config([p], [c])) as can:
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(can.url + "/echo", content=big)
            down = await client.get(can.url + "/bytes?n=8000000")
    assert r.status_code == 200
    assert r.json()["body_sha256"] == hashlib.sha256(big).hexdigest()
    assert down.status_code == 200 and len(down.content) == 8_000_000


async def test_body_limits_answer_413() -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config([p], [c])
        cfg["proxy"]["max_body_size"] = "64KiB"
        cfg["proxy"]["replay_buffer"] = "16KiB"
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            declared = await client.post(can.url + "/echo", content=b"x" * 100_000)

            async def chunks():  # no Content-Length: the limit is enforced while streaming
                for _ in range(10):
                    yield b"y" * 10_000

            streamed = await client.post(can.url + "/echo", content=chunks())
            ok = await client.post(can.url + "/echo", content=b"z" * 50_000)
    assert declared.status_code == 413 and declared.json()["status"] == 413
    assert streamed.status_code == 413
    assert ok.status_code == 200


async def test_malformed_and_oversized_requests_do_not_hurt_the_proxy() -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config([p], [c])
        cfg["proxy"]["max_header_size"] = "4KiB"
        async with running_canary(cfg) as can:
            port = can.runtime.proxy_port
            bad = [
                b"GARBAGE\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n",
                b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                b"GET /\x00 HTTP/1.1\r\n\r\n",
                b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # a TLS hello
            ]
            statuses = []
            for raw in bad:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(raw)
                await writer.drain()
                try:
                    line = await asyncio.wait_for(reader.readline(), 5)
                finally:
                    writer.close()
                statuses.append(line.split(b" ")[1] if line else b"closed")
            async with httpx.AsyncClient() as client:
                after = await client.get(can.url + "/echo")
    assert all(s in (b"400", b"413", b"431", b"closed") for s in statuses), statuses
    assert after.status_code == 200


async def test_client_that_disconnects_mid_stream_is_counted() -> None:
    async with fake_pair() as (p, c):
        async with running_canary(rollout_config([p], [c], steps=[{"weight": 0}])) as can:
            async with aiohttp.ClientSession() as s:
                async with s.get(can.url + "/stream?chunks=20&interval=0.05") as r:
                    await r.content.readany()
                    r.close()
            await asyncio.sleep(0.3)
            async with httpx.AsyncClient() as client:
                metrics = (await client.get(can.admin + "/metrics")).text
                again = await client.get(can.url + "/echo")
    assert 'canary_client_disconnects_total{rollout="m"} 1.0' in metrics
    assert again.status_code == 200


async def test_no_route_answers_404() -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config([p], [c], match={"path_prefix": "/v1"})
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            miss = await client.get(can.url + "/v10/x")
            hit = await client.get(can.url + "/v1")
    assert miss.status_code == 404 and "no rollout" in miss.json()["error"]
    assert hit.status_code == 404 and hit.headers["x-canary-arm"] in ("production", "candidate")


async def test_shadow_mirrors_to_the_candidate_and_users_get_production() -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config([p], [c], steps=[{"shadow": {"min_requests": 10}}, {"weight": 5}])
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            rs = [await client.post(can.url + "/predict", json={"id": str(i)}) for i in range(20)]
            for _ in range(50):
                if (await can.samples("m")).candidate.observed == 20:
                    break
                await asyncio.sleep(0.02)
            acc = await can.samples("m")
    assert {r.headers["x-model-name"] for r in rs} == {"production"}
    assert acc.candidate.shadow == 20 and acc.candidate.observed == 20
    assert acc.production.observed == 20


async def test_signals_are_extracted_per_arm() -> None:
    async with fake_pair(candidate={"cost": 0.002}) as (p, c):
        cfg = rollout_config(
            [p],
            [c],
            steps=[{"weight": 50}],
            prediction="json:prediction",
            analysis={
                "metrics": [
                    {"name": "cost_h", "signal": "header:X-Model-Cost", "max_increase": "5%"},
                    {"name": "inf", "signal": "server_timing:inference", "max_increase": "5%"},
                    {"name": "score", "signal": "json:score", "max_increase": "5%"},
                    {"name": "cost", "signal": "cost", "max_increase": "5%"},
                ]
            },
        )
        cfg["rollouts"][0]["production"]["cost"] = {"per_request": 0.01, "header": "X-Model-Cost"}
        cfg["rollouts"][0]["candidate"]["cost"] = {"per_request": 0.01, "header": "X-Model-Cost"}
        async with running_canary(cfg) as can, aiohttp.ClientSession() as s:
            await _arms(s, can.url + "/predict", 200)
            metrics = await (await s.get(can.admin + "/metrics")).text()
            acc = await can.samples("m")
    cand = acc.candidate.signals
    assert cand["header:x-model-cost"].mean == pytest.approx(0.002)
    assert cand["cost"].mean == pytest.approx(0.012)
    assert acc.production.signals["cost"].mean == pytest.approx(0.011)
    assert cand["server_timing:inference"].n == acc.candidate.observed
    assert 0.0 <= cand["json:score"].mean <= 1.0
    assert 'canary_cost_per_1k_requests{arm="candidate",rollout="m"} 12.0' in metrics


async def test_metrics_parse_with_prometheus_parser_and_health_endpoints() -> None:
    async with fake_pair() as (p, c):
        async with running_canary(rollout_config([p], [c], steps=[{"weight": 50}])) as can:
            async with httpx.AsyncClient() as client:
                for i in range(30):
                    await client.post(can.url + "/predict", json={"id": str(i)})
                text = (await client.get(can.admin + "/metrics")).text
                health = await client.get(can.admin + "/healthz")
                ready = await client.get(can.admin + "/readyz")
                rollouts = (await client.get(can.admin + "/api/v1/rollouts")).json()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = sum(
        s.value for s in families["canary_requests"].samples if s.name == "canary_requests_total"
    )
    assert requests == 30
    hist = families["canary_request_duration_seconds"]
    counts = [s for s in hist.samples if s.name.endswith("_count")]
    assert sum(s.value for s in counts) == 30
    weights = {s.labels["arm"]: s.value for s in families["canary_traffic_weight_ratio"].samples}
    assert weights == {"production": 0.5, "candidate": 0.5}
    assert "canary_time_to_first_byte_seconds" in families
    assert health.json() == {"status": "ok"} and ready.status_code == 200
    assert rollouts["rollouts"][0]["weights"]["candidate"] == 50.0


async def test_openai_client_streams_a_chat_completion_through_the_proxy() -> None:
    openai = pytest.importorskip("openai")
    async with fake_pair(production={"ttft": 0.05, "inter_token": 0.01}) as (p, c):
        cfg = rollout_config(
            [p],
            [c],
            steps=[{"weight": 0}],
            analysis={
                "metrics": [
                    {"name": "tokens", "signal": "json:usage.total_tokens", "max_increase": "5%"},
                    {"name": "tps", "signal": "tokens_per_s", "max_decrease": "5%"},
                ]
            },
        )
        async with running_canary(cfg) as can:
            client = openai.AsyncOpenAI(base_url=can.url + "/v1", api_key="test", max_retries=0)
            stream = await client.chat.completions.create(
                model="fake",
                messages=[{"role": "user", "content": "hello"}],
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=8,
            )
            text, usage = "", None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                if chunk.usage is not None:
                    usage = chunk.usage
            await client.close()
            acc = await can.samples("m")
    assert text and usage is not None and usage.completion_tokens == 8
    prod = acc.production.signals
    assert prod["json:usage.total_tokens"].mean == usage.total_tokens
    assert prod["ttft"].mean >= 0.04
    assert prod["tokens_per_s"].n == 1


async def test_fuzzed_requests_never_crash_the_proxy() -> None:
    import random

    rng = random.Random(7)
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "FOO"]
    async with fake_pair() as (p, c):
        async with running_canary(rollout_config([p], [c], steps=[{"weight": 50}])) as can:
            async with httpx.AsyncClient() as client:
                for _ in range(150):
                    path = "/" + "".join(
                        rng.choice("ab/%?&=.~-_x") for _ in range(rng.randrange(30))
                    )
                    headers = {
                        "X-Canary-Arm": rng.choice(["candidate", "", "x" * 100, "production"]),
                        "X-Request-Id": "".join(rng.choice("ab\t -") for _ in range(5)),
                        "Cookie": rng.choice(["", "uid", "=;;=", "a=b"]),
                        "Content-Type": rng.choice(["application/json", "text/event-stream"]),
                    }
                    body = bytes(rng.randrange(256) for _ in range(rng.randrange(100)))
                    try:
                        r = await client.request(
                            rng.choice(methods), can.url + path, headers=headers, content=body
                        )
                    except httpx.HTTPError:
                        continue
                    assert r.status_code < 600
                ok = await client.get(can.url + "/echo")
    assert ok.status_code == 200


def test_json_error_body_shape() -> None:
    from canary.proxy.h1_server import error_body

    body = error_body(502, "upstream production failed: connect", "rid-1")
    assert json.loads(body) == {
        "error": "upstream production failed: connect",
        "status": 502,
        "request_id": "rid-1",
    }
