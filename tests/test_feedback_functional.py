"""POST /api/v1/feedback over real loopback servers: requests through the proxy, labels posted
back by request id, the ``feedback`` signal in the recorder and the counts on /metrics."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.fake_model import true_label
from tests.conftest import Canary, fake_pair, rollout_config, running_canary

ACCURACY = {"name": "accuracy", "signal": "feedback", "stat": "rate", "max_decrease": "1pp"}


async def _predict(
    client: httpx.AsyncClient, can: Canary, n: int, prefix: str = "q", **headers: str
) -> list[dict[str, Any]]:
    """Send ``n`` predict requests; return what a client would keep for its labels."""
    out = []
    for i in range(n):
        body = {"id": f"{prefix}{i}", "features": [i, 1.0]}
        r = await client.post(can.url + "/predict", json=body, headers=headers)
        assert r.status_code == 200, r.text
        out.append(
            {
                "rid": r.headers["X-Request-Id"],
                "arm": r.headers["X-Canary-Arm"],
                "prediction": r.json()["prediction"],
                "label": true_label(body),
                "body": body,
            }
        )
    return out


async def _feedback(client: httpx.AsyncClient, can: Canary, body: Any) -> httpx.Response:
    return await client.post(can.admin + "/api/v1/feedback", json=body)


async def _metrics(client: httpx.AsyncClient, can: Canary) -> dict[tuple[str, str], float]:
    """``canary_feedback_total`` by (rollout, result) and ``canary_feedback_entries`` by
    ("entries", rollout), parsed with Prometheus' own parser."""
    text = (await client.get(can.admin + "/metrics")).text
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "canary_feedback_total":
                out[(s.labels["rollout"], s.labels["result"])] = s.value
            elif s.name == "canary_feedback_entries":
                out[("entries", s.labels["rollout"])] = s.value
    return out


async def test_labels_round_trip_into_each_arms_feedback_signal() -> None:
    async with fake_pair(candidate={"accuracy": 0.5}) as (p, c):
        cfg = rollout_config(
            [p], [c], steps=[{"weight": 50}], prediction="json:prediction",
            analysis={"metrics": [ACCURACY]}, feedback={"count_at": "arrival"},
        )  # fmt: skip
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            sent = await _predict(client, can, 120)
            arms = {s["arm"] for s in sent}
            assert arms == {"production", "candidate"}
            labels = [{"request_id": s["rid"], "label": s["label"]} for s in sent]
            r = await _feedback(client, can, labels)
            assert r.status_code == 200, r.text
            assert r.json() == {
                "items": 120,
                "results": {
                    "accepted": 120, "unknown": 0, "expired": 0, "duplicate": 0, "invalid": 0,
                    "no_prediction": 0,
                },
                "errors": [],
            }  # fmt: skip
            totals = await can.samples("m")
            for arm in ("production", "candidate"):
                mine = [s for s in sent if s["arm"] == arm]
                correct = sum(s["prediction"] == s["label"] for s in mine)
                acc = totals.arms[arm].signals["feedback"]
                assert (acc.n, acc.total) == (len(mine), float(correct))
                assert set(acc.strata) == {0.5}  # recorded with the arm's propensity
                assert totals.arms[arm].signals["feedback"].mean == pytest.approx(
                    correct / len(mine)
                )
            # the fake candidate (50%) really is less accurate than production (90%) here
            assert (
                totals.candidate.signals["feedback"].mean
                < totals.production.signals["feedback"].mean
            )
            # every label again: duplicates, nothing recorded twice
            r = await _feedback(client, can, labels[:10])
            assert r.json()["results"]["duplicate"] == 10
            assert (await can.samples("m")).production.signals["feedback"].n + (
                await can.samples("m")
            ).candidate.signals["feedback"].n == 120
            m = await _metrics(client, can)
            assert m[("m", "accepted")] == 120 and m[("m", "duplicate")] == 10
            assert m[("entries", "m")] == 120  # joined markers stay until their ttl


