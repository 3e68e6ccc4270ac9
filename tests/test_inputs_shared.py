"""Input health merged over several canary processes that share one store (shared mode).

Unit tests of the merge (a property: the snapshots of a stream split over processes merge
into the snapshot of the whole stream), of the monitor's shared view, of the sync through a
real store, and a functional test: two canaries on one SQLite file (``--workers`` processes)
or one Redis (replicas), request bodies that drift sent only through the follower B, and the
leader A's analysis holding the rollout and A's admin API and metrics showing the drift.
Without the merge (the sync disabled), A sees nothing and advances: the same scenario is run
that way to show that the test would catch it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canary.admin.views import rollout_summary
from canary.config import InputsConfig, load_config_text
from canary.controller.shared_inputs import InputSharing
from canary.observe import Recorder
from canary.observe.inputs import (
    RESULTS,
    TYPES,
    InputHealth,
    InputMonitor,
    drift_checks,
    inputs_fingerprint,
    merge_health,
)
from canary.runtime import Runtime
from canary.store import MemoryStore, SQLiteStore
from canary.workers import WorkerSpec
from tests.conftest import fake_pair, rollout_config
from tests.redis_harness import RedisServer, free_port
from tests.test_inputs_functional import _docs, _metrics, _post_all

FIELDS = ["amount", "country"]


def _config(**inputs: Any) -> InputsConfig:
    data: dict[str, Any] = {"fields": FIELDS, **inputs}
    return InputsConfig.model_validate(data)


GIVEN = {"fields": {"amount": {"mean": 50.0, "std": 20.0}, "country": {"null_rate": 0.0}}}


def _body(value: Any) -> bytes:
    doc: dict[str, Any] = {"country": "DE"}
    if value != "missing":
        doc["amount"] = value
    return json.dumps(doc).encode()


def _sums(w: Any, shift: float | None) -> tuple[float, float]:
    """Sum and sum of squares of a window's numbers (undoing the shift)."""
    if not w.numbers or shift is None:
        return 0.0, 0.0
    return (
        w.numbers * shift + w.total,
        w.total_sq + 2 * shift * w.total + w.numbers * shift * shift,
    )


def _assert_same_window(a: Any, sa: float | None, b: Any, sb: float | None) -> None:
    assert a.types == b.types and a.numbers == b.numbers
    assert (a.min, a.max) == (b.min, b.max)
    s1, q1 = _sums(a, sa)
    s2, q2 = _sums(b, sb)
    assert s1 == pytest.approx(s2, rel=1e-9, abs=1e-6)
    assert q1 == pytest.approx(q2, rel=1e-9, abs=1e-6)


values = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.none(),
    st.just("missing"),
    st.text(max_size=3),
    st.booleans(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=st.lists(st.tuples(values, st.integers(0, 3)), max_size=60),
    junk=st.lists(st.integers(0, 3), max_size=5),
)
def test_merging_the_snapshots_of_a_split_stream_gives_the_whole_streams(
    stream: list[tuple[Any, int]], junk: list[int]
) -> None:
    """A given baseline: every process counts into its current window from the first
    request, so the processes' snapshots add up to one process's that saw everything."""
    cfg = _config(baseline=GIVEN)
    whole = InputMonitor("m", cfg)
    parts = [InputMonitor("m", cfg) for _ in range(4)]
    for value, who in stream:
        whole.observe(_body(value))
        parts[who].observe(_body(value))
    for who in junk:  # results other than inspected are summed too
        whole.observe(b"not json")
        parts[who].observe(b"not json")
        whole.not_inspected()
        parts[who].not_inspected()
    merged = merge_health([p.snapshot() for p in parts])
    expected = whole.snapshot()
    assert merged.requests == expected.requests and not merged.learning
    for got, want in zip(merged.fields, expected.fields, strict=True):
        assert got.path == want.path
        _assert_same_window(got.current, got.shift, want.current, want.shift)
        _assert_same_window(got.baseline, got.shift, want.baseline, want.shift)
    # Merging is associative, and a snapshot survives the store's JSON unchanged.
    snaps = [p.snapshot() for p in parts]
    nested = merge_health([merge_health(snaps[:2]), merge_health(snaps[2:])])
    for a, b in zip(nested.fields, merged.fields, strict=True):
        _assert_same_window(a.current, a.shift, b.current, b.shift)
    for s in snaps:
        assert InputHealth.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def _learned(n: int, seed: int, mu: float, after: int) -> InputMonitor:
    """A monitor that learned its baseline from ``n`` values around 50, then saw ``after``
    values around ``mu``."""
    m = InputMonitor("m", _config(baseline={"requests": 30}))
    rng = np.random.default_rng(seed)
    for x in rng.normal(50.0, 20.0, n):
        m.observe(_body(float(x)))
    for x in rng.normal(mu, 20.0, after):
        m.observe(_body(float(x)))
    return m


