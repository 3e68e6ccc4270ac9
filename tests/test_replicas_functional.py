"""Two canary replicas on one real Redis: one leads, both serve the stored weights, and when the
leader is SIGKILLed the other takes over from the persisted state within the lease.

Real processes (``canary run``), a real ``redis-server`` (tests/redis_harness.py), fake model
servers, real HTTP clients; traffic only on loopback, bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from loadtest.crash_loss import canary_process
from loadtest.fake_model import FakeModelConfig, running_fake_model
from tests.redis_harness import RedisServer, free_port, running_redis

INTERVAL = 1.0  # analysis interval: the lease's TTL (runtime.lease_ttl) and the hand-over bound


def _config(proxy: int, admin: int, redis_url: str, p: str, c: str) -> dict[str, Any]:
    return {
        "proxy": {"listen": f"127.0.0.1:{proxy}"},
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "state": {"backend": "redis", "url": redis_url},
        "rollouts": [
            {
                "name": "m",
                "production": {"endpoints": [p]},
                "candidate": {"endpoints": [c]},
                "steps": [
                    {"weight": 20, "min_requests": 40},
                    {"weight": 50, "min_requests": 10**9},
                ],
                "analysis": {"interval": f"{INTERVAL}s", "burn_in": 40, "metrics": []},
            }
        ],
    }


@contextlib.asynccontextmanager
async def _two_replicas(
    tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[tuple[subprocess.Popen[bytes], list[str], list[str], httpx.AsyncClient]]:
    """Fake models and two canary replicas on ``redis_server``, the first started first (it
    leads): (the first's process, admin URLs, proxy URLs, a client)."""
    fast: dict[str, Any] = {"latency": "fixed", "latency_median": 0.001}
    async with running_fake_model(FakeModelConfig(model="p", **fast)) as p, \
            running_fake_model(FakeModelConfig(model="c", seed=1, **fast)) as c:  # fmt: skip
        ports = [(free_port(), free_port()) for _ in range(2)]
        admins = [f"http://127.0.0.1:{a}" for _, a in ports]
        proxies = [f"http://127.0.0.1:{p}" for p, _ in ports]
        for i, (proxy, admin) in enumerate(ports):
            config = _config(proxy, admin, redis_server.url, p, c)
            (tmp_path / f"r{i}.yaml").write_text(yaml.safe_dump(config))
        async with canary_process(tmp_path / "r0.yaml", admins[0], tmp_path / "a.log") as first, \
                canary_process(tmp_path / "r1.yaml", admins[1], tmp_path / "b.log"), \
                httpx.AsyncClient(timeout=5.0) as client:  # fmt: skip
            yield first, admins, proxies, client


async def test_two_replicas_one_leader_and_a_hand_over_on_sigkill(
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    async with _two_replicas(tmp_path, redis_server) as (first, admins, proxies, client):
        leaders = [(await client.get(a + "/api/v1/leader")).json() for a in admins]
        assert leaders[0]["shared"] and leaders[0]["leading"], leaders
        assert not leaders[1]["leading"] and leaders[1]["leader"] == leaders[0]["holder"]

        # Traffic through both replicas until both serve the second step.
        sent, deadline = 0, time.monotonic() + 30
        to_a: list[float] = []  # when each request to the leader's replica was answered
        while True:
            r = await client.post(proxies[sent % 2] + "/predict", json={"id": sent})
            assert r.status_code == 200, r.text
            if sent % 2 == 0:
                to_a.append(time.monotonic())
            sent += 1
            if sent % 40 == 0:
                views = [(await client.get(a + "/api/v1/rollouts/m")).json() for a in admins]
                if all(v["step_index"] == 1 for v in views):
                    break
            assert time.monotonic() < deadline, "the replicas did not both reach step 2"
            await asyncio.sleep(0.005)
        follower = views[1]
        assert follower["weights"]["candidate"] == 50.0
        assert "following" in follower["status"]

        # SIGKILL the leader; the survivor keeps answering and takes over.
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed = time.monotonic()
        took_over = None
        errors = 0
        while time.monotonic() - killed < 4 * INTERVAL:
            r = await client.post(proxies[1] + "/predict", json={"id": sent})
            sent += 1
            errors += r.status_code != 200
            if took_over is None:
                lead = (await client.get(admins[1] + "/api/v1/leader")).json()
                if lead["leading"]:
                    took_over = time.monotonic() - killed
            await asyncio.sleep(0.01)
        assert errors == 0  # users see no errors from the survivor
        # The lease runs out within its TTL of the last renewal; the survivor tries every
        # flush interval (0.25 s): within two analysis intervals.
        assert took_over is not None and took_over <= 2 * INTERVAL, took_over
        view = (await client.get(admins[1] + "/api/v1/rollouts/m")).json()
        assert view["step_index"] == 1 and view["phase"] == "running"
        # Nothing decided twice, nothing lost: the log the new leader resumed from.
        assert [d["action"] for d in view["decisions"]] == ["START", "ADVANCE"]
        await asyncio.sleep(2 * INTERVAL)  # the survivor's samples reach its totals
        view = (await client.get(admins[1] + "/api/v1/rollouts/m")).json()
        counted = view["samples"]["production"] + view["samples"]["candidate"]
        # At most the killed replica's last unflushed flush interval (0.25 s) is lost.
        recent = sum(1 for t in to_a if killed - t <= 1.0)
        assert 0 <= sent - counted <= recent * 0.5 + 5, (sent, counted, recent)
        print(f"hand-over {took_over:.2f} s, lost {sent - counted} of {sent} ({recent}/s)")


@contextlib.asynccontextmanager
async def _one_replica(
    tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[tuple[str, str, httpx.AsyncClient]]:
    """Fake models, one canary on ``redis_server`` and a client: (admin URL, proxy URL, client)."""
    fast: dict[str, Any] = {"latency": "fixed", "latency_median": 0.001}
    async with running_fake_model(FakeModelConfig(model="p", **fast)) as p, \
            running_fake_model(FakeModelConfig(model="c", seed=1, **fast)) as c:  # fmt: skip
        proxy_port, admin_port = free_port(), free_port()
        path = tmp_path / "rollout.yaml"
        path.write_text(yaml.safe_dump(_config(proxy_port, admin_port, redis_server.url, p, c)))
        admin, proxy = f"http://127.0.0.1:{admin_port}", f"http://127.0.0.1:{proxy_port}"
        async with canary_process(path, admin, tmp_path / "canary.log"), \
                httpx.AsyncClient(timeout=5.0) as client:  # fmt: skip
            yield admin, proxy, client


async def test_redis_restarted_empty_holds_instead_of_starting_afresh(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with _one_replica(tmp_path, redis_server) as (admin, proxy, client):
        sent, deadline = 0, time.monotonic() + 30
        while (await client.get(admin + "/api/v1/rollouts/m")).json()["step_index"] < 1:
            for _ in range(20):
                assert (await client.post(proxy + "/predict", json={"n": sent})).is_success
                sent += 1
            assert time.monotonic() < deadline, "no advance in 30 s"
        redis_server.restart()  # back on the same port, with nothing in it
        deadline = time.monotonic() + 10
        while (ready := await client.get(admin + "/readyz")).status_code == 200:
            assert time.monotonic() < deadline, "/readyz never said the store lost its data"
            await asyncio.sleep(0.1)
        assert ready.status_code == 503 and "lost its data" in ready.text
        metrics = (await client.get(admin + "/metrics")).text
        assert "canary_store_up 0.0" in metrics
        for _ in range(20):  # the proxy keeps serving, with the weights it had
            assert (await client.post(proxy + "/predict", json={"n": sent})).is_success
        await asyncio.sleep(3 * INTERVAL)
        view = (await client.get(admin + "/api/v1/rollouts/m")).json()
        assert view["step_index"] == 1 and view["weights"]["candidate"] == 50.0
        assert [d["action"] for d in view["decisions"]] == ["START", "ADVANCE"]
    assert (
        "rollout m: started" not in (tmp_path / "canary.log").read_text().split("lost its data")[-1]
    )  # never started afresh after the loss


async def test_a_redis_outage_holds_keeps_serving_and_loses_and_doubles_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with _one_replica(tmp_path, redis_server) as (admin, proxy, client):
        sent = 0

        async def traffic(n: int) -> None:
            nonlocal sent
            for _ in range(n):
                r = await client.post(proxy + "/predict", json={"n": sent})
                assert r.status_code == 200, r.text  # users never see the outage
                sent += 1
                await asyncio.sleep(0.005)

        await traffic(100)
        redis_server.pause()  # SIGSTOP: every call hangs until its 3 s timeout
        try:
            deadline = time.monotonic() + 10
            while (ready := await client.get(admin + "/readyz")).status_code == 200:
                await traffic(10)
                assert time.monotonic() < deadline, "/readyz never said the store is down"
            assert "state store unavailable" in ready.text
            assert "canary_store_up 0.0" in (await client.get(admin + "/metrics")).text
            await traffic(100)
        finally:
            redis_server.resume()
        deadline = time.monotonic() + 15
        while (await client.get(admin + "/readyz")).status_code != 200:
            assert time.monotonic() < deadline, "not ready again 15 s after the outage"
            await asyncio.sleep(0.1)
        await traffic(50)
        await asyncio.sleep(2 * INTERVAL)  # the last samples reach the store and the view
        view = (await client.get(admin + "/api/v1/rollouts/m")).json()
        counted = view["samples"]["production"] + view["samples"]["candidate"]
        assert counted == sent, (counted, sent)  # none lost, none merged twice


async def test_a_leader_paused_past_its_lease_does_not_act_and_forwards_commands(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with _two_replicas(tmp_path, redis_server) as (first, admins, _, client):
        assert (await client.get(admins[0] + "/api/v1/leader")).json()["leading"]
        first.send_signal(signal.SIGSTOP)  # paused (a GC pause, a frozen VM) past its lease
        try:
            deadline = time.monotonic() + 5 * INTERVAL
            while not (await client.get(admins[1] + "/api/v1/leader")).json()["leading"]:
                assert time.monotonic() < deadline, "the other replica never took over"
                await asyncio.sleep(0.1)
            r = await client.post(admins[1] + "/api/v1/rollouts/m/pause", json={})
            assert r.status_code == 200, r.text
        finally:
            first.send_signal(signal.SIGCONT)
        await asyncio.sleep(3 * INTERVAL)  # the old leader runs again
        lead = [(await client.get(a + "/api/v1/leader")).json() for a in admins]
        assert not lead[0]["leading"] and lead[1]["leading"]
        assert lead[0]["leader"] == lead[1]["holder"]
        views = [(await client.get(a + "/api/v1/rollouts/m")).json() for a in admins]
        for view in views:  # both show the new leader's decision, and only it
            assert view["phase"] == "paused"
            assert [d["action"] for d in view["decisions"]] == ["START", "PAUSE"]
        # A command sent to the old leader (a follower now) is forwarded to the new one.
        r = await client.post(admins[0] + "/api/v1/rollouts/m/resume", json={"reason": "go"})
        assert r.status_code == 200, r.text
        assert r.headers["X-Canary-Leader"] == admins[1] and r.json()["phase"] == "running"
        await asyncio.sleep(0.5)  # the follower reads the new state at its next flush
        for a in admins:
            view = (await client.get(a + "/api/v1/rollouts/m")).json()
            assert [d["action"] for d in view["decisions"]] == ["START", "PAUSE", "RESUME"]


LONG = os.environ.get("CANARY_LONG_TESTS") == "1"
OUTAGE = 10.0  # seconds Redis stays stopped in the long form


@pytest.mark.skipif(not LONG, reason="long form: set CANARY_LONG_TESTS=1 to run it")
@pytest.mark.parametrize("how", ["pause", "restart"])
async def test_a_10s_redis_outage_under_traffic_through_both_replicas(
    tmp_path: Path, how: str
) -> None:
    """Redis stopped for 10 s (SIGSTOP, or a clean stop and a start on the same port with its
    append-only file) while both replicas serve: every request answered with the weights they
    had, /readyz 503 with the reason and canary_store_up 0 on both, no decision, ready again
    after, and every request counted once."""
    with running_redis(persistent=how == "restart") as server:
        async with _two_replicas(tmp_path, server) as (_, admins, proxies, client):
            sent, deadline = 0, time.monotonic() + 30
            while True:  # both replicas at the second step (50%) first
                r = await client.post(proxies[sent % 2] + "/predict", json={"id": sent})
                assert r.status_code == 200, r.text
                sent += 1
                if sent % 40 == 0:
                    views = [(await client.get(a + "/api/v1/rollouts/m")).json() for a in admins]
                    if all(v["step_index"] == 1 for v in views):
                        break
                assert time.monotonic() < deadline, "the replicas did not both reach step 2"
            before = [d["action"] for d in views[0]["decisions"]]
            assert before == ["START", "ADVANCE"]

            failed: list[str] = []
            during = 0
            outage = False
            stop = asyncio.Event()

            async def traffic(proxy: str) -> None:
                nonlocal sent, during
                while not stop.is_set():
                    try:
                        r = await client.post(proxy + "/predict", json={"id": sent})
                        if r.status_code != 200:
                            failed.append(f"{r.status_code} {r.text[:200]}")
                    except httpx.HTTPError as exc:
                        failed.append(repr(exc))
                    sent += 1
                    during += outage
                    await asyncio.sleep(0.01)

            tasks = [asyncio.create_task(traffic(p)) for p in proxies]
            try:
                await asyncio.sleep(1.0)
                outage = True
                down = time.monotonic()
                server.pause() if how == "pause" else server.shutdown()
                unready: list[float | None] = [None, None]
                while time.monotonic() - down < OUTAGE:
                    for i, a in enumerate(admins):
                        if unready[i] is None:
                            ready = await client.get(a + "/readyz")
                            metrics = (await client.get(a + "/metrics")).text
                            if ready.status_code == 503 and "canary_store_up 0.0" in metrics:
                                assert "state store unavailable" in ready.text, ready.text
                                unready[i] = time.monotonic() - down
                        view = (await client.get(a + "/api/v1/rollouts/m")).json()
                        assert view["weights"]["candidate"] == 50.0  # served as before
                    await asyncio.sleep(0.2)
                assert all(u is not None for u in unready), unready
                server.resume() if how == "pause" else server.start()
                outage = False
                up = time.monotonic()
                back: list[float | None] = [None, None]
                while not all(b is not None for b in back):
                    for i, a in enumerate(admins):
                        if back[i] is None and (await client.get(a + "/readyz")).status_code == 200:
                            back[i] = time.monotonic() - up
                    assert time.monotonic() - up < 15, f"not ready again 15 s after: {back}"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1.0)
            finally:
                stop.set()
                await asyncio.gather(*tasks)
            assert failed == [], failed[:5]
            deadline = time.monotonic() + 15 * INTERVAL
            while True:  # the last samples reach the store and both views
                views = [(await client.get(a + "/api/v1/rollouts/m")).json() for a in admins]
                counted = [v["samples"]["production"] + v["samples"]["candidate"] for v in views]
                assert all(c <= sent for c in counted), (counted, sent)  # nothing twice
                if all(c == sent for c in counted) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
            assert counted == [sent, sent], (counted, sent, during)  # none lost, none merged twice
            for view in views:  # the controllers held: no decision, the same step
                assert [d["action"] for d in view["decisions"]] == before
                assert view["step_index"] == 1 and view["phase"] == "running"
            print(
                f"\n{how}: {OUTAGE:g} s outage, {during} requests during it, {len(failed)} "
                f"errors, 503 after {max(u or 0 for u in unready):.2f} s, ready again after "
                f"{back[0]:.2f} / {back[1]:.2f} s, {sent} requests counted {counted}"
            )
