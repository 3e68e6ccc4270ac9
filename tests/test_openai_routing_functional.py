"""OpenAI-compatible routing end to end: the real ``openai`` client, canary, and fake models
that accept only their own served name (vLLM ``--served-model-name``); raw sockets for the
exact bytes forwarded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from loadtest.fake_model import FakeModelConfig, running_fake_model
from tests.conftest import FAST, running_canary
from tests.upstream_harness import Received, Reply, Upstream, exchange, read_response, request

LLAMA, LLAMA_FT = "llama-3.1-8b", "llama-3.1-8b-ft2"
MISTRAL, MISTRAL_FT = "mistral-7b", "mistral-7b-v2"
LLM = {**FAST, "ttft": 0.002, "inter_token": 0.001, "completion_tokens": 4}


@contextlib.asynccontextmanager
async def served(*names: str, seed: int = 0, **extra: Any) -> AsyncIterator[list[str]]:
    """One fake model per name, each accepting only that name; yields their URLs."""
    async with contextlib.AsyncExitStack() as stack:
        urls = []
        for i, name in enumerate(names):
            cfg = FakeModelConfig(
                model=name, served_models=(name,), seed=seed + i, **{**LLM, **extra}
            )
            urls.append(await stack.enter_async_context(running_fake_model(cfg)))
        yield urls


def rollout(
    name: str,
    p: str,
    c: str,
    *,
    match: dict[str, Any] | None = None,
    models: tuple[str | None, str | None] = (None, None),
    **overrides: Any,
) -> dict[str, Any]:
    r: dict[str, Any] = {
        "name": name,
        "production": {"endpoints": [p]},
        "candidate": {"endpoints": [c]},
        "routing": {"override_header": "X-Canary-Arm", "timeout": "5s"},
        "steps": [{"weight": 50}],
    }
    if match is not None:
        r["match"] = match
    for arm, model in zip(("production", "candidate"), models, strict=True):
        if model is not None:
            r[arm]["model"] = model
    r.update(overrides)
    return r


def config(*rollouts: dict[str, Any], **proxy: Any) -> dict[str, Any]:
    return {
        "proxy": {"listen": "127.0.0.1:0", **proxy},
        "admin": {"listen": "127.0.0.1:0"},
        "state": {"backend": "memory"},
        "rollouts": list(rollouts),
    }


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=10)


def arm(name: str) -> dict[str, dict[str, str]]:
    return {"extra_headers": {"X-Canary-Arm": name}}


async def rejected(admin: str) -> dict[str, float]:
    """canary_proxy_rejected_total by reason, from /metrics."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(admin + "/metrics")).text
    out = {}
    for line in text.splitlines():
        if line.startswith("canary_proxy_rejected_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


# -- the openai client against two fake models that accept only their own name ----------------


async def test_each_arm_gets_its_own_model_name_streaming_and_not() -> None:
    async with served(LLAMA, LLAMA_FT) as (p, c):
        cfg = config(rollout("llama", p, c, models=(LLAMA, LLAMA_FT)))
        async with running_canary(cfg) as can:
            oa = client(can.url)
            for side, served_name in (("production", LLAMA), ("candidate", LLAMA_FT)):
                chat = await oa.chat.completions.create(
                    model=LLAMA, messages=[{"role": "user", "content": "hi"}], **arm(side)
                )
                # The answer says which model produced it (canary leaves it as the arm wrote it)
                assert chat.model == served_name
                assert chat.choices[0].message.content
                stream = await oa.chat.completions.create(
                    model=LLAMA,
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                    stream_options={"include_usage": True},
                    **arm(side),
                )
                chunks = [chunk async for chunk in stream]
                assert {ch.model for ch in chunks} == {served_name}
                text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                assert text and chunks[-1].usage is not None
                comp = await oa.completions.create(model=LLAMA, prompt="say hi", **arm(side))
                assert comp.model == served_name and comp.choices[0].text
                cstream = await oa.completions.create(
                    model=LLAMA, prompt="say hi", stream=True, **arm(side)
                )
                pieces = [ch async for ch in cstream]
                assert len(pieces) == 4 and {p.model for p in pieces} == {served_name}
                assert pieces[-1].choices[0].finish_reason == "stop"
                emb = await oa.embeddings.create(model=LLAMA, input=["a", "b"], **arm(side))
                assert emb.model == served_name and len(emb.data) == 2
                assert len(emb.data[0].embedding) == 8  # base64 float32, decoded by the client
            # Randomised (50%): both arms answer, none refuses the client's name.
            answers = await asyncio.gather(
                *(
                    oa.chat.completions.create(
                        model=LLAMA, messages=[{"role": "user", "content": f"q{i}"}]
                    )
                    for i in range(40)
                )
            )
            await oa.close()
            acc = await can.samples("llama")
    assert {a.model for a in answers} == {LLAMA, LLAMA_FT}
    assert acc.production.errors == 0 and acc.candidate.errors == 0


async def test_one_gateway_path_fronts_two_rollouts_by_model() -> None:
    async with served(LLAMA, LLAMA_FT, MISTRAL, MISTRAL_FT) as (p1, c1, p2, c2):
        cfg = config(
            rollout("llama", p1, c1, match={"model": LLAMA}, models=(None, LLAMA_FT)),
            rollout("mistral", p2, c2, match={"model": [MISTRAL, "mistral"]},
                    models=(MISTRAL, MISTRAL_FT)),
        )  # fmt: skip
        async with running_canary(cfg) as can:
            oa = client(can.url)
            got = {}
            for model in (LLAMA, MISTRAL, "mistral"):
                for side in ("production", "candidate"):
                    r = await oa.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": "x"}], **arm(side)
                    )
                    got[model, side] = r.model
            emb = await oa.embeddings.create(model="mistral", input="x", **arm("candidate"))
            with pytest.raises(openai.NotFoundError) as info:
                await oa.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "x"}]
                )
            # Not a model-routed path: a model rule does not own it, nothing else does
            async with httpx.AsyncClient() as http:
                models = await http.get(can.url + "/v1/models")
                routing = (await http.get(can.admin + "/api/v1/rollouts/mistral")).json()
            await oa.close()
            reasons = await rejected(can.admin)
    assert got == {
        (LLAMA, "production"): LLAMA,
        (LLAMA, "candidate"): LLAMA_FT,
        (MISTRAL, "production"): MISTRAL,
        (MISTRAL, "candidate"): MISTRAL_FT,
        ("mistral", "production"): MISTRAL,
        ("mistral", "candidate"): MISTRAL_FT,
    }
    assert emb.model == MISTRAL_FT
    err = info.value.body
    assert info.value.status_code == 404 and isinstance(err, dict)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert err["type"] == "invalid_request_error" and "gpt-4o" in err["message"]
    assert models.status_code == 404 and models.json()["error"] == "no rollout matches this request"
    assert reasons.get("model_not_found") == 1 and reasons.get("no_route") == 1
    assert routing["match"] == {"path_prefix": "/", "host": None, "model": [MISTRAL, "mistral"]}


