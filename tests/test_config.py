"""Rollout file loading: every error names its key path, the bad value and the line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from canary.cli import main
from canary.config import Margin, load_config, load_config_text
from canary.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

MINIMAL = """\
rollouts:
  - name: m
    production: {endpoints: [http://127.0.0.1:8001]}
    candidate: {endpoints: [http://127.0.0.1:8002]}
    steps: [{weight: 5}]
"""


def issues_of(text: str) -> list[tuple[str, str, int | None]]:
    with pytest.raises(ConfigError) as info:
        load_config_text(textwrap.dedent(text))
    return [(i.path, i.message, i.line) for i in info.value.issues]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path: Path) -> None:
    config = load_config(path)
    assert config.rollouts


def test_design_example_is_parsed_into_typed_values() -> None:
    config = load_config(ROOT / "configs" / "fraud-model.yaml")
    r = config.rollout("fraud-model")
    assert config.admin.listen == ("127.0.0.1", 9901)
    assert r.routing.timeout == 30.0 and r.routing.sticky is not None
    assert r.routing.sticky.header == "X-User-Id"
    assert r.steps[0].is_shadow and r.steps[0].required_requests == 200
    assert r.steps[1].candidate_weight == 5.0 and r.steps[1].min_duration == 120.0
    assert r.analysis.max_duration == 3600.0
    by_name = {m.name: m for m in r.analysis.metrics}
    assert by_name["latency_p95"].margin == Margin(0.10, relative=True)
    assert by_name["latency_p95"].quantile == 0.95
    assert by_name["errors"].margin == Margin(0.005, relative=False)
    assert not by_name["accuracy"].higher_is_worse
    assert r.analysis.tradeoff is not None and r.analysis.tradeoff["cost"] == Margin(0.05, True)
    assert r.webhooks[0].on == ["rollback", "promote"]  # `on` is a key, not YAML 1.1's True


def test_config_is_frozen() -> None:
    config = load_config_text(MINIMAL)
    with pytest.raises(ValidationError, match="frozen"):
        config.rollouts[0].name = "other"  # type: ignore[misc]


def test_defaults_are_sane() -> None:
    r = load_config_text(MINIMAL).rollouts[0]
    assert r.match.path_prefix == "/"
    assert r.routing.failover is True and r.routing.is_error_status(503)
    assert not r.routing.is_error_status(404)
    assert r.analysis.alpha == 0.05 and r.analysis.on_inconclusive == "rollback"


def test_unknown_key_is_an_error_with_its_line() -> None:
    found = issues_of(MINIMAL + "    analysys: {alpha: 0.1}\n")
    assert found == [
        (
            "rollouts[0].analysys",
            "unknown key (check the spelling; unknown keys are not ignored)",
            6,
        )
    ]


@pytest.mark.parametrize(
    ("snippet", "path", "fragment"),
    [
        ("    routing: {timeout: 30 seconds}", "rollouts[0].routing.timeout", "'30 seconds'"),
        ("    routing: {failover: maybe}", "rollouts[0].routing.failover", "'maybe'"),
        (
            "    analysis: {metrics: [{name: l, signal: latency, max_increase: ten}]}",
            "rollouts[0].analysis.metrics[0].max_increase",
            "'ten'",
        ),
        ("    analysis: {alpha: 1.5}", "rollouts[0].analysis.alpha", "1.5"),
        ("    routing: {sticky: {}}", "rollouts[0].routing.sticky", "exactly one"),
        (
            "    webhooks: [{on: [explode], url: http://127.0.0.1:1/h}]",
            "rollouts[0].webhooks[0].on[0]",
            "'explode'",
        ),
    ],
)
def test_bad_values_name_path_and_value(snippet: str, path: str, fragment: str) -> None:
    found = issues_of(MINIMAL + snippet + "\n")
    assert len(found) == 1, found
    got_path, message, line = found[0]
    assert got_path == path
    assert fragment in message
    assert line == 6


def test_bad_url_and_weight_out_of_range() -> None:
    found = issues_of(
        """\
        rollouts:
          - name: m
            production: {endpoints: ["tcp://10.0.0.1"]}
            candidate: {endpoints: [http://127.0.0.1:8002]}
            steps:
              - weight: 101
              - weight: -1
        """
    )
    assert ("rollouts[0].production.endpoints[0]", 3) in [(p, ln) for p, _, ln in found]
    paths = {p: m for p, m, _ in found}
    assert "101" in paths["rollouts[0].steps[0].weight"]
    assert "-1" in paths["rollouts[0].steps[1].weight"]


def test_duplicate_names_and_overlapping_matches() -> None:
    found = issues_of(
        MINIMAL
        + """\
  - name: m
    production: {endpoints: [http://127.0.0.1:8003]}
    candidate: {endpoints: [http://127.0.0.1:8004]}
    steps: [{weight: 5}]
  - name: api
    match: {path_prefix: /v1}
    production: {endpoints: [http://127.0.0.1:8005]}
    candidate: {endpoints: [http://127.0.0.1:8006]}
    steps: [{weight: 5}]
"""
    )
    messages = {(p, ln): m for p, m, ln in found}
    assert "duplicate rollout name 'm'" in messages[("rollouts[1].name", 6)]
    assert "overlaps rollouts[0]" in messages[("rollouts[1].match", 6)]
    assert "overlaps" in messages[("rollouts[2].match", 11)]


def test_disjoint_matches_are_fine() -> None:
    text = MINIMAL.replace("  - name: m\n", "  - name: m\n    match: {path_prefix: /a}\n") + (
        "  - name: n\n    match: {path_prefix: /ab}\n"
        "    production: {endpoints: [http://127.0.0.1:8003]}\n"
        "    candidate: {endpoints: [http://127.0.0.1:8004]}\n"
        "    steps: [{weight: 5}]\n"
    )
    assert len(load_config_text(text).rollouts) == 2  # /a and /ab are different segments


def test_duplicate_yaml_keys_and_bad_yaml() -> None:
    found = issues_of(MINIMAL + "    routing: {}\n    routing: {}\n")
    assert ("", "duplicate key 'routing'", 7) in found
    bad = issues_of("rollouts: [\n")
    assert bad[0][1].startswith("invalid YAML")


@pytest.mark.parametrize(
    ("steps", "metrics", "expected"),
    [
        ("[{weight: 50}, {weight: 5}]", "[]", "step weights must not decrease"),
        (
            "[{weight: 5}]",
            "[{name: a, signal: latency, max_increase: 5%},"
            " {name: a, signal: ttft, max_increase: 5%}]",
            "duplicate metric name 'a'",
        ),
        (
            "[{weight: 5}]",
            "[{name: a, signal: latency, stat: p95, max_increase: 1pp}]",
            "must be relative",
        ),
        (
            "[{weight: 5}]",
            "[{name: a, signal: 'resource:rss', max_increase: 5%}]",
            "add 'resources: {scrape: /metrics, every: 5s}' to production",
        ),
        ("[{shadow: {}, weight: 5}]", "[]", "exactly one of 'shadow' or 'weight'"),
        (
            "[{weight: 5}]",
            "[{name: a, signal: latency, stat: distribution, max_increase: 1pp}]",
            "a distribution tolerance must be relative",
        ),
        (
            "[{weight: 5}]",
            "[{name: a, signal: error, stat: distribution, max_increase: 5%}]",
            "not 'error'",
        ),
        (
            "[{weight: 5}]",
            "[{name: a, signal: latency, stat: p95, quantiles: [p50], max_increase: 5%}]",
            "'quantiles' applies only to stat: distribution",
        ),
        (
            "[{weight: 5}]",
            "[{name: a, signal: latency, stat: distribution, quantiles: [p90, p50],"
            " max_increase: 5%}]",
            "ascending",
        ),
        (
            "[{weight: 5}]",
            "[{name: a, signal: latency, stat: distribution, quantiles: [p100], max_increase: 5%}]",
            "percentiles such as p50",
        ),
        (
            "[{weight: 5}]",
            "[{name: a, signal: latency, stat: distribution, quantiles: [], max_increase: 5%}]",
            "at least one percentile",
        ),
        (
            "[{weight: 5}]",
            "[{name: a, signal: latency, stat: distribution, max_increase: 5%},"
            " {name: b, signal: cost, max_increase: 5%}], tradeoff: {a: 5%, b: 5%}",
            "a distribution metric",
        ),
    ],
)
def test_cross_field_rules(steps: str, metrics: str, expected: str) -> None:
    text = MINIMAL.replace("[{weight: 5}]", steps) + f"    analysis: {{metrics: {metrics}}}\n"
    found = issues_of(text)
    assert any(expected in m for _, m, _ in found), found


def test_distribution_metric_with_and_without_quantiles() -> None:
    text = MINIMAL + (
        "    analysis:\n      metrics:\n"
        "        - {name: whole, signal: latency, stat: distribution, max_increase: 10%}\n"
        "        - {name: tail, signal: ttft, stat: distribution, quantiles: [p90, p99.9],"
        " max_increase: 20%}\n"
    )
    metrics = load_config_text(text).rollouts[0].analysis.metrics
    assert metrics[0].stat == "distribution" and metrics[0].quantile_levels is None
    assert metrics[0].quantile is None
    assert metrics[1].quantile_levels == pytest.approx((0.9, 0.999))


def test_validate_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(MINIMAL)
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL.replace("weight: 5", "weight: 500") + "    foo: 1\n")
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "2 error(s)" in out
    assert "rollouts[0].steps[0].weight" in out and "(line 5)" in out
    assert "rollouts[0].foo: unknown key" in out
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 1


def test_validate_console_script_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "canary", "validate", *map(str, CONFIGS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_validate_checks_resource_selectors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arms = "production: {endpoints: [http://127.0.0.1:8001]}"
    text = (
        MINIMAL.replace(arms, arms.replace("]}", "], resources: {every: 1s}}"))
        .replace("candidate: {endpoints: [http://127.0.0.1:8002]}",
                 "candidate: {endpoints: [http://127.0.0.1:8002], resources: {every: 1s}}")
        + "    analysis: {metrics: [{name: mem, signal: 'resource:rss{job=\"x\"', "
        "max_increase: 20%}]}\n"
    )  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "rollouts[0].analysis.metrics[0].signal: label selector" in out, out
    path.write_text(text.replace('"x"', '"x"}'))
    assert main(["validate", str(path)]) == 0
