"""``canary run --workers N``: N data-plane processes on one port, one admin port in front.

The supervisor is the process ``canary run --workers N`` starts. It serves no proxied traffic:

- **The proxy port.** It binds the port with SO_REUSEPORT without listening (so ``:0`` becomes
  one concrete port, held for as long as the supervisor runs) and starts N workers (``python
  -m canary run -c FILE`` with ``$CANARY_WORKER``, :mod:`canary.workers`). Each listens on that
  port with SO_REUSEPORT; the kernel spreads new connections over the workers listening.
- **Shared mode.** Every worker runs on the rollout file's store (the default SQLite file, or
  Redis): each flushes its samples every flush interval and serves the weights stored, and the
  worker holding the store's lease analyses, decides and writes (docs/architecture.md
  "Scale-out"). Routing is a function of the request and the weights alone (blake2b of the
  sticky key), so every worker gives a user the same arm with the same propensity.
- **The admin port** (``admin.listen``) is the supervisor's: ``/metrics`` is every worker's
  metrics with a ``worker`` label, plus the supervisor's own (``canary_workers``,
  ``canary_worker_up``, ``canary_worker_restarts_total``); ``/healthz`` is the supervisor's;
  ``/readyz`` is ready while some worker is and none reports a fault; ``POST /api/v1/reload``
  reloads every worker; every other call goes to the worker that leads (or any ready worker
  when none here does), which answers as a process alone would. Tokens, origins and limits are
  checked by the worker, which sees the caller's headers.
- **Faults.** A worker that exits is restarted, after 0.5 s doubling to 30 s while it keeps
  failing (reset once one has run for a minute). SIGHUP is passed to every worker. SIGTERM or
  SIGINT stops every worker (each drains its requests, flushes its samples and hands the lease
  over) and then the supervisor. Workers run in their own process group (a terminal's Ctrl-C
  reaches the supervisor alone, which stops them in order), and stop by themselves when the
  supervisor is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from canary.admin.app import MAX_ADMIN_BODY, warn_if_public
from canary.config import Config
from canary.errors import CanaryError
from canary.workers import WORKER_ENV, WorkerSpec, check_workers, read_status

__all__ = [
    "MAX_BACKOFF",
    "MIN_BACKOFF",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "Supervisor",
    "merge_metrics",
    "supervise",
]

log = logging.getLogger("canary.supervisor")

MIN_BACKOFF = 0.5  # seconds before a dead worker is restarted, doubled while it keeps dying
MAX_BACKOFF = 30.0
STEADY = 60.0  # a worker up this long has recovered: its next restart waits MIN_BACKOFF
START_TIMEOUT = 60.0  # seconds the workers may take to become ready at start
STOP_TIMEOUT = 40.0  # seconds a worker may take to drain and stop before it is killed
CHECK_EVERY = 0.1  # seconds between checks of the workers' processes
WORKER_TIMEOUT = 15.0  # seconds a worker's admin API may take (it may forward for 10 s)
SCRAPE_TIMEOUT = 5.0
# Headers that belong to one connection, never passed on (RFC 9110 7.6.1), and the ones
# aiohttp sets itself.
_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Content-Length",
    )
)


class _Worker:
    """One worker slot: its process now (None while it waits to be restarted) and history."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.admin: str | None = None  # http://127.0.0.1:PORT once the worker wrote it
        self.holder: str | None = None
        self.backoff = MIN_BACKOFF
        self.restart_at: float | None = None
        self.last_exit: int | None = None
        self.restarts = 0

    @property
    def index(self) -> int:
        return self.spec.index

    def describe_exit(self) -> str:
        code = self.last_exit
        if code is None:
            return "not started"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"