async def test_a_shadow_step_scores_the_mirrored_candidate_on_the_same_requests() -> None:
    async with fake_pair(candidate={"accuracy": 0.5}) as (p, c):
        cfg = rollout_config(
            [p], [c], steps=[{"shadow": {"min_requests": 1000}}, {"weight": 50}],
            prediction="json:prediction", analysis={"metrics": [ACCURACY]},
            feedback={"count_at": "arrival"},
        )  # fmt: skip
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            sent = await _predict(client, can, 60)
            assert {s["arm"] for s in sent} == {"production"}  # users only see production
            counters = can.proxy.routes["m"].counters.arms["candidate"]
            for _ in range(200):  # the mirrors run in the background
                if sum(counters.requests.values()) == 60:
                    break
                await asyncio.sleep(0.01)
            # correct/reward credit the answer the user saw, never the mirror
            r = await _feedback(client, can, {"request_id": sent[0]["rid"], "correct": True})
            assert r.json()["results"]["accepted"] == 1
            labels = [{"request_id": s["rid"], "label": s["label"]} for s in sent[1:]]
            r = await _feedback(client, can, labels)
            assert r.json()["results"]["accepted"] == 59
            totals = await can.samples("m")
            prod, cand = totals.production.signals["feedback"], totals.candidate.signals["feedback"]
            assert prod.n == 60 and cand.n == 59  # the same 59 requests on both arms
            assert set(cand.strata) == {1.0}
            assert prod.total == 1 + sum(s["prediction"] == s["label"] for s in sent[1:])
            # the candidate's answers never reached a user: ask it directly (its answer
            # depends only on the request) to know which of them were right
            hits = 0
            for s in sent[1:]:
                direct = await client.post(c + "/predict", json=s["body"])
                hits += direct.json()["prediction"] == s["label"]
            assert cand.total == hits and 0 < hits < 59


async def test_unknown_duplicate_expired_invalid_and_no_prediction_on_metrics() -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config(
            [p], [c], steps=[{"weight": 50}], prediction="json:missing",
            feedback={"ttl": "1s", "max_entries": 1000},
        )  # fmt: skip
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            sent = await _predict(client, can, 6)
            forced = await _predict(client, can, 1, "f", **{"X-Canary-Arm": "candidate"})
            items: list[Any] = [
                {"request_id": sent[0]["rid"], "label": 1},  # no prediction at json:missing
                {"request_id": sent[1]["rid"], "correct": True},
                {"request_id": sent[1]["rid"], "reward": 0.5},  # duplicate
                {"request_id": "never-seen", "correct": True},
                {"request_id": forced[0]["rid"], "correct": True},  # not analysed: not kept
                {"request_id": sent[2]["rid"], "correct": "yes"},
                ["not", "an", "object"],
            ]
            r = await _feedback(client, can, items)
            assert r.status_code == 200
            body = r.json()
            assert body["results"] == {
                "accepted": 1, "unknown": 2, "expired": 0, "duplicate": 1, "invalid": 2,
                "no_prediction": 1,
            }  # fmt: skip
            assert [e["index"] for e in body["errors"]] == [5, 6]
            assert "'correct' must be true or false" in body["errors"][0]["error"]
            await asyncio.sleep(1.1)  # past the 1 s ttl
            r = await _feedback(
                client, can, [{"request_id": s["rid"], "correct": True} for s in sent[2:]]
            )
            assert r.json()["results"]["expired"] == 4
            m = await _metrics(client, can)
    assert m[("m", "accepted")] == 1
    assert m[("m", "duplicate")] == 1
    assert m[("m", "no_prediction")] == 1
    assert m[("m", "expired")] == 4
    assert m[("", "unknown")] == 2
    assert m[("", "invalid")] == 2
    assert m[("entries", "m")] == 0  # all dropped by now


async def test_eviction_at_max_entries_and_a_reload_keeps_the_store() -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config(
            [p], [c], steps=[{"weight": 50}], prediction="json:prediction",
            feedback={"max_entries": 5},
        )  # fmt: skip
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            sent = await _predict(client, can, 8)
            store = can.proxy.routes["m"].feedback
            assert (await _metrics(client, can))[("entries", "m")] == 5
            can.proxy.apply_config(can.runtime.config)  # what a reload does to the proxy
            assert can.proxy.routes["m"].feedback is store
            r = await _feedback(client, can, [{"request_id": s["rid"], "label": 0} for s in sent])
            results = r.json()["results"]
            assert results["expired"] == 3 and results["accepted"] == 5  # oldest evicted first
            m = await _metrics(client, can)
            assert m[("m", "expired")] == 3 and m[("m", "accepted")] == 5


