"""``canary run --workers N``: N worker processes on one proxy port (SO_REUSEPORT) under a
supervisor that owns the admin port, on the default SQLite store (and on Redis).

Real processes, fake model servers, real HTTP clients on loopback; every request on a new
connection (``Connection: close``) so that the kernel spreads them over the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from canary.supervisor import merge_metrics
from canary.workers import WorkerSpec, parse_workers
from loadtest.crash_loss import canary_process
from loadtest.fake_model import FakeModelConfig, running_fake_model
from tests.redis_harness import RedisServer, free_port

INTERVAL = 1.0  # analysis interval (and lease TTL)
FLUSH = 0.25  # seconds between a worker's flushes to the store
CLOSE = {"Connection": "close"}


def _config(proxy: int, admin: int, state: dict[str, Any], p: str, c: str) -> dict[str, Any]:
    return {
        "proxy": {"listen": f"127.0.0.1:{proxy}"},
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "state": state,
        "rollouts": [
            {
                "name": "m",
                "production": {"endpoints": [p]},
                "candidate": {"endpoints": [c]},
                "routing": {"sticky": {"header": "X-User"}},
                "steps": [{"weight": 50, "min_requests": 10**9}],
                "analysis": {"interval": f"{INTERVAL}s", "burn_in": 10**6, "metrics": []},
            }
        ],
    }


class Workers:
    """A running ``canary run --workers N`` and its URLs."""

    def __init__(self, proc: subprocess.Popen[bytes], proxy: str, admin: str, path: Path):
        self.proc, self.proxy, self.admin, self.path = proc, proxy, admin, path

    async def health(self, client: httpx.AsyncClient) -> dict[str, Any]:
        data: dict[str, Any] = (await client.get(self.admin + "/healthz")).json()
        return data

    async def per_worker(self, client: httpx.AsyncClient) -> dict[tuple[str, str], float]:
        """canary_requests_total of rollout m by (worker, arm)."""
        text = (await client.get(self.admin + "/metrics")).text
        out: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            if family.name != "canary_requests":
                continue
            for s in family.samples:
                if s.name == "canary_requests_total" and s.labels.get("rollout") == "m":
                    key = (s.labels["worker"], s.labels["arm"])
                    out[key] = out.get(key, 0.0) + s.value
        return out


@contextlib.asynccontextmanager
async def _workers(
    tmp_path: Path, n: int = 2, state: dict[str, Any] | None = None, token_env: str | None = None
) -> AsyncIterator[Workers]:
    fast: dict[str, Any] = {"latency": "fixed", "latency_median": 0.001}
    async with running_fake_model(FakeModelConfig(model="p", **fast)) as p, \
            running_fake_model(FakeModelConfig(model="c", seed=1, **fast)) as c:  # fmt: skip
        proxy, admin = free_port(), free_port()
        state = state or {"backend": "sqlite", "path": str(tmp_path / "state.db")}
        path = tmp_path / "rollout.yaml"
        config = _config(proxy, admin, state, p, c)
        if token_env is not None:
            config["admin"]["token_env"] = token_env
        path.write_text(yaml.safe_dump(config))
        admin_url = f"http://127.0.0.1:{admin}"
        async with canary_process(path, admin_url, args=["--workers", str(n)]) as proc:
            async with httpx.AsyncClient(timeout=10) as client:
                await _all_ready(client, admin_url, n)
            yield Workers(proc, f"http://127.0.0.1:{proxy}", admin_url, path)


async def _all_ready(client: httpx.AsyncClient, admin: str, n: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        r = await client.get(admin + "/readyz")
        if r.status_code == 200 and r.json()["ready"] == n:
            return
        assert time.monotonic() < deadline, r.text
        await asyncio.sleep(0.05)


async def _send(
    client: httpx.AsyncClient, proxy: str, n: int, user: str | None = None
) -> list[str]:
    arms = []
    for i in range(n):
        headers = {**CLOSE, **({"X-User": user} if user else {})}
        r = await client.post(proxy + "/predict", json={"i": i}, headers=headers)
        assert r.status_code == 200, r.text
        arms.append(r.headers["X-Canary-Arm"])
    return arms


def _pid_gone(pid: int, *, zombie: bool = False) -> bool:
    """Reaped (by the supervisor), not only a zombie: a zombie's other threads may still hold
    its listening socket for a few milliseconds while they exit. ``zombie``: a zombie counts
    (an orphan's new parent, this container's init, may never reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    if zombie:
        with contextlib.suppress(OSError):
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    return False


async def _wait_gone(pids: list[int], within: float, *, zombie: bool = False) -> float:
    start = time.monotonic()
    while not all(_pid_gone(p, zombie=zombie) for p in pids):
        assert time.monotonic() - start < within, f"processes {pids} still run"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_workers_share_the_port_the_rollout_and_its_decisions(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Both workers serve the one port; a user gets the same arm from either; exactly one
    worker leads; an operator command through the supervisor reaches every worker within a
    flush interval; a reload through the supervisor reaches every worker."""
    state = None
    if backend == "redis":
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        state = {"backend": "redis", "url": redis_server.url}
    async with _workers(tmp_path, state=state) as w, httpx.AsyncClient(timeout=10) as client:
        # Sticky users: every request on a new connection, so both workers answer each user.
        for user in (f"user-{i}" for i in range(12)):
            arms = await _send(client, w.proxy, 12, user)
            assert len(set(arms)) == 1, (user, arms)
        counts = await w.per_worker(client)
        served = {wk for (wk, _), n in counts.items() if n > 0}
        assert served == {"1", "2"}, counts  # the kernel spread the connections

        leaders = (await client.get(w.admin + "/api/v1/leader")).json()
        assert leaders["shared"] is True and leaders["leader"]
        view = (await client.get(w.admin + "/api/v1/rollouts/m")).json()
        assert [d["action"] for d in view["decisions"]] == ["START"]

        r = await client.post(
            w.admin + "/api/v1/rollouts/m/rollback", json={"reason": "test"}, headers=CLOSE
        )
        assert r.status_code == 200, r.text
        await asyncio.sleep(2 * FLUSH)  # every worker serves the stored weights
        before = await w.per_worker(client)
        arms = await _send(client, w.proxy, 120)
        after = await w.per_worker(client)
        assert set(arms) == {"production"}
        for wk in ("1", "2"):
            grew = after.get((wk, "production"), 0) - before.get((wk, "production"), 0)
            assert grew > 0, (wk, before, after)  # both workers served after the rollback
        view = (await client.get(w.admin + "/api/v1/rollouts/m")).json()
        assert [d["action"] for d in view["decisions"]] == ["START", "ROLLBACK"]

        # A reload through the supervisor reaches every worker: a second rollout appears in
        # the metrics of both.
        config = yaml.safe_load(w.path.read_text())
        second = {**config["rollouts"][0], "name": "n", "match": {"host": "n.example"}}
        config["rollouts"].append(second)
        w.path.write_text(yaml.safe_dump(config))
        r = await client.post(w.admin + "/api/v1/reload", json={})
        assert r.status_code == 200, r.text
        assert r.json()["rollouts"] == ["m", "n"]
        text = (await client.get(w.admin + "/metrics")).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        weights = [
            s
            for s in families["canary_traffic_weight_ratio"].samples
            if s.labels.get("rollout") == "n"
        ]
        assert {s.labels["worker"] for s in weights} == {"1", "2"}


async def test_sigkill_of_a_worker_under_load(tmp_path: Path) -> None:
    """The other worker keeps serving (no error once the killed one is gone), the supervisor
    restarts it, and the samples lost are at most the killed worker's last flush interval."""
    async with _workers(tmp_path) as w, httpx.AsyncClient(timeout=10) as client:
        health = await w.health(client)
        victim = health["processes"][1]["pid"]
        sent = errors_before_gone = errors_after_gone = 0
        stop = asyncio.Event()
        gone_at: list[float] = []
        times: list[float] = []
        after: list[str] = []

        async def load() -> None:
            nonlocal sent, errors_before_gone, errors_after_gone
            async with httpx.AsyncClient(timeout=10) as c:
                while not stop.is_set():
                    began = time.monotonic()
                    try:
                        r = await c.post(w.proxy + "/predict", json={}, headers=CLOSE)
                        ok = r.status_code == 200
                        what = f"{r.status_code} {r.text[:200]}"
                    except httpx.HTTPError as exc:
                        ok = False
                        what = repr(exc)
                    if ok:
                        sent += 1
                        times.append(began)
                    elif gone_at and began > gone_at[0]:
                        errors_after_gone += 1
                        after.append(f"{began - gone_at[0]:.3f}s after: {what}")
                    else:
                        errors_before_gone += 1

        tasks = [asyncio.create_task(load()) for _ in range(4)]
        await asyncio.sleep(1.5)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        await _wait_gone([victim], 5)
        gone_at.append(time.monotonic())
        # Restarted: a new pid in the slot, ready again.
        deadline = time.monotonic() + 30
        while True:
            health = await w.health(client)
            slot = health["processes"][1]
            if slot["pid"] not in (None, victim):
                break
            assert time.monotonic() < deadline, health
            await asyncio.sleep(0.05)
        assert slot["restarts"] == 1 and slot["last_exit"] == "killed by SIGKILL"
        await _all_ready(client, w.admin, 2)
        restarted = time.monotonic() - killed
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks)
        assert errors_after_gone == 0, after  # users see no errors from the survivors
        assert errors_before_gone <= 4  # at most the requests in flight at the kill
        await asyncio.sleep(2 * INTERVAL)  # the last samples reach the store and the view
        view = (await client.get(w.admin + "/api/v1/rollouts/m")).json()
        counted = view["samples"]["production"] + view["samples"]["candidate"]
        recent = sum(1 for t in times if killed - 2 * FLUSH <= t <= killed)
        lost = sent - counted
        # At most the killed worker's unflushed flush interval (its share is below the rate
        # of the last two flush intervals of both).
        assert 0 <= lost <= recent + 4, (sent, counted, recent)
        metrics = (await client.get(w.admin + "/metrics")).text
        assert 'canary_worker_restarts_total{worker="2"} 1.0' in metrics
        print(
            f"worker SIGKILL: restarted and ready in {restarted:.2f} s, lost {lost} of {sent} "
            f"samples ({recent} requests in the last {2 * FLUSH:g} s), "
            f"{errors_before_gone} in-flight errors"
        )


async def test_a_clean_stop_loses_nothing_and_stops_every_worker(tmp_path: Path) -> None:
    """SIGTERM: every worker drains and flushes, the supervisor exits 0; a single process on
    the same file afterwards counts every request sent."""
    async with _workers(tmp_path) as w, httpx.AsyncClient(timeout=10) as client:
        pids = [p["pid"] for p in (await w.health(client))["processes"]]
        await _send(client, w.proxy, 150)
        w.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(w.proc.wait, 30) == 0
        await _wait_gone(pids, 5)
        # The port is free again, and the file has every sample.
        single = tmp_path / "single.yaml"
        config = yaml.safe_load(w.path.read_text())
        single.write_text(yaml.safe_dump(config))
        async with canary_process(single, w.admin, tmp_path / "single.log"):
            view = (await client.get(w.admin + "/api/v1/rollouts/m")).json()
            assert view["samples"]["production"] + view["samples"]["candidate"] == 150
            assert [d["action"] for d in view["decisions"]] == ["START"]


async def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    async with _workers(tmp_path) as w, httpx.AsyncClient(timeout=10) as client:
        pids = [p["pid"] for p in (await w.health(client))["processes"]]
        w.proc.send_signal(signal.SIGKILL)
        w.proc.wait(10)
        took = await _wait_gone(pids, 10, zombie=True)
        assert took < 5  # they check every second, then drain


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "canary", *args], capture_output=True, text=True, timeout=timeout
    )


