"""`canary simulate`: effects grammar, bad input, bulk recording equal to the proxy's, small
simulated rollouts that decide right, Prometheus and sample-file inputs, the CLI end to end."""

from __future__ import annotations

import asyncio
import io
import json
import math
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from canary.config import load_config, load_config_text
from canary.controller import FLUSH_INTERVAL
from canary.decision import analyze, metric_alpha
from canary.observe import Observation, RolloutAccumulator
from canary.simulate import (
    LOOP_SECONDS,
    Batch,
    Effect,
    Progress,
    Scenario,
    SimulateError,
    Simulator,
    Traffic,
    arm_costs,
    default_scenarios,
    histogram_samples,
    load_latency_samples,
    make_plan,
    parse_effect_value,
    parse_effects,
    parse_histogram,
    read_prometheus,
    record_batch,
    resolve_effects,
    simulate,
)
from loadtest.fake_model import FakeModelConfig, running_fake_model

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = ROOT / "configs" / "minimal.yaml"


def _rollout(**analysis: object) -> dict[str, object]:
    return {
        "name": "m",
        "production": {"endpoints": ["http://127.0.0.1:1"]},
        "candidate": {"endpoints": ["http://127.0.0.1:2"]},
        "steps": [{"weight": 10, "min_requests": 200}, {"weight": 50}],
        "analysis": {
            "interval": "1s",
            "max_duration": "10m",
            "metrics": [
                {"name": "latency_p95", "signal": "latency", "stat": "p95", "max_increase": "10%"},
                {"name": "errors", "signal": "error", "stat": "rate", "max_increase": "0.5pp"},
            ],
            **analysis,
        },
    }


def _config(**rollout: object) -> object:
    doc = {"rollouts": [{**_rollout(), **rollout}]}
    return load_config_text(yaml.safe_dump(doc)).rollouts[0]


# -- effects --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value", "relative"),
    [("+10%", 0.10, True), ("-20%", -0.20, True), ("+1pp", 0.01, False), ("-2pp", -0.02, False),
     ("x1.3", 0.3, True), ("*2", 1.0, True), (" 25 % ", 0.25, True)],
)  # fmt: skip
def test_effect_values(text: str, value: float, relative: bool) -> None:
    e = parse_effect_value(text)
    assert e.relative is relative and e.value == pytest.approx(value)


@pytest.mark.parametrize("text", ["10", "+10", "ten%", "+1 pp x", "x0", "-100%", "x-1", ""])
def test_bad_effect_values_say_what_is_expected(text: str) -> None:
    with pytest.raises(SimulateError, match=r"effect .*(expected|must|positive)"):
        parse_effect_value(text)


def test_effects_list_and_resolution() -> None:
    r = _config()
    effects = resolve_effects(r, parse_effects("latency_p95=+25%, errors=+1pp"))
    assert effects == {"latency": Effect(0.25, True), "error": Effect(0.01, False)}
    assert resolve_effects(r, parse_effects("latency=x2")) == {"latency": Effect(1.0, True)}
    with pytest.raises(SimulateError, match="expected KEY=CHANGE"):
        parse_effects("latency+10%")
    with pytest.raises(SimulateError, match="empty"):
        parse_effects(" , ")
    with pytest.raises(SimulateError, match="no metric of rollout 'm' measures 'ttft'"):
        resolve_effects(r, parse_effects("ttft=+10%"))
    with pytest.raises(SimulateError, match="neither a metric of rollout 'm'"):
        resolve_effects(r, parse_effects("header:=+10%"))


def test_default_scenarios_follow_the_metrics() -> None:
    r = _config(
        prediction="json:prediction",
        analysis={
            **_rollout()["analysis"],  # type: ignore[dict-item]
            "metrics": [
                {"name": "ttft_p50", "signal": "ttft", "stat": "p50", "max_increase": "15%"},
                {"name": "errors", "signal": "error", "stat": "rate", "max_increase": "0.5pp"},
                {"name": "accuracy", "signal": "feedback", "stat": "rate", "max_decrease": "1pp"},
                {"name": "cost", "signal": "cost", "stat": "mean", "max_increase": "5%"},
            ],
        },
    )
    names = [s.name for s in default_scenarios(r)]
    assert names == [
        "identical", "ttft +10%", "ttft +25%", "errors +1pp", "accuracy -2pp", "cost +10%",
    ]  # fmt: skip


