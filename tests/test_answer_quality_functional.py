"""Answer quality end to end: fake models whose candidate degrades its answers, a real canary,
streamed traffic; the candidate is rolled back on the quality signal alone."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import httpx
import pytest

from canary.observe.extract import ResponseExtractor
from loadtest.fake_model import (
    FakeModelConfig,
    build_parser,
    config_from_args,
    running_fake_model,
)
from loadtest.loadgen import LoadConfig, run_load
from tests.conftest import FAST, fake_pair, rollout_config, running_canary

QUALITY = ["finish_reason:length", "finish_reason:stop", "output_tokens", "empty_answer",
           "repetition", "refusal"]  # fmt: skip
# Quick tokens, so a stream of 16 takes ~20 ms.
LLM = {"ttft": 0.005, "inter_token": 0.001}


def _chat_body(stream: bool, max_tokens: int | None = None) -> Any:
    def make(index: int, rng: random.Random) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": "fake",
            "messages": [{"role": "user", "content": f"question {index}"}],
        }
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    return make


async def _score(
    url: str, stream: bool, max_tokens: int | None = None, n: int = 1
) -> list[dict[str, float]]:
    """Ask a fake model ``n`` times and score its answers with the extractor the proxy uses."""
    ex = ResponseExtractor(QUALITY)
    out = []
    async with httpx.AsyncClient() as client:
        for i in range(n):
            body = _chat_body(stream, max_tokens)(i, random.Random(0))
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                ins = ex.start(
                    resp.headers["content-type"], resp.headers.get("content-encoding", "")
                )
                async for chunk in resp.aiter_raw():
                    ins.feed(chunk)
            ins.finish({}, latency=1.0)
            out.append(ins.signals)
    return out


@pytest.mark.parametrize("stream", [False, True])
async def test_fake_model_answer_styles(stream: bool) -> None:
    expect = {
        "normal": {"finish_reason:stop": 1.0, "empty_answer": 0.0, "refusal": 0.0,
                   "repetition": 0.0, "output_tokens": 16.0},
        "repeat": {"finish_reason:stop": 1.0, "repetition": pytest.approx(6 / 13),
                   "output_tokens": 16.0},
        "truncate": {"finish_reason:length": 1.0, "finish_reason:stop": 0.0},
        "refuse": {"refusal": 1.0, "empty_answer": 0.0, "finish_reason:stop": 1.0},
        "empty": {"empty_answer": 1.0, "refusal": 0.0, "output_tokens": 0.0},
    }  # fmt: skip
    for style, want in expect.items():
        cfg = FakeModelConfig(answer_style=style, **FAST, **LLM)  # type: ignore[arg-type]
        async with running_fake_model(cfg) as url:
            (got,) = await _score(url, stream)
        for key, value in want.items():
            assert got[key] == value, (style, key, got)
        if style == "empty":
            assert "repetition" not in got
    # max_tokens reached: a normal answer is cut at the limit, as before
    async with running_fake_model(FakeModelConfig(**FAST, **LLM)) as url:
        assert (await _score(url, stream, max_tokens=8))[0]["finish_reason:length"] == 1.0


async def test_fake_model_answer_share_is_seeded() -> None:
    cfg = FakeModelConfig(
        answer_style="refuse", answer_share=0.3, seed=3, **FAST, ttft=0.0, inter_token=0.0
    )
    async with running_fake_model(cfg) as url:
        refused = [s["refusal"] for s in await _score(url, stream=False, n=60)]
    assert 8 <= sum(refused) <= 30  # 18 expected
    args = build_parser().parse_args(["--answer-style", "truncate", "--answer-share", "0.25"])
    assert config_from_args(args) == FakeModelConfig(answer_style="truncate", answer_share=0.25)
    with pytest.raises(ValueError, match="answer_style"):
        FakeModelConfig(answer_style="weird")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="answer_share"):
        FakeModelConfig(answer_share=1.5)


def _config(p: str, c: str, metrics: list[dict[str, Any]], **routing: Any) -> dict[str, Any]:
    return rollout_config(
        [p],
        [c],
        routing={"timeout": "5s", **routing},
        steps=[{"weight": 50}],
        analysis={
            "interval": "100ms",
            "burn_in": 50,
            "max_duration": "60s",
            "metrics": [
                *metrics,
                {"name": "errors", "signal": "error", "stat": "rate", "max_increase": "1pp"},
            ],
        },
    )


async def _until_decided(can: Any, load: LoadConfig, seconds: float) -> dict[str, Any]:
    detail: dict[str, Any] = {}
    async with httpx.AsyncClient() as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            report = await run_load(load)
            assert report.ok > 0.9 * report.sent, (report.errors, report)
            detail = (await client.get(can.admin + "/api/v1/rollouts/m")).json()
            if detail["phase"] != "running":
                break
    return detail


async def test_candidate_that_repeats_itself_is_rolled_back_on_repetition() -> None:
    # Half of the candidate's answers loop ("... and so on and so on"): mean repetition
    # 0.23 against production's 0; latency, errors and token counts are the same.
    async with fake_pair(LLM, {**LLM, "answer_style": "repeat", "answer_share": 0.5}) as (p, c):
        cfg = _config(p, c, [
            {"name": "repetition", "signal": "repetition", "stat": "mean",
             "max_increase": "5pp"},
            {"name": "latency_p95", "signal": "latency", "stat": "p95", "max_increase": "50%"},
        ])  # fmt: skip
        async with running_canary(cfg, controller=True) as can:
            load = LoadConfig(
                url=can.url + "/v1/chat/completions", rate=150, requests=150, timeout=5.0,
                body="chat-stream", body_factory=_chat_body(stream=True),
            )  # fmt: skip
            detail = await _until_decided(can, load, 25.0)
            acc = await can.samples("m")
    assert detail["phase"] == "rolled_back", detail.get("last_decision")
    assert "repetition" in detail["last_decision"]["reason"]
    rep = next(m for m in detail["metrics"] if m["name"] == "repetition")
    assert rep["verdict"] == "WORSE"
    latency = next(m for m in detail["metrics"] if m["name"] == "latency_p95")
    assert latency["verdict"] != "WORSE"
    prod, cand = acc.production.signals["repetition"], acc.candidate.signals["repetition"]
    assert prod.mean == 0.0
    assert cand.mean == pytest.approx(0.5 * 6 / 13, abs=0.1)


async def test_truncating_candidate_is_rolled_back_on_finish_reason_length_rate() -> None:
    # 30% of the candidate's answers stop at "length"; sticky users, so the rate test counts
    # users (clusters), not requests. Production always stops on "stop".
    async with fake_pair(LLM, {**LLM, "answer_style": "truncate", "answer_share": 0.3}) as (p, c):
        cfg = _config(
            p, c,
            [{"name": "truncated", "signal": "finish_reason:length", "stat": "rate",
              "max_increase": "5pp"},
             {"name": "refusals", "signal": "refusal", "stat": "rate", "max_increase": "5pp"}],
            sticky={"header": "X-User-Id"},
        )  # fmt: skip
        async with running_canary(cfg, controller=True) as can:
            load = LoadConfig(
                url=can.url + "/v1/chat/completions", rate=150, requests=150, timeout=5.0,
                body="chat", body_factory=_chat_body(stream=False), users=300,
            )  # fmt: skip
            detail = await _until_decided(can, load, 25.0)
            acc = await can.samples("m")
    assert detail["phase"] == "rolled_back", detail.get("last_decision")
    assert "truncated" in detail["last_decision"]["reason"]
    truncated = next(m for m in detail["metrics"] if m["name"] == "truncated")
    assert truncated["kind"] == "rate" and truncated["verdict"] == "WORSE"
    assert "clusters" in truncated["detail"]  # the users, not the requests, were counted
    refusals = next(m for m in detail["metrics"] if m["name"] == "refusals")
    assert refusals["verdict"] != "WORSE"
    assert acc.production.signals["finish_reason:length"].mean == 0.0
    assert acc.candidate.signals["finish_reason:length"].mean == pytest.approx(0.3, abs=0.12)
    assert acc.candidate.signals["finish_reason:length"].clusters  # sticky: per-user clusters


async def test_non_llm_traffic_leaves_quality_signals_absent() -> None:
    async with fake_pair(LLM, LLM) as (p, c):
        cfg = _config(p, c, [{"name": "empty", "signal": "empty_answer", "stat": "rate",
                              "max_increase": "1pp"}])  # fmt: skip
        async with running_canary(cfg) as can:
            await run_load(LoadConfig(url=can.url + "/predict", rate=200, requests=40))
            async with httpx.AsyncClient() as client:
                r = await client.post(
                    can.url + "/v1/chat/completions",
                    content=b"{not json",
                    headers={"X-Canary-Arm": "candidate"},
                )
                assert r.status_code == 400  # the model's answer, passed through
            acc = await can.samples("m")
    assert acc.production.observed + acc.candidate.observed >= 40
    assert "empty_answer" not in acc.production.signals
    assert "empty_answer" not in acc.candidate.signals


async def test_answer_text_is_kept_only_for_the_answers_a_judge_waits_for() -> None:
    """The judge's hook: an extractor with keep_answer_chars keeps the streamed answer's text
    for a response :meth:`ResponseExtractor.start` is asked to keep it for, and the proxy asks
    only for the answers of a pair a judge waits on (none here): other answers are not parsed."""
    async with fake_pair(LLM, LLM) as (p, c):
        async with running_canary(_config(p, c, [])) as can:
            route = can.proxy.routes["m"]
            route.extractor = ResponseExtractor([], keep_answer_chars=30)
            seen: list[str | None] = []
            original = can.proxy._record

            def spy(ex: Any, status: int, error: Any, latency: float, ttft: Any,
                    received: int, inspector: Any, resp: Any) -> None:  # fmt: skip
                original(ex, status, error, latency, ttft, received, inspector, resp)
                seen.append(inspector.answer_text if inspector is not None else None)

            can.proxy._record = spy
            async with httpx.AsyncClient() as client:
                body = _chat_body(stream=True)(0, random.Random(0))
                r = await client.post(can.url + "/v1/chat/completions", json=body)
            assert r.status_code == 200
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in r.text.splitlines()
        if line.startswith("data: {") and json.loads(line[6:])["choices"]
    )
    assert seen == [None]  # no judge waits for it: not kept
    inspector = ResponseExtractor([], keep_answer_chars=30).start("text/event-stream")
    inspector.feed(r.content)
    inspector.finish(r.headers)
    assert inspector.answer_text == text[:30]
    unkept = ResponseExtractor([], keep_answer_chars=30).start(
        "text/event-stream", keep_answer=False
    )
    unkept.feed(r.content)
    unkept.finish(r.headers)
    assert unkept.answer_text is None


async def test_equal_arms_are_not_rolled_back_on_quality() -> None:
    # A/A: both arms loop in 30% of their answers and truncate none; at alpha 0.001 a false
    # rollback here would be a bug (or a 1-in-1000 event), not noise.
    same = {**LLM, "answer_style": "repeat", "answer_share": 0.3}
    async with fake_pair(same, same) as (p, c):
        cfg = _config(p, c, [
            {"name": "repetition", "signal": "repetition", "stat": "mean",
             "max_increase": "5pp"},
            {"name": "truncated", "signal": "finish_reason:length", "stat": "rate",
             "max_increase": "5pp"},
        ])  # fmt: skip
        cfg["rollouts"][0]["analysis"]["alpha"] = 0.001
        async with running_canary(cfg, controller=True) as can:
            load = LoadConfig(
                url=can.url + "/v1/chat/completions", rate=100, requests=200, timeout=5.0,
                body="chat-stream", body_factory=_chat_body(stream=True),
            )  # fmt: skip
            detail = await _until_decided(can, load, 4.0)
            acc = await can.samples("m")
    assert detail["phase"] == "running", detail.get("last_decision")
    for m in detail["metrics"]:
        assert m["verdict"] != "WORSE", m
    assert acc.candidate.signals["repetition"].n > 100
    assert acc.production.signals["finish_reason:length"].mean == 0.0
