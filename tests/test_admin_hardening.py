"""The admin API under hostile or failing conditions (issue 12, findings 7 and 8).

- A non-loopback admin address needs a token (or an explicit, loudly logged permission).
- Mutating calls: 403 for a cross-origin ``Origin``, 415 unless ``Content-Type:
  application/json``: a web page cannot make a browser pause or promote a rollout (CSRF).
- Bodies nested absurdly deep are a 400, never a 500 (RecursionError).
- ``/readyz`` and ``canary_store_up`` follow a state store that hangs or whose file is
  deleted or replaced, and recover when writes succeed again.
- A dead analysis worker is started again with back-off, also when the process had run out
  of file descriptors for a while.

Everything runs against real servers on loopback and real SQLite files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import canary.controller.loop
from canary.admin.app import MAX_JSON_DEPTH, json_depth, warn_if_public
from canary.cli import main
from canary.config import AdminConfig, load_config_text
from canary.errors import ConfigError
from tests.conftest import fake_pair, rollout_config, running_canary

ROOT = Path(__file__).resolve().parent.parent


def _metric(text: str, family: str, **labels: str) -> float | None:
    for fam in text_string_to_metric_families(text):
        if fam.name != family:
            continue
        for s in fam.samples:
            if all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


# -- finding 7: a public admin address needs a token ---------------------------------------


def _with_admin(admin: dict[str, Any]) -> str:
    cfg = rollout_config(["http://127.0.0.1:1"], ["http://127.0.0.1:2"])
    cfg["admin"] = admin
    return yaml.safe_dump(cfg)


@pytest.mark.parametrize("listen", ["0.0.0.0:9901", "[::]:9901", "10.1.2.3:9901", "admin:9901"])
def test_a_public_admin_address_without_a_token_is_refused_with_its_key_path(
    listen: str,
) -> None:
    text = _with_admin({"listen": listen})
    with pytest.raises(ConfigError) as info:
        load_config_text(text)
    [issue] = info.value.issues
    assert issue.path == "admin.listen"
    assert "token_env" in issue.message and "allow_public_without_token" in issue.message
    lines = text.splitlines()
    listen_line = lines.index("admin:") + 2  # the line after `admin:` (1-based)
    assert "listen:" in lines[listen_line - 1] and issue.line == listen_line


@pytest.mark.parametrize(
    "admin",
    [
        {"listen": "127.0.0.1:9901"},
        {"listen": "127.9.9.9:9901"},
        {"listen": "[::1]:9901"},
        {"listen": "localhost:9901"},
        {"listen": "0.0.0.0:9901", "token_env": "CANARY_ADMIN_TOKEN"},
        {"listen": "0.0.0.0:9901", "allow_public_without_token": True},
    ],
)
def test_loopback_a_token_or_the_explicit_permission_validate(admin: dict[str, Any]) -> None:
    assert load_config_text(_with_admin(admin)).admin.listen[1] == 9901


def test_canary_validate_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "public.yaml"
    path.write_text(_with_admin({"listen": "0.0.0.0:9901"}))
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "admin.listen: admin API on non-loopback address '0.0.0.0' without a token" in out


def test_the_permission_is_logged_loudly(caplog: pytest.LogCaptureFixture) -> None:
    allowed = AdminConfig.model_validate(
        {"listen": "0.0.0.0:9901", "allow_public_without_token": True}
    )
    with caplog.at_level(logging.WARNING, logger="canary.admin"):
        assert warn_if_public(allowed)
        assert not warn_if_public(AdminConfig.model_validate({"listen": "127.0.0.1:9901"}))
        tokened = AdminConfig.model_validate({"listen": "0.0.0.0:9901", "token_env": "T"})
        assert not warn_if_public(tokened)
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "WITHOUT A TOKEN" in record.getMessage()


# -- finding 7: CSRF: Origin and Content-Type on every mutating call -------------------------

EVIL = {"Origin": "http://evil.example", "Content-Type": "text/plain"}


async def test_cross_origin_and_non_json_mutations_are_refused() -> None:
    async with fake_pair() as (p, c):
        cfg = rollout_config([p], [c], prediction="json:prediction")
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            pause = can.admin + "/api/v1/rollouts/m/pause"
            feedback = can.admin + "/api/v1/feedback"
            reload = can.admin + "/api/v1/reload"
            item = json.dumps({"request_id": "x", "correct": True}).encode()

            # The repro: a page on another site posting text/plain through a browser.
            r = await client.post(pause, content=b'{"reason": "x"}', headers=EVIL)
            assert r.status_code == 403 and "cross-origin" in r.json()["error"]
            for origin in ("null", "http://127.0.0.1:1", "https://" + can.admin[7:], "junk"):
                json_cross = {"Origin": origin, "Content-Type": "application/json"}
                r = await client.post(pause, content=b"{}", headers=json_cross)
                assert r.status_code == 403, origin
            for url in (feedback, reload):
                r = await client.post(url, content=item, headers=EVIL)
                assert r.status_code == 403, url

            # Not JSON: 415, whatever the body, also for an empty one without a type.
            for headers in ({"Content-Type": "text/plain"}, {}):
                for url, body in ((pause, b'{"reason": "x"}'), (feedback, item), (reload, b"")):
                    r = await client.post(url, content=body, headers=headers)
                    assert r.status_code == 415, (url, headers)
                    assert "Content-Type: application/json" in r.json()["error"]
            form = {"Content-Type": "application/x-www-form-urlencoded"}
            assert (await client.post(pause, content=b"reason=x", headers=form)).status_code == 415

            state = (await client.get(can.admin + "/api/v1/rollouts/m")).json()
            assert state["phase"] == "running"  # none of it did anything

            # Same origin (the admin API's own pages) and no Origin at all (CLI, curl) work.
            same = {"Origin": can.admin, "Content-Type": "application/json; charset=utf-8"}
            r = await client.post(pause, content=b'{"reason": "same origin"}', headers=same)
            assert r.status_code == 200 and r.json()["phase"] == "paused"
            r = await client.post(can.admin + "/api/v1/rollouts/m/resume", json={})
            assert r.status_code == 200 and r.json()["phase"] == "running"
            r = await client.post(feedback, content=item, headers=same)
            assert r.status_code == 200 and r.json()["results"]["unknown"] == 1
            # Reads stay plain GETs, with or without an Origin.
            r = await client.get(can.admin + "/api/v1/rollouts", headers={"Origin": "null"})
            assert r.status_code == 200


async def test_origin_is_checked_before_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_HARDENING_TOKEN", "tok")
    async with fake_pair() as (p, c):
        cfg = rollout_config([p], [c])
        cfg["admin"]["token_env"] = "TEST_HARDENING_TOKEN"
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            pause = can.admin + "/api/v1/rollouts/m/pause"
            good = {"Authorization": "Bearer tok", "Content-Type": "application/json"}
            r = await client.post(pause, content=b"{}", headers={**good, **EVIL})
            assert r.status_code == 403
            r = await client.post(pause, content=b"{}", headers={"Content-Type": "text/plain"})
            assert r.status_code == 401  # no token: 401 before the media type
            r = await client.post(pause, content=b"{}", headers={**good, "Content-Type": "x/y"})
            assert r.status_code == 415
            r = await client.post(pause, content=b"{}", headers=good)
            assert r.status_code == 200


async def test_the_cli_sends_json_and_keeps_working(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with fake_pair() as (p, c), running_canary(rollout_config([p], [c])) as can:
        loop = asyncio.get_running_loop()

        def cli(*argv: str) -> tuple[int, str]:
            code = main([*argv, "--admin", can.admin])
            return code, capsys.readouterr().out

        assert await loop.run_in_executor(None, cli, "pause", "m") == (
            0,
            "m: paused (phase paused)\n",
        )
        code, out = await loop.run_in_executor(None, cli, "resume", "m", "--reason", "ok")
        assert code == 0 and "resumed" in out
        code, out = await loop.run_in_executor(None, cli, "status", "m")
        assert code == 0 and "running" in out


# -- finding 8: JSON nested 30,000 deep ------------------------------------------------------


def test_json_depth_counts_brackets_outside_strings_only() -> None:
    assert json_depth(b'{"a": [1, {"b": "[[[[{{{{"}]}') == 3
    assert json_depth(b'"\\"[[[["') == 0
    assert json_depth(b"[" * 30_000) == 30_000
    assert json_depth(b"{}") == 1 and json_depth(b"") == 0
    assert json_depth(b'["\\\\", [[1]]]') == 3  # an escaped backslash ends no string
    assert json_depth(b'["\\"]]]", [1]]') == 2  # an escaped quote ends no string


def test_json_depth_is_linear_in_the_body() -> None:
    # A pattern for whole strings backtracks quadratically on these (18-44 s for 64 KiB).
    for body in (b'"' + b'\\"' * 21_000, b'\\"' * 32_000, b"[" * 65_000, b'["\\\\",' * 6000):
        t0 = time.perf_counter()
        json_depth(body)
        assert time.perf_counter() - t0 < 1.0, body[:10]


async def test_deeply_nested_bodies_are_a_400_on_every_endpoint() -> None:
    deep_list = b"[" * 30_000 + b"]" * 30_000
    deep_reason = b'{"reason": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    unclosed = b"{" * 30_000
    just_too_deep = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)
    deep_label = (
        b'{"request_id": "x", "label": '
        + b"[" * (MAX_JSON_DEPTH + 5)
        + b"]" * (MAX_JSON_DEPTH + 5)
        + b"}"
    )
    async with fake_pair() as (p, c):
        cfg = rollout_config([p], [c], prediction="json:prediction")
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            headers = {"Content-Type": "application/json"}
            urls = [
                can.admin + "/api/v1/rollouts/m/pause",
                can.admin + "/api/v1/feedback",
                can.admin + "/api/v1/reload",
            ]
            for url in urls:
                for body in (deep_list, deep_reason, unclosed, just_too_deep):
                    r = await client.post(url, content=body, headers=headers)
                    assert r.status_code == 400, (url, body[:20], r.text[:200])
                    assert "nested too deeply" in r.json()["error"]
            r = await client.post(urls[1], content=deep_label, headers=headers)
            assert r.status_code == 400 and "nested too deeply" in r.json()["error"]
            # Nesting within the bound is fine, and the admin port and proxy kept working.
            ok = {"reason": [[["fine"]]]}
            r = await client.post(urls[0], content=json.dumps(ok).encode(), headers=headers)
            assert r.status_code == 400 and "'reason' must be a string" in r.json()["error"]
            r = await client.post(urls[0], json={"reason": "depth ok"})
            assert r.status_code == 200 and r.json()["phase"] == "paused"
            assert (await client.get(can.admin + "/healthz")).status_code == 200
            assert (await client.post(can.url + "/predict", json={"id": "1"})).status_code == 200


# -- finding 8: readiness follows the state store ---------------------------------------------


def _sqlite_cfg(p: str, c: str, path: Path) -> dict[str, Any]:
    steps = [{"weight": 50, "min_requests": 100_000}, {"weight": 100}]
    cfg = rollout_config([p], [c], steps=steps)
    cfg["state"] = {"backend": "sqlite", "path": str(path)}
    return cfg


async def _traffic(client: httpx.AsyncClient, url: str, n: int) -> None:
    for i in range(n):
        assert (await client.post(url + "/predict", json={"id": str(i)})).status_code == 200


async def _wait_ready(
    client: httpx.AsyncClient, admin: str, want: int, within: float
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        r = await client.get(admin + "/readyz")
        if r.status_code == want or time.monotonic() > deadline:
            assert r.status_code == want, r.text
            body: dict[str, Any] = r.json()
            return body
        await asyncio.sleep(0.05)


async def _store_up(client: httpx.AsyncClient, admin: str) -> float | None:
    return _metric((await client.get(admin + "/metrics")).text, "canary_store_up")


async def test_readyz_is_503_while_a_store_write_hangs_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that does not finish (here: another process holds SQLite's write lock; in
    production a frozen or hung disk) makes canary unready within the store timeout."""
    monkeypatch.setattr(canary.controller.loop, "STORE_TIMEOUT", 0.5)
    db = tmp_path / "state.db"
    async with fake_pair() as (p, c):
        async with (
            running_canary(_sqlite_cfg(p, c, db), controller=True) as can,
            httpx.AsyncClient() as client,
        ):
            await _wait_ready(client, can.admin, 200, 5)
            assert await _store_up(client, can.admin) == 1.0
            blocker = sqlite3.connect(db, timeout=1.0, isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")  # every write waits (SQLite's busy timeout: 5s)
            try:
                await _traffic(client, can.url, 20)  # the next flush has samples to write
                t0 = time.monotonic()
                body = await _wait_ready(client, can.admin, 503, 4)
                assert time.monotonic() - t0 < 3.5  # the store timeout, not the busy timeout
                assert "has not finished" in body["reason"], body
                assert await _store_up(client, can.admin) == 0.0
                # An operator command answers within the store timeout (not after the hang)...
                t1 = time.monotonic()
                r = await client.post(can.admin + "/api/v1/rollouts/m/pause", json={})
                assert r.status_code == 200 and time.monotonic() - t1 < 2.0
                # ...and the proxy kept serving meanwhile.
                await _traffic(client, can.url, 5)
            finally:
                blocker.execute("COMMIT")
                blocker.close()
            body = await _wait_ready(client, can.admin, 200, 10)
            assert body["reason"] == "serving"
            assert await _store_up(client, can.admin) == 1.0
            await can.runtime.controller.flush()
    # The pause reached the file once (no decision written twice by the retried save).
    conn = sqlite3.connect(db)
    actions = [json.loads(d)["action"] for (d,) in conn.execute("SELECT data FROM decisions")]
    conn.close()
    assert actions == ["START", "PAUSE"]


async def test_readyz_is_503_when_the_state_file_is_deleted_and_recovers(
    tmp_path: Path,
) -> None:
    """Deleted while open, SQLite goes on writing into the unlinked file: nothing would survive
    a restart. canary notices, answers 503 while it cannot open the path again, then writes
    its state back to a new file."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    db = state_dir / "state.db"
    async with fake_pair() as (p, c):
        async with (
            running_canary(_sqlite_cfg(p, c, db), controller=True) as can,
            httpx.AsyncClient() as client,
        ):
            await _wait_ready(client, can.admin, 200, 5)
            await _traffic(client, can.url, 30)
            r = await client.post(can.admin + "/api/v1/rollouts/m/pause", json={"reason": "x"})
            assert r.status_code == 200
            await can.runtime.controller.flush()
            # The whole directory goes: the file cannot even be created again for now.
            shutil.rmtree(state_dir)
            body = await _wait_ready(client, can.admin, 503, 5)
            assert "was deleted" in body["reason"], body
            assert await _store_up(client, can.admin) == 0.0
            await _traffic(client, can.url, 10)  # the proxy serves on
            state_dir.mkdir()
            body = await _wait_ready(client, can.admin, 200, 5)
            assert await _store_up(client, can.admin) == 1.0
            await _traffic(client, can.url, 5)
            await can.runtime.controller.flush()
            totals = can.runtime.controller.totals("m")
            served = totals.production.observed + totals.candidate.observed
        # The new file holds the state, the decision log and every sample.
        assert db.exists()
        conn = sqlite3.connect(db)
        state = json.loads(conn.execute("SELECT data FROM state").fetchone()[0])
        actions = [json.loads(d)["action"] for (d,) in conn.execute("SELECT data FROM decisions")]
        samples = json.loads(conn.execute("SELECT data FROM samples").fetchone()[0])
        conn.close()
        assert state["phase"] == "paused" and actions == ["START", "PAUSE"]
        assert served == 45
        assert json.dumps(samples)  # present; its counts are checked by a restart:
        async with running_canary(_sqlite_cfg(p, c, db)) as can:  # same endpoints: resumed
            totals = can.runtime.controller.totals("m")
            assert totals.production.observed + totals.candidate.observed == 45
            assert can.runtime.controller.state("m").phase.value == "paused"


async def test_readyz_is_503_when_the_state_file_is_replaced(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    other = tmp_path / "other.db"
    sqlite3.connect(other).close()
    async with fake_pair() as (p, c):
        async with (
            running_canary(_sqlite_cfg(p, c, db), controller=True) as can,
            httpx.AsyncClient() as client,
        ):
            await _wait_ready(client, can.admin, 200, 5)
            os.replace(other, db)
            body = await _wait_ready(client, can.admin, 503, 5)
            assert "was replaced" in body["reason"] and "restart" in body["reason"]
            # No decision is taken on a store that no longer is the file at the path.
            summary = (await client.get(can.admin + "/api/v1/rollouts/m")).json()
            assert summary["store_ok"] is False


# -- finding 8: the analysis worker comes back after a file-descriptor shortage ------------

_FD_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, resource, signal, sys, time, yaml
    from prometheus_client.parser import text_string_to_metric_families
    from canary.admin.views import rollout_detail
    from canary.config import load_config_text
    from canary.runtime import Runtime

    def metric(rt, name, **labels):
        for fam in text_string_to_metric_families(
            __import__("prometheus_client").generate_latest(rt.metrics.registry).decode()
        ):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return None

    async def main():
        cfg = yaml.safe_load(sys.argv[1])
        rt = Runtime(load_config_text(yaml.safe_dump(cfg)))
        await rt.start()
        out = {}
        try:
            ctl = rt.controller
            await ctl.evaluate(force=True)
            out["channel_at_start"] = ctl.analyzer._channel is not None
            out["up_at_start"] = metric(rt, "canary_analysis_worker_up")
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            limit = len(os.listdir("/proc/self/fd")) + 32
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            hog = []
            try:
                while True:
                    hog.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
            # The worker dies while no file descriptor is left (as if it had hit the limit).
            for pid in list(rt._analysis_pool._processes):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                await ctl.evaluate(force=True)  # in the event loop meanwhile
                failed = metric(rt, "canary_analysis_worker_restarts_total", result="failed")
                if failed and failed >= 1:
                    break
                await asyncio.sleep(0.2)
            out["failed_while_exhausted"] = metric(
                rt, "canary_analysis_worker_restarts_total", result="failed")
            out["up_while_exhausted"] = metric(rt, "canary_analysis_worker_up")
            for fd in hog:
                os.close(fd)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                await ctl.evaluate(force=True)
                if metric(rt, "canary_analysis_worker_up") == 1.0:
                    break
                await asyncio.sleep(0.2)
            out["ok"] = metric(rt, "canary_analysis_worker_restarts_total", result="ok")
            out["up"] = metric(rt, "canary_analysis_worker_up")
            await ctl.evaluate(force=True)
            out["channel"] = ctl.analyzer._channel is not None
            out["analysis"] = rollout_detail(ctl.view("m"))["metrics"][0]["verdict"]
        finally:
            await rt.stop()
        print("RESULT " + json.dumps(out))

    if __name__ == "__main__":
        asyncio.run(main())
    """
)


async def test_the_analysis_worker_is_restarted_after_running_out_of_fds(tmp_path: Path) -> None:
    script = tmp_path / "fd_exhaustion.py"
    script.write_text(_FD_SCRIPT)
    cfg = rollout_config(
        ["http://127.0.0.1:1"],
        ["http://127.0.0.1:2"],
        analysis={
            "interval": "100ms",
            "metrics": [{"name": "p95", "signal": "latency", "stat": "p95", "max_increase": "10%"}],
        },
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        yaml.safe_dump(cfg),
        cwd=str(tmp_path),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    log = err.decode(errors="replace")
    assert proc.returncode == 0, log[-3000:]
    [line] = [ln for ln in out.decode().splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line[len("RESULT ") :])
    assert result["channel_at_start"] and result["up_at_start"] == 1.0, result
    assert result["failed_while_exhausted"] >= 1 and result["up_while_exhausted"] == 0.0, result
    assert result["ok"] == 1.0 and result["up"] == 1.0 and result["channel"], result
    assert result["analysis"] == "UNKNOWN"  # analysed (no samples yet), in the worker again
    assert "the analysis process died" in log and "starting the worker again in" in log
    assert "starting the analysis worker again failed" in log
    assert "analysis worker started again after" in log
