"""A real ``redis-server`` on a free loopback port for tests: start, kill, restart, pause, flush.

Tests never assume a Redis is running: each gets its own server in its own temporary directory,
with persistence off (``--save "" --appendonly no``), so a restart comes back empty, as a
Redis without persistence does in production. The fixture fails (never skips) when
``redis-server`` is missing: a silently skipped store test is a hole in CI.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT = 10.0  # seconds for redis-server to answer PING
MISSING = (
    "redis-server is not on PATH: install redis-server (apt-get install redis-server; "
    ".ci/run installs it)"
)


def free_port() -> int:
    """A loopback TCP port nobody listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """Send one command (RESP, so any bytes in the arguments), return the raw reply (the
    first KiB); OSError when nobody answers. For tests that write behind the store's back."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"".join(parts))
        return sock.recv(1024)


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port``; :meth:`start` again after
    :meth:`stop` brings it back on the same port, empty. With ``persistent=True`` it keeps
    an append-only file in ``directory`` (fsynced on every write), so that :meth:`shutdown`
    (or :meth:`stop`) and :meth:`start` bring it back on the same port with its data."""

    def __init__(
        self, directory: Path, port: int | None = None, *, persistent: bool = False
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(MISSING, pytrace=False)
        self.binary = binary
        self.directory = directory
        self.port = port if port is not None else free_port()
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        """Start the server and wait until it answers PING (fail with its log otherwise)."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.persistent else "no",
                "--appendfsync",
                "always",
                "--daemonize",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode} on port {self.port}:"
                    f"\n{self.log[-2000:]}"
                )
            with contextlib.suppress(OSError):
                if command(self.port, "PING").startswith(b"+PONG"):
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server on port {self.port} did not answer PING within "
                    f"{START_TIMEOUT}s:\n{self.log[-2000:]}"
                )
            time.sleep(0.01)

    def stop(self) -> None:
        """SIGKILL the server (a crash: no goodbye to clients) and wait for it; idempotent."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)  # a paused server dies only once resumed
        process.kill()
        process.wait(timeout=10)

    def shutdown(self) -> None:
        """SIGTERM the server and wait for it to exit (a clean stop: it closes its clients and,
        when persistent, syncs its append-only file); idempotent."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def restart(self) -> None:
        """Kill and start again on the same port: the data is gone (unless persistent)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open but nothing answers (a hung Redis)."""
        assert self.process is not None, "redis-server is not running"
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.process is not None, "redis-server is not running"
        self.process.send_signal(signal.SIGCONT)

    def flush(self) -> None:
        """Delete every key of every database."""
        reply = command(self.port, "FLUSHALL")
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"FLUSHALL on port {self.port} answered {reply!r}")


@contextlib.contextmanager
def running_redis(port: int | None = None, *, persistent: bool = False) -> Iterator[RedisServer]:
    """A started :class:`RedisServer` in a temporary directory, killed on exit."""
    with tempfile.TemporaryDirectory(prefix="canary-redis-") as directory:
        server = RedisServer(Path(directory), port, persistent=persistent)
        for attempt in range(3):  # the free port may be taken between the pick and the bind
            try:
                server.start()
                break
            except RuntimeError:
                if port is not None or attempt == 2:
                    raise
                server.port = free_port()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh ``redis-server`` for one test (it starts in about 10 ms)."""
    with running_redis() as server:
        yield server


__all__ = ["MISSING", "RedisServer", "command", "free_port", "redis_server", "running_redis"]