async def test_a_model_less_rollout_takes_the_other_models_and_paths() -> None:
    async with served(LLAMA, LLAMA_FT) as (p1, c1), served("any", "any2") as (p2, c2):
        cfg = config(
            rollout("llama", p1, c1, match={"model": LLAMA}, models=(None, LLAMA_FT)),
            rollout("rest", p2, c2, steps=[{"weight": 0}]),
        )
        async with running_canary(cfg) as can, httpx.AsyncClient() as http:
            oa = client(can.url)
            r1 = await oa.chat.completions.create(
                model=LLAMA, messages=[{"role": "user", "content": "x"}], **arm("candidate")
            )
            r2 = await http.post(can.url + "/v1/chat/completions", json={"model": "any"})
            r3 = await http.get(can.url + "/healthz")  # not model-routed: the model-less rule
            # no model: the model-less rule takes it as any other request (forwarded as is)
            r4 = await http.post(can.url + "/v1/chat/completions", json={"messages": []})
            await oa.close()
    assert r1.model == LLAMA_FT
    assert r2.status_code == 200 and r2.json()["model"] == "any"
    assert r3.status_code == 200 and r3.json()["model"] == "any"
    assert r4.status_code == 400 and r4.headers["X-Model-Name"] == "any"  # the fake's own 400


# -- what canary answers itself ------------------------------------------------------------------


