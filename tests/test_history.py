"""The controller's metric history: one point per analysis (at most one a second) and one at
each decision, written to the store by the flushes (fenced, bounded, never holding a rollout),
surviving restarts, the same on every process, and served by ``GET
/api/v1/rollouts/{name}/history``. The stores' side is in ``test_history_store.py``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import httpx
import yaml

from canary.admin.views import rollout_detail
from canary.config import load_config_text
from canary.controller import Controller
from canary.controller.history import MAX_PENDING, PER_FLUSH, HistoryWriter, history_point
from canary.controller.leadership import Leadership
from canary.errors import StoreError
from canary.metrics import Metrics
from canary.observe import Recorder
from canary.store import MemoryStore, SQLiteStore
from tests.conftest import fake_pair, rollout_config, running_canary
from tests.test_controller import Clock, Sink, _config, _controller, _feed


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-12)  # 5 significant digits


def _matches(point_metric: dict[str, Any], shown: dict[str, Any]) -> bool:
    """A point's metric is the admin API's result of the same analysis (rounded)."""
    return (
        point_metric["k"] == shown["name"]
        and point_metric["v"] == shown["verdict"]
        and point_metric["n"] == [shown["n_production"], shown["n_candidate"]]
        and all(
            _close(point_metric[k], shown[s])
            for k, s in (("e", "estimate"), ("l", "lower"), ("u", "upper"), ("tol", "tolerance"))
        )
    )


async def test_each_analysis_and_each_decision_leaves_a_point() -> None:
    ctl, rec, _sink, _hooks, clock, store, _ = await _controller(_config())
    _feed(rec, 30, 10, seed=1)  # within burn-in: an analysis, no decision
    await ctl.flush()
    await ctl.evaluate(force=True)
    await ctl.flush()
    points = await store.history("m")
    assert [p.get("a") for p in points] == ["START", None]
    start, first = points
    assert start["t"] == clock.t and start["ph"] == "running" and "m" not in start
    assert start["w"] == [90.0, 10.0] and start["st"] == 0 and start["n"] == [0, 0]
    detail = rollout_detail(ctl.view("m"))
    assert len(first["m"]) == len(detail["metrics"]) == 1
    assert _matches(first["m"][0], detail["metrics"][0])
    assert first["srm"] == detail["guards"][0]["verdict"]
    assert first["n"] == [detail["samples"]["production"], detail["samples"]["candidate"]]
    # a second analysis within a second of the last point is not recorded ...
    _feed(rec, 30, 10, seed=2)
    await ctl.flush()
    await ctl.evaluate(force=True)
    await ctl.flush()
    assert len(await store.history("m")) == 2
    # ... one a second later is; and a decision (ADVANCE) is, with its reason, at once
    _feed(rec, 800, 10, seed=3)
    clock.t += 1
    await ctl.flush()
    await ctl.evaluate(force=True)
    assert ctl.state("m").step == 1
    await ctl.flush()
    points = await store.history("m")
    assert points[-1]["a"] == "ADVANCE" and points[-1]["r"]
    assert points[-1]["st"] == 1 and points[-1]["w"] == [50.0, 50.0] and points[-1]["sn"] == 0
    detail = rollout_detail(ctl.view("m"))
    assert _matches(points[-1]["m"][0], detail["metrics"][0])
    # an operator's command is a decision point too, and the API read gives the same points
    clock.t += 0.1
    await ctl.command("m", "pause", "lunch")
    pending = await ctl.history("m")  # not flushed yet: the unwritten point is shown
    assert pending[-1]["a"] == "PAUSE" and pending[-1]["ph"] == "paused"
    await ctl.flush()
    stored = await store.history("m")
    assert stored == pending == await ctl.history("m")
    assert await ctl.history("m", since=stored[-2]["t"]) == stored[-1:]
    times = [p["t"] for p in stored]
    assert times == sorted(times)
    await store.close()


async def test_the_history_survives_a_restart_and_a_new_rollout_starts_a_new_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    config, clock = _config(), Clock()
    store = SQLiteStore(path)
    await store.open()
    rec = Recorder()
    ctl = Controller(config, store, rec, Metrics(), Sink(), clock=clock, monotonic=clock)
    await ctl.load()
    for i in range(3):
        _feed(rec, 40, 10, seed=i)
        clock.t += 1
        await ctl.tick()
    await ctl.stop()
    before = await ctl.history("m")
    assert len(before) == 4 and before[0]["a"] == "START"
    await store.close()
    # the process restarts on the same file: the history is there and goes on
    store = SQLiteStore(path)
    await store.open()
    rec = Recorder()
    ctl = Controller(config, store, rec, Metrics(), Sink(), clock=clock, monotonic=clock)
    await ctl.load()
    assert await ctl.history("m") == before
    _feed(rec, 40, 10, seed=9)
    clock.t += 1
    await ctl.tick()
    await ctl.flush()
    after = await ctl.history("m")
    assert after[:4] == before and len(after) == 5
    # new endpoints: a new rollout of that name, whose history starts afresh
    moved = load_config_text(
        yaml.safe_dump(rollout_config(["http://127.0.0.1:1"], ["http://127.0.0.1:3"]))
    )
    await ctl.apply_config(moved)
    await ctl.flush()
    assert [p.get("a") for p in await ctl.history("m")] == ["START"]
    await ctl.stop()
    await store.close()


class _NoHistory(MemoryStore):
    """A memory store whose history writes fail while ``down`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def append_history(self, rollout: str, point: dict[str, Any], **kw: Any) -> None:
        if self.down:
            raise StoreError("history table locked")
        await super().append_history(rollout, point, **kw)


async def test_a_failing_history_write_holds_nothing_and_is_retried() -> None:
    store = _NoHistory()
    ctl, rec, _sink, _hooks, clock, _, metrics = await _controller(_config(), store)
    store.down = True
    _feed(rec, 800, 10, seed=3)
    clock.t += 1
    await ctl.flush()
    await ctl.evaluate(force=True)
    await ctl.flush()
    assert ctl.state("m").step == 1  # decided and applied all the same
    assert ctl.store_ok
    assert await store.history("m") == []
    errors = metrics.registry.get_sample_value(
        "canary_store_errors_total", {"operation": "history"}
    )
    assert errors is not None and errors >= 1
    store.down = False
    await ctl.flush()
    assert [p.get("a") for p in await store.history("m")] == ["START", "ADVANCE"]
    await store.close()


async def test_the_queue_is_bounded_and_a_fenced_write_drops_it() -> None:
    store = MemoryStore()
    await store.open()
    token = await store.acquire_lease("a", 30.0)
    writer = HistoryWriter(store, Metrics(), timeout=1.0, fence=lambda: token)
    config = _config().rollouts[0]
    from canary.decision import RolloutState

    state = RolloutState.start(config, 0.0)
    for i in range(MAX_PENDING + 10):
        writer.record("m", history_point(config, state, None, float(i), (0, 0)), keep=i == 0)
    pending = writer.pending("m")
    assert len(pending) == MAX_PENDING and pending[0]["t"] == 0.0  # the decision stays
    assert pending[1]["t"] == 11.0 and pending[-1]["t"] == MAX_PENDING + 9
    await writer.flush()  # a backlog drains over several flushes
    assert len(writer.pending("m")) == MAX_PENDING - PER_FLUSH
    assert [p["t"] for p in await store.history("m")][:2] == [0.0, 11.0]
    await store.release_lease("a")
    await store.acquire_lease("b", 30.0)  # another process leads: a's token is stale
    await writer.flush()
    assert writer.pending("m") == [] and len(await store.history("m")) == PER_FLUSH
    await store.close()


async def test_only_the_leader_writes_and_every_process_reads_the_same(tmp_path: Path) -> None:
    clock = Clock()

    def process(name: str) -> tuple[Controller, SQLiteStore, Recorder]:
        store = SQLiteStore(tmp_path / "s.db", clock=clock)
        rec = Recorder()
        lead = Leadership(store, 1.0, holder=name, monotonic=clock)
        ctl = Controller(
            _config(), store, rec, Metrics(), Sink(), clock=clock, monotonic=clock,
            leadership=lead,
        )  # fmt: skip
        return ctl, store, rec

    a, a_store, a_rec = process("a")
    b, b_store, b_rec = process("b")
    for s in (a_store, b_store):
        await s.open()
    await a.load()
    await b.load()
    for i in range(4):
        _feed(a_rec, 100, 10, seed=i)
        _feed(b_rec, 100, 10, seed=50 + i)
        await b.tick()
        await a.tick()
        clock.t += 0.5
    await a.flush()
    led = await a.history("m")
    assert led[0]["a"] == "START" and len(led) >= 3
    assert await b.history("m") == led  # the follower reads the store: the same points
    assert b._history.pending("m") == []  # a follower records nothing
    for ctl in (a, b):
        await ctl.stop()
    for s in (a_store, b_store):
        await s.close()


async def test_the_history_endpoint() -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config(
            [p], [c], steps=[{"weight": 20}, {"weight": 50}],
            analysis={"metrics": [
                {"name": "latency_p95", "signal": "latency", "stat": "p95", "max_increase": "10%"},
                {"name": "errors", "signal": "error", "stat": "rate", "max_increase": "1pp"},
            ]},
        )  # fmt: skip
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            for i in range(40):
                await client.post(can.url + "/predict", json={"id": str(i)})
            ctl = can.runtime.controller
            await ctl.flush()
            await ctl.evaluate(force=True)
            await ctl.flush()
            r = await client.get(can.admin + "/api/v1/rollouts/m/history")
            assert r.status_code == 200
            body = r.json()
            assert body["rollout"] == "m"
            assert [m["name"] for m in body["metrics"]] == ["latency_p95", "errors"]
            assert body["metrics"][0] == {
                "name": "latency_p95",
                "signal": "latency",
                "stat": "p95",
                "tolerance": "max_increase: 10%",
                "scale": "candidate/production ratio",
            }
            assert body["metrics"][1]["tolerance"] == "max_increase: 1pp"
            points = body["points"]
            assert [p.get("a") for p in points] == ["START", None]
            detail = (await client.get(can.admin + "/api/v1/rollouts/m")).json()
            for got, shown in zip(points[-1]["m"], detail["metrics"], strict=True):
                assert _matches(got, shown)
            last = points[-1]["t"]
            r = await client.get(can.admin + f"/api/v1/rollouts/m/history?since={last}")
            assert r.status_code == 200 and r.json()["points"] == []
            r = await client.get(can.admin + f"/api/v1/rollouts/m/history?since={last - 1e-3}")
            assert len(r.json()["points"]) == 1
            for bad in ("yesterday", "nan", "inf", ""):
                r = await client.get(
                    can.admin + "/api/v1/rollouts/m/history", params={"since": bad}
                )
                assert r.status_code == 400, bad
                assert "since" in r.json()["error"]
            r = await client.get(can.admin + "/api/v1/rollouts/zzz/history")
            assert r.status_code == 404
            # a long history (encoded off the event loop) comes back whole and in order
            for i in range(1, 81):
                extra = {**points[-1], "t": last + i}
                await can.runtime.store.append_history("m", extra, at=last + i)
            r = await client.get(can.admin + "/api/v1/rollouts/m/history")
            assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
            times = [p["t"] for p in r.json()["points"]]
            assert len(times) == 82 and times == sorted(times) and times[-1] == last + 80


async def test_no_points_after_the_end_and_a_retry_starts_a_new_history() -> None:
    ctl, rec, _sink, _hooks, clock, store, _ = await _controller(_config())
    await ctl.command("m", "rollback", "bad idea")
    for i in range(3):  # analyses of a finished rollout leave no points
        _feed(rec, 100, 0, seed=i)
        clock.t += 1
        await ctl.tick()
    await ctl.flush()
    assert [p.get("a") for p in await store.history("m")] == ["START", "ROLLBACK"]
    clock.t += 1
    await ctl.command("m", "retry")
    await ctl.flush()
    points = await store.history("m")
    assert [p.get("a") for p in points] == ["RETRY"]
    assert points[0]["ph"] == "running" and points[0]["n"] == [0, 0]
    await store.close()
