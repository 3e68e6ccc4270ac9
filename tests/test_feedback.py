"""Feedback parsing, the bounded prediction store and the join (no servers, a fake clock)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from canary.config import FeedbackConfig, RolloutConfig, load_config_text
from canary.errors import ClientError
from canary.observe import Recorder
from canary.observe.feedback import (
    MAX_ITEMS,
    TOMBSTONES,
    FeedbackBodyError,
    FeedbackItem,
    FeedbackStore,
    join_feedback,
    parse_feedback,
    parse_item,
    same_json,
    store_for,
)
from tests.conftest import rollout_config


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _rollout(**overrides: Any) -> RolloutConfig:
    cfg = rollout_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"], **overrides)
    return load_config_text(yaml.safe_dump(cfg)).rollouts[0]


def _store(
    ttl: float = 60.0, max_entries: int = 100, count_at: str = "arrival"
) -> tuple[FeedbackStore, Clock]:
    clock = Clock()
    cfg = FeedbackConfig.model_validate(
        {"ttl": ttl, "max_entries": max_entries, "count_at": count_at}
    )
    return FeedbackStore("m", cfg, clock=clock), clock


def label(rid: str, value: object) -> FeedbackItem:
    return FeedbackItem(rid, "label", value)


# -- parsing --------------------------------------------------------------------------------


def test_parse_item_accepts_the_three_kinds() -> None:
    assert parse_item({"request_id": "a", "label": {"x": [1]}}) == FeedbackItem(
        "a", "label", {"x": [1]}
    )
    assert parse_item({"request_id": "a", "correct": False}).value is False
    reward = parse_item({"request_id": "a", "reward": 1})
    assert reward.value == 1.0 and isinstance(reward.value, float)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ([1, 2], "must be a JSON object, got [1, 2]"),
        ({"label": 1}, "'request_id' must be a non-empty string, got null"),
        ({"request_id": 7, "label": 1}, "'request_id' must be a non-empty string, got 7"),
        ({"request_id": "", "label": 1}, "non-empty string"),
        ({"request_id": "x" * 129, "label": 1}, "129 characters"),
        ({"request_id": "a"}, "exactly one of 'label', 'correct', 'reward' is needed, got none"),
        ({"request_id": "a", "label": 1, "correct": True}, "got 'label' and 'correct'"),
        ({"request_id": "a", "lable": 1}, "unknown key(s) 'lable'"),
        ({"request_id": "a", "label": None}, "'label' must not be null"),
        ({"request_id": "a", "correct": 1}, "'correct' must be true or false, got 1"),
        ({"request_id": "a", "reward": True}, "'reward' must be a number in [0, 1]"),
        ({"request_id": "a", "reward": "0.5"}, 'got "0.5"'),
        ({"request_id": "a", "reward": 1.5}, "got 1.5"),
        ({"request_id": "a", "reward": -0.1}, "got -0.1"),
        ({"request_id": "a", "reward": 10**400}, "'reward' must be a number in [0, 1]"),
    ],
)
def test_parse_item_errors_name_the_key_and_value(item: Any, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_item(item)
    assert message in str(exc.value)


def test_parse_feedback_object_array_and_partial_errors() -> None:
    one = parse_feedback(b'{"request_id": "a", "correct": true}')
    assert one.items == [(0, FeedbackItem("a", "correct", True))] and one.errors == []
    body = json.dumps(
        [{"request_id": "a", "label": 1}, {"request_id": "b"}, 3, {"request_id": "c", "reward": 0}]
    ).encode()
    many = parse_feedback(body)
    assert [i for i, _ in many.items] == [0, 3]
    assert [e["index"] for e in many.errors] == [1, 2]
    assert "exactly one of" in many.errors[0]["error"]
    assert parse_feedback(b"[]").items == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty body"),
        (b"  \n", "empty body"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"request_id": "a", "reward": NaN}', "NaN is not valid JSON"),
        (b'"hello"', 'must be a JSON object or an array of objects, got "hello"'),
        (b"42", "got 42"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_parse_feedback_refuses_unreadable_bodies(body: bytes, message: str) -> None:
    with pytest.raises(FeedbackBodyError) as exc:
        parse_feedback(body)
    assert message in str(exc.value)
    assert exc.value.status == 400


def test_parse_feedback_bounds_the_batch() -> None:
    parse_feedback(b"[" + b",".join([b"{}"] * MAX_ITEMS) + b"]")  # at the bound: fine
    with pytest.raises(FeedbackBodyError) as exc:
        parse_feedback(b"[" + b",".join([b"{}"] * (MAX_ITEMS + 1)) + b"]")
    assert exc.value.status == 413 and f"at most {MAX_ITEMS}" in str(exc.value)


def test_an_unreadable_feedback_body_is_a_client_error() -> None:
    # The client-error branch of the one exception tree: answered with its status, never
    # counted against an arm.
    with pytest.raises(ClientError) as exc:
        parse_feedback(b"{not json")
    assert isinstance(exc.value, FeedbackBodyError) and exc.value.status == 400


def test_same_json_is_json_equality() -> None:
    assert same_json(1, 1.0) and same_json("cat", "cat") and same_json([1, {"a": 2}], [1, {"a": 2}])
    assert not same_json(True, 1) and not same_json(1, True) and not same_json(0, False)
    assert same_json(True, True) and not same_json(True, False)
    assert not same_json("1", 1) and not same_json([1, 2], [1]) and not same_json([True], [1])
    assert not same_json({"a": 1}, {"b": 1}) and not same_json({"a": 1}, [1])
    assert not same_json(None, 0)


# -- the store ------------------------------------------------------------------------------


def test_label_scores_the_served_answer_and_the_shadow_mirror() -> None:
    store, _ = _store()
    store.add("r1", "production", 1.0, 1, shadow=False)
    store.add("r1", "candidate", 1.0, 0, shadow=True)
    assert len(store) == 1  # one entry per id, holding both answers
    result, values = store.join(label("r1", 1))
    assert result == "accepted"
    assert values == [("production", 1.0, 1.0, -1), ("candidate", 0.0, 1.0, -1)]
    # the mirror may finish before the answer the user got
    store.add("r2", "candidate", 1.0, "b", shadow=True)
    store.add("r2", "production", 1.0, "a", shadow=False)
    assert store.join(label("r2", "b"))[1] == [
        ("production", 0.0, 1.0, -1),
        ("candidate", 1.0, 1.0, -1),
    ]


def test_correct_and_reward_score_only_what_the_user_saw() -> None:
    store, _ = _store()
    store.add("r1", "production", 1.0, 1, shadow=False)
    store.add("r1", "candidate", 1.0, 0, shadow=True)
    assert store.join(FeedbackItem("r1", "correct", False)) == (
        "accepted",
        [("production", 0.0, 1.0, -1)],
    )
    store.add("r2", "candidate", 0.1, None, shadow=False)
    assert store.join(FeedbackItem("r2", "reward", 0.25)) == (
        "accepted",
        [("candidate", 0.25, 0.1, -1)],
    )
    # only a shadow answer is stored (the user's answer failed): nothing to credit
    store.add("r3", "candidate", 1.0, 1, shadow=True)
    assert store.join(FeedbackItem("r3", "correct", True)) == ("unknown", [])
    assert store.join(label("r3", 1)) == ("accepted", [("candidate", 1.0, 1.0, -1)])


def test_duplicate_unknown_and_no_prediction() -> None:
    store, _ = _store()
    store.add("r1", "candidate", 0.5, 3, shadow=False)
    assert store.join(label("r1", 3))[0] == "accepted"
    assert store.join(label("r1", 3)) == ("duplicate", [])
    assert store.join(FeedbackItem("r1", "correct", True)) == ("duplicate", [])
    assert store.join(label("nope", 3)) == ("unknown", [])
    store.add("r2", "production", 0.5, None, shadow=False)
    assert store.join(label("r2", 3)) == ("no_prediction", [])
    # nothing was recorded, so other feedback for the id still counts
    assert store.join(FeedbackItem("r2", "correct", True))[0] == "accepted"


def test_a_mirror_finishing_after_the_join_is_not_scored() -> None:
    store, _ = _store()
    store.add("r1", "production", 1.0, 1, shadow=False)
    assert store.join(label("r1", 1))[0] == "accepted"
    store.add("r1", "candidate", 1.0, 1, shadow=True)
    assert store.join(label("r1", 1)) == ("duplicate", [])


def test_a_reused_id_replaces_the_entry() -> None:
    store, _ = _store()
    store.add("r1", "production", 0.9, "old", shadow=False)
    store.add("r1", "candidate", 0.1, "new", shadow=False)
    assert len(store) == 1
    assert store.join(label("r1", "new")) == ("accepted", [("candidate", 1.0, 0.1, -1)])
    store.add("r1", "production", 0.9, "again", shadow=False)  # after a join: a new request
    assert store.join(label("r1", "again"))[0] == "accepted"


def test_entries_expire_after_ttl_and_read_expired() -> None:
    store, clock = _store(ttl=10.0)
    store.add("old", "production", 1.0, 1, shadow=False)
    store.add("joined", "production", 1.0, 1, shadow=False)
    assert store.join(label("joined", 1))[0] == "accepted"
    clock.now += 5.0
    store.add("young", "production", 1.0, 1, shadow=False)
    clock.now += 5.0  # old and joined are exactly ttl old now
    assert store.join(label("old", 1)) == ("expired", [])
    assert store.join(label("joined", 1)) == ("duplicate", [])  # the marker outlives the entry
    assert len(store) == 1 and store.expired == 2
    assert store.join(label("young", 1))[0] == "accepted"


def test_expiry_is_lazy_from_the_front_on_add() -> None:
    store, clock = _store(ttl=1.0, max_entries=10_000)
    for i in range(5000):
        store.add(f"r{i}", "production", 1.0, 1, shadow=False)
        clock.now += 0.001  # 1000 per second: about 1000 alive at any time
    assert 999 <= len(store) <= 1001
    assert store.expired == 5000 - len(store) and store.evicted == 0


def test_full_store_evicts_the_oldest_first() -> None:
    store, _ = _store(max_entries=3)
    for i in range(5):
        store.add(f"r{i}", "production", 1.0, i, shadow=False)
    assert len(store) == 3 and store.evicted == 2
    assert store.join(label("r0", 0)) == ("expired", [])
    assert store.join(label("r1", 1)) == ("expired", [])
    assert store.join(label("r2", 2))[0] == "accepted"
    assert store.join(label("r4", 4))[0] == "accepted"


def test_tombstones_are_bounded() -> None:
    store, _ = _store(max_entries=1)
    assert store._max_tombstones == 1  # never more than max_entries
    big, _ = _store(max_entries=TOMBSTONES * 3)
    big.configure(FeedbackConfig(ttl=60.0, max_entries=1))
    n = TOMBSTONES + 10
    for i in range(n):
        big.add(f"r{i}", "production", 1.0, 1, shadow=False)
    assert len(big) == 1 and len(big._tombstones) == 1
    assert big.join(label(f"r{n - 2}", 1)) == ("expired", [])
    assert big.join(label(f"r{n - 3}", 1)) == ("unknown", [])  # forgotten: honest "unknown"


def test_configure_shrinks_the_store_now() -> None:
    store, _ = _store(max_entries=10)
    for i in range(10):
        store.add(f"r{i}", "production", 1.0, 1, shadow=False)
    store.configure(FeedbackConfig(ttl=60.0, max_entries=4))
    assert len(store) == 4 and store.evicted == 6
    assert store.join(label("r5", 1))[0] == "expired"
    assert store.join(label("r6", 1))[0] == "accepted"


def test_store_for_only_when_the_rollout_can_use_feedback() -> None:
    assert store_for(_rollout()) is None
    latency = {"name": "lat", "signal": "latency", "stat": "p95", "max_increase": "10%"}
    assert store_for(_rollout(analysis={"metrics": [latency]})) is None
    accuracy = {"name": "acc", "signal": "feedback", "stat": "rate", "max_decrease": "1pp"}
    with_metric = store_for(
        _rollout(analysis={"metrics": [accuracy]}, feedback={"ttl": "5m", "max_entries": 7})
    )
    assert with_metric is not None
    assert with_metric.ttl == 300.0 and with_metric.max_entries == 7
    with_prediction = store_for(_rollout(prediction="json:prediction"))
    assert with_prediction is not None and with_prediction.max_entries == 100_000
    assert with_prediction.ttl == 3600.0


def test_a_reload_keeps_the_store_unless_the_arms_change() -> None:
    first = store_for(_rollout(prediction="json:prediction"))
    assert first is not None
    first.add("r1", "production", 1.0, 1, shadow=False)
    same = store_for(
        _rollout(prediction="json:prediction", feedback={"ttl": "2m", "max_entries": 5}), first
    )
    assert same is first and len(same) == 1 and same.ttl == 120.0 and same.max_entries == 5
    cfg = rollout_config(["http://127.0.0.1:1"], ["http://127.0.0.1:3"], prediction="json:p")
    moved = store_for(load_config_text(yaml.safe_dump(cfg)).rollouts[0], first)
    assert moved is not None and moved is not first and len(moved) == 0


# -- equal maturity ---------------------------------------------------------------------------


def test_at_maturity_a_label_counts_when_its_answer_is_ttl_old() -> None:
    store, clock = _store(ttl=10.0, count_at="maturity")
    store.add("early", "production", 0.9, "x", shadow=False, cluster=3)
    clock.now += 4.0
    store.add("late", "candidate", 0.1, "x", shadow=False)
    assert store.join(label("early", "x")) == ("accepted", [])  # waits in its entry
    assert store.join(label("late", "y")) == ("accepted", [])
    assert store.take_ripe() == []
    clock.now += 6.0  # "early" is 10 s old: its label counts, "late" (6 s) still waits
    assert store.take_ripe() == [("production", 1.0, 0.9, 3)]
    assert store.take_ripe() == []  # taken once
    assert store.join(label("early", "x")) == ("duplicate", [])
    clock.now += 4.0
    assert store.take_ripe() == [("candidate", 0.0, 0.1, -1)]
    assert len(store) == 0


def test_at_maturity_labels_after_the_window_and_unlabelled_answers_never_count() -> None:
    store, clock = _store(ttl=10.0, count_at="maturity")
    store.add("slow", "production", 1.0, "x", shadow=False)
    store.add("never", "production", 1.0, "x", shadow=False)
    clock.now += 10.0
    assert store.join(label("slow", "x")) == ("expired", [])
    assert store.take_ripe() == []


def test_at_maturity_eviction_and_a_reused_id_count_the_waiting_label_then() -> None:
    store, _ = _store(max_entries=2, count_at="maturity")
    store.add("a", "production", 1.0, "x", shadow=False)
    store.add("b", "candidate", 1.0, "x", shadow=True)
    store.add("b", "production", 1.0, "y", shadow=False)
    assert store.join(label("a", "x"))[0] == "accepted"
    assert store.join(label("b", "x")) == ("accepted", [])
    store.add("c", "production", 1.0, "x", shadow=False)  # full: "a" goes, and counts now
    assert store.take_ripe() == [("production", 1.0, 1.0, -1)]
    store.add("b", "candidate", 1.0, "z", shadow=False)  # "b" reused after its label
    assert sorted(store.take_ripe()) == [("candidate", 1.0, 1.0, -1), ("production", 0.0, 1.0, -1)]


def test_join_feedback_records_what_matured_in_every_store() -> None:
    a, clock = _store(ttl=5.0, count_at="maturity")
    a.add("r1", "candidate", 0.25, "x", shadow=False, cluster=7)
    recorder = Recorder()
    body = json.dumps([{"request_id": "r1", "label": "x"}]).encode()
    assert join_feedback(parse_feedback(body), [a], recorder).totals()["accepted"] == 1
    assert recorder.live("m").candidate.signals.get("feedback") is None
    clock.now += 5.0
    join_feedback(parse_feedback(b"[]"), [a], recorder)  # any later body
    acc = recorder.live("m").candidate.signals["feedback"]
    assert (acc.n, acc.total) == (1, 1.0)


def test_count_at_is_checked() -> None:
    with pytest.raises(ValidationError):
        FeedbackConfig.model_validate({"count_at": "later"})
    assert FeedbackConfig().count_at == "maturity"


# -- the join -------------------------------------------------------------------------------


def test_join_records_values_and_counts_per_rollout() -> None:
    a, _ = _store()
    b = FeedbackStore(
        "other", FeedbackConfig(ttl=60.0, max_entries=10, count_at="arrival"), clock=Clock()
    )
    a.add("r1", "candidate", 0.25, "x", shadow=False)
    a.add("r2", "production", 0.75, "x", shadow=False)
    b.add("r3", "production", 1.0, "y", shadow=False)
    b.add("r3", "candidate", 1.0, "z", shadow=True)
    body = json.dumps(
        [
            {"request_id": "r1", "label": "x"},
            {"request_id": "r2", "label": "no"},
            {"request_id": "r3", "label": "z"},
            {"request_id": "r1", "label": "x"},
            {"request_id": "zzz", "correct": True},
            {"request_id": "r2"},
        ]
    ).encode()
    recorder = Recorder()
    report = join_feedback(parse_feedback(body), [a, b], recorder)
    assert report.items == 6
    assert report.counts == {
        ("", "invalid"): 1,
        ("m", "accepted"): 2,
        ("other", "accepted"): 1,
        ("m", "duplicate"): 1,
        ("", "unknown"): 1,
    }
    assert report.to_json()["results"] == {
        "accepted": 3,
        "unknown": 1,
        "expired": 0,
        "duplicate": 1,
        "invalid": 1,
        "no_prediction": 0,
    }
    assert report.errors == [{"index": 5, "error": report.errors[0]["error"]}]
    m = recorder.live("m")
    cand, prod = m.candidate.signals["feedback"], m.production.signals["feedback"]
    assert {p: (s.n, s.total) for p, s in cand.strata.items()} == {0.25: (1, 1.0)}
    assert {p: (s.n, s.total) for p, s in prod.strata.items()} == {0.75: (1, 0.0)}
    other = recorder.live("other")
    assert other.production.signals["feedback"].total == 0.0
    assert other.candidate.signals["feedback"].total == 1.0
