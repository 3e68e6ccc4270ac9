"""Operator commands over real loopback servers: promote one step (``advance``) or all the way,
and ``retry`` a rolled-back rollout with fresh samples, through the admin API and the CLI;
retried state surviving a restart (SQLite); a retry in shared mode (leader and follower)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from canary.cli import main
from canary.decision import Phase
from canary.errors import CommandRejected
from tests.conftest import Canary, fake_pair, rollout_config, running_canary
from tests.test_controller import Clock, _feed
from tests.test_controller_shared import _two

STEPS = [{"weight": 20}, {"weight": 60}, {"weight": 90}]


async def _traffic(client: httpx.AsyncClient, url: str, n: int) -> None:
    for i in range(n):
        r = await client.post(url + "/predict", json={"id": str(i)})
        assert r.status_code == 200


async def _rollout(client: httpx.AsyncClient, can: Canary) -> dict[str, Any]:
    r = await client.get(can.admin + "/api/v1/rollouts/m")
    assert r.status_code == 200
    data: dict[str, Any] = r.json()
    return data


async def _post(client: httpx.AsyncClient, can: Canary, action: str, **body: Any) -> httpx.Response:
    return await client.post(f"{can.admin}/api/v1/rollouts/m/{action}", json=body)


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    # the CLI is synchronous: run it off this loop, which serves the admin API
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- promote one step -----------------------------------------------------------------------


async def test_promote_moves_one_step_like_an_automatic_advance(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with fake_pair() as (p, c):
        async with running_canary(rollout_config([p], [c], steps=STEPS)) as can:
            async with httpx.AsyncClient() as client:
                await _traffic(client, can.url, 40)
                await can.samples()
                before = (await _rollout(client, can))["samples"]["candidate"]
                r = await _post(client, can, "advance", reason="dashboards look fine")
                assert r.status_code == 200
                answer = r.json()
                assert answer["action"] == "ADVANCE" and answer["phase"] == "running"
                assert (answer["step"], answer["steps"]) == (2, 3)
                assert answer["weights"] == {"production": 40.0, "candidate": 60.0}
                assert can.proxy.routes["m"].weights == (60.0, False)  # served at once
                one = await _rollout(client, can)
                assert one["step"] == 2 and one["weights"]["candidate"] == 60.0
                assert one["step_samples"] == 0  # a fresh step: its samples count from now
                assert one["step_elapsed"] < 5
                last = one["decisions"][-1]
                assert last["action"] == "ADVANCE" and last["manual"] is True
                assert "dashboards look fine" in last["reason"]
                assert "from step 1/3 to step 2/3 (weight 60%)" in last["reason"]
                assert last["samples"]["candidate"] == before
                assert (last["step"], last["weights"]["candidate"]) == (2, 60.0)

                # the CLI: `promote NAME` is the next step
                code, out, err = await _cli(
                    capsys, "promote", "m", "--reason", "still fine", "--admin", can.admin
                )
                assert (code, err) == (0, "")
                assert out == "m: advanced to step 3/3 weight 90% (phase running)\n"
                assert can.proxy.routes["m"].weights == (90.0, False)
                # from the last step, the next step is the promotion
                code, out, _ = await _cli(capsys, "promote", "m", "--admin", can.admin)
                assert (code, out) == (0, "m: promoted (phase promoted)\n")
                one = await _rollout(client, can)
                assert one["phase"] == "promoted" and one["weights"]["candidate"] == 100.0
                assert [d["action"] for d in one["decisions"]] == [
                    "START", "ADVANCE", "ADVANCE", "PROMOTE"
                ]  # fmt: skip
                assert "advanced past the last step 3/3" in one["decisions"][-1]["reason"]
                # nothing left to promote: a 409 naming the phase
                r = await _post(client, can, "advance")
                assert r.status_code == 409 and "already promoted" in r.json()["error"]
                code, _, err = await _cli(capsys, "promote", "m", "--admin", can.admin)
                assert code == 5 and "already promoted" in err


async def test_promote_full_goes_all_the_way(capsys: pytest.CaptureFixture[str]) -> None:
    async with fake_pair() as (p, c):
        async with running_canary(rollout_config([p], [c], steps=STEPS)) as can:
            code, out, err = await _cli(capsys, "promote", "m", "--full", "--admin", can.admin)
            assert (code, out, err) == (0, "m: promoted (phase promoted)\n", "")
            assert can.proxy.routes["m"].weights == (100.0, False)
            async with httpx.AsyncClient() as client:
                one = await _rollout(client, can)
                assert [d["action"] for d in one["decisions"]] == ["START", "PROMOTE"]


async def test_promote_from_a_shadow_step_starts_the_first_weighted_step(
    capsys: pytest.CaptureFixture[str],
) -> None:
    steps = [{"shadow": {"min_requests": 1000}}, {"weight": 10}]
    async with fake_pair() as (p, c):
        async with running_canary(rollout_config([p], [c], steps=steps)) as can:
            assert can.proxy.routes["m"].weights == (0.0, True)
            code, out, _ = await _cli(capsys, "promote", "m", "--admin", can.admin)
            assert (code, out) == (0, "m: advanced to step 2/2 weight 10% (phase running)\n")
            assert can.proxy.routes["m"].weights == (10.0, False)


async def test_a_paused_rollout_advances_and_stays_paused() -> None:
    async with fake_pair() as (p, c):
        async with running_canary(rollout_config([p], [c], steps=STEPS)) as can:
            async with httpx.AsyncClient() as client:
                assert (await _post(client, can, "pause")).status_code == 200
                r = await _post(client, can, "advance")
                assert r.status_code == 200 and r.json()["phase"] == "paused"
                assert r.json()["step"] == 2 and can.proxy.routes["m"].weights == (60.0, False)


async def test_rejections_are_409s_naming_the_phase() -> None:
    async with fake_pair() as (p, c):
        async with running_canary(rollout_config([p], [c], steps=STEPS)) as can:
            async with httpx.AsyncClient() as client:
                r = await _post(client, can, "retry")
                assert r.status_code == 409
                assert "is running; only a rolled-back rollout can be retried" in r.json()["error"]
                assert (await _post(client, can, "rollback")).status_code == 200
                for action in ("advance", "promote"):
                    r = await _post(client, can, action)
                    assert r.status_code == 409 and "is rolled_back" in r.json()["error"]
                    assert "retry it" in r.json()["error"]
                r = await client.post(can.admin + "/api/v1/rollouts/nope/retry", json={})
                assert r.status_code == 404 and "no rollout named 'nope'" in r.json()["error"]
                r = await _post(client, can, "explode")
                assert r.status_code == 404 and "advance" in r.json()["error"]
                assert "retry" in r.json()["error"]


# --- retry ----------------------------------------------------------------------------------


async def test_retry_after_a_rollback_starts_over_with_fresh_samples(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with fake_pair() as (p, c):
        async with running_canary(rollout_config([p], [c], steps=STEPS)) as can:
            async with httpx.AsyncClient() as client:
                assert (await _post(client, can, "advance")).status_code == 200
                await _traffic(client, can.url, 60)
                await can.samples()
                one = await _rollout(client, can)
                assert one["samples"]["production"] > 0 and one["samples"]["candidate"] > 0
                assert (await _post(client, can, "rollback")).status_code == 200
                await _traffic(client, can.url, 10)  # production only, before the retry
                assert can.proxy.routes["m"].weights == (0.0, False)

                code, out, err = await _cli(
                    capsys, "retry", "m", "--reason", "fixed the feature store", "--admin",
                    can.admin,
                )  # fmt: skip
                assert (code, err) == (0, "")
                assert out == (
                    "m: retried from step 1/3 weight 20% with fresh samples "
                    "(phase running, attempt 2)\n"
                )
                assert can.proxy.routes["m"].weights == (20.0, False)  # step 1's weights
                one = await _rollout(client, can)
                assert one["phase"] == "running" and one["step"] == 1
                assert one["samples"] == {"production": 0, "candidate": 0}
                assert one["elapsed"] < 5
                actions = [d["action"] for d in one["decisions"]]
                assert actions == ["START", "ADVANCE", "ROLLBACK", "RETRY"]
                retry = one["decisions"][-1]
                assert retry["manual"] and "fixed the feature store" in retry["reason"]
                assert "attempt 2" in retry["reason"]
                assert retry["samples"] == {"production": 0, "candidate": 0}
                assert retry["weights"] == {"production": 80.0, "candidate": 20.0}

                # the retried rollout counts only what comes after the retry
                await _traffic(client, can.url, 25)
                totals = await can.samples()
                assert totals.production.observed + totals.candidate.observed == 25
                # and runs again: it can be rolled back and retried once more
                assert (await _post(client, can, "rollback")).status_code == 200
                r = await _post(client, can, "retry")
                assert r.status_code == 200 and r.json()["attempt"] == 3
                assert (await can.samples()).production.observed == 0


async def test_a_retried_rollout_survives_a_restart(tmp_path: Path) -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config([p], [c], steps=STEPS)
        cfg["state"] = {"backend": "sqlite", "path": str(tmp_path / "state.db")}
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            await _traffic(client, can.url, 30)
            await can.samples()
            assert (await _post(client, can, "rollback")).status_code == 200
            assert (await _post(client, can, "retry")).status_code == 200
            await _traffic(client, can.url, 12)
            await can.samples()
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            one = await _rollout(client, can)
            assert one["phase"] == "running" and one["step"] == 1  # not the rolled-back one
            assert one["samples"]["production"] + one["samples"]["candidate"] == 12
            assert [d["action"] for d in one["decisions"]] == ["START", "ROLLBACK", "RETRY"]
            assert can.runtime.controller.state("m").attempt == 2
            assert can.proxy.routes["m"].weights == (20.0, False)


async def test_retry_in_shared_mode_the_leader_applies_and_followers_follow(
    tmp_path: Path,
) -> None:
    clock = Clock()
    a, b = await _two(tmp_path, clock)
    assert a.lead.leading and not b.lead.leading
    _feed(a.recorder, 200, 10, seed=1)
    _feed(b.recorder, 200, 10, seed=2)
    await b.ctl.tick()
    await a.ctl.tick()
    await a.ctl.command("m", "rollback")
    _feed(b.recorder, 50, 0, seed=3)  # the follower's samples of the rolled-back attempt
    await b.ctl.tick()
    with pytest.raises(CommandRejected, match="does not lead"):
        await b.ctl.command("m", "retry")  # the admin API forwards it to the leader
    answer = await a.ctl.command("m", "retry", "new feature flags")
    assert answer["action"] == "RETRY" and answer["attempt"] == 2
    assert a.ctl.state("m").phase is Phase.RUNNING and a.served == 10.0
    stored = await a.store.get_samples("m")
    assert stored is None or stored.production.observed + stored.candidate.observed == 0
    await b.ctl.tick()  # the follower serves and shows the new attempt
    assert b.ctl.state("m").attempt == 2 and b.served == 10.0
    assert [d["action"] for d in b.ctl.view("m").decisions] == ["START", "ROLLBACK", "RETRY"]
    _feed(b.recorder, 30, 10, seed=4)
    await b.ctl.tick()
    await a.ctl.tick()
    totals = a.ctl.totals("m")  # what the leader analyses: only the new attempt's samples
    assert totals.production.observed + totals.candidate.observed == 30
