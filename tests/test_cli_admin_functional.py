"""`canary status | promote | rollback | pause | resume | retry | reload` against a fake admin
API (the real one: tests/test_operator_actions.py).

The CLI is synchronous (httpx.Client), so the fake admin server runs in a thread with its own
event loop; the tests themselves are plain functions and never touch pytest-asyncio's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from canary.admin_client import AdminClient, AdminConflictError, AdminNotFoundError
from canary.cli import main, resolve_admin
from canary.errors import AdminError, ConfigError

TOKEN = "s3cret"
NOW = 1_700_000_000.0
LONG_REASON = "latency_p95 is worse: candidate/production ratio 1.12 [1.04, 1.21] " * 3


def _summary(name: str, **over: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "name": name,
        "phase": "running",
        "step": 1,
        "steps": 4,
        "step_kind": "weight",
        "weights": {"production": 75.0, "candidate": 25.0},
        "shadow": False,
        "samples": {"production": 1200, "candidate": 340},
        "step_samples": 340,
        "step_required": 500,
        "elapsed": 192.4,
        "last_decision": {"action": "ADVANCE", "reason": "all metrics OK", "at": NOW - 60},
    }
    s.update(over)
    return s


def _rollouts() -> dict[str, dict[str, Any]]:
    fraud = _summary("fraud-model")
    fraud["metrics"] = [
        {
            "name": "latency_p95",
            "kind": "quantile",
            "verdict": "WORSE",
            "estimate": 1.123,
            "lower": 1.041,
            "upper": 1.209,
            "margin": 0.10,
            "relative": True,
            "direction": "increase",
            "n_production": 1200,
            "n_candidate": 340,
            "explain": "latency_p95: ...",
        },
        {
            "name": "errors",
            "kind": "error_rate",
            "verdict": "UNKNOWN",
            "estimate": 0.004,
            "lower": -0.001,
            "upper": 0.009,
            "margin": 0.005,
            "relative": False,
            "direction": "increase",
            "n_production": 1200,
            "n_candidate": 340,
            "explain": "errors: ...",
        },
        {
            "name": "accuracy",
            "kind": "mean",
            "verdict": "UNKNOWN",
            "estimate": None,
            "lower": None,
            "upper": None,
            "margin": 0.02,
            "relative": False,
            "direction": "decrease",
            "n_production": 3,
            "n_candidate": 0,
            "explain": "accuracy: not enough data",
        },
    ]
    fraud["decisions"] = [
        {
            "at": NOW - 1000 + i,
            "action": "CONTINUE",
            "reason": f"decision number {i:02d}",
            "step": 0,
            "manual": False,
        }
        for i in range(11)
    ] + [{"at": NOW, "action": "PAUSE", "reason": "by hand", "step": 1, "manual": True}]
    chat = _summary(
        "llm-chat",
        phase="paused",
        step=0,
        steps=4,
        step_kind="shadow",
        shadow=True,
        weights={"production": 100.0, "candidate": 0.0},
        samples={"production": 90, "candidate": 0},
        step_samples=90,
        step_required=1000,
        elapsed=7384.0,
        last_decision=None,
    )
    old = _summary(
        "old-model",
        phase="rolled_back",
        elapsed=45.0,
        last_decision={"action": "ROLLBACK", "reason": LONG_REASON, "at": NOW},
    )
    for r in (chat, old):
        r["metrics"], r["decisions"] = [], []
    return {r["name"]: r for r in (fraud, chat, old)}


_ALLOWED = {
    "pause": ({"running"}, "paused"),
    "resume": ({"paused"}, "running"),
    "promote": ({"running", "paused", "holding"}, "promoted"),
    "rollback": ({"running", "paused", "holding"}, "rolled_back"),
    "advance": ({"running", "paused", "holding"}, ""),  # "": the phase stays
    "retry": ({"rolled_back"}, "running"),
}


@dataclass
class FakeAdmin:
    """The admin API contract, in memory; records every request it gets."""

    token: str | None = TOKEN
    url: str = ""
    rollouts: dict[str, dict[str, Any]] = field(default_factory=_rollouts)
    requests: list[dict[str, Any]] = field(default_factory=list)
    reload_issues: list[dict[str, Any]] | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/api/v1/rollouts", self._list)
        app.router.add_get("/api/v1/rollouts/{name}", self._one)
        app.router.add_post("/api/v1/rollouts/{name}/{action}", self._action)
        app.router.add_post("/api/v1/reload", self._reload)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "body": json.loads(raw) if raw else None,
                "content_type": request.headers.get("Content-Type"),
                "authorization": request.headers.get("Authorization"),
            }
        )
        wrong = request.headers.get("Authorization") != f"Bearer {self.token}"
        if request.method == "POST" and self.token is not None and wrong:
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        return await handler(request)

    def _get(self, request: web.Request) -> dict[str, Any]:
        name = request.match_info["name"]
        if name not in self.rollouts:
            raise web.HTTPNotFound(
                text=json.dumps({"error": f"unknown rollout {name!r}"}),
                content_type="application/json",
            )
        return self.rollouts[name]

    async def _list(self, request: web.Request) -> web.Response:
        keep = ("metrics", "decisions")
        summaries = [{k: v for k, v in r.items() if k not in keep} for r in self.rollouts.values()]
        return web.json_response({"rollouts": summaries})

    async def _one(self, request: web.Request) -> web.Response:
        return web.json_response(self._get(request))

    async def _action(self, request: web.Request) -> web.Response:
        rollout = self._get(request)
        action = request.match_info["action"]
        if action not in _ALLOWED:
            raise web.HTTPNotFound()
        body = await request.json() if await request.read() else {}
        allowed, phase = _ALLOWED[action]
        if rollout["phase"] not in allowed:
            return web.json_response(
                {"error": f"cannot {action} {rollout['name']}: it is {rollout['phase']}"},
                status=409,
            )
        answer = {"name": rollout["name"], "action": action.upper()}
        if action == "advance":
            rollout["step"] += 1
            rollout["weights"] = {"production": 50.0, "candidate": 50.0}
        elif action == "retry":
            rollout.update(step=0, weights={"production": 95.0, "candidate": 5.0}, attempt=2)
            answer["attempt"] = 2
        if action in ("advance", "retry"):
            for key in ("step", "steps", "step_kind", "weights"):
                answer[key] = rollout[key]
        rollout["phase"] = phase or rollout["phase"]
        reason = body.get("reason") or f"{action} by hand"
        return web.json_response({**answer, "phase": rollout["phase"], "reason": reason})

    async def _reload(self, request: web.Request) -> web.Response:
        if self.reload_issues is not None:
            return web.json_response(
                {"error": "invalid configuration in r.yaml", "issues": self.reload_issues},
                status=400,
            )
        return web.json_response({"reloaded": True, "rollouts": sorted(self.rollouts)})


@contextlib.contextmanager
def running(fake: FakeAdmin) -> Iterator[FakeAdmin]:
    """Serve ``fake`` on 127.0.0.1 from a thread with its own event loop."""
    loop = asyncio.new_event_loop()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    runner = web.AppRunner(fake.app(), access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.SockSite(runner, sock).start())
    thread = threading.Thread(target=loop.run_forever, name="fake-admin", daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(runner.cleanup())
        loop.close()


@pytest.fixture
def admin(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAdmin]:
    monkeypatch.delenv("CANARY_ADMIN_URL", raising=False)
    monkeypatch.setenv("CANARY_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("COLUMNS", "120")  # tables fit the terminal: make it one width
    with running(FakeAdmin()) as fake:
        yield fake


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- status ----------------------------------------------------------------------------------


def test_status_table(admin: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "status", "--admin", admin.url)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAME", "PHASE", "STEP", "SAMPLES", "P/C", "STEP", "PROGRESS", "ELAPSED", "LAST", "DECISION"
    ]  # fmt: skip
    fraud = next(line for line in lines if line.startswith("fraud-model"))
    for cell in ("running", "2/4 weight 25%", "1200/340", "340/500", "3m12s"):
        assert cell in fraud
    assert fraud.endswith("ADVANCE: all metrics OK")
    chat = next(line for line in lines if line.startswith("llm-chat"))
    for cell in ("paused", "1/4 shadow", "90/0", "90/1000", "2h03m"):
        assert cell in chat
    assert chat.rstrip().endswith("-")  # no decision yet
    old = next(line for line in lines if line.startswith("old-model"))
    assert "rolled_back" in old and "45s" in old
    assert "ROLLBACK: latency_p95 is worse" in old and old.endswith("…")
    assert max(len(line) for line in lines) <= 120
    # the columns line up: every row has its STEP cell where the header has it
    col = lines[0].index("STEP")
    assert fraud[col:].startswith("2/4") and chat[col:].startswith("1/4")


def test_status_of_one_rollout_with_metrics_and_decisions(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "status", "fraud-model", "--admin", admin.url)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[1].startswith("fraud-model") and "2/4 weight 25%" in lines[1]
    p95 = next(line for line in lines if line.startswith("latency_p95")).split("  ")
    cells = [c.strip() for c in p95 if c.strip()]
    assert cells == ["latency_p95", "WORSE", "+12.3%", "[+4.1%, +20.9%]", "+10%", "1200/340"]
    errors = [c.strip() for c in next(x for x in lines if x.startswith("errors")).split("  ")]
    assert [c for c in errors if c] == [
        "errors", "UNKNOWN", "+0.4pp", "[-0.1pp, +0.9pp]", "+0.5pp", "1200/340"
    ]  # fmt: skip
    accuracy = [c.strip() for c in next(x for x in lines if x.startswith("accuracy")).split("  ")]
    assert [c for c in accuracy if c] == ["accuracy", "UNKNOWN", "?", "[?, ?]", "-0.02", "3/0"]
    assert "last 10 of 12 decision(s):" in out
    assert "decision number 00" not in out and "decision number 01" not in out
    assert "decision number 02" in out and "decision number 10" in out
    last = lines[-1]
    assert "PAUSE" in last and "manual" in last and "by hand" in last and " 2/4 " in last
    assert admin.requests[-1]["path"] == "/api/v1/rollouts/fraud-model"


def test_status_json_is_the_raw_answer(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(capsys, "status", "fraud-model", "--json", "--admin", admin.url)
    assert code == 0 and json.loads(out) == admin.rollouts["fraud-model"]
    code, out, _ = cli(capsys, "status", "--json", "--admin", admin.url)
    assert code == 0
    assert [r["name"] for r in json.loads(out)["rollouts"]] == list(admin.rollouts)


def test_status_of_an_unknown_rollout(admin: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "status", "nope", "--admin", admin.url)
    assert (code, out) == (4, "")
    assert err.strip() == "unknown rollout 'nope'"


# --- actions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "action", "line"),
    [
        (
            ["promote", "fraud-model"],
            "advance",
            "fraud-model: advanced to step 3/4 weight 50% (phase running)",
        ),
        (["promote", "fraud-model", "--full"], "promote", "fraud-model: promoted (phase promoted)"),
        (["rollback", "fraud-model"], "rollback", "fraud-model: rolled back (phase rolled_back)"),
        (["pause", "fraud-model"], "pause", "fraud-model: paused (phase paused)"),
        (["resume", "llm-chat"], "resume", "llm-chat: resumed (phase running)"),
        (
            ["retry", "old-model"],
            "retry",
            "old-model: retried from step 1/4 weight 5% with fresh samples "
            "(phase running, attempt 2)",
        ),
    ],
)
def test_actions_send_the_request_with_reason_and_token(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str], argv: list[str], action: str, line: str
) -> None:
    code, out, err = cli(capsys, *argv, "--reason", "p95 too high", "--admin", admin.url)
    assert (code, out, err) == (0, line + "\n", "")
    assert admin.requests == [
        {
            "method": "POST",
            "path": f"/api/v1/rollouts/{argv[1]}/{action}",
            "body": {"reason": "p95 too high"},
            "content_type": "application/json",
            "authorization": f"Bearer {TOKEN}",
        }
    ]


def test_action_without_reason_sends_an_empty_json_object(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(capsys, "pause", "fraud-model", "--admin", admin.url)
    assert code == 0 and out == "fraud-model: paused (phase paused)\n"
    # mutating calls must be JSON (the admin API answers 415 otherwise)
    assert admin.requests[0]["body"] == {}
    assert admin.requests[0]["content_type"] == "application/json"


def test_wrong_or_missing_token_exits_3(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CANARY_ADMIN_TOKEN", "wrong")
    code, out, err = cli(capsys, "rollback", "fraud-model", "--admin", admin.url)
    assert (code, out) == (3, "")
    assert "the admin API refused the token (401)" in err and "$CANARY_ADMIN_TOKEN" in err
    assert admin.requests[0]["authorization"] == "Bearer wrong"
    monkeypatch.delenv("CANARY_ADMIN_TOKEN")
    code, _, err = cli(capsys, "rollback", "fraud-model", "--admin", admin.url)
    assert code == 3 and admin.requests[1]["authorization"] is None
    assert admin.rollouts["fraud-model"]["phase"] == "running"


def test_action_on_an_unknown_rollout_exits_4(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "promote", "nope", "--admin", admin.url)
    assert code == 4 and err.strip() == "unknown rollout 'nope'"


def test_action_not_allowed_in_the_phase_exits_5(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "promote", "old-model", "--admin", admin.url)
    assert (code, out) == (5, "")
    assert err.strip() == "cannot advance old-model: it is rolled_back"
    code, out, err = cli(capsys, "promote", "--full", "old-model", "--admin", admin.url)
    assert (code, out) == (5, "")
    assert err.strip() == "cannot promote old-model: it is rolled_back"
    code, out, err = cli(capsys, "retry", "fraud-model", "--admin", admin.url)
    assert (code, out) == (5, "")
    assert err.strip() == "cannot retry fraud-model: it is running"


def test_admin_api_down_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{unused_port()}"
    for argv in (["status"], ["promote", "m"], ["reload"]):
        code, out, err = cli(capsys, *argv, "--admin", url)
        assert (code, out) == (2, "")
        assert err.strip() == (
            f"cannot reach the canary admin API at {url} (connection refused): "
            "is `canary run` running, and is --admin right?"
        )


def test_a_server_that_is_not_the_admin_api(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "status", "--admin", admin.url + "/elsewhere")
    assert code == 1 and "is --admin the admin port" in err
    code, _, err = cli(capsys, "status", "--admin", "127.0.0.1:9901")
    assert code == 2 and "is not an admin URL such as http://127.0.0.1:9901" in err


# --- reload ----------------------------------------------------------------------------------


def test_reload(admin: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "reload", "--admin", admin.url)
    assert (code, err) == (0, "")
    assert out == "reloaded: 3 rollout(s): fraud-model, llm-chat, old-model\n"
    assert admin.requests[0]["path"] == "/api/v1/reload"


def test_reload_refused_lists_every_issue(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    admin.reload_issues = [
        {"path": "rollouts[0].steps[1].weight", "message": "must be within 0..100", "line": 9},
        {"path": "rollouts[1].name", "message": "duplicate rollout name", "line": None},
    ]
    code, out, err = cli(capsys, "reload", "--admin", admin.url)
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "reload refused: invalid configuration in r.yaml",
        "  - rollouts[0].steps[1].weight: must be within 0..100 (line 9)",
        "  - rollouts[1].name: duplicate rollout name",
    ]


# --- admin URL and token from the environment and the rollout file --------------------------


def _config(tmp_path: Path, admin: dict[str, Any] | None, *, broken: bool = False) -> str:
    rollout: dict[str, Any] = {
        "name": "m",
        "production": {"endpoints": ["http://127.0.0.1:8001"]},
        "candidate": {"endpoints": ["http://127.0.0.1:8002"]},
        "steps": [{"weight": 5 if not broken else 500}],
    }
    doc: dict[str, Any] = {"rollouts": [rollout]}
    if admin is not None:
        doc["admin"] = admin
    path = tmp_path / "rollout.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("127.0.0.1:9911", "http://127.0.0.1:9911"),
        ("0.0.0.0:9912", "http://127.0.0.1:9912"),
        ("[::]:9913", "http://[::1]:9913"),
        ("[::1]:9914", "http://[::1]:9914"),
        ("admin.internal:9915", "http://admin.internal:9915"),
    ],
)
def test_admin_url_from_the_config_file(tmp_path: Path, listen: str, url: str) -> None:
    # (a non-loopback admin address needs a token, or this explicit permission)
    path = _config(tmp_path, {"listen": listen, "allow_public_without_token": True})
    assert resolve_admin(None, path, {}) == (url, None)


def test_admin_url_precedence(tmp_path: Path) -> None:
    path = _config(tmp_path, {"listen": "127.0.0.1:9911"})
    env = {"CANARY_ADMIN_URL": "http://10.0.0.1:9901/"}
    assert resolve_admin("http://h:1", path, env)[0] == "http://h:1"
    assert resolve_admin(None, path, env)[0] == "http://10.0.0.1:9901"
    assert resolve_admin(None, path, {})[0] == "http://127.0.0.1:9911"
    assert resolve_admin(None, None, {}) == ("http://127.0.0.1:9901", None)
    assert resolve_admin(None, _config(tmp_path, None), {})[0] == "http://127.0.0.1:9901"


def test_token_from_the_variable_the_config_names(tmp_path: Path) -> None:
    path = _config(tmp_path, {"listen": "127.0.0.1:9911", "token_env": "FRAUD_ADMIN_TOKEN"})
    assert resolve_admin(None, path, {"FRAUD_ADMIN_TOKEN": "t1"})[1] == "t1"
    both = {"FRAUD_ADMIN_TOKEN": "t1", "CANARY_ADMIN_TOKEN": "t2"}
    assert resolve_admin(None, path, both)[1] == "t2"
    assert resolve_admin(None, path, {})[1] is None
    assert resolve_admin(None, None, {"FRAUD_ADMIN_TOKEN": "t1"})[1] is None


def test_admin_section_is_read_even_when_a_rollout_is_invalid(tmp_path: Path) -> None:
    # `canary reload -c FILE` right after a bad edit must still find the admin API
    path = _config(tmp_path, {"listen": "127.0.0.1:9911", "token_env": "T"}, broken=True)
    assert resolve_admin(None, path, {"T": "x"}) == ("http://127.0.0.1:9911", "x")


def test_unusable_config_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError):
        resolve_admin(None, str(tmp_path / "missing.yaml"), {})
    with pytest.raises(ConfigError):
        resolve_admin(None, _config(tmp_path, {"listen": "nowhere"}), {})
    with pytest.raises(AdminError, match="port 0") as info:
        resolve_admin(None, _config(tmp_path, {"listen": "127.0.0.1:0"}), {})
    assert info.value.exit_code == 2
    code, out, err = cli(capsys, "status", "-c", str(tmp_path / "missing.yaml"))
    assert (code, out) == (1, "") and "cannot read" in err


def test_commands_find_admin_and_token_through_the_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CANARY_ADMIN_URL", raising=False)
    monkeypatch.delenv("CANARY_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("FRAUD_ADMIN_TOKEN", TOKEN)
    with running(FakeAdmin()) as fake:
        listen = fake.url.removeprefix("http://")
        path = _config(tmp_path, {"listen": listen, "token_env": "FRAUD_ADMIN_TOKEN"})
        code, out, err = cli(capsys, "rollback", "fraud-model", "-c", path)
        assert (code, err) == (0, "") and "rolled back" in out
        assert fake.requests[0]["authorization"] == f"Bearer {TOKEN}"


def test_as_a_process_stderr_stays_clean(admin: FakeAdmin) -> None:
    # `canary` configures logging at INFO; httpx's per-request INFO lines must not show
    env = {**os.environ, "CANARY_ADMIN_TOKEN": TOKEN}
    argv = [sys.executable, "-m", "canary", "status", "--admin", admin.url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("NAME ") and "fraud-model" in done.stdout
    argv = [sys.executable, "-m", "canary", "promote", "old-model", "--admin", admin.url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    assert (done.returncode, done.stdout) == (5, "")
    assert done.stderr == "cannot advance old-model: it is rolled_back\n"


# --- the client on its own -------------------------------------------------------------------


def test_client_methods(admin: FakeAdmin) -> None:
    before = copy.deepcopy(admin.rollouts)
    with AdminClient(admin.url, TOKEN) as client:
        assert [r["name"] for r in client.rollouts()] == list(before)
        assert client.rollout("llm-chat") == before["llm-chat"]
        answer = client.action("fraud-model", "pause", "why not")
        assert answer == {
            "name": "fraud-model", "phase": "paused", "action": "PAUSE", "reason": "why not"
        }  # fmt: skip
        with pytest.raises(AdminConflictError) as conflict:
            client.action("fraud-model", "pause")
        assert conflict.value.exit_code == 5 and conflict.value.status == 409
        with pytest.raises(AdminNotFoundError):
            client.rollout("nope")
        with pytest.raises(ValueError, match="action must be one of"):
            client.action("fraud-model", "explode")
        assert client.reload()["reloaded"] is True