def test_a_learned_baseline_merges_as_the_sum_of_the_frozen_ones() -> None:
    a, b = _learned(30, 1, 50.0, 40), _learned(30, 2, 90.0, 50)
    still = _learned(10, 3, 50.0, 0)  # learning: contributes to neither window
    sa, sb, ss = a.snapshot(), b.snapshot(), still.snapshot()
    assert not sa.learning and not sb.learning and ss.learning
    merged = merge_health([sa, ss, sb])
    assert not merged.learning and merged.baseline_requests == 60
    assert merged.requests == tuple(
        x + y + z for x, y, z in zip(sa.requests, sb.requests, ss.requests, strict=True)
    )
    amount = merged.fields[0]
    assert amount.baseline.numbers == 60 and amount.current.numbers == 90
    base_sum = sum(_sums(s.fields[0].baseline, s.fields[0].shift)[0] for s in (sa, sb))
    assert _sums(amount.baseline, amount.shift)[0] == pytest.approx(base_sum)
    cur_sum = sum(_sums(s.fields[0].current, s.fields[0].shift)[0] for s in (sa, sb))
    assert _sums(amount.current, amount.shift)[0] == pytest.approx(cur_sum)
    # All learning: still learning; the count shown is the process closest to freezing.
    both = merge_health([ss, _learned(20, 4, 50.0, 0).snapshot()])
    assert both.learning and both.baseline_requests == 20
    assert drift_checks(a.config, both)[0].checks == ()


def test_the_monitor_reports_the_merged_counts_only_in_shared_mode() -> None:
    cfg = _config(baseline=GIVEN)
    a, b = InputMonitor("m", cfg), InputMonitor("m", cfg)
    for x in np.random.default_rng(5).normal(90.0, 20.0, 200):  # drift, only through b
        b.observe(_body(float(x)))
    a.observe(_body(50.0))
    alone = a.snapshot()
    assert alone == a.local_snapshot() and not a.shared  # single process: as before
    assert a.report(max_age=0).drifted == ()
    a.set_peers([b.local_snapshot()])
    assert a.shared and a.local_snapshot() == alone
    merged = a.snapshot()
    assert merged.requests[RESULTS.index("inspected")] == 201
    assert a.report(max_age=0).drifted == ("amount",)
    assert a.drifted_fields(max_age=0) == ["amount"]
    a.set_peers(
        [InputMonitor("m", _config(fields=["other"], baseline={"requests": 30})).snapshot()]
    )
    assert not a.shared  # other fields: ignored
    a.set_peers([b.local_snapshot()])
    a.clear_peers()
    assert a.snapshot() == alone


def test_the_fingerprint_follows_the_inputs_settings() -> None:
    one = inputs_fingerprint(_config(baseline=GIVEN))
    assert one == inputs_fingerprint(_config(baseline=GIVEN))
    assert one != inputs_fingerprint(_config(baseline=GIVEN, alpha=0.001))
    assert one != inputs_fingerprint(_config())


def test_snapshots_with_infinite_bounds_survive_json() -> None:
    m = InputMonitor("m", _config(baseline=GIVEN))
    m.observe(b'{"amount": "x"}')  # no number: min inf, max -inf
    s = m.snapshot()
    text = json.dumps(s.to_dict(), allow_nan=False)
    assert InputHealth.from_dict(json.loads(text)) == s
    with pytest.raises(ValueError):
        InputHealth.from_dict({"rollout": "m"})
    bad = s.to_dict()
    bad["fields"][0]["current"][0] = [1, 2]
    with pytest.raises(ValueError):
        InputHealth.from_dict(bad)


# -- the sync through a store ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _process(
    store: Any, name: str, cfg: InputsConfig, clock: Clock
) -> tuple[Recorder, InputSharing]:
    rec = Recorder()
    rollout = load_config_text(
        yaml.safe_dump(
            rollout_config(
                ["http://127.0.0.1:1"], ["http://127.0.0.1:2"],
                inputs=cfg.model_dump(mode="json", exclude_defaults=True),
            )
        )
    ).rollouts  # fmt: skip
    rec.apply_inputs(rollout)
    sharing = InputSharing(
        store, rec, lambda: name, timeout=5.0, clock=clock, monotonic=clock, read_every=1.0
    )
    return rec, sharing


