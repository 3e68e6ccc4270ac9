"""`canary status --watch`, output fitting the terminal's width, and times with their zone.

The watch runs as a real process (``python -m canary``) against the fake admin API of
tests/test_cli_admin_functional.py: on a pseudo-terminal (it redraws in place with escape
codes, and Ctrl-C ends it with exit 0) and into a pipe (plain snapshots). Widths and time
zones are checked in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from aiohttp import web

from canary import cli as cli_module
from tests.test_cli_admin_functional import NOW, FakeAdmin, cli, running, unused_port

ESC = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def admin(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAdmin]:
    monkeypatch.delenv("CANARY_ADMIN_URL", raising=False)
    monkeypatch.delenv("COLUMNS", raising=False)
    with running(FakeAdmin(token=None)) as fake:
        yield fake


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update({"TZ": "UTC", "PYTHONUNBUFFERED": "1", **extra})
    return env


def _read_until(fd: int, done: Callable[[bytes], bool], timeout: float = 30.0) -> bytes:
    """Bytes read from ``fd`` until ``done(all of them)`` or EOF; fails after ``timeout``."""
    data = b""
    deadline = time.monotonic() + timeout
    while not done(data):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; read so far: {data!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the pty's other side closed
            break
        if not chunk:
            break
        data += chunk
    return data


def _stop(proc: subprocess.Popen[bytes], fd: int) -> tuple[int, bytes, bytes]:
    """Ctrl-C the watch; its exit code, what it wrote after and its stderr."""
    proc.send_signal(signal.SIGINT)
    rest = _read_until(fd, lambda _: False, timeout=20)
    code = proc.wait(timeout=20)
    return code, rest, proc.stderr.read() if proc.stderr is not None else b""


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _watch_argv(url: str, *more: str) -> list[str]:
    return [sys.executable, "-m", "canary", "status", *more, "--admin", url]


# --- on a terminal: redrawn in place ----------------------------------------------------------


def test_watch_on_a_terminal_redraws_in_place_and_ctrl_c_exits_0(admin: FakeAdmin) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 90, 0, 0))  # rows, cols
    argv = _watch_argv(admin.url, "fraud-model", "--watch", "0.2")
    proc = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=_env(), close_fds=True
    )
    os.close(slave)
    try:
        out = _read_until(master, lambda d: d.count(b"\x1b[H") >= 3 and d.endswith(b"\x1b[J"))
        code, rest, err = _stop(proc, master)
    finally:
        _reap(proc)
        os.close(master)
    assert code == 0
    assert err == b""  # no traceback
    text = out.decode()
    assert text.startswith("\x1b[?25l\x1b[2J")  # cursor hidden, screen cleared once
    assert text.count("\x1b[2J") == 1  # then only redrawn: home, erase each line's end
    assert "\x1b[K" in text
    assert rest.endswith(b"\x1b[?25h")  # the cursor is back after Ctrl-C
    frames = [f for f in text.split("\x1b[H")[1:] if f.endswith("\x1b[J")]
    assert len(frames) >= 2
    frame = frames[-1]
    lines = [ESC.sub("", line) for line in frame.split("\r\n")]
    assert lines[0].startswith("every 0.2s: canary status fraud-model") and "UTC" in lines[0]
    assert any(line.startswith("fraud-model") for line in lines)
    assert any(line.startswith("latency_p95") for line in lines)
    assert max(len(line) for line in lines) <= 90  # the pty is 90 columns wide
    assert len(lines) <= 40


def test_watch_cuts_a_frame_to_the_terminal_height(admin: FakeAdmin) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 12, 70, 0, 0))
    argv = _watch_argv(admin.url, "fraud-model", "-w", "0.2")
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, env=_env(), close_fds=True)
    os.close(slave)
    try:
        out = _read_until(master, lambda d: d.count(b"\x1b[J") >= 2)
        code, _, _ = _stop(proc, master)
    finally:
        _reap(proc)
        os.close(master)
    assert code == 0
    frame = out.decode().split("\x1b[H")[-1]
    lines = [ESC.sub("", line) for line in frame.split("\r\n")]
    assert len([x for x in lines if x]) <= 11  # one row less than the terminal: no scrolling
    assert any("more line(s)" in line for line in lines)
    assert max(len(line) for line in lines) <= 70


# --- into a pipe: snapshots -------------------------------------------------------------------


def test_watch_into_a_pipe_prints_snapshots_without_escape_codes(admin: FakeAdmin) -> None:
    proc = subprocess.Popen(
        _watch_argv(admin.url, "--watch", "0.2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(COLUMNS="100"),
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    try:
        out = _read_until(fd, lambda d: d.count(b"every 0.2s: canary status") >= 3)
        code, rest, err = _stop(proc, fd)
    finally:
        _reap(proc)
    assert code == 0 and err == b""
    text = (out + rest).decode()
    assert "\x1b" not in text
    snapshots = text.split("\n\n")
    assert len(snapshots) >= 3
    for snap in snapshots[:3]:
        lines = snap.splitlines()
        assert lines[0].startswith("every 0.2s: canary status    ") and lines[0].endswith("UTC")
        assert lines[1].split()[0] == "NAME"
        assert [x.split()[0] for x in lines[2:]] == ["fraud-model", "llm-chat", "old-model"]
        assert max(len(x) for x in lines) <= 100


def test_watch_keeps_trying_while_the_admin_api_is_unreachable() -> None:
    port = unused_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        _watch_argv(url, "--watch", "0.2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    try:
        out = _read_until(fd, lambda d: d.count(b"error: ") >= 2)
        with running_on(FakeAdmin(token=None), port):  # the admin API comes (back)
            out += _read_until(fd, lambda d: b"fraud-model" in d)
            code, _, err = _stop(proc, fd)
    finally:
        _reap(proc)
    assert code == 0 and err == b""
    text = out.decode()
    first = next(line for line in text.splitlines() if line.startswith("error: "))
    assert f"cannot reach the canary admin API at {url} (connection refused)" in first
    assert re.match(r"error: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC: ", first)


@contextlib.contextmanager
def running_on(fake: FakeAdmin, port: int) -> Iterator[FakeAdmin]:
    """``running`` of tests/test_cli_admin_functional.py on a given port."""
    loop = asyncio.new_event_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    fake.url = f"http://127.0.0.1:{port}"
    runner = web.AppRunner(fake.app(), access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.SockSite(runner, sock).start())
    thread = threading.Thread(target=loop.run_forever, name="fake-admin", daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(runner.cleanup())
        loop.close()


# --- in-process: arguments, --json, widths, time zones ----------------------------------------


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, sleeps: int) -> list[float]:
    """``time.sleep`` in the CLI raises KeyboardInterrupt (Ctrl-C) at call ``sleeps``."""
    calls: list[float] = []

    def sleep(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) >= sleeps:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_module.time, "sleep", sleep)
    return calls


def test_watch_json_prints_one_object_per_line(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _interrupt_after(monkeypatch, 3)
    code, out, err = cli(
        capsys, "status", "--watch", "5", "fraud-model", "--json", "--admin", admin.url
    )
    assert (code, err) == (0, "") and calls == [5.0, 5.0, 5.0]
    lines = out.splitlines()
    assert len(lines) == 3
    assert all(json.loads(line) == admin.rollouts["fraud-model"] for line in lines)


def test_watch_name_after_the_flag_and_default_interval(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _interrupt_after(monkeypatch, 1)
    code, out, _ = cli(capsys, "status", "--watch", "llm-chat", "--admin", admin.url)
    assert code == 0 and calls == [2.0]
    assert out.startswith("every 2s: canary status llm-chat")
    assert admin.requests[-1]["path"] == "/api/v1/rollouts/llm-chat"


@pytest.mark.parametrize("value", ["0", "-1", "nan", "5000", "abc"])
def test_watch_interval_out_of_range(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    code, out, err = cli(capsys, "status", "fraud-model", "--watch", value, "--admin", admin.url)
    assert (code, out) == (2, "") and err.startswith("--watch: expected")
    assert admin.requests == []


def test_watch_of_an_unknown_rollout_ends_like_status(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _interrupt_after(monkeypatch, 100)
    code, _, err = cli(capsys, "status", "nope", "--watch", "--admin", admin.url)
    assert code == 4 and "unknown rollout 'nope'" in err


@pytest.mark.parametrize("columns", [40, 60, 80, 120])
def test_every_line_fits_the_terminal_width(
    admin: FakeAdmin,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    columns: int,
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    for argv in (["status"], ["status", "fraud-model"], ["status", "old-model"]):
        code, out, _ = cli(capsys, *argv, "--admin", admin.url)
        assert code == 0
        lines = out.splitlines()
        assert max(len(line) for line in lines) <= columns, out
        names = [line.split()[0] for line in lines if line and line.split()[0] in admin.rollouts]
        assert names  # rows are cut, never wrapped onto a second line
    code, out, _ = cli(capsys, "status", "--admin", admin.url)
    header = out.splitlines()[0].split()
    assert header[:2] == ["NAME", "PHASE"]  # the columns that identify a row stay


def test_narrow_tables_drop_columns_before_cutting_the_rest(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    _, out, _ = cli(capsys, "status", "--admin", admin.url)
    header = out.splitlines()[0]
    assert "ELAPSED" not in header and "SAMPLES" not in header  # left out first
    assert "STEP" in header and "LAST DECISION" in header
    fraud = next(line for line in out.splitlines() if line.startswith("fraud-model"))
    assert "2/4 weight 25%" in fraud and len(fraud) <= 60
    monkeypatch.setenv("COLUMNS", "400")
    _, out, _ = cli(capsys, "status", "--admin", admin.url)
    old = next(line for line in out.splitlines() if line.startswith("old-model"))
    assert not old.endswith("…")  # a wide terminal shows the whole reason
    assert old.endswith("[1.04, 1.21]")


@pytest.mark.parametrize(
    ("tz", "zone"),
    [("UTC0", "UTC"), ("CET-1CEST,M3.5.0,M10.5.0/3", "CET"), ("<+0530>-5:30", "+0530")],
)
def test_times_show_their_time_zone(
    admin: FakeAdmin,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tz: str,
    zone: str,
) -> None:
    monkeypatch.setenv("TZ", tz)
    time.tzset()
    try:
        _, out, _ = cli(capsys, "status", "fraud-model", "--admin", admin.url)
        _, utc, _ = cli(capsys, "status", "fraud-model", "--utc", "--admin", admin.url)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    pause = next(line for line in out.splitlines() if "PAUSE" in line)
    local = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(NOW + _offset(zone)))
    assert pause.startswith(f"{local} {zone}  ")
    pause = next(line for line in utc.splitlines() if "PAUSE" in line)
    assert pause.startswith(time.strftime("%Y-%m-%d %H:%M:%S UTC  ", time.gmtime(NOW)))
    started = next(line for line in out.splitlines() if line.startswith("started "))
    assert re.match(
        rf"started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d {re.escape(zone)} \(3m12s ago\)", started
    )


def _offset(zone: str) -> int:
    """Seconds east of UTC of the zones above, in November 2023 (NOW)."""
    return {"UTC": 0, "CET": 3600, "+0530": 5 * 3600 + 1800}[zone]


def test_started_and_max_duration_lines(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    admin.rollouts["fraud-model"]["deadline_in"] = 3000.0
    _, out, _ = cli(capsys, "status", "fraud-model", "--utc", "--admin", admin.url)
    line = next(x for x in out.splitlines() if x.startswith("started "))
    assert "(3m12s ago); max_duration ends " in line and line.endswith("UTC (in 50m00s)")
    admin.rollouts["old-model"]["deadline_in"] = 3000.0
    _, out, _ = cli(capsys, "status", "old-model", "--utc", "--admin", admin.url)
    line = next(x for x in out.splitlines() if x.startswith("started "))
    assert "max_duration" not in line  # finished: no deadline to show
