"""The admin API's rollout JSON (canary/admin/views.py) from the controller's read model: the
keys in their order, JSON-safe numbers, and what shows before the first analysis."""

from __future__ import annotations

import json
import math

import pytest

from canary.admin.views import result_dict, rollout_detail, rollout_summary
from canary.controller import Controller, RolloutView
from canary.errors import UnknownRollout
from canary.metrics import Metrics
from canary.observe import Recorder
from canary.store import MemoryStore
from tests.test_controller import Clock, Sink, _config, _feed

SUMMARY_KEYS = [
    "name", "phase", "step", "steps", "step_index", "step_kind", "weights", "shadow", "samples",
    "step_samples", "step_required", "step_elapsed", "step_min_duration", "elapsed",
    "deadline_in", "status", "store_ok", "last_decision", "gate",
]  # fmt: skip
DETAIL_KEYS = [*SUMMARY_KEYS, "metrics", "guards", "net_value", "decisions", "endpoints"]


async def _controller() -> tuple[Controller, Recorder, Clock]:
    store, rec, clock = MemoryStore(), Recorder(), Clock()
    await store.open()
    ctl = Controller(_config(), store, rec, Metrics(), Sink(), clock=clock, monotonic=clock)
    await ctl.load()
    return ctl, rec, clock


async def test_before_the_first_analysis() -> None:
    ctl, rec, clock = await _controller()
    _feed(rec, 300, 10, seed=1)
    await ctl.flush()
    clock.t += 4.0
    view = ctl.view("m")
    assert isinstance(view, RolloutView) and view.analysis is None and view.progress is None
    assert [v.config.name for v in ctl.views()] == ["m"]
    summary = rollout_summary(view)
    assert list(summary) == SUMMARY_KEYS
    assert summary["step_samples"] == view.candidate_samples > 0  # from the totals
    assert summary["elapsed"] == summary["step_elapsed"] == 4.0
    assert summary["last_decision"]["action"] == "START"
    detail = rollout_detail(view)
    assert list(detail) == DETAIL_KEYS
    assert detail["metrics"] == [] and detail["guards"] == [] and detail["net_value"] is None
    assert detail["endpoints"] == {
        "production": ["http://127.0.0.1:1"],
        "candidate": ["http://127.0.0.1:2"],
    }
    with pytest.raises(UnknownRollout):
        ctl.view("nope")


async def test_after_an_analysis_results_are_json_safe() -> None:
    ctl, rec, _ = await _controller()
    _feed(rec, 30, 10, seed=2)  # too few for an estimate of every result
    await ctl.flush()
    await ctl.evaluate(force=True)
    view = ctl.view("m")
    assert view.analysis is not None and view.progress is not None
    detail = rollout_detail(view)
    assert detail["step_samples"] == view.progress.samples
    json.dumps(detail, allow_nan=False)  # never NaN in the API
    for r in view.analysis.all_results():
        shown = result_dict(r)
        assert shown["verdict"] == r.verdict.value.upper()
        assert shown["estimate"] == (r.estimate if math.isfinite(r.estimate) else None)
    assert [g["name"] for g in detail["guards"]] == [view.analysis.srm.name]
    assert detail["decisions"] == list(view.decisions)
