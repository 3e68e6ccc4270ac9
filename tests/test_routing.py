"""Arm choice and header rewriting: pure functions, no servers."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from canary.config import MatchConfig, load_config_text
from canary.observe import Weights
from canary.proxy.headers import downstream_headers, request_id, upstream_headers
from canary.proxy.routing import (
    ArmChooser,
    RouteTable,
    cookie_value,
    sticky_hash,
    sticky_point,
)

ROLLOUT = """
rollouts:
  - name: r
    production: {endpoints: [http://127.0.0.1:1]}
    candidate: {endpoints: [http://127.0.0.1:2]}
    routing: {sticky: {header: X-User-Id}, override_header: X-Canary-Arm}
    steps: [{weight: 10}]
"""


def chooser(seed: int = 0) -> ArmChooser:
    return ArmChooser(load_config_text(ROLLOUT).rollouts[0], random.Random(seed).random)


@given(st.text(min_size=1, max_size=40), st.floats(0, 100), st.floats(0, 100))
def test_raising_the_weight_never_moves_a_user_back(user: str, w1: float, w2: float) -> None:
    low, high = sorted((w1, w2))
    c = chooser()
    before = c.choose({"X-User-Id": user}, Weights(low)).arm
    after = c.choose({"X-User-Id": user}, Weights(high)).arm
    assert not (before == "candidate" and after == "production")


def test_sticky_points_are_uniform_and_stable() -> None:
    points = [sticky_point("r", f"user-{i}") for i in range(20_000)]
    below_10 = sum(p < 10 for p in points) / len(points)
    assert abs(below_10 - 0.10) < 4.5 * (0.1 * 0.9 / 20_000) ** 0.5
    assert sticky_point("r", "alice") == sticky_point("r", "alice")
    assert sticky_point("r", "alice") != sticky_point("other-rollout", "alice")


def test_sticky_points_did_not_move_and_clusters_are_independent_of_the_arm() -> None:
    # The same point as before clusters existed: a rollout in progress keeps its users.
    assert sticky_point("r", "alice") == 12.83342936216218
    c = chooser()
    by_arm: dict[str, list[int]] = {"candidate": [0] * 64, "production": [0] * 64}
    for i in range(32_000):
        choice = c.choose({"X-User-Id": f"user-{i}"}, Weights(25))
        assert 0 <= choice.cluster < 64
        assert choice.cluster == sticky_hash("r", f"user-{i}")[1]
        by_arm[choice.arm][choice.cluster] += 1
    # Every cluster holds users of both arms in about the split's proportion.
    for g in range(64):
        share = by_arm["candidate"][g] / (by_arm["candidate"][g] + by_arm["production"][g])
        assert 0.25 - 0.1 < share < 0.25 + 0.1
    assert c.choose({}, Weights(25)).cluster == -1  # no sticky key: randomised per request
    assert (
        c.choose({"X-User-Id": "bob"}, Weights(0, shadow=True)).cluster
        == sticky_hash("r", "bob")[1]
    )


def test_choice_carries_propensity_and_flags() -> None:
    c = chooser()
    w = Weights(10)
    choices = [c.choose({}, w) for _ in range(1000)]
    assert {round(ch.propensity, 9) for ch in choices if ch.arm == "candidate"} == {0.1}
    assert {round(ch.propensity, 9) for ch in choices if ch.arm == "production"} == {0.9}
    forced = c.choose({"X-Canary-Arm": " Candidate "}, w)
    assert forced.arm == "candidate" and forced.forced and forced.propensity == 1.0
    shadow = c.choose({}, Weights(0, shadow=True))
    assert shadow.arm == "production" and shadow.mirror
    assert c.choose({}, Weights(0)).arm == "production"
    assert c.choose({}, Weights(100)).arm == "candidate"


def test_weights_are_validated() -> None:
    with pytest.raises(ValueError, match=r"0\.\.100"):
        Weights(101)
    with pytest.raises(ValueError, match="shadow"):
        Weights(5, shadow=True)
    assert Weights(25).fraction("production") == 0.75


def test_cookie_value() -> None:
    assert cookie_value("a=1; uid=bob", "uid") == "bob"
    assert cookie_value("a=1", "uid") is None
    assert cookie_value('uid="unterminated', "uid") is None
    assert cookie_value(None, "uid") is None


def test_route_table_prefers_host_then_longest_prefix() -> None:
    table = RouteTable(
        [
            (MatchConfig(path_prefix="/"), "all"),
            (MatchConfig(path_prefix="/v1/models"), "models"),
            (MatchConfig(path_prefix="/", host="api.example.com"), "api"),
        ]
    )
    assert table.lookup("x", "/v1/models/a") == "models"
    assert table.lookup("x", "/v1/modelsX") == "all"
    assert table.lookup("API.example.com:8080", "/v1/models/a") == "api"
    assert table.lookup("[::1]:8080", "/") == "all"
    assert RouteTable([(MatchConfig(path_prefix="/a"), "a")]).lookup(None, "/b") is None


def test_upstream_headers_strip_hop_by_hop_and_set_forwarding() -> None:
    out = upstream_headers(
        [
            ("Host", "front"),
            ("Connection", "close, X-Hop"),
            ("X-Hop", "1"),
            ("TE", "trailers"),
            ("Transfer-Encoding", "chunked"),
            ("X-Forwarded-For", "1.1.1.1"),
            ("Content-Length", "5"),
            ("Accept", "a"),
            ("Accept", "b"),
        ],
        upstream_host="10.0.0.1:80",
        client_ip="2.2.2.2",
        scheme="https",
        rid="r1",
    )
    assert out[0] == ("Host", "10.0.0.1:80")
    names = [k.lower() for k, _ in out]
    for hop in ("connection", "x-hop", "te", "transfer-encoding", "content-length"):
        assert hop not in names
    assert ("Accept", "a") in out and ("Accept", "b") in out  # repeated headers kept
    d = dict(out)
    assert d["X-Forwarded-For"] == "1.1.1.1, 2.2.2.2"
    assert d["X-Forwarded-Proto"] == "https" and d["X-Forwarded-Host"] == "front"
    assert d["X-Request-Id"] == "r1"


def test_downstream_headers() -> None:
    out, length = downstream_headers(
        [
            ("Content-Length", "12"),
            ("Connection", "keep-alive"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("X-Canary-Arm", "spoofed"),
        ],
        rid="r",
        arm="candidate",
    )
    assert length == 12
    assert out == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Request-Id", "r"),
                   ("X-Canary-Arm", "candidate")]  # fmt: skip


def test_request_id() -> None:
    assert request_id("abc-123") == "abc-123"
    assert len(request_id(None)) == 32
    assert request_id("x" * 200) != "x" * 200
    assert request_id("a b") != "a b"