# -- recording ------------------------------------------------------------------------------------


def test_bulk_recording_equals_the_proxys(tmp_path: Path) -> None:
    """record_batch gives the accumulators (and so the analysis) that one Observation per
    request through RolloutAccumulator.record gives, clusters included."""
    rng = np.random.default_rng(3)
    bulk, one = RolloutAccumulator(), RolloutAccumulator()
    for arm, p, n in (("production", 0.9, 900), ("candidate", 0.1, 300)):
        lat = 0.02 * np.exp(0.4 * rng.standard_normal(n))
        err = rng.random(n) < 0.05
        cost = np.full(n, 0.001)
        clusters = rng.integers(0, 64, n)
        record_batch(
            bulk.arms[arm],
            Batch(p, lat, err, {"cost": cost}, clusters, np.zeros(n, dtype=np.int64)),
        )
        for i in range(n):
            one.record(Observation(
                "m", arm, p, False, "", 500 if err[i] else 200, "status" if err[i] else None,
                float(lat[i]), signals={"cost": 0.001}, cluster=int(clusters[i]),
            ))  # fmt: skip
    for arm in ("production", "candidate"):
        a, b = bulk.arms[arm], one.arms[arm]
        assert (a.observed, a.routed, a.errors, a.routing, a.status_classes, a.error_kinds) == (
            b.observed, b.routed, b.errors, b.routing, b.status_classes, b.error_kinds,
        )  # fmt: skip
        for key in ("latency", "error", "cost"):
            x, y = a.signals[key], b.signals[key]
            for p in y.strata:
                assert x.strata[p].n == y.strata[p].n
                assert x.strata[p].total == pytest.approx(y.strata[p].total)
                assert x.strata[p].total_sq == pytest.approx(y.strata[p].total_sq)
                assert x.hists[p].to_dict() == y.hists[p].to_dict()
                assert x.clusters[p].n == y.clusters[p].n
                assert x.clusters[p].hist == y.clusters[p].hist
            assert (x.min, x.max) == (y.min, y.max)
    r = _config(routing={"sticky": {"header": "X-User"}})
    for ra, rb in zip(analyze(r, bulk).all_results(), analyze(r, one).all_results(), strict=True):
        assert ra.verdict == rb.verdict
        assert ra.lower == pytest.approx(rb.lower) and ra.upper == pytest.approx(rb.upper)


def test_the_loop_period_is_the_controllers() -> None:
    assert LOOP_SECONDS == FLUSH_INTERVAL


# -- small simulated rollouts ----------------------------------------------------------------------


def test_identical_promotes_and_a_big_regression_rolls_back() -> None:
    r = _config()
    traffic = Traffic(rate=200.0, latency_median=0.02, latency_sigma=0.3, error_rate=0.0)
    scenarios = [
        Scenario("identical", {}, "promote"),
        Scenario("latency x2", {"latency": Effect(1.0, True)}, "rollback"),
        Scenario("errors +20pp", {"error": Effect(0.20, False)}, "rollback"),
    ]
    report = simulate(r, traffic, scenarios, repeats=6, detect=False, seed=1)
    same, slow, errs = report.summaries
    assert same.share("promote") == 1.0
    assert slow.share("rollback") == 1.0 and set(slow.by()) == {"latency_p95"}
    assert errs.share("rollback") == 1.0 and set(errs.by()) == {"errors"}
    # Promotion needs step 1's 200 candidate requests at 10% (about 10 s at 200 req/s) first.
    assert same.quantiles("seconds")[0] >= 10.0 and same.quantiles("seconds")[2] < 600
    assert same.quantiles("candidate")[0] >= 200
    # latency x2 is caught right after the burn-in (100 candidate requests, ~5 s at 10%).
    assert 3.0 <= slow.quantiles("seconds")[1] <= 15.0
    assert 100 <= slow.quantiles("candidate")[1] <= 300
    assert "incomplete" not in report.to_dict() or not report.incomplete