class Supervisor:
    """Start, watch and stop ``count`` workers for one rollout file; own the admin port."""

    def __init__(
        self,
        config: Config,
        config_path: str | Path,
        count: int,
        *,
        watch_config: float | None = None,
        log_level: str = "INFO",
    ) -> None:
        check_workers(config, count)
        self.config = config
        self.config_path = Path(config_path).resolve()
        self.count = count
        self.watch_config = watch_config
        self.log_level = log_level
        self.proxy_port: int | None = None
        self.admin_port: int | None = None
        self._reserved: socket.socket | None = None
        self._run_dir: str | None = None
        self._workers: list[_Worker] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False
        self._monitor: asyncio.Task[None] | None = None
        self._rr = itertools.count()
        self.registry = CollectorRegistry(auto_describe=True)
        self._m_workers = Gauge(
            "canary_workers", "Worker processes configured (--workers)", registry=self.registry
        )
        self._m_running = Gauge(
            "canary_workers_running", "Worker processes running now", registry=self.registry
        )
        self._m_up = Gauge(
            "canary_worker_up",
            "1 when the worker answered this scrape of /metrics",
            ["worker"],
            registry=self.registry,
        )
        self._m_restarts = Counter(
            "canary_worker_restarts",
            "Worker processes restarted after they exited",
            ["worker"],
            registry=self.registry,
        )
        self._m_workers.set(count)

    # -- start and stop ---------------------------------------------------------------------

    async def start(self) -> None:
        """Reserve the proxy port, serve the admin port, start the workers and wait until
        every one is ready; on any failure stop what started and raise CanaryError."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        token_env = self.config.admin.token_env
        if token_env is not None and not os.environ.get(token_env, ""):
            raise CanaryError(  # every worker would refuse to start, each saying so
                f"admin.token_env names ${token_env}, but it is not set or empty: set it, or "
                "remove admin.token_env to run the admin API without a token (loopback only)"
            )
        host, port = self.config.proxy.listen
        self._reserved = _reserve_port(host, port)
        self.proxy_port = int(self._reserved.getsockname()[1])
        self._run_dir = tempfile.mkdtemp(prefix="canary-workers-")
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=WORKER_TIMEOUT), auto_decompress=False
        )
        await self._serve_admin()
        for index in range(1, self.count + 1):
            spec = WorkerSpec(index, self.count, self.proxy_port, self._run_dir, os.getpid())
            worker = _Worker(spec)
            self._workers.append(worker)
            self._spawn(worker)
        await self._wait_ready()
        self._monitor = asyncio.get_running_loop().create_task(self._watch())
        ahost, _ = self.config.admin.listen
        log.info(
            "%d workers serving: proxy on %s:%s, admin on %s:%s",
            self.count,
            host,
            self.proxy_port,
            ahost,
            self.admin_port,
        )

    async def _serve_admin(self) -> None:
        app = web.Application(client_max_size=MAX_ADMIN_BODY)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/api/v1/reload", self._reload)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        self._runner = runner
        ahost, aport = self.config.admin.listen
        await web.TCPSite(runner, ahost, aport, reuse_address=True).start()
        for addr in runner.addresses:
            if isinstance(addr, tuple):
                self.admin_port = int(addr[1])
                break
        warn_if_public(self.config.admin)

    def _spawn(self, worker: _Worker) -> None:
        with contextlib.suppress(FileNotFoundError):
            worker.spec.status_path.unlink()
        cmd = [
            sys.executable,
            "-m",
            "canary",
            "--log-level",
            self.log_level,
            "run",
            "-c",
            str(self.config_path),
        ]
        if self.watch_config is not None:
            cmd += ["--watch-config", repr(self.watch_config)]
        env = {**os.environ, WORKER_ENV: worker.spec.to_env(), "PYTHONUNBUFFERED": "1"}
        # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which stops
        # the workers in order (and does not mistake their exit for a crash to restart).
        worker.proc = subprocess.Popen(cmd, env=env, process_group=0)
        worker.started = time.monotonic()
        worker.admin = worker.holder = None
        worker.restart_at = None
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        pending = list(self._workers)
        while pending:
            for worker in list(pending):
                proc = worker.proc
                assert proc is not None
                code = proc.poll()
                if code is not None:
                    worker.last_exit = code
                    raise CanaryError(
                        f"worker {worker.index} {worker.describe_exit()} while starting "
                        "(its log is above)"
                    )
                if self._read_status(worker) and await self._worker_ready(worker):
                    pending.remove(worker)
            if time.monotonic() > deadline:
                names = ", ".join(str(w.index) for w in pending)
                raise CanaryError(f"worker(s) {names} not ready within {START_TIMEOUT:g}s")
            await asyncio.sleep(CHECK_EVERY)

    async def stop(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL after ``STOP_TIMEOUT``), then the admin
        port, and release the proxy port."""
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        running = [w.proc for w in self._workers if w.proc is not None and w.proc.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            await asyncio.sleep(CHECK_EVERY)
        for proc in running:
            if proc.poll() is None:
                log.warning("worker pid %d did not stop in %gs: killed", proc.pid, STOP_TIMEOUT)
                proc.kill()
                proc.wait()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None

    def signal_workers(self, sig: signal.Signals) -> None:
        """Pass ``sig`` (SIGHUP: reload) to every running worker."""
        for w in self._workers:
            if w.proc is not None and w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    # -- watching ---------------------------------------------------------------------------

    async def _watch(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            for worker in self._workers:
                self._check(worker, now)
            self._m_running.set(
                sum(1 for w in self._workers if w.proc is not None and w.proc.poll() is None)
            )
            await asyncio.sleep(CHECK_EVERY)

    def _check(self, worker: _Worker, now: float) -> None:
        proc = worker.proc
        if proc is not None:
            code = proc.poll()
            if code is None:
                if worker.admin is None:
                    self._read_status(worker)
                return
            worker.last_exit = code
            worker.proc = None
            worker.admin = worker.holder = None
            if now - worker.started >= STEADY:
                worker.backoff = MIN_BACKOFF
            worker.restart_at = now + worker.backoff
            log.warning(
                "worker %d (pid %d) %s; restarting it in %gs",
                worker.index,
                proc.pid,
                worker.describe_exit(),
                worker.backoff,
            )
            worker.backoff = min(MAX_BACKOFF, worker.backoff * 2)
            return
        if worker.restart_at is not None and now >= worker.restart_at:
            try:
                self._spawn(worker)
            except OSError as exc:
                log.error("cannot restart worker %d: %s", worker.index, exc)
                worker.restart_at = now + worker.backoff
                return
            worker.restarts += 1
            self._m_restarts.labels(str(worker.index)).inc()

    def _read_status(self, worker: _Worker) -> bool:
        if worker.proc is None:
            return False
        status = read_status(worker.spec.status_path, worker.proc.pid)
        if status is None:
            return False
        worker.admin = f"http://127.0.0.1:{status['admin_port']}"
        holder = status.get("holder")
        worker.holder = holder if isinstance(holder, str) else None
        return True

    def _live(self) -> list[_Worker]:
        return [w for w in self._workers if w.admin is not None and w.proc is not None]

    async def _worker_ready(self, worker: _Worker) -> bool:
        answer = await self._get(worker, "/readyz")
        return answer is not None and answer[0] == 200

    async def _get(self, worker: _Worker, path: str) -> tuple[int, Any] | None:
        """``GET path`` on a worker's admin API: (status, JSON) or None when it fails."""
        if worker.admin is None or self._session is None:
            return None
        try:
            async with self._session.get(
                worker.admin + path, timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
            ) as answer:
                return answer.status, await answer.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    # -- the admin port ---------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        processes = [
            {
                "worker": w.index,
                "pid": w.proc.pid if w.proc is not None and w.proc.poll() is None else None,
                "admin": w.admin,  # its own admin API, on loopback
                "restarts": w.restarts,
                "last_exit": None if w.last_exit is None else w.describe_exit(),
            }
            for w in self._workers
        ]
        running = sum(1 for p in processes if p["pid"] is not None)
        return web.json_response(
            {"status": "ok", "workers": self.count, "running": running, "processes": processes}
        )

    async def _readyz(self, request: web.Request) -> web.Response:
        """Ready while at least one worker is and no running worker reports a fault (a store
        outage, say); a worker being restarted is named but does not make the port unready
        (the others serve it)."""
        answers = await asyncio.gather(*(self._get(w, "/readyz") for w in self._workers))
        reasons: list[str] = []
        ready = 0
        faulty = False
        for worker, answer in zip(self._workers, answers, strict=True):
            if worker.proc is None:
                reasons.append(f"worker {worker.index}: {worker.describe_exit()}, restarting")
            elif answer is None:
                reasons.append(f"worker {worker.index}: starting")
            elif answer[0] == 200:
                ready += 1
            else:
                reason = answer[1].get("reason") if isinstance(answer[1], dict) else None
                reasons.append(f"worker {worker.index}: {reason or 'not ready'}")
                faulty = faulty or reason != "starting"
        ok = ready > 0 and not faulty
        body = {
            "status": "ready" if ok else "not ready",
            "reason": "; ".join(reasons) if reasons else "serving",
            "workers": self.count,
            "ready": ready,
        }
        return web.json_response(body, status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        live = self._live()
        texts = await asyncio.gather(*(self._scrape(w) for w in live))
        self._m_up.clear()
        for worker in self._workers:
            self._m_up.labels(str(worker.index)).set(0)
        scraped: list[tuple[str, str]] = []
        for worker, text in zip(live, texts, strict=True):
            if text is not None:
                self._m_up.labels(str(worker.index)).set(1)
                scraped.append((str(worker.index), text))
        merged = merge_metrics(scraped, self.registry.collect())
        return web.Response(body=merged, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _scrape(self, worker: _Worker) -> str | None:
        if worker.admin is None or self._session is None:
            return None
        try:
            async with self._session.get(
                worker.admin + "/metrics", timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
            ) as answer:
                return await answer.text() if answer.status == 200 else None
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def _leader_worker(self) -> _Worker | None:
        """The worker on this machine that holds the lease, asked now (None: none here)."""
        holders = {w.holder: w for w in self._live() if w.holder}
        for worker in self._live():
            answer = await self._get(worker, "/api/v1/leader")
            if answer is not None and answer[0] == 200 and isinstance(answer[1], dict):
                leader = answer[1].get("leader")
                return holders.get(leader) if isinstance(leader, str) else None
        return None

    async def _target(self) -> _Worker | None:
        leader = await self._leader_worker()
        if leader is not None:
            return leader
        live = self._live()
        return live[next(self._rr) % len(live)] if live else None

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        worker = await self._target()
        if worker is None:
            return _error(503, "no worker is serving now (they are starting or restarting)")
        body = await request.read()
        answer = await self._send(worker, request, body)
        if answer is None:
            return _error(502, f"worker {worker.index} did not answer")
        status, headers, data = answer
        return web.Response(status=status, body=data, headers=headers)

    async def _reload(self, request: web.Request) -> web.StreamResponse:
        """Every worker re-reads the file: one answer, the first refusal if any refused."""
        live = self._live()
        if not live:
            return _error(503, "no worker is serving now (they are starting or restarting)")
        body = await request.read()
        answers = await asyncio.gather(*(self._send(w, request, body) for w in live))
        for worker, answer in zip(live, answers, strict=True):
            if answer is None:
                return _error(502, f"worker {worker.index} did not answer the reload")
            if answer[0] != 200:
                status, headers, data = answer
                return web.Response(status=status, body=data, headers=headers)
        first = answers[0]
        assert first is not None
        status, headers, data = first
        return web.Response(status=status, body=data, headers=headers)

    async def _send(
        self, worker: _Worker, request: web.Request, body: bytes
    ) -> tuple[int, dict[str, str], bytes] | None:
        """The caller's request, as it came (its Host, token and Origin, which the worker
        checks), to one worker; its answer without per-connection headers."""
        if worker.admin is None or self._session is None:
            return None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        try:
            async with self._session.request(
                request.method,
                worker.admin + request.rel_url.path_qs,
                headers=headers,
                data=body or None,
                allow_redirects=False,
            ) as answer:
                data = await answer.read()
                out = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP}
                out.pop("Date", None)
                out.pop("Server", None)
                return answer.status, out, data
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("worker %d admin API: %s: %s", worker.index, type(exc).__name__, exc)
            return None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` with SO_REUSEPORT without listening: the port is this process's
    (another program cannot take it while workers restart) and the workers, binding it with
    SO_REUSEPORT too, share it. A socket that does not listen is given no connections."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise CanaryError(f"cannot bind the proxy port {host}:{port}: {exc}") from None
    return sock


def merge_metrics(scraped: Iterable[tuple[str, str]], own: Iterable[Metric]) -> bytes:
    """One exposition of every worker's metrics (each sample labelled ``worker``) and the
    supervisor's own families: sum over ``worker`` in PromQL for the machine's totals."""
    families: dict[str, Metric] = {}
    for worker, text in scraped:
        for family in text_string_to_metric_families(text):
            into = families.get(family.name)
            if into is None:
                into = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = into
            for sample in family.samples:
                into.samples.append(sample._replace(labels={**sample.labels, "worker": worker}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*own, *families.values()]))
    return generate_latest(registry)


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


async def supervise(
    config: Config,
    config_path: str | Path,
    count: int,
    *,
    watch_config: float | None = None,
    log_level: str = "INFO",
) -> None:
    """Run ``count`` workers until SIGINT or SIGTERM; SIGHUP reloads every worker."""
    supervisor = Supervisor(
        config, config_path, count, watch_config=watch_config, log_level=log_level
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, supervisor.signal_workers, signal.SIGHUP)
    await supervisor.start()
    try:
        await stop.wait()
    finally:
        log.info("stopping %d workers", count)
        await supervisor.stop()