async def test_the_sync_merges_every_process_keeps_the_dead_and_survives_store_failures(
    tmp_path: Path,
) -> None:
    clock = Clock()
    cfg = _config(baseline=GIVEN)
    stores = [SQLiteStore(tmp_path / "s.db"), SQLiteStore(tmp_path / "s.db")]
    for s in stores:
        await s.open()
    try:
        (ra, sa), (rb, sb) = (_process(s, n, cfg, clock) for s, n in zip(stores, "ab", strict=True))
        ma, mb = ra.input_monitor("m"), rb.input_monitor("m")
        assert ma is not None and mb is not None
        for x in np.random.default_rng(6).normal(90.0, 20.0, 150):
            mb.observe(_body(float(x)))
        await sb.sync(["m"])
        await sb.sync(["m"])  # a retried write never counts twice: absolute counts
        await sa.sync(["m"], leading=True)
        inspected = RESULTS.index("inspected")
        assert ra.input_health("m").requests[inspected] == 150  # type: ignore[union-attr]
        assert ma.report(max_age=0).drifted == ("amount",)

        # b stops: its counts stay in the merge.
        await stores[1].close()
        clock.t += 1.0
        await sa.sync(["m"], leading=True)
        assert ma.snapshot().requests[inspected] == 150

        # The store fails: the last merged view stays.
        await stores[0].close()
        clock.t += 1.0
        await sa.sync(["m"], leading=True)
        assert ma.snapshot().requests[inspected] == 150
    finally:
        for s in stores:
            await s.close()


async def test_the_leader_drops_stale_entries_of_other_settings_and_a_restarted_rollout() -> None:
    clock = Clock()
    store = MemoryStore()
    await store.open()
    old = _config(baseline=GIVEN, alpha=0.001)
    new = _config(baseline=GIVEN)
    _, s_old = _process(store, "old", old, clock)
    _, s_b = _process(store, "b", new, clock)
    _, s_a = _process(store, "a", new, clock)
    await s_old.sync(["m"])
    await s_b.sync(["m"])
    await s_a.sync(["m"], leading=True)
    assert set(await store.input_health("m")) == {"old", "a", "b"}  # old: written just now
    clock.t += 61.0
    await s_a.sync(["m"], leading=True)
    assert set(await store.input_health("m")) == {"a", "b"}
    await s_a.drop("m")  # the rollout starts anew: every entry goes, live ones come back
    assert await store.input_health("m") == {}
    await s_b.sync(["m"])
    assert set(await store.input_health("m")) == {"b"}


# -- two canaries on one store -------------------------------------------------------------------


def _shared_config(state: dict[str, Any], p: str, c: str) -> dict[str, Any]:
    cfg = rollout_config(
        [p], [c],
        steps=[{"weight": 20, "min_duration": "5s"}, {"weight": 50}],
        analysis={"interval": "100ms", "burn_in": 0, "metrics": []},
        inputs={
            "fields": ["amount"],
            "baseline": {"fields": {"amount": {"mean": 50.0, "std": 20.0}}},
            "on_drift": "hold",
        },
    )  # fmt: skip
    cfg["state"] = state
    return cfg


