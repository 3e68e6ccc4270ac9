"""Found while using canary as a new user would (issue 12): the ``start`` webhook, ``step``
numbering in the API, the webhooks and the CLI, and ``canary status | head``.

Real canary runtimes on loopback, a real webhook receiver, real SQLite files, and the CLI as a
subprocess writing into a closed pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from canary.cli import CLOSED_PIPE_EXIT, main
from tests.conftest import fake_pair, rollout_config, running_canary

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ["start", "advance", "promote", "rollback", "pause", "resume", "hold"]


@contextlib.asynccontextmanager
async def hook_receiver() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(json.loads(await request.read()))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hook", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/hook")), seen
    finally:
        await server.close()


async def _until(cond: Any, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _cfg(p: str, c: str, db: Path, hook: str) -> dict[str, Any]:
    cfg = rollout_config(
        [p],
        [c],
        steps=[{"weight": 10, "min_requests": 100_000}, {"weight": 50}, {"weight": 100}],
        webhooks=[{"url": hook, "on": EVENTS}],
    )
    cfg["state"] = {"backend": "sqlite", "path": str(db)}
    return cfg


# -- the start webhook -----------------------------------------------------------------------


async def test_start_fires_once_when_a_rollout_starts_not_on_resume(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    async with fake_pair() as (p, c), hook_receiver() as (hook, seen):
        async with running_canary(_cfg(p, c, db, hook)):
            await _until(lambda: len(seen) >= 1)
            await asyncio.sleep(0.2)  # nothing else follows
        assert [s["event"] for s in seen] == ["start"]
        [start] = seen
        assert start["rollout"] == "m" and start["action"] == "START"
        assert start["phase"] == "running"
        assert (start["step"], start["steps"], start["step_index"]) == (1, 3, 0)
        assert start["weights"] == {"production": 90.0, "candidate": 10.0}

        # A restart resumes the rollout: no second start.
        async with running_canary(_cfg(p, c, db, hook)) as can, httpx.AsyncClient() as client:
            r = await client.post(can.admin + "/api/v1/rollouts/m/pause", json={})
            assert r.status_code == 200
            await _until(lambda: len(seen) >= 2)
            await asyncio.sleep(0.2)
        assert [s["event"] for s in seen] == ["start", "pause"]

        # New endpoints make a new rollout: it starts (once) again.
        cfg = _cfg(p, c, db, hook)
        cfg["rollouts"][0]["candidate"]["endpoints"] = [c.replace("127.0.0.1", "localhost")]
        async with running_canary(cfg):
            await _until(lambda: len(seen) >= 3)
            await asyncio.sleep(0.2)
        assert [s["event"] for s in seen] == ["start", "pause", "start"]


# -- step numbering --------------------------------------------------------------------------


async def test_step_is_1_based_in_the_api_webhooks_and_cli_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "state.db"
    async with fake_pair() as (p, c), hook_receiver() as (hook, seen):
        cfg = _cfg(p, c, db, hook)
        cfg["rollouts"][0]["steps"][0]["min_requests"] = 0
        cfg["rollouts"][0]["analysis"] = {"burn_in": 0}
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            await can.runtime.controller.evaluate(force=True)  # step 1 -> 2 (no requirement)
            one = (await client.get(can.admin + "/api/v1/rollouts/m")).json()
            assert (one["step"], one["steps"], one["step_index"]) == (2, 3, 1)
            assert one["weights"]["candidate"] == 50.0
            log = [(d["action"], d["step"], d["steps"]) for d in one["decisions"]]
            assert log == [("START", 1, 3), ("ADVANCE", 2, 3)]
            await _until(lambda: len(seen) >= 2)
            assert [(s["event"], s["step"], s["steps"]) for s in seen] == [
                ("start", 1, 3),
                ("advance", 2, 3),
            ]
            metrics = (await client.get(can.admin + "/metrics")).text
            assert 'canary_rollout_step{rollout="m"} 2.0' in metrics

            loop = asyncio.get_running_loop()
            code = await loop.run_in_executor(None, main, ["status", "--admin", can.admin])
            out = capsys.readouterr().out
            assert code == 0 and " 2/3 weight 50%" in out
            code = await loop.run_in_executor(None, main, ["status", "m", "--admin", can.admin])
            out = capsys.readouterr().out
            assert code == 0 and " 2/3 weight 50%" in out
            rows = [ln for ln in out.splitlines() if "  auto  " in ln]  # the decision log
            assert len(rows) == 2 and " 1/3 " in rows[0] and " 2/3 " in rows[1], out


async def test_decisions_stored_with_0_based_steps_read_1_based(tmp_path: Path) -> None:
    """A state file written before ``step`` was 1-based: its log entries are shown upgraded."""
    db = tmp_path / "state.db"
    async with fake_pair() as (p, c), hook_receiver() as (hook, _):
        cfg = _cfg(p, c, db, hook)
        async with running_canary(cfg):
            pass
        conn = sqlite3.connect(db)
        (row_id, data), *_ = conn.execute("SELECT id, data FROM decisions").fetchall()
        old = json.loads(data)
        for key in ("steps", "step_index"):
            del old[key]
        old["step"] = 0  # as canary stored it before
        conn.execute("UPDATE decisions SET data = ? WHERE id = ?", (json.dumps(old), row_id))
        conn.commit()
        conn.close()
        async with running_canary(cfg) as can, httpx.AsyncClient() as client:
            one = (await client.get(can.admin + "/api/v1/rollouts/m")).json()
        [start] = one["decisions"]
        assert (start["step"], start["steps"], start["step_index"]) == (1, 3, 0)


# -- canary status | head ----------------------------------------------------------------------


async def _cli_into_closed_pipe(*argv: str) -> tuple[int, bytes]:
    """Run the CLI with its stdout a pipe whose reading end is already closed."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "canary",
            *argv,
            stdout=write,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    finally:
        os.close(write)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, err


async def test_status_into_a_closed_pipe_exits_quietly() -> None:
    async with fake_pair() as (p, c), running_canary(rollout_config([p], [c])) as can:
        for argv in (
            ("status", "m", "--admin", can.admin),
            ("status", "--admin", can.admin),
            ("status", "--json", "--admin", can.admin),
            ("pause", "m", "--admin", can.admin),
        ):
            code, err = await _cli_into_closed_pipe(*argv)
            assert (code, err) == (CLOSED_PIPE_EXIT, b""), (argv, err.decode())
        # Errors still go to stderr with their own exit code.
        code, err = await _cli_into_closed_pipe("status", "nope", "--admin", can.admin)
        assert code == 4 and b"nope" in err and b"Traceback" not in err
