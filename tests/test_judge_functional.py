"""Pairwise judging end to end: fake LLMs behind a real canary, a fake judge on loopback.

In a shadow step every sampled chat request is answered by both fake models; canary posts the
two answers to the fake judge and tests the candidate's win rate against 50%.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtest.fake_judge import FakeJudgeConfig, running_fake_judge
from loadtest.fake_model import FakeModelConfig, running_fake_model
from tests.conftest import rollout_config, running_canary

# Quick fake LLMs: a token every 0.2 ms. The candidate's answer length sets what the judge
# (which prefers the longer answer) thinks of it.
LLM = {"latency": "fixed", "latency_median": 0.0005, "ttft": 0.001, "inter_token": 0.0002}


@contextlib.asynccontextmanager
async def llms(candidate_tokens: int, served: bool = False) -> AsyncIterator[tuple[str, str]]:
    """Two fake LLMs; with ``served`` each accepts only its own model name (as vLLM does)."""
    p = FakeModelConfig(
        model="production",
        completion_tokens=16,
        served_models=("llama-8b",) if served else (),
        **LLM,  # type: ignore[arg-type]
    )
    c = FakeModelConfig(
        model="candidate",
        completion_tokens=candidate_tokens,
        seed=1,
        served_models=("llama-8b-ft",) if served else (),
        **LLM,  # type: ignore[arg-type]
    )
    async with running_fake_model(p) as pu, running_fake_model(c) as cu:
        yield pu, cu


def judged_config(p: str, c: str, judge: dict[str, Any], **analysis: Any) -> dict[str, Any]:
    return rollout_config(
        [p],
        [c],
        steps=[{"shadow": {"min_requests": 100}}],
        judge={"max_concurrency": 8, "max_per_minute": 100000, "timeout": "5s", **judge},
        analysis={
            "interval": "100ms",
            "burn_in": 60,
            "max_duration": "5m",
            "metrics": [
                {"name": "judged", "signal": "judge", "stat": "rate", "max_decrease": "5pp"}
            ],
            **analysis,
        },
    )


async def chat(client: httpx.AsyncClient, url: str, i: int, stream: bool) -> None:
    r = await client.post(
        url + "/v1/chat/completions",
        json={
            "model": "any",
            "messages": [{"role": "user", "content": f"question {i}: what does the canary do?"}],
            "stream": stream,
        },
    )
    assert r.status_code == 200, r.text


async def drive(can: Any, until: Any, limit: float, concurrency: int = 4) -> dict[str, Any]:
    """Send chat requests (half streamed) until ``until(detail)`` or ``limit`` seconds."""
    deadline = time.monotonic() + limit
    detail: dict[str, Any] = {}
    i = 0
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            await asyncio.gather(
                *(chat(client, can.url, i + k, stream=(i + k) % 2 == 0) for k in range(concurrency))
            )
            i += concurrency
            if i % 40 == 0:
                detail = (await client.get(can.admin + "/api/v1/rollouts/m")).json()
                if until(detail):
                    return {**detail, "_sent": i}
        return {**(await client.get(can.admin + "/api/v1/rollouts/m")).json(), "_sent": i}


def judge_counts(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "canary_judge_pairs":
            for s in family.samples:
                out[s.labels["result"]] = s.value
    return out


def judged_metric(detail: dict[str, Any]) -> dict[str, Any]:
    return next(m for m in detail["metrics"] if m["name"] == "judged")


def done(detail: dict[str, Any]) -> bool:
    return detail.get("phase") not in (None, "running")


async def _metrics(can: Any) -> dict[str, float]:
    async with httpx.AsyncClient() as client:
        return judge_counts((await client.get(can.admin + "/metrics")).text)


async def _settle(can: Any) -> None:
    """Wait for the mirrors and canary's judge calls in flight to finish (and be counted)."""
    judge = can.proxy.routes["m"].judge
    for _ in range(200):
        if judge.inflight == 0 and not judge.pending:
            return
        await asyncio.sleep(0.02)


async def test_a_candidate_the_judge_prefers_is_promoted_on_win_rate() -> None:
    # The judge prefers the longer answer, with 30% coin flips: the candidate (48 tokens
    # against 16) wins 85% of the pairs.
    async with (
        llms(candidate_tokens=48) as (p, c),
        running_fake_judge(FakeJudgeConfig(prefer="longer", noise=0.3, seed=3)) as (j, counters),
    ):
        cfg = judged_config(p, c, {"url": j + "/v1/chat/completions", "kind": "openai",
                                   "model": "judge-1"})  # fmt: skip
        async with running_canary(cfg, controller=True) as can:
            detail = await drive(can, done, 20.0)
            await _settle(can)
            counts = await _metrics(can)
    assert detail["phase"] == "promoted", detail.get("last_decision")
    m = judged_metric(detail)
    assert m["verdict"] == "OK" and m["lower"] >= -0.05, m
    judge = detail["judge"]
    assert judge["kind"] == "openai" and judge["verdicts"] >= 60
    # Every verdict canary counted is a reply the judge gave, under the configured model.
    assert counters.models == {"judge-1"}
    assert counts.get("candidate", 0) + counts.get("production", 0) + counts.get("tie", 0) == (
        counters.chat
    )
    # A and B were randomised: the candidate's (longer) answer was A about half the time.
    a, b = counters.replies.get("A", 0), counters.replies.get("B", 0)
    assert a > 0.25 * (a + b) and b > 0.25 * (a + b), counters.replies
    assert counts.get("unparsable", 0) == counts.get("error", 0) == 0


