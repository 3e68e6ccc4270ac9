"""The admin app runs on the narrow protocols the runtime hands it, without a proxy.

:class:`~canary.admin.RolloutRouting` and :class:`~canary.admin.FeedbackStores` are all it
reads of the data plane; the proxy implements both, and any other object may stand in.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from canary.admin import FeedbackStores, RolloutRouting, make_admin_app
from canary.config import load_config_text
from canary.metrics import Metrics
from canary.observe import Recorder
from canary.observe.feedback import FeedbackStore, store_for
from canary.proxy import H1Transport, Proxy
from tests.conftest import rollout_config

ACCURACY = {"name": "accuracy", "signal": "feedback", "stat": "rate", "max_decrease": "1pp"}


def _config() -> Any:
    cfg = rollout_config(
        ["http://127.0.0.1:1"], ["http://127.0.0.1:2"], analysis={"metrics": [ACCURACY]}
    )
    return load_config_text(yaml.safe_dump(cfg))


class OneStore:
    """A stand-in for the proxy: one rollout's feedback store, no routing."""

    def __init__(self, store: FeedbackStore) -> None:
        self.store = store

    def routing(self, rollout: str) -> dict[str, Any] | None:
        return None

    def input_health(self, rollout: str) -> dict[str, Any] | None:
        return None

    def feedback_stores(self) -> list[FeedbackStore]:
        return [self.store]

    def feedback_entries(self) -> dict[str, int]:
        return {self.store.rollout: len(self.store)}


@contextlib.asynccontextmanager
async def admin(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def _samples(text: str, name: str) -> dict[tuple[str, ...], float]:
    return {
        tuple(s.labels.values()): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


async def test_feedback_joins_through_the_protocol_without_a_proxy() -> None:
    store = store_for(_config().rollouts[0])
    assert store is not None
    store.add("r1", "candidate", 0.5, None, False, -1)
    store.add("r2", "production", 0.5, None, False, -1)
    stand_in = OneStore(store)
    recorder = Recorder()
    app = make_admin_app(
        stand_in, Metrics(), lambda: (True, "serving"), feedback=stand_in, recorder=recorder
    )
    async with admin(app) as url, httpx.AsyncClient() as client:
        before = _samples((await client.get(url + "/metrics")).text, "canary_feedback_entries")
        r = await client.post(
            url + "/api/v1/feedback",
            json=[{"request_id": "r1", "correct": True}, {"request_id": "nope", "correct": False}],
        )
        after = _samples((await client.get(url + "/metrics")).text, "canary_feedback_entries")
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert (results["accepted"], results["unknown"]) == (1, 1)
    assert before == after == {("m",): 2.0}  # read from the stand-in at each scrape


async def test_without_feedback_stores_the_intake_is_refused() -> None:
    app = make_admin_app(OneStore(FeedbackStore("m", _config().rollouts[0].feedback)),
                         Metrics(), lambda: (True, "serving"), recorder=Recorder())  # fmt: skip
    async with admin(app) as url, httpx.AsyncClient() as client:
        r = await client.post(url + "/api/v1/feedback", json=[])
    assert r.status_code == 409


async def test_the_proxy_implements_both_protocols() -> None:
    config = _config()
    proxy = Proxy(config, H1Transport(), Recorder(), Metrics())
    routing: RolloutRouting = proxy
    feedback: FeedbackStores = proxy
    assert routing.routing("m") == {
        "match": {"path_prefix": "/", "host": None},
        "endpoints": {"production": ["http://127.0.0.1:1"], "candidate": ["http://127.0.0.1:2"]},
        "healthy_endpoints": {"production": 1, "candidate": 1},
    }
    assert routing.routing("other") is None
    assert routing.input_health("m") is None  # no `inputs` configured
    assert [s.rollout for s in feedback.feedback_stores()] == ["m"]
    assert feedback.feedback_entries() == {"m": 0}
    await proxy.close()