def test_adaptive_evaluation_agrees_with_every_interval() -> None:
    """Bisection over skipped intervals finds the decision evaluating every interval finds."""
    r = _config()
    traffic = Traffic(rate=200.0, latency_median=0.02, latency_sigma=0.3, error_rate=0.0)
    plan = make_plan(r, traffic)
    eff = {"latency": Effect(0.3, True)}
    fast = [Simulator(plan, traffic, eff).run(np.random.default_rng(s)) for s in range(8)]
    exact = [Simulator(plan, traffic, eff).run(np.random.default_rng(s), exact=True)
             for s in range(8)]  # fmt: skip
    assert [x.result for x in fast] == [x.result for x in exact] == ["rollback"] * 8
    med = float(np.median([x.seconds for x in exact]))
    assert float(np.median([x.seconds for x in fast])) == pytest.approx(med, rel=0.3)


def test_sticky_shadow_and_labels_run_and_resources_are_left_out() -> None:
    cfg = load_config(ROOT / "configs" / "fraud-model.yaml").rollouts[0]
    r = cfg.model_copy(
        update={
            "feedback": cfg.feedback.model_copy(update={"ttl": 10.0}),
            "analysis": cfg.analysis.model_copy(update={"max_duration": 240.0}),
        }
    )
    traffic = Traffic(rate=300.0, users=500)
    plan = make_plan(r, traffic)
    assert [m.name for m in plan.rollout.analysis.metrics] == [
        "latency_p95", "ttft_p50", "errors", "cost", "accuracy",
    ]  # fmt: skip
    assert metric_alpha(plan.rollout) == pytest.approx(metric_alpha(r))
    assert any("memory" in n for n in plan.notes) and any("10 s after" in n for n in plan.notes)
    errs = Scenario("errors +30pp", {"error": Effect(0.30, False)}, "rollback")
    report = simulate(r, traffic, [errs], repeats=3, detect=False, seed=2)
    (s,) = report.summaries
    assert s.share("rollback") == 1.0
    # Rolled back in the shadow step (candidate sees every request) within seconds.
    assert s.quantiles("seconds")[2] < 30


def test_cost_comes_from_the_arms_pricing() -> None:
    cfg = load_config(ROOT / "configs" / "fraud-model.yaml").rollouts[0]
    prod, cand = arm_costs(cfg, Traffic(rate=200.0))
    assert prod == pytest.approx(2.40 * 2 / 3600 / 200) and cand / prod == pytest.approx(3.1 / 2.4)
    assert arm_costs(_config(), Traffic(rate=200.0)) == (1.0, 1.0)  # not priced
    assert any("+29.2%" in n for n in make_plan(cfg, Traffic(rate=200.0)).notes)


def test_detection_brackets_the_smallest_caught_regression() -> None:
    r = _config(analysis={**_rollout()["analysis"], "max_duration": "2m"})  # type: ignore[dict-item]
    traffic = Traffic(rate=400.0, latency_median=0.02, latency_sigma=0.3, error_rate=0.0)
    report = simulate(r, traffic, [Scenario("identical", {}, "promote")], repeats=2,
                      detect=True, detect_repeats=5, detect_steps=1, seed=3)  # fmt: skip
    lat = next(d for d in report.detections if d.metric == "latency_p95")
    assert lat.smallest is not None and 0.10 < lat.smallest <= 0.9
    caught = [e for e, hits, n in lat.tested if hits >= math.ceil(0.8 * 5)]
    assert min(caught) == lat.smallest


