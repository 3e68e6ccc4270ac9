"""Gates over real loopback servers: a real canary (proxy, admin API, controller) in front of
fake models, real HTTP gate servers, the real CLI; docs/gates.md.

- a webhook gate that says 403 then 200 holds the advance, then lets it happen;
- a gate that times out holds, with the reason in the status;
- a rollback is never gated: WORSE rolls back while the gate says no;
- a manual gate waits for ``canary approve NAME`` (run as a process against the admin API);
- an approval is kept in the SQLite state across a restart, and in shared mode only the
  leader applies it (a follower's admin API forwards it);
- deliveries are signed (HMAC-SHA256 over ``TIMESTAMP.BODY``) and carry custom headers;
- configuration errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from canary.admin import make_admin_app
from canary.cli import main
from canary.config import WebhookConfig, load_config_text
from canary.controller import Controller, gates
from canary.controller.leadership import Leadership
from canary.decision import Phase
from canary.errors import CommandRejected, ConfigError, NotLeader
from canary.metrics import Metrics
from canary.observe import Recorder
from canary.store import SQLiteStore
from canary.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookSender, sign
from loadtest.fake_model import FakeModelConfig, running_fake_model
from tests.conftest import Canary, fake_pair, rollout_config, running_canary
from tests.test_controller import Clock, Sink, _feed

Behaviour = Callable[[web.Request, int], Awaitable[web.StreamResponse]]
RELEASE = web.AppKey("release", asyncio.Event)
GAP = 0.3  # gates.MIN_GAP in these tests (1 s in canary): seconds between rounds of asking


@pytest.fixture(autouse=True)
def _short_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gates, "MIN_GAP", GAP)


@dataclass
class Asked:
    at: float  # monotonic
    headers: dict[str, str]
    raw: bytes

    @property
    def body(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.raw)
        return data


@dataclass
class Gate:
    url: str
    asked: list[Asked] = field(default_factory=list)


@contextlib.asynccontextmanager
async def gate_server(behaviour: Behaviour) -> AsyncIterator[Gate]:
    """A gate at ``/gate``; ``behaviour(request, n)`` answers the n-th question."""
    gate = Gate(url="")
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        n = len(gate.asked)
        gate.asked.append(Asked(time.monotonic(), dict(request.headers), await request.read()))
        return await behaviour(request, n)

    app = web.Application()
    app.router.add_post("/gate", handle)
    app[RELEASE] = release
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    gate.url = str(server.make_url("/gate"))
    try:
        yield gate
    finally:
        release.set()
        await server.close()


async def _rollout(client: httpx.AsyncClient, can: Canary) -> dict[str, Any]:
    r = await client.get(can.admin + "/api/v1/rollouts/m")
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


async def _traffic(client: httpx.AsyncClient, url: str, n: int) -> None:
    for i in range(n):
        r = await client.post(url + "/predict", json={"id": str(i)})
        assert r.status_code == 200, r.text


async def _until(
    client: httpx.AsyncClient,
    can: Canary,
    done: Callable[[dict[str, Any]], bool],
    within: float = 10.0,
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        one = await _rollout(client, can)
        if done(one):
            return one
        assert time.monotonic() < deadline, json.dumps(one, indent=1)[:3000]
        await asyncio.sleep(0.05)


def _actions(one: dict[str, Any]) -> list[str]:
    return [d["action"] for d in one["decisions"]]


def _gated(p: str, c: str, hooks: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    cfg = rollout_config(
        [p],
        [c],
        steps=[{"weight": 50, "min_requests": 5}, {"weight": 90, "min_requests": 10**9}],
        analysis={"interval": "100ms", "burn_in": 5, "metrics": []},
        webhooks=hooks,
        **over,
    )
    return cfg


async def _gate_metrics(client: httpx.AsyncClient, can: Canary) -> dict[tuple[str, ...], float]:
    text = (await client.get(can.admin + "/metrics")).text
    out: dict[tuple[str, ...], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "canary_gate_waiting":
                out[("waiting", s.labels["gate"])] = s.value
            elif s.name == "canary_gate_answers_total":
                out[("answers", s.labels["gate"], s.labels["result"])] = s.value
    return out


# --- webhook gates --------------------------------------------------------------------------


async def test_a_gate_that_says_403_then_200_holds_then_advances(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATE_SECRET", "gate-key")

    async def freeze_then_open(request: web.Request, n: int) -> web.StreamResponse:
        if n < 2:
            return web.json_response({"reason": "change freeze"}, status=403)
        return web.json_response({"ok": True})

    async with gate_server(freeze_then_open) as gate, fake_pair() as (p, c):
        hooks = [{"on": ["confirm-advance"], "url": gate.url, "timeout": "2s",
                  "secret_env": "GATE_SECRET", "headers": {"X-Team": "ml-platform"}}]  # fmt: skip
        async with (
            running_canary(_gated(p, c, hooks), controller=True) as can,
            httpx.AsyncClient() as client,
        ):
            await _traffic(client, can.url, 20)
            one = await _until(client, can, lambda r: "WAIT" in _actions(r))
            assert one["step"] == 1 and one["phase"] == "running"
            assert one["status"].startswith(
                f"waiting for confirm-advance: {gate.url} answered 403 'change freeze'"
            ), one["status"]
            assert one["gate"] == {"waiting": "confirm-advance", "approved": False}
            wait = one["decisions"][-1]
            assert wait["action"] == "WAIT" and "answered 403 'change freeze'" in wait["reason"]
            assert can.proxy.routes["m"].weights == (50.0, False)  # held at step 1
            waiting = await _gate_metrics(client, can)
            assert waiting[("waiting", "confirm-advance")] == 1.0
            assert waiting[("answers", "confirm-advance", "no")] >= 1.0

            one = await _until(client, can, lambda r: r["step"] == 2)
            assert can.proxy.routes["m"].weights == (90.0, False)
            # one WAIT when the hold started, however many times the gate said no
            assert _actions(one) == ["START", "WAIT", "ADVANCE"]
            advance = one["decisions"][-1]
            assert f"confirm-advance open: {gate.url} answered 200" in advance["reason"]
            assert one["gate"]["waiting"] is None
            after = await _gate_metrics(client, can)
            assert after[("waiting", "confirm-advance")] == 0.0
            assert after[("answers", "confirm-advance", "yes")] == 1.0
            assert after[("answers", "confirm-advance", "no")] == 2.0

    assert len(gate.asked) == 3  # asked again only while it said no, never after it opened
    for a, b in zip(gate.asked, gate.asked[1:], strict=False):
        assert b.at - a.at >= GAP * 0.9  # a gate that says no is not hammered
    q = gate.asked[0]
    assert q.body["rollout"] == "m" and q.body["event"] == "confirm-advance"
    assert q.body["action"] == "ADVANCE" and q.body["step"] == 1
    assert q.headers["X-Canary-Event"] == "confirm-advance"
    assert q.headers["X-Team"] == "ml-platform"
    stamp = q.headers[TIMESTAMP_HEADER]
    assert abs(int(stamp) - time.time()) < 60
    expected = hmac.new(b"gate-key", stamp.encode() + b"." + q.raw, hashlib.sha256).hexdigest()
    assert q.headers[SIGNATURE_HEADER] == f"sha256={expected}"


async def test_a_gate_that_times_out_holds_with_the_reason() -> None:
    async def hang(request: web.Request, n: int) -> web.StreamResponse:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(request.app[RELEASE].wait(), 10)
        return web.json_response({})

    async with gate_server(hang) as gate, fake_pair() as (p, c):
        hooks = [{"on": ["confirm-advance"], "url": gate.url, "timeout": "200ms"}]
        async with (
            running_canary(_gated(p, c, hooks), controller=True) as can,
            httpx.AsyncClient() as client,
        ):
            t0 = time.monotonic()
            await _traffic(client, can.url, 20)
            one = await _until(client, can, lambda r: "WAIT" in _actions(r))
            assert f"{gate.url} did not answer within 0.2s" in one["status"], one["status"]
            await asyncio.sleep(4 * GAP + 0.6)  # a few more rounds, each timing out
            one = await _rollout(client, can)
            assert one["step"] == 1 and _actions(one) == ["START", "WAIT"]
            assert "did not answer within 0.2s" in one["status"]
            rounds = len(gate.asked)
            elapsed = time.monotonic() - t0
            assert 2 <= rounds <= elapsed / (0.2 + GAP) + 1  # one round at a time, spaced
            metrics = await _gate_metrics(client, can)
            assert metrics[("answers", "confirm-advance", "timeout")] >= 2


async def test_a_rollback_is_never_gated() -> None:
    """The gate says no to the advance; meanwhile the candidate's error rate turns out worse:
    the rollback happens without asking anybody."""

    async def never(request: web.Request, n: int) -> web.StreamResponse:
        return web.json_response({"reason": "no"}, status=409)

    async with gate_server(never) as gate, fake_pair(candidate={"error_rate": 0.3}) as (p, c):
        hooks = [{"on": ["confirm-advance", "confirm-promotion"], "url": gate.url}]
        cfg = _gated(p, c, hooks, routing={"failover": False, "timeout": "5s"})
        rollout = cfg["rollouts"][0]
        rollout["steps"][0]["min_requests"] = rollout["analysis"]["burn_in"] = 3
        rollout["analysis"]["metrics"] = [
            {"name": "errors", "signal": "error", "stat": "rate", "max_increase": "1pp"}
        ]
        async with (
            running_canary(cfg, controller=True) as can,
            httpx.AsyncClient() as client,
        ):
            for i in range(16):  # enough for the step, too few to prove the errors worse
                await client.post(can.url + "/predict", json={"id": str(i)})
            one = await _until(client, can, lambda r: "WAIT" in _actions(r))
            assert one["phase"] == "running", one
            asked = len(gate.asked)
            for i in range(400):
                await client.post(can.url + "/predict", json={"id": f"b{i}"})
                if i % 50 == 49 and (await _rollout(client, can))["phase"] == "rolled_back":
                    break
            one = await _until(client, can, lambda r: r["phase"] == "rolled_back")
            assert _actions(one) == ["START", "WAIT", "ROLLBACK"]
            assert "errors is worse than allowed" in one["decisions"][-1]["reason"]
            assert can.proxy.routes["m"].weights == (0.0, False)
            assert len(gate.asked) > asked  # it kept saying no while the errors piled up
            asked = len(gate.asked)
            await asyncio.sleep(3 * GAP)
            assert len(gate.asked) == asked  # rolled back: nobody is asked any more
            assert all(a.body["event"] == "confirm-advance" for a in gate.asked)


# --- manual gates and `canary approve` ------------------------------------------------------


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The CLI in this process (it is synchronous: off this loop, which serves the API)."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _canary_cli(*argv: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CANARY_ADMIN_TOKEN"}
    env["COLUMNS"] = "200"  # `status` fits its lines to the terminal
    if token is not None:
        env["CANARY_ADMIN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "canary", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


async def test_a_gated_promotion_waits_and_proceeds_on_canary_approve(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The done-when test: a manual gate on the promotion; `canary status` says why it waits;
    `canary approve NAME` (a real process, with the admin token) lets it promote."""
    monkeypatch.setenv("GATES_ADMIN_TOKEN", "tok3n")
    async with fake_pair() as (p, c):
        cfg = rollout_config(
            [p],
            [c],
            steps=[{"weight": 50, "min_requests": 5}],
            analysis={"interval": "100ms", "burn_in": 5, "metrics": []},
            webhooks=[{"on": ["confirm-promotion"]}],
        )
        cfg["admin"]["token_env"] = "GATES_ADMIN_TOKEN"
        async with running_canary(cfg, controller=True) as can, httpx.AsyncClient() as client:
            await _traffic(client, can.url, 20)
            one = await _until(client, can, lambda r: "WAIT" in _actions(r))
            why = "waiting for confirm-promotion: an operator's approval (canary approve m)"
            assert one["status"] == why and one["phase"] == "running"
            await asyncio.sleep(0.5)  # held: nothing else happens meanwhile
            one = await _rollout(client, can)
            assert _actions(one) == ["START", "WAIT"] and one["phase"] == "running"
            assert can.proxy.routes["m"].weights == (50.0, False)

            monkeypatch.setenv("COLUMNS", "200")
            code, out, _ = await _cli(capsys, "status", "m", "--admin", can.admin)
            assert code == 0 and f"now: {why}" in out, out

            # mutating: without the token it is refused
            monkeypatch.delenv("CANARY_ADMIN_TOKEN", raising=False)
            code, _, err = await _cli(capsys, "approve", "m", "--admin", can.admin)
            assert code == 3, err
            assert (await _rollout(client, can))["phase"] == "running"

            done = await asyncio.to_thread(
                _canary_cli, "approve", "m", "--reason", "CHG-1234 signed off",
                "--admin", can.admin, token="tok3n",
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert done.stdout == (
                "m: approved confirm-promotion at step 1/1 weight 50% (phase running)\n"
            )
            one = await _until(client, can, lambda r: r["phase"] == "promoted", within=5)
            assert _actions(one) == ["START", "WAIT", "APPROVE", "PROMOTE"]
            approve, promote = one["decisions"][-2:]
            assert approve["manual"] is True
            assert approve["reason"] == (
                "confirm-promotion approved by an operator: CHG-1234 signed off"
            )
            assert promote["manual"] is False  # the policy promoted, the approval let it
            assert "confirm-promotion approved by an operator: CHG-1234" in promote["reason"]
            assert can.proxy.routes["m"].weights == (100.0, False)
            assert can.runtime.controller.state("m").approved_step is None  # spent
            metrics = await _gate_metrics(client, can)
            assert metrics[("answers", "confirm-promotion", "approved")] == 1.0

            # finished: nothing to approve
            monkeypatch.setenv("CANARY_ADMIN_TOKEN", "tok3n")
            code, _, err = await _cli(capsys, "approve", "m", "--admin", can.admin)
            assert code == 5 and "promoted; nothing to approve" in err


async def test_an_approval_opens_a_webhook_gate_that_keeps_saying_no() -> None:
    async def never(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=503, text="gate backend down")

    async with gate_server(never) as gate, fake_pair() as (p, c):
        hooks = [{"on": ["confirm-advance"], "url": gate.url, "timeout": "1s"}]
        async with (
            running_canary(_gated(p, c, hooks), controller=True) as can,
            httpx.AsyncClient() as client,
        ):
            await _traffic(client, can.url, 20)
            one = await _until(client, can, lambda r: "WAIT" in _actions(r))
            assert "answered 503 'gate backend down'" in one["status"]
            r = await client.post(
                can.admin + "/api/v1/rollouts/m/approve", json={"reason": "known outage"}
            )
            assert r.status_code == 200, r.text
            assert r.json()["gate"] == "confirm-advance" and r.json()["action"] == "APPROVE"
            one = await _until(client, can, lambda r: r["step"] == 2, within=5)
            assert _actions(one) == ["START", "WAIT", "APPROVE", "ADVANCE"]
            # the approval was for step 1's advance only: step 2 has no gate of its own to
            # approve (confirm-promotion is not configured)
            r = await client.post(can.admin + "/api/v1/rollouts/m/approve", json={})
            assert r.status_code == 409
            assert "no gate at step 2/2" in r.json()["error"], r.json()


async def test_approving_a_rollout_with_nothing_gated_is_a_409(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config(
            [p], [c], webhooks=[{"on": ["promote"], "url": "http://127.0.0.1:9/hook"}]
        )
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            r = await client.post(can.admin + "/api/v1/rollouts/m/approve", json={})
            assert r.status_code == 409
            assert r.json()["error"] == (
                "rollout 'm' has no gate at step 1/1: no webhooks entry lists "
                "confirm-promotion; nothing to approve"
            )
            r = await client.post(can.admin + "/api/v1/rollouts/nope/approve", json={})
            assert r.status_code == 404
            code, _, err = await _cli(capsys, "approve", "m", "--admin", can.admin)
            assert code == 5 and "nothing to approve" in err


async def test_an_approval_survives_a_restart(tmp_path: Path) -> None:
    """Approved before the step is done; canary restarts; the promotion, once due, does not
    wait (SQLite state)."""
    async with fake_pair() as (p, c):
        cfg = rollout_config(
            [p],
            [c],
            steps=[{"weight": 50, "min_requests": 10}],
            analysis={"interval": "100ms", "burn_in": 5, "metrics": []},
            webhooks=[{"on": ["confirm-promotion"]}],
        )
        cfg["state"] = {"backend": "sqlite", "path": str(tmp_path / "state.db")}
        async with running_canary(cfg, controller=True) as can, httpx.AsyncClient() as client:
            r = await client.post(
                can.admin + "/api/v1/rollouts/m/approve", json={"reason": "pre-approved"}
            )
            assert r.status_code == 200, r.text
            one = await _rollout(client, can)
            assert one["gate"] == {"waiting": None, "approved": True}
            assert one["phase"] == "running"  # nothing due yet
        async with running_canary(cfg, controller=True) as can, httpx.AsyncClient() as client:
            assert can.runtime.controller.state("m").approved_step == 0
            assert (await _rollout(client, can))["gate"]["approved"] is True
            await _traffic(client, can.url, 40)
            one = await _until(client, can, lambda r: r["phase"] == "promoted", within=5)
            assert _actions(one) == ["START", "APPROVE", "PROMOTE"]
            assert "pre-approved" in one["decisions"][-1]["reason"]


# --- shared mode ----------------------------------------------------------------------------


def _shared_config() -> Any:
    return load_config_text(
        yaml.safe_dump(
            rollout_config(
                ["http://127.0.0.1:1"],
                ["http://127.0.0.1:2"],
                steps=[{"weight": 10, "min_requests": 20}],
                analysis={"interval": "100ms", "burn_in": 20, "metrics": []},
                webhooks=[{"on": ["confirm-promotion"]}],
            )
        )
    )


async def test_in_shared_mode_the_leader_applies_an_approval(tmp_path: Path) -> None:
    clock = Clock()
    procs = []
    for name in ("a", "b"):
        store = SQLiteStore(tmp_path / "s.db", clock=clock)
        await store.open()
        rec, sink = Recorder(), Sink()
        lead = Leadership(store, 1.0, holder=name, monotonic=clock)
        ctl = Controller(
            _shared_config(), store, rec, Metrics(), sink,
            clock=clock, monotonic=clock, leadership=lead,
        )  # fmt: skip
        await ctl.load()
        procs.append((ctl, rec, sink, lead))
    (a, a_rec, a_sink, a_lead), (b, b_rec, _, b_lead) = procs
    assert a_lead.leading and not b_lead.leading
    try:
        _feed(a_rec, 300, 10, seed=1)
        _feed(b_rec, 300, 10, seed=2)
        for _ in range(3):
            await b.tick()
            await a.tick()
            clock.t += 0.2
        assert a.view("m").status.startswith("waiting for confirm-promotion"), a.view("m").status
        assert a.view("m").gate == "confirm-promotion"
        await b.tick()  # a follower shows why the leader waits
        assert b.view("m").status.startswith("waiting for confirm-promotion: an operator's")
        assert "following: a leads" in b.view("m").status
        with pytest.raises(NotLeader):  # the admin API forwards it to the leader
            await b.approve("m", "from the follower")
        answer = await a.approve("m", "ok")
        assert answer["action"] == "APPROVE"
        clock.t += 0.2
        await a.tick()
        assert a.state("m").phase is Phase.PROMOTED
        assert a_sink.calls[-1][1] == 100.0
        await b.tick()  # the follower serves and shows what the leader stored
        assert b.state("m").phase is Phase.PROMOTED
        assert [d["action"] for d in b.view("m").decisions] == [
            "START", "WAIT", "APPROVE", "PROMOTE"
        ]  # fmt: skip
        with pytest.raises(CommandRejected, match="nothing to approve"):
            await a.approve("m")
    finally:
        for ctl, *_ in procs:
            await ctl.stop()


async def test_a_follower_forwards_approve_to_the_leader() -> None:
    seen: list[tuple[str, dict[str, Any], str]] = []

    async def leader_api(request: web.Request) -> web.Response:
        seen.append(
            (request.path, await request.json(), request.headers.get("X-Canary-Forwarded", ""))
        )
        return web.json_response({"name": "m", "action": "APPROVE", "gate": "confirm-promotion"})

    class Follower:
        leadership = None

        def __init__(self, admin_url: str) -> None:
            self.admin_url = admin_url

        def names(self) -> list[str]:
            return ["m"]

        async def approve(self, name: str, reason: str | None = None) -> Any:
            raise NotLeader("not the leader", leader="other", admin_url=self.admin_url)

    class Routing:
        def routing(self, rollout: str) -> dict[str, Any] | None:
            return None

        def input_health(self, rollout: str) -> dict[str, Any] | None:
            return None

    hop = web.Application()
    hop.router.add_post("/api/v1/rollouts/m/approve", leader_api)
    server = TestServer(hop)
    await server.start_server()
    app = make_admin_app(
        Routing(),
        Metrics(),
        lambda: (True, "serving"),
        controller=Follower(str(server.make_url("")).rstrip("/")),  # type: ignore[arg-type]
    )
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        r = await client.post("/api/v1/rollouts/m/approve", json={"reason": "go"})
        assert r.status == 200 and (await r.json())["action"] == "APPROVE"
        assert seen == [("/api/v1/rollouts/m/approve", {"reason": "go"}, "1")]
    finally:
        await client.close()
        await server.close()


# --- signed deliveries ----------------------------------------------------------------------


def _verify(secret: bytes, headers: dict[str, str], raw: bytes, tolerance: float = 300) -> bool:
    """The receiver's check, as docs/gates.md shows it."""
    stamp = headers.get("X-Canary-Timestamp", "")
    given = headers.get("X-Canary-Signature", "")
    if not stamp.isdigit() or abs(time.time() - int(stamp)) > tolerance:
        return False
    mac = hmac.new(secret, stamp.encode() + b"." + raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(given, "sha256=" + mac)


async def test_notifications_are_signed_and_carry_custom_headers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOOK_SECRET", "s3cr3t-key")

    async def ok(request: web.Request, n: int) -> web.StreamResponse:
        return web.json_response({})

    async with gate_server(ok) as srv:
        hook = WebhookConfig.model_validate(
            {
                "on": ["rollback"],
                "url": srv.url,
                "secret_env": "HOOK_SECRET",
                "headers": {"X-Api-Key": "abc 123", "X-Team": "ml"},
            }
        )
        plain = WebhookConfig.model_validate({"on": ["rollback"], "url": srv.url})
        sender = WebhookSender()
        await sender.start()
        try:
            assert sender.fire("m", "rollback", [hook, plain], {"reason": "p95 +12%"}) == 2
            async with asyncio.timeout(5):
                while len(srv.asked) < 2 or sender.pending():
                    await asyncio.sleep(0.01)
        finally:
            await sender.close()
    signed = next(a for a in srv.asked if SIGNATURE_HEADER in a.headers)
    unsigned = next(a for a in srv.asked if SIGNATURE_HEADER not in a.headers)
    assert _verify(b"s3cr3t-key", signed.headers, signed.raw)
    assert not _verify(b"another-key", signed.headers, signed.raw)
    assert not _verify(b"s3cr3t-key", signed.headers, signed.raw + b" ")  # body changed
    assert signed.headers["X-Api-Key"] == "abc 123" and signed.headers["X-Team"] == "ml"
    assert signed.headers["Content-Type"] == "application/json"
    assert signed.body["event"] == "rollback" and signed.body["reason"] == "p95 +12%"
    assert TIMESTAMP_HEADER not in unsigned.headers and "X-Api-Key" not in unsigned.headers
    stamp = signed.headers[TIMESTAMP_HEADER]
    assert sign(b"s3cr3t-key", stamp, signed.raw) == signed.headers[SIGNATURE_HEADER]


# --- configuration --------------------------------------------------------------------------


def _load(hooks: list[dict[str, Any]]) -> Any:
    cfg = rollout_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"], webhooks=hooks)
    return load_config_text(yaml.safe_dump(cfg))


@pytest.mark.parametrize(
    ("hook", "path", "message"),
    [
        ({"on": ["promote"]}, "webhooks[0]", "url is required for promote"),
        (
            {"on": ["confirm-promotion", "rollback"]},
            "webhooks[0]",
            "url is required for rollback",
        ),
        ({"on": ["confirm-promotion"], "secret_env": "X"}, "webhooks[0]", "need a url"),
        ({"on": ["confirm-everything"], "url": "http://h/"}, "webhooks[0].on[0]", "confirm-"),
        (
            {"on": ["promote"], "url": "http://h/", "secret_env": "GATES_TEST_UNSET"},
            "webhooks[0].secret_env",
            "names $GATES_TEST_UNSET, but it is not set or empty",
        ),
        (
            {"on": ["promote"], "url": "http://h/", "secret_env": "not a name"},
            "webhooks[0].secret_env",
            "environment variable name",
        ),
        (
            {"on": ["promote"], "url": "http://h/", "headers": {"X-Canary-Signature": "x"}},
            "webhooks[0].headers",
            "set by canary itself",
        ),
        (
            {"on": ["promote"], "url": "http://h/", "headers": {"content-type": "text/plain"}},
            "webhooks[0].headers",
            "set by canary itself",
        ),
        (
            {"on": ["promote"], "url": "http://h/", "headers": {"Bad Name": "x"}},
            "webhooks[0].headers",
            "not a valid HTTP field name",
        ),
        (
            {"on": ["promote"], "url": "http://h/", "headers": {"X-A": "a\r\nX-B: b"}},
            "webhooks[0].headers",
            "without CR, LF",
        ),
        ({"on": ["confirm-advance"], "url": "http://h/", "timeout": "0s"}, "timeout", ""),
    ],
)
def test_config_errors(
    hook: dict[str, Any], path: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GATES_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError) as info:
        _load([hook])
    text = str(info.value)
    assert path in text and message in text, text


def test_a_valid_gate_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATES_TEST_SECRET", "k")
    cfg = _load(
        [
            {"on": ["confirm-promotion"]},
            {
                "on": ["confirm-advance", "confirm-promotion"],
                "url": "http://127.0.0.1:9/gate",
                "timeout": "3s",
                "secret_env": "GATES_TEST_SECRET",
                "headers": {"Authorization": "Bearer x"},
            },
            {"on": ["rollback", "promote"], "url": "http://127.0.0.1:9/hook"},
        ]
    )
    manual, gate, notify = cfg.rollouts[0].webhooks
    assert manual.url is None and manual.gate
    assert gate.timeout == 3.0 and gate.headers == {"Authorization": "Bearer x"}
    assert not notify.gate


def test_canary_validate_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = rollout_config(
        ["http://127.0.0.1:1"],
        ["http://127.0.0.1:2"],
        webhooks=[{"on": ["promote"], "url": "http://h/", "secret_env": "GATES_TEST_UNSET2"}],
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(path)]) == 1
    out, err = capsys.readouterr()
    out += err
    assert "rollouts[0].webhooks[0].secret_env" in out and "GATES_TEST_UNSET2" in out, out


async def test_a_webhook_gate_in_front_of_a_fake_model_does_not_touch_the_data_plane() -> None:
    """While a gate holds, the proxy serves at full speed: asking happens off the hot path."""

    async def slow_no(request: web.Request, n: int) -> web.StreamResponse:
        await asyncio.sleep(0.5)
        return web.Response(status=403)

    async with gate_server(slow_no) as gate, fake_pair() as (p, c):
        hooks = [{"on": ["confirm-advance"], "url": gate.url, "timeout": "2s"}]
        async with (
            running_canary(_gated(p, c, hooks), controller=True) as can,
            httpx.AsyncClient() as client,
        ):
            await _traffic(client, can.url, 20)
            await _until(client, can, lambda r: "WAIT" in _actions(r))
            t0 = time.perf_counter()
            await _traffic(client, can.url, 100)
            per_request = (time.perf_counter() - t0) / 100
            assert per_request < 0.05  # nothing waits on the 0.5 s gate


@pytest.mark.slow  # 10-30 s: three processes start (CI covers shared mode in-process above)
async def test_canary_approve_through_workers_sharing_sqlite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``canary run --workers 2`` (a supervisor, two worker processes on one SQLite file, one
    leads): the gated promotion waits, ``canary approve`` (a real process) reaches the leader
    through the supervisor, and every worker then serves the candidate."""
    from loadtest.crash_loss import canary_process
    from tests.redis_harness import free_port

    fast: dict[str, Any] = {"latency": "fixed", "latency_median": 0.001}
    async with (
        running_fake_model(FakeModelConfig(model="p", **fast)) as p,
        running_fake_model(FakeModelConfig(model="c", seed=1, **fast)) as c,
    ):
        proxy, admin = free_port(), free_port()
        cfg = rollout_config(
            [p],
            [c],
            steps=[{"weight": 50, "min_requests": 10}],
            analysis={"interval": "1s", "burn_in": 10, "metrics": []},
            webhooks=[{"on": ["confirm-promotion"]}],
        )
        cfg["proxy"]["listen"] = f"127.0.0.1:{proxy}"
        cfg["admin"]["listen"] = f"127.0.0.1:{admin}"
        cfg["state"] = {"backend": "sqlite", "path": str(tmp_path / "state.db")}
        path = tmp_path / "rollout.yaml"
        path.write_text(yaml.safe_dump(cfg))
        admin_url, proxy_url = f"http://127.0.0.1:{admin}", f"http://127.0.0.1:{proxy}"
        close = {"Connection": "close"}  # new connections: the kernel spreads them
        async with (
            canary_process(path, admin_url, args=["--workers", "2"]),
            httpx.AsyncClient(timeout=10) as client,
        ):
            for i in range(40):
                r = await client.post(proxy_url + "/predict", json={"i": i}, headers=close)
                assert r.status_code == 200
            deadline = time.monotonic() + 15
            while True:
                one = (await client.get(admin_url + "/api/v1/rollouts/m")).json()
                if "WAIT" in _actions(one):
                    break
                assert time.monotonic() < deadline, one
                await asyncio.sleep(0.1)
            assert one["status"].startswith("waiting for confirm-promotion"), one["status"]
            assert one["phase"] == "running"

            code, out, err = await _cli(
                capsys, "approve", "m", "--reason", "go", "--admin", admin_url
            )
            assert code == 0, err
            assert out.startswith("m: approved confirm-promotion at step 1/1")
            deadline = time.monotonic() + 10
            while (one := (await client.get(admin_url + "/api/v1/rollouts/m")).json())[
                "phase"
            ] != "promoted":
                assert time.monotonic() < deadline, one
                await asyncio.sleep(0.1)
            assert _actions(one) == ["START", "WAIT", "APPROVE", "PROMOTE"]
            await asyncio.sleep(0.6)  # every worker serves the stored weights within a flush
            arms = set()
            for i in range(30):
                r = await client.post(proxy_url + "/predict", json={"i": i}, headers=close)
                arms.add(r.headers["X-Canary-Arm"])
            assert arms == {"candidate"}


def test_an_approval_opens_only_the_gate_it_was_given_for() -> None:
    """An approval of confirm-advance at a step does not open a confirm-promotion that the
    policy asks for at the same step (on_inconclusive: promote at max_duration, say)."""
    cfg = load_config_text(
        """
rollouts:
  - name: m
    production: {endpoints: ["http://127.0.0.1:1"]}
    candidate: {endpoints: ["http://127.0.0.1:2"]}
    steps: [{weight: 5}, {weight: 50}]
    analysis: {on_inconclusive: promote}
    webhooks:
      - {on: [confirm-advance, confirm-promotion]}
"""
    ).rollouts[0]
    from canary.decision import Action, RolloutState

    g = gates.Gates(None, Metrics())
    state = RolloutState.start(cfg, 0.0).with_(
        approved_step=0, approved_gate="confirm-advance", approved_reason="ok"
    )
    promote = g.check(cfg, state, Action.PROMOTE, {}, 1.0)
    assert promote is not None and not promote.open and "confirm-promotion" in promote.reason
    advance = g.check(cfg, state, Action.ADVANCE, {}, 2.0)
    assert advance is not None and advance.open and advance.approved
    assert gates.gate_event(cfg, state) == "confirm-advance"


async def test_a_gate_is_asked_while_notifications_hang_on_every_connection() -> None:
    """Notifications to a hook that never answers hold every connection of the sender's
    pool (and are retried); a gate's question has its own connections and is answered."""

    async def hang(request: web.Request, n: int) -> web.StreamResponse:
        await request.app[RELEASE].wait()
        return web.Response(status=200)

    async def yes(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=200, text="go")

    async with gate_server(hang) as dead, gate_server(yes) as gate:
        notify = WebhookConfig.model_validate({"on": ["advance"], "url": dead.url, "timeout": 30})
        hook = WebhookConfig.model_validate({"on": ["confirm-advance"], "url": gate.url})
        sender = WebhookSender(concurrency=2)
        await sender.start()
        try:
            assert sender.fire("m", "advance", [notify, notify, notify], {}) == 3
            async with asyncio.timeout(5):
                while len(dead.asked) < 2:  # both connections of the pool are held
                    await asyncio.sleep(0.01)
            answer = await sender.ask("m", "confirm-advance", hook, {})
        finally:
            await sender.close(timeout=0.1)
    assert answer.open, answer.reason
    assert len(gate.asked) == 1