@contextlib.asynccontextmanager
async def _canary(cfg: dict[str, Any], worker: Any = None) -> AsyncIterator[Runtime]:
    config = load_config_text(yaml.safe_dump(cfg))
    runtime = Runtime(config, run_controller=True, worker=worker) if worker else Runtime(config)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def _scenario(
    backend: str, tmp_path: Path, redis: Callable[[], RedisServer] | None
) -> tuple[dict[str, Any], dict[str, Any], dict[tuple[str, ...], float], bool]:
    """A leads, B follows; drifted bodies only through B. What A decided, A's admin input
    report, A's metrics, and whether A led throughout."""
    workers: Sequence[Any] = (None, None)
    if backend == "sqlite":
        state: dict[str, Any] = {"backend": "sqlite", "path": str(tmp_path / "state.db")}
        workers = [WorkerSpec(i, 2, free_port(), str(tmp_path), os.getpid()) for i in (1, 2)]
    else:
        assert redis is not None
        state = {"backend": "redis", "url": redis().url}
    async with fake_pair() as (p, c), aiohttp.ClientSession() as session:
        cfg = _shared_config(state, p, c)
        async with _canary(cfg, workers[0]) as a, _canary(cfg, workers[1]) as b:
            started = time.monotonic()
            assert a.leadership is not None and a.leadership.leading
            assert b.leadership is not None and not b.leadership.leading
            statuses = await _post_all(
                session, f"http://127.0.0.1:{b.proxy_port}/predict", _docs(5, 150, mu=90.0)
            )
            assert set(statuses) == {200}
            await asyncio.sleep(max(0.0, started + 6.5 - time.monotonic()))
            summary = rollout_summary(a.controller.view("m"))
            admin = f"http://127.0.0.1:{a.admin_port}"
            async with session.get(admin + "/api/v1/rollouts/m") as r:
                detail = await r.json()
            metrics = await _metrics(session, admin)
            led = a.leadership.leading
    return summary, detail["inputs"], metrics, led


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_drift_seen_only_by_a_follower_holds_the_leaders_rollout(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    redis = (lambda: request.getfixturevalue("redis_server")) if backend == "redis" else None
    summary, inputs, metrics, led = await _scenario(backend, tmp_path, redis)
    assert led
    assert summary["phase"] == "running" and summary["step"] == 1, summary["status"]
    assert "input drift on fields amount" in summary["status"]
    assert inputs["drifted"] == ["amount"]
    assert inputs["requests"]["inspected"] == 150  # B's, merged into A's report
    mean = next(ch for ch in inputs["fields"][0]["checks"] if ch["check"] == "mean")
    assert mean["drifted"] and mean["samples"] == 150
    assert metrics[("canary_input_drift", "field=amount", "rollout=m")] == 1
    # The counters are each process's own requests (summed over processes they are the
    # total); the drift gauge is the merged view.
    assert metrics[("canary_input_requests_total", "result=inspected", "rollout=m")] == 0


async def test_without_the_merge_the_leader_misses_the_drift(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scenario above with the sync disabled: A sees none of B's requests and advances
    (so the test above fails without the merge)."""

    async def nothing(self: InputSharing, *args: Any, **kwargs: Any) -> None:
        return None

    monkeypatch.setattr(InputSharing, "sync", nothing)
    summary, inputs, metrics, _ = await _scenario("sqlite", tmp_path, None)
    assert summary["step"] == 2 or summary["phase"] == "promoted", summary["status"]
    assert inputs["drifted"] == [] and inputs["requests"]["inspected"] == 0
    assert metrics[("canary_input_drift", "field=amount", "rollout=m")] == 0


def test_types_and_results_are_what_the_snapshots_count() -> None:
    # A guard for the JSON layout: one count per type and per result.
    m = InputMonitor("m", _config(baseline=GIVEN))
    d = m.snapshot().to_dict()
    assert len(d["requests"]) == len(RESULTS)
    assert len(d["fields"][0]["current"][0]) == len(TYPES)


async def test_learned_baselines_merge_and_a_followers_drift_shows_in_the_leaders_report(
    tmp_path: Path,
) -> None:
    """Each worker learns its baseline from its own first 50 requests; the leader's report
    is of both (baseline 100 requests) and flags the drift that only B's clients send."""
    async with fake_pair() as (p, c), aiohttp.ClientSession() as session:
        cfg = _shared_config({"backend": "sqlite", "path": str(tmp_path / "state.db")}, p, c)
        cfg["rollouts"][0]["inputs"]["baseline"] = {"requests": 50}
        a_spec, b_spec = (WorkerSpec(i, 2, free_port(), str(tmp_path), os.getpid()) for i in (1, 2))
        async with _canary(cfg, a_spec) as a, _canary(cfg, b_spec) as b:
            for rt, seed in ((a, 11), (b, 12)):
                url = f"http://127.0.0.1:{rt.proxy_port}/predict"
                assert set(await _post_all(session, url, _docs(seed, 60))) == {200}
            shifted = _docs(13, 150, mu=90.0)
            url = f"http://127.0.0.1:{b.proxy_port}/predict"
            assert set(await _post_all(session, url, shifted)) == {200}
            admin = f"http://127.0.0.1:{a.admin_port}"
            deadline = time.monotonic() + 6.0
            while True:
                async with session.get(admin + "/api/v1/rollouts/m") as r:
                    inputs = (await r.json())["inputs"]
                if inputs["drifted"] or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            local = a.recorder.input_monitor("m")
            assert local is not None
            own = local.local_snapshot()
    assert inputs["state"] == "monitoring"
    assert inputs["baseline"] == {"source": "learned", "requests": 100, "target": 50}
    assert inputs["requests"]["inspected"] == 270
    assert inputs["drifted"] == ["amount"]
    assert own.requests[RESULTS.index("inspected")] == 60  # A's own: B's are merged in
