"""``canary report``: from a real SQLite state file written by real rollouts (one rolled back on
latency, one promoted, one rolled back by an operator with a hostile reason) and from the
admin API of the canary that ran them; HTML well-formed and self-contained, Markdown for a
pull request, hostile text escaped, clear errors. The HTML is also rendered in headless
Chromium (``CANARY_UPDATE_SCREENSHOTS=1`` saves it as docs/img/report.png).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from canary.config import load_config
from canary.report import ReportData, render_html, render_markdown
from canary.report._model import Distribution, HistoryPoint
from canary.store import RedisStore, SQLiteStore
from loadtest.fake_model import FakeModelConfig, running_fake_model
from tests.conftest import running_canary

# -- the rollouts: one canary on loopback with a SQLite state file, three fake models --------
#
# - fraud-model: a candidate that gets slower as it runs (its latency drifts up to +50% over
#   30 s): it passes shadow and a 10% step, then is rolled back on latency.
# - ranker: a candidate like production: promoted.
# - ops-check: paused, then rolled back by an operator with a hostile reason (markup).

HOSTILE_REASON = (
    '<script>alert("x")</script> & <img src=http://evil.example/x.png> | [a](http://e.x)'
)
_MODEL: dict[str, Any] = {"latency": "lognormal", "latency_median": 0.02, "latency_sigma": 0.25}
RUN_LIMIT = 150.0  # seconds: a slow machine still ends (the tests then say what was missing)


@dataclass
class Scenarios:
    workdir: Path
    config: Path
    state: Path
    admin_reports: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> fmt -> text
    running_report: str = ""  # ranker's HTML report from the admin API while it ran
    running_state_report: str = ""  # ranker's Markdown from the state file, canary writing it
    details: dict[str, dict[str, Any]] = field(default_factory=dict)  # the API's detail at end
    admin_errors: dict[str, tuple[int, str]] = field(default_factory=dict)


def _rollout(name: str, prefix: str, production: str, candidate: str, **over: Any) -> dict:
    r: dict[str, Any] = {
        "name": name,
        "match": {"path_prefix": prefix},
        "production": {"endpoints": [production], "cost": {"per_request": 0.002}},
        "candidate": {"endpoints": [candidate], "cost": {"per_request": 0.0021}},
        "routing": {"timeout": "5s"},
    }
    r.update(over)
    return r


def config_dict(state: Path, p: str, slow: str, good: str) -> dict[str, Any]:
    metrics = [
        {"name": "latency_p95", "signal": "latency", "stat": "p95", "max_increase": "15%"},
        {"name": "latency_mean", "signal": "latency", "stat": "mean", "max_increase": "15%"},
        {"name": "cost", "signal": "cost", "stat": "mean", "max_increase": "10%"},
    ]
    return {
        "proxy": {"listen": "127.0.0.1:0"},
        "admin": {"listen": "127.0.0.1:0"},
        "state": {"backend": "sqlite", "path": str(state)},
        "rollouts": [
            _rollout(
                "fraud-model",
                "/v2/models/fraud",
                p,
                slow,
                steps=[
                    {"shadow": {"min_requests": 150}},
                    {"weight": 10, "min_requests": 150, "min_duration": "3s"},
                    {"weight": 50, "min_requests": 1_000_000},
                ],
                analysis={
                    "interval": "500ms",
                    "burn_in": 50,
                    "max_duration": "10m",
                    "metrics": metrics,
                },
            ),
            _rollout(
                "ranker",
                "/v2/models/ranker",
                p,
                good,
                steps=[
                    {"weight": 20, "min_requests": 100, "min_duration": "2s"},
                    {"weight": 50, "min_requests": 300},
                ],
                analysis={
                    "interval": "500ms",
                    "burn_in": 50,
                    "max_duration": "10m",
                    "metrics": [
                        {
                            "name": "latency_p50",
                            "signal": "latency",
                            "stat": "p50",
                            "max_increase": "25%",
                        },
                        {"name": "cost", "signal": "cost", "stat": "mean", "max_increase": "10%"},
                    ],
                },
            ),
            _rollout(
                "ops-check",
                "/v2/models/ops",
                p,
                good,
                steps=[{"weight": 20, "min_requests": 1_000_000}],
                analysis={"interval": "500ms", "burn_in": 50, "metrics": []},
            ),
        ],
    }


async def _traffic(proxy: str, stop: asyncio.Event) -> None:
    paths = ("/v2/models/fraud/infer", "/v2/models/ranker/infer", "/v2/models/ops/infer")
    async with httpx.AsyncClient(timeout=10) as client:
        n = 0
        while not stop.is_set():
            batch = [
                client.post(proxy + paths[i % len(paths)], json={"id": str(n + i), "x": [1, 2]})
                for i in range(12)
            ]
            n += len(batch)
            for r in await asyncio.gather(*batch, return_exceptions=True):
                if isinstance(r, Exception):
                    await asyncio.sleep(0.05)


def _cli(*argv: str) -> tuple[int, str, str]:
    """``canary ARGV`` in this process: (exit code, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from canary.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


async def run_scenarios(workdir: Path) -> Scenarios:
    """Run the three rollouts to their ends (see the module docstring)."""
    state = workdir / "state.db"
    slow_cfg = FakeModelConfig(
        model="candidate-slow", seed=2, latency_trend=1.5, trend_seconds=30.0, **_MODEL
    )
    async with (
        running_fake_model(FakeModelConfig(model="production", seed=1, **_MODEL)) as p,
        running_fake_model(slow_cfg) as slow,
        running_fake_model(FakeModelConfig(model="candidate", seed=3, **_MODEL)) as good,
    ):
        path = workdir / "rollout.yaml"
        path.write_text(yaml.safe_dump(config_dict(state, p, slow, good), sort_keys=False))
        out = Scenarios(workdir, path, state)
        async with running_canary(load_config(str(path)), controller=True, path=str(path)) as can:
            stop = asyncio.Event()
            traffic = asyncio.create_task(_traffic(can.url, stop))
            api = can.admin + "/api/v1/rollouts/"
            try:
                async with httpx.AsyncClient() as client:
                    await client.post(api + "ops-check/pause", json={"reason": "checking"})
                    started = time.monotonic()
                    while time.monotonic() - started < RUN_LIMIT:
                        await asyncio.sleep(0.5)
                        phases = {
                            n: (await client.get(api + n)).json() for n in ("fraud-model", "ranker")
                        }
                        if not out.running_report and phases["ranker"]["step"] == 2:
                            code, text, _ = await asyncio.to_thread(
                                _cli, "report", "ranker", "--admin", can.admin
                            )
                            out.running_report = text if code == 0 else f"exit {code}"
                            code, text, err = await asyncio.to_thread(
                                _cli,
                                *("report", "ranker", "--state", str(state)),
                                *("-c", str(path), "--format", "md"),
                            )
                            out.running_state_report = text if code == 0 else f"exit {code}: {err}"
                        if all(d["phase"] in ("promoted", "rolled_back") for d in phases.values()):
                            break
                    await client.post(api + "ops-check/rollback", json={"reason": HOSTILE_REASON})
                    await asyncio.sleep(0.6)  # the next flush writes the decision and history
                    for name in ("fraud-model", "ranker", "ops-check"):
                        out.details[name] = (await client.get(api + name)).json()
            finally:
                stop.set()
                with contextlib.suppress(Exception):
                    await traffic
            for name in ("fraud-model", "ranker", "ops-check"):
                out.admin_reports[name] = {}
                for fmt in ("html", "md"):
                    code, text, err = await asyncio.to_thread(
                        _cli, "report", name, "--admin", can.admin, "--format", fmt
                    )
                    out.admin_reports[name][fmt] = text if code == 0 else f"exit {code}: {err}"
            out.admin_errors["unknown"] = (
                await asyncio.to_thread(_cli, "report", "no-such-rollout", "--admin", can.admin)
            )[::2]
    return out


DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
VOID = {"meta", "link", "br", "hr", "img", "input", "col", "area", "base", "wbr", "source"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Scenarios:
    """The three rollouts, run once for the module (about 30 s)."""
    return asyncio.run(run_scenarios(tmp_path_factory.mktemp("report")))


class _Checker(HTMLParser):
    """Well-formedness (every element closed, in order) and what the page would load."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []  # every text node
        self.visible: list[str] = []  # outside <style>, <title> and charts

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            local = (value or "").startswith(("data:", "#"))
            if name in ("src", "href", "action", "xlink:href", "srcset", "poster") and not local:
                self.links.append(f"{name}={value}")
            if name.startswith("on"):
                self.errors.append(f"event handler {name} on <{tag}>")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "xlink:href"):
                self.links.append(f"{name}={value}")

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if not {"style", "title", "svg"} & set(self.stack):
            self.visible.append(data)


def check_html(page: str) -> _Checker:
    """Parse ``page``; assert it is well-formed, self-contained and script-free."""
    assert page.startswith("<!DOCTYPE html>")
    c = _Checker()
    c.feed(page)
    c.close()
    assert not c.errors, c.errors[:5]
    assert not c.stack, f"unclosed: {c.stack}"
    assert "script" not in c.tags and "iframe" not in c.tags and "img" not in c.tags
    assert not c.links, f"the report loads or links something: {c.links[:5]}"
    assert not re.search(r"url\(\s*['\"]?https?:", page), "a CSS url() to another host"
    assert "@import" not in page
    return c


def text_of(page: str) -> str:
    """The words a reader sees (charts aside), one space between text nodes."""
    return " ".join(" ".join(check_html(page).visible).split())


def _report(runs: Scenarios, name: str, *extra: str) -> tuple[int, str, str]:
    return _cli("report", name, "--state", str(runs.state), *extra)


# -- from the state file ------------------------------------------------------------------------


def test_rolled_back_rollout_from_the_state_file(runs: Scenarios, tmp_path: Path) -> None:
    out = tmp_path / "fraud.html"
    code, stdout, err = _report(runs, "fraud-model", "-c", str(runs.config), "-o", str(out))
    assert code == 0, err
    assert str(out) in stdout and "rolled_back" in stdout
    page = out.read_text()
    text = text_of(page)
    # outcome and why, in words: the metric, its interval and the tolerance it crossed (the
    # latency drift is caught on p95 or on the mean, at the 10% or the 50% step)
    log = runs.details["fraud-model"]["decisions"]
    actions = [d["action"] for d in log]
    assert actions[0] == "START" and actions[-1] == "ROLLBACK" and "ADVANCE" in actions, actions
    metric = log[-1]["evidence"]["metric"]
    assert metric in ("latency_p95", "latency_mean"), log[-1]
    assert "Rolled back after" in text
    assert re.search(
        rf"metric {metric}'s interval \[\+[\d.]+%, [^\]]+\] \(candidate vs production\) lay "
        r"beyond its tolerance \(at most \+15%\)",
        text,
    ), text[:800]
    for name in ("latency_p95", "latency_mean", "cost"):
        assert name in text
    # the decision log, every entry with its reason
    for d in log:
        assert d["reason"] in text
    assert text.count("ADVANCE") >= actions.count("ADVANCE")
    # cost per 1k per arm from the recorded per-request cost (0.002 and 0.0021 per request)
    cost = re.search(r"cost per 1,000 inferences production (\S+) candidate (\S+)", text)
    assert cost and float(cost[1]) == pytest.approx(2.0, rel=0.01), text
    assert float(cost[2]) == pytest.approx(2.1, rel=0.01)
    # charts: weights, one interval chart per metric over time, per-arm distribution
    assert page.count("<svg") >= 1 + 3 + 1
    assert "interval over time against its tolerance" in page
    assert "candidate&#x27;s share of the traffic" in page or "share of the traffic" in page
    # times with their zone
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [A-Z+-]", text)


def test_promoted_rollout_from_the_state_file_in_markdown(runs: Scenarios) -> None:
    code, md, err = _report(runs, "ranker", "-c", str(runs.config), "--format", "md")
    assert code == 0, err
    assert md.startswith("## canary report: ranker: Promoted")
    assert re.search(r"\*\*Promoted after [\d,]+ candidate requests in \S+\.\*\*", md)
    rows = [line for line in md.splitlines() if line.startswith("| latency\\_p50 ")]
    assert len(rows) == 1 and "✅ OK" in rows[0] and "at most +25%" in rows[0], rows
    cost = re.search(r"\| production \| ([\d.]+) \|\n\| candidate \| ([\d.]+) \|", md)
    assert cost, md
    assert float(cost[1]) == pytest.approx(2.0, rel=0.01)
    assert float(cost[2]) == pytest.approx(2.1, rel=0.01)
    assert "| Time | Step | Action | By | Reason |" in md and "PROMOTE" in md
    assert "<svg" not in md and "<script" not in md


def test_the_state_file_alone_is_enough(runs: Scenarios) -> None:
    """No rollout file: results of the last analysis from the stored history, the cost from
    the recorded samples, and a note on what -c FILE would add."""
    code, page, err = _report(runs, "fraud-model")
    assert code == 0, err
    text = text_of(page)
    assert "Rolled back after" in text and "latency_p95" in text and "WORSE" in text
    assert "inferred from their tolerance" in text


def test_state_from_the_rollout_files_state_section(runs: Scenarios) -> None:
    code, md, err = _cli("report", "ranker", "-c", str(runs.config), "--state", "--format", "md")
    assert code == 0, err
    assert "Promoted" in md.splitlines()[0]


def test_the_state_file_is_not_written(runs: Scenarios) -> None:
    before = runs.state.stat().st_mtime_ns, runs.state.read_bytes()
    assert _report(runs, "ranker")[0] == 0
    assert (runs.state.stat().st_mtime_ns, runs.state.read_bytes()) == before


async def test_a_redis_state_store(runs: Scenarios, redis_server: Any) -> None:
    """The rolled-back rollout's state, decisions, samples and history copied into a real
    Redis: ``--state redis://...`` gives the report the SQLite file gives."""
    src, dst = SQLiteStore(runs.state), RedisStore(redis_server.url)
    await src.open()
    await dst.open()
    try:
        name = "fraud-model"
        state = await src.get_state(name)
        samples = await src.get_samples(name)
        assert state is not None and samples is not None
        await dst.put_state(name, state)
        await dst.add_samples(name, samples)
        for entry in await src.decisions(name, limit=1000):
            await dst.append_decision(name, entry)
        for point in await src.history(name):
            await dst.append_history(name, point, at=point["t"], keep="a" in point)
    finally:
        await src.close()
        await dst.close()
    args = ("report", name, "-c", str(runs.config), "--format", "md", "--utc")
    code, from_redis, err = await asyncio.to_thread(_cli, *args, "--state", redis_server.url)
    assert code == 0, err
    code, from_file, err = await asyncio.to_thread(_cli, *args, "--state", str(runs.state))
    assert code == 0, err
    assert "Rolled back" in from_redis.splitlines()[0]
    # the same report but for where it came from (and when it was generated)
    assert from_redis.split("<sub>canary")[0] == from_file.split("<sub>canary")[0]


# -- from the admin API -------------------------------------------------------------------------


def test_reports_from_the_admin_api_say_the_same(runs: Scenarios) -> None:
    for name, title in (("fraud-model", "Rolled back"), ("ranker", "Promoted")):
        page = runs.admin_reports[name]["html"]
        assert not page.startswith("exit"), page
        text = text_of(page)
        assert f"{title} after" in text
        for m in runs.details[name]["metrics"]:
            assert m["name"] in text
        for d in runs.details[name]["decisions"]:
            assert d["action"] in text
        assert "from admin API at http://127.0.0.1:" in text
        # distributions from the admin API's histograms, cost from its /metrics
        assert "controller's histograms" in text, text
        for m in runs.details[name]["metrics"]:  # each metric's interval over time
            assert f'aria-label="{m["name"]}: interval over time' in page
        assert re.search(r"cost per 1,000 inferences production 2 candidate 2\.1", text), text
        md = runs.admin_reports[name]["md"]
        assert md.startswith(f"## canary report: {name}: {title}")


def test_a_running_rollout_says_what_it_waits_for(runs: Scenarios) -> None:
    text = text_of(runs.running_report)
    assert "Running at step 2/2 (weight 50%)" in text, text[:600]
    # the controller's status: the step's progress, or the advance just made
    assert re.search(r"Now: step [12]/2 ", text), text
    # the same from the state file while canary writes it: the tests run again on the
    # stored samples, the policy says what it waits for
    md = runs.running_state_report
    assert md.startswith("## canary report: ranker: Running"), md[:300]
    assert re.search(r"^Now: step 2/2 \(weight 50%\)", md, re.M), md
    assert "| latency\\_p50 |" in md and "| cost |" in md


# -- hostile text -------------------------------------------------------------------------------


def test_an_operators_hostile_reason_is_shown_as_text(runs: Scenarios) -> None:
    for page in (
        runs.admin_reports["ops-check"]["html"],
        _report(runs, "ops-check", "-c", str(runs.config))[1],
    ):
        c = check_html(page)
        assert HOSTILE_REASON in "".join(c.text)  # shown, as text
        assert "<script>" not in page and "<img" not in page
    md = runs.admin_reports["ops-check"]["md"]
    assert "<script>" not in md and "<img" not in md and not _LINK.search(md)
    assert "&lt;script&gt;" in md


_LINK = re.compile(r"(?<!\\)\]\(")  # a Markdown link's "](", its bracket not escaped
HOSTILE = '"><script>alert(1)</script><img src=x onerror=alert(2)>|`*[x](http://e.x)'


def _hostile_data() -> ReportData:
    metric = {
        "name": HOSTILE,
        "kind": "mean",
        "verdict": "WORSE",
        "estimate": 1.3,
        "lower": 1.2,
        "upper": 1.4,
        "margin": 0.1,
        "relative": True,
        "direction": "increase",
        "n_production": 10,
        "n_candidate": 5,
    }
    return ReportData(
        name=HOSTILE,
        source=f"admin API at http://127.0.0.1:9/{HOSTILE}",
        generated_at=1_765_000_100.0,
        phase="rolled_back",
        step=1,
        steps=1,
        started_at=1_765_000_000.0,
        samples={"production": 10, "candidate": 5},
        metrics=[metric],
        decisions=[
            {"at": 1_765_000_000.0, "action": "START", "reason": HOSTILE, "step": 1, "steps": 1},
            {
                "at": 1_765_000_050.0,
                "action": "ROLLBACK",
                "reason": HOSTILE,
                "step": 1,
                "steps": 1,
                "weights": {"production": 100, "candidate": 0},
                "evidence": {"metric": HOSTILE, "estimate": 1.3, "lower": 1.2, "upper": 1.4},
            },
        ],
        history=[
            HistoryPoint(1_765_000_000.0 + i, "running", 1, 5.0, {HOSTILE: metric})
            for i in range(3)
        ],
        distributions={HOSTILE: {HOSTILE: Distribution(3, {0.5: 0.01})}},
        endpoints={"production": [f"http://127.0.0.1:1/{HOSTILE}"], "candidate": [HOSTILE]},
        notes=[HOSTILE],
    )


def test_hostile_names_reasons_and_urls_are_escaped() -> None:
    page = render_html(_hostile_data(), utc=True)
    c = check_html(page)
    assert "".join(c.text).count(HOSTILE) >= 6  # name, reason, metric, endpoints, notes...
    assert "<script>" not in page and "<img" not in page
    md = render_markdown(_hostile_data(), utc=True)
    assert "<script>" not in md and "<img" not in md and not _LINK.search(md)


async def test_a_hostile_rollout_name_in_a_state_file(tmp_path: Path) -> None:
    """A state file is not validated as a rollout file is: whatever name it holds is text."""
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    await store.open()
    await store.append_decision(HOSTILE, {"at": 1.0, "action": "START", "reason": HOSTILE})
    await store.close()
    code, page, err = await asyncio.to_thread(_cli, "report", HOSTILE, "--state", str(path))
    assert code == 0, err
    assert HOSTILE in "".join(check_html(page).text)


def test_markdown_cells_stay_in_their_column() -> None:
    md = render_markdown(_hostile_data(), utc=True)
    table = [ln for ln in md.splitlines() if ln.startswith("| Time |")]
    assert table
    rows = md.split("| Time | Step | Action | By | Reason |", 1)[1].splitlines()[2:4]
    for row in rows:
        cells = re.split(r"(?<!\\)\|", row.strip())[1:-1]
        assert len(cells) == 5, row


def test_a_rollout_with_nothing_yet() -> None:
    data = ReportData(name="m", source="test", generated_at=1_765_000_000.0, phase="running")
    text = text_of(render_html(data, utc=True))
    assert "Running at step ?" in text and "The decision log is empty." in text
    assert "Running" in render_markdown(data, utc=True).splitlines()[0]


def test_history_points_as_the_store_keeps_them() -> None:
    from canary.report._sources import parse_history

    points = parse_history(
        {
            "points": [
                {"t": 2.0, "ph": "running", "st": 1, "w": [50.0, 50.0], "m": []},
                {
                    "t": 1.0,
                    "ph": "running",
                    "st": 0,
                    "w": [90.0, 10.0],
                    "m": [{"k": "p95", "e": 1.1, "l": 1.0, "u": None, "tol": 1.1, "v": "UNKNOWN"}],
                },
                {"ph": "no time: skipped"},
            ]
        }
    )
    assert [(p.at, p.step, p.weight) for p in points] == [(1.0, 1, 10.0), (2.0, 2, 50.0)]
    assert points[0].metrics["p95"]["upper"] is None
    assert points[0].metrics["p95"]["tolerance"] == 1.1


# -- errors -------------------------------------------------------------------------------------


def test_unknown_rollout_names_what_the_store_holds(runs: Scenarios) -> None:
    code, out, err = _report(runs, "no-such-rollout")
    assert code == 4 and not out
    assert "no rollout named 'no-such-rollout'" in err
    assert "'fraud-model'" in err and "'ranker'" in err


def test_unknown_rollout_from_the_admin_api(runs: Scenarios) -> None:
    code, err = runs.admin_errors["unknown"]
    assert code == 4, err
    assert "no-such-rollout" in err


def test_missing_state_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    code, _, err = _cli("report", "m", "--state", str(missing))
    assert code == 1 and f"state file {missing} does not exist" in err
    assert not missing.exists()  # never created


def test_not_a_state_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_text("not sqlite at all " * 100)
    code, _, err = _cli("report", "m", "--state", str(bad))
    assert code == 1 and "bad.db" in err


def test_admin_api_unreachable() -> None:
    code, out, err = _cli("report", "m", "--admin", "http://127.0.0.1:9")
    assert code == 2 and not out
    assert "cannot reach the canary admin API at http://127.0.0.1:9" in err


def test_state_without_a_file_needs_a_rollout_file() -> None:
    code, _, err = _cli("report", "m", "--state")
    assert code == 2 and "-c FILE" in err


# -- screenshot ---------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server on ``tmp_path`` (the browser opens only http://127.0.0.1)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    finally:
        server.shutdown()
        server.server_close()


def test_the_report_in_a_browser(runs: Scenarios, browser: Any, served: tuple[str, Path]) -> None:
    url, root = served
    code, _, err = _report(runs, "fraud-model", "-c", str(runs.config), "-o", str(root / "r.html"))
    assert code == 0, err
    browser.get(f"{url}/r.html")
    title = browser.wait_for("return document.readyState === 'complete' && document.title;")
    assert "fraud-model" in title and "Rolled back" in title
    shown = browser.script(
        "return {badge: document.querySelector('.badge').textContent,"
        " charts: document.querySelectorAll('svg').length,"
        " rows: document.querySelectorAll('#decisions tr').length,"
        " width: document.documentElement.scrollWidth,"
        " height: document.documentElement.scrollHeight,"
        " resources: performance.getEntriesByType('resource').map(e => e.name)};"
    )
    assert shown["badge"] == "Rolled back"
    assert shown["charts"] >= 5  # weights, 3 metrics over time, latency per arm (+ cells)
    assert shown["rows"] == 1 + len(runs.details["fraud-model"]["decisions"])
    assert shown["resources"] == [], "the report loaded something"
    assert shown["width"] <= 1440, "wider than the window: something overflows"
    update = os.environ.get("CANARY_UPDATE_SCREENSHOTS") == "1"
    target = DOCS_IMG / "report.png" if update else root / "report.png"
    browser._call(
        "POST", "/window/rect", {"width": 1200, "height": min(shown["height"] + 140, 4000)}
    )
    browser.screenshot(target)
    assert target.stat().st_size > 10_000
    print(json.dumps({"screenshot": str(target)}))