async def test_a_rollout_without_feedback_keeps_nothing() -> None:
    async with fake_pair() as (p, c):
        async with running_canary(rollout_config([p], [c])) as can, httpx.AsyncClient() as client:
            assert can.proxy.routes["m"].feedback is None
            sent = await _predict(client, can, 3)
            r = await _feedback(client, can, [{"request_id": s["rid"], "label": 1} for s in sent])
            assert r.json()["results"]["unknown"] == 3
            assert ("entries", "m") not in await _metrics(client, can)


async def test_bad_bodies_and_the_bearer_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_CANARY_TOKEN", "s3cret-token")
    async with fake_pair() as (p, c):
        cfg = rollout_config([p], [c], prediction="json:prediction")
        cfg["admin"]["token_env"] = "TEST_CANARY_TOKEN"
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            url = can.admin + "/api/v1/feedback"
            item = {"request_id": "x", "correct": True}
            assert (await client.post(url, json=item)).status_code == 401
            wrong = {"Authorization": "Bearer s3cret-tokem"}
            assert (await client.post(url, json=item, headers=wrong)).status_code == 401
            good = {"Authorization": "Bearer s3cret-token", "Content-Type": "application/json"}
            r = await client.post(url, json=item, headers=good)
            assert r.status_code == 200 and r.json()["results"]["unknown"] == 1
            r = await client.post(url, content=b"{nope", headers=good)
            assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
            r = await client.post(url, content=b'"text"', headers=good)
            assert r.status_code == 400 and "JSON object or an array" in r.json()["error"]
            r = await client.post(url, headers=good)
            assert r.status_code == 400 and "empty body" in r.json()["error"]
            big = json.dumps([item] * 3000).encode()  # > 64 KiB
            r = await client.post(url, content=big, headers=good)
            assert r.status_code == 413 and "smaller batches" in r.json()["error"]
            # the proxy kept serving through all of it
            assert (await client.post(can.url + "/predict", json={"id": "1"})).status_code == 200


async def test_at_maturity_labels_count_once_their_answers_are_ttl_old() -> None:
    # The default count_at: the labels wait in the store and are recorded by the proxy's
    # once-a-second ticker when their answers are ttl old, with no request or feedback
    # arriving meanwhile; a label posted after the window counts for neither arm.
    async with fake_pair(candidate={"accuracy": 0.5}) as (p, c):
        cfg = rollout_config(
            [p], [c], steps=[{"weight": 50}], prediction="json:prediction",
            analysis={"metrics": [ACCURACY]}, feedback={"ttl": "2s"},
        )  # fmt: skip
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            sent = await _predict(client, can, 40)
            labels = [{"request_id": s["rid"], "label": s["label"]} for s in sent[:30]]
            r = await _feedback(client, can, labels)
            assert r.json()["results"]["accepted"] == 30
            totals = await can.samples("m")
            assert all("feedback" not in totals.arms[a].signals for a in totals.arms)
            await asyncio.sleep(3.5)  # past the 2 s window and a tick of the ticker
            late = [{"request_id": s["rid"], "label": s["label"]} for s in sent[30:]]
            assert (await _feedback(client, can, late)).json()["results"]["expired"] == 10
            totals = await can.samples("m")
            signals = [totals.arms[a].signals.get("feedback") for a in totals.arms]
            assert sum(acc.n for acc in signals if acc is not None) == 30
            for arm in totals.arms:
                acc = totals.arms[arm].signals.get("feedback")
                mine = [s for s in sent[:30] if s["arm"] == arm]
                assert (acc.n if acc else 0) == len(mine)
                if acc is not None:
                    assert acc.total == sum(s["prediction"] == s["label"] for s in mine)
