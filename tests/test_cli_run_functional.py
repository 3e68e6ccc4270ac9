"""`canary run` as a real process: serves, reloads on SIGHUP, rejects bad files, stops cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from loadtest.fake_model import FakeModelConfig, running_fake_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_run_reload_and_shutdown(tmp_path: Path) -> None:
    async with running_fake_model(FakeModelConfig(model="p", latency="fixed")) as p, \
            running_fake_model(FakeModelConfig(model="c", latency="fixed")) as c:  # fmt: skip
        proxy_port, admin_port = _free_port(), _free_port()
        config = {
            "proxy": {"listen": f"127.0.0.1:{proxy_port}"},
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "state": {"backend": "memory"},
            "rollouts": [
                {
                    "name": "m",
                    "production": {"endpoints": [p]},
                    "candidate": {"endpoints": [c]},
                    "steps": [{"weight": 0}],
                }
            ],
        }
        path = tmp_path / "rollout.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = subprocess.Popen(
            [sys.executable, "-m", "canary", "run", "-c", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        admin = f"http://127.0.0.1:{admin_port}"
        proxy = f"http://127.0.0.1:{proxy_port}"
        try:
            # the fake models run in this test's event loop: use the async client from here on
            async with httpx.AsyncClient() as client:
                deadline = time.monotonic() + 20
                while True:
                    assert proc.poll() is None, proc.communicate()
                    try:
                        if (await client.get(admin + "/readyz")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    assert time.monotonic() < deadline, "canary did not become ready"
                    await asyncio.sleep(0.1)
                r = await client.post(proxy + "/predict", json={"id": "1"})
                assert r.status_code == 200 and r.headers["x-canary-arm"] == "production"

                # a valid change: a second rollout on /v2 appears after SIGHUP
                config["rollouts"][0]["match"] = {"path_prefix": "/v1"}
                config["rollouts"].append(
                    {**config["rollouts"][0], "name": "m2", "match": {"path_prefix": "/v2"}}
                )
                path.write_text(yaml.safe_dump(config))
                os.kill(proc.pid, signal.SIGHUP)
                for _ in range(50):
                    names = [
                        x["name"]
                        for x in (await client.get(admin + "/api/v1/rollouts")).json()["rollouts"]
                    ]
                    if "m2" in names:
                        break
                    await asyncio.sleep(0.1)
                assert names == ["m", "m2"]

                # an invalid file is rejected and the running config stays
                path.write_text("rollouts: [{name: broken}]\n")
                os.kill(proc.pid, signal.SIGHUP)
                await asyncio.sleep(0.5)
                assert (await client.get(proxy + "/v2/predict")).status_code in (200, 404, 405)
                names = [
                    x["name"]
                    for x in (await client.get(admin + "/api/v1/rollouts")).json()["rollouts"]
                ]
                assert names == ["m", "m2"]
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, out
        assert "reload rejected, keeping the running config" in out
        assert "rollouts[0].production: required key is missing" in out


def test_run_with_invalid_file_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rollouts: []\nextra: 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "canary", "run", "-c", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "extra: unknown key" in proc.stderr and "(line 2)" in proc.stderr


def _run_once(tmp_path: Path, **top: object) -> subprocess.CompletedProcess[str]:
    """`canary run` on a one-rollout file with ``top`` keys, in ``tmp_path``; it must exit."""
    path = tmp_path / "r.yaml"
    rollout = {
        "name": "m",
        "production": {"endpoints": ["http://127.0.0.1:1"]},
        "candidate": {"endpoints": ["http://127.0.0.1:2"]},
        "steps": [{"weight": 0}],
    }
    path.write_text(yaml.safe_dump({**top, "rollouts": [rollout]}))
    return subprocess.run(
        [sys.executable, "-m", "canary", "run", "-c", str(path)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = _run_once(tmp_path, proxy={"listen": f"127.0.0.1:{port}"})
    assert proc.returncode == 1
    assert "cannot start" in proc.stderr


def test_unreadable_state_is_a_clear_error(tmp_path: Path) -> None:
    from canary.store.sqlite import SQLiteStore

    async def corrupt() -> None:
        store = SQLiteStore(tmp_path / "state.db")
        await store.open()
        await store.put_state("m", {"version": 999})
        await store.close()

    asyncio.run(corrupt())
    proc = _run_once(
        tmp_path,
        proxy={"listen": "127.0.0.1:0"},
        admin={"listen": "127.0.0.1:0"},
        state={"backend": "sqlite", "path": str(tmp_path / "state.db")},
    )
    assert proc.returncode == 1
    assert "state of rollout 'm' is unreadable" in proc.stderr
    assert "Traceback" not in proc.stderr
