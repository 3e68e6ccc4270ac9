"""How much does a crash lose? ``canary run`` is SIGKILLed mid-rollout and started again.

Starts two fake model servers, runs ``python -m canary run`` on a SQLite state file, sends
paced traffic until the rollout is at its second step, SIGKILLs canary right after a response,
starts it again on the same file and compares the samples it resumes with against the
responses the clients received. Prints, per run, the samples lost and the window of traffic
they amount to (lost / rate); the design bound is one flush interval (250 ms) plus the write
in progress.

    python -m loadtest.crash_loss [--repeat 5] [--rate 200]

Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvloop
import yaml

from loadtest.fake_model import FakeModelConfig, running_fake_model


@dataclass(frozen=True)
class CrashResult:
    sent: int  # answered requests the clients saw before the kill
    resumed: int  # samples canary had after the restart
    lost: int
    rate: float  # requests per second just before the kill
    step_before: int
    step_after: int
    phase_after: str

    @property
    def lost_window(self) -> float:
        """Seconds of traffic the lost samples amount to."""
        return self.lost / self.rate if self.rate > 0 else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def canary_process(
    config_path: Path, admin: str, log: Path | None = None, args: Sequence[str] = ()
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``canary run -c config_path``, ready when /readyz answers 200; killed on exit. Its
    output goes to ``log`` (default: beside the config, ``.log``): a file never fills up and
    stalls the child as an unread pipe would, and it is there to read when something fails.
    ``args``: more options of ``canary run`` (``--workers 2``)."""
    log = log if log is not None else config_path.with_suffix(".log")
    with log.open("ab") as out:
        # Popen only forks; nothing here waits on the child while the loop has work to do.
        proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "canary", "run", "-c", str(config_path), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        async with httpx.AsyncClient() as client:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"canary exited, see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(admin + "/readyz")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"canary did not become ready in 30 s, see {log}")
                await asyncio.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:  # a clean stop first (a supervisor stops its workers)
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait(10)


async def crash_once(workdir: Path, rate: float = 200.0, seed: int = 0) -> CrashResult:
    """One kill-and-restart measurement (see the module docstring)."""
    fast: dict[str, Any] = {"latency": "fixed", "latency_median": 0.001}
    async with running_fake_model(FakeModelConfig(model="p", seed=seed, **fast)) as p, \
            running_fake_model(FakeModelConfig(model="c", seed=seed + 1, **fast)) as c:  # fmt: skip
        proxy_port, admin_port = free_port(), free_port()
        config = {
            "proxy": {"listen": f"127.0.0.1:{proxy_port}"},
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "state": {"backend": "sqlite", "path": str(workdir / "state.db")},
            "rollouts": [
                {
                    "name": "m",
                    "production": {"endpoints": [p]},
                    "candidate": {"endpoints": [c]},
                    "steps": [
                        {"weight": 20, "min_requests": 40},
                        {"weight": 50, "min_requests": 10**9},
                    ],
                    "analysis": {"interval": "100ms", "burn_in": 40, "metrics": []},
                }
            ],
        }
        path = workdir / "rollout.yaml"
        path.write_text(yaml.safe_dump(config))
        admin = f"http://127.0.0.1:{admin_port}"
        proxy = f"http://127.0.0.1:{proxy_port}"
        sent = 0
        times: list[float] = []
        async with canary_process(path, admin) as proc, httpx.AsyncClient() as client:
            period = 1.0 / rate
            step = 0
            started = time.monotonic()
            next_at = started
            # Run until at the second step, then at least one more second of steady traffic.
            while True:
                now = time.monotonic()
                if now < next_at:
                    await asyncio.sleep(next_at - now)
                next_at += period
                r = await client.post(proxy + "/predict", json={"id": str(sent)})
                r.raise_for_status()
                sent += 1
                times.append(time.monotonic())
                if sent % 50 == 0:
                    step = (await client.get(admin + "/api/v1/rollouts/m")).json()["step_index"]
                if step >= 1 and time.monotonic() - started > 3.0:
                    break
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            killed_at = time.monotonic()
        recent = [t for t in times if killed_at - t <= 1.0]
        observed_rate = len(recent) / 1.0
        async with canary_process(path, admin), httpx.AsyncClient() as client:
            one = (await client.get(admin + "/api/v1/rollouts/m")).json()
        resumed = int(one["samples"]["production"] + one["samples"]["candidate"])
        return CrashResult(
            sent=sent,
            resumed=resumed,
            lost=sent - resumed,
            rate=observed_rate,
            step_before=step,
            step_after=int(one["step_index"]),
            phase_after=str(one["phase"]),
        )


async def main_async(repeat: int, rate: float) -> int:
    results = []
    for i in range(repeat):
        with tempfile.TemporaryDirectory(prefix="canary-crash-") as tmp:
            r = await crash_once(Path(tmp), rate=rate, seed=i)
        results.append(r)
        print(
            f"run {i + 1}/{repeat}: sent {r.sent}, resumed {r.resumed}, lost {r.lost} "
            f"(~{r.lost_window * 1000:.0f} ms of traffic at {r.rate:.0f} req/s), "
            f"step {r.step_before + 1} -> {r.step_after + 1}, {r.phase_after}",
            flush=True,
        )
    lost = [r.lost for r in results]
    window = [r.lost_window * 1000 for r in results]
    print(
        f"median lost {statistics.median(lost):g} samples, median window "
        f"{statistics.median(window):.0f} ms, max {max(window):.0f} ms (bound: 250 ms flush "
        "interval plus the write in progress)"
    )
    ok = all(r.step_after == r.step_before and r.lost >= 0 for r in results)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main_async(args.repeat, args.rate))


if __name__ == "__main__":
    sys.exit(main())
