"""A reload never stalls the proxy (issue 12, finding 3).

`canary run` as a real process; a probe client sends a request through the proxy every 2 ms
while the rollout file is reloaded with (a) the largest valid file within the size limit
(comment padding), (b) an alias bomb, (c) deep nesting, (d) binary junk, (e) a NUL byte and
(f) more values than the limit; the longest gap between two probe answers must stay small.
The file is read, parsed and validated in a worker process (canary.runtime
load_config_off_loop), so the proxy's event loop only applies the result.

The target is 50 ms. A loaded 2-core CI machine adds scheduling noise of its own (measured
with no reload at all: 7-50 ms at load average 7-8), so the assertion allows ``MAX_GAP`` or
twice the gap measured without a reload, whichever is larger, up to ``NOISE_CAP``; the measured
figures are printed (``pytest -s``). Parsing in the event loop stalled it 0.5-2.5 s here.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import yaml

from canary.config._loader import MAX_FILE_BYTES

MAX_GAP = 0.1  # seconds; the target is 0.05 (see the module docstring)
NOISE_CAP = 0.25  # the bound never exceeds this, however noisy the machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Upstream(asyncio.Protocol):
    """Answers every request head at once with a 2-byte body (no upstream latency)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@asynccontextmanager
async def _upstream() -> AsyncIterator[str]:
    server = await asyncio.get_running_loop().create_server(_Upstream, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def _probe(port: int, stop: asyncio.Event, answers: list[float]) -> None:
    """Sequential GETs on one keep-alive connection, 2 ms apart; the time of every answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while not stop.is_set():
            writer.write(b"GET /probe HTTP/1.1\r\nHost: probe\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            answers.append(time.perf_counter())
            await asyncio.sleep(0.002)
    finally:
        writer.close()


def _alias_bomb() -> str:
    lines = ["anchors:", '  - &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  - &a{n} [{', '.join([f'*a{n - 1}'] * 9)}]" for n in range(1, 10)]
    return "\n".join(lines) + "\nrollouts: *a9\n"


def _largest_valid(base: dict[str, object]) -> bytes:
    text = yaml.safe_dump(base)
    pad = "# " + "x" * 77 + "\n"
    n = (MAX_FILE_BYTES - len(text.encode())) // len(pad)
    out = (text + pad * n).encode()
    assert MAX_FILE_BYTES - len(pad) < len(out) <= MAX_FILE_BYTES
    return out


def _cases(base: dict[str, object]) -> list[tuple[str, Callable[[], bytes], bool]]:
    """(name, file content, valid?)"""
    return [
        ("largest valid file (comment padding)", lambda: _largest_valid(base), True),
        ("alias bomb", lambda: _alias_bomb().encode(), False),
        ("100k-deep nesting", lambda: b"[" * 100_000 + b"\n", False),
        ("binary junk", lambda: os.urandom(MAX_FILE_BYTES // 2), False),
        ("NUL byte", lambda: yaml.safe_dump(base).encode() + b"\x00\n", False),
        ("too many values", lambda: b"x: [" + b"0," * 400_000 + b"0]\n", False),
    ]


async def _gap_during(
    proxy_port: int, action: Callable[[], object], settle: float = 0.3
) -> tuple[float, float, int]:
    """(longest gap between probe answers, seconds the action took, answers) around ``action``."""
    stop = asyncio.Event()
    answers: list[float] = []
    probe = asyncio.create_task(_probe(proxy_port, stop, answers))
    await asyncio.sleep(0.3)  # warm: the gap is measured from the first answer on
    started = time.perf_counter()
    result = action()
    if asyncio.iscoroutine(result):
        await result
    took = time.perf_counter() - started
    await asyncio.sleep(settle)
    stop.set()
    await probe
    gaps = [b - a for a, b in itertools.pairwise(answers)]
    return max(gaps), took, len(answers)


async def test_reloads_never_stall_the_proxy(tmp_path: Path) -> None:
    async with _upstream() as production, _upstream() as candidate:
        proxy_port, admin_port = _free_port(), _free_port()
        base: dict[str, object] = {
            "proxy": {"listen": f"127.0.0.1:{proxy_port}"},
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "state": {"backend": "memory"},
            "rollouts": [
                {
                    "name": "m",
                    "production": {"endpoints": [production]},
                    "candidate": {"endpoints": [candidate]},
                    "steps": [{"weight": 0}],
                }
            ],
        }
        path = tmp_path / "rollout.yaml"
        path.write_text(yaml.safe_dump(base))
        proc = subprocess.Popen(
            [sys.executable, "-m", "canary", "run", "-c", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        admin = f"http://127.0.0.1:{admin_port}"
        figures: list[str] = []
        failures: list[str] = []
        try:
            async with httpx.AsyncClient(timeout=60) as client:
                deadline = time.monotonic() + 30
                while True:
                    assert proc.poll() is None, proc.communicate()
                    try:
                        if (await client.get(admin + "/readyz")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    assert time.monotonic() < deadline, "canary did not become ready"
                    await asyncio.sleep(0.1)

                idle, _, _ = await _gap_during(proxy_port, lambda: asyncio.sleep(2.0), 0.0)
                bound = min(NOISE_CAP, max(MAX_GAP, 2 * idle))
                figures.append(
                    f"{'no reload (baseline)':40s} max gap {idle * 1000:6.1f} ms; "
                    f"bound {bound * 1000:.0f} ms"
                )

                for name, content, valid in _cases(base):
                    path.write_bytes(content())
                    answer: list[httpx.Response] = []

                    async def reload() -> None:
                        answer.append(await client.post(admin + "/api/v1/reload", json={}))  # noqa: B023

                    gap, took, n = await _gap_during(proxy_port, reload)
                    r = answer[0]
                    figures.append(
                        f"{name:40s} max gap {gap * 1000:6.1f} ms; reload answered {r.status_code}"
                        f" in {took:.2f}s; {n} probe answers"
                    )
                    if valid:
                        assert r.status_code == 200, r.text
                    else:
                        assert r.status_code == 400, r.text
                        body = r.json()
                        assert body["issues"], body
                        assert all(len(i["message"]) < 500 for i in body["issues"]), body
                    rollouts = (await client.get(admin + "/api/v1/rollouts")).json()["rollouts"]
                    assert [x["name"] for x in rollouts] == ["m"]  # the running config stays
                    if gap >= bound:
                        failures.append(f"{name}: {gap * 1000:.1f} ms")

                # SIGHUP with a bad file: a logged error, the proxy keeps answering
                path.write_bytes(b"rollouts:\n  - name: a\x00b\n")

                async def hangup() -> None:
                    os.kill(proc.pid, signal.SIGHUP)
                    await asyncio.sleep(0.05)
                    # reloads run one at a time: this answer comes after SIGHUP's reload ended
                    r = await client.post(admin + "/api/v1/reload", json={})
                    assert r.status_code == 400, r.text

                gap, _, _ = await _gap_during(proxy_port, hangup)
                figures.append(f"{'SIGHUP with a NUL byte':40s} max gap {gap * 1000:6.1f} ms")
                if gap >= bound:
                    failures.append(f"SIGHUP: {gap * 1000:.1f} ms")
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
        print("\n" + "\n".join(figures))
        assert proc.returncode == 0, out
        assert out.count("contains a NUL byte at line 2, column 12") == 2, out
        assert "Traceback" not in out and "never retrieved" not in out, out
        assert not failures, f"the proxy stalled beyond {bound * 1000:.0f} ms: {failures}"