def test_time_bound_reports_what_is_done() -> None:
    r = _config(analysis={**_rollout()["analysis"], "max_duration": "1h"})  # type: ignore[dict-item]
    traffic = Traffic(rate=500.0)
    report = simulate(r, traffic, default_scenarios(r), repeats=50, detect=True, time_limit=1.0)
    assert "stopped at the time limit (1 s)" in report.incomplete
    assert report.seconds < 10


def test_bad_traffic_is_refused() -> None:
    r = _config()
    for traffic, what in (
        (Traffic(rate=0.0), "--rate"),
        (Traffic(rate=math.nan), "--rate"),
        (Traffic(rate=10.0, error_rate=1.5), "--error-rate"),
        (Traffic(rate=10.0, users=0), "--users"),
    ):
        with pytest.raises(SimulateError, match=what):
            simulate(r, traffic, [Scenario("identical", {}, "promote")], repeats=1)


# -- inputs: sample files, Prometheus --------------------------------------------------------------


def test_latency_samples(tmp_path: Path) -> None:
    lines = tmp_path / "lat.txt"
    lines.write_text("# seconds\n" + "\n".join(str(0.01 * (1 + i % 7)) for i in range(30)))
    assert len(load_latency_samples(str(lines))) == 30
    js = tmp_path / "lat.json"
    js.write_text(json.dumps([0.02] * 25))
    assert load_latency_samples(str(js)) == (0.02,) * 25
    bad = tmp_path / "bad.txt"
    for text, what in (
        ("0.1\nfast\n", r"bad.txt:2: 'fast' is not a latency"),
        ("\n".join(["0.1"] * 5), "give at least 20"),
        ("\n".join(["-0.1"] * 25), "must be positive"),
        ('[0.1, "x"]', "item 1 is not a number"),
        ("[0.1,", "not a JSON list"),
    ):
        bad.write_text(text)
        with pytest.raises(SimulateError, match=what):
            load_latency_samples(str(bad))
    with pytest.raises(SimulateError, match="No such file"):
        load_latency_samples(str(tmp_path / "missing.txt"))


_HISTOGRAM = """# TYPE canary_request_duration_seconds histogram
canary_request_duration_seconds_bucket{{rollout="m",arm="production",le="0.01"}} {a}
canary_request_duration_seconds_bucket{{rollout="m",arm="production",le="0.025"}} {b}
canary_request_duration_seconds_bucket{{rollout="m",arm="production",le="0.05"}} {c}
canary_request_duration_seconds_bucket{{rollout="m",arm="production",le="+Inf"}} {c}
canary_request_duration_seconds_count{{rollout="m",arm="production"}} {c}
canary_request_duration_seconds_bucket{{rollout="m",arm="candidate",le="+Inf"}} 999999
"""


def test_histogram_parsing_and_sampling() -> None:
    name, bounds, counts, total = parse_histogram(_HISTOGRAM.format(a=10, b=90, c=100))
    assert name == "canary_request_duration_seconds"
    assert bounds == [0.01, 0.025, 0.05, math.inf] and counts == [10, 90, 100, 100]
    assert total == 100  # production only: the candidate's series are not the baseline
    values = np.array(histogram_samples(bounds, counts, n=4000))
    assert values.min() >= 0.005 and values.max() <= 0.05
    assert np.mean(values <= 0.025) == pytest.approx(0.9, abs=0.03)
    with pytest.raises(SimulateError, match="no histogram"):
        parse_histogram("up 1\n")
    with pytest.raises(SimulateError, match="no histogram 'nope'"):
        parse_histogram(_HISTOGRAM.format(a=1, b=2, c=3), "nope")


