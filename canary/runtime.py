"""The one place that wires config, store, proxy, controller, webhooks and the admin app."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import multiprocessing
import os
import signal
import socket
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from aiohttp import web

from canary.admin import make_admin_app, warn_if_public
from canary.analyzer import InlineAnalyzer, WorkerAnalyzer
from canary.analyzer.worker import init_worker
from canary.config import Config
from canary.config._loader import load_config_result
from canary.controller import Controller
from canary.controller.leadership import Leadership, holder_name
from canary.errors import CanaryError, ConfigError, ConfigIssue
from canary.metrics import Metrics
from canary.observe import Recorder, Weights
from canary.observe.promql import PromQLEvaluators
from canary.observe.resources import ResourceScrapers
from canary.proxy import H1Transport, HttpServer, Proxy, ServerLimits
from canary.store import Store, open_store
from canary.webhooks import WebhookSender
from canary.workers import WorkerSpec, write_status

__all__ = [
    "ADVERTISE_ENV",
    "MAX_LEASE",
    "MIN_LEASE",
    "PARENT_CHECK",
    "RELOAD_TIMEOUT",
    "Runtime",
    "advertised_admin_url",
    "lease_ttl",
    "load_config_off_loop",
    "serve",
]

log = logging.getLogger("canary.runtime")


class Runtime:
    """Start and stop the proxy port and the admin port for one config."""

    def __init__(
        self,
        config: Config,
        config_path: str | Path | None = None,
        *,
        run_controller: bool = True,
        watch_config: float | None = None,
        worker: WorkerSpec | None = None,
    ) -> None:
        """``run_controller=False`` loads the rollouts' state but takes no decisions (tests of
        the data plane drive :meth:`Controller.flush` and ``evaluate`` themselves).

        ``watch_config``: seconds between checks of the rollout file's content; a change is
        reloaded as SIGHUP reloads it (``canary run --watch-config``: a Kubernetes ConfigMap
        volume is updated in place, and nobody is there to send the signal). None: no checks.

        ``worker``: this process is one of ``canary run --workers N``'s (:mod:`canary.supervisor`):
        it listens on the shared proxy port with SO_REUSEPORT, serves its admin API on an
        ephemeral loopback port the supervisor forwards to, and runs in shared mode.
        """
        self.config = config
        self.config_path = Path(config_path) if config_path is not None else None
        self.run_controller = run_controller
        self.worker = worker
        if worker is not None and config.state.backend == "memory":
            raise CanaryError("a --workers worker needs a shared store: sqlite or redis")
        if watch_config is not None:
            if self.config_path is None:
                raise CanaryError("watching the rollout file needs the file's path")
            if not watch_config > 0:
                raise CanaryError(f"the watch interval must be positive, got {watch_config!r}")
        self.watch_config = watch_config
        # The content the running config was read from (read now, right after the CLI loaded
        # it, so that a change made while canary starts is still seen as one).
        self._config_digest = (
            _digest_or_none(self.config_path)
            if watch_config is not None and self.config_path is not None
            else None
        )
        self.metrics = Metrics()
        self.recorder = Recorder()
        self.transport = H1Transport(
            limit_per_host=max(r.routing.max_connections for r in config.rollouts)
        )
        self.proxy = Proxy(config, self.transport, self.recorder, self.metrics)
        self.store: Store = open_store(
            config.state.backend, path=config.state.path, url=config.state.url
        )
        self.webhooks = WebhookSender(
            on_result=lambda rollout, result: self.metrics.webhooks.labels(rollout, result).inc()
        )
        # The statistics take milliseconds per rollout: run them in a worker process so the
        # proxy's requests never wait for them (another core does the work, or, when canary
        # has one core, the worker runs at a lower priority and yields it to the proxy).
        # Worker processes start from the forkserver: have it import the rollout file's loader
        # once, so a reload's worker (load_config_off_loop) starts in milliseconds.
        _preload_forkserver()
        self._analysis_pool = (
            ProcessPoolExecutor(
                1,
                mp_context=multiprocessing.get_context("forkserver"),
                initializer=init_worker,
                initargs=(os.getpid(),),
            )
            if run_controller
            else None
        )
        # A store shared with other canary processes (replicas on one Redis, or the workers of
        # `--workers N` on one SQLite file or Redis): one leader acts, every process serves
        # the weights it stores (docs/architecture.md "Scale-out"). Its name, with the admin
        # address it advertises signed with the admin token, is set in _start.
        self.leadership = (
            Leadership(
                self.store, lease_ttl(config), holder=holder_name(advertised_admin_url(config))
            )
            if config.state.backend == "redis" or worker is not None
            else None
        )
        self.controller = Controller(
            config,
            self.store,
            self.recorder,
            self.metrics,
            self._apply_weights,
            notifier=self.webhooks,
            analyzer=InlineAnalyzer()
            if self._analysis_pool is None
            else WorkerAnalyzer(self._analysis_pool, self.metrics),
            input_health=self.recorder.input_health,
            leadership=self.leadership,
            on_leading=self._leading_changed,
            on_share=self.proxy.set_traffic_share,
            gate_asker=self.webhooks,  # confirm-advance / confirm-promotion gates
        )
        # Background scrapers of rollouts with resource: metrics (never on the request path).
        self.resources = ResourceScrapers(self.recorder, self.metrics)
        # Likewise the promql: queries to analysis.prometheus (docs/promql.md).
        self.promql = PromQLEvaluators(self.recorder, self.metrics)
        self._proxy_server: HttpServer | None = None
        self._ready = False
        # What start() started, each part with its own stop; stop() unwinds it in reverse.
        self._stack = contextlib.AsyncExitStack()
        self._proxy_closing = contextlib.AsyncExitStack()  # closes the proxy once (see _start)
        # What exists from here on is stopped even when start() is never called or fails
        # early: the analysis pool last, and the proxy (its label ticker may already run),
        # once, by the proxy port's orderly close or else here.
        self._stack.callback(self._shutdown_analysis_pool)
        self._proxy_closing.push_async_callback(self._close_proxy)
        self._stack.push_async_callback(self._proxy_closing.aclose)
        self._background: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()
        self.proxy_port: int | None = None
        self.admin_port: int | None = None

    async def _leading_changed(self, leading: bool) -> None:
        """Resource scrapes and promql queries run on the leader only (one window per
        interval, not one per process): started when this process takes over, stopped when
        it hands over."""
        if leading:
            await self.resources.apply(self.config)
            await self.promql.apply(self.config)
        else:
            await self.resources.close()
            await self.promql.close()

    def _apply_weights(self, rollout: str, weights: Weights) -> None:
        if rollout in self.proxy.routes:
            self.proxy.set_weights(rollout, weights)

    def readiness(self) -> tuple[bool, str]:
        if not self._ready:
            return False, "starting"
        if not self.controller.store_ok:
            return (
                False,
                f"state store unavailable, rollouts on hold: {self.controller.store_error}",
            )
        return True, "serving"

    def _admin_token(self) -> str | None:
        env = self.config.admin.token_env
        if env is None:
            return None
        token = os.environ.get(env, "")
        if not token:
            raise CanaryError(
                f"admin.token_env names ${env}, but it is not set or empty: set it, or remove "
                "admin.token_env to run the admin API without a token (loopback only)"
            )
        return token

    async def start(self) -> None:
        """Start every part; when one fails, stop what started (in reverse) and raise."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        """Start the parts in an order whose reverse is the order they must stop in.

        Unwound (by :meth:`stop`, or a failed start) from the last registered: scrapers
        first, so their last windows are in the controller's last flush; the controller's
        loop (it decides nothing while the proxy drains); the proxy port, which drains
        in-flight requests, ends the proxy's background work and upstream connections and
        then has the controller write what those requests recorded; the admin app (it
        answers, "not ready", during the drain); webhooks; the store; the analysis pool.
        """
        token = self._admin_token()
        stack = self._stack
        admin_sock = self._bind_worker_admin() if self.worker is not None else None
        if self.leadership is not None:  # named before the store's lease is first taken
            self.leadership.key = token
            self.leadership.holder = holder_name(self._advertise(admin_sock), key=token)
        if admin_sock is not None:
            stack.callback(admin_sock.close)  # closed by the admin app too; twice is fine
        await self.store.open()
        stack.push_async_callback(self.store.close)
        # Started before the controller loads (which may fire a rollout's `start` webhook),
        # so that it is stopped after the controller's last decision could fire one.
        await self.webhooks.start()
        stack.push_async_callback(self.webhooks.close)
        weights = await self.controller.load()
        self.proxy.apply_config(self.config, weights)

        admin_app = make_admin_app(
            self.proxy,
            self.metrics,
            self.readiness,
            controller=self.controller,
            reload=self.reload_async if self.config_path is not None else None,
            token=token,
            feedback=self.proxy,
            recorder=self.recorder,
            promql=self.promql.status,
        )
        admin_runner = web.AppRunner(admin_app, handle_signals=False, access_log=None)
        await admin_runner.setup()
        stack.push_async_callback(admin_runner.cleanup)
        ahost, aport = self.config.admin.listen
        if admin_sock is not None:
            ahost = "127.0.0.1"
            await web.SockSite(admin_runner, admin_sock).start()
        else:
            await web.TCPSite(admin_runner, ahost, aport, reuse_address=True).start()
            warn_if_public(self.config.admin)
        self.admin_port = _bound_port(admin_runner)

        pcfg = self.config.proxy
        limits = ServerLimits(
            max_header_size=pcfg.max_header_size, client_timeout=pcfg.client_timeout
        )
        self._proxy_server = HttpServer(self.proxy.handle, limits, self._rejected)
        host, port = pcfg.listen
        if self.worker is not None:
            port = self.worker.proxy_port
        self.proxy_port = await self._proxy_server.listen(
            host, port, reuse_port=self.worker is not None
        )
        stack.push_async_callback(self._close_proxy_port)
        if self.run_controller:
            await self.controller.start()
        # Without the loop too: stopping writes the last samples (a clean stop loses nothing).
        stack.push_async_callback(self.controller.stop)
        stack.push_async_callback(self.resources.close)  # safe on scrapers partly started
        stack.push_async_callback(self.promql.close)
        if self.leadership is None or self.leadership.leading:
            await self.resources.apply(self.config)
            await self.promql.apply(self.config)
        if self.watch_config is not None and self.config_path is not None:
            # Last in, so first out: no reload starts while the rest stops.
            self._start_config_watch(self.config_path, self.watch_config)
        self._ready = True
        if self.worker is not None:
            write_status(
                self.worker,
                self.admin_port,
                self.leadership.holder if self.leadership is not None else None,
            )
        for r in self.config.rollouts:
            w = weights[r.name]
            log.info(
                "rollout %s: candidate %.1f%%%s; proxy on %s:%s, admin on %s:%s",
                r.name,
                w.candidate,
                " (shadow)" if w.shadow else "",
                host,
                self.proxy_port,
                ahost,
                self.admin_port,
            )

    def _bind_worker_admin(self) -> socket.socket:
        """A worker's admin API: an ephemeral loopback port (the supervisor owns the public
        one and forwards to it). Bound before the store is opened so that the worker's
        leadership name carries it from its first lease on; other workers on this machine
        forward operator commands there, unless the machine advertises an address replicas
        on other hosts can reach ($CANARY_ADVERTISE_ADMIN, or a redis store with a fixed
        ``admin.listen``: the supervisor's port, which routes them to its leading worker)."""
        return socket.create_server(("127.0.0.1", 0))

    def _advertise(self, worker_admin: socket.socket | None) -> str | None:
        """The admin URL this process advertises to the others (see _bind_worker_admin)."""
        public = advertised_admin_url(self.config)
        if worker_admin is None:
            return public
        shared_across_hosts = self.config.state.backend == "redis" or bool(
            os.environ.get(ADVERTISE_ENV, "").strip()
        )
        if public is not None and shared_across_hosts:
            return public
        return f"http://127.0.0.1:{int(worker_admin.getsockname()[1])}"

    def _rejected(self, status: int) -> None:
        """A request the proxy port could not parse (400), with too big a head (431) or one
        whose head did not arrive in time (408), or an HTTP/2 client (505: h2c, gRPC)."""
        reason = {408: "client_timeout", 431: "head_too_large", 505: "http2"}.get(
            status, "bad_request"
        )
        self.metrics.counters.reject(reason)

    async def reload_async(self) -> list[str]:
        """Re-read the config file and apply it; raise ConfigError and keep the running one."""
        if self.config_path is None:
            raise CanaryError("canary was not started from a file; there is nothing to reload")
        async with self._reload_lock:  # reloads apply in the order they were asked for
            return await self._reload_locked(self.config_path)

    async def _reload_locked(self, path: Path) -> list[str]:
        try:
            new = await load_config_off_loop(path)
        except ConfigError as exc:
            log.error("reload rejected, keeping the running config: %s", exc)
            raise
        if new.proxy.listen != self.config.proxy.listen or new.admin != self.config.admin:
            log.warning("listen addresses, admin or state settings changed: restart to apply")
        if new.state != self.config.state:
            log.warning("state settings changed: restart canary to apply them")
        weights = await self.controller.apply_config(new)
        self.proxy.apply_config(new, weights)
        self.config = new
        if self.leadership is None or self.leadership.leading:
            await self.resources.apply(new)
            await self.promql.apply(new)
        log.info("configuration reloaded from %s", self.config_path)
        return [r.name for r in new.rollouts]

    async def _reload_logged(self) -> None:
        """:meth:`reload_async` for the callers nobody answers (SIGHUP, the file watcher):
        every failure is logged, never raised, and the running config stays."""
        try:
            await self.reload_async()
        except ConfigError:
            pass  # already logged with every issue
        except CanaryError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
        except Exception:  # never "Task exception was never retrieved"
            log.exception("reload failed, keeping the running config")

    def reload(self) -> None:
        """SIGHUP: reload in the background; errors are logged, the running config stays."""
        task = asyncio.get_running_loop().create_task(self._reload_logged())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _start_config_watch(self, path: Path, interval: float) -> None:
        """Start :meth:`_watch_config` and register its stop on the exit stack: the stop
        lets a reload in progress finish (cancelling it could leave the controller and the
        proxy on different configs), then ends the task."""
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._watch_config(path, interval, stop))

        async def _stop_watch() -> None:
            stop.set()
            await task

        self._stack.push_async_callback(_stop_watch)
        log.info("watching %s for changes every %gs", path, interval)

    async def _watch_config(self, path: Path, interval: float, stop: asyncio.Event) -> None:
        """Every ``interval`` seconds hash the rollout file's content; when it differs from
        the content last seen, reload exactly as SIGHUP does. A rejected file is not retried
        until its content changes again (its issues are logged once, not every interval).

        The content, not the modification time: a Kubernetes ConfigMap volume swaps a
        symlink to a new directory, and a copy or a ``git checkout`` may keep the mtime.
        """
        unreadable: str | None = None  # the last read error logged, to log each one once
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            try:
                digest = await asyncio.to_thread(_file_digest, path)
            except OSError as exc:
                if str(exc) != unreadable:
                    log.warning("cannot read %s, keeping the running config: %s", path, exc)
                    unreadable = str(exc)
                continue
            unreadable = None
            if digest == self._config_digest:
                continue
            self._config_digest = digest
            log.info("%s changed: reloading it", path)
            await self._reload_logged()

    async def stop(self) -> None:
        """Stop what :meth:`start` started, in reverse (see :meth:`_start`); every part is
        stopped even when an earlier one fails to (its error is raised once all have run)."""
        self._ready = False
        await self._stack.aclose()

    async def _close_proxy_port(self) -> None:
        server = self._proxy_server
        if server is not None:
            await server.close()  # in-flight requests finish
            self._proxy_server = None
        await self._proxy_closing.aclose()  # mirrors still running count as lost, ticker stops
        await self.controller.flush()  # what the drained requests recorded

    async def _close_proxy(self) -> None:
        await self.proxy.close()
        await self.transport.close()

    def _shutdown_analysis_pool(self) -> None:
        if self._analysis_pool is not None:
            self._analysis_pool.shutdown(wait=True, cancel_futures=True)
            self._analysis_pool = None


