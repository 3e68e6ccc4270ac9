"""The admin API over real loopback servers: rollout views, operator commands, token, reload,
gauges on /metrics, and the controller deciding live traffic by itself."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from canary.admin.views import rollout_summary
from canary.config import load_config, load_config_text
from canary.errors import CanaryError
from canary.runtime import Runtime
from tests.conftest import fake_pair, rollout_config, running_canary


async def _traffic(client: httpx.AsyncClient, url: str, n: int) -> list[int]:
    statuses = []
    for i in range(n):
        r = await client.post(url + "/predict", json={"id": str(i)})
        statuses.append(r.status_code)
    return statuses


async def test_views_commands_and_gauges() -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config(
            [p], [c], steps=[{"weight": 20}, {"weight": 50}],
            analysis={"metrics": [
                {"name": "latency_p95", "signal": "latency", "stat": "p95", "max_increase": "10%"},
            ]},
        )  # fmt: skip
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            await _traffic(client, can.url, 50)
            await can.runtime.controller.flush()
            await can.runtime.controller.evaluate(force=True)
            listing = (await client.get(can.admin + "/api/v1/rollouts")).json()["rollouts"]
            assert [r["name"] for r in listing] == ["m"]
            one = listing[0]
            assert one["phase"] == "running" and one["step"] == 1 and one["steps"] == 2
            assert one["step_index"] == 0  # step is 1-based (as the CLI shows it)
            assert one["weights"] == {"production": 80.0, "candidate": 20.0}
            assert one["samples"]["production"] + one["samples"]["candidate"] == 50
            detail = (await client.get(can.admin + "/api/v1/rollouts/m")).json()
            assert detail["metrics"][0]["name"] == "latency_p95"
            assert detail["metrics"][0]["verdict"] == "UNKNOWN"  # 100-sample burn-in
            assert [d["action"] for d in detail["decisions"]] == ["START"]
            assert (await client.get(can.admin + "/api/v1/rollouts/zzz")).status_code == 404

            r = await client.post(can.admin + "/api/v1/rollouts/m/pause", json={"reason": "lunch"})
            assert r.status_code == 200 and r.json()["phase"] == "paused"
            r = await client.post(can.admin + "/api/v1/rollouts/m/pause", json={})
            assert r.status_code == 409 and "already paused" in r.json()["error"]
            r = await client.post(can.admin + "/api/v1/rollouts/m/explode", json={})
            assert r.status_code == 404
            r = await client.post(
                can.admin + "/api/v1/rollouts/m/resume",
                content=b"{not json",
                headers={"Content-Type": "application/json"},
            )
            assert r.status_code == 400
            r = await client.post(can.admin + "/api/v1/rollouts/m/rollback", json={})
            assert r.status_code == 200 and r.json()["phase"] == "rolled_back"
            # the proxy acts on it at once: everyone goes to production
            arms = set()
            for i in range(20):
                resp = await client.post(can.url + "/predict", json={"id": str(i)})
                arms.add(resp.headers["X-Canary-Arm"])
            assert arms == {"production"}
            r = await client.post(can.admin + "/api/v1/rollouts/m/promote", json={})
            assert r.status_code == 409 and "new candidate" in r.json()["error"]

            text = (await client.get(can.admin + "/metrics")).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}

    def value(family: str, **labels: str) -> float:
        for s in fams[family].samples:
            if all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
        raise AssertionError(f"{family} {labels} not exported")

    assert value("canary_rollout_phase", rollout="m", phase="rolled_back") == 1.0
    assert value("canary_rollout_phase", rollout="m", phase="running") == 0.0
    assert value("canary_decisions", rollout="m", decision="ROLLBACK") == 1.0
    assert value("canary_decisions", rollout="m", decision="PAUSE") == 1.0
    assert value("canary_traffic_weight_ratio", rollout="m", arm="candidate") == 0.0
    assert value("canary_rollout_step", rollout="m") == 1.0
    assert value("canary_metric_verdict", rollout="m", metric="latency_p95") == 0.0
    assert value("canary_metric_interval_upper", rollout="m", metric="latency_p95") > 1.0
    assert value("canary_store_up") == 1.0


async def test_mutating_calls_need_the_bearer_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_CANARY_TOKEN", "s3cret-token")
    async with fake_pair() as (p, c):
        cfg = rollout_config([p], [c])
        cfg["admin"]["token_env"] = "TEST_CANARY_TOKEN"
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            url = can.admin + "/api/v1/rollouts/m/pause"
            assert (await client.post(url)).status_code == 401
            bad = {"Authorization": "Bearer s3cret-tokem"}
            assert (await client.post(url, headers=bad)).status_code == 401
            basic = {"Authorization": "Basic s3cret-token"}
            assert (await client.post(url, headers=basic)).status_code == 401
            assert (await client.post(can.admin + "/api/v1/reload")).status_code == 401
            # reads stay open (loopback by default)
            assert (await client.get(can.admin + "/api/v1/rollouts/m")).status_code == 200
            good = {"Authorization": "Bearer s3cret-token"}
            r = await client.post(url, headers=good, json={})
            assert r.status_code == 200 and r.json()["phase"] == "paused"


async def test_a_token_env_that_is_not_set_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TEST_CANARY_TOKEN", raising=False)
    cfg = rollout_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"])
    cfg["admin"]["token_env"] = "TEST_CANARY_TOKEN"
    with pytest.raises(CanaryError, match=r"TEST_CANARY_TOKEN.*not set"):
        async with running_canary(cfg):
            pass


async def test_reload_applies_a_good_file_and_rejects_a_bad_one(tmp_path: Path) -> None:
    async with fake_pair() as (p, c):
        path = tmp_path / "rollout.yaml"
        cfg = rollout_config([p], [c], steps=[{"weight": 10}])
        path.write_text(yaml.safe_dump(cfg))
        async with (
            running_canary(load_config(path), path=path) as can,
            httpx.AsyncClient() as client,
        ):
            cfg["rollouts"][0]["steps"] = [{"weight": 30}]
            cfg["rollouts"][0]["candidate"]["endpoints"] = [c + "/"]  # a new candidate
            path.write_text(yaml.safe_dump(cfg))
            r = await client.post(can.admin + "/api/v1/reload", json={})
            assert r.status_code == 200 and r.json() == {"reloaded": True, "rollouts": ["m"]}
            one = (await client.get(can.admin + "/api/v1/rollouts/m")).json()
            assert one["weights"]["candidate"] == 30.0

            path.write_text("rollouts:\n  - name: m\n    steps: [{weight: 500}]\n    bogus: 1\n")
            r = await client.post(can.admin + "/api/v1/reload", json={})
            assert r.status_code == 400
            body = r.json()
            assert "running one stays" in body["error"]
            paths = {i["path"] for i in body["issues"]}
            assert any("bogus" in x for x in paths) and all("line" in i for i in body["issues"])
            # still serving the old config
            assert (await client.post(can.url + "/predict", json={"id": "1"})).status_code == 200
            one = (await client.get(can.admin + "/api/v1/rollouts/m")).json()
            assert one["weights"]["candidate"] == 30.0


async def test_the_controller_promotes_an_identical_candidate_on_live_traffic() -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config(
            [p], [c],
            steps=[{"weight": 20, "min_requests": 30}, {"weight": 50}],
            analysis={"interval": "100ms", "burn_in": 30, "metrics": []},
        )  # fmt: skip
        async with running_canary(cfg, controller=True) as can, httpx.AsyncClient() as client:
            deadline = time.monotonic() + 30
            statuses: list[int] = []
            while time.monotonic() < deadline:
                statuses += await _traffic(client, can.url, 20)
                summary = rollout_summary(can.runtime.controller.view("m"))
                if summary["phase"] == "promoted":
                    break
            detail = (await client.get(can.admin + "/api/v1/rollouts/m")).json()
            arms = set()
            for i in range(10):
                resp = await client.post(can.url + "/predict", json={"id": str(i)})
                arms.add(resp.headers["X-Canary-Arm"])
    assert detail["phase"] == "promoted", detail["status"]
    assert [d["action"] for d in detail["decisions"]] == ["START", "ADVANCE", "PROMOTE"]
    assert set(statuses) == {200}
    assert arms == {"candidate"}


async def test_runtime_refuses_an_unopenable_state_file(tmp_path: Path) -> None:
    cfg = rollout_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"])
    cfg["state"] = {"backend": "sqlite", "path": str(tmp_path / "missing-dir" / "state.db")}
    rt = Runtime(load_config_text(yaml.safe_dump(cfg)))
    with pytest.raises(CanaryError, match="missing-dir"):
        await rt.start()
    await asyncio.sleep(0)


async def test_cli_against_the_real_admin_api(capsys: pytest.CaptureFixture[str]) -> None:
    from canary.cli import main

    async with fake_pair() as (p, c):
        cfg = rollout_config([p], [c], steps=[{"weight": 20}, {"weight": 50}])
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            await _traffic(client, can.url, 30)
            await can.runtime.controller.flush()
            await can.runtime.controller.evaluate(force=True)
            # the CLI is synchronous: run it off this loop, which serves the admin API
            code = await asyncio.to_thread(main, ["status", "--admin", can.admin])
            out = capsys.readouterr().out
            assert code == 0 and "m" in out and "running" in out and "1/2" in out
            code = await asyncio.to_thread(main, ["status", "m", "--admin", can.admin])
            assert code == 0 and "START" in capsys.readouterr().out
            code = await asyncio.to_thread(
                main, ["rollback", "m", "--reason", "bad canary", "--admin", can.admin]
            )
            assert code == 0 and "rolled_back" in capsys.readouterr().out
            assert rollout_summary(can.runtime.controller.view("m"))["phase"] == "rolled_back"
            assert (
                "bad canary"
                in rollout_summary(can.runtime.controller.view("m"))["last_decision"]["reason"]
            )
            code = await asyncio.to_thread(main, ["promote", "m", "--admin", can.admin])
            assert code == 5 and "new candidate" in capsys.readouterr().err