@pytest.fixture
def metrics_server() -> Iterator[tuple[str, list[int]]]:
    """A /metrics endpoint whose histogram counts 50 more requests on every scrape."""
    scrapes = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            scrapes[0] += 1
            n = 100 + 50 * scrapes[0]
            body = _HISTOGRAM.format(a=n // 10, b=n * 9 // 10, c=n).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics", scrapes
    finally:
        server.shutdown()
        server.server_close()


def test_prometheus_rate_and_latency(metrics_server: tuple[str, list[int]]) -> None:
    url, scrapes = metrics_server
    rate, samples, what = read_prometheus(url, None, 0.5)
    assert scrapes[0] == 2
    assert 50 <= rate <= 100  # 50 requests in the window of 0.5 s (plus the HTTP round trips)
    assert len(samples) > 1000 and "canary_request_duration_seconds" in what
    with pytest.raises(SimulateError, match="--prometheus"):
        read_prometheus("http://127.0.0.1:9/metrics", None, 0.0)


async def test_prometheus_endpoint_without_a_histogram_is_refused_clearly() -> None:
    """loadtest/fake_model.py's /metrics has process metrics but no latency histogram."""
    async with running_fake_model(FakeModelConfig(model="p")) as url:
        with pytest.raises(SimulateError, match=r"no histogram \(\*_bucket series\)"):
            await asyncio.to_thread(read_prometheus, url + "/metrics", None, 0.0)


# -- progress and the command line -----------------------------------------------------------------


def test_progress_is_a_plain_line_without_a_terminal() -> None:
    out = io.StringIO()
    p = Progress(4, out)
    p.step("identical")
    p.close()
    text = out.getvalue()
    assert "\r" not in text and "simulate: 1/4 runs" in text and "1 runs in" in text


def _canary(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "canary", "simulate", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip


def test_cli_table_and_json(tmp_path: Path) -> None:
    done = _canary(str(MINIMAL), "--rate", "300", "--repeats", "3", "--no-detect",
                   "--effects", "latency=x2", "--json", "--seed", "5")  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["rollout"] == "iris" and data["repeats"] == 3 and data["seed"] == 5
    same, slow = data["scenarios"]
    assert same["scenario"] == "identical" and same["promote"] == 1.0
    assert slow["effects"] == {"latency": "+100%"} and slow["rollback"] == 1.0
    assert slow["seconds"]["median"] < same["seconds"]["median"]
    assert "runs in" in done.stderr  # the progress line (stderr is not a terminal here)
    short = tmp_path / "short.yaml"
    doc = yaml.safe_load(MINIMAL.read_text())
    doc["rollouts"][0]["analysis"]["max_duration"] = "3m"
    short.write_text(yaml.safe_dump(doc))
    table = _canary(str(short), "--rate", "300", "--repeats", "2", "--no-detect")
    assert table.returncode == 0, table.stderr
    assert "identical" in table.stdout and "latency +25%" in table.stdout
    assert "errors +1pp" in table.stdout and "median" in table.stdout


def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from canary.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("rollouts:\n  - name: x\n    steps: []\n")
    for args, message in (
        ([str(tmp_path / "missing.yaml"), "--rate", "10"], "missing.yaml"),
        ([str(bad), "--rate", "10"], "rollouts[0]"),
        ([str(MINIMAL)], "give the request rate: --rate R"),
        ([str(MINIMAL), "--rate", "-5"], "--rate must be"),
        ([str(MINIMAL), "--rate", "10", "--effects", "latency=10"], "expected a change such as"),
        ([str(MINIMAL), "--rate", "10", "--effects", "ttft=+10%"], "no metric of rollout 'iris'"),
        ([str(MINIMAL), "--rate", "10", "--rollout", "nope"], "no rollout 'nope'"),
        ([str(MINIMAL), "--rate", "10", "--repeats", "0"], "--repeats must be within"),
        ([str(MINIMAL), "--rate", "10", "--latency-samples", "nope.txt"], "nope.txt"),
    ):
        assert main(["simulate", *args]) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("canary simulate: ") and message in err, (args, err)
    done = _canary(str(MINIMAL), "--rate", "10", "--effects", "latency=+1O%")  # a typo
    assert done.returncode == 1 and "effect '+1O%'" in done.stderr
    assert "Traceback" not in done.stderr