def lease_ttl(config: Config) -> float:
    """The leadership lease's TTL: the shortest analysis interval, at least ``MIN_LEASE``
    (renewed every flush interval, it must outlast a few of them) and at most
    ``MAX_LEASE``. A follower takes over within TTL + one flush interval of the leader's
    death: within two analysis intervals for intervals of 1 s and more."""
    shortest = min(r.analysis.interval for r in config.rollouts)
    return min(MAX_LEASE, max(MIN_LEASE, shortest))


ADVERTISE_ENV = "CANARY_ADVERTISE_ADMIN"  # the admin URL other replicas forward commands to


def advertised_admin_url(config: Config) -> str | None:
    """Where other replicas reach this process's admin API (they forward operator commands
    to the leader): ``$CANARY_ADVERTISE_ADMIN`` when set, else ``admin.listen`` with a
    wildcard host replaced by this host's name; None for an ephemeral port (0)."""
    explicit = os.environ.get(ADVERTISE_ENV, "").strip()
    if explicit:
        return explicit.rstrip("/")
    host, port = config.admin.listen
    if port == 0:
        return None
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


MIN_LEASE = 1.0  # seconds
MAX_LEASE = 10.0

RELOAD_TIMEOUT = 30.0  # seconds a worker may take to read a rollout file (limits make it < 2)