def test_workers_refuse_what_they_cannot_share(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    config = _config(free_port(), free_port(), {"backend": "memory"}, "http://a", "http://b")
    path.write_text(yaml.safe_dump(config))
    done = _run("run", "-c", str(path), "--workers", "2")
    assert done.returncode == 1
    assert "state.backend memory cannot be shared" in done.stderr
    for bad in ("0", "-1", "65", "two", ""):
        done = _run("run", "-c", str(path), "--workers", bad)
        assert done.returncode == 2 and "--workers" in done.stderr, (bad, done.stderr)


def test_a_taken_proxy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:  # listening, without SO_REUSEPORT
        port = taken.getsockname()[1]
        path = tmp_path / "r.yaml"
        state = {"backend": "sqlite", "path": str(tmp_path / "s.db")}
        path.write_text(
            yaml.safe_dump(_config(port, free_port(), state, "http://a:1", "http://b:1"))
        )
        done = _run("run", "-c", str(path), "--workers", "2")
    assert done.returncode == 1
    assert "cannot bind the proxy port" in done.stderr, done.stderr


async def test_the_token_and_the_origin_are_checked_behind_the_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor passes the caller's headers on: the worker refuses a call without the
    token (401) and a cross-origin one (403), and accepts the token."""
    monkeypatch.setenv("WORKERS_TEST_TOKEN", "s3cret")
    async with _workers(tmp_path, token_env="WORKERS_TEST_TOKEN") as w, \
            httpx.AsyncClient(timeout=10) as client:  # fmt: skip
        pause = w.admin + "/api/v1/rollouts/m/pause"
        r = await client.post(pause, json={})
        assert r.status_code == 401, r.text
        auth = {"Authorization": "Bearer s3cret"}
        r = await client.post(pause, json={}, headers={**auth, "Origin": "http://evil.example"})
        assert r.status_code == 403, r.text
        r = await client.post(pause, json={}, headers={**auth, "Origin": w.admin})
        assert r.status_code == 200, r.text
        assert r.json()["phase"] == "paused"
        # A follower worker forwards to the leader the address it signed with the token.
        leader = (await client.get(w.admin + "/api/v1/leader")).json()["leader"]
        assert "#" in leader  # NAME@URL#signature
        processes = (await w.health(client))["processes"]
        follower = next(p["admin"] for p in processes if p["admin"] not in leader)
        r = await client.post(follower + "/api/v1/rollouts/m/resume", json={}, headers=auth)
        assert r.status_code == 200, r.text
        assert r.headers["X-Canary-Leader"] in leader and r.json()["phase"] == "running"


def test_a_missing_token_is_refused_before_any_worker_starts(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    state = {"backend": "sqlite", "path": str(tmp_path / "s.db")}
    config = _config(free_port(), free_port(), state, "http://a:1", "http://b:1")
    config["admin"]["token_env"] = "WORKERS_TEST_UNSET_TOKEN"
    path.write_text(yaml.safe_dump(config))
    done = _run("run", "-c", str(path), "--workers", "2")
    assert done.returncode == 1
    assert "WORKERS_TEST_UNSET_TOKEN" in done.stderr and "started (pid" not in done.stderr


def test_parse_workers() -> None:
    assert parse_workers("3") == 3
    assert parse_workers("auto") == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="1 to 64"):
        parse_workers("0")


def test_worker_spec_round_trips_and_refuses_garbage() -> None:
    spec = WorkerSpec(2, 3, 8080, "/tmp/x", 1)
    assert WorkerSpec.from_env({"CANARY_WORKER": spec.to_env()}) == spec
    assert WorkerSpec.from_env({}) is None
    from canary.errors import CanaryError

    for bad in ("{", '{"index": 4, "count": 3, "proxy_port": 1, "run_dir": "", "parent": 1}'):
        with pytest.raises(CanaryError, match="CANARY_WORKER"):
            WorkerSpec.from_env({"CANARY_WORKER": bad})


def test_merge_metrics_labels_every_sample_with_its_worker() -> None:
    a = (
        '# HELP x_total X.\n# TYPE x_total counter\nx_total{arm="p"} 3.0\n'
        '# HELP h H.\n# TYPE h histogram\nh_bucket{le="1.0"} 1.0\nh_bucket{le="+Inf"} 2.0\n'
        "h_sum 1.5\nh_count 2.0\n"
    )
    b = '# HELP x_total X.\n# TYPE x_total counter\nx_total{arm="p"} 4.0\n'
    text = merge_metrics([("1", a), ("2", b)], []).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    xs = {(s.labels["worker"], s.labels["arm"]): s.value for s in families["x"].samples}
    assert xs == {("1", "p"): 3.0, ("2", "p"): 4.0}
    assert families["h"].type == "histogram"
    assert {s.labels["worker"] for s in families["h"].samples} == {"1"}
    assert text.count("# TYPE x_total counter") == 1  # one family, not one per worker