async def test_bad_requests_are_answered_as_the_openai_api_would() -> None:
    async with served(LLAMA, LLAMA_FT) as (p, c):
        cfg = config(
            rollout("llama", p, c, match={"model": LLAMA}, models=(None, LLAMA_FT)),
            replay_buffer="4KiB",
            max_body_size="64KiB",
        )
        async with running_canary(cfg) as can, httpx.AsyncClient() as http:
            url = can.url + "/v1/chat/completions"
            oa = client(can.url)
            with pytest.raises(openai.NotFoundError) as nf:
                await oa.chat.completions.create(
                    model="llama-3.1-70b", messages=[{"role": "user", "content": "x"}]
                )
            cases = {
                "missing": b'{"messages": []}',
                "nested only": b'{"messages": [{"role": "user", "model": "llama-3.1-8b"}]}',
                "null": b'{"model": null}',
                "number": b'{"model": 8}',
                "duplicate": b'{"model": "llama-3.1-8b", "model": "other"}',
                "not json": b"model=llama-3.1-8b",
                "array": b'[{"model": "llama-3.1-8b"}]',
                "trailing": b'{"model": "llama-3.1-8b"} {}',
                "bad utf-8": b'{"model": "llama-3.1-8b", "x": "\xff"}',
                "deep": b'{"model": "llama-3.1-8b", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}",
                "too large": b'{"model": "llama-3.1-8b", "x": "' + b"a" * 8000 + b'"}',
            }
            answers = {k: await http.post(url, content=v) for k, v in cases.items()}
            huge = await http.post(url, content=b"x" * 70_000)
            empty = await http.post(url)
            # still serving, and the good request was never disturbed
            ok = await oa.chat.completions.create(
                model=LLAMA, messages=[{"role": "user", "content": "x"}]
            )
            await oa.close()
            reasons = await rejected(can.admin)
            acc = await can.samples("llama")
    assert nf.value.status_code == 404
    expected = {
        "missing": "model_missing",
        "nested only": "model_missing",
        "null": "model_missing",
        "number": "model_missing",
        "duplicate": "model_duplicate",
        "not json": "model_bad_json",
        "array": "model_bad_json",
        "trailing": "model_bad_json",
        "bad utf-8": "model_bad_json",
        "deep": "model_bad_json",
        "too large": "model_body_too_large",
    }
    for case, r in answers.items():
        assert r.status_code == 400, (case, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == "model", case
        assert r.headers["X-Request-Id"] and "X-Model-Name" not in r.headers, case
    assert "replay_buffer" in answers["too large"].json()["error"]["message"]
    assert answers["missing"].json()["error"]["message"] == "you must provide a model parameter"
    assert huge.status_code == 413 and empty.status_code == 400
    assert ok.model in (LLAMA, LLAMA_FT)
    counts: dict[str, int] = {}
    for reason in expected.values():
        counts[reason] = counts.get(reason, 0) + 1
    counts["model_missing"] += 1  # the empty body
    counts["model_not_found"] = 1
    counts["body_too_large"] = 1
    assert reasons == counts
    # nothing reached an upstream but the good request
    assert acc.production.observed + acc.candidate.observed == 1


# -- the exact bytes forwarded -------------------------------------------------------------------

_OK = b'{"object": "chat.completion", "model": "upstream"}'


def _reply(status: str = "200 OK") -> Reply:
    return Reply.ok(_OK, status, "Content-Type: application/json\r\n")


BODIES = [
    b'{"model":"llama-3.1-8b","messages":[{"role":"user","content":"hi"}]}',
    # whitespace of every kind around the key, colon and value; the value last
    b' \r\n\t{ "messages" : [ ] ,\n\t"model"\r\n :\t "llama-3.1-8b"\n}\n ',
    # an escaped key and value (both mean model / llama-3.1-8b), non-ASCII before it
    b'{"prompt":"gr\xc3\xbc\xc3\x9fe \\u00fc \xf0\x9f\x99\x82","\\u006dodel":"llama\\u002d3.1-8b"}',
    # nested "model" keys and a string that looks like one stay as they are
    b'{"tools":[{"model":"x"}],"input":"\\"model\\": \\"y\\"","model":"llama-3.1-8b","n":1e3}',
]


def _spliced(body: bytes, name: str) -> bytes:
    """``body`` with its top-level model value (found independently, via json) replaced."""
    doc = json.loads(body)
    assert doc["model"] == LLAMA
    # Every test body has exactly one top-level model value, the last '"model"' key's value
    # or an escaped key: find the value's raw text by its known spellings.
    for raw in (b'"llama-3.1-8b"', b'"llama\\u002d3.1-8b"'):
        at = body.rfind(raw)
        if at >= 0 and body.count(raw) == 1:
            return body[:at] + json.dumps(name).encode() + body[at + len(raw) :]
    raise AssertionError(body)


@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
async def test_forwarded_body_is_the_original_but_the_model_value(body: bytes) -> None:
    async with Upstream(lambda _: _reply()) as prod, Upstream(lambda _: _reply()) as cand:
        cfg = config(rollout("llama", prod.url, cand.url, models=("prod-name", "cand/é:v2")))
        async with running_canary(cfg) as can:
            port = int(can.url.rsplit(":", 1)[1])
            for side in ("production", "candidate"):
                head = f"X-Canary-Arm: {side}\r\nContent-Type: application/json\r\n"
                r = await exchange(port, request("POST", "/v1/chat/completions", body, head))
                assert r.status == 200 and r.body == _OK
            # chunked from the client: buffered (within replay_buffer), sent with a length
            chunked = (
                b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nX-Canary-Arm: candidate\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            ) + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:5], body[5:]))
            r = await exchange(port, chunked + b"0\r\n\r\n")
            assert r.status == 200
    assert len(prod.requests) == 1 and len(cand.requests) == 2
    for got, name in ((prod.requests[0], "prod-name"), (cand.requests[0], "cand/é:v2")):
        assert got.body == _spliced(body, name)
        assert got.header("Content-Length") == str(len(got.body))
        assert json.loads(got.body)["model"] == name
    chunk_got = cand.requests[1]
    assert chunk_got.path == "/v1/embeddings" and chunk_got.body == _spliced(body, "cand/é:v2")
    assert chunk_got.header("Content-Length") == str(len(chunk_got.body))
    assert chunk_got.header("Transfer-Encoding") is None