async def load_config_off_loop(path: str | Path, timeout: float = RELOAD_TIMEOUT) -> Config:
    """:func:`load_config` in a short-lived worker process, so that reading, parsing and
    validating a file (up to ``MAX_FILE_BYTES``, bounded by the loader's limits) never holds
    the event loop or its GIL: the proxy keeps answering during a reload. Starting the worker
    and waiting for it happen in a thread (the forkserver handshake blocks). Every failure,
    including a worker that dies or hangs, is a :class:`ConfigError`."""
    new, issues = await asyncio.to_thread(_load_in_worker, str(path), timeout)
    if new is None:
        raise ConfigError(issues, str(path))
    return new


def _load_in_worker(path: str, timeout: float) -> tuple[Config | None, list[ConfigIssue]]:
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"))
    try:
        return pool.submit(load_config_result, path).result(timeout)
    except TimeoutError:
        for proc in list(pool._processes.values()):  # a hung worker is never left behind
            proc.kill()
        return None, [ConfigIssue("", f"reading the file took more than {timeout:g}s")]
    except BrokenProcessPool:
        return None, [ConfigIssue("", "the process reading the file died (out of memory?)")]
    except Exception as exc:  # a bug in the loader: still a refused file, never a crash
        log.exception("reading %s failed", path)
        return None, [ConfigIssue("", f"cannot read the file: {type(exc).__name__}: {exc}")]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _preload_forkserver() -> None:
    """Before the forkserver starts (the first worker process of this process): preload the
    loader next to ``__main__`` (the default); later calls change nothing."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["__main__", "canary.config._loader"]
    )


def _file_digest(path: Path) -> str:
    """SHA-256 of a file's content, read in blocks (an oversized file costs no memory)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digest_or_none(path: Path) -> str | None:
    try:
        return _file_digest(path)
    except OSError:  # unreadable now: the first readable content counts as a change
        return None


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    raise CanaryError("server is not listening")


async def serve(
    config: Config,
    config_path: str | Path | None = None,
    *,
    watch_config: float | None = None,
    worker: WorkerSpec | None = None,
) -> None:
    """Run until SIGINT or SIGTERM; SIGHUP reloads the config file, and so does a change of
    its content when ``watch_config`` (seconds between checks) is given. A ``worker`` also
    stops when its supervisor is gone (it is never left serving on its own)."""
    runtime = Runtime(config, config_path, watch_config=watch_config, worker=worker)
    await runtime.start()
    # Everything allocated at start-up lives for the whole run: keep it out of the collector's
    # way, and collect young objects less often (DESIGN.md "Data plane notes": ~+11% req/s).
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, runtime.reload)
    orphan = loop.create_task(_watch_parent(worker.parent, stop)) if worker is not None else None
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        if orphan is not None:
            orphan.cancel()
        await runtime.stop()


PARENT_CHECK = 1.0  # seconds between a worker's checks that its supervisor still runs


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if os.getppid() != parent:
            log.error("the supervisor (pid %d) is gone: this worker stops", parent)
            stop.set()
            return
        await asyncio.sleep(PARENT_CHECK)
