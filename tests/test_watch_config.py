"""`canary run --watch-config`: a rollout file changed in place is reloaded without a signal.

Kubernetes updates a ConfigMap volume by writing a new directory and swapping the ``..data``
symlink to it; nobody sends canary SIGHUP. The test reproduces that swap on a real
`canary run` process: a threshold change is applied, an invalid file is rejected with its
issues logged once (the running config stays and canary keeps serving), a fixed file is
applied again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from canary.cli import WATCH_CONFIG_DEFAULT, build_parser
from loadtest.fake_model import FakeModelConfig, running_fake_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ConfigMapDir:
    """A directory laid out as the kubelet lays out a ConfigMap volume: ``rollout.yaml`` is a
    symlink to ``..data/rollout.yaml``, ``..data`` a symlink to a timestamped directory, and an
    update renames a new ``..data`` link over the old one (one atomic step)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        root.mkdir()
        (root / "rollout.yaml").symlink_to(Path("..data") / "rollout.yaml")

    @property
    def path(self) -> Path:
        return self.root / "rollout.yaml"

    def write(self, text: str) -> None:
        self.version += 1
        payload = self.root / f"..2026_12_07_{self.version:04d}"
        payload.mkdir()
        (payload / "rollout.yaml").write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(payload.name)
        os.replace(tmp, self.root / "..data")


def _config(
    production: str, candidate: str, ports: tuple[int, int], min_requests: int, margin: str
) -> dict[str, Any]:
    return {
        "proxy": {"listen": f"127.0.0.1:{ports[0]}"},
        "admin": {"listen": f"127.0.0.1:{ports[1]}"},
        "state": {"backend": "memory"},
        "rollouts": [
            {
                "name": "m",
                "production": {"endpoints": [production]},
                "candidate": {"endpoints": [candidate]},
                "steps": [{"weight": 10, "min_requests": min_requests}, {"weight": 50}],
                "analysis": {
                    "interval": "200ms",
                    "metrics": [
                        {
                            "name": "latency_p95",
                            "signal": "latency",
                            "stat": "p95",
                            "max_increase": margin,
                        },
                    ],
                },
            }
        ],
    }


async def _wait_for(check: Any, what: str, timeout: float = 20.0) -> Any:
    """Poll the async ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = await check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_watch_config_applies_changes_and_rejects_an_invalid_file(tmp_path: Path) -> None:
    async with running_fake_model(FakeModelConfig(model="p", latency="fixed")) as p, \
            running_fake_model(FakeModelConfig(model="c", latency="fixed")) as c:  # fmt: skip
        ports = (_free_port(), _free_port())
        volume = ConfigMapDir(tmp_path / "config")
        volume.write(yaml.safe_dump(_config(p, c, ports, 1000, "10%")))
        log = tmp_path / "canary.log"  # a file, not a pipe: read while canary runs
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "canary", "run", "-c", str(volume.path),
                 "--watch-config", "0.2"],
                stdout=out, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
        proxy = f"http://127.0.0.1:{ports[0]}"
        admin = f"http://127.0.0.1:{ports[1]}"
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:

                async def ready() -> bool:
                    assert proc.poll() is None, log.read_text()
                    return (await client.get(admin + "/readyz")).status_code == 200

                async def rollout() -> dict[str, Any]:
                    answer = await client.get(admin + "/api/v1/rollouts/m")
                    assert answer.status_code == 200, answer.text
                    return dict(answer.json())

                async def margin_is(value: float) -> bool:
                    metrics = (await rollout())["metrics"]
                    return bool(metrics) and metrics[0]["margin"] == pytest.approx(value)

                async def serves() -> None:
                    for i in range(5):
                        r = await client.post(proxy + "/predict", json={"id": str(i)})
                        assert r.status_code == 200, r.text

                await _wait_for(ready, "canary to become ready")
                await serves()
                assert (await rollout())["step_required"] == 1000
                await _wait_for(lambda: margin_is(0.10), "the first analysis")

                # A threshold change: the step's min_requests and the metric's tolerance.
                volume.write(yaml.safe_dump(_config(p, c, ports, 2000, "25%")))
                await _wait_for(lambda: margin_is(0.25), "the new tolerance to apply")
                assert (await rollout())["step_required"] == 2000
                await serves()

                # An invalid file: rejected, the running config stays, canary keeps serving.
                volume.write("rollouts: [{name: broken}]\n")

                async def rejected() -> bool:
                    return "reload rejected" in log.read_text()

                await _wait_for(rejected, "the invalid file to be rejected")
                await asyncio.sleep(1.0)  # five more checks: it is rejected once, not each time
                assert proc.poll() is None
                assert (await rollout())["step_required"] == 2000
                assert await margin_is(0.25)
                assert (await client.get(admin + "/readyz")).status_code == 200
                await serves()

                # Fixed again: applied (the rejected file did not stop the watching).
                volume.write(yaml.safe_dump(_config(p, c, ports, 3000, "25%")))

                async def step_required_3000() -> bool:
                    return (await rollout())["step_required"] == 3000

                await _wait_for(step_required_3000, "the fixed file to apply")
                await serves()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    out = log.read_text()
    assert proc.returncode == 0, out
    assert "watching" in out and "for changes every 0.2s" in out
    assert out.count("reload rejected, keeping the running config") == 1, out
    assert "rollouts[0].production: required key is missing" in out
    assert "rollouts[0].candidate: required key is missing" in out
    assert out.count("configuration reloaded from") == 2, out  # two changes, two reloads


def test_watch_config_flag() -> None:
    parser = build_parser()
    assert parser.parse_args(["run", "-c", "f.yaml"]).watch_config is None
    assert parser.parse_args(["run", "-c", "f.yaml", "--watch-config"]).watch_config == 5.0
    assert WATCH_CONFIG_DEFAULT == 5.0
    assert parser.parse_args(["run", "--watch-config", "-c", "f.yaml"]).watch_config == 5.0
    assert parser.parse_args(["run", "-c", "f.yaml", "--watch-config", "0.2"]).watch_config == 0.2


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "5s", "0.01"])
def test_watch_config_rejects_a_bad_interval(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["run", "-c", "f.yaml", f"--watch-config={value}"])
    assert exc.value.code == 2
    assert "--watch-config" in capsys.readouterr().err


@pytest.mark.parametrize(("path", "seconds"), [(None, 1.0), ("r.yaml", 0.0), ("r.yaml", -1.0)])
def test_runtime_refuses_a_watch_it_cannot_do(path: str | None, seconds: float) -> None:
    from canary.config import load_config_text
    from canary.errors import CanaryError
    from canary.runtime import Runtime

    config = load_config_text(yaml.safe_dump(_config("http://a:1", "http://b:1", (0, 0), 1, "5%")))
    with pytest.raises(CanaryError, match="watch"):
        Runtime(config, path, watch_config=seconds)