async def test_routed_by_model_without_a_rename_the_body_is_untouched() -> None:
    body = BODIES[1]
    async with Upstream(lambda _: _reply()) as prod, Upstream(lambda _: _reply()) as cand:
        cfg = config(rollout("llama", prod.url, cand.url, match={"model": LLAMA}))
        async with running_canary(cfg) as can:
            port = int(can.url.rsplit(":", 1)[1])
            for side in ("production", "candidate"):
                head = f"X-Canary-Arm: {side}\r\n"
                r = await exchange(port, request("POST", "/gw/v1/completions", body, head))
                assert r.status == 200
    assert prod.requests[0].body == body and cand.requests[0].body == body


async def test_non_model_paths_of_a_renaming_rollout_are_forwarded_unchanged() -> None:
    body = b'{"model": "llama-3.1-8b"}'
    async with Upstream(lambda _: _reply()) as prod, Upstream(lambda _: _reply()) as cand:
        cfg = config(rollout("llama", prod.url, cand.url, models=("a", "b")))
        async with running_canary(cfg) as can:
            port = int(can.url.rsplit(":", 1)[1])
            for path in ("/v1/chat/completions/extra", "/v1/moderations", "/predict"):
                head = "X-Canary-Arm: candidate\r\n"
                assert (await exchange(port, request("POST", path, body, head))).status == 200
    assert [r.body for r in cand.requests] == [body] * 3 and not prod.requests


async def test_failover_and_shadow_copies_carry_each_arms_name() -> None:
    def failing(req: Received) -> Reply:
        return _reply("503 Service Unavailable")

    body = b'{"model": "llama-3.1-8b", "prompt": "x"}'
    async with Upstream(lambda _: _reply()) as prod, Upstream(failing) as cand:
        cfg = config(rollout("llama", prod.url, cand.url, models=(None, LLAMA_FT),
                             steps=[{"weight": 100}]))  # fmt: skip
        async with running_canary(cfg) as can:
            port = int(can.url.rsplit(":", 1)[1])
            # POST is not idempotent: failover only for requests "all" methods may replay
            can.proxy.routes["llama"].failover_any_method = True
            r = await exchange(port, request("POST", "/v1/completions", body))
    assert r.status == 200 and r.header("X-Canary-Arm") == "production"
    assert json.loads(cand.requests[0].body)["model"] == LLAMA_FT
    assert prod.requests[0].body == body  # production has no rename: the client's own bytes

    async with Upstream(lambda _: _reply()) as prod, Upstream(lambda _: _reply()) as cand:
        cfg = config(rollout("llama", prod.url, cand.url, models=("p", "c"),
                             steps=[{"shadow": {}}, {"weight": 50}]))  # fmt: skip
        async with running_canary(cfg) as can:
            port = int(can.url.rsplit(":", 1)[1])
            r = await exchange(port, request("POST", "/v1/completions", body))
            deadline = time.monotonic() + 5
            while not cand.requests and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
    assert r.status == 200 and r.header("X-Canary-Arm") == "production"
    assert json.loads(prod.requests[0].body)["model"] == "p"
    assert cand.requests[0].body == body.replace(b'"llama-3.1-8b"', b'"c"')