async def test_a_candidate_the_judge_dislikes_is_rolled_back() -> None:
    # The HTTP scorer prefers the longer answer; the candidate truncates to 6 tokens.
    async with (
        llms(candidate_tokens=6) as (p, c),
        running_fake_judge(FakeJudgeConfig(prefer="longer", noise=0.3, seed=4)) as (j, counters),
    ):
        cfg = judged_config(p, c, {"url": j + "/judge", "kind": "http"})
        async with running_canary(cfg, controller=True) as can:
            detail = await drive(can, done, 20.0)
            await _settle(can)
    assert detail["phase"] == "rolled_back", detail.get("last_decision")
    assert "judged" in detail["last_decision"]["reason"]
    m = judged_metric(detail)
    assert m["verdict"] == "WORSE" and m["upper"] < -0.05, m
    assert counters.http >= 60 and counters.bad == 0
    # What the scorer got: the client's request as JSON and both answers' texts.
    last = counters.last
    assert last is not None and last["request"]["messages"][0]["role"] == "user"
    assert len(last["candidate"].split()) < len(last["production"].split())


async def test_a_judge_that_is_down_is_counted_and_gives_no_verdict() -> None:
    async with llms(candidate_tokens=48) as (p, c):
        # A port nothing listens on (bound, then closed).
        async with running_fake_judge() as (j, _):
            dead = j
        cfg = judged_config(p, c, {"url": dead + "/judge", "kind": "http", "timeout": "1s"})
        async with running_canary(cfg, controller=True) as can:

            def analysed(d: dict[str, Any]) -> bool:
                return bool(d.get("metrics")) and d["judge"]["results"]["error"] >= 20

            detail = await drive(can, analysed, 15.0)
            await _settle(can)
            counts = await _metrics(can)
    assert detail["phase"] == "running", detail
    m = judged_metric(detail)
    assert m["verdict"] == "UNKNOWN" and m["n_candidate"] == 0, m
    assert counts.get("error", 0) >= 20, counts
    assert not any(counts.get(r, 0) for r in ("candidate", "production", "tie", "scored"))
    assert detail["judge"]["last_error"].startswith("error: ConnectError")


async def test_a_judge_that_writes_prose_is_unparsable_never_a_verdict() -> None:
    async with (
        llms(candidate_tokens=48) as (p, c),
        running_fake_judge(FakeJudgeConfig(reply="Answer A is clearly better.")) as (j, counters),
    ):
        cfg = judged_config(p, c, {"url": j + "/v1/chat/completions", "kind": "openai",
                                   "model": "judge-1"})  # fmt: skip
        async with running_canary(cfg, controller=True) as can:

            def analysed(d: dict[str, Any]) -> bool:
                return bool(d.get("metrics")) and d["judge"]["results"]["unparsable"] >= 20

            detail = await drive(can, analysed, 15.0)
            await _settle(can)
            counts = await _metrics(can)
    assert counts.get("unparsable", 0) == counters.chat > 10
    assert judged_metric(detail)["n_candidate"] == 0
    assert detail["phase"] == "running"


async def test_a_slow_judge_never_slows_the_user_and_its_overflow_is_dropped() -> None:
    async with (
        llms(candidate_tokens=16) as (p, c),
        running_fake_judge(FakeJudgeConfig(delay=1.0)) as (j, counters),
    ):
        cfg = judged_config(p, c, {"url": j + "/judge", "kind": "http", "max_concurrency": 2})
        async with running_canary(cfg) as can, httpx.AsyncClient(timeout=10) as client:
            took = []
            for i in range(30):
                t0 = time.perf_counter()
                await chat(client, can.url, i, stream=bool(i % 2))
                took.append(time.perf_counter() - t0)
            await asyncio.sleep(0.2)
            counts = await _metrics(can)
    assert max(took) < 0.5, took  # a 1 s judge is not on the user's path
    assert counters.max_inflight <= 2
    assert counts["dropped_busy"] >= 20, counts
    assert counts["dropped_busy"] + counters.http == 30


async def test_live_share_judges_pairs_in_a_weighted_step_without_recording_the_twins() -> None:
    # No shadow step: a share of the live requests also goes to the other arm, for the
    # judge only. The twins are not observations: each arm's observed count is its users'.
    async with (
        llms(candidate_tokens=48, served=True) as (p, c),
        running_fake_judge(FakeJudgeConfig(prefer="longer", noise=0.3, seed=5)) as (j, counters),
    ):
        cfg = judged_config(p, c, {"url": j + "/judge", "kind": "http", "live_share": 0.5})
        rollout = cfg["rollouts"][0]
        rollout["steps"] = [{"weight": 50, "min_requests": 50}]
        # Each arm serves its own model name: the twin is rewritten for the other arm too.
        rollout["production"]["model"] = "llama-8b"
        rollout["candidate"]["model"] = "llama-8b-ft"
        async with running_canary(cfg, controller=True) as can:
            detail = await drive(can, done, 20.0)
            await _settle(can)
            acc = await can.samples("m")
            observed = acc.production.observed + acc.candidate.observed
            # Promoted: every request is the candidate's with probability 1, no weighted
            # step: no more twins (nor after a rollback)
            twins = can.proxy.routes["m"].judge.live
            async with httpx.AsyncClient(timeout=10) as client:
                for i in range(20):
                    await chat(client, can.url, i, stream=False)
            twins_after = can.proxy.routes["m"].judge.live
    assert detail["phase"] == "promoted", detail.get("last_decision")
    assert twins_after == twins
    assert judged_metric(detail)["verdict"] == "OK"
    judge = detail["judge"]
    assert judge["live_pairs"] == judge["sampled"] >= 60 and counters.http >= 60
    # Every user request is one observation; the twins (about half as many) are none.
    assert observed == detail["_sent"]
    assert acc.production.shadow == acc.candidate.shadow == 0
    assert judge["results"]["no_answer"] == 0  # no twin was refused for its model name