# -- done when: an LLM rollout with different served names promotes through the openai client ---


async def test_llm_rollout_with_different_served_names_promotes_through_the_openai_client() -> None:
    async with served(LLAMA, LLAMA_FT) as (p, c):
        cfg = config(
            rollout(
                "llama",
                p,
                c,
                match={"model": LLAMA},
                models=(None, LLAMA_FT),
                steps=[{"weight": 20, "min_requests": 20}, {"weight": 50, "min_requests": 40}],
                analysis={
                    "interval": "100ms",
                    "burn_in": 20,
                    "max_duration": "60s",
                    "metrics": [
                        {"name": "errors", "signal": "error", "stat": "rate",
                         "max_increase": "20pp"},
                    ],
                },
            )
        )  # fmt: skip
        async with running_canary(cfg, controller=True) as can, httpx.AsyncClient() as http:
            oa = client(can.url)
            deadline = time.monotonic() + 25.0
            detail: dict[str, Any] = {}
            i = 0
            while time.monotonic() < deadline:
                batch = [
                    oa.chat.completions.create(
                        model=LLAMA,
                        messages=[{"role": "user", "content": f"question {i + k}"}],
                        stream=(i + k) % 2 == 0,
                    )
                    for k in range(20)
                ]
                i += 20
                for answer in await asyncio.gather(*batch):
                    if isinstance(answer, openai.AsyncStream):
                        async for _chunk in answer:
                            pass
                detail = (await http.get(can.admin + "/api/v1/rollouts/llama")).json()
                if detail["phase"] != "running":
                    break
            await oa.close()
            acc = await can.samples("llama")
    assert detail["phase"] == "promoted", detail.get("last_decision")
    assert "every metric is within tolerance: errors" in detail["last_decision"]["reason"]
    assert acc.candidate.observed > 0 and acc.candidate.errors == 0


async def test_slow_and_oversized_streamed_bodies_get_openai_errors() -> None:
    async with Upstream(lambda _: _reply()) as prod, Upstream(lambda _: _reply()) as cand:
        cfg = config(
            rollout("llama", prod.url, cand.url, match={"model": LLAMA}),
            replay_buffer="1KiB",
            client_timeout="300ms",
        )
        async with running_canary(cfg) as can:
            port = int(can.url.rsplit(":", 1)[1])
            # half a body, then silence: 408 once client_timeout passes
            head = b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 40\r\n\r\n"
            slow = await exchange(port, head + b'{"model": "llama-3.1-8b"')
            # chunked, beyond replay_buffer: its model cannot be read
            piece = b'{"model": "llama-3.1-8b", "prompt": "' + b"x" * 900
            chunked = (
                b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n" % (len(piece), piece) * 2
                + b"0\r\n\r\n"
            )
            big = await exchange(port, chunked)  # arrives with the head
            # the same, arriving a chunk at a time
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            cut = chunked.index(b"\r\n\r\n") + 4 + 900
            writer.write(chunked[:cut])
            await asyncio.sleep(0.05)
            writer.write(chunked[cut:])
            late = await asyncio.wait_for(read_response(reader, "POST"), 5)
            writer.close()
            reasons = await rejected(can.admin)
    assert slow.status == 408 and json.loads(slow.body)["error"]["code"] is None
    for r in (big, late):
        assert r.status == 400
        assert "replay_buffer" in json.loads(r.body)["error"]["message"]
    assert reasons == {"client_timeout": 1, "model_body_too_large": 2}
    assert not prod.requests and not cand.requests
